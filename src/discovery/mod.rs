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

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::DiscoverConfig;
use crate::tasks::StopSignal;

/// Coalesce bursts of file-system events (a pod creates many files at once).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A change in the set of launcher sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Appeared(PathBuf),
    Vanished(PathBuf),
    /// A path matching a glob failed the checks of [`paths::vet`]: reported once while it stays
    /// rejected for the same reason (again if it goes away and comes back).
    Rejected(PathBuf, paths::Rejection),
}

/// Run discovery until `stop` says stop or the receiver of `changes` is gone.
pub async fn run(cfg: DiscoverConfig, changes: mpsc::Sender<Change>, mut stop: StopSignal) {
    let globs = paths::absolute_globs(&cfg);
    let (levels, deep) = paths::watch_patterns(&globs);
    tracing::info!(globs = ?globs, "KubeVirt socket discovery started");
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<()>();
    let mut watches = Watches::new(fs_tx);
    let mut known: BTreeSet<PathBuf> = BTreeSet::new();
    let mut rejected: BTreeMap<PathBuf, paths::Rejection> = BTreeMap::new();
    let root = cfg.kubelet_root.clone();
    let owners = cfg.socket_owners.clone();

    loop {
        let (g, l, d) = (globs.clone(), levels.clone(), deep.clone());
        let (root, owners) = (root.clone(), owners.clone());
        let scanned = tokio::task::spawn_blocking(move || {
            let mut found = BTreeSet::new();
            let mut refused = BTreeMap::new();
            for path in paths::scan(&g) {
                match paths::vet(&path, &root, &owners) {
                    paths::Verdict::Accept => {
                        found.insert(path);
                    }
                    paths::Verdict::Reject(why) => {
                        refused.insert(path, why);
                    }
                    paths::Verdict::Gone => {}
                }
            }
            (
                found,
                refused,
                paths::existing_dirs(&l),
                paths::existing_dirs(&d),
            )
        })
        .await;
        let Ok((found, refused, dirs, deep_dirs)) = scanned else {
            tracing::error!("discovery scan panicked");
            break;
        };
        // A directory that got its watch only now may have gained entries since it was scanned:
        // scan again at once (the levels are few, so this settles in a few rounds).
        let added = watches.update(&dirs, &deep_dirs);
        let gone: Vec<PathBuf> = known.difference(&found).cloned().collect();
        let new: Vec<PathBuf> = found.difference(&known).cloned().collect();
        known = found;
        let newly_rejected: Vec<Change> = refused
            .iter()
            .filter(|(path, why)| rejected.get(*path) != Some(why))
            .map(|(path, why)| Change::Rejected(path.clone(), *why))
            .collect();
        rejected = refused;
        let report = gone
            .into_iter()
            .map(Change::Vanished)
            .chain(newly_rejected)
            .chain(new.into_iter().map(Change::Appeared));
        for change in report {
            if changes.send(change).await.is_err() {
                return;
            }
        }

        if added {
            continue;
        }
        tokio::select! {
            _ = stop.stopped() => break,
            _ = tokio::time::sleep(cfg.rescan_interval) => {}
            ev = fs_rx.recv() => {
                if ev.is_some() {
                    tokio::time::sleep(DEBOUNCE).await;
                    while fs_rx.try_recv().is_ok() {}
                }
            }
        }
    }
}

/// The path to connect to for the socket at `path`: the path itself when it fits a unix socket
/// address, else `/proc/self/fd/<fd>/<name>` through a descriptor of its directory, returned
/// with it (the caller keeps it open as long as the connection may reconnect). On a real node
/// the launcher socket path (121 bytes with a pod UID) never fits the 107-byte limit. The
/// directory is opened without following a link in its last component (`O_NOFOLLOW`), so a
/// pod that swaps its socket directory for a symlink after [`paths::vet`] checked it does not
/// redirect the connection.
pub fn connect_path(path: &std::path::Path) -> (Option<std::fs::File>, PathBuf) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if !paths::too_long_for_unix_socket(path) {
        return (None, path.to_path_buf());
    }
    let Some(parent) = path.parent() else {
        return (None, path.to_path_buf());
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(parent);
    match opened {
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

/// The inotify watches of discovery: exactly the existing directories at the levels where a
/// socket can appear, non-recursive, updated after every scan. Every event that can change which
/// entries exist pokes the channel.
struct Watches {
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<(PathBuf, bool)>,
}

impl Watches {
    fn new(tx: mpsc::UnboundedSender<()>) -> Self {
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| changes_entries(&ev.kind)) {
                let _ = tx.send(());
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "file-system notifications unavailable; relying on periodic rescans");
                None
            }
        };
        Self {
            watcher,
            watched: BTreeSet::new(),
        }
    }

    /// Watch `dirs` (and `deep` recursively), and nothing else; true when a watch was added. A
    /// directory that cannot be watched (it went away meanwhile) is retried at the next scan.
    fn update(&mut self, dirs: &[PathBuf], deep: &[PathBuf]) -> bool {
        let Some(w) = self.watcher.as_mut() else {
            return false;
        };
        let want: BTreeSet<(PathBuf, bool)> = dirs
            .iter()
            .map(|d| (d.clone(), false))
            .chain(deep.iter().map(|d| (d.clone(), true)))
            .collect();
        for (dir, _) in self.watched.difference(&want) {
            // Fails when the directory is gone, which removed its watch already.
            let _ = w.unwatch(dir);
        }
        let mut now = BTreeSet::new();
        let mut added = false;
        for entry in &want {
            let (dir, recursive) = entry;
            if self.watched.contains(entry) {
                now.insert(entry.clone());
                continue;
            }
            let mode = if *recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match w.watch(dir, mode) {
                Ok(()) => {
                    added = true;
                    now.insert(entry.clone());
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch; the next rescan retries")
                }
            }
        }
        self.watched = now;
        added
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
