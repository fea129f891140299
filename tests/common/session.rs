//! A simulated KubeVirt node built from real daemons: one non-root libvirt *session* daemon per
//! simulated virt-launcher "pod", each with private XDG dirs, its socket placed at the KubeVirt path
//! under a fake kubelet root.
//!
//! Layout, under one [`Workspace`] (a temp dir in `/tmp`, kept short because unix socket addresses
//! hold at most 107 bytes and libvirt puts sockets under it):
//!
//! - `WS/<tag>/`: the pod's daemon dir `D`, owned by [`USER`]: `run/` (`XDG_RUNTIME_DIR`, holds
//!   `libvirt/libvirt-sock` and `libvirt/libvirtd.pid`), `cfg/` (`XDG_CONFIG_HOME`, with a
//!   `libvirt/libvirtd.conf` carrying a random `host_uuid`, so that live migration between two pods
//!   works), `cache/`, and `libvirtd.log` (the daemon's stdout and stderr).
//! - `WS/<node>/pods/<pod-uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/`: a bind mount of
//!   `D/run/libvirt/`, made by [`Pod::publish`], so the daemon's own socket `libvirt-sock` (owned by
//!   [`USER`]) is there with no symlink on the way, as a launcher's is on a real node (the agent
//!   refuses symlinked candidates). With a 36-character pod UID this path is longer than a unix
//!   socket address, as it is on a real node.
//!
//! The daemon runs as `runuser -u USER -- env -i … setsid libvirtd --timeout 0`. Its PID is read from
//! the pid file libvirtd writes and checked (`comm` is `libvirtd`, its environment names this pod's
//! runtime dir), and every signal goes to that PID only. Session daemons cannot open `/dev/kvm`:
//! domains are TCG (`type='qemu'`).
//!
//! Cleanup: dropping a [`Pod`] unmounts its volume and removes its kubelet dir; dropping a [`SessionDaemon`] resumes it if it
//! was stopped, terminates it (SIGTERM, then SIGKILL), kills by PID every remaining process of the
//! pod (QEMU, the auto-started virtlogd: processes of [`USER`] whose command line or environment
//! names the pod's dir), reaps `runuser` and removes the dir. Drops never panic; they print what they
//! could not clean. Note that PID 1 of a container may not reap orphans: a killed QEMU (which
//! daemonizes) can stay a zombie, which counts as gone here.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::libvirt::{domain_xml, e2e_required, Virt};

/// The non-root user every simulated virt-launcher daemon runs as.
pub const USER: &str = "vha-launcher";
/// The socket name of a libvirtd session daemon, one of the two names discovery looks for.
pub const SOCKET_NAME: &str = "libvirt-sock";
/// Where a launcher's runtime emptyDir lives under `<kubelet_root>/pods/<uid>/`.
pub const RUNTIME_VOLUME: &str = "volumes/kubernetes.io~empty-dir/libvirt-runtime";
/// Bound on a daemon start (socket answering) and on one virsh call.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const VIRSH_TIMEOUT_SECS: &str = "60";
/// How long a SIGTERMed daemon gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether the process runs as root.
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Whether `prog` is found on `PATH` (or in the sbin dirs, which a non-login PATH may lack).
fn have(prog: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .any(|dir| Path::new(dir).join(prog).is_file());
    found
}

