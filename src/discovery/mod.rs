//! KubeVirt mode: find every virt-launcher's libvirt socket and report when one appears or
//! vanishes. Discovery only produces [`Change`]s; the agent's registry owns the connections.
//!
//! Each virt-launcher pod runs its own libvirt daemon whose runtime dir is the pod's
//! `libvirt-runtime` emptyDir, seen on the host under
//! `<kubelet_root>/pods/<pod-uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/` as
//! `virtqemud-sock` (current KubeVirt) or `libvirt-sock` (older). Discovery re-globs when the
//! file system says something changed under `<kubelet_root>/pods` (inotify through `notify`,
//! debounced) and every `rescan_interval` as a safety net. A new socket is reported as
//! [`Change::Appeared`], one that disappears (pod deleted) as [`Change::Vanished`]. A daemon that
//! restarts while its socket stays is the connection's business (reconnect with backoff, domains
//! kept meanwhile).

pub mod paths;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::DiscoverConfig;

/// Coalesce bursts of file-system events (a pod creates many files at once).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A change in the set of launcher sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Appeared(PathBuf),
    Vanished(PathBuf),
}

/// Run discovery until `stop` turns true or the receiver of `changes` is gone.
pub async fn run(
    cfg: DiscoverConfig,
    changes: mpsc::Sender<Change>,
    mut stop: watch::Receiver<bool>,
) {
    let globs = paths::absolute_globs(&cfg);
    let pods_dir = cfg.kubelet_root.join("pods");
    tracing::info!(globs = ?globs, "KubeVirt socket discovery started");
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    let mut known: BTreeSet<PathBuf> = BTreeSet::new();

    loop {
        if watcher.is_none() {
            watcher = watch_dir(&pods_dir, fs_tx.clone());
        }
        let g = globs.clone();
        let found: BTreeSet<PathBuf> = tokio::task::spawn_blocking(move || paths::scan(&g))
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        let gone: Vec<PathBuf> = known.difference(&found).cloned().collect();
        let new: Vec<PathBuf> = found.difference(&known).cloned().collect();
        known = found;
        let report = gone
            .into_iter()
            .map(Change::Vanished)
            .chain(new.into_iter().map(Change::Appeared));
        for change in report {
            if changes.send(change).await.is_err() {
                return;
            }
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
    drop(watcher);
}

/// The path to connect to for the socket at `path`: the path itself when it fits a unix socket
/// address, else `/proc/self/fd/<fd>/<name>` through a descriptor of its directory, returned
/// with it (the caller keeps it open as long as the connection may reconnect). On a real node
/// the launcher socket path (121 bytes with a pod UID) never fits the 107-byte limit.
pub fn connect_path(path: &std::path::Path) -> (Option<std::fs::File>, PathBuf) {
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
