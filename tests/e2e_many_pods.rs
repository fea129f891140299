//! Many launcher pods, most of them hung, end to end: the agent binary in discovery mode over
//! [`PODS`] real session-daemon "pods" (more than the 64 blocking threads the agent once capped its
//! pool at), exporting over gRPC to the in-process OTLP receiver.
//!
//! - `hung_pods_neither_starve_the_healthy_ones_nor_hold_the_exit`: once every pod is connected,
//!   [`FROZEN`] daemons are SIGSTOPped and left hung through several resync and reconnect rounds;
//!   then a VM started on a healthy pod reaches the receiver within [`HEALTHY_BOUND`] (1 s), the
//!   agent's thread count stays within its per-connection bound (printed), and SIGTERM still ends
//!   the agent with exit 0 within `export.shutdown_timeout` (measured, printed). Before the
//!   per-connection bounds, hung daemons held every thread of the capped pool and the healthy VM
//!   waited for a fetch timeout; shutdown added budgets past the deadline.
//!
//! Session daemons come from [`common::session`]; without them the test skips with a printed
//! reason, or fails when `VHA_E2E_REQUIRED=1`. `VHA_MANY_PODS` overrides the pod count.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::reliability::proc_stats;
use common::session::{require_session_daemons, start_all, Pod, Vmi, Workspace};
use common::{wait_until, Agent};

const METRIC: &str = "kubevirt_vmi_hypervisor_info";
const UP: &str = "virt_hypervisor_agent_connection_up";
const PODS: usize = 70;
const FROZEN: usize = 66;
const HEALTHY_BOUND: Duration = Duration::from_secs(1);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
const FETCH_CONCURRENCY: usize = 2;
/// Pods started at once (2 cores).
const START_WORKERS: usize = 6;

fn pods_wanted() -> usize {
    std::env::var("VHA_MANY_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PODS)
        .max(FROZEN + 2)
}

/// Start `n` pods (no domains), `START_WORKERS` at a time, and publish their sockets.
fn start_pods(ws: &Workspace, kubelet_root: &std::path::Path, n: usize) -> Vec<Pod> {
    start_all(n, START_WORKERS, |i| {
        let pod = Pod::start(ws, kubelet_root, &format!("p{i}"))?;
        pod.publish()?;
        Ok(pod)
    })
}

fn ups(rx: &Receiver) -> usize {
    rx.latest_series(UP)
        .map(|s| s.iter().filter(|s| s.value.as_f64() == 1.0).count())
        .unwrap_or(0)
}

#[test]
fn hung_pods_neither_starve_the_healthy_ones_nor_hold_the_exit() {
    if !require_session_daemons("hung_pods_neither_starve_the_healthy_ones_nor_hold_the_exit") {
        return;
    }
    let n = pods_wanted();
    let ws = Workspace::new().unwrap();
    let root = ws.kubelet_root("many-node").unwrap();
    let started = Instant::now();
    let mut pods = start_pods(&ws, &root, n);
    println!("{n} session-daemon pods started in {:?}", started.elapsed());

    let rx = Receiver::start().unwrap();
    let config = ws.path().join("agent-many.yaml");
    std::fs::write(
        &config,
        format!(
            "libvirt:\n  uris: []\n  keepalive_interval: 1s\n  keepalive_count: 2\n  fetch_timeout: 3s\n  \
             fetch_concurrency: {FETCH_CONCURRENCY}\n  resync_interval: 1s\n  \
             reconnect:\n    initial_backoff: 200ms\n    max_backoff: 1s\n{discover}    rescan_interval: 10m\nexport:\n  exporter: otlp\n  protocol: grpc\n  \
             endpoint: {endpoint}\n  interval: 1s\n  debounce: 50ms\n  shutdown_timeout: {shutdown}s\n",
            discover = common::session::discover_yaml(&root),
            endpoint = rx.grpc_endpoint(),
            shutdown = SHUTDOWN_TIMEOUT.as_secs(),
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let mut agent = Agent::spawn(
        &["run", "--config", &config],
        &[("NODE_NAME", "many-node"), ("RUST_LOG", "info")],
    )
    .unwrap();
    let t = wait_until(Duration::from_secs(120), || ups(&rx) == n)
        .unwrap_or_else(|_| panic!("only {} of {n} connections came up", ups(&rx)));
    let baseline = proc_stats(agent.pid()).unwrap();
    println!(
        "all {n} connections up {t:?} after the agent started; {} threads",
        baseline.threads
    );

    // Hang most daemons and let them be hung through several resyncs (1 s) and keepalive
    // timeouts (2 s) and reconnect attempts (each open bounded by the 3 s fetch timeout).
    for p in pods.iter_mut().take(FROZEN) {
        p.daemon.freeze().unwrap();
    }
    wait_until(Duration::from_secs(30), || ups(&rx) == n - FROZEN).unwrap_or_else(|_| {
        panic!(
            "{} connections up, expected {} once {FROZEN} daemons hung",
            ups(&rx),
            n - FROZEN
        )
    });
    std::thread::sleep(Duration::from_secs(8));
    let hung = proc_stats(agent.pid()).unwrap();

    // A VM on a healthy pod.
    let healthy = &pods[n - 1];
    let vmi = Vmi::new("many", "healthy");
    healthy.daemon.define(&vmi).unwrap();
    healthy.daemon.start_domain(&vmi).unwrap();
    let since = Instant::now();
    let seen = rx.wait_for_series(since, Duration::from_secs(30), METRIC, |series| {
        series.iter().any(|s| s.attr("name") == Some("healthy"))
    });
    let threads = proc_stats(agent.pid()).unwrap().threads;
    // Per connection: at most `fetch_concurrency` blocking threads, plus the fixed ones (async
    // worker, event loop, exporter, discovery, notify's watcher, idle pool threads).
    let bound = u64::try_from(n * FETCH_CONCURRENCY + 24).unwrap();
    let latency = seen.as_ref().map(|o| o.latency);
    println!(
        "{FROZEN} of {n} daemons hung: healthy VM exported after {latency:?} (bound {HEALTHY_BOUND:?}); \
         agent threads {} connected, {} hung, {threads} after the VM (bound {bound}: {n} connections x {FETCH_CONCURRENCY} permits + 24)",
        baseline.threads, hung.threads
    );
    let latency = latency.unwrap_or_else(|e| panic!("the healthy VM never arrived: {e:#}"));
    assert!(
        latency <= HEALTHY_BOUND,
        "the healthy VM took {latency:?} to reach the receiver"
    );
    assert!(
        threads <= bound && hung.threads <= bound,
        "{} / {threads} threads exceed the bound {bound}",
        hung.threads
    );

    // SIGTERM with the daemons still hung.
    let term = Instant::now();
    let status = agent.terminate(Duration::from_secs(30)).unwrap();
    let took = term.elapsed();
    println!(
        "SIGTERM with {FROZEN} hung daemons: exit {status} after {took:?} (shutdown_timeout {SHUTDOWN_TIMEOUT:?})"
    );
    assert!(status.success(), "the agent exited with {status}");
    // The deadline, plus what it takes the process to be reaped.
    let slack = Duration::from_millis(300);
    assert!(
        took <= SHUTDOWN_TIMEOUT + slack,
        "the agent took {took:?} to exit, over its {SHUTDOWN_TIMEOUT:?} shutdown timeout (+{slack:?})"
    );
    drop(agent);
    drop(pods);
}