/// `(uid, gid)` of [`USER`], creating it (a system user without home) when missing. Once per binary.
pub fn ensure_user() -> Result<(u32, u32), String> {
    static IDS: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    IDS.get_or_init(|| {
        if let Some(ids) = lookup_user() {
            return Ok(ids);
        }
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .map_err(|e| format!("run useradd: {e}"))?;
        // Another process may have created it meanwhile (useradd exits 9): look again either way.
        lookup_user().ok_or_else(|| {
            format!(
                "cannot create user {USER}: useradd {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    })
    .clone()
}

fn lookup_user() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// The `libvirt.discover` lines of an agent config for pods under `kubelet_root`: discovery on,
/// and [`USER`], who owns the pods' sockets, as the one allowed socket owner (KubeVirt's
/// launchers are uid 107 or 0; the test user's uid is whatever the machine gave it).
pub fn discover_yaml(kubelet_root: &Path) -> String {
    let (uid, _) = ensure_user().expect("the launcher test user");
    format!(
        "  discover:\n    enabled: true\n    kubelet_root: {}\n    socket_owners: [{uid}]\n",
        kubelet_root.display()
    )
}

/// Whether per-pod session daemons can run here; the reason when not. Checked once per binary.
pub fn session_daemons_available() -> Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            if !is_root() {
                return Err(
                    "not running as root (needed to run daemons as another user and to \
                            connect to their sockets)"
                        .to_string(),
                );
            }
            for prog in [
                "libvirtd",
                "virsh",
                "qemu-system-x86_64",
                "runuser",
                "setsid",
            ] {
                if !have(prog) {
                    return Err(format!(
                        "{prog} is not installed (scripts/setup.sh installs it)"
                    ));
                }
            }
            ensure_user().map(|_| ())
        })
        .clone()
}

/// `true` when the test can go on. Prints a skip reason and returns `false` when session daemons
/// cannot run, unless `VHA_E2E_REQUIRED=1`: then it panics with that reason.
pub fn require_session_daemons(test: &str) -> bool {
    match session_daemons_available() {
        Ok(()) => true,
        Err(reason) if e2e_required() => panic!("{test}: VHA_E2E_REQUIRED=1 but {reason}"),
        Err(reason) => {
            eprintln!("SKIPPED {test}: {reason} (set VHA_E2E_REQUIRED=1 to make this a failure)");
            false
        }
    }
}

/// A random UUID from the kernel (never one made of a single repeated digit, which libvirt rejects
/// as a `host_uuid`).
pub fn random_uuid() -> String {
    loop {
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let digits: Vec<char> = uuid.chars().filter(|c| *c != '-').collect();
        if digits.len() == 32 && digits.iter().any(|c| *c != digits[0]) {
            return uuid;
        }
    }
}

/// The test run's temp dir (`/tmp/vha-kv-XXXXXX`, owned by [`USER`], mode 0755). Removed on drop;
/// declare it before the pods so that it is dropped after them.
#[derive(Debug)]
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Result<Workspace> {
        let (uid, gid) = ensure_user().map_err(anyhow::Error::msg)?;
        let dir = tempfile::Builder::new()
            .prefix("vha-kv-")
            .tempdir_in("/tmp")
            .context("create the workspace under /tmp")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        chown(dir.path(), Some(uid), Some(gid))?;
        Ok(Workspace { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh fake kubelet root `WS/<node>` with its `pods/` dir (root-owned, as on a node).
    pub fn kubelet_root(&self, node: &str) -> Result<PathBuf> {
        let root = self.path().join(node);
        fs::create_dir_all(root.join("pods"))
            .with_context(|| format!("create {}", root.display()))?;
        Ok(root)
    }
}

/// The state of a process from `/proc/<pid>/stat`; `None` when it does not exist.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S …`: comm may contain anything, so take the state after the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// Alive: exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -s {sig} {pid} failed ({status})");
    }
    Ok(())
}

fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Live processes of `uid` whose command line or environment contains `needle`.
fn processes_mentioning(uid: u32, needle: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let owner = fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            });
        if owner.as_deref() != Some(&uid.to_string()) || !alive(pid) {
            continue;
        }
        let mentions = ["cmdline", "environ"].iter().any(|f| {
            fs::read(format!("/proc/{pid}/{f}"))
                .map(|b| contains(&b, needle.as_bytes()))
                .unwrap_or(false)
        });
        if mentions {
            out.push(pid);
        }
    }
    out
}

