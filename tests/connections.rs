//! The connection layer in-process, against private libvirt *session* daemons that the tests hang,
//! kill and restart (never the shared system daemon): the agent's own bookkeeping is inspected
//! directly through `Agent::inventory`.
//!
//! - `resync_tokens_end_with_their_task`: a daemon frozen while a resync lists domains, then killed
//!   and restarted, several times; once quiet, the inventory holds no resync in progress and no
//!   tombstone, even after domains stopped (before the fix, every lost resync left its token behind
//!   and every later STOPPED added a tombstone that was never cleared).
//!
//! Session daemons come from [`common::session`]; without them the tests skip with a printed
//! reason, or fail when `VHA_E2E_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::in_process::InProcess;
use common::session::{require_session_daemons, SessionDaemon, Vmi, Workspace};
use common::wait_until;
use virt_hypervisor_agent::config::{AgentConfig, ExporterKind};

/// The agent in-process, with what these tests read of it.
struct Running(InProcess);

impl Running {
    fn start(cfg: AgentConfig) -> Running {
        Running(InProcess::start(cfg))
    }

    fn up(&self) -> bool {
        self.0.telemetry.connection_meta().values().all(|m| m.up)
    }

    fn domains(&self) -> usize {
        self.0.inventory.lock().unwrap().snapshot().domains.len()
    }

    /// (resyncs in progress, tombstones).
    fn bookkeeping(&self) -> (usize, usize) {
        let inv = self.0.inventory.lock().unwrap();
        (inv.resyncs_in_progress(), inv.tombstones())
    }
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
