//! Wiring: the event loop, the registry of connections (explicit URIs, and launcher sockets as
//! discovery reports them), the exporter and its push-on-change task, readiness and watchdog
//! notifications, and an orderly shutdown within one deadline.

pub mod call;
pub mod connection;
pub mod once;
pub mod registry;
pub mod reload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::discovery::{self, paths, Change};
use crate::domain::Wants;
use crate::export::{ExportError, Exporter};
use crate::health::{self, Health};
use crate::inventory::ConnId;
use crate::source::event_loop::{self, EventLoop, EventLoopError};
use crate::state::{Owner, Store};
use crate::tasks::{drain_by, Stop};
use registry::{NewConnection, Registry};

/// Launcher-socket changes discovery may queue before it waits for the agent.
const DISCOVERY_BACKLOG: usize = 64;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("starting the libvirt event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("setting up export")]
    Export(#[from] ExportError),
    #[error("health.listen: cannot listen on {addr}")]
    Health {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// State shared by every task.
#[derive(Debug)]
pub struct Shared {
    pub cfg: Arc<AgentConfig>,
    pub node: String,
    /// The one door through which the agent's state changes.
    pub owner: Owner,
    pub wants: Wants,
}

/// What the XML parser must read for the configured attributes.
pub fn wants(cfg: &AgentConfig) -> Wants {
    let a = &cfg.metric.attributes;
    Wants {
        os: a.machine || a.arch,
        emulator: a.emulator,
    }
}

/// Run the daemon until `shutdown` resolves, applying every configuration received on `reloads`
/// (see [`reload`]), then stop everything within the configured deadline, flushing a last export.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
    reloads: reload::Reloads,
) -> Result<(), AgentError> {
    Agent::new(cfg)?.serve(shutdown, Some(reloads)).await
}

/// One shutdown deadline, split once: the connections (and discovery) close by 40 % of it, the
/// event loop stops by 50 %, and the last export and the meter provider's shutdown get the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShutdownPlan {
    connections: Instant,
    event_loop: Instant,
    end: Instant,
}

impl ShutdownPlan {
    fn new(start: Instant, total: Duration) -> Self {
        Self {
            connections: start + total * 2 / 5,
            event_loop: start + total / 2,
            end: start + total,
        }
    }
}

/// A configured agent, before and while it runs.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    exporter: Exporter,
    events: EventLoop,
}

