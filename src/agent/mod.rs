//! Wiring: the event loop, one task per connection, the exporter and its push-on-change task,
//! readiness and watchdog notifications, and an orderly shutdown.

pub mod connection;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::domain::Wants;
use crate::export::{ExportError, Exporter, PushTrigger, Telemetry};
use crate::inventory::{ConnId, FetchOutcome, Inventory, Snapshot};
use crate::source::event_loop::{self, EventLoopError};
use crate::source::libvirt::{self, Fetched};
use connection::ConnSpec;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("starting the libvirt event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("setting up export")]
    Export(#[from] ExportError),
}

/// State shared by every task.
#[derive(Debug)]
pub struct Shared {
    pub cfg: Arc<AgentConfig>,
    pub node: String,
    pub inventory: Arc<Mutex<Inventory>>,
    pub telemetry: Arc<Telemetry>,
    pub push: PushTrigger,
    pub wants: Wants,
}

impl Shared {
    pub fn lock_inventory(&self) -> MutexGuard<'_, Inventory> {
        self.inventory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The node name: config, else `NODE_NAME`, else the host name.
pub fn resolve_node_name(cfg: &AgentConfig) -> String {
    if !cfg.node_name.trim().is_empty() {
        return cfg.node_name.trim().to_string();
    }
    match std::env::var("NODE_NAME") {
        Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
        _ => crate::export::resource::host_name(),
    }
}

/// What the XML parser must read for the configured attributes.
pub fn wants(cfg: &AgentConfig) -> Wants {
    let a = &cfg.metric.attributes;
    Wants {
        os: a.machine || a.arch,
        emulator: a.emulator,
    }
}

/// Run the daemon until `shutdown` resolves, then stop everything within the configured
/// deadline, flushing a last export.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::new(cfg)?.run(shutdown).await
}

/// A configured agent, before and while it runs.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    exporter: Exporter,
}