/// One per-pod libvirt session daemon running as [`USER`] in its own dir.
#[derive(Debug)]
pub struct SessionDaemon {
    dir: PathBuf,
    uid: u32,
    gid: u32,
    host_uuid: String,
    /// `runuser`, the daemon's parent.
    runner: Option<Child>,
    /// The libvirtd PID while it runs.
    pid: Option<u32>,
    /// SIGSTOPped.
    frozen: bool,
}

impl SessionDaemon {
    /// Create `dir` (owned by [`USER`]) with a `libvirtd.conf` carrying a random `host_uuid`, start
    /// the daemon, and wait until its socket answers.
    pub fn start(dir: PathBuf) -> Result<SessionDaemon> {
        let (uid, gid) = ensure_user().map_err(anyhow::Error::msg)?;
        let host_uuid = random_uuid();
        for sub in ["", "run", "cfg", "cfg/libvirt", "cache"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            chown(&d, Some(uid), Some(gid))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        }
        let conf = dir.join("cfg/libvirt/libvirtd.conf");
        fs::write(
            &conf,
            format!("# per-pod session daemon of a test\nhost_uuid = \"{host_uuid}\"\n"),
        )?;
        chown(&conf, Some(uid), Some(gid))?;
        let mut daemon = SessionDaemon {
            dir,
            uid,
            gid,
            host_uuid,
            runner: None,
            pid: None,
            frozen: false,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// The daemon's dir `D`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The real socket: `D/run/libvirt/libvirt-sock`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-sock")
    }

    /// `qemu+unix:///session?socket=D/run/libvirt/libvirt-sock`: for virsh (and migration targets).
    pub fn uri(&self) -> String {
        format!("qemu+unix:///session?socket={}", self.socket().display())
    }

    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// The libvirtd PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirtd.pid")
    }

    /// `pid` is this pod's libvirtd: alive, `comm` libvirtd, environment naming our runtime dir.
    fn is_ours(&self, pid: u32) -> bool {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let needle = format!("XDG_RUNTIME_DIR={}\0", self.dir.join("run").display());
        alive(pid)
            && comm.trim() == "libvirtd"
            && fs::read(format!("/proc/{pid}/environ"))
                .map(|env| contains(&env, needle.as_bytes()))
                .unwrap_or(false)
    }

