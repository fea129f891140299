//! End to end, KubeVirt mode: a simulated KubeVirt node built from real daemons, watched by the agent
//! binary through socket discovery, asserted through the in-process OTLP receiver.
//!
//! Each simulated virt-launcher pod runs its own non-root libvirt session daemon and one real TCG QEMU
//! domain `<namespace>_<vmi>` with KubeVirt metadata; its socket is a symlink at
//! `<kubelet_root>/pods/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock`
//! (`common::session`). The agent runs with `libvirt.uris: []`, discovery on that fake kubelet root,
//! a 10 min rescan interval (so inotify is what finds new and deleted pods), keepalive 1 s × 2 and a
//! 30 s export interval (so only push on change explains a change seen within seconds).
//!
//! `kubevirt_node_pod_lifecycle`: (a) five pods running before the agent starts are all exported with
//! namespace/name/node/hypervisor_type; (b) a new pod's VMI appears; (c) a deleted pod's series goes
//! and the agent's fd count returns to its baseline; (d) a daemon killed and restarted is reconnected,
//! its VMI kept meanwhile, no duplicate; (e) a SIGSTOPped daemon does not delay another pod's domain
//! start (≤ 1 s, the requirement), is marked down by keepalive, and recovers after SIGCONT.
//! `kubevirt_live_migration_between_two_nodes`: (f) two nodes (two kubelet roots, two agents with their
//! own `NODE_NAME`, one receiver), a VMI live-migrated from node-a to node-b and back.
//!
//! "Current series" are per agent: the metric's points in the latest request carrying metrics whose
//! resource has that agent's `k8s.node.name`. A change is looked for from the moment its action
//! began (a domain can be listed, and pushed, while `virsh start` still runs); its latency counts
//! from the action's return (negative: seen before). Latencies are printed as a table and appended
//! to `$VHA_E2E_REPORT` when set. The migration agents log lifecycle events at debug, so that the
//! test can check the event sequence on both nodes; `VHA_AGENT_RUST_LOG` raises the agents' level.
//!
//! Gating: needs root, libvirtd, virsh, QEMU and runuser; without them the tests skip with a printed
//! reason, or fail when `VHA_E2E_REQUIRED=1` (`scripts/test.sh`, CI). The two tests run one after the
//! other (2 cores: parallel daemons would blur the latencies).

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::receiver::{describe, Receiver, Recorded, Series};
use common::session::{
    fd_count, free_port, require_session_daemons, settled_fds, start_all, Pod, SessionDaemon, Vmi,
    Workspace,
};
use common::{signed_ms, wait_until, Agent, METRIC, RECONNECTS, UP};

/// Bound for any expected change to show up (a reconnect included).
const TIMEOUT: Duration = Duration::from_secs(20);
/// A change must arrive well before the 30 s export interval: that proves push on change.
const PUSH_BOUND: Duration = Duration::from_secs(5);
/// The issue: with one daemon SIGSTOPped, a domain started in another pod reaches the receiver
/// within 1 s.
const HUNG_BOUND: Duration = Duration::from_secs(1);
/// keepalive 1 s × 2 unanswered probes: the agent gives up after about 3 s; allow for scheduling.
const KEEPALIVE_BOUND: Duration = Duration::from_secs(8);
/// Open descriptors the agent may have above its baseline once a pod is gone (gRPC channel
/// churn, a blocking thread's transient fd).
const FD_TOLERANCE: usize = 2;
/// Log lines of the agent's connection supervisor.
const LOG_LOST: &str = "libvirt connection lost";
const LOG_BACK: &str = "libvirt connection re-established";

/// One test at a time (see the module note).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Latency table

struct Row {
    what: String,
    ms: Option<f64>,
    note: String,
}

/// Printed on drop (also when the test fails half-way), appended to `$VHA_E2E_REPORT`.
struct Table {
    title: &'static str,
    rows: Vec<Row>,
}

impl Table {
    fn new(title: &'static str) -> Table {
        Table {
            title,
            rows: Vec::new(),
        }
    }

    fn add(&mut self, what: &str, latency: Option<Duration>, note: impl Into<String>) {
        self.rows.push(Row {
            what: what.to_string(),
            ms: latency.map(|d| d.as_secs_f64() * 1000.0),
            note: note.into(),
        });
    }

    /// A latency that may be negative (a change seen before the action that caused it returned).
    fn add_signed(&mut self, what: &str, ms: f64, note: impl Into<String>) {
        self.rows.push(Row {
            what: what.to_string(),
            ms: Some(ms),
            note: note.into(),
        });
    }

