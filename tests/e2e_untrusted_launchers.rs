//! End to end, a KubeVirt node where some pods are hostile: what the agent binary, discovering
//! launcher sockets under a fake kubelet root, connects to and exports, asserted through the
//! in-process OTLP receiver.
//!
//! `forged_and_flooding_launchers_are_contained` (real session daemons and TCG QEMU):
//! - a flooding pod whose daemon runs more domains than `libvirt.discover.max_domains_per_socket`,
//!   published first, so that without the per-socket bound its domains would take every set of a
//!   small `metric.cardinality_limit` and push the healthy pod's VM into the overflow point;
//! - a healthy pod with one VMI, published after it;
//! - three paths that match the discovery globs but must not be connected to: a symlink to the
//!   healthy pod's real socket, a regular file, and a real socket owned by root (not in
//!   `socket_owners`).
//!
//! Expected: the healthy VM and exactly `max_domains_per_socket` of the flooding pod's VMs are
//! exported, no overflow point; the flooding connection's excess is in
//! `virt_hypervisor_agent_connection_domains_over_limit`; exactly two connections exist; each
//! rejection is counted once under its reason and logged once, even after several rescans.
//!
//! Gating: as the other session-daemon tests (root, libvirtd, virsh, QEMU, runuser); skips with a
//! printed reason, or fails when `VHA_E2E_REQUIRED=1`.

mod common;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::receiver::{describe, Receiver, Series};
use common::session::{require_session_daemons, Pod, Vmi, Workspace, RUNTIME_VOLUME, SOCKET_NAME};
use common::Agent;

const METRIC: &str = "kubevirt_vmi_hypervisor_info";
const UP: &str = "virt_hypervisor_agent_connection_up";
const OVER: &str = "virt_hypervisor_agent_connection_domains_over_limit";
const REJECTED: &str = "virt_hypervisor_agent_discovery_rejected";
const OVERFLOW_SETS: &str = "virt_hypervisor_agent_info_sets_over_limit";
const TIMEOUT: Duration = Duration::from_secs(60);
/// The per-socket bound under test, and the flooding pod's domains (more than the bound).
const PER_SOCKET: usize = 2;
const FLOOD: usize = 4;
/// Room for exactly the bound plus the healthy VM: any flooding domain beyond the bound would
/// push the healthy VM (observed last) into the overflow point.
const CARDINALITY: usize = PER_SOCKET + 1;

fn names(series: &[Series]) -> Vec<String> {
    let mut out: Vec<String> = series
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.attr("namespace").unwrap_or(""),
                s.attr("name").unwrap_or("")
            )
        })
        .collect();
    out.sort();
    out
}

fn value_where(series: &[Series], key: &str, val: &str) -> Option<f64> {
    series
        .iter()
        .find(|s| s.attr(key) == Some(val))
        .map(|s| s.value.as_f64())
}

