//! End to end: the agent binary against the real libvirt system daemon and QEMU, exporting to the
//! in-process OTLP receiver, once over gRPC and once over HTTP/protobuf.
//!
//! Needs a libvirtd answering on `qemu:///system` (`scripts/libvirtd.sh start`); without one the tests
//! skip with a printed reason, or fail when `VHA_E2E_REQUIRED=1` (`scripts/test.sh`, CI). `type='kvm'`
//! steps run only where KVM works and are otherwise skipped with a reason.
//!
//! The export interval is 30 s, so a change that reaches the receiver within a few seconds can only
//! have been pushed on change. Each transition's latency (libvirt command returned → receiver got the
//! request showing the change) is printed as a table, and appended to `$VHA_E2E_REPORT` when set.
//! Other tests and users may run domains on the same daemon: only series of this test's own domains
//! are asserted on. The two scenarios run one after the other, so that the latencies measured are
//! not shortened by pushes the other scenario's transitions caused.

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use common::libvirt::{kvm_available, require_libvirtd, TestDomain, Virt};
use common::receiver::{describe, Observation, Receiver, Series, Transport};
use common::Agent;

const METRIC: &str = "kubevirt_vmi_hypervisor_info";
const NODE: &str = "e2e-node";
/// Bound for any expected change to show up.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A change must arrive well before the 30 s export interval: that proves push on change.
const PUSH_BOUND: Duration = Duration::from_secs(5);
/// How long to look for an optional push after a transition that changes nothing exported.
const OPTIONAL_PUSH_WINDOW: Duration = Duration::from_millis(1500);

/// One line of the latency table.
struct Row {
    transition: String,
    latency: Option<Duration>,
    note: String,
}

/// The running agent, its receiver, and the latency table of one protocol's scenario.
struct Harness {
    transport: Transport,
    rx: Receiver,
    agent: Option<Agent>,
    rows: Vec<Row>,
}

impl Harness {
    fn new(transport: Transport) -> Harness {
        Harness {
            transport,
            rx: Receiver::start().expect("start the OTLP receiver"),
            agent: None,
            rows: Vec::new(),
        }
    }

    fn spawn_agent(&mut self) -> Instant {
        let endpoint = self.rx.endpoint(self.transport);
        let protocol = match self.transport {
            Transport::Grpc => "grpc",
            Transport::Http => "http/protobuf",
        };
        let agent = Agent::spawn(
            &["run"],
            &[
                ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "qemu:///system"),
                ("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", protocol),
                ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", &endpoint),
                ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "30s"),
                ("VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE", "250ms"),
                ("VIRT_HYPERVISOR_AGENT_NODE_NAME", NODE),
                ("RUST_LOG", "info"),
            ],
        )
        .expect("spawn the agent");
        let started = agent.started();
        self.agent = Some(agent);
        started
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent spawned")
    }

    fn fail(&mut self, what: String) -> ! {
        let status = match self.agent.as_mut().map(Agent::check_running) {
            Some(Err(e)) => format!("{e:#}"),
            _ => "the agent is still running".to_string(),
        };
        panic!("[{}] {what}\n{status}", self.transport);
    }

    /// Wait for the first export after `since` whose series of the metric satisfy `pred`; assert it
    /// came within the push bound; record its latency under `transition`.
    fn expect<F>(&mut self, transition: &str, since: Instant, mut pred: F) -> Observation
    where
        F: FnMut(&[Series]) -> bool,
    {
        let deadline = since + TIMEOUT;
        loop {
            // Short slices, so that an agent that died is reported at once with its log.
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            match self.rx.wait_for_series(since, slice, METRIC, &mut pred) {
                Ok(obs) => {
                    self.rows.push(Row {
                        transition: transition.to_string(),
                        latency: Some(obs.latency),
                        note: format!("request #{}", obs.request.seq),
                    });
                    if obs.latency > PUSH_BOUND {
                        self.fail(format!(
                            "{transition}: arrived after {:?}, beyond the {PUSH_BOUND:?} push bound \
                             (export interval 30s): no push on change?",
                            obs.latency
                        ));
                    }
                    check_resource(self.transport, &obs);
                    return obs;
                }
                Err(e) => {
                    if let Err(dead) = self.agent().check_running() {
                        panic!("[{}] {transition}: {dead:#}", self.transport);
                    }
                    if Instant::now() >= deadline {
                        self.fail(format!("{transition}: not seen within {TIMEOUT:?}: {e:#}"));
                    }
                }
            }
        }
    }

    /// For transitions that change nothing exported: note whether a push came anyway, and if it did,
    /// that `pred` holds for it.
    fn optional_push<F>(&mut self, transition: &str, since: Instant, mut pred: F)
    where
        F: FnMut(&[Series]) -> bool,
    {
        match self
            .rx
            .wait_for_request(since, OPTIONAL_PUSH_WINDOW, |r| r.has_metrics())
        {
            Ok(obs) => {
                let series = obs.request.series(METRIC);
                if !pred(&series) {
                    self.fail(format!(
                        "{transition}: the export that followed is wrong:\n{}",
                        describe(&series)
                    ));
                }
                self.rows.push(Row {
                    transition: transition.to_string(),
                    latency: Some(obs.latency),
                    note: "pushed (optional)".to_string(),
                });
            }
            Err(_) => self.rows.push(Row {
                transition: transition.to_string(),
                latency: None,
                note: format!("no push within {OPTIONAL_PUSH_WINDOW:?} (none required)"),
            }),
        }
    }

    fn skip(&mut self, transition: &str, reason: &str) {
        eprintln!("[{}] SKIPPED step {transition}: {reason}", self.transport);
        self.rows.push(Row {
            transition: transition.to_string(),
            latency: None,
            note: format!("skipped: {reason}"),
        });
    }

    /// One line per received request (`VHA_E2E_VERBOSE=1`): when, what, how many series of ours.
    fn request_log(&self) -> String {
        let mut out = format!("requests received ({}):\n", self.transport);
        let origin = self.agent.as_ref().map(Agent::started);
        for r in self.rx.requests() {
            let offset = origin
                .map(|o| {
                    format!(
                        "{:>9.1} ms",
                        r.at.saturating_duration_since(o).as_secs_f64() * 1000.0
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  #{:<3} {offset} {} series of {METRIC}, metrics {:?}",
                r.seq,
                r.series(METRIC).len(),
                r.metric_names()
            );
        }
        out
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<52} {:<14} {:>10}  note",
            "transition", "protocol", "latency"
        );
        for row in &self.rows {
            let latency = row
                .latency
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".to_string());
            let _ = writeln!(
                out,
                "  {:<52} {:<14} {:>10}  {}",
                row.transition, self.transport, latency, row.note
            );
        }
        out
    }
}