    fn render(&self) -> String {
        let mut out = format!("{}:\n", self.title);
        let _ = writeln!(out, "  {:<72} {:>10}  note", "transition", "latency");
        for r in &self.rows {
            let ms =
                r.ms.map(|v| format!("{v:.1} ms"))
                    .unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "  {:<72} {:>10}  {}", r.what, ms, r.note);
        }
        out
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let text = self.render();
        eprintln!("\n{text}");
        if let Ok(path) = std::env::var("VHA_E2E_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(text.as_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What one agent exported

/// The latest request of `node` that carries metrics (its current state).
fn latest(rx: &Receiver, node: &str) -> Option<Recorded> {
    rx.requests()
        .into_iter()
        .rev()
        .find(|r| r.has_metrics_from(node))
}

/// `(namespace, name)` of every series (namespace `""` when absent).
fn keys(series: &[Series]) -> Vec<(String, String)> {
    series
        .iter()
        .map(|s| {
            (
                s.attr("namespace").unwrap_or("").to_string(),
                s.attr("name").unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The request's series of the metric are exactly `expected` (as a set).
fn shows_exactly(r: &Recorded, expected: &BTreeSet<Vmi>) -> bool {
    let got: BTreeSet<(String, String)> = keys(&r.series(METRIC)).into_iter().collect();
    got == expected.iter().map(Vmi::key).collect()
}

fn shows(r: &Recorded, vmi: &Vmi) -> bool {
    keys(&r.series(METRIC)).contains(&vmi.key())
}

/// Every series of `r` has exactly the attributes of the README's "Metric reference" (with
/// `pod_uid`, on by default for discovered connections: a kubelet pod UID, one per pod; here each
/// pod's VMIs are in a namespace of their own, `kv-<pod>`), value 1, and none is duplicated; the
/// set equals `expected`.
fn check_exact(r: &Recorded, node: &str, expected: &BTreeSet<Vmi>) -> Result<(), String> {
    let series = r.series(METRIC);
    let ks = keys(&series);
    let unique: BTreeSet<_> = ks.iter().cloned().collect();
    if unique.len() != ks.len() {
        return Err(format!(
            "duplicate series in request #{}:\n{}",
            r.seq,
            describe(&series)
        ));
    }
    if !shows_exactly(r, expected) {
        return Err(format!(
            "request #{} shows\n{}\nexpected {:?}",
            r.seq,
            describe(&series),
            expected.iter().map(Vmi::domain_name).collect::<Vec<_>>()
        ));
    }
    let by_namespace: BTreeSet<(&str, &str)> = series
        .iter()
        .map(|s| {
            (
                s.attr("namespace").unwrap_or(""),
                s.attr("pod_uid").unwrap_or(""),
            )
        })
        .collect();
    let namespaces: BTreeSet<&str> = by_namespace.iter().map(|(ns, _)| *ns).collect();
    let uids: BTreeSet<&str> = by_namespace.iter().map(|(_, uid)| *uid).collect();
    if by_namespace.len() != namespaces.len()
        || uids.len() != namespaces.len()
        || uids.iter().any(|u| u.len() != 36)
    {
        return Err(format!(
            "request #{}: every pod's series need one 36-character pod_uid of their own:\n{}",
            r.seq,
            describe(&series)
        ));
    }
    for s in &series {
        let want: std::collections::BTreeMap<String, String> = [
            ("namespace", s.attr("namespace").unwrap_or("(absent)")),
            ("name", s.attr("name").unwrap_or("")),
            ("node", node),
            ("hypervisor_type", "qemu-tcg"),
            ("pod_uid", s.attr("pod_uid").unwrap_or("")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if s.attributes != want || s.value.as_f64() != 1.0 {
            return Err(format!(
                "request #{}: series {s} should have exactly {want:?} and value 1",
                r.seq
            ));
        }
    }
    Ok(())
}

/// The value of a per-connection self-metric for the connection labelled `label`.
fn conn_value(r: &Recorded, metric: &str, label: &str) -> Option<f64> {
    r.series(metric)
        .iter()
        .find(|s| s.attr("connection") == Some(label))
        .map(|s| s.value.as_f64())
}

fn log_count(agent: &Agent, needle: &str) -> usize {
    agent.log().matches(needle).count()
}

fn set(vmis: &[&Vmi]) -> BTreeSet<Vmi> {
    vmis.iter().map(|v| (*v).clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// Agents

/// Write the agent's config for one node and spawn it with `NODE_NAME=node`.
fn spawn_agent(ws: &Workspace, node: &str, kubelet_root: &Path, rx: &Receiver) -> Agent {
    let config = ws.path().join(format!("agent-{node}.yaml"));
    let yaml = format!(
        "libvirt:\n  uris: []\n  keepalive_interval: 1s\n  keepalive_count: 2\n  fetch_timeout: 3s\n  \
         reconnect:\n    initial_backoff: 200ms\n    max_backoff: 1s\n{discover}    rescan_interval: 10m\nexport:\n  exporter: otlp\n  protocol: grpc\n  \
         endpoint: {endpoint}\n  interval: 30s\n  debounce: 250ms\n",
        discover = common::session::discover_yaml(kubelet_root),
        endpoint = rx.grpc_endpoint(),
    );
    std::fs::write(&config, yaml).expect("write the agent config");
    let config = config.to_string_lossy().into_owned();
    // `VHA_AGENT_RUST_LOG` (e.g. `debug`) raises the agent's log level for a failing run. The
    // connection supervisor logs each lifecycle event at debug: the migration test reads them.
    let log = format!(
        "{},virt_hypervisor_agent::agent::connection=debug",
        std::env::var("VHA_AGENT_RUST_LOG").unwrap_or_else(|_| "info".to_string())
    );
    Agent::spawn(
        &["run", "--config", &config],
        &[("NODE_NAME", node), ("RUST_LOG", &log)],
    )
    .expect("spawn the agent")
}

/// When an action began and when it returned. The change it causes is looked for from `began`: it
/// may be exported before the command returns (a domain is listed, and pushed, while `virsh start`
/// is still running). Its latency counts from `returned`, negative when seen before.
#[derive(Clone, Copy, Debug)]
struct Span {
    began: Instant,
    returned: Instant,
}

impl Span {
    fn at(t: Instant) -> Span {
        Span {
            began: t,
            returned: t,
        }
    }
}

/// Run an action (panicking on failure) and time it.
fn act(what: &str, action: impl FnOnce() -> anyhow::Result<()>) -> Span {
    let began = Instant::now();
    if let Err(e) = action() {
        panic!("{what}: {e:#}");
    }
    Span {
        began,
        returned: Instant::now(),
    }
}

/// Wait for the first request of `node` since `span.began` that satisfies `pred`; fail with the
/// agent's state and the node's current series otherwise. Records the latency (from
/// `span.returned`) in `table`, and fails when it exceeds `bound`.
#[allow(clippy::too_many_arguments)]
fn expect<F>(
    rx: &Receiver,
    agents: &mut [&mut Agent],
    node: &str,
    table: &mut Table,
    what: &str,
    span: Span,
    bound: Duration,
    mut pred: F,
) -> Recorded
where
    F: FnMut(&Recorded) -> bool,
{
    let deadline = span.returned + TIMEOUT.max(bound);
    loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        match rx.wait_for_request(span.began, slice, |r| r.has_metrics_from(node) && pred(r)) {
            Ok(obs) => {
                let r = obs.request;
                let ms = signed_ms(r.at, span.returned);
                table.add_signed(what, ms, format!("request #{}", r.seq));
                assert!(
                    ms <= bound.as_secs_f64() * 1000.0,
                    "{what}: seen {ms:.0} ms after the action returned, beyond the {bound:?} bound"
                );
                return r;
            }
            Err(e) => {
                for a in agents.iter_mut() {
                    if let Err(dead) = a.check_running() {
                        panic!("{what}: {dead:#}");
                    }
                }
                if Instant::now() >= deadline {
                    let current = latest(rx, node)
                        .map(|r| format!("#{}:\n{}", r.seq, describe(&r.series(METRIC))))
                        .unwrap_or_else(|| "(nothing from this node yet)".into());
                    panic!(
                        "{what}: not seen from {node} within {:?}: {e:#}\ncurrent series of {node}: {current}",
                        TIMEOUT.max(bound)
                    );
                }
            }
        }
    }
}

/// Start pods `tags` in parallel, each with one running VMI `kv-<tag>/vmi-<tag>`, and publish their
/// sockets under `kubelet_root`.
fn start_pods(ws: &Workspace, kubelet_root: &Path, tags: &[&str]) -> Vec<(Pod, Vmi)> {
    start_all(tags.len(), tags.len(), |i| {
        let tag = tags[i];
        let pod = Pod::start(ws, kubelet_root, tag)?;
        let vmi = Vmi::new(&format!("kv-{tag}"), &format!("vmi-{tag}"));
        pod.daemon.define(&vmi)?;
        pod.daemon.start_domain(&vmi)?;
        pod.publish()?;
        Ok((pod, vmi))
    })
}

/// `virsh list` of every daemon: the VMIs that really run.
fn truth(pods: &[(&SessionDaemon, &Vmi)]) -> BTreeSet<Vmi> {
    let mut out = BTreeSet::new();
    for (daemon, vmi) in pods {
        let active = daemon
            .active_domains()
            .unwrap_or_else(|e| panic!("virsh list: {e:#}"));
        if active.contains(&vmi.domain_name()) {
            out.insert((*vmi).clone());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// (a)–(e): one node, many pods

const NODE: &str = "kv-node";

#[test]
fn kubevirt_node_pod_lifecycle() {
    if !require_session_daemons("kubevirt_node_pod_lifecycle") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test_started = Instant::now();
    let ws = Workspace::new().expect("workspace");
    let root = ws.kubelet_root(NODE).expect("kubelet root");
    let rx = Receiver::start().expect("start the OTLP receiver");
    let mut table = Table::new("e2e KubeVirt node (session daemons, grpc)");

    // (a) Five pods, each running one VMI, before the agent starts.
    let t = Instant::now();
    let mut pods = start_pods(&ws, &root, &["p0", "p1", "p2", "p3", "p4"]);
    table.add(
        "setup: 5 pods started (daemon + define + start), in parallel",
        Some(t.elapsed()),
        "not the agent",
    );
    let vmis: Vec<Vmi> = pods.iter().map(|(_, v)| v.clone()).collect();
    let all = set(&vmis.iter().collect::<Vec<_>>());
    let mut agent = spawn_agent(&ws, NODE, &root, &rx);
    let spawned = agent.started();
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "a. 5 pods running before start -> all 5 VMIs (from spawn)",
        Span::at(spawned),
        TIMEOUT,
        |r| shows_exactly(r, &all),
    );
    check_exact(&r, NODE, &all).unwrap_or_else(|e| panic!("a: {e}"));
    for (pod, _) in &pods {
        assert_eq!(
            conn_value(&r, UP, &pod.connection_label()),
            Some(1.0),
            "a: connection_up of pod {} in request #{}:\n{}",
            pod.tag,
            r.seq,
            describe(&r.series(UP))
        );
    }
    let baseline_fds = settled_fds(agent.pid());

    // (b) A new pod: daemon up, socket published (inotify must find it: rescan is 10 min), then
    // its VMI starts, as virt-launcher does.
    let (pod5, vmi5) = {
        let pod = Pod::start(&ws, &root, "p5").expect("start pod p5");
        let vmi = Vmi::new("kv-p5", "vmi-p5");
        pod.daemon.define(&vmi).expect("define vmi-p5");
        (pod, vmi)
    };
    let mut pod5 = pod5;
    let published = pod5.publish().expect("publish p5");
    let started = act("start vmi-p5", || pod5.daemon.start_domain(&vmi5));
    let mut with5 = all.clone();
    with5.insert(vmi5.clone());
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "b. new pod: VMI started -> exported (from domain start returned)",
        Span {
            began: published,
            returned: started.returned,
        },
        PUSH_BOUND,
        |r| shows_exactly(r, &with5),
    );
    table.add(
        "b. new pod: same, from socket published",
        Some(r.at.saturating_duration_since(published)),
        format!(
            "domain start took {:.0} ms",
            (started.returned - published).as_secs_f64() * 1000.0
        ),
    );
    check_exact(&r, NODE, &with5).unwrap_or_else(|e| panic!("b: {e}"));
    let with_pod_fds = settled_fds(agent.pid());

    // (c) Delete that pod: its processes die, then its kubelet dir goes. The series must go
    // with the socket (the domain was still running when the daemon stopped: no STOPPED event).
    let stopping = Instant::now();
    let removed = pod5.delete().expect("delete pod p5");
    let kept_while_down: Vec<usize> = rx
        .requests_since(stopping)
        .iter()
        .filter(|r| r.has_metrics_from(NODE) && r.at < removed && !shows(r, &vmi5))
        .map(|r| r.seq)
        .collect();
    assert!(
        kept_while_down.is_empty(),
        "c: requests {kept_while_down:?} dropped vmi-p5 while its daemon was down but its socket \
         was still listed (domains must stay exported until the socket goes)"
    );
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "c. pod deleted (kubelet dir removed) -> its series gone",
        Span::at(removed),
        PUSH_BOUND,
        |r| shows_exactly(r, &all),
    );
    check_exact(&r, NODE, &all).unwrap_or_else(|e| panic!("c: {e}"));
    assert_eq!(
        conn_value(&r, UP, &pod5.connection_label()),
        None,
        "c: the deleted pod's connection is still reported"
    );
    let pid = agent.pid();
    let waiting = Instant::now();
    let back = wait_until(Duration::from_secs(10), || {
        fd_count(pid).is_ok_and(|n| n <= baseline_fds + FD_TOLERANCE)
    });
    let after_fds = fd_count(pid).unwrap_or(0);
    table.add(
        "c. agent fds back to baseline (from dir removed)",
        back.as_ref().ok().map(|d| (waiting - removed) + *d),
        format!("fds: baseline {baseline_fds}, with pod {with_pod_fds}, after {after_fds}"),
    );
    assert!(
        back.is_ok(),
        "c: the agent holds {after_fds} fds after the pod was deleted, baseline {baseline_fds} \
         (+{FD_TOLERANCE} allowed): its connection was not closed"
    );
    drop(pod5);

    // (d) Restart p0's daemon: SIGKILL (its QEMU survives), start again with the same dirs.
    let label0 = pods[0].0.connection_label();
    let reconnects_before = latest(&rx, NODE)
        .and_then(|r| conn_value(&r, RECONNECTS, &label0))
        .unwrap_or(0.0);
    let back_before = log_count(&agent, LOG_BACK);
    let killed = act("kill p0's libvirtd", || pods[0].0.daemon.kill()).returned;
    pods[0].0.daemon.restart().expect("restart p0's libvirtd");
    let restarted = Instant::now();
    let pairs: Vec<(&SessionDaemon, &Vmi)> = pods.iter().map(|(p, v)| (&p.daemon, v)).collect();
    let now_true = truth(&pairs);
    let reattached = now_true.contains(&vmis[0]);
    table.add(
        "d. p0 daemon SIGKILLed and started again (restart time)",
        Some(restarted - killed),
        if reattached {
            "virsh list: vmi-p0 still running (re-attached)"
        } else {
            "virsh list: vmi-p0 NOT re-attached"
        },
    );
    let reconnected = wait_until(TIMEOUT, || log_count(&agent, LOG_BACK) > back_before);
    table.add(
        "d. agent reconnected to p0 (from daemon answering again; agent log)",
        reconnected.as_ref().ok().copied(),
        "",
    );
    reconnected.unwrap_or_else(|e| panic!("d: the agent did not reconnect to p0: {e:#}"));
    // Whatever ran through the restart stayed exported: no request lost vmi-p0 (if it survived).
    if reattached {
        let lost: Vec<usize> = rx
            .requests_since(killed)
            .iter()
            .filter(|r| r.has_metrics_from(NODE) && !shows(r, &vmis[0]))
            .map(|r| r.seq)
            .collect();
        assert!(
            lost.is_empty(),
            "d: requests {lost:?} lost vmi-p0 during the restart"
        );
    }
    // Events flow on the new connection: stop p0's VMI, then start it again.
    let without0: BTreeSet<Vmi> = now_true
        .iter()
        .filter(|v| **v != vmis[0])
        .cloned()
        .collect();
    if reattached {
        let since = act("destroy vmi-p0", || {
            pods[0].0.daemon.destroy_domain(&vmis[0])
        });
        let r = expect(
            &rx,
            &mut [&mut agent],
            NODE,
            &mut table,
            "d. after reconnect: p0's VMI destroyed -> gone",
            since,
            PUSH_BOUND,
            |r| shows_exactly(r, &without0),
        );
        check_exact(&r, NODE, &without0).unwrap_or_else(|e| panic!("d: {e}"));
    }
    let since = act("start vmi-p0", || pods[0].0.daemon.start_domain(&vmis[0]));
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "d. after reconnect: p0's VMI started -> back, exactly once",
        since,
        PUSH_BOUND,
        |r| shows_exactly(r, &all),
    );
    check_exact(&r, NODE, &all).unwrap_or_else(|e| panic!("d: {e}"));
    let reconnects_after = conn_value(&r, RECONNECTS, &label0).unwrap_or(0.0);
    assert!(
        reconnects_after > reconnects_before,
        "d: {RECONNECTS}{{connection={label0}}} went from {reconnects_before} to {reconnects_after}"
    );
    assert_eq!(
        conn_value(&r, UP, &label0),
        Some(1.0),
        "d: p0's connection is up again"
    );
    table.add(
        "d. reconnects counter of p0",
        None,
        format!("{reconnects_before} -> {reconnects_after}"),
    );

    // (e) SIGSTOP p1's daemon; a domain started in p2 right away must not wait for it.
    let probe = Vmi::new("kv-p2", "vmi-probe");
    pods[2].0.daemon.define(&probe).expect("define the probe");
    let label1 = pods[1].0.connection_label();
    let lost_before = log_count(&agent, LOG_LOST);
    let back_before = log_count(&agent, LOG_BACK);
    let frozen = act("SIGSTOP p1's libvirtd", || pods[1].0.daemon.freeze()).returned;
    let since = act("start the probe", || pods[2].0.daemon.start_domain(&probe));
    let mut with_probe = all.clone();
    with_probe.insert(probe.clone());
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "e. p1 SIGSTOPped: VMI started in p2 -> exported (<= 1 s required)",
        since,
        HUNG_BOUND,
        |r| shows_exactly(r, &with_probe),
    );
    check_exact(&r, NODE, &with_probe).unwrap_or_else(|e| panic!("e: {e}"));
    let detected = wait_until(TIMEOUT, || log_count(&agent, LOG_LOST) > lost_before);
    table.add(
        "e. keepalive marks p1 down (from SIGSTOP; agent log)",
        detected.as_ref().ok().map(|_| frozen.elapsed()),
        "keepalive 1s x 2",
    );
    let detected_in = frozen.elapsed();
    detected.unwrap_or_else(|e| panic!("e: keepalive never closed p1's connection: {e:#}"));
    assert!(
        detected_in <= KEEPALIVE_BOUND,
        "e: p1 marked down only after {detected_in:?}"
    );
    let since = act("destroy the probe", || {
        pods[2].0.daemon.destroy_domain(&probe)
    });
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "e. p1 still hung: probe destroyed -> gone; p1 up=0, its VMI kept",
        since,
        PUSH_BOUND,
        |r| shows_exactly(r, &all),
    );
    check_exact(&r, NODE, &all).unwrap_or_else(|e| panic!("e: {e}"));
    assert_eq!(
        conn_value(&r, UP, &label1),
        Some(0.0),
        "e: connection_up of the hung p1 in request #{}:\n{}",
        r.seq,
        describe(&r.series(UP))
    );
    let thawed = act("SIGCONT p1's libvirtd", || pods[1].0.daemon.thaw()).returned;
    let recovered = wait_until(TIMEOUT, || log_count(&agent, LOG_BACK) > back_before);
    table.add(
        "e. SIGCONT -> agent reconnected to p1 (agent log)",
        recovered.as_ref().ok().copied(),
        format!("hung for {:.1} s", (thawed - frozen).as_secs_f64()),
    );
    recovered.unwrap_or_else(|e| panic!("e: the agent did not reconnect to p1: {e:#}"));
    let without1: BTreeSet<Vmi> = all.iter().filter(|v| **v != vmis[1]).cloned().collect();
    let since = act("destroy vmi-p1", || {
        pods[1].0.daemon.destroy_domain(&vmis[1])
    });
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "e. p1 recovered: its VMI destroyed -> gone (events flow again)",
        since,
        PUSH_BOUND,
        |r| shows_exactly(r, &without1),
    );
    check_exact(&r, NODE, &without1).unwrap_or_else(|e| panic!("e: {e}"));
    assert_eq!(conn_value(&r, UP, &label1), Some(1.0), "e: p1 up again");
    let since = act("start vmi-p1", || pods[1].0.daemon.start_domain(&vmis[1]));
    let r = expect(
        &rx,
        &mut [&mut agent],
        NODE,
        &mut table,
        "e. p1 recovered: its VMI started -> back",
        since,
        PUSH_BOUND,
        |r| shows_exactly(r, &all),
    );
    check_exact(&r, NODE, &all).unwrap_or_else(|e| panic!("e: {e}"));

    let pairs: Vec<(&SessionDaemon, &Vmi)> = pods.iter().map(|(p, v)| (&p.daemon, v)).collect();
    assert_eq!(truth(&pairs), all, "every VMI runs at the end");
    let status = agent
        .terminate(Duration::from_secs(5))
        .expect("stop the agent");
    assert!(status.success(), "agent exit status {status}");
    table.add(
        "total: scenario a-e including setup",
        Some(test_started.elapsed()),
        "",
    );
}

// ---------------------------------------------------------------------------------------------
// (f): live migration between two simulated nodes

/// Replay the requests of both nodes since `since` in arrival order: the first instant both nodes'
/// current series showed `vmi`, and how long that lasted.
fn both_nodes_window(
    rx: &Receiver,
    since: Instant,
    a: &str,
    b: &str,
    vmi: &Vmi,
) -> Option<(Instant, Duration)> {
    let mut on_a = latest_before(rx, a, since).is_some_and(|r| shows(&r, vmi));
    let mut on_b = latest_before(rx, b, since).is_some_and(|r| shows(&r, vmi));
    let mut opened: Option<Instant> = None;
    for r in rx.requests_since(since) {
        match r.node() {
            Some(n) if n == a && r.has_metrics() => on_a = shows(&r, vmi),
            Some(n) if n == b && r.has_metrics() => on_b = shows(&r, vmi),
            _ => continue,
        }
        match (on_a && on_b, opened) {
            (true, None) => opened = Some(r.at),
            (false, Some(start)) => return Some((start, r.at - start)),
            _ => {}
        }
    }
    opened.map(|start| (start, start.elapsed()))
}

/// `event/detail` of every lifecycle event the agent logged (at debug) for domain `name`, in its
/// log from byte offset `from`.
fn logged_events(log: &str, from: usize, name: &str) -> Vec<String> {
    let domain = format!("domain={name} ");
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("lifecycle event") && l.contains(&domain))
        .filter_map(|l| {
            let event = l.split("event=\"").nth(1)?.split('"').next()?;
            let detail = l.split("detail=").nth(1)?.split_whitespace().next()?;
            Some(format!("{event}/{detail}"))
        })
        .collect()
}

fn latest_before(rx: &Receiver, node: &str, before: Instant) -> Option<Recorded> {
    rx.requests()
        .into_iter()
        .rev()
        .find(|r| r.at < before && r.has_metrics_from(node))
}

/// Migrate `vmi` from `src` (watched by agent `from`) to `dst` (agent `to`) and check the exports.
fn migrate(
    rx: &Receiver,
    (src_agent, dst_agent): (&mut Agent, &mut Agent),
    table: &mut Table,
    vmi: &Vmi,
    (src, dst): (&Pod, &Pod),
    (from, to): (&str, &str),
) {
    let src_log_from = src_agent.log().len();
    let dst_log_from = dst_agent.log().len();
    let agents: &mut [&mut Agent] = &mut [src_agent, dst_agent];
    let port = free_port().expect("a free port");
    let begun = Instant::now();
    src.daemon
        .migrate_to(vmi, &dst.daemon, port)
        .unwrap_or_else(|e| panic!("migrate {from} -> {to}: {e:#}"));
    let done = Instant::now();
    let took = done - begun;
    let only = set(&[vmi]);
    let none = BTreeSet::new();
    let on_dst = expect(
        rx,
        agents,
        to,
        table,
        &format!("f. migrate {from} -> {to}: VMI on {to} (from migrate start)"),
        Span::at(begun),
        took + PUSH_BOUND,
        |r| shows(r, vmi),
    );
    let off_src = expect(
        rx,
        agents,
        from,
        table,
        &format!("f. migrate {from} -> {to}: VMI gone from {from} (from migrate start)"),
        Span::at(begun),
        took + PUSH_BOUND,
        |r| !shows(r, vmi),
    );
    table.add(
        &format!("f. migrate {from} -> {to}: virsh migrate took"),
        Some(took),
        format!(
            "relative to its return: on {to} {:+.0} ms, off {from} {:+.0} ms",
            signed_ms(on_dst.at, done),
            signed_ms(off_src.at, done)
        ),
    );
    match both_nodes_window(rx, begun, from, to, vmi) {
        Some((start, length)) => table.add_signed(
            &format!("f. migrate {from} -> {to}: both-nodes window observed"),
            length.as_secs_f64() * 1000.0,
            format!(
                "opened {:+.0} ms after migrate start",
                signed_ms(start, begun)
            ),
        ),
        None => table.add(
            &format!("f. migrate {from} -> {to}: both-nodes window"),
            None,
            "not observed (the source dropped it before the destination pushed)",
        ),
    }
    // After: only on the destination, from each agent's latest request.
    let dst_now = latest(rx, to).expect("a request from the destination");
    check_exact(&dst_now, to, &only).unwrap_or_else(|e| panic!("f: after migration, {to}: {e}"));
    let src_now = latest(rx, from).expect("a request from the source");
    // The destination read the domain on STARTED/MIGRATED (detail 1) and RESUMED/MIGRATED (1); the
    // source dropped it on STOPPED/MIGRATED (3). Events arrive right after the migration ends.
    let name = vmi.domain_name();
    let (mut src_events, mut dst_events) = (Vec::new(), Vec::new());
    let seen = wait_until(Duration::from_secs(5), || {
        src_events = logged_events(&agents[0].log(), src_log_from, &name);
        dst_events = logged_events(&agents[1].log(), dst_log_from, &name);
        dst_events.iter().any(|e| e == "started/1")
            && dst_events.iter().any(|e| e == "resumed/1")
            && src_events.iter().any(|e| e == "stopped/3")
    });
    table.add(
        &format!("f. migrate {from} -> {to}: lifecycle events (event/detail)"),
        None,
        format!(
            "{to}: {}; {from}: {}",
            dst_events.join(" "),
            src_events.join(" ")
        ),
    );
    assert!(
        seen.is_ok(),
        "f: expected started/1 and resumed/1 (MIGRATED) on {to}, stopped/3 on {from}; the agents \
         logged {to}: {dst_events:?}, {from}: {src_events:?}"
    );
    check_exact(&src_now, from, &none)
        .unwrap_or_else(|e| panic!("f: after migration, {from}: {e}"));
    let on_dst = dst.daemon.active_domains().expect("virsh list on dst");
    let on_src = src.daemon.active_domains().expect("virsh list on src");
    assert!(
        on_dst.contains(&vmi.domain_name()) && !on_src.contains(&vmi.domain_name()),
        "f: virsh disagrees: {to} runs {on_dst:?}, {from} runs {on_src:?}"
    );
}

#[test]
fn kubevirt_live_migration_between_two_nodes() {
    if !require_session_daemons("kubevirt_live_migration_between_two_nodes") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ws = Workspace::new().expect("workspace");
    let root_a = ws.kubelet_root("node-a").expect("kubelet root a");
    let root_b = ws.kubelet_root("node-b").expect("kubelet root b");
    let rx = Receiver::start().expect("start the OTLP receiver");
    let mut table = Table::new("e2e KubeVirt live migration (two nodes, one receiver, grpc)");

    let (pod_a, pod_b) = std::thread::scope(|s| {
        let a = s.spawn(|| Pod::start(&ws, &root_a, "ma"));
        let b = s.spawn(|| Pod::start(&ws, &root_b, "mb"));
        (
            a.join().expect("pod a thread"),
            b.join().expect("pod b thread"),
        )
    });
    let (pod_a, pod_b) = (pod_a.expect("start pod a"), pod_b.expect("start pod b"));
    assert_ne!(pod_a.daemon.host_uuid(), pod_b.daemon.host_uuid());
    let vmi = Vmi::new("kv-mig", "vmi-mig");
    pod_a.daemon.define(&vmi).expect("define on a");
    pod_a.daemon.start_domain(&vmi).expect("start on a");
    pod_a.publish().expect("publish a");
    pod_b.publish().expect("publish b");

    let mut agent_a = spawn_agent(&ws, "node-a", &root_a, &rx);
    let mut agent_b = spawn_agent(&ws, "node-b", &root_b, &rx);
    let only = set(&[&vmi]);
    let none = BTreeSet::new();
    let since = agent_a.started();
    let r = expect(
        &rx,
        &mut [&mut agent_a, &mut agent_b],
        "node-a",
        &mut table,
        "f. before: VMI on node-a (from spawn)",
        Span::at(since),
        TIMEOUT,
        |r| shows_exactly(r, &only),
    );
    check_exact(&r, "node-a", &only).unwrap_or_else(|e| panic!("f: before, node-a: {e}"));
    // node-b's agent must be connected to its (empty) pod before the migration starts, so that the
    // latency measured is the event's, not a late initial sync's. Connecting an empty pod pushes
    // nothing, so its log says when.
    wait_until(TIMEOUT, || {
        agent_b.log().contains("libvirt connection established")
    })
    .unwrap_or_else(|e| panic!("f: node-b's agent never connected to its pod: {e:#}"));
    let started_b = agent_b.started();
    expect(
        &rx,
        &mut [&mut agent_a, &mut agent_b],
        "node-b",
        &mut table,
        "f. before: nothing on node-b (from spawn)",
        Span::at(started_b),
        TIMEOUT,
        |r| shows_exactly(r, &none),
    );
    let latest_b = latest(&rx, "node-b").expect("a request from node-b");
    check_exact(&latest_b, "node-b", &none).unwrap_or_else(|e| panic!("f: before, node-b: {e}"));

    migrate(
        &rx,
        (&mut agent_a, &mut agent_b),
        &mut table,
        &vmi,
        (&pod_a, &pod_b),
        ("node-a", "node-b"),
    );
    migrate(
        &rx,
        (&mut agent_b, &mut agent_a),
        &mut table,
        &vmi,
        (&pod_b, &pod_a),
        ("node-b", "node-a"),
    );
    for (agent, node) in [(&mut agent_a, "node-a"), (&mut agent_b, "node-b")] {
        let status = agent
            .terminate(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("stop agent {node}: {e:#}"));
        assert!(status.success(), "agent {node} exit status {status}");
    }
}
