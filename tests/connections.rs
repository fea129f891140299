//! The connection layer in-process, against private libvirt *session* daemons that the tests hang,
//! kill and restart (never the shared system daemon): the agent's own bookkeeping is inspected
//! directly through [`Agent::inventory`].
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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::session::{require_session_daemons, SessionDaemon, Vmi, Workspace};
use common::wait_until;
use virt_hypervisor_agent::agent::Agent;
use virt_hypervisor_agent::config::{AgentConfig, ExporterKind};
use virt_hypervisor_agent::export::Telemetry;
use virt_hypervisor_agent::inventory::Inventory;

/// An agent running on its own runtime thread; dropping it stops it and joins the thread.
struct Running {
    inventory: Arc<Mutex<Inventory>>,
    telemetry: Arc<Telemetry>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Running {
    fn start(cfg: AgentConfig) -> Running {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let agent = Agent::new(cfg).expect("agent builds");
                tx.send((agent.inventory(), agent.telemetry())).unwrap();
                agent
                    .run(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("agent runs");
            });
            // A daemon frozen by a test may still hold a blocking thread: do not wait for it.
            rt.shutdown_background();
        });
        let (inventory, telemetry) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Running {
            inventory,
            telemetry,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn up(&self) -> bool {
        self.telemetry.connection_meta().values().all(|m| m.up)
    }

    fn domains(&self) -> usize {
        self.inventory.lock().unwrap().snapshot().domains.len()
    }

    /// (resyncs in progress, tombstones).
    fn bookkeeping(&self) -> (usize, usize) {
        let inv = self.inventory.lock().unwrap();
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
