//! SIGHUP: a new configuration applied to the running agent without dropping a series. The
//! explicit connections (`libvirt.uris`) are added and removed through the registry (the others
//! keep running, with their domains), and the export settings are swapped at the next export.
//! Every other key is fixed at start: a reload that changes one says so, and keeps the running
//! value until the agent restarts.

use std::collections::HashMap;

use super::registry::{NewConnection, Registry};
use crate::config::diff::changed_keys;
use crate::config::AgentConfig;
use crate::export::Exporter;
use crate::inventory::ConnId;

/// Export keys a reload applies (`export.exporter` is fixed at start: it decides whether the
/// instruments are registered at all).
const EXPORT_KEYS: [&str; 9] = [
    "export.protocol",
    "export.endpoint",
    "export.headers",
    "export.timeout",
    "export.compression",
    "export.interval",
    "export.debounce",
    "export.shutdown_timeout",
    "export.tls",
];

/// Whether this process can still do everything a configuration needs; `Err` says what it
/// cannot.
pub type Allowed = Box<dyn Fn(&AgentConfig) -> Result<(), String> + Send>;

/// Where reloaded configurations come from, and what the process may apply.
pub struct Reloads {
    pub configs: tokio::sync::mpsc::Receiver<AgentConfig>,
    /// Whether this process can still do everything a configuration needs (its Landlock
    /// confinement was set at start, src/confine.rs); `Err` says what it cannot.
    pub allowed: Allowed,
}

impl std::fmt::Debug for Reloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloads").finish_non_exhaustive()
    }
}

impl Reloads {
    /// No reloads (the sender is dropped at once).
    pub fn none() -> Self {
        Self {
            configs: tokio::sync::mpsc::channel(1).1,
            allowed: Box::new(|_| Ok(())),
        }
    }
}

/// Export keys that only set when the export task exports (the transport stays as it is).
const TIMING_KEYS: [&str; 3] = [
    "export.interval",
    "export.debounce",
    "export.shutdown_timeout",
];

/// What a reload changes, decided from the running and the new configuration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// URIs to connect to.
    pub add: Vec<String>,
    /// URIs to drop (with their domains).
    pub remove: Vec<String>,
    /// `libvirt.uris` changed (even when only their order did).
    pub uris: bool,
    /// Export settings changed.
    pub export: bool,
    /// Of those, settings of the transport (endpoint, protocol, headers, timeout, compression,
    /// TLS): the transport is built anew, its TLS files read again.
    pub transport: bool,
    /// Changed keys that take effect only at restart.
    pub at_restart: Vec<String>,
}

impl ReloadPlan {
    pub fn new(running: &AgentConfig, new: &AgentConfig) -> Self {
        let mut plan = ReloadPlan::default();
        for key in changed_keys(running, new) {
            if key == "libvirt.uris" {
                plan.uris = true;
                let (old, now) = (&running.libvirt.uris, &new.libvirt.uris);
                plan.add = now.iter().filter(|u| !old.contains(u)).cloned().collect();
                plan.remove = old.iter().filter(|u| !now.contains(u)).cloned().collect();
            } else if EXPORT_KEYS
                .iter()
                .any(|k| key == *k || key.starts_with(&format!("{k}.")))
            {
                plan.export = true;
                plan.transport |= !TIMING_KEYS.contains(&key.as_str());
            } else {
                plan.at_restart.push(key);
            }
        }
        plan
    }

    pub fn is_empty(&self) -> bool {
        *self == ReloadPlan::default()
    }

    /// The running configuration once this plan is applied: `running`, with the URIs and the
    /// export settings taken from `new`.
    pub fn applied(&self, running: &AgentConfig, new: &AgentConfig) -> AgentConfig {
        let mut cfg = running.clone();
        if self.uris {
            cfg.libvirt.uris = new.libvirt.uris.clone();
        }
        if self.export {
            cfg.export = new.export.clone();
            cfg.export.exporter = running.export.exporter;
        }
        cfg
    }
}

