//! The one owner of the agent's connections: explicit URIs and discovered launcher sockets alike
//! are [`add`](Registry::add)ed, [`remove`](Registry::remove)d and [`shutdown`](Registry::shutdown)
//! here, with one rule for ids, self-metrics and readiness.
//!
//! Each connection is one task in the registry's `JoinSet`, told to stop through a
//! [`Stop`] that carries its deadline. A removal drops the connection's domains and self-metrics at once
//! (its socket is gone: so are its VMs, and the next export says so) and returns; the connection
//! closes on its own, bounded by `fetch_timeout` (a hung daemon's release is then left to its
//! blocking thread), and [`reap`](Registry::reap) forgets it when its task ends, so many pods
//! going away close in parallel. Until then the inventory ignores what the closing connection
//! still reports. Shutdown stops every connection with one deadline and keeps the domains (the
//! VMs still run).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::connection::{self, ConnSpec};
use super::Shared;
use crate::inventory::ConnId;
use crate::state::Owner;
use crate::tasks::{drain_by, Stop};

/// How long after its deadline a closing connection may take to report that it ended.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// A connection to add: a [`ConnSpec`] before it has an id.
#[derive(Debug)]
pub struct NewConnection {
    pub label: String,
    pub uri: String,
    pub fallback_uri: Option<String>,
    pub pod_uid: Option<String>,
    /// Most domains exported for it (`None`: only the global cardinality limit).
    pub domain_limit: Option<usize>,
    /// Held open as long as the connection lives (a launcher socket reached through a
    /// `/proc/self/fd` alias of its directory).
    pub dir: Option<std::fs::File>,
}

impl NewConnection {
    /// An explicit URI from `libvirt.uris`.
    pub fn uri(uri: &str) -> Self {
        Self {
            label: uri.to_string(),
            uri: uri.to_string(),
            fallback_uri: None,
            pod_uid: None,
            domain_limit: None,
            dir: None,
        }
    }
}

impl NewConnection {
    /// Register the connection with the state's owner under `id`: its task's spec, and the
    /// directory to hold open while it lives.
    pub fn admit(self, id: ConnId, owner: &Owner) -> (ConnSpec, Option<std::fs::File>) {
        owner.add(id, &self.label, self.pod_uid.clone(), self.domain_limit);
        let spec = ConnSpec {
            id,
            label: self.label,
            uri: self.uri,
            fallback_uri: self.fallback_uri,
            pod_uid: self.pod_uid,
        };
        (spec, self.dir)
    }
}

#[derive(Debug)]
struct Entry {
    stop: Stop,
    /// Removed (not shut down): its domains are gone already, and the inventory forgets it when
    /// its task ends.
    removing: bool,
    _dir: Option<std::fs::File>,
}

/// The set of connections and their tasks.
#[derive(Debug)]
pub struct Registry {
    shared: Arc<Shared>,
    next_id: ConnId,
    conns: BTreeMap<ConnId, Entry>,
    tasks: JoinSet<()>,
    by_task: HashMap<tokio::task::Id, ConnId>,
}

impl Registry {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            next_id: 1,
            conns: BTreeMap::new(),
            tasks: JoinSet::new(),
            by_task: HashMap::new(),
        }
    }

    /// Start a connection; `first_sync` fires after its first resync or failed attempt.
    pub fn add(&mut self, new: NewConnection, first_sync: Option<oneshot::Sender<bool>>) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let (spec, dir) = new.admit(id, &self.shared.owner);
        let (stop, stop_rx) = Stop::new();
        let task = connection::supervise(Arc::clone(&self.shared), spec, stop_rx, first_sync);
        let handle = self.tasks.spawn(task);
        self.by_task.insert(handle.id(), id);
        self.conns.insert(
            id,
            Entry {
                stop,
                removing: false,
                _dir: dir,
            },
        );
        id
    }

    /// Stop a connection and drop its domains and self-metrics now; it closes in the background
    /// (see [`reap`](Self::reap)).
    pub fn remove(&mut self, id: ConnId) {
        let by = Instant::now() + self.shared.cfg.libvirt.fetch_timeout;
        if let Some(e) = self.conns.get_mut(&id) {
            e.removing = true;
            e.stop.stop(by);
            self.shared.owner.retire(id);
        }
    }

    /// Wait for a connection task to end and finish its removal; pending while none runs.
    pub async fn reap(&mut self) {
        let Some(done) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let task = match &done {
            Ok((task, ())) => *task,
            Err(e) => e.id(),
        };
        let Some(id) = self.by_task.remove(&task) else {
            return;
        };
        let entry = self.conns.remove(&id);
        if let Err(e) = done {
            tracing::error!(connection = id, error = %e, "connection task ended abnormally; its domains are dropped");
        } else if !entry.is_some_and(|e| e.removing) {
            tracing::error!(
                connection = id,
                "connection task ended unasked; its domains are dropped"
            );
        }
        self.shared.owner.forget(id);
    }

    /// Stop every connection by `by`, keeping their domains; connections still closing then are
    /// left to their blocking threads.
    pub async fn shutdown(mut self, by: Instant) {
        for e in self.conns.values() {
            e.stop.stop(by);
        }
        // Each connection closes by `by` on its own (a slow release is left to its blocking
        // thread); the grace only covers waking up to report it.
        let late = drain_by(&mut self.tasks, by + CLOSE_GRACE).await;
        if late > 0 {
            tracing::warn!(
                connections = late,
                "connections did not close by the shutdown deadline"
            );
        }
    }
}
