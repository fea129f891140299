//! The agent's own counters and per-connection state, read by the self-metric callbacks.
//! Plain atomics, and a small map behind a mutex held for microseconds whose copy for the
//! collection callbacks is shared (`Arc`) and rebuilt only after a change: a collection at 1,000
//! connections clones nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::discovery::paths::Rejection;
use crate::inventory::{ConnId, Lifecycle};

/// Kinds of XML errors counted by `virt_hypervisor_agent_xml_errors`.
pub const XML_ERROR_KINDS: [&str; 3] = ["fetch", "timeout", "parse"];

/// What the exporter knows about one connection. Strings are shared (`Arc<str>`) so that
/// attribute values built from them are reference-counted, not copied, at every collection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnMeta {
    /// `connection` attribute value (the URI or socket path).
    pub label: Arc<str>,
    pub up: bool,
    pub reconnects: u64,
    /// Lifecycle events dropped on a full backlog (a burst of drops triggers one resync).
    pub dropped_events: u64,
    pub last_sync: Option<Duration>,
    pub hypervisor_version: Option<Arc<str>>,
    pub pod_uid: Option<Arc<str>>,
    /// Most domains exported for this connection (`libvirt.discover.max_domains_per_socket`
    /// for a discovered launcher socket; `None`: no bound of its own).
    pub domain_limit: Option<usize>,
}

/// Every connection's state, as the collection callbacks read it.
pub type ConnTable = BTreeMap<ConnId, ConnMeta>;

#[derive(Debug, Default)]
struct Conns {
    table: ConnTable,
    /// The shared copy handed out by [`Telemetry::connection_meta`]; dropped on every change.
    shared: Option<Arc<ConnTable>>,
}

/// Shared counters.
#[derive(Debug, Default)]
pub struct Telemetry {
    events: [AtomicU64; Lifecycle::ALL.len()],
    xml_errors: [AtomicU64; XML_ERROR_KINDS.len()],
    rejected: [AtomicU64; Rejection::ALL.len()],
    conns: Mutex<Conns>,
    /// Node KVM capability: 0 not checked yet, 1 unavailable, 2 available.
    kvm: AtomicU8,
    /// Node MSHV capability (`/dev/mshv`), encoded like `kvm`.
    mshv: AtomicU8,
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

    /// Count a discovered path that failed the socket checks.
    pub fn count_rejection(&self, why: Rejection) {
        if let Some(i) = Rejection::ALL.iter().position(|r| *r == why) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejections(&self) -> Vec<(&'static str, u64)> {
        Rejection::ALL
            .iter()
            .zip(self.rejected.iter())
            .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn xml_errors(&self) -> Vec<(&'static str, u64)> {
        XML_ERROR_KINDS
            .iter()
            .zip(self.xml_errors.iter())
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Change the table (and invalidate the shared copy).
    fn with_conns<R>(&self, f: impl FnOnce(&mut ConnTable) -> R) -> R {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.shared = None;
        f(&mut c.table)
    }

    pub fn add_connection(
        &self,
        id: ConnId,
        label: &str,
        pod_uid: Option<String>,
        domain_limit: Option<usize>,
    ) {
        self.with_conns(|c| {
            c.insert(
                id,
                ConnMeta {
                    label: Arc::from(label),
                    pod_uid: pod_uid.map(Arc::from),
                    domain_limit,
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
                if let Some(v) = hypervisor_version {
                    m.hypervisor_version = Some(Arc::from(v));
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

    /// Count lifecycle events of connection `id` dropped on a full backlog.
    pub fn count_dropped_events(&self, id: ConnId, n: u64) {
        if n == 0 {
            return;
        }
        self.with_conns(|c| {
            if let Some(m) = c.get_mut(&id) {
                m.dropped_events += n;
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

    /// Record the result of the node KVM check.
    pub fn set_kvm_available(&self, available: bool) {
        self.kvm
            .store(if available { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Whether this node can run KVM guests; `None` until the first check finished.
    pub fn kvm_available(&self) -> Option<bool> {
        match self.kvm.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v == 2),
        }
    }

    /// Record the result of the node MSHV check.
    pub fn set_mshv_available(&self, available: bool) {
        self.mshv
            .store(if available { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Whether this node can run guests on the Microsoft Hypervisor; `None` until the first
    /// check finished.
    pub fn mshv_available(&self) -> Option<bool> {
        match self.mshv.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v == 2),
        }
    }

    /// Every connection's state: a shared copy, rebuilt only after a change, so repeated calls
    /// without a change return the same `Arc` (callers may use `Arc::ptr_eq` to skip work).
    pub fn connection_meta(&self) -> Arc<ConnTable> {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = &c.shared {
            return Arc::clone(s);
        }
        let s = Arc::new(c.table.clone());
        c.shared = Some(Arc::clone(&s));
        s
    }
}
