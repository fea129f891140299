//! The connection layer in-process, against private libvirt *session* daemons that the tests hang,
//! kill and restart (never the shared system daemon): the agent's own bookkeeping is inspected
//! directly through `Agent::inventory`.
//!
//! - `resync_tokens_end_with_their_task`: a daemon frozen while a resync lists domains, then killed
//!   and restarted, several times; once quiet, the inventory holds no resync in progress and no
//!   tombstone, even after domains stopped (before the fix, every lost resync left its token behind
//!   and every later STOPPED added a tombstone that was never cleared).
//!
//! - `a_removed_hung_connection_closes_off_the_worker`: two discovered launcher pods; one daemon
//!   is frozen and its socket then vanishes, so the agent removes a connection whose release
//!   (deregistering the callbacks, closing: both RPCs) cannot return. Keepalive and the periodic
//!   resync are off, so nothing unblocks it and no other call holds the connection: the removal
//!   is the last owner. Its series and VM must go at once (before, they stayed until the release
//!   gave up, `fetch_timeout`), the healthy pod's next VM must reach the inventory (a release on
//!   the async worker, which the agent runs one of as the binary does, would hold it forever),
//!   and the agent must still stop within its deadline.
//!
//! - `a_hung_version_read_is_bounded`: with `metric.attributes.hypervisor_version` on, a fresh
//!   session daemon takes seconds to answer the agent's first `virConnectGetVersion` (it probes
//!   the host); the daemon is frozen during it, keepalive off. The read must give up after
//!   `fetch_timeout` and the connection come up without a version (before the call helper, that
//!   read had no timeout: the connection never came up), and the agent must still stop in time.
//!
//! Session daemons come from [`common::session`]; without them the tests skip with a printed
//! reason, or fail when `VHA_E2E_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::in_process::InProcess;
use common::session::{require_session_daemons, Pod, SessionDaemon, Vmi, Workspace};
use common::wait_until;
use virt_hypervisor_agent::config::{AgentConfig, ExporterKind};

/// The agent in-process, with what these tests read of it.
struct Running(InProcess);

impl Running {
    fn start(cfg: AgentConfig) -> Running {
        Running(InProcess::start(cfg))
    }

    fn up(&self) -> bool {
        self.0.store.connections().values().all(|m| m.up)
    }

    fn has_domain(&self, name: &str) -> bool {
        self.0
            .store
            .snapshot()
            .domains
            .iter()
            .any(|d| d.domain_name == name)
    }

    fn domains(&self) -> usize {
        self.0.store.snapshot().domains.len()
    }

    /// (resyncs in progress, tombstones).
    fn bookkeeping(&self) -> (usize, usize) {
        self.0
            .store
            .inspect(|inv| (inv.resyncs_in_progress(), inv.tombstones()))
    }
}

/// Stop the agent (the drop joins its thread) with a daemon still frozen: within 5 s, printed,
/// for an `export.shutdown_timeout` of 2 s.
fn stops_in_time(agent: Running) {
    let stop = std::time::Instant::now();
    drop(agent);
    let took = stop.elapsed();
    println!("agent stopped {took:?} after the request (deadline 2 s)");
    assert!(
        took < Duration::from_secs(5),
        "the agent took {took:?} to stop with a hung daemon"
    );
}

fn config(uris: Vec<String>) -> AgentConfig {
    let mut cfg = AgentConfig::default();
    cfg.libvirt.uris = uris;
    cfg.libvirt.resync_interval = Duration::from_secs(1);
    cfg.libvirt.reconnect.initial_backoff = Duration::from_millis(100);
    cfg.libvirt.reconnect.max_backoff = Duration::from_millis(500);
    cfg.export.exporter = ExporterKind::None;
    cfg.node_name = "connections-node".into();
    cfg
}

#[test]
fn resync_tokens_end_with_their_task() {
    if !require_session_daemons("resync_tokens_end_with_their_task") {
        return;
    }
    let ws = Workspace::new().unwrap();
    let mut daemon = SessionDaemon::start(ws.path().join("tokens")).unwrap();
    let vmis: Vec<Vmi> = (0..3)
        .map(|i| Vmi::new("tokens", &format!("vm{i}")))
        .collect();
    for v in &vmis {
        daemon.define(v).unwrap();
        daemon.start_domain(v).unwrap();
    }
    let agent = Running::start(config(vec![daemon.uri()]));
    wait_until(Duration::from_secs(30), || {
        agent.up() && agent.domains() == 3
    })
    .expect("the agent sees the daemon's 3 domains");

    const ROUNDS: usize = 5;
    for round in 0..ROUNDS {
        // Freeze the daemon, wait for the periodic resync to start listing (it hangs there), then
        // kill the daemon under it: the connection is lost in the middle of the resync.
        daemon.freeze().unwrap();
        wait_until(Duration::from_secs(10), || agent.bookkeeping().0 > 0)
            .unwrap_or_else(|_| panic!("round {round}: no resync began on the frozen daemon"));
        daemon.kill().unwrap();
        wait_until(Duration::from_secs(10), || !agent.up())
            .unwrap_or_else(|_| panic!("round {round}: the lost connection was not noticed"));
        daemon.restart().unwrap();
        wait_until(Duration::from_secs(30), || agent.up())
            .unwrap_or_else(|_| panic!("round {round}: the agent did not reconnect"));
    }
    // Stopped domains are where a leaked token shows: each STOPPED adds a tombstone.
    for v in &vmis {
        daemon.destroy_domain(v).unwrap();
    }
    wait_until(Duration::from_secs(10), || agent.domains() == 0)
        .expect("the stopped domains leave the inventory");
    let quiet = wait_until(Duration::from_secs(10), || agent.bookkeeping() == (0, 0));
    let (resyncs, tombstones) = agent.bookkeeping();
    println!(
        "after {ROUNDS} connections lost mid-resync and 3 domains stopped: {resyncs} resync(s) in progress, {tombstones} tombstone(s)"
    );
    assert!(
        quiet.is_ok(),
        "leaked: {resyncs} resync token(s) and {tombstones} tombstone(s) remain with no resync running"
    );
}

