//! The agent's state and its one owner: the pure [`Inventory`], every connection's
//! [`ConnMeta`], and the agent-wide [`Telemetry`] counters.
//!
//! One door in, one signal out. Every change goes through an [`Owner`] method (`on_event`,
//! `on_fetch`, `begin_resync`, `add`, `retire`, `forget`, and the connection-state setters),
//! which applies it and, when the inventory's exported state changed, bumps the one change signal
//! once ([`Owner::touch`] does for a node capability). Connection-state figures (up, reconnects,
//! last sync) push nothing themselves: the next export reads them. No one else locks the
//! inventory. Readers hold a [`Store`]: [`Store::changed`] waits for the signal,
//! [`Store::snapshot`] and [`Store::connections`] return shared `Arc` copies.
//!
//! Snapshots are lazy: a change only bumps a version, and the first reader after it builds the
//! snapshot (under the inventory's shared read lock, never the write lock) and publishes it for
//! every later reader until the next change. A burst of 10,000 events therefore costs one
//! snapshot per export, not one per event.
//!
//! It stands below both of its sides: the agent (src/agent) writes through the owner and the
//! export (src/export) reads through stores, and neither imports the other's half. Tokio enters
//! only for the change signal; the inventory itself stays pure.

pub mod connections;
pub mod telemetry;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::inventory::{
    ConnId, DomainRef, FetchOutcome, FetchRequest, Inventory, Lifecycle, ResyncReport, ResyncToken,
    Snapshot,
};
use connections::Conns;
pub use connections::{ConnMeta, ConnTable};
pub use telemetry::Telemetry;

/// What the owner and its stores share.
#[derive(Debug)]
struct Core {
    inventory: RwLock<Inventory>,
    /// The inventory's version after the last change (read without any lock).
    version: AtomicU64,
    /// The last snapshot built; current while its version equals `version`.
    published: Mutex<Arc<Snapshot>>,
    conns: Mutex<Conns>,
    telemetry: Telemetry,
    /// Bumped once per visible change (and per node capability change).
    signal: watch::Sender<()>,
    /// The next push should not wait for the debounce.
    urgent: AtomicBool,
}