    fn spawn(&mut self) -> Result<()> {
        if self.pid.is_some_and(alive) {
            bail!("the daemon in {} is already running", self.dir.display());
        }
        let stale = self.pid.take();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("libvirtd.log"))
            .context("open the daemon log")?;
        let d = self.dir.display().to_string();
        let child = Command::new("runuser")
            .args(["-u", USER, "--", "env", "-i"])
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("LC_ALL=C")
            .arg(format!("HOME={d}"))
            .arg(format!("XDG_RUNTIME_DIR={d}/run"))
            .arg(format!("XDG_CONFIG_HOME={d}/cfg"))
            .arg(format!("XDG_CACHE_HOME={d}/cache"))
            .args(["setsid", "libvirtd", "--timeout", "0"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn runuser … libvirtd")?;
        self.runner = Some(child);
        let started = Instant::now();
        loop {
            if let Some(runner) = self.runner.as_mut() {
                if let Some(status) = runner.try_wait()? {
                    self.runner = None;
                    bail!(
                        "libvirtd in {d} exited while starting ({status}); its log:\n{}",
                        self.log_tail(20)
                    );
                }
            }
            let pid = fs::read_to_string(self.pid_file())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|p| Some(*p) != stale && self.is_ours(*p));
            if let Some(pid) = pid {
                if UnixStream::connect(self.socket()).is_ok() {
                    self.pid = Some(pid);
                    return Ok(());
                }
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "libvirtd in {d} did not answer on {} within {START_TIMEOUT:?}; its log:\n{}",
                    self.socket().display(),
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Reap `runuser` once the daemon is gone (resuming it first: `runuser` stops itself when its
    /// child is stopped); kill it if it lingers.
    fn reap_runner(&mut self) {
        if let Some(mut runner) = self.runner.take() {
            let _ = signal(runner.id(), "CONT");
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match runner.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = runner.kill();
                        let _ = runner.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }

    /// SIGKILL the daemon (QEMU processes survive, as they do a libvirtd crash) and wait for it.
    pub fn kill(&mut self) -> Result<()> {
        let Some(pid) = self.pid else {
            bail!("the daemon in {} is not running", self.dir.display());
        };
        signal(pid, "KILL")?;
        if !wait_dead(pid, Duration::from_secs(5)) {
            bail!("libvirtd {pid} survived SIGKILL for 5s");
        }
        self.frozen = false;
        self.reap_runner();
        Ok(())
    }

    /// SIGTERM the daemon (SIGKILL after a grace period) and wait for it. QEMU processes survive.
    pub fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.pid else {
            return Ok(());
        };
        if self.frozen {
            self.thaw()?;
        }
        if alive(pid) {
            signal(pid, "TERM")?;
            if !wait_dead(pid, STOP_GRACE) {
                eprintln!("libvirtd {pid} ignored SIGTERM for {STOP_GRACE:?}: SIGKILL");
                let _ = signal(pid, "KILL");
                wait_dead(pid, Duration::from_secs(5));
            }
        }
        self.reap_runner();
        Ok(())
    }

    /// Start the daemon again with the same dirs, after [`kill`](Self::kill) or [`stop`](Self::stop).
    pub fn restart(&mut self) -> Result<()> {
        self.spawn()
    }

    /// SIGSTOP the daemon: it hangs, its socket still accepts connections.
    pub fn freeze(&mut self) -> Result<()> {
        let pid = self.pid.context("daemon not running")?;
        signal(pid, "STOP")?;
        self.frozen = true;
        Ok(())
    }

    /// SIGCONT the daemon (and `runuser`, which stopped itself when its child stopped).
    pub fn thaw(&mut self) -> Result<()> {
        let pid = self.pid.context("daemon not running")?;
        signal(pid, "CONT")?;
        if let Some(runner) = &self.runner {
            let _ = signal(runner.id(), "CONT");
        }
        self.frozen = false;
        Ok(())
    }

    /// `virsh -q -c <uri> ARGS…` (bounded); stdout, or an error with the command and its stderr.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let uri = self.uri();
        let out = Command::new("timeout")
            .args([VIRSH_TIMEOUT_SECS, "virsh", "-q", "-c", &uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run virsh")?;
        if !out.status.success() {
            bail!(
                "`virsh -c {uri} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Define (persistently) the minimal TCG domain of `vmi`, with its KubeVirt metadata.
    pub fn define(&self, vmi: &Vmi) -> Result<()> {
        let xml = domain_xml(&vmi.domain_name(), Virt::Qemu, Some(&vmi.uid));
        let mut file = tempfile::NamedTempFile::new().context("temp file for domain XML")?;
        file.write_all(xml.as_bytes())?;
        let path = file.path().to_string_lossy().into_owned();
        self.virsh(&["define", &path])
            .with_context(|| format!("define {}", vmi.domain_name()))
            .map(|_| ())
    }

    pub fn start_domain(&self, vmi: &Vmi) -> Result<()> {
        self.virsh(&["start", &vmi.domain_name()]).map(|_| ())
    }

    pub fn destroy_domain(&self, vmi: &Vmi) -> Result<()> {
        self.virsh(&["destroy", &vmi.domain_name()]).map(|_| ())
    }

    /// Names of the active domains (`virsh list --name`).
    pub fn active_domains(&self) -> Result<Vec<String>> {
        Ok(self
            .virsh(&["list", "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// `virsh migrate --live NAME DEST --migrateuri tcp://127.0.0.1:PORT` to another pod's daemon.
    pub fn migrate_to(&self, vmi: &Vmi, dest: &SessionDaemon, port: u16) -> Result<()> {
        let migrate_uri = format!("tcp://127.0.0.1:{port}");
        self.virsh(&[
            "migrate",
            "--live",
            &vmi.domain_name(),
            &dest.uri(),
            "--migrateuri",
            &migrate_uri,
        ])
        .map(|_| ())
    }

    /// Clients connected to the daemon's main server, from its admin socket (`virt-admin
    /// srv-clients-list libvirtd` as [`USER`]; the admin connection itself is on the admin
    /// server).
    pub fn clients(&self) -> Result<usize> {
        let admin = format!(
            "libvirtd:///session?socket={}",
            self.dir.join("run/libvirt/libvirt-admin-sock").display()
        );
        // The admin server only lets the daemon's own user in.
        let out = Command::new("timeout")
            .args([VIRSH_TIMEOUT_SECS, "runuser", "-u", USER, "--"])
            .args([
                "virt-admin",
                "-q",
                "-c",
                &admin,
                "srv-clients-list",
                "libvirtd",
            ])
            .stdin(Stdio::null())
            .output()
            .context("run virt-admin")?;
        if !out.status.success() {
            bail!(
                "`virt-admin -c {admin} srv-clients-list libvirtd` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // A header, a dashed rule, then one row per client whose first column is its id.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|id| id.parse::<u64>().is_ok())
            })
            .count())
    }

    /// Live processes that belong to this pod (libvirtd, QEMU, virtlogd).
    pub fn processes(&self) -> Vec<u32> {
        processes_mentioning(self.uid, &format!("{}/", self.dir.display()))
    }

    /// Terminate everything of this pod and wait for it; errors are printed, never raised.
    fn terminate_all(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping libvirtd in {}: {e:#}", self.dir.display());
        }
        let leftovers = self.processes();
        for pid in &leftovers {
            let _ = signal(*pid, "KILL");
        }
        for pid in leftovers {
            if !wait_dead(pid, Duration::from_secs(5)) {
                eprintln!("process {pid} of {} survived SIGKILL", self.dir.display());
            }
        }
        self.pid = None;
    }

    /// Terminate every process of the pod and remove its dir (pod deletion).
    pub fn destroy_all(&mut self) -> Result<()> {
        self.terminate_all();
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("remove {}", self.dir.display()))?;
        }
        Ok(())
    }

    /// The uid/gid the daemon runs as.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }
}

impl Drop for SessionDaemon {
    fn drop(&mut self) {
        self.terminate_all();
        if std::thread::panicking() && self.dir.exists() {
            eprintln!(
                "---- libvirtd log of {} ----\n{}\n----",
                self.dir.display(),
                self.log_tail(15)
            );
        }
        if self.dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                eprintln!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// A KubeVirt VMI: the domain is named `<namespace>_<name>` and carries `<kubevirt><uid>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vmi {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Vmi {
    pub fn new(namespace: &str, name: &str) -> Vmi {
        Vmi {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: random_uuid(),
        }
    }

    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }

    /// `(namespace, name)`: how the exported series name this VMI.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// A simulated virt-launcher pod: a session daemon, and (once published) its socket at the
/// KubeVirt path under a kubelet root.
#[derive(Debug)]
pub struct Pod {
    /// The kubelet pod UID (a random UUID, 36 characters as on a real node).
    pub uid: String,
    pub tag: String,
    pod_dir: PathBuf,
    pub daemon: SessionDaemon,
    /// Whether the runtime volume is mounted (by [`publish`](Self::publish)).
    mounted: std::sync::atomic::AtomicBool,
}

impl Pod {
    /// Start the pod's daemon in `WS/<tag>`; its socket is not visible under `kubelet_root` until
    /// [`publish`](Self::publish).
    pub fn start(ws: &Workspace, kubelet_root: &Path, tag: &str) -> Result<Pod> {
        let uid = random_uuid();
        let daemon = SessionDaemon::start(ws.path().join(tag))
            .with_context(|| format!("start the daemon of pod {tag}"))?;
        Ok(Pod {
            pod_dir: kubelet_root.join("pods").join(&uid),
            uid,
            tag: tag.to_string(),
            daemon,
            mounted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Make the daemon's socket appear at `<kubelet_root>/pods/<uid>/volumes/kubernetes.io~empty-dir/
    /// libvirt-runtime/libvirt-sock`: the daemon's runtime dir bind-mounted there. Returns when it is
    /// there. A restarted daemon's new socket is there too.
    pub fn publish(&self) -> Result<Instant> {
        let volume = self.pod_dir.join(RUNTIME_VOLUME);
        fs::create_dir_all(&volume).with_context(|| format!("create {}", volume.display()))?;
        let run = self.daemon.socket();
        let run = run
            .parent()
            .context("the daemon's socket has a directory")?;
        let out = Command::new("mount")
            .arg("--bind")
            .arg(run)
            .arg(&volume)
            .stdin(Stdio::null())
            .output()
            .context("run mount --bind")?;
        if !out.status.success() {
            bail!(
                "mount --bind {} {}: {}",
                run.display(),
                volume.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.mounted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Instant::now())
    }

    /// Undo [`publish`](Self::publish)'s mount (lazily, if it is busy); the socket leaves the
    /// kubelet dir.
    fn unmount(&self) {
        if !self
            .mounted
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let volume = self.pod_dir.join(RUNTIME_VOLUME);
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&volume)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("unmounting {}: failed", volume.display());
        }
    }

    /// The socket's path under the kubelet root.
    pub fn socket_path(&self) -> PathBuf {
        self.pod_dir.join(RUNTIME_VOLUME).join(SOCKET_NAME)
    }

    /// The `connection` label the agent gives this pod's connection.
    pub fn connection_label(&self) -> String {
        format!(
            "qemu+unix:///session?socket={}",
            self.socket_path().display()
        )
    }

    /// Delete the pod as the kubelet would: kill its processes (daemon, QEMU), then remove its
    /// kubelet dir; returns when the kubelet dir was removed. The daemon's own dir goes too.
    pub fn delete(&mut self) -> Result<Instant> {
        self.daemon.terminate_all();
        self.unmount();
        fs::remove_dir_all(&self.pod_dir)
            .with_context(|| format!("remove {}", self.pod_dir.display()))?;
        let removed = Instant::now();
        self.daemon.destroy_all()?;
        Ok(removed)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.unmount();
        if self.pod_dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.pod_dir) {
                eprintln!("removing {}: {e}", self.pod_dir.display());
            }
        }
    }
}

/// Run `start(i)` for every `i` in `0..n` on at most `workers` threads (a work queue taken in
/// index order) and return the results in index order. Once all have ended, panics naming every
/// failure (a panic in `start` is one); what did start is dropped, and so cleaned, by the
/// unwinding.
pub fn start_all<T: Send>(
    n: usize,
    workers: usize,
    start: impl Fn(usize) -> Result<T> + Sync,
) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: std::sync::Mutex<Vec<Option<Result<T>>>> =
        std::sync::Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(i)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("starting #{i} panicked")));
                slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(result);
            });
        }
    });
    let mut started = Vec::with_capacity(n);
    let mut errors = Vec::new();
    let slots = slots.into_inner().unwrap_or_else(|p| p.into_inner());
    for r in slots.into_iter().flatten() {
        match r {
            Ok(t) => started.push(t),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    assert!(errors.is_empty(), "starting pods: {}", errors.join("\n"));
    started
}

/// A free TCP port on 127.0.0.1 (for a migration stream).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("read /proc/{pid}/fd"))?
        .count())
}

/// Open descriptors of process `pid` once they stop changing (3 equal samples 100 ms apart, at
/// most 3 s); an unreadable count is 0.
pub fn settled_fds(pid: u32) -> usize {
    let mut last = fd_count(pid).unwrap_or(0);
    let mut same = 0;
    let start = Instant::now();
    while same < 3 && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid).unwrap_or(0);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}
