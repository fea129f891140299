//! A private libvirt daemon for the live benchmark: a libvirt *session* daemon (the same QEMU
//! driver and RPC protocol as the system daemon) run as the unprivileged user [`USER`] with its
//! own runtime dirs under `/tmp/vhb-<pid>`, reached at
//! `qemu+unix:///session?socket=<dir>/run/libvirt/libvirt-sock`.
//!
//! Why: the system daemon of a shared machine serves other people's tests; their domain
//! transitions cost libvirtd CPU and send the agent events, which swamps idle figures measured in
//! milliseconds per minute. A daemon nobody else talks to measures only the agent and the peer.
//!
//! Cleanup (also after an error): the daemon is stopped by its PID (SIGTERM, then SIGKILL), then
//! every remaining process of [`USER`] whose environment names this run's dir (QEMU, the virtlogd
//! the daemon spawned) is killed by PID, and the dir is removed.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

/// The unprivileged user the private daemon runs as (created when missing).
pub const USER: &str = "vha-bench";

#[derive(Debug)]
pub struct PrivateDaemon {
    dir: PathBuf,
    runuser: Child,
    pub pid: u32,
    pub uri: String,
}

fn ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn ensure_user() -> Result<(u32, u32)> {
    if let Some(i) = ids() {
        return Ok(i);
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
        .context("run useradd")?;
    ids().with_context(|| {
        format!(
            "cannot create user {USER}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

impl PrivateDaemon {
    pub fn start() -> Result<PrivateDaemon> {
        let (uid, gid) = ensure_user()?;
        // Short: unix socket paths hold at most 107 bytes.
        let dir = PathBuf::from(format!("/tmp/vhb-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).ok();
        }
        for sub in ["", "run", "cfg", "cache"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d)?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
            chown(&d, Some(uid), Some(gid))?;
        }
        let log = std::fs::File::create(dir.join("libvirtd.log"))?;
        chown(dir.join("libvirtd.log"), Some(uid), Some(gid))?;
        let d = dir.display().to_string();
        let runuser = Command::new("runuser")
            .args(["-u", USER, "--", "env", "-i"])
            .arg(format!("HOME={d}"))
            .arg(format!("XDG_RUNTIME_DIR={d}/run"))
            .arg(format!("XDG_CONFIG_HOME={d}/cfg"))
            .arg(format!("XDG_CACHE_HOME={d}/cache"))
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["setsid", "libvirtd", "--timeout", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn runuser … libvirtd (session daemon)")?;
        let uri = format!("qemu+unix:///session?socket={d}/run/libvirt/libvirt-sock");
        let pidfile = dir.join("run/libvirt/libvirtd.pid");
        let mut me = PrivateDaemon {
            dir,
            runuser,
            pid: 0,
            uri,
        };
        let start = Instant::now();
        loop {
            if me.pid == 0 {
                if let Some(pid) = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .filter(|p| util::pid_is(*p, "libvirtd"))
                {
                    me.pid = pid;
                }
            }
            let answers = me.pid != 0
                && Command::new("timeout")
                    .args(["10", "virsh", "-q", "-c", &me.uri, "version"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            if answers {
                return Ok(me);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(me.dir.join("libvirtd.log")).unwrap_or_default();
                me.stop();
                bail!("the private libvirtd did not answer within 30 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stop the daemon and everything it left behind. Never fails; prints what it could not do.
    pub fn stop(&mut self) {
        if self.pid != 0 && util::pid_is(self.pid, "libvirtd") {
            util::signal(self.pid, libc::SIGTERM);
            let t = Instant::now();
            while util::pid_is(self.pid, "libvirtd") && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if util::pid_is(self.pid, "libvirtd") {
                util::signal(self.pid, libc::SIGKILL);
            }
        }
        let _ = self.runuser.wait();
        // QEMU outlives libvirtd; virtlogd was spawned by it: ours are the processes of USER whose
        // command line or environment names our dir.
        let needle = self.dir.display().to_string();
        if let Some((uid, _)) = ids() {
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let owner = std::fs::read_to_string(e.path().join("status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("Uid:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
                    });
                if owner != Some(uid) {
                    continue;
                }
                let mut text = std::fs::read(e.path().join("environ")).unwrap_or_default();
                text.extend(std::fs::read(e.path().join("cmdline")).unwrap_or_default());
                if String::from_utf8_lossy(&text).contains(&needle) {
                    util::signal(pid, libc::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if self.dir.exists() {
                eprintln!("live: could not remove {}: {e}", self.dir.display());
            }
        }
    }
}