#[test]
fn a_removed_hung_connection_closes_off_the_worker() {
    if !require_session_daemons("a_removed_hung_connection_closes_off_the_worker") {
        return;
    }
    let ws = Workspace::new().unwrap();
    let root = ws.kubelet_root("hung-node").unwrap();
    let healthy = Pod::start(&ws, &root, "ok").unwrap();
    let mut hung = Pod::start(&ws, &root, "hung").unwrap();
    let vm = Vmi::new("hung", "vm0");
    hung.daemon.define(&vm).unwrap();
    hung.daemon.start_domain(&vm).unwrap();
    healthy.publish().unwrap();
    hung.publish().unwrap();

    let mut cfg = config(Vec::new());
    // Nothing may rescue a blocked release: no keepalive closes the frozen daemon's socket, and
    // no resync holds the connection besides the removal.
    cfg.libvirt.keepalive_interval = Duration::ZERO;
    cfg.libvirt.resync_interval = Duration::ZERO;
    cfg.libvirt.discover.enabled = true;
    cfg.libvirt.discover.kubelet_root = root.clone();
    cfg.libvirt.discover.socket_owners = vec![common::session::ensure_user().unwrap().0];
    cfg.export.shutdown_timeout = Duration::from_secs(2);
    let agent = Running::start(cfg);
    let conns = || agent.0.store.connections().len();
    wait_until(Duration::from_secs(30), || {
        conns() == 2 && agent.up() && agent.domains() == 1
    })
    .expect("both pods connected, the hung pod's VM exported");

    wait_until(Duration::from_secs(10), || agent.bookkeeping().0 == 0)
        .expect("the initial resyncs ended");
    hung.daemon.freeze().unwrap();
    // The pod's socket vanishes (as when the kubelet tears the pod down): the connection goes.
    let gone = std::time::Instant::now();
    std::fs::remove_file(hung.socket_path()).unwrap();
    // Its series and its VM go at once, not when the hung release gives up (fetch_timeout, 10 s).
    let removed = wait_until(Duration::from_secs(5), || {
        conns() == 1 && agent.domains() == 0
    });
    println!(
        "connection and VM of the vanished, frozen pod removed after {:?}",
        gone.elapsed()
    );
    removed.expect("the vanished pod's connection and VM were removed within 5 s");

    // The healthy pod's next VM still arrives.
    let fresh = Vmi::new("ok", "vm1");
    healthy.daemon.define(&fresh).unwrap();
    let started = std::time::Instant::now();
    healthy.daemon.start_domain(&fresh).unwrap();
    let arrived = wait_until(Duration::from_secs(10), || {
        agent.has_domain(&fresh.domain_name())
    });
    println!(
        "VM on the healthy pod in the inventory {:?} after `virsh start` was issued",
        started.elapsed()
    );
    arrived.expect("the healthy pod's VM reached the inventory within 10 s");
    // The removed connection's VM stays gone while its release hangs.
    assert!(
        !agent.has_domain(&vm.domain_name()),
        "the removed connection's domain came back"
    );

    // Shutdown with the daemon still frozen ends within the deadline.
    stops_in_time(agent);
    hung.daemon.thaw().unwrap();
}

#[test]
fn a_hung_version_read_is_bounded() {
    if !require_session_daemons("a_hung_version_read_is_bounded") {
        return;
    }
    let ws = Workspace::new().unwrap();
    let mut daemon = SessionDaemon::start(ws.path().join("version")).unwrap();
    let mut cfg = config(vec![daemon.uri()]);
    cfg.libvirt.keepalive_interval = Duration::ZERO;
    cfg.libvirt.resync_interval = Duration::ZERO;
    cfg.libvirt.fetch_timeout = Duration::from_secs(1);
    cfg.metric.attributes.hypervisor_version = true;
    cfg.export.shutdown_timeout = Duration::from_secs(2);
    let agent = Running::start(cfg);
    // The agent's connection is accepted; its open takes milliseconds, the first version read of
    // a fresh daemon seconds: freeze the daemon in between.
    wait_until(Duration::from_secs(10), || {
        daemon.clients().is_ok_and(|n| n >= 1)
    })
    .expect("the agent connected to the daemon");
    std::thread::sleep(Duration::from_millis(150));
    let up_before = agent.up();
    daemon.freeze().unwrap();
    let frozen = std::time::Instant::now();
    assert!(
        !up_before,
        "the version read finished within 150 ms of the connection: the daemon was frozen too late to test anything"
    );

    let meta = || agent.0.store.connections();
    let came_up = wait_until(Duration::from_secs(10), || {
        meta()
            .values()
            .all(|m| m.up && m.hypervisor_version.is_none())
    });
    println!(
        "connection up without a version {:?} after the freeze (fetch_timeout 1 s)",
        frozen.elapsed()
    );
    came_up.expect("the hung version read gave up and the connection came up within 10 s");

    stops_in_time(agent);
    daemon.thaw().unwrap();
}