#[test]
fn forged_and_flooding_launchers_are_contained() {
    if !require_session_daemons("forged_and_flooding_launchers_are_contained") {
        return;
    }
    let ws = Workspace::new().expect("workspace");
    let root = ws.kubelet_root("hostile-node").expect("kubelet root");
    let rx = Receiver::start().expect("receiver");

    // The flooding pod: FLOOD domains claiming another namespace.
    let flood = Pod::start(&ws, &root, "flood").expect("flood pod");
    let flood_vmis: Vec<Vmi> = (0..FLOOD)
        .map(|i| Vmi::new("prod", &format!("fake-{i}")))
        .collect();
    for vmi in &flood_vmis {
        flood.daemon.define(vmi).expect("define");
        flood.daemon.start_domain(vmi).expect("start");
    }
    let healthy = Pod::start(&ws, &root, "healthy").expect("healthy pod");
    let real = Vmi::new("team-a", "real");
    healthy.daemon.define(&real).expect("define");
    healthy.daemon.start_domain(&real).expect("start");

    // Three candidates that must be refused, each in a pod dir of its own.
    let candidate = |pod: &str| {
        let dir = root.join("pods").join(pod).join(RUNTIME_VOLUME);
        std::fs::create_dir_all(&dir).expect("create a pod volume");
        dir.join(SOCKET_NAME)
    };
    let symlinked = candidate("0000-symlink");
    std::os::unix::fs::symlink(healthy.daemon.socket(), &symlinked).expect("symlink");
    let regular = candidate("0000-regular");
    std::fs::write(&regular, b"").expect("regular file");
    let rooted = candidate("0000-root-owned");
    // The path is longer than a socket address: bind through a descriptor of its directory.
    let rooted_dir = std::fs::File::open(rooted.parent().expect("a dir")).expect("open the dir");
    let _root_listener = UnixListener::bind(format!(
        "/proc/self/fd/{}/{SOCKET_NAME}",
        std::os::fd::AsRawFd::as_raw_fd(&rooted_dir)
    ))
    .expect("root-owned socket");

    flood.publish().expect("publish flood");
    let config = ws.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "libvirt:\n  uris: []\n  fetch_timeout: 3s\n{discover}    rescan_interval: 1s\n    \
             max_domains_per_socket: {PER_SOCKET}\nmetric:\n  cardinality_limit: {CARDINALITY}\n\
             export:\n  exporter: otlp\n  protocol: grpc\n  endpoint: {endpoint}\n  interval: 1s\n  \
             debounce: 100ms\n",
            discover = common::session::discover_yaml(&root),
            endpoint = rx.grpc_endpoint(),
        ),
    )
    .expect("write config");
    let config = config.to_string_lossy().into_owned();
    let mut agent = Agent::spawn(
        &["run", "--config", &config],
        &[("NODE_NAME", "hostile-node"), ("RUST_LOG", "info")],
    )
    .expect("spawn the agent");

    // The flooding pod first: its connection is the first in every collection.
    rx.wait_for_series(agent.started(), TIMEOUT, METRIC, |s| s.len() == PER_SOCKET)
        .unwrap_or_else(|e| panic!("the flooding pod's bounded domains: {e}\n{}", agent.log()));
    let published = healthy.publish().expect("publish healthy");

    let obs = rx
        .wait_for_series(published, TIMEOUT, METRIC, |s| {
            names(s).contains(&"team-a/real".to_string())
        })
        .unwrap_or_else(|e| panic!("the healthy VM is exported: {e}\n{}", agent.log()));
    let exported = names(&obs.series);
    println!("exported: {exported:?}");
    assert_eq!(
        exported.len(),
        CARDINALITY,
        "the healthy VM plus {PER_SOCKET} of the flood:\n{}",
        describe(&obs.series)
    );
    assert_eq!(
        exported.iter().filter(|n| n.starts_with("prod/")).count(),
        PER_SOCKET
    );
    assert!(
        obs.series
            .iter()
            .all(|s| s.attr("otel.metric.overflow").is_none()),
        "no overflow point:\n{}",
        describe(&obs.series)
    );

    // Let several 1 s rescans pass, so "once per path" is tested, then read the self-metrics.
    std::thread::sleep(Duration::from_secs(4));
    let r = rx.latest_with_metrics().expect("a request with metrics");
    let over = r.series(OVER);
    println!("{OVER}:\n{}", describe(&over));
    let flood_label = flood.connection_label();
    let healthy_label = healthy.connection_label();
    assert_eq!(
        value_where(&over, "connection", &flood_label),
        Some((FLOOD - PER_SOCKET) as f64)
    );
    assert_eq!(value_where(&over, "connection", &healthy_label), Some(0.0));
    assert_eq!(
        r.series(OVERFLOW_SETS).first().map(|s| s.value.as_f64()),
        Some(0.0),
        "nothing beyond metric.cardinality_limit"
    );
    let up = r.series(UP);
    let mut conns: Vec<&str> = up.iter().filter_map(|s| s.attr("connection")).collect();
    conns.sort();
    let mut want = vec![flood_label.as_str(), healthy_label.as_str()];
    want.sort();
    assert_eq!(conns, want, "only the two real launchers are connections");

    let rejected = r.series(REJECTED);
    println!("{REJECTED}:\n{}", describe(&rejected));
    for reason in ["symlink", "not_socket", "owner"] {
        assert_eq!(
            value_where(&rejected, "reason", reason),
            Some(1.0),
            "one rejection for {reason}"
        );
    }
    let log = agent.log();
    for path in [&symlinked, &regular, &rooted] {
        let lines = log
            .lines()
            .filter(|l| l.contains("not connecting") && l.contains(&*path.to_string_lossy()))
            .count();
        assert_eq!(lines, 1, "one warning for {}:\n{log}", path.display());
    }
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("more domains than libvirt.discover.max_domains_per_socket"))
            .count(),
        1,
        "one warning for the flooding socket:\n{log}"
    );

    let t = Instant::now();
    agent
        .terminate(Duration::from_secs(10))
        .expect("the agent stops");
    println!("agent stopped in {:?}", t.elapsed());
}
