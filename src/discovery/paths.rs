//! Pure helpers for launcher sockets: globs, pod UIDs, connection URIs.

use std::path::{Path, PathBuf};

use crate::config::DiscoverConfig;

/// The discovery globs as absolute patterns (relative ones are joined to the kubelet root).
pub fn absolute_globs(cfg: &DiscoverConfig) -> Vec<String> {
    cfg.globs
        .iter()
        .map(|g| {
            if Path::new(g).is_absolute() {
                g.clone()
            } else {
                cfg.kubelet_root.join(g).to_string_lossy().into_owned()
            }
        })
        .collect()
}

/// The kubelet pod UID in a path such as
/// `/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock`.
pub fn pod_uid(path: &Path) -> Option<String> {
    let parts: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
    parts
        .windows(3)
        .rev()
        .find(|w| w[0] == "pods" && w[2] == "volumes")
        .map(|w| w[1].to_string())
        .filter(|uid| !uid.is_empty())
}

/// Connection URIs for a launcher socket: the session form first (what KubeVirt's non-root
/// virtqemud answers), the system form as the fallback.
pub fn socket_uris(path: &Path) -> (String, String) {
    let p = path.to_string_lossy();
    (
        format!("qemu+unix:///session?socket={p}"),
        format!("qemu+unix:///system?socket={p}"),
    )
}

/// The longest path a unix socket address can hold: `sun_path` is 108 bytes, NUL included.
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Whether `path` is too long to be connected to directly. A real launcher socket usually is:
/// `/var/lib/kubelet/pods/<36-char uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock`
/// is 121 bytes, and libvirt refuses it ("too long for unix socket").
pub fn too_long_for_unix_socket(path: &Path) -> bool {
    path.as_os_str().len() > MAX_UNIX_SOCKET_PATH
}

/// A short name for the socket at `path` through an open descriptor `dir_fd` of its directory:
/// `/proc/self/fd/<dir_fd>/<file name>`. The kernel resolves it like the long path, so libvirt
/// can connect to it. `None` when `path` has no file name or the alias would still be too long.
pub fn fd_alias(dir_fd: i32, path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let alias = Path::new("/proc/self/fd")
        .join(dir_fd.to_string())
        .join(name);
    (!too_long_for_unix_socket(&alias)).then_some(alias)
}

/// Why a path that matches a discovery glob is not connected to. A launcher socket's directory
/// is a pod's emptyDir, writable by whoever runs in that pod: what is found there is checked
/// before the agent's root process connects to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// Not a unix socket (a regular file, a fifo, a directory...).
    NotSocket,
    /// The path, or a directory on it below the kubelet root, is a symbolic link: it could lead
    /// anywhere, such as the host's own libvirt socket or another pod's.
    Symlink,
    /// The socket's owner is not in `libvirt.discover.socket_owners`.
    Owner,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Rejection::NotSocket, Rejection::Symlink, Rejection::Owner];

    /// The `reason` attribute of `virt_hypervisor_agent_discovery_rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::NotSocket => "not_socket",
            Rejection::Symlink => "symlink",
            Rejection::Owner => "owner",
        }
    }
}

/// What the checks found for one candidate path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject(Rejection),
    /// It went away (or cannot be examined) between the glob and the check: not a candidate.
    Gone,
}

/// Check a candidate socket without following links (`lstat` on each component): every
/// component from below `kubelet_root` down to the socket must not be a symlink, and the socket
/// must be a socket owned by one of `owners`. A path outside `kubelet_root` (an absolute glob
/// the operator configured) has only its last component checked.
pub fn vet(path: &Path, kubelet_root: &Path, owners: &[u32]) -> Verdict {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (mut at, rest) = match path.strip_prefix(kubelet_root) {
        Ok(rest) => (kubelet_root.to_path_buf(), rest),
        Err(_) => match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => (dir.to_path_buf(), Path::new(name)),
            _ => return Verdict::Gone,
        },
    };
    let mut last = None;
    for part in rest.components() {
        at.push(part);
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            return Verdict::Gone;
        };
        if meta.file_type().is_symlink() {
            return Verdict::Reject(Rejection::Symlink);
        }
        last = Some(meta);
    }
    let Some(meta) = last else {
        return Verdict::Gone;
    };
    if !meta.file_type().is_socket() {
        Verdict::Reject(Rejection::NotSocket)
    } else if !owners.contains(&meta.uid()) {
        Verdict::Reject(Rejection::Owner)
    } else {
        Verdict::Accept
    }
}

