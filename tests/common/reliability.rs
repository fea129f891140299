//! Helpers for the reliability tests (`tests/e2e_reliability.rs`), on top of the per-pod session
//! daemons of [`super::session`] (which the tests kill, hang and restart; never the shared system
//! daemon): domain definitions with a fixed UUID, the PID of a domain's QEMU, the agent's resource
//! use from `/proc`, the exported series as comparable keys, the truth from `virsh`, and a seeded
//! PRNG.

use std::fmt;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::libvirt::{domain_xml, Virt};
use super::receiver::{Recorded, Series};
use super::session::SessionDaemon;

/// Send `signal` (`KILL`, `TERM`, …) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// `/proc/PID/comm` and the real uid of a live (non-zombie) process.
fn proc_identity(pid: u32) -> Option<(String, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l[key.len()..].trim().to_string())
    };
    if field("State:")?.starts_with('Z') {
        return None;
    }
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    Some((field("Name:")?, uid))
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Define the minimal domain `name` ([`domain_xml`]) on a session daemon: KubeVirt metadata when
/// `kubevirt_uid` is given, a fixed domain UUID when `uuid` is (redefining a domain must keep it).
pub fn define(
    d: &SessionDaemon,
    name: &str,
    virt: Virt,
    kubevirt_uid: Option<&str>,
    uuid: Option<&str>,
) -> Result<()> {
    let mut xml = domain_xml(name, virt, kubevirt_uid);
    if let Some(uuid) = uuid {
        xml = xml.replacen("</name>", &format!("</name>\n  <uuid>{uuid}</uuid>"), 1);
    }
    let mut file = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut file, xml.as_bytes())?;
    d.virsh(&["define", &file.path().to_string_lossy()])
        .with_context(|| format!("define {name}"))
        .map(|_| ())
}

/// PID of the QEMU process of an active domain of `d` (from libvirt's PID file, checked: a live
/// `qemu-system*` of the daemon's user).
pub fn qemu_pid(d: &SessionDaemon, name: &str) -> Option<u32> {
    let pid = read_pid(&d.dir().join(format!("run/libvirt/qemu/run/{name}.pid")))?;
    let (comm, uid) = proc_identity(pid)?;
    (comm.starts_with("qemu-system") && uid == d.owner().0).then_some(pid)
}

/// Resource use of a process, from `/proc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

impl fmt::Display for ProcStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB, {} threads, {} fds",
            self.rss_kib as f64 / 1024.0,
            self.threads,
            self.fds
        )
    }
}

pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |key: &str| -> Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l[key.len()..].split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("read /proc/{pid}/fd"))?
        .count() as u64;
    Ok(ProcStats {
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
        fds,
    })
}

/// One exported VM as the tests compare it: (namespace, name, hypervisor_type).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub namespace: Option<String>,
    pub name: String,
    pub hypervisor_type: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{} ({})", self.name, self.hypervisor_type),
            None => write!(f, "{} ({})", self.name, self.hypervisor_type),
        }
    }
}

impl Key {
    pub fn of(series: &Series) -> Key {
        Key {
            namespace: series.attr("namespace").map(String::from),
            name: series.attr("name").unwrap_or_default().to_string(),
            hypervisor_type: series
                .attr("hypervisor_type")
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// What the agent must export for a domain named `name` whose live XML is `xml`: KubeVirt
    /// metadata makes it a VMI (`<ns>_<vmi>` split at the first `_`), the root `type` gives the
    /// hypervisor type.
    pub fn expected(name: &str, xml: &str) -> Key {
        let kubevirt = xml.contains("xmlns=\"http://kubevirt.io\"")
            || xml.contains("xmlns='http://kubevirt.io'");
        let (namespace, vmi) = match name.split_once('_') {
            Some((ns, vmi)) if kubevirt => (Some(ns.to_string()), vmi.to_string()),
            _ => (None, name.to_string()),
        };
        let root = xml.split('>').next().unwrap_or_default();
        let hypervisor_type = if root.contains("type='kvm'") || root.contains("type=\"kvm\"") {
            "kvm"
        } else if root.contains("type='qemu'") || root.contains("type=\"qemu\"") {
            "qemu-tcg"
        } else {
            "unknown"
        };
        Key {
            namespace,
            name: vmi,
            hypervisor_type: hypervisor_type.to_string(),
        }
    }
}

/// The sorted keys of a series set (duplicates kept: they would be a bug).
pub fn keys(series: &[Series]) -> Vec<Key> {
    let mut k: Vec<Key> = series.iter().map(Key::of).collect();
    k.sort();
    k
}

pub fn describe_keys(keys: &[Key]) -> String {
    if keys.is_empty() {
        return "  (none)".to_string();
    }
    keys.iter()
        .map(|k| format!("  {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The truth of one daemon from `virsh`: every active domain and what must be exported for it
/// (from its live XML).
pub fn truth_of(virsh: impl Fn(&[&str]) -> Result<String>) -> Result<Vec<Key>> {
    truth_of_some(virsh, |_| true)
}

/// [`truth_of`] for the domains whose name satisfies `keep` (on a shared daemon, other users'
/// domains come and go: they are not even read).
pub fn truth_of_some(
    virsh: impl Fn(&[&str]) -> Result<String>,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Key>> {
    let names = virsh(&["list", "--name"])?;
    let mut out = Vec::new();
    for name in names
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && keep(l))
    {
        let xml = virsh(&["dumpxml", name])?;
        out.push(Key::expected(name, &xml));
    }
    out.sort();
    Ok(out)
}

/// The value of a per-connection self-metric (`virt_hypervisor_agent_connection_up`,
/// `…_reconnects`) for `uri` in one request.
pub fn conn_value(req: &Recorded, metric: &str, uri: &str) -> Option<f64> {
    req.series(metric)
        .iter()
        .find(|s| s.attr("connection") == Some(uri))
        .map(|s| s.value.as_f64())
}

/// A small seeded PRNG (SplitMix64): reproducible from the printed seed, no extra crate.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `true` with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}