impl Core {
    /// Read the inventory under its shared lock.
    fn read<R>(&self, f: impl FnOnce(&Inventory) -> R) -> R {
        let inv = self.inventory.read().unwrap_or_else(|p| p.into_inner());
        f(&inv)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The one door through which the agent's state changes. Cloned into every task that writes
/// (connection tasks, the registry, the agent's loop, the node checks); every clone is the same
/// owner.
#[derive(Clone, Debug)]
pub struct Owner {
    core: Arc<Core>,
}

impl Default for Owner {
    fn default() -> Self {
        Self::new()
    }
}

impl Owner {
    pub fn new() -> Self {
        let (signal, _) = watch::channel(());
        Self {
            core: Arc::new(Core {
                inventory: RwLock::new(Inventory::new()),
                version: AtomicU64::new(0),
                published: Mutex::new(Arc::new(Snapshot::default())),
                conns: Mutex::new(Conns::default()),
                telemetry: Telemetry::new(),
                signal,
                urgent: AtomicBool::new(false),
            }),
        }
    }

    /// A reader of this owner's state.
    pub fn store(&self) -> Store {
        Store {
            core: Arc::clone(&self.core),
            signal: self.core.signal.subscribe(),
        }
    }

    /// The agent-wide counters (plain atomics: counting changes nothing that is exported).
    pub fn telemetry(&self) -> &Telemetry {
        &self.core.telemetry
    }

    /// Apply `f` to the inventory; signal once if what is exported changed.
    fn write<R>(&self, f: impl FnOnce(&mut Inventory) -> R) -> R {
        let (out, changed) = {
            let mut inv = self
                .core
                .inventory
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let before = inv.version();
            let out = f(&mut inv);
            let after = inv.version();
            self.core.version.store(after, Ordering::Release);
            (out, after != before)
        };
        if changed {
            self.signal();
        }
        out
    }

    fn signal(&self) {
        self.core.signal.send_replace(());
    }

    /// Something exported that is not in the inventory changed (a node capability): push.
    pub fn touch(&self) {
        self.signal();
    }

    /// Push without waiting for the debounce (the first complete picture after startup).
    pub fn publish_now(&self) {
        self.core.urgent.store(true, Ordering::Release);
        self.signal();
    }

    /// Start tracking connection `id`, labelled `label` in logs and the `connection` attribute.
    pub fn add(&self, id: ConnId, label: &str, pod_uid: Option<String>, limit: Option<usize>) {
        lock(&self.core.conns).change(|t| {
            t.insert(
                id,
                ConnMeta {
                    label: Arc::from(label),
                    pod_uid: pod_uid.map(Arc::from),
                    domain_limit: limit,
                    ..ConnMeta::default()
                },
            )
        });
        self.write(|inv| inv.add_connection(id));
    }

    /// Drop connection `id`'s domains and state now (domains first: a collection in between never
    /// sees a domain without its connection's attributes), while its task still closes; until
    /// [`forget`](Self::forget) whatever it still reports is ignored.
    pub fn retire(&self, id: ConnId) {
        self.write(|inv| inv.retire_connection(id));
        lock(&self.core.conns).change(|t| t.remove(&id));
    }

    /// Connection `id`'s task ended: forget it and whatever it still had.
    pub fn forget(&self, id: ConnId) {
        self.write(|inv| {
            inv.forget_retired(id);
            inv.remove_connection(id)
        });
        lock(&self.core.conns).change(|t| t.remove(&id));
    }

    /// Count and apply a lifecycle event; returns the XML read to perform, if any.
    pub fn on_event(&self, conn: ConnId, dom: DomainRef, event: Lifecycle) -> Option<FetchRequest> {
        self.core.telemetry.count_event(event);
        self.write(|inv| inv.apply_event(conn, dom, event))
    }

    /// Apply the outcome of an XML read.
    pub fn on_fetch(&self, req: &FetchRequest, outcome: FetchOutcome) {
        self.write(|inv| inv.apply_fetch(req, outcome));
    }

    /// Begin a resync of `conn`: take the listing after this call, then
    /// [`finish`](Resync::finish) it; dropped unfinished, it is abandoned.
    pub fn begin_resync(&self, conn: ConnId) -> Resync {
        let token = self.write(|inv| inv.begin_resync(conn));
        Resync {
            owner: self.clone(),
            token: Some(token),
        }
    }

    /// Which listed domains need their XML read (see [`Inventory::needs_fetch`]).
    pub fn needs_fetch(&self, conn: ConnId, listing: &[DomainRef]) -> Vec<DomainRef> {
        self.core.read(|inv| inv.needs_fetch(conn, listing))
    }

    /// Connection `id` is (or is no longer) established; `hypervisor_version` when read.
    pub fn set_up(&self, id: ConnId, up: bool, hypervisor_version: Option<String>) {
        lock(&self.core.conns).change_one(id, |m| {
            m.up = up;
            if let Some(v) = hypervisor_version {
                m.hypervisor_version = Some(Arc::from(v));
            }
        })
    }

    pub fn count_reconnect(&self, id: ConnId) {
        lock(&self.core.conns).change_one(id, |m| m.reconnects += 1)
    }

    /// Count lifecycle events of connection `id` dropped on a full backlog.
    pub fn count_dropped_events(&self, id: ConnId, n: u64) {
        if n > 0 {
            lock(&self.core.conns).change_one(id, |m| m.dropped_events += n)
        }
    }

    pub fn set_last_sync(&self, id: ConnId, d: Duration) {
        lock(&self.core.conns).change_one(id, |m| m.last_sync = Some(d))
    }
}

/// A resync begun through the owner, ended exactly once whatever happens to its task: finished
/// with a listing, or abandoned when dropped (a failed listing, or the task cancelled because its
/// connection was lost). A token that outlived its task would keep the connection "resyncing"
/// for good, and every later STOPPED would add a tombstone that is never cleared.
#[derive(Debug)]
pub struct Resync {
    owner: Owner,
    token: Option<ResyncToken>,
}

impl Resync {
    /// Apply the listing (each listed domain with the outcome of its read, when one was made).
    pub fn finish(mut self, listing: Vec<(DomainRef, Option<FetchOutcome>)>) -> ResyncReport {
        match self.token.take() {
            Some(token) => self.owner.write(|inv| inv.finish_resync(token, listing)),
            None => ResyncReport::default(),
        }
    }
}

impl Drop for Resync {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.owner.write(|inv| inv.abort_resync(token));
        }
    }
}

/// A reader of the agent's state: cheap to clone, never takes the inventory's write lock.
#[derive(Debug)]
pub struct Store {
    core: Arc<Core>,
    signal: watch::Receiver<()>,
}

impl Clone for Store {
    /// A clone starts where this store is: a change this store has not seen yet, the clone has
    /// not seen either.
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            signal: self.signal.clone(),
        }
    }
}

impl Store {
    /// Wait until something exported changed since this store last saw the signal.
    pub async fn changed(&mut self) {
        // The owner's core holds the sender as long as this store exists: this cannot fail.
        if self.signal.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether an urgent push was asked for since the last call (and clear it).
    pub fn take_urgent(&self) -> bool {
        self.core.urgent.swap(false, Ordering::AcqRel)
    }

    /// What is exported now: the published snapshot, rebuilt (once, by the first reader) only
    /// after a change.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let mut published = lock(&self.core.published);
        if published.version == self.core.version.load(Ordering::Acquire) {
            return Arc::clone(&published);
        }
        let snap = self.inspect(Inventory::snapshot);
        *published = Arc::clone(&snap);
        snap
    }

    /// Every connection's state: a shared copy, rebuilt only after a change (the same `Arc`
    /// until then).
    pub fn connections(&self) -> Arc<ConnTable> {
        lock(&self.core.conns).shared()
    }

    /// The agent-wide counters.
    pub fn telemetry(&self) -> &Telemetry {
        &self.core.telemetry
    }

    /// Read the inventory under its shared lock (bookkeeping checks, and the snapshot).
    pub fn inspect<R>(&self, f: impl FnOnce(&Inventory) -> R) -> R {
        self.core.read(f)
    }
}

#[cfg(test)]
mod tests;
