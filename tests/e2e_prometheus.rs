//! End to end where the user looks: PromQL instant queries at "now" against a real Prometheus, fed
//! by the agent binary watching real QEMU domains.
//!
//! Pipelines, as documented in the README ("Prometheus"):
//! - agent --OTLP gRPC--> the minimal collector (otel/builder-config.yaml) running the shipped
//!   development profile otel/collector-dev.yaml (the production pipeline in plaintext; the
//!   production profile's TLS and allowlist are tested in tests/e2e_collector_security.rs)
//!   --remote write--> Prometheus 2.42 (Debian) `--web.enable-remote-write-receiver`;
//! - agent --OTLP HTTP--> Prometheus 3 `--web.enable-otlp-receiver` (no collector).
//!
//! What is checked: the exact series and labels the README documents (metric, namespace/name/node/
//! hypervisor_type, job/instance, target_info, every self-metric under its Prometheus name); a start
//! is in an instant query and a stop is **absent** from one within debounce + batch timeout + 1 s
//! (staleness markers: not after the 5-minute lookback); a label change leaves no stale twin; the
//! agent restarted while VMs run continues the same series; a collector restart and a 2-minute
//! Prometheus outage end with PromQL equal to `virsh list`; live migration between two session
//! daemons ("nodes") shows both during and only the destination right after; a removed pod's
//! `connection_up` series ends too.
//!
//! Needs libvirtd (`scripts/libvirtd.sh start`) and builds/uses the cached collector and Prometheus 3;
//! skips with a printed reason without libvirtd unless `VHA_E2E_REQUIRED=1` (CI).
//! Latencies are printed and appended to `$VHA_E2E_REPORT`.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use common::libvirt::{require_libvirtd, virsh, TestDomain, Virt};
use common::pipeline::{describe, Collector, Flavor, Prometheus, Sample};
use common::session::{free_port, require_session_daemons, Pod, Vmi, Workspace};
use common::{wait_until, Agent};

const METRIC: &str = "kubevirt_vmi_hypervisor_info";
const JOB: &str = "virt-hypervisor-agent";
const DEBOUNCE: Duration = Duration::from_millis(250);
/// otel/collector-dev.yaml's `batch: timeout:` (checked against the file below; the production
/// profile has the same, tests/e2e_collector_security.rs).
const BATCH_TIMEOUT: Duration = Duration::from_secs(1);
/// The promise: a start or stop is visible in an instant query within debounce + batch + 1 s.
const VISIBLE_BOUND: Duration = DEBOUNCE
    .saturating_add(BATCH_TIMEOUT)
    .saturating_add(Duration::from_secs(1));
/// Without a collector there is no batch timeout.
const VISIBLE_BOUND_DIRECT: Duration = DEBOUNCE.saturating_add(Duration::from_secs(1));
/// Generous bound for anything to show up at all (first sync, recovery).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Latency rows, printed at the end and appended to $VHA_E2E_REPORT.
struct Table {
    title: String,
    rows: Vec<(String, Duration, Duration)>,
}

impl Table {
    fn new(title: &str) -> Table {
        Table {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    fn add(&mut self, what: &str, took: Duration, bound: Duration) {
        println!(
            "{what}: {:.0} ms (bound {:.0} ms)",
            took.as_secs_f64() * 1e3,
            bound.as_secs_f64() * 1e3
        );
        self.rows.push((what.into(), took, bound));
    }

    fn print(&self) {
        let mut out = format!("{}\n", self.title);
        for (what, took, bound) in &self.rows {
            out.push_str(&format!(
                "  {what:<62} {:>7.0} ms  (bound {:.0} ms)\n",
                took.as_secs_f64() * 1e3,
                bound.as_secs_f64() * 1e3
            ));
        }
        println!("{out}");
        if let Some(path) = std::env::var_os("VHA_E2E_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(out.as_bytes());
            }
        }
    }

    /// Every row within its bound (checked after printing, so that all numbers are seen).
    fn assert_bounds(&self) {
        let over: Vec<_> = self.rows.iter().filter(|(_, t, b)| t > b).collect();
        assert!(over.is_empty(), "over the bound: {over:?}");
    }
}

/// The agent against `uris`, exporting to `endpoint` with `protocol`, as node `node`.
fn spawn_agent(uris: &str, protocol: &str, endpoint: &str, node: &str) -> Agent {
    Agent::spawn(
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uris),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", protocol),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", endpoint),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "30s"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE", "250ms"),
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__KEEPALIVE_INTERVAL", "1s"),
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__KEEPALIVE_COUNT", "2"),
            ("VIRT_HYPERVISOR_AGENT_NODE_NAME", node),
            ("RUST_LOG", "info"),
        ],
    )
    .expect("spawn the agent")
}