/// Every existing path matching any glob, sorted and de-duplicated.
pub fn scan(globs: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for g in globs {
        match glob::glob(g) {
            Ok(paths) => out.extend(paths.filter_map(Result::ok)),
            Err(e) => tracing::warn!(glob = %g, error = %e, "invalid discovery glob"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether a path component is a glob pattern rather than a literal name.
fn is_pattern(component: &str) -> bool {
    component.contains(['*', '?', '['])
}

/// Where a socket matching one of `globs` can appear, as the patterns of the directories to
/// watch: each level from the last literal directory down to the socket's directory. For
/// `/k/pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock` that is `/k/pods`,
/// `/k/pods/*`, `/k/pods/*/volumes`, `/k/pods/*/volumes/kubernetes.io~empty-dir` and
/// `…/libvirt-runtime`: about four directories per pod, none inside other volumes, so what
/// unrelated pods write never reaches the agent. The second list holds directories to watch
/// recursively: the part before a `**` component, whose depth is not bounded.
pub fn watch_patterns(globs: &[String]) -> (Vec<String>, Vec<String>) {
    let mut levels = Vec::new();
    let mut recursive = Vec::new();
    for g in globs {
        let parts: Vec<&str> = g.split('/').collect();
        let Some((_, dirs)) = parts.split_last() else {
            continue;
        };
        let first_pattern = dirs.iter().position(|c| is_pattern(c));
        if let Some(deep) = dirs.iter().position(|c| *c == "**") {
            recursive.push(join(&dirs[..deep]));
            continue;
        }
        // The last literal directory (it sees the first pattern level appear), then every level.
        let from = first_pattern.unwrap_or(dirs.len()).max(1);
        for end in from..=dirs.len() {
            levels.push(join(&dirs[..end]));
        }
    }
    levels.sort();
    levels.dedup();
    recursive.sort();
    recursive.dedup();
    (levels, recursive)
}

fn join(parts: &[&str]) -> String {
    let s = parts.join("/");
    if s.is_empty() {
        "/".to_string()
    } else {
        s
    }
}

/// Every existing directory matching any of `patterns`.
pub fn existing_dirs(patterns: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = patterns
        .iter()
        .filter_map(|p| glob::glob(p).ok())
        .flat_map(|paths| paths.filter_map(Result::ok))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_levels_run_from_the_last_literal_dir_to_the_socket_dir() {
        let globs = vec![
            "/k/pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock".to_string(),
            "/k/pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime/libvirt-sock".to_string(),
        ];
        let (levels, recursive) = watch_patterns(&globs);
        assert_eq!(
            levels,
            vec![
                "/k/pods",
                "/k/pods/*",
                "/k/pods/*/volumes",
                "/k/pods/*/volumes/kubernetes.io~empty-dir",
                "/k/pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime",
            ]
        );
        assert!(recursive.is_empty());
    }

    #[test]
    fn a_literal_socket_path_watches_its_dir_and_a_double_star_watches_recursively() {
        let globs = vec![
            "/run/libvirt/libvirt-sock".to_string(),
            "/srv/**/sock".to_string(),
        ];
        let (levels, recursive) = watch_patterns(&globs);
        assert_eq!(levels, vec!["/run/libvirt"]);
        assert_eq!(recursive, vec!["/srv"]);
    }

    #[test]
    fn only_existing_dirs_of_the_levels_are_watched_not_other_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let rt = root.join("pods/a/volumes/kubernetes.io~empty-dir/libvirt-runtime");
        std::fs::create_dir_all(&rt).unwrap();
        std::fs::create_dir_all(root.join("pods/b/volumes/kubernetes.io~empty-dir/cache/x/y"))
            .unwrap();
        std::fs::create_dir_all(root.join("pods/b/volumes/kubernetes.io~projected/token")).unwrap();
        std::fs::write(root.join("pods/b/etc-hosts"), "").unwrap();
        let globs = vec![format!(
            "{}/pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock",
            root.display()
        )];
        let (levels, _) = watch_patterns(&globs);
        let got = existing_dirs(&levels);
        let rel: Vec<String> = got
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(
            rel,
            vec![
                "pods",
                "pods/a",
                "pods/a/volumes",
                "pods/a/volumes/kubernetes.io~empty-dir",
                "pods/a/volumes/kubernetes.io~empty-dir/libvirt-runtime",
                "pods/b",
                "pods/b/volumes",
                "pods/b/volumes/kubernetes.io~empty-dir",
            ]
        );
    }

    #[test]
    fn pod_uid_is_taken_from_the_kubelet_path() {
        let p = Path::new("/var/lib/kubelet/pods/1b4e28ba-2fa1-11d2-883f-0016d3cca427/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock");
        assert_eq!(
            pod_uid(p).as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
    }

    #[test]
    fn pod_uid_works_under_a_custom_kubelet_root_that_contains_pods() {
        let p = Path::new("/srv/pods/kubelet/pods/abc/volumes/kubernetes.io~empty-dir/libvirt-runtime/libvirt-sock");
        assert_eq!(pod_uid(p).as_deref(), Some("abc"));
    }

    #[test]
    fn pod_uid_is_none_outside_the_kubelet_layout() {
        assert_eq!(pod_uid(Path::new("/run/libvirt/libvirt-sock")), None);
        assert_eq!(pod_uid(Path::new("/var/lib/kubelet/pods")), None);
    }

    #[test]
    fn relative_globs_are_joined_to_the_kubelet_root_and_absolute_ones_kept() {
        let cfg = DiscoverConfig {
            kubelet_root: PathBuf::from("/k"),
            globs: vec!["pods/*/x".into(), "/abs/*/y".into()],
            ..DiscoverConfig::default()
        };
        assert_eq!(
            absolute_globs(&cfg),
            vec!["/k/pods/*/x".to_string(), "/abs/*/y".to_string()]
        );
    }

    #[test]
    fn default_globs_match_both_kubevirt_socket_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DiscoverConfig {
            kubelet_root: dir.path().to_path_buf(),
            ..DiscoverConfig::default()
        };
        let mk = |uid: &str, sock: &str| {
            let d = dir
                .path()
                .join("pods")
                .join(uid)
                .join("volumes/kubernetes.io~empty-dir/libvirt-runtime");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(sock), b"").unwrap();
            d.join(sock)
        };
        let a = mk("pod-a", "virtqemud-sock");
        let b = mk("pod-b", "libvirt-sock");
        mk("pod-c", "virtlogd-sock");
        let other = dir
            .path()
            .join("pods/pod-d/volumes/kubernetes.io~empty-dir/other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("virtqemud-sock"), b"").unwrap();
        assert_eq!(scan(&absolute_globs(&cfg)), vec![a, b]);
    }

    #[test]
    fn socket_uris_offer_session_then_system() {
        let (s, f) = socket_uris(Path::new("/p/virtqemud-sock"));
        assert_eq!(s, "qemu+unix:///session?socket=/p/virtqemud-sock");
        assert_eq!(f, "qemu+unix:///system?socket=/p/virtqemud-sock");
    }

    #[test]
    fn the_kubevirt_socket_path_is_too_long_for_a_unix_socket_address() {
        let p = Path::new("/var/lib/kubelet/pods/1b4e28ba-2fa1-11d2-883f-0016d3cca427/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock");
        assert!(too_long_for_unix_socket(p));
        assert!(!too_long_for_unix_socket(Path::new(
            "/var/run/libvirt/libvirt-sock"
        )));
        assert!(!too_long_for_unix_socket(Path::new(&"a".repeat(107))));
        assert!(too_long_for_unix_socket(Path::new(&"a".repeat(108))));
    }

    #[test]
    fn fd_alias_names_the_socket_through_its_directory_descriptor() {
        let p = Path::new("/var/lib/kubelet/pods/x/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock");
        assert_eq!(
            fd_alias(17, p),
            Some(PathBuf::from("/proc/self/fd/17/virtqemud-sock"))
        );
        assert_eq!(fd_alias(17, Path::new("/")), None);
        assert_eq!(fd_alias(17, &Path::new("/d").join("s".repeat(100))), None);
    }

    #[test]
    fn a_socket_beyond_the_address_limit_is_reachable_through_the_fd_alias() {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let sock = deep.join("virtqemud-sock");
        assert!(too_long_for_unix_socket(&sock));
        let dir_fd = std::fs::File::open(&deep).unwrap();
        let alias = fd_alias(dir_fd.as_raw_fd(), &sock).unwrap();
        let _listener = UnixListener::bind(&alias).unwrap();
        assert!(
            sock.exists(),
            "bound through the alias, visible at the long path"
        );
        UnixStream::connect(&alias).unwrap();
    }

    #[test]
    fn invalid_glob_is_skipped_not_fatal() {
        assert!(scan(&["/tmp/[".to_string()]).is_empty());
    }

    /// A kubelet root with one pod emptyDir: `(root, the socket directory)`.
    fn pod_dir(uid: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root
            .path()
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~empty-dir/libvirt-runtime");
        std::fs::create_dir_all(&dir).unwrap();
        (root, dir)
    }

    fn own_uid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid()
    }

    #[test]
    fn a_socket_of_an_allowed_owner_is_accepted() {
        let (root, dir) = pod_dir("p1");
        let sock = dir.join("virtqemud-sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(vet(&sock, root.path(), &[own_uid()]), Verdict::Accept);
    }

    #[test]
    fn a_socket_of_another_owner_is_rejected() {
        let (root, dir) = pod_dir("p1");
        let sock = dir.join("virtqemud-sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let other = own_uid().wrapping_add(1);
        assert_eq!(
            vet(&sock, root.path(), &[other]),
            Verdict::Reject(Rejection::Owner)
        );
    }

    #[test]
    fn a_regular_file_or_fifo_is_not_a_socket() {
        let (root, dir) = pod_dir("p1");
        let file = dir.join("virtqemud-sock");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            vet(&file, root.path(), &[own_uid()]),
            Verdict::Reject(Rejection::NotSocket)
        );
        let fifo = dir.join("libvirt-sock");
        // mkfifo(1) rather than libc::mkfifo: every foreign call is in src/ffi/, tests included.
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(
            vet(&fifo, root.path(), &[own_uid()]),
            Verdict::Reject(Rejection::NotSocket)
        );
    }

    #[test]
    fn a_symlinked_socket_is_rejected_even_to_a_real_socket() {
        let (root, dir) = pod_dir("p1");
        let elsewhere = tempfile::tempdir().unwrap();
        let real = elsewhere.path().join("host-sock");
        let _l = std::os::unix::net::UnixListener::bind(&real).unwrap();
        let link = dir.join("virtqemud-sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(
            vet(&link, root.path(), &[own_uid()]),
            Verdict::Reject(Rejection::Symlink)
        );
    }

    #[test]
    fn a_symlinked_directory_below_the_kubelet_root_is_rejected() {
        // The pod's emptyDir itself is a link to a directory that holds a real socket.
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(elsewhere.path().join("virtqemud-sock"))
            .unwrap();
        let vols = root.path().join("pods/p1/volumes/kubernetes.io~empty-dir");
        std::fs::create_dir_all(&vols).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), vols.join("libvirt-runtime")).unwrap();
        let sock = vols.join("libvirt-runtime/virtqemud-sock");
        assert!(sock.exists(), "reachable through the link");
        assert_eq!(
            vet(&sock, root.path(), &[own_uid()]),
            Verdict::Reject(Rejection::Symlink)
        );
    }

    #[test]
    fn a_kubelet_root_that_is_itself_a_link_is_allowed() {
        // Some distributions move /var/lib/kubelet elsewhere and leave a link: only what is
        // below the root is a pod's to change.
        let (real_root, dir) = pod_dir("p1");
        let _l = std::os::unix::net::UnixListener::bind(dir.join("virtqemud-sock")).unwrap();
        let holder = tempfile::tempdir().unwrap();
        let root = holder.path().join("kubelet");
        std::os::unix::fs::symlink(real_root.path(), &root).unwrap();
        let sock =
            root.join("pods/p1/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock");
        assert_eq!(vet(&sock, &root, &[own_uid()]), Verdict::Accept);
    }

    #[test]
    fn a_path_that_vanished_is_no_candidate() {
        let (root, dir) = pod_dir("p1");
        assert_eq!(
            vet(&dir.join("virtqemud-sock"), root.path(), &[own_uid()]),
            Verdict::Gone
        );
    }
}
