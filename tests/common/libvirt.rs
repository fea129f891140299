//! Drive a real libvirt system daemon (`qemu:///system`) through `virsh` for end-to-end tests.
//!
//! Domains are minimal (32 MiB, 1 vCPU, no disk, a pty serial: QEMU idles after SeaBIOS) and named
//! `vha-t-<pid>-<run>-<n>-<tag>` so that parallel tests, parallel runs and other users of the same daemon
//! never collide; `scripts/libvirtd.sh stop` removes leftovers with that prefix. A [`TestDomain`]
//! destroys and undefines its domain on drop, and never panics doing so.
//!
//! Gating: [`require_libvirtd`] skips a test with a printed reason when no daemon answers, or fails it
//! when `VHA_E2E_REQUIRED=1` (as `scripts/test.sh` and CI set). [`kvm_available`] says whether
//! `type='kvm'` domains can run; tests that need KVM skip with a printed reason, never fail.

use std::fmt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

pub const URI: &str = "qemu:///system";
/// Every test domain name (and KubeVirt namespace) starts with this.
pub const NAME_PREFIX: &str = "vha-t-";
/// Bound on one virsh call (a `start` takes well under a second here).
const VIRSH_TIMEOUT_SECS: &str = "60";

/// Run `virsh -c qemu:///system ARGS…` (bounded by `timeout`); stdout on success, an error carrying
/// the command and its stderr otherwise.
pub fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("timeout")
        .args([VIRSH_TIMEOUT_SECS, "virsh", "-q", "-c", URI])
        .args(args)
        .output()
        .context("run virsh (is libvirt-clients installed?)")?;
    if !out.status.success() {
        bail!(
            "`virsh -c {URI} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `VHA_E2E_REQUIRED=1`: a missing libvirtd fails the e2e tests instead of skipping them.
pub fn e2e_required() -> bool {
    std::env::var("VHA_E2E_REQUIRED").is_ok_and(|v| v == "1")
}

/// Whether the system daemon answers; the reason when not. Checked once per test binary.
pub fn libvirtd_available() -> Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            virsh(&["version"]).map(|_| ()).map_err(|e| {
                format!("no libvirt daemon answers on {URI} (start it with scripts/libvirtd.sh start): {e:#}")
            })
        })
        .clone()
}

/// `true` when the test can go on. Prints a skip reason and returns `false` when libvirtd is
/// missing, unless `VHA_E2E_REQUIRED=1`: then it panics with that reason.
pub fn require_libvirtd(test: &str) -> bool {
    match libvirtd_available() {
        Ok(()) => true,
        Err(reason) if e2e_required() => {
            panic!("{test}: VHA_E2E_REQUIRED=1 but {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED {test}: {reason} (set VHA_E2E_REQUIRED=1 to make this a failure)");
            false
        }
    }
}

/// Whether `type='kvm'` domains can run: `/dev/kvm` opens read-write and libvirt reports KVM
/// domain capabilities. The reason when not. Checked once per test binary.
pub fn kvm_available() -> Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
            virsh(&["domcapabilities", "--virttype", "kvm"])
                .map(|_| ())
                .map_err(|e| format!("libvirt has no KVM support: {e:#}"))
        })
        .clone()
}

/// The `type` attribute of `<domain>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virt {
    /// Hardware virtualisation (`type='kvm'`), exported as `kvm`.
    Kvm,
    /// Software emulation (`type='qemu'`, TCG), exported as `qemu-tcg`.
    Qemu,
}

impl Virt {
    pub fn domain_type(self) -> &'static str {
        match self {
            Virt::Kvm => "kvm",
            Virt::Qemu => "qemu",
        }
    }

    /// The `hypervisor_type` the agent must export for this type.
    pub fn hypervisor_type(self) -> &'static str {
        match self {
            Virt::Kvm => "kvm",
            Virt::Qemu => "qemu-tcg",
        }
    }
}

impl fmt::Display for Virt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.domain_type())
    }
}

/// A minimal domain: 32 MiB, 1 vCPU, no disk, a pty serial; KubeVirt metadata with `uid` when given.
pub fn domain_xml(name: &str, virt: Virt, kubevirt_uid: Option<&str>) -> String {
    let metadata = kubevirt_uid
        .map(|uid| {
            format!(
                "  <metadata>\n    <kubevirt xmlns=\"http://kubevirt.io\">\n      <uid>{uid}</uid>\n    \
                 </kubevirt>\n  </metadata>\n"
            )
        })
        .unwrap_or_default();
    format!(
        "<domain type='{ty}'>\n  <name>{name}</name>\n{metadata}  <memory unit='MiB'>32</memory>\n  \
         <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  \
         <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  \
         <on_crash>destroy</on_crash>\n  <devices>\n    <serial type='pty'/>\n    \
         <console type='pty'/>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
        ty = virt.domain_type()
    )
}

/// A token that differs between test runs (so a leftover of an earlier run with the same pid never
/// collides).
fn run_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0);
        format!("{:x}", nanos & 0xffff)
    })
}