/// A unique node name, so that other users of the shared system daemon never match a query.
fn unique_node(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        common::libvirt::unique_uid()
    )
}

fn selector(node: &str, name: &str) -> String {
    format!("{METRIC}{{node=\"{node}\",name=\"{name}\"}}")
}

/// The info series of exactly these exported names on `node`. Every agent on the shared system
/// daemon sees every domain there, other tests' too: assertions count only their own.
fn of_names(node: &str, names: &[&str]) -> String {
    format!("{METRIC}{{node=\"{node}\",name=~\"{}\"}}", names.join("|"))
}

/// The self-metrics the README documents, by their Prometheus names (its table's first column).
fn documented_self_metrics() -> Vec<String> {
    let readme = include_str!("../README.md");
    let mut out: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `virt_hypervisor_agent_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|n| format!("virt_hypervisor_agent_{n}"))
        .collect();
    out.sort();
    out.dedup();
    assert!(
        out.len() >= 6,
        "the README's self-metric table was not found: {out:?}"
    );
    out
}

/// The exact label set of the info series of `dom` on `node`.
fn expected_labels(
    dom: &TestDomain,
    node: &str,
    instance: &str,
    hv: &str,
) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = [
        ("__name__", METRIC),
        ("job", JOB),
        ("instance", instance),
        ("node", node),
        ("name", dom.exported_name()),
        ("hypervisor_type", hv),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(ns) = dom.exported_namespace() {
        m.insert("namespace".into(), ns.into());
    }
    m
}

/// Exactly one sample, with exactly `labels`.
fn assert_exact(samples: &[Sample], labels: &BTreeMap<String, String>) {
    assert_eq!(
        samples.len(),
        1,
        "expected one series, got:\n{}",
        describe(samples)
    );
    assert_eq!(&samples[0].labels, labels, "labels differ");
    assert_eq!(samples[0].value, 1.0);
}

/// Start `dom`, wait until PromQL shows it (with exactly `labels`), then destroy it and wait until
/// PromQL no longer does; record both latencies (from the virsh command's return).
fn start_stop(
    prom: &Prometheus,
    table: &mut Table,
    (dom, labels): (&TestDomain, &BTreeMap<String, String>),
    node: &str,
    bound: Duration,
    label: &str,
) {
    let q = selector(node, dom.exported_name());
    dom.start().expect("virsh start");
    let t = Instant::now();
    let took = prom
        .wait_for(&q, t, TIMEOUT, |r| r.len() == 1)
        .unwrap_or_else(|e| panic!("{label}: start not visible: {e:#}"));
    table.add(&format!("{label}: start visible in PromQL"), took, bound);
    assert_exact(&prom.query(&q).expect("query"), labels);
    dom.destroy().expect("virsh destroy");
    let t = Instant::now();
    let took = prom
        .wait_for(&q, t, TIMEOUT, |r| r.is_empty())
        .unwrap_or_else(|e| panic!("{label}: stop still visible: {e:#}"));
    table.add(&format!("{label}: stop absent from PromQL"), took, bound);
}

/// The `instance` label of the agent's series (its service.instance.id).
fn instance_of(prom: &Prometheus, node: &str) -> String {
    let r = prom
        .query(&format!("{METRIC}{{node=\"{node}\"}}"))
        .expect("query");
    r.first()
        .and_then(|s| s.label("instance"))
        .unwrap_or_else(|| panic!("no series for node {node}: {}", describe(&r)))
        .to_string()
}

/// target_info and every documented self-metric, under their Prometheus names.
fn assert_resource_and_self_metrics(prom: &Prometheus, node: &str, instance: &str) {
    let ti = prom
        .query(&format!(
            "target_info{{job=\"{JOB}\",instance=\"{instance}\"}}"
        ))
        .expect("query target_info");
    assert_eq!(ti.len(), 1, "target_info: {}", describe(&ti));
    assert_eq!(
        ti[0].label("k8s_node_name"),
        Some(node),
        "{}",
        describe(&ti)
    );
    assert!(ti[0].label("host_name").is_some(), "{}", describe(&ti));
    assert_eq!(
        ti[0].label("service_version"),
        Some(env!("CARGO_PKG_VERSION")),
        "{}",
        describe(&ti)
    );
    for name in documented_self_metrics() {
        let q = format!("{{__name__=\"{name}\",job=\"{JOB}\",instance=\"{instance}\"}}");
        let r = prom.query(&q).expect("query self-metric");
        assert!(
            !r.is_empty(),
            "self-metric {name} is not in Prometheus under that name"
        );
    }
    let up = prom
        .query(&format!(
            "virt_hypervisor_agent_connection_up{{instance=\"{instance}\",connection=\"qemu:///system\"}}"
        ))
        .expect("query connection_up");
    assert_eq!(up.len(), 1, "{}", describe(&up));
    assert_eq!(up[0].value, 1.0);
}

/// After the agent's first sync: the running plain TCG domain `plain` with exactly the documented
/// labels, target_info and every self-metric; returns the agent's `instance` label.
fn initial_series(prom: &Prometheus, agent: &Agent, node: &str, plain: &TestDomain) -> String {
    let q_plain = selector(node, plain.exported_name());
    prom.wait_for(&q_plain, agent.started(), TIMEOUT, |r| r.len() == 1)
        .unwrap_or_else(|e| {
            panic!(
                "initial sync never reached PromQL: {e:#}\n{}",
                agent.log_tail(30)
            )
        });
    let instance = instance_of(prom, node);
    assert!(!instance.is_empty());
    assert_exact(
        &prom.query(&q_plain).expect("query"),
        &expected_labels(plain, node, &instance, "qemu-tcg"),
    );
    assert_resource_and_self_metrics(prom, node, &instance);
    instance
}

/// The collector config's batch timeout is the one the bound assumes.
fn check_batch_timeout() {
    let yaml = include_str!("../otel/collector-dev.yaml");
    let batch = yaml
        .split("\n  batch:\n")
        .nth(1)
        .expect("a batch processor");
    assert!(
        batch.lines().take(3).any(|l| l.trim() == "timeout: 1s"),
        "otel/collector-dev.yaml's batch timeout is not {BATCH_TIMEOUT:?}: update VISIBLE_BOUND"
    );
}

/// Through the collector and remote write: the documented series, start/stop visibility, a label
/// change, and an agent restart.
#[test]
fn collector_remote_write_pipeline_is_true_at_every_instant() {
    if !require_libvirtd("collector_remote_write_pipeline_is_true_at_every_instant") {
        return;
    }
    check_batch_timeout();
    let mut table =
        Table::new("PromQL visibility: agent -> collector -> remote write -> Prometheus 2.42");
    let mut prom = Prometheus::start(Flavor::RemoteWrite).expect("start Prometheus 2.42");
    let mut col = Collector::start(&prom.remote_write_url()).expect("start the collector");
    let node = unique_node("prw");
    let vmi = TestDomain::define_kubevirt("prw", Virt::Qemu).expect("define VMI");
    let plain = TestDomain::define("prw-plain", Virt::Qemu).expect("define plain");
    plain.start().expect("start plain");
    let mut agent = spawn_agent("qemu:///system", "grpc", &col.grpc_endpoint(), &node);

    let instance = initial_series(&prom, &agent, &node, &plain);
    let q_plain = selector(&node, plain.exported_name());

    // Starts and stops, three times; the VMI has the namespace label while it runs.
    for i in 1..=3 {
        let q = selector(&node, vmi.exported_name());
        vmi.start().expect("start VMI");
        let t = Instant::now();
        let took = prom
            .wait_for(&q, t, TIMEOUT, |r| r.len() == 1)
            .unwrap_or_else(|e| panic!("start {i}: {e:#}"));
        table.add(&format!("VM start #{i} visible"), took, VISIBLE_BOUND);
        assert_exact(
            &prom.query(&q).unwrap(),
            &expected_labels(&vmi, &node, &instance, "qemu-tcg"),
        );
        vmi.destroy().expect("destroy VMI");
        let t = Instant::now();
        let took = prom
            .wait_for(&q, t, TIMEOUT, |r| r.is_empty())
            .unwrap_or_else(|e| panic!("stop {i}: still in an instant query: {e:#}"));
        table.add(&format!("VM stop #{i} absent"), took, VISIBLE_BOUND);
        // The other domain is untouched.
        assert_eq!(prom.query(&q_plain).unwrap().len(), 1);
    }

    // A label change: a domain named like a VMI but without KubeVirt metadata is exported with its
    // full name; given the metadata live and resumed, it becomes a VMI (namespace + name). The old
    // set must end at once: no stale twin.
    let relabel = TestDomain::define_vmi_named_plain("vmi-relabel", Virt::Qemu)
        .expect("define the relabel domain");
    let relabel_ns = relabel
        .name()
        .split_once('_')
        .map(|(ns, _)| ns.to_string())
        .expect("a name with a namespace part");
    relabel.start().expect("start relabel");
    let q_old = format!("{METRIC}{{node=\"{node}\",name=\"{}\"}}", relabel.name());
    prom.wait_for(&q_old, Instant::now(), TIMEOUT, |r| r.len() == 1)
        .expect("relabel domain visible under its full name");
    virsh(&[
        "metadata",
        relabel.name(),
        "--live",
        "--uri",
        "http://kubevirt.io",
        "--key",
        "kubevirt",
        "--set",
        "<kubevirt><uid>11111111-2222-4333-8444-555555555555</uid></kubevirt>",
    ])
    .expect("set KubeVirt metadata");
    relabel.suspend().expect("suspend");
    relabel.resume().expect("resume");
    let t = Instant::now();
    let q_new =
        format!("{METRIC}{{node=\"{node}\",namespace=\"{relabel_ns}\",name=\"vmi-relabel\"}}");
    let took = prom
        .wait_for(&q_new, t, TIMEOUT, |r| r.len() == 1)
        .expect("relabelled series visible");
    table.add("label change: new set visible", took, VISIBLE_BOUND);
    let took = prom
        .wait_for(&q_old, t, TIMEOUT, |r| r.is_empty())
        .expect("old label set gone");
    table.add(
        "label change: old set absent (no stale twin)",
        took,
        VISIBLE_BOUND,
    );
    let ours = of_names(
        &node,
        &[plain.exported_name(), relabel.name(), "vmi-relabel"],
    );
    let all = prom.query(&ours).unwrap();
    assert_eq!(
        all.len(),
        2,
        "exactly the plain domain and the relabelled one:\n{}",
        describe(&all)
    );

    // The agent restarted while VMs run: shutdown marks nothing stale (the series stays while the
    // agent is away), and the new process continues the same series: same labels, no duplicate.
    let before = prom.query(&ours).unwrap();
    let st = agent
        .terminate(Duration::from_secs(20))
        .expect("SIGTERM the agent");
    assert_eq!(st.code(), Some(0), "{}", agent.log_tail(30));
    std::thread::sleep(BATCH_TIMEOUT + Duration::from_secs(1));
    let during = prom.query(&ours).unwrap();
    assert_eq!(
        labels_of(&during),
        labels_of(&before),
        "shutdown must not end running VMs' series"
    );
    let restarted = Instant::now();
    let mut agent = spawn_agent("qemu:///system", "grpc", &col.grpc_endpoint(), &node);
    let fresh = format!("{ours} and timestamp({ours}) > {}", unix_now() - 0.5);
    let took = prom
        .wait_for(&fresh, restarted, TIMEOUT, |r| r.len() == 2)
        .unwrap_or_else(|e| panic!("restarted agent's samples: {e:#}\n{}", agent.log_tail(30)));
    table.add(
        "agent restart: series continued (fresh samples)",
        took,
        TIMEOUT,
    );
    let after = prom.query(&ours).unwrap();
    assert_eq!(
        labels_of(&after),
        labels_of(&before),
        "the same series, no duplicates"
    );

    agent.check_running().expect("agent alive");
    col.check_running().expect("collector alive");
    prom.check_running().expect("prometheus alive");
    table.print();
    table.assert_bounds();
    drop(agent);
    col.stop();
    prom.stop();
}

fn labels_of(samples: &[Sample]) -> Vec<BTreeMap<String, String>> {
    let mut v: Vec<_> = samples.iter().map(|s| s.labels.clone()).collect();
    v.sort();
    v
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This test's running domains, by exported (namespace, name), as `virsh list` says.
fn truth(doms: &[&TestDomain]) -> Vec<(Option<String>, String)> {
    let running = virsh(&["list", "--name"]).unwrap_or_default();
    let mut v: Vec<_> = doms
        .iter()
        .filter(|d| running.lines().any(|l| l.trim() == d.name()))
        .map(|d| {
            (
                d.exported_namespace().map(String::from),
                d.exported_name().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn seen(samples: &[Sample]) -> Vec<(Option<String>, String)> {
    let mut v: Vec<_> = samples
        .iter()
        .map(|s| {
            (
                s.label("namespace").map(String::from),
                s.label("name").unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Faults on the user's side: the collector restarted while VMs change, and Prometheus down for two
/// minutes while VMs start and stop. No crash, bounded memory, and once both are back PromQL equals
/// `virsh list` (the staleness markers and states that could not be delivered are delivered later).
#[test]
fn collector_restart_and_prometheus_outage_end_with_the_truth() {
    if !require_libvirtd("collector_restart_and_prometheus_outage_end_with_the_truth") {
        return;
    }
    let mut table =
        Table::new("PromQL after faults (collector restart, 2-minute Prometheus outage)");
    let mut prom = Prometheus::start(Flavor::RemoteWrite).expect("start Prometheus");
    let mut col = Collector::start(&prom.remote_write_url()).expect("start the collector");
    let node = unique_node("faults");
    let doms: Vec<TestDomain> = (0..4)
        .map(|i| TestDomain::define_kubevirt(&format!("f{i}"), Virt::Qemu).expect("define"))
        .collect();
    let refs: Vec<&TestDomain> = doms.iter().collect();
    doms[0].start().expect("start");
    doms[1].start().expect("start");
    let mut agent = spawn_agent("qemu:///system", "grpc", &col.grpc_endpoint(), &node);
    let names: Vec<&str> = doms.iter().map(|d| d.exported_name()).collect();
    let q = of_names(&node, &names);
    let equal = |r: &[Sample]| seen(r) == truth(&refs);
    prom.wait_for(&q, agent.started(), TIMEOUT, equal)
        .expect("initial state in PromQL");
    let rss_before = rss_kib(agent.pid());

    // 1. Collector restarted mid-stream: a VM stops and one starts while it is down.
    col.stop();
    doms[0].destroy().expect("destroy 0");
    doms[2].start().expect("start 2");
    std::thread::sleep(Duration::from_secs(3));
    agent
        .check_running()
        .expect("agent survives the collector's absence");
    col.restart().expect("restart the collector");
    let back = Instant::now();
    let took = prom
        .wait_for(&q, back, TIMEOUT, equal)
        .unwrap_or_else(|e| panic!("after the collector restart: {e:#}\n{}", agent.log_tail(20)));
    // The agent retries a failed export after 1 s, 2 s, 4 s...: within ~8 s of the collector's return.
    table.add(
        "collector restart: PromQL == virsh list after it is back",
        took,
        Duration::from_secs(15),
    );

    // 2. Prometheus down for two minutes; VMs start and stop meanwhile (the collector queues).
    prom.stop();
    let outage = Instant::now();
    let mut steps = 0;
    while outage.elapsed() < Duration::from_secs(120) {
        let d = &doms[steps % doms.len()];
        if d.state().map(|s| s == "running").unwrap_or(false) {
            d.destroy().expect("destroy");
        } else {
            d.start().expect("start");
        }
        steps += 1;
        std::thread::sleep(Duration::from_secs(10));
    }
    agent
        .check_running()
        .expect("agent survives the Prometheus outage");
    col.check_running()
        .expect("collector survives the Prometheus outage");
    let rss_after = rss_kib(agent.pid());
    prom.restart().expect("restart Prometheus");
    let back = Instant::now();
    let took = prom
        .wait_for(&q, back, Duration::from_secs(90), equal)
        .unwrap_or_else(|e| {
            panic!(
                "after the Prometheus outage ({steps} transitions): {e:#}\ntruth: {:?}\ncollector:\n{}",
                truth(&refs),
                col.log_tail(20)
            )
        });
    table.add(
        &format!("Prometheus back after 120 s ({steps} transitions): PromQL == virsh list"),
        took,
        Duration::from_secs(60),
    );
    println!(
        "agent RSS: {} KiB before the faults, {} KiB after the outage",
        rss_before, rss_after
    );
    assert!(
        rss_after < rss_before + 20 * 1024,
        "agent memory grew by more than 20 MiB during the outage: {rss_before} -> {rss_after} KiB"
    );
    // And it stays true: one more stop is absent within the normal bound.
    let running = doms
        .iter()
        .find(|d| d.state().map(|s| s == "running").unwrap_or(false))
        .expect("a running domain");
    running.destroy().expect("destroy");
    let t = Instant::now();
    let took = prom
        .wait_for(&q, t, TIMEOUT, equal)
        .expect("after recovery");
    table.add("after recovery: a stop is absent", took, VISIBLE_BOUND);
    table.print();
    table.assert_bounds();
    drop(agent);
    col.stop();
    prom.stop();
}

/// The second supported pipeline: the agent straight to Prometheus 3's OTLP receiver.
#[test]
fn prometheus3_otlp_receiver_pipeline_is_true_at_every_instant() {
    if !require_libvirtd("prometheus3_otlp_receiver_pipeline_is_true_at_every_instant") {
        return;
    }
    let mut table =
        Table::new("PromQL visibility: agent -> Prometheus 3 OTLP receiver (HTTP/protobuf)");
    let mut prom = Prometheus::start(Flavor::Otlp).expect("start Prometheus 3");
    let node = unique_node("otlp");
    let vmi = TestDomain::define_kubevirt("p3", Virt::Qemu).expect("define VMI");
    let plain = TestDomain::define("p3-plain", Virt::Qemu).expect("define plain");
    plain.start().expect("start plain");
    let mut agent = spawn_agent(
        "qemu:///system",
        "http/protobuf",
        &prom.otlp_endpoint(),
        &node,
    );
    let instance = initial_series(&prom, &agent, &node, &plain);
    let labels = expected_labels(&vmi, &node, &instance, "qemu-tcg");
    for i in 1..=3 {
        start_stop(
            &prom,
            &mut table,
            (&vmi, &labels),
            &node,
            VISIBLE_BOUND_DIRECT,
            &format!("#{i}"),
        );
    }
    agent.check_running().expect("agent alive");
    prom.check_running().expect("prometheus alive");
    table.print();
    table.assert_bounds();
}

/// Live migration between two "nodes" (session daemons with KubeVirt-style sockets, one agent
/// each, discovery on), one collector, one Prometheus: both series during the migration, exactly
/// the destination's right after, nothing left on the source; and a deleted pod's `connection_up`
/// series ends with it.
#[test]
fn live_migration_shows_one_series_right_after() {
    if !require_session_daemons("live_migration_shows_one_series_right_after") {
        return;
    }
    let mut table = Table::new("PromQL during and after a live migration (two nodes)");
    let mut prom = Prometheus::start(Flavor::RemoteWrite).expect("start Prometheus");
    let mut col = Collector::start(&prom.remote_write_url()).expect("start the collector");
    let ws = Workspace::new().expect("workspace");
    let (na, nb) = (unique_node("mig-a"), unique_node("mig-b"));
    let root_a = ws.kubelet_root(&na).expect("kubelet root a");
    let root_b = ws.kubelet_root(&nb).expect("kubelet root b");
    let (pod_a, pod_b) = std::thread::scope(|s| {
        let a = s.spawn(|| Pod::start(&ws, &root_a, "pa"));
        let b = s.spawn(|| Pod::start(&ws, &root_b, "pb"));
        (a.join().expect("pod a"), b.join().expect("pod b"))
    });
    let (pod_a, mut pod_b) = (pod_a.expect("start pod a"), pod_b.expect("start pod b"));
    let vmi = Vmi::new("kv-prom", "vmi-mig");
    pod_a.daemon.define(&vmi).expect("define on a");
    pod_a.daemon.start_domain(&vmi).expect("start on a");
    pod_a.publish().expect("publish a");
    pod_b.publish().expect("publish b");
    let spawn = |node: &str, root: &std::path::Path| {
        let config = ws.path().join(format!("agent-{node}.yaml"));
        std::fs::write(
            &config,
            format!(
                "libvirt:\n  uris: []\n  keepalive_interval: 1s\n  keepalive_count: 2\n{}\
                 export:\n  protocol: grpc\n  endpoint: {}\n  interval: 30s\n  debounce: 250ms\n",
                common::session::discover_yaml(root),
                col.grpc_endpoint()
            ),
        )
        .expect("write config");
        Agent::spawn(
            &["run", "--config", &config.to_string_lossy()],
            &[("NODE_NAME", node), ("RUST_LOG", "info")],
        )
        .expect("spawn agent")
    };
    let mut agent_a = spawn(&na, &root_a);
    let mut agent_b = spawn(&nb, &root_b);
    let q = format!("{METRIC}{{namespace=\"kv-prom\",name=\"vmi-mig\",node=~\"{na}|{nb}\"}}");
    prom.wait_for(&q, agent_a.started(), TIMEOUT, |r| {
        r.len() == 1 && r[0].label("node") == Some(na.as_str())
    })
    .expect("VMI on node a before the migration");
    wait_until(TIMEOUT, || {
        agent_b.log().contains("libvirt connection established")
    })
    .expect("node b's agent connected to its pod");

    // Poll PromQL while the migration runs (another thread), to see the both-nodes window.
    let port = free_port().expect("port");
    let begun = Instant::now();
    let mut max_during = 0usize;
    let migrated = std::thread::scope(|s| {
        let h = s.spawn(|| pod_a.daemon.migrate_to(&vmi, &pod_b.daemon, port));
        while !h.is_finished() {
            if let Ok(r) = prom.query(&q) {
                max_during = max_during.max(r.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        h.join().expect("migrate thread")
    });
    migrated.expect("virsh migrate");
    let done = Instant::now();
    println!(
        "virsh migrate took {:?}; at most {max_during} series seen during it",
        done - begun
    );
    assert_eq!(
        max_during, 2,
        "both nodes must show the VM during the migration"
    );
    let took = prom
        .wait_for(&q, done, TIMEOUT, |r| {
            r.len() == 1 && r[0].label("node") == Some(nb.as_str())
        })
        .unwrap_or_else(|e| panic!("after the migration: {e:#}"));
    table.add(
        "migration: only the destination's series right after",
        took,
        VISIBLE_BOUND,
    );
    // Stays so: nothing lingers on the source.
    std::thread::sleep(Duration::from_secs(3));
    let r = prom.query(&q).unwrap();
    assert!(
        r.len() == 1 && r[0].label("node") == Some(nb.as_str()),
        "{}",
        describe(&r)
    );

    // A deleted pod: its connection's self-metric series end too.
    let conn = pod_b.connection_label();
    let q_up = format!("virt_hypervisor_agent_connection_up{{connection=\"{conn}\"}}");
    prom.wait_for(&q_up, Instant::now(), TIMEOUT, |r| r.len() == 1)
        .expect("connection_up of pod b");
    pod_b.daemon.destroy_all().expect("destroy pod b's domains");
    let t = pod_b.delete().expect("delete pod b");
    let took = prom
        .wait_for(&q_up, t, TIMEOUT, |r| r.is_empty())
        .unwrap_or_else(|e| panic!("deleted pod's connection_up still in PromQL: {e:#}"));
    table.add("pod deleted: its connection_up absent", took, VISIBLE_BOUND);
    let r = prom.query(&q).unwrap();
    assert!(r.is_empty(), "the VMI went with its pod: {}", describe(&r));

    agent_a.check_running().expect("agent a alive");
    agent_b.check_running().expect("agent b alive");
    table.print();
    table.assert_bounds();
    drop(agent_a);
    drop(agent_b);
    col.stop();
    prom.stop();
}
