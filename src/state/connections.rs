//! Every connection's state as the export reads it: a small map, changed by the owner (src/state/mod.rs)
//! and handed to readers as a shared copy that is rebuilt only after a change, so a collection at
//! 1,000 connections clones nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::inventory::ConnId;

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

/// The table and its shared copy.
#[derive(Debug, Default)]
pub(super) struct Conns {
    table: ConnTable,
    /// The copy handed out by [`Conns::shared`]; dropped on every change.
    shared: Option<Arc<ConnTable>>,
}

impl Conns {
    /// Change the table (and drop the shared copy).
    pub(super) fn change<R>(&mut self, f: impl FnOnce(&mut ConnTable) -> R) -> R {
        self.shared = None;
        f(&mut self.table)
    }

    /// Change one connection's entry, if it is still there.
    pub(super) fn change_one(&mut self, id: ConnId, f: impl FnOnce(&mut ConnMeta)) {
        self.change(|t| {
            if let Some(m) = t.get_mut(&id) {
                f(m)
            }
        })
    }

    /// A shared copy, rebuilt only after a change: repeated calls without a change return the
    /// same `Arc` (callers use `Arc::ptr_eq` to skip work).
    pub(super) fn shared(&mut self) -> Arc<ConnTable> {
        if let Some(s) = &self.shared {
            return Arc::clone(s);
        }
        let s = Arc::new(self.table.clone());
        self.shared = Some(Arc::clone(&s));
        s
    }
}
