//! The agent's own counters and per-connection state, read by the self-metric callbacks.
//! Plain atomics and a small map behind a mutex held for microseconds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::inventory::{ConnId, Lifecycle};

/// Kinds of XML errors counted by `virt_hypervisor_agent_xml_errors`.
pub const XML_ERROR_KINDS: [&str; 3] = ["fetch", "timeout", "parse"];

/// What the exporter knows about one connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnMeta {
    /// `connection` attribute value (the URI).
    pub label: String,
    pub up: bool,
    pub reconnects: u64,
    pub last_sync: Option<Duration>,
    pub hypervisor_version: Option<String>,
    pub pod_uid: Option<String>,
}

/// Shared counters.
#[derive(Debug, Default)]
pub struct Telemetry {
    events: [AtomicU64; Lifecycle::ALL.len()],
    xml_errors: [AtomicU64; XML_ERROR_KINDS.len()],
    conns: Mutex<BTreeMap<ConnId, ConnMeta>>,
}

impl Telemetry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn count_event(&self, ev: Lifecycle) {
        if let Some(i) = Lifecycle::ALL.iter().position(|e| *e == ev) {
            self.events[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn events(&self, ev: Lifecycle) -> u64 {
        Lifecycle::ALL
            .iter()
            .position(|e| *e == ev)
            .map(|i| self.events[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Count an XML error of `kind` (one of [`XML_ERROR_KINDS`]).
    pub fn count_xml_error(&self, kind: &str) {
        if let Some(i) = XML_ERROR_KINDS.iter().position(|k| *k == kind) {
            self.xml_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn xml_errors(&self) -> Vec<(&'static str, u64)> {
        XML_ERROR_KINDS
            .iter()
            .zip(self.xml_errors.iter())
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }

    fn with_conns<R>(&self, f: impl FnOnce(&mut BTreeMap<ConnId, ConnMeta>) -> R) -> R {
        f(&mut self.conns.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn add_connection(&self, id: ConnId, label: &str, pod_uid: Option<String>) {
        self.with_conns(|c| {
            c.insert(
                id,
                ConnMeta {
                    label: label.to_string(),
                    pod_uid,
                    ..ConnMeta::default()
                },
            );
        })
    }

    pub fn remove_connection(&self, id: ConnId) {
        self.with_conns(|c| {
            c.remove(&id);
        })
    }

    pub fn set_up(&self, id: ConnId, up: bool, hypervisor_version: Option<String>) {
        self.with_conns(|c| {
            if let Some(m) = c.get_mut(&id) {
                m.up = up;
                if hypervisor_version.is_some() {
                    m.hypervisor_version = hypervisor_version;
                }
            }
        })
    }

    pub fn count_reconnect(&self, id: ConnId) {
        self.with_conns(|c| {
            if let Some(m) = c.get_mut(&id) {
                m.reconnects += 1;
            }
        })
    }

    pub fn set_last_sync(&self, id: ConnId, d: Duration) {
        self.with_conns(|c| {
            if let Some(m) = c.get_mut(&id) {
                m.last_sync = Some(d);
            }
        })
    }

    /// A copy of every connection's state.
    pub fn connection_meta(&self) -> BTreeMap<ConnId, ConnMeta> {
        self.with_conns(|c| c.clone())
    }
}