impl Agent {
    /// Start the libvirt event loop and build the export pipeline. Must be called inside a
    /// multi-thread tokio runtime. Opens no libvirt connection yet.
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        // Acquired first (before any connection opens) and released on every error path.
        let events = event_loop::acquire()?;
        let cfg = Arc::new(cfg);
        let node = crate::node::name(&cfg);
        let owner = Owner::new();
        let exporter = Exporter::start(&cfg, &node, owner.store())?;
        let shared = Arc::new(Shared {
            cfg: Arc::clone(&cfg),
            node,
            owner,
            wants: wants(&cfg),
        });
        Ok(Self {
            shared,
            exporter,
            events,
        })
    }

    /// A reader of the agent's state: the inventory's snapshots, the connections, the counters
    /// (for tests and embedding).
    pub fn store(&self) -> Store {
        self.shared.owner.store()
    }

    /// Run until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        self.serve(shutdown, None).await
    }

    /// Run until `shutdown` resolves, applying the configurations received on `reloads`.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        reloads: Option<reload::Reloads>,
    ) -> Result<(), AgentError> {
        let Agent {
            shared,
            exporter,
            events,
        } = self;
        let cfg = Arc::clone(&shared.cfg);
        // Bound first: a port that is taken is a configuration error, reported before anything
        // else starts.
        let health_listener = match cfg.health.addr() {
            Some(addr) => Some((
                addr,
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Health { addr, source })?,
            )),
            None => None,
        };
        let health = Arc::new(Health::new());
        let export_task = exporter.spawn_export_task(cfg.export.debounce);
        tracing::info!(node = %shared.node, uris = ?cfg.libvirt.uris, exporter = ?cfg.export.exporter, "agent starting");

        let (stop, stop_rx) = Stop::new();
        let mut registry = Registry::new(Arc::clone(&shared));
        let mut helpers = JoinSet::new();
        let mut first_syncs = Vec::new();
        // The explicit connections by URI, for reloads.
        let mut explicit: HashMap<String, ConnId> = HashMap::new();
        for uri in &cfg.libvirt.uris {
            let (tx, rx) = oneshot::channel();
            first_syncs.push(rx);
            explicit.insert(uri.clone(), registry.add(NewConnection::uri(uri), Some(tx)));
        }
        let mut running = (*cfg).clone();
        let mut reloads = reloads.unwrap_or_else(reload::Reloads::none);
        let (changes_tx, mut changes) = mpsc::channel(DISCOVERY_BACKLOG);
        if cfg.libvirt.discover.enabled {
            let discover = cfg.libvirt.discover.clone();
            helpers.spawn(discovery::run(discover, changes_tx, stop_rx.clone()));
        } else {
            drop(changes_tx);
        }

        // Node KVM and MSHV capabilities: checked now and at every resync interval, off the
        // event path.
        helpers.spawn(crate::node::watch_kvm(
            crate::node::kvm::KVM_DEVICE.into(),
            crate::node::kvm::KVM_SYSFS_DEV.into(),
            shared.owner.clone(),
            cfg.libvirt.resync_interval,
            stop_rx.clone(),
        ));
        helpers.spawn(crate::node::watch_mshv(
            crate::node::mshv::MSHV_DEVICE.into(),
            shared.owner.clone(),
            cfg.libvirt.resync_interval,
            stop_rx.clone(),
        ));

        if let Some((addr, listener)) = health_listener {
            tracing::info!(%addr, "health endpoint listening (GET /livez, /readyz)");
            helpers.spawn(health::heartbeat(Arc::clone(&health), stop_rx.clone()));
            helpers.spawn(health::serve(
                listener,
                Arc::clone(&health),
                stop_rx.clone(),
            ));
        }

        // Readiness: after every explicit connection finished its first sync (or failed it).
        // Says what happened: a connection that could not be opened is not "synced", and a
        // stop before the first sync ends the wait without announcing anything.
        let ready_owner = shared.owner.clone();
        let ready_stop = stop_rx.clone();
        let ready_health = Arc::clone(&health);
        helpers.spawn(async move {
            let total = first_syncs.len();
            let mut synced = 0;
            for rx in first_syncs {
                synced += usize::from(rx.await.unwrap_or(false));
            }
            if ready_stop.deadline().is_some() {
                return;
            }
            ready_owner.publish_now();
            ready_health.set_ready();
            if synced == total {
                tracing::info!(connections = total, "initial sync done");
            } else {
                tracing::warn!(
                    connections = total,
                    synced,
                    unavailable = total - synced,
                    "initial sync done without every connection; the unavailable ones are retried"
                );
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        });
        if let Some(period) = watchdog_period() {
            let mut stop = stop_rx.clone();
            event_loop::enable_heartbeat();
            helpers.spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            // Only vouch for liveness while the libvirt event loop is alive and
                            // dispatching (the same check as the health endpoint's /livez).
                            if health::loops_alive() {
                                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                            }
                        }
                        _ = stop.stopped() => break,
                    }
                }
            });
        }

        let mut launchers: HashMap<PathBuf, ConnId> = HashMap::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(change) = changes.recv() => match change {
                    Change::Appeared(path) => {
                        let limit = cfg.libvirt.discover.max_domains_per_socket;
                        let id = registry.add(launcher(&path, limit), None);
                        launchers.insert(path, id);
                    }
                    Change::Vanished(path) => {
                        if let Some(id) = launchers.remove(&path) {
                            tracing::info!(socket = %path.display(), "launcher socket removed; dropping its connection and domains");
                            registry.remove(id);
                        }
                    }
                    Change::Rejected(path, why) => {
                        shared.owner.telemetry().count_rejection(why);
                        tracing::warn!(
                            socket = %path.display(),
                            reason = why.as_str(),
                            owners = ?cfg.libvirt.discover.socket_owners,
                            "not connecting to a path that matches a discovery glob: it must be a \
                             unix socket, reached without symlinks below libvirt.discover.kubelet_root, \
                             and owned by a uid in libvirt.discover.socket_owners"
                        );
                    }
                },
                Some(new) = reloads.configs.recv() => {
                    running = reload::apply(&running, new, &reloads, &exporter, &mut registry, &mut explicit);
                }
                _ = registry.reap() => {}
            }
        }

        tracing::info!("shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let plan = ShutdownPlan::new(Instant::now(), running.export.shutdown_timeout);
        stop.stop(plan.connections);
        tokio::join!(
            registry.shutdown(plan.connections),
            drain_by(&mut helpers, plan.connections)
        );
        if let Some(t) = export_task {
            t.abort();
            let _ = t.await;
        }
        let by = plan.event_loop;
        let released = tokio::task::spawn_blocking(move || {
            events.release(by.saturating_duration_since(Instant::now()))
        });
        let _ = tokio::time::timeout_at(by.into(), released).await;
        exporter
            .shutdown(plan.end.saturating_duration_since(Instant::now()))
            .await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// A discovered launcher socket as a connection: labelled by its real path, opened through a
/// short alias when the path is too long for a unix socket address.
fn launcher(path: &Path, domain_limit: usize) -> NewConnection {
    let (label, _) = paths::socket_uris(path);
    let (dir, connect) = discovery::connect_path(path);
    let (uri, fallback) = paths::socket_uris(&connect);
    let pod_uid = paths::pod_uid(path);
    tracing::info!(socket = %path.display(), pod_uid = ?pod_uid, uri = %uri, "launcher socket found");
    NewConnection {
        label,
        uri,
        fallback_uri: Some(fallback),
        pod_uid,
        domain_limit: Some(domain_limit),
        dir,
    }
}

/// Half of systemd's watchdog interval, when the unit sets `WatchdogSec=`.
fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExporterKind;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_event_loop_is_released_when_export_setup_fails() {
        // The only test of this binary that starts the event loop, so no other user holds it.
        let mut cfg = AgentConfig::default();
        cfg.libvirt.uris = Vec::new();
        cfg.export.exporter = ExporterKind::None;
        let agent = Agent::new(cfg.clone()).expect("an agent without export builds");
        assert!(event_loop::is_running());
        drop(agent);
        assert!(
            !event_loop::is_running(),
            "dropping the agent releases the loop"
        );

        cfg.export.exporter = ExporterKind::Otlp;
        cfg.export.endpoint = Some("https://127.0.0.1:4317".into());
        cfg.export.tls.ca_file = Some("/nonexistent/vha-test-ca.pem".into());
        let failed = Agent::new(cfg);
        assert!(matches!(failed, Err(AgentError::Export(_))), "{failed:?}");
        assert!(
            !event_loop::is_running(),
            "a failed Agent::new left a user of the event loop behind"
        );
    }

    #[test]
    fn the_shutdown_deadline_is_split_once_and_never_exceeded() {
        let start = Instant::now();
        for total in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_secs(2),
        ] {
            let plan = ShutdownPlan::new(start, total);
            assert!(start <= plan.connections);
            assert!(plan.connections <= plan.event_loop);
            assert!(plan.event_loop <= plan.end);
            assert_eq!(plan.end, start + total);
        }
    }
}
