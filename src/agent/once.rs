//! The `inventory` command: connect to every configured URI at once, run one resync on each (the
//! same as the daemon's), and show what would be exported now, as a table or JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::call::CallError;
use super::registry::NewConnection;
use super::{connection, Agent, AgentError};
use crate::config::{AgentConfig, ExporterKind};
use crate::export::points::{Fate, InfoPoints};
use crate::inventory::Snapshot;
use crate::logging::escape_control as esc;
use crate::state::ConnTable;

/// What one inventory run found.
#[derive(Debug)]
pub struct InventoryOnce {
    pub snapshot: Arc<Snapshot>,
    /// Every connection, as the owner registered it (its `connection` label, by id).
    pub connections: Arc<ConnTable>,
    /// URIs that could not be read, with why.
    pub failures: Vec<(String, String)>,
}

/// Run it. All of it is bounded by one deadline, three times `fetch_timeout` (open, list, read);
/// failures are reported per URI.
pub async fn inventory_once(cfg: &AgentConfig) -> Result<InventoryOnce, AgentError> {
    let mut quiet = cfg.clone();
    quiet.export.exporter = ExporterKind::None;
    let agent = Agent::new(quiet)?;
    let total = cfg.libvirt.fetch_timeout * 3;
    let by = Instant::now() + total;
    let mut syncs = JoinSet::new();
    for (id, uri) in (1..).zip(&cfg.libvirt.uris) {
        let (spec, _) = NewConnection::uri(uri).admit(id, &agent.shared.owner);
        let shared = Arc::clone(&agent.shared);
        syncs.spawn(async move {
            let uri = spec.uri.clone();
            (uri, connection::sync_once(shared, spec, by).await)
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = syncs.join_next().await {
        match done {
            Ok((_, Ok(()))) => {}
            Ok((uri, Err(CallError::Stopped { what }))) => {
                failures.push((uri, format!("{what} did not finish within {total:?}")))
            }
            Ok((uri, Err(e))) => failures.push((uri, e.to_string())),
            Err(e) => tracing::error!(error = %e, "inventory task failed"),
        }
    }
    failures.sort();
    let store = agent.store();
    let (snapshot, connections) = (store.snapshot(), store.connections());
    let Agent {
        exporter, events, ..
    } = agent;
    exporter.shutdown(Duration::from_millis(100)).await;
    let _ = tokio::task::spawn_blocking(move || events.release(Duration::from_millis(500))).await;
    Ok(InventoryOnce {
        snapshot,
        connections,
        failures,
    })
}

/// The command's output: what goes to stdout, and the warnings for stderr.
#[derive(Debug)]
pub struct Rendered {
    pub out: String,
    pub warnings: Vec<String>,
}

impl InventoryOnce {
    /// Show the domains as the gauge would make of them on `node`: shared attribute sets and
    /// the cardinality limit (hypervisor_version is not known here, so with that attribute on,
    /// domains that differ only in it are shown as sharing a series).
    pub fn render(
        &self,
        cfg: &AgentConfig,
        node: &str,
        json: bool,
    ) -> serde_json::Result<Rendered> {
        let snap = &self.snapshot;
        let mut points = InfoPoints::new(node, cfg.metric.attributes.clone())
            .with_cardinality_limit(cfg.metric.cardinality_limit)
            .without_logging();
        points
            .refresh(Arc::clone(snap), Arc::clone(&self.connections))
            .for_each(drop);
        let fates = points.fates();
        let stats = points.stats();
        let mut out = String::new();
        if json {
            let rows: Vec<serde_json::Value> = snap
                .domains
                .iter()
                .zip(&fates)
                .map(|(d, fate)| {
                    serde_json::json!({
                        "namespace": d.identity.namespace,
                        "name": d.identity.name,
                        "node": node,
                        "hypervisor_type": d.hypervisor_type.as_str(),
                        "domain": d.domain_name,
                        "uuid": d.uuid,
                        "id": d.id,
                        "uri": self.connections.get(&d.conn).map(|m| &*m.label),
                        "series": match fate {
                            Fate::Exported => "own",
                            Fate::Shared => "shared",
                            Fate::OverLimit => "over_limit",
                            Fate::OverConnectionLimit => "over_connection_limit",
                        },
                    })
                })
                .collect();
            out = serde_json::to_string_pretty(&rows)? + "\n";
        } else {
            out += &format!(
                "{:<20} {:<32} {:<16} {:<10} DOMAIN\n",
                "NAMESPACE", "NAME", "NODE", "HYPERVISOR"
            );
            for (d, fate) in snap.domains.iter().zip(&fates) {
                // Names come from whoever defined the domain: one row is always one line.
                out += &format!(
                    "{:<20} {:<32} {:<16} {:<10} {}{}\n",
                    esc(d.identity.namespace.as_deref().unwrap_or("-")),
                    esc(&d.identity.name),
                    esc(node),
                    d.hypervisor_type.as_str(),
                    esc(&d.domain_name),
                    match fate {
                        Fate::Exported => "",
                        Fate::Shared => "  (same series as a domain above)",
                        Fate::OverLimit => "  (over metric.cardinality_limit: not exported)",
                        Fate::OverConnectionLimit => {
                            "  (over libvirt.discover.max_domains_per_socket: not exported)"
                        }
                    }
                );
            }
            out += &format!(
                "{} active domain(s), {} series{}\n",
                stats.domains,
                stats.sets,
                if stats.over_limit > 0 {
                    format!(" ({} beyond metric.cardinality_limit)", stats.over_limit)
                } else {
                    String::new()
                }
            );
        }
        let mut warnings = Vec::new();
        if stats.collisions > 0 {
            warnings.push(format!(
                "{} domain(s) share an attribute set with another domain and are exported as one series; \
                 enable metric.attributes.uuid or pod_uid to tell them apart",
                stats.collisions
            ));
        }
        if stats.over_limit > 0 {
            warnings.push(format!(
                "{} of {} attribute sets are beyond metric.cardinality_limit ({}): \
                 they would be exported only as one otel.metric.overflow=true point",
                stats.over_limit, stats.sets, cfg.metric.cardinality_limit
            ));
        }
        Ok(Rendered { out, warnings })
    }
}
