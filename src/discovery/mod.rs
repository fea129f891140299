//! KubeVirt mode: find every virt-launcher's libvirt socket and run one connection per socket.
//!
//! Each virt-launcher pod runs its own libvirt daemon whose runtime dir is the pod's
//! `libvirt-runtime` emptyDir, seen on the host under
//! `<kubelet_root>/pods/<pod-uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/` as
//! `virtqemud-sock` (current KubeVirt) or `libvirt-sock` (older). Discovery re-globs when the
//! file system says something changed under `<kubelet_root>/pods` (inotify through `notify`,
//! debounced) and every `rescan_interval` as a safety net. A new socket gets a connection task;
//! a socket that disappears (pod deleted) has its task stopped, its connection closed and its
//! domains removed at once. A daemon that restarts while its socket stays is the connection
//! task's business (reconnect with backoff, domains kept meanwhile).

pub mod paths;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::agent::connection::{self, ConnSpec};
use crate::agent::Shared;
use crate::inventory::ConnId;

/// Coalesce bursts of file-system events (a pod creates many files at once).
const DEBOUNCE: Duration = Duration::from_millis(100);

struct Discovered {
    id: ConnId,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// The socket's directory, held open while the connection lives when the socket path is too
    /// long for a unix socket address (see [`connect_path`]); closed when the pod goes away.
    _dir: Option<std::fs::File>,
}

/// Run discovery until `stop` turns true. Connection ids start at `first_id`.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>, first_id: ConnId) {
    let cfg = shared.cfg.libvirt.discover.clone();
    let globs = paths::absolute_globs(&cfg);
    let pods_dir = cfg.kubelet_root.join("pods");
    tracing::info!(globs = ?globs, "KubeVirt socket discovery started");
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    let mut next_id = first_id;
    let mut known: BTreeMap<PathBuf, Discovered> = BTreeMap::new();

    loop {
        if watcher.is_none() {
            watcher = watch_dir(&pods_dir, fs_tx.clone());
        }
        let g = globs.clone();
        let found = tokio::task::spawn_blocking(move || paths::scan(&g))
            .await
            .unwrap_or_default();

        // Sockets that went away: the pod was deleted.
        let gone: Vec<PathBuf> = known
            .keys()
            .filter(|p| !found.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(d) = known.remove(&path) {
                tracing::info!(socket = %path.display(), "launcher socket removed; dropping its connection and domains");
                remove(&shared, d).await;
            }
        }
        // New sockets.
        for path in found {
            if known.contains_key(&path) {
                continue;
            }
            let id = next_id;
            next_id += 1;
            // The connection label stays the real path; the URIs opened may use a short alias.
            let (label, _) = paths::socket_uris(&path);
            let (dir, connect) = connect_path(&path);
            let (uri, fallback) = paths::socket_uris(&connect);
            let pod_uid = paths::pod_uid(&path);
            tracing::info!(socket = %path.display(), pod_uid = ?pod_uid, uri = %uri, "launcher socket found");
            shared.telemetry.add_connection(id, &label, pod_uid.clone());
            let spec = ConnSpec {
                id,
                label: label.clone(),
                uri,
                fallback_uri: Some(fallback),
                pod_uid,
            };
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(connection::supervise(Arc::clone(&shared), spec, rx, None));
            known.insert(
                path,
                Discovered {
                    id,
                    stop: tx,
                    task,
                    _dir: dir,
                },
            );
        }

        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(cfg.rescan_interval) => {}
            ev = fs_rx.recv() => {
                if ev.is_some() {
                    tokio::time::sleep(DEBOUNCE).await;
                    while fs_rx.try_recv().is_ok() {}
                }
            }
        }
    }
    for (_, d) in std::mem::take(&mut known) {
        let _ = d.stop.send(true);
        let _ = d.task.await;
    }
    drop(watcher);
}

/// The path to connect to for the socket at `path`: the path itself when it fits a unix socket
/// address, else `/proc/self/fd/<fd>/<name>` through a descriptor of its directory, returned
/// with it (the caller keeps it open as long as the connection may reconnect). On a real node
/// the launcher socket path (121 bytes with a pod UID) never fits the 107-byte limit.
fn connect_path(path: &std::path::Path) -> (Option<std::fs::File>, PathBuf) {
    use std::os::fd::AsRawFd;
    if !paths::too_long_for_unix_socket(path) {
        return (None, path.to_path_buf());
    }
    let Some(parent) = path.parent() else {
        return (None, path.to_path_buf());
    };
    match std::fs::File::open(parent) {
        Ok(dir) => match paths::fd_alias(dir.as_raw_fd(), path) {
            Some(alias) => (Some(dir), alias),
            None => (None, path.to_path_buf()),
        },
        Err(e) => {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot open the socket's directory for a short socket path");
            (None, path.to_path_buf())
        }
    }
}

/// Stop a socket's connection task, then remove its domains and self-metrics.
async fn remove(shared: &Arc<Shared>, d: Discovered) {
    let _ = d.stop.send(true);
    if tokio::time::timeout(Duration::from_secs(5), d.task)
        .await
        .is_err()
    {
        tracing::warn!(connection = d.id, "connection task did not stop in time");
    }
    let removed = shared.lock_inventory().remove_connection(d.id);
    shared.telemetry.remove_connection(d.id);
    if removed > 0 {
        shared.push.push();
    }
}

/// Whether a file-system event can change which sockets exist. Access and content/metadata
/// events are ignored: the rescan itself opens every directory it globs, and reacting to those
/// opens would rescan in a loop.
fn changes_entries(kind: &notify::EventKind) -> bool {
    use notify::event::ModifyKind;
    use notify::EventKind;
    match kind {
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

/// Watch `dir` recursively; every event pokes `tx`. `None` (logged) when it cannot be watched
/// yet (the rescan interval still finds sockets, and watching is retried each rescan).
fn watch_dir(
    dir: &std::path::Path,
    tx: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    if !dir.is_dir() {
        tracing::debug!(dir = %dir.display(), "kubelet pods dir does not exist (yet)");
        return None;
    }
    let mut w = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| changes_entries(&ev.kind)) {
            let _ = tx.send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "file-system notifications unavailable; relying on periodic rescans");
            return None;
        }
    };
    match w.watch(dir, RecursiveMode::Recursive) {
        Ok(()) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch kubelet pods dir; relying on periodic rescans");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::changes_entries;
    use notify::event::{
        AccessKind, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind, RenameMode,
    };
    use notify::EventKind;

    #[test]
    fn only_entry_changes_trigger_a_rescan() {
        assert!(!changes_entries(&EventKind::Access(AccessKind::Any)));
        assert!(!changes_entries(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(!changes_entries(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::Any
        ))));
        assert!(changes_entries(&EventKind::Create(CreateKind::Any)));
        assert!(changes_entries(&EventKind::Remove(RemoveKind::Any)));
        assert!(changes_entries(&EventKind::Modify(ModifyKind::Name(
            RenameMode::Any
        ))));
    }
}