fn next_id() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `vha-t-<pid>-<run>-<n>`: unique on this daemon.
pub fn unique_base() -> String {
    format!(
        "{NAME_PREFIX}{}-{}-{}",
        std::process::id(),
        run_token(),
        next_id()
    )
}

/// A unique domain name ending in `-<tag>`.
pub fn unique_name(tag: &str) -> String {
    format!("{}-{tag}", unique_base())
}

/// A UUID-shaped identifier, unique per call within the run (for KubeVirt `<uid>`).
pub fn unique_uid() -> String {
    let n = next_id();
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        std::process::id(),
        n & 0xffff,
        (u64::from(n) << 16) | u64::from_str_radix(run_token(), 16).unwrap_or(0)
    )
}

/// KubeVirt identity of a test domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubevirtIdentity {
    pub namespace: String,
    pub vmi: String,
    pub uid: String,
}

/// A defined domain; destroyed and undefined on drop.
#[derive(Debug)]
pub struct TestDomain {
    name: String,
    virt: Virt,
    kubevirt: Option<KubevirtIdentity>,
}

impl TestDomain {
    /// Define a plain (non-KubeVirt) domain named `vha-t-…-<tag>`. Not started.
    pub fn define(tag: &str, virt: Virt) -> Result<TestDomain> {
        Self::define_named(unique_name(tag), virt, None)
    }

    /// Define a KubeVirt-style domain `<namespace>_<vmi>` with `<kubevirt><uid>` metadata; the
    /// namespace is unique (`vha-t-…`), the VMI name is `vmi-<tag>`. Not started.
    pub fn define_kubevirt(tag: &str, virt: Virt) -> Result<TestDomain> {
        let identity = KubevirtIdentity {
            namespace: unique_base(),
            vmi: format!("vmi-{tag}"),
            uid: unique_uid(),
        };
        let name = format!("{}_{}", identity.namespace, identity.vmi);
        Self::define_named(name, virt, Some(identity))
    }

    /// Define a plain domain (no KubeVirt metadata) named `<unique namespace>_<vmi>`: it looks like
    /// a VMI's name but is exported under its full name until it is given the metadata.
    pub fn define_vmi_named_plain(vmi: &str, virt: Virt) -> Result<TestDomain> {
        Self::define_named(format!("{}_{vmi}", unique_base()), virt, None)
    }

    fn define_named(
        name: String,
        virt: Virt,
        kubevirt: Option<KubevirtIdentity>,
    ) -> Result<TestDomain> {
        let xml = domain_xml(&name, virt, kubevirt.as_ref().map(|k| k.uid.as_str()));
        let mut file = tempfile::NamedTempFile::new().context("temp file for domain XML")?;
        std::io::Write::write_all(&mut file, xml.as_bytes())?;
        let path = file.path().to_string_lossy().into_owned();
        virsh(&["define", &path]).with_context(|| format!("define domain {name}"))?;
        Ok(TestDomain {
            name,
            virt,
            kubevirt,
        })
    }

    /// The libvirt domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn virt(&self) -> Virt {
        self.virt
    }

    pub fn kubevirt(&self) -> Option<&KubevirtIdentity> {
        self.kubevirt.as_ref()
    }

    /// The `name` attribute the agent must export: the VMI name for KubeVirt domains, else the
    /// domain name.
    pub fn exported_name(&self) -> &str {
        self.kubevirt
            .as_ref()
            .map(|k| k.vmi.as_str())
            .unwrap_or(&self.name)
    }

    /// The `namespace` attribute the agent must export (`None`: absent).
    pub fn exported_namespace(&self) -> Option<&str> {
        self.kubevirt.as_ref().map(|k| k.namespace.as_str())
    }

    pub fn start(&self) -> Result<()> {
        virsh(&["start", &self.name]).map(|_| ())
    }

    /// Start with vCPUs stopped (cheap; the domain is active, state paused).
    pub fn start_paused(&self) -> Result<()> {
        virsh(&["start", "--paused", &self.name]).map(|_| ())
    }

    pub fn suspend(&self) -> Result<()> {
        virsh(&["suspend", &self.name]).map(|_| ())
    }

    pub fn resume(&self) -> Result<()> {
        virsh(&["resume", &self.name]).map(|_| ())
    }

    pub fn destroy(&self) -> Result<()> {
        virsh(&["destroy", &self.name]).map(|_| ())
    }

    /// `virsh domstate` (`running`, `paused`, `shut off`, …).
    pub fn state(&self) -> Result<String> {
        virsh(&["domstate", &self.name]).map(|s| s.trim().to_string())
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        // Either may fail (not running, already gone): fine, the goal is that nothing is left.
        let _ = virsh(&["destroy", &self.name]);
        if let Err(e) = virsh(&["undefine", &self.name]) {
            if !e.to_string().contains("ailed to get domain") {
                eprintln!("cleanup of test domain {}: {e:#}", self.name);
            }
        }
    }
}