/// Apply `new` to the running agent (its explicit connections by URI in `explicit`); returns
/// the configuration now running. Export settings that cannot be applied (a TLS file that does
/// not load) reject the whole reload: the running configuration stays as it was.
pub fn apply(
    running: &AgentConfig,
    new: AgentConfig,
    reloads: &Reloads,
    exporter: &Exporter,
    registry: &mut Registry,
    explicit: &mut HashMap<String, ConnId>,
) -> AgentConfig {
    let plan = ReloadPlan::new(running, &new);
    if plan.is_empty() {
        tracing::info!("configuration reloaded: nothing changed");
        return running.clone();
    }
    let applied = plan.applied(running, &new);
    // The new file was valid on its own; what would run is a mix of it and the running
    // configuration (discovery, say, keeps its running value), which must be valid too: no URI
    // and discovery still off would leave the agent watching nothing.
    if let Err(e) = applied.validate() {
        tracing::error!(
            "configuration not reloaded: with the keys that apply only at restart kept as they run, \
             it would be invalid: {}; the running configuration is kept",
            crate::logging::error_chain(&e)
        );
        return running.clone();
    }
    if let Err(needs) = (reloads.allowed)(&applied) {
        tracing::error!(
            "configuration not reloaded: it needs {needs}, which the agent's Landlock confinement \
             (set at start) does not allow; restart the agent to apply it. The running configuration is kept"
        );
        return running.clone();
    }
    if plan.export {
        if let Err(e) = exporter.reconfigure(&applied, plan.transport) {
            tracing::error!(
                error = %crate::logging::error_chain(&e),
                "configuration not reloaded: the new export settings do not work; the running configuration is kept"
            );
            return running.clone();
        }
    }
    for uri in &plan.remove {
        if let Some(id) = explicit.remove(uri) {
            registry.remove(id);
        }
    }
    for uri in &plan.add {
        explicit.insert(uri.clone(), registry.add(NewConnection::uri(uri), None));
    }
    tracing::info!(
        added = ?plan.add,
        removed = ?plan.remove,
        export_settings = plan.export,
        "configuration reloaded"
    );
    if !plan.at_restart.is_empty() {
        tracing::warn!(
            keys = ?plan.at_restart,
            "configuration reloaded, but these changed keys take effect only when the agent restarts; their running values are kept"
        );
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExporterKind;
    use std::time::Duration;

    fn with_uris(uris: &[&str]) -> AgentConfig {
        let mut c = AgentConfig::default();
        c.libvirt.uris = uris.iter().map(|u| u.to_string()).collect();
        c
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let c = with_uris(&["qemu:///system"]);
        assert!(ReloadPlan::new(&c, &c.clone()).is_empty());
    }

    #[test]
    fn uris_are_added_and_removed_and_the_others_kept() {
        let old = with_uris(&["test:///a", "test:///b"]);
        let new = with_uris(&["test:///b", "test:///c"]);
        let plan = ReloadPlan::new(&old, &new);
        assert_eq!(plan.add, ["test:///c"]);
        assert_eq!(plan.remove, ["test:///a"]);
        assert!(plan.uris);
        assert!(!plan.export);
        assert!(plan.at_restart.is_empty());
        assert_eq!(plan.applied(&old, &new).libvirt.uris, new.libvirt.uris);
    }

    #[test]
    fn export_settings_are_applied_and_the_rest_waits_for_a_restart() {
        let old = with_uris(&["test:///a"]);
        let mut new = old.clone();
        new.export.endpoint = Some("http://127.0.0.1:4318".into());
        new.export.tls.ca_file = Some("/etc/ssl/ca.pem".into());
        new.export.interval = Some(Duration::from_secs(5));
        new.export.exporter = ExporterKind::Stdout;
        new.metric.attributes.uuid = true;
        new.libvirt.fetch_timeout = Duration::from_secs(9);
        let plan = ReloadPlan::new(&old, &new);
        assert!(plan.export && plan.transport);
        assert!(plan.add.is_empty() && plan.remove.is_empty() && !plan.uris);
        assert_eq!(
            plan.at_restart,
            [
                "export.exporter",
                "libvirt.fetch_timeout",
                "metric.attributes.uuid"
            ]
        );
        let applied = plan.applied(&old, &new);
        assert_eq!(applied.export.endpoint, new.export.endpoint);
        assert_eq!(applied.export.tls, new.export.tls);
        assert_eq!(applied.export.exporter, old.export.exporter);
        assert_eq!(applied.metric, old.metric);
        assert_eq!(applied.libvirt.fetch_timeout, old.libvirt.fetch_timeout);
    }

    #[test]
    fn timing_alone_keeps_the_transport() {
        let old = with_uris(&["test:///a"]);
        let mut new = old.clone();
        new.export.interval = Some(Duration::from_secs(5));
        new.export.debounce = Duration::from_millis(10);
        let plan = ReloadPlan::new(&old, &new);
        assert!(plan.export && !plan.transport);
        new.export.headers.insert("x-tenant".into(), "t".into());
        assert!(ReloadPlan::new(&old, &new).transport);
    }

    #[test]
    fn what_would_run_is_what_is_validated() {
        // The new file is valid (discovery on, no URI), but discovery only starts at a restart:
        // applied, the agent would watch nothing.
        let old = with_uris(&["test:///a"]);
        let mut new = with_uris(&[]);
        new.libvirt.discover.enabled = true;
        assert!(new.validate().is_ok());
        let plan = ReloadPlan::new(&old, &new);
        assert_eq!(plan.remove, ["test:///a"]);
        assert!(plan
            .at_restart
            .contains(&"libvirt.discover.enabled".to_string()));
        assert!(plan.applied(&old, &new).validate().is_err());
    }
}