impl Drop for Harness {
    /// Print the table even when the scenario failed half-way.
    fn drop(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let table = self.table();
        eprintln!("\ne2e latencies ({}):\n{table}", self.transport);
        if std::env::var("VHA_E2E_VERBOSE").is_ok_and(|v| v == "1") {
            eprintln!("{}", self.request_log());
        }
        if let Ok(path) = std::env::var("VHA_E2E_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(table.as_bytes());
            }
        }
    }
}

/// The series of `dom`: matched on name and namespace (absent for a plain domain).
fn series_of<'a>(series: &'a [Series], dom: &TestDomain) -> Option<&'a Series> {
    series.iter().find(|s| {
        s.attr("name") == Some(dom.exported_name())
            && s.attr("namespace") == dom.exported_namespace()
    })
}

fn present(series: &[Series], dom: &TestDomain) -> bool {
    series_of(series, dom).is_some()
}

/// Assert every attribute of `dom`'s series in `obs`.
fn check_series(transport: Transport, obs: &Observation, dom: &TestDomain) {
    let s = series_of(&obs.series, dom).unwrap_or_else(|| {
        panic!(
            "[{transport}] no series for {} in:\n{}",
            dom.name(),
            describe(&obs.series)
        )
    });
    let mut expected = vec![
        ("name", dom.exported_name()),
        ("node", NODE),
        ("hypervisor_type", dom.virt().hypervisor_type()),
    ];
    if let Some(ns) = dom.exported_namespace() {
        expected.push(("namespace", ns));
    }
    let expected: std::collections::BTreeMap<String, String> = expected
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        s.attributes,
        expected,
        "[{transport}] attributes of {} (default config: no optional attributes)",
        dom.name()
    );
    assert_eq!(
        s.value.as_f64(),
        1.0,
        "[{transport}] value of {}",
        dom.name()
    );
}

fn check_resource(transport: Transport, obs: &Observation) {
    for resource in obs.request.resources() {
        assert_eq!(
            resource.get("service.name").map(String::as_str),
            Some("virt-hypervisor-agent"),
            "[{transport}] resource service.name in {resource:?}"
        );
        assert!(
            resource.get("host.name").is_some_and(|h| !h.is_empty()),
            "[{transport}] resource host.name missing in {resource:?}"
        );
    }
}

/// Run a libvirt action and return the instant it returned.
fn at(action: anyhow::Result<()>, what: &str) -> Instant {
    if let Err(e) = action {
        panic!("{what}: {e:#}");
    }
    Instant::now()
}