impl Agent {
    /// Start the libvirt event loop and build the export pipeline. Must be called inside a
    /// multi-thread tokio runtime. Opens no libvirt connection yet.
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        event_loop::ensure_running()?;
        let cfg = Arc::new(cfg);
        let node = resolve_node_name(&cfg);
        let inventory = Arc::new(Mutex::new(Inventory::new()));
        let telemetry = Arc::new(Telemetry::new());
        let exporter =
            Exporter::start(&cfg, &node, Arc::clone(&inventory), Arc::clone(&telemetry))?;
        let shared = Arc::new(Shared {
            cfg: Arc::clone(&cfg),
            node,
            inventory,
            telemetry,
            push: exporter.trigger(),
            wants: wants(&cfg),
        });
        Ok(Self { shared, exporter })
    }

    /// The live inventory (for tests and embedding).
    pub fn inventory(&self) -> Arc<Mutex<Inventory>> {
        Arc::clone(&self.shared.inventory)
    }

    /// The agent's counters and connection states.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        Arc::clone(&self.shared.telemetry)
    }

    /// Run until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let Agent { shared, exporter } = self;
        let cfg = Arc::clone(&shared.cfg);
        let node = shared.node.clone();
        let export_task = exporter.spawn_export_task(cfg.export.debounce);
        tracing::info!(node = %node, uris = ?cfg.libvirt.uris, exporter = ?cfg.export.exporter, "agent starting");

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut first_syncs = Vec::new();
        for (i, uri) in cfg.libvirt.uris.iter().enumerate() {
            let id = i as ConnId + 1;
            shared.telemetry.add_connection(id, uri, None);
            let (tx, rx) = oneshot::channel();
            first_syncs.push(rx);
            let spec = ConnSpec {
                id,
                label: uri.clone(),
                uri: uri.clone(),
                fallback_uri: None,
                pod_uid: None,
            };
            tasks.spawn(connection::supervise(
                Arc::clone(&shared),
                spec,
                stop_rx.clone(),
                Some(tx),
            ));
        }

        if cfg.libvirt.discover.enabled {
            let first_id = cfg.libvirt.uris.len() as ConnId + 1;
            tasks.spawn(crate::discovery::run(
                Arc::clone(&shared),
                stop_rx.clone(),
                first_id,
            ));
        }

        // Node KVM capability: checked now and at every resync interval, off the event path.
        let kvm_push = shared.push.clone();
        tasks.spawn(crate::node::watch_kvm(
            Arc::clone(&shared.telemetry),
            move || kvm_push.push(),
            cfg.libvirt.resync_interval,
            stop_rx.clone(),
        ));

        // Readiness: after every explicit connection finished its first sync (or failed it).
        let ready_push = shared.push.clone();
        tasks.spawn(async move {
            for rx in first_syncs {
                let _ = rx.await;
            }
            ready_push.push_now();
            tracing::info!("initial sync done");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        });
        if let Some(period) = watchdog_period() {
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            // Only vouch for liveness while the libvirt event loop is alive.
                            if event_loop::is_running() {
                                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                            }
                        }
                        _ = stop.changed() => break,
                    }
                }
            });
        }

        shutdown.await;
        tracing::info!("shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let deadline = cfg.export.shutdown_timeout;
        let _ = stop_tx.send(true);
        let join_all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(deadline / 2, join_all).await.is_err() {
            tracing::warn!("connection tasks did not stop within {:?}", deadline / 2);
        }
        if let Some(t) = export_task {
            t.abort();
            let _ = t.await;
        }
        let stopped =
            tokio::task::spawn_blocking(move || event_loop::stop(Duration::from_millis(500)));
        let _ = tokio::time::timeout(Duration::from_millis(600), stopped).await;
        exporter.shutdown(deadline / 2).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Half of systemd's watchdog interval, when the unit sets `WatchdogSec=`.
fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// One-shot: connect to every configured URI, list and classify, and return what would be
/// exported now (the `inventory` command). Connection failures are reported per URI.
pub async fn inventory_once(
    cfg: &AgentConfig,
) -> Result<(Arc<Snapshot>, Vec<(String, String)>), AgentError> {
    event_loop::ensure_running()?;
    let mut inv = Inventory::new();
    let mut failures = Vec::new();
    let wants = wants(cfg);
    for (i, uri) in cfg.libvirt.uris.iter().enumerate() {
        let id = i as ConnId + 1;
        let u = uri.clone();
        let timeout = cfg.libvirt.fetch_timeout;
        let res = tokio::time::timeout(
            timeout * 4,
            tokio::task::spawn_blocking(move || {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                let w = libvirt::open(&u, None, tx)?;
                let mut listing = libvirt::list_active(&w)?;
                let items: Vec<_> = listing
                    .domains
                    .into_iter()
                    .map(|d| {
                        let handle = listing.handles.remove(&d.uuid);
                        let o = match libvirt::fetch_domain(&w, &d, handle, wants) {
                            Fetched::Facts(f) => FetchOutcome::Facts(f),
                            Fetched::Gone => FetchOutcome::Gone,
                            Fetched::LibvirtError(_) | Fetched::ParseError(_) => {
                                FetchOutcome::Failed
                            }
                        };
                        (d, Some(o))
                    })
                    .collect();
                drop(w);
                Ok::<_, libvirt::LibvirtError>(items)
            }),
        )
        .await;
        match res {
            Ok(Ok(Ok(items))) => {
                let token = inv.begin_resync(id);
                inv.finish_resync(token, items);
            }
            Ok(Ok(Err(e))) => failures.push((uri.clone(), e.to_string())),
            Ok(Err(e)) => failures.push((uri.clone(), e.to_string())),
            Err(_) => failures.push((uri.clone(), "timed out".to_string())),
        }
    }
    let _ = tokio::task::spawn_blocking(|| event_loop::stop(Duration::from_millis(500))).await;
    Ok((inv.snapshot(), failures))
}