/// One scenario at a time: every agent sees every domain on the daemon, so a parallel scenario's
/// transitions would trigger pushes here too and blur the measured latencies.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scenario(transport: Transport) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = Harness::new(transport);

    // A domain already running before the agent starts: the initial sync must export it.
    let pre = TestDomain::define("pre", Virt::Qemu).expect("define pre");
    pre.start().expect("start pre");
    let spawned = h.spawn_agent();
    let obs = h.expect(
        "initial sync: running before start (from spawn)",
        spawned,
        |s| present(s, &pre),
    );
    check_series(transport, &obs, &pre);
    let first =
        h.rx.requests()
            .into_iter()
            .find(|r| r.has_metric(METRIC))
            .expect("a request with the metric");
    assert!(
        present(&first.series(METRIC), &pre),
        "[{transport}] the first export of {METRIC} (request #{}) lacks the domain that was \
         running before the agent started:\n{}",
        first.seq,
        describe(&first.series(METRIC))
    );

    // A TCG domain starts.
    let tcg = TestDomain::define("tcg", Virt::Qemu).expect("define tcg");
    let since = at(tcg.start(), "start tcg");
    let obs = h.expect("start type='qemu' -> qemu-tcg", since, |s| present(s, &tcg));
    check_series(transport, &obs, &tcg);

    // A KVM domain starts, where KVM works.
    let kvm = match kvm_available() {
        Ok(()) => {
            let kvm = TestDomain::define("kvm", Virt::Kvm).expect("define kvm");
            let since = at(kvm.start(), "start kvm");
            let obs = h.expect("start type='kvm' -> kvm", since, |s| present(s, &kvm));
            check_series(transport, &obs, &kvm);
            // The agent's own KVM check agrees with what just happened: a KVM guest runs here.
            let cap = obs
                .request
                .series("virt_hypervisor_agent_node_kvm_available");
            assert_eq!(
                cap.iter().map(|s| s.value.as_f64()).collect::<Vec<_>>(),
                [1.0],
                "[{transport}] a KVM guest runs on this node; the agent's KVM capability says:\n{}",
                describe(&cap)
            );
            Some(kvm)
        }
        Err(reason) => {
            h.skip("start type='kvm' -> kvm", &reason);
            None
        }
    };

    // Suspend: nothing changes for the exporter; the paused domain stays exported.
    let since = at(tcg.suspend(), "suspend tcg");
    assert_eq!(tcg.state().expect("domstate"), "paused");
    h.optional_push("suspend (no change expected)", since, |s| present(s, &tcg));

    // A KubeVirt VMI starts; the push must still show the paused domain.
    let kv = TestDomain::define_kubevirt("kv", Virt::Qemu).expect("define kubevirt domain");
    let since = at(kv.start(), "start kubevirt domain");
    let obs = h.expect("start KubeVirt <ns>_<vmi> -> namespace, name", since, |s| {
        present(s, &kv)
    });
    check_series(transport, &obs, &kv);
    check_series(transport, &obs, &tcg);

    // Resume: the agent re-reads the XML; the series stays the same.
    let since = at(tcg.resume(), "resume tcg");
    h.optional_push("resume (re-read, same series)", since, |s| present(s, &tcg));

    // Destroy: the series is gone at the next push; the others stay.
    let since = at(pre.destroy(), "destroy pre");
    let obs = h.expect("destroy -> series gone", since, |s| !present(s, &pre));
    check_series(transport, &obs, &tcg);
    check_series(transport, &obs, &kv);
    // It is gone because the request ends it: a staleness marker (NO_RECORDED_VALUE, no value)
    // for exactly its attribute set, on both transports.
    let markers = obs.request.stale_series(METRIC);
    assert!(
        present(&markers, &pre),
        "[{transport}] no staleness marker for the destroyed domain; markers:\n{}",
        describe(&markers)
    );

    let since = at(kv.destroy(), "destroy kubevirt domain");
    h.expect("destroy KubeVirt domain -> series gone", since, |s| {
        !present(s, &kv)
    });
    if let Some(kvm) = &kvm {
        let since = at(kvm.destroy(), "destroy kvm");
        h.expect("destroy type='kvm' -> series gone", since, |s| {
            !present(s, kvm)
        });
    }
    let since = at(tcg.destroy(), "destroy tcg");
    let obs = h.expect("destroy last own domain -> none of ours left", since, |s| {
        !present(s, &tcg) && !present(s, &kv) && !present(s, &pre)
    });
    assert!(
        obs.request
            .metric_names()
            .iter()
            .any(|n| n.starts_with("virt_hypervisor_agent_")),
        "[{transport}] self-metrics are exported: {:?}",
        obs.request.metric_names()
    );

    // SIGTERM: a final export, then exit 0 within a few seconds.
    let since = Instant::now();
    let status = h
        .agent()
        .terminate(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("[{transport}] shutdown: {e:#}"));
    let stopped_in = since.elapsed();
    assert!(
        status.success(),
        "[{transport}] exit status after SIGTERM: {status}\n{}",
        h.agent().log_tail(40)
    );
    let final_export = h.rx.requests_since(since).into_iter().next();
    h.rows.push(Row {
        transition: "SIGTERM -> exit 0 (exit time)".to_string(),
        latency: Some(stopped_in),
        note: match &final_export {
            Some(r) => format!("final export #{} after SIGTERM", r.seq),
            None => "NO final export".to_string(),
        },
    });
    assert!(
        final_export.is_some(),
        "[{transport}] no export between SIGTERM and exit (the last export must be flushed)"
    );
}

#[test]
fn e2e_grpc() {
    if !require_libvirtd("e2e_grpc") {
        return;
    }
    scenario(Transport::Grpc);
}

#[test]
fn e2e_http_protobuf() {
    if !require_libvirtd("e2e_http_protobuf") {
        return;
    }
    scenario(Transport::Http);
}
