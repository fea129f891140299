//! Self-confinement with Landlock: once the configuration is loaded and before the first thread
//! or connection, the agent gives up every file-system and TCP access it does not need.
//!
//! On a KubeVirt node the agent is root (with `CAP_DAC_OVERRIDE`) and runs libvirt's client on
//! what tenant-controlled launcher daemons send. Should that ever be exploited, the process can
//! still only:
//! - read the files of [`Plan::for_config`]: its config, TLS material, the machine id, the KVM
//!   and MSHV devices and their sysfs entries, libvirt's client config, the name-resolution files, and the
//!   system libraries (`/usr`, read and execute);
//! - list directories (and nothing else) under the discovery roots: another pod's
//!   `kubernetes.io~secret` files cannot be read (`EACCES`);
//! - write no file anywhere;
//! - connect over TCP only to the export endpoint's port (and to the ports of `qemu+tcp`/`qemu+tls`
//!   URIs), bind no TCP port.
//!
//! Not covered (Landlock up to ABI 6 has no right for them): `connect()` to a unix socket path
//! (the libvirt connection itself), UDP (name resolution), descriptors opened before confinement.
//! Landlock applies to the calling thread and the threads it creates later, so
//! [`apply`] must run before the async runtime and the libvirt event thread start.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, ABI,
};

use crate::config::AgentConfig;

/// The newest Landlock ABI this code asks for (handled best-effort on older kernels).
const ABI_WANTED: ABI = ABI::V6;

/// What confinement achieved, for the `virt_hypervisor_agent_landlock` self-metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Every access right asked for is enforced.
    Full,
    /// The kernel's Landlock is older than the rights asked for: some are enforced.
    Partial,
    /// No Landlock on this kernel (or it failed): nothing is enforced.
    None,
    /// Switched off (`security.landlock: false`), or a libvirt transport that needs more.
    Off,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Full => "full",
            Status::Partial => "partial",
            Status::None => "none",
            Status::Off => "off",
        }
    }
}

static STATUS: OnceLock<Status> = OnceLock::new();

/// The outcome of [`apply`] in this process; `None` when it was never called (the `inventory`
/// and `check-config` commands, in-process tests).
pub fn status() -> Option<Status> {
    STATUS.get().copied()
}

/// What the confined process may still do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files or directories to read (directories: recursively, with listing).
    pub read: Vec<PathBuf>,
    /// Directories to read and execute from (system libraries, helper programs).
    pub read_exec: Vec<PathBuf>,
    /// Directories that may only be listed (the discovery roots).
    pub list: Vec<PathBuf>,
    /// Devices that may be opened for reading and queried (`ioctl`): the KVM device.
    pub devices: Vec<PathBuf>,
    /// TCP ports that may be connected to; `None`: TCP is not restricted.
    pub tcp_connect: Option<Vec<u16>>,
    /// TCP ports that may be bound (the health endpoint's, `health.listen`); only enforced
    /// together with `tcp_connect`.
    pub tcp_bind: Vec<u16>,
    /// Why confinement is off for this configuration, if it is.
    pub off: Option<String>,
}

/// Files the libvirt client, glibc's name resolution and the Rust runtime read.
const SYSTEM_FILES: &[&str] = &[
    "/etc/libvirt",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/etc/ld.so.cache",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/proc/self",
    "/sys/fs/cgroup",
    "/sys/devices/system/cpu",
    "/sys/devices/virtual/misc",
    "/sys/class/misc",
    "/dev/urandom",
    "/dev/null",
];

/// System libraries and programs: read and execute (glibc loads NSS modules at run time).
const SYSTEM_CODE: &[&str] = &["/usr", "/lib", "/lib64"];

/// Devices the node capability checks open and query.
const DEVICES: &[&str] = &[crate::node::kvm::KVM_DEVICE, crate::node::mshv::MSHV_DEVICE];

/// The port of an `http(s)://` URL (its scheme's default when it names none).
fn url_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let after_host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.1,
        None => host_port.rsplit_once(':').map_or("", |(_, p)| p),
    };
    let explicit = after_host.trim_start_matches(':');
    if !explicit.is_empty() {
        return explicit.parse().ok();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// What a libvirt URI needs beyond unix sockets: `Err` for a transport that runs a program or
/// needs files confinement would refuse (ssh, ext), `Ok(Some(port))` for TCP, `Ok(None)` else.
fn libvirt_transport(uri: &str) -> Result<Option<u16>, String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(None);
    };
    let transport = scheme.split_once('+').map(|(_, t)| t.to_ascii_lowercase());
    let port = |default: u16| {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let port = authority
            .rsplit('@')
            .next()
            .and_then(|h| h.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok());
        Ok(Some(port.unwrap_or(default)))
    };
    match transport.as_deref() {
        None | Some("unix") => Ok(None),
        Some("tcp") => port(16509),
        Some("tls") => port(16514),
        Some(other) => Err(format!(
            "the libvirt URI {uri:?} uses the {other} transport, which runs a program"
        )),
    }
}

impl Plan {
    /// Whether this plan, already applied, allows everything `other` needs (a reloaded
    /// configuration's plan); `Err` names the first access it does not.
    pub fn covers(&self, other: &Plan) -> Result<(), String> {
        if self.off.is_some() {
            return Ok(());
        }
        if let Some(why) = &other.off {
            // Confinement cannot be lifted from a running process.
            return Err(format!("to run unconfined ({why})"));
        }
        let under = |path: &PathBuf, allowed: &[&Vec<PathBuf>]| {
            allowed
                .iter()
                .any(|set| set.iter().any(|a| path.starts_with(a)))
        };
        for path in &other.read {
            if !under(path, &[&self.read, &self.read_exec]) {
                return Err(format!("read access to {}", path.display()));
            }
        }
        for path in &other.list {
            if !under(path, &[&self.list, &self.read]) {
                return Err(format!("listing {}", path.display()));
            }
        }
        if let (Some(allowed), Some(wanted)) = (&self.tcp_connect, &other.tcp_connect) {
            if let Some(port) = wanted.iter().find(|p| !allowed.contains(p)) {
                return Err(format!("TCP connections to port {port}"));
            }
        }
        if let Some(port) = other.tcp_bind.iter().find(|p| !self.tcp_bind.contains(p)) {
            return Err(format!("binding TCP port {port}"));
        }
        Ok(())
    }

    /// The accesses the agent needs with `cfg`, exporting to `endpoint` (`None`: no network
    /// export) with the TLS files `tls`.
    pub fn for_config(
        cfg: &AgentConfig,
        config_file: Option<&Path>,
        endpoint: Option<&str>,
        tls: &[PathBuf],
    ) -> Plan {
        let mut plan = Plan::default();
        if !cfg.security.landlock {
            plan.off = Some("security.landlock is false".into());
            return plan;
        }
        let mut ports = Vec::new();
        for uri in &cfg.libvirt.uris {
            match libvirt_transport(uri) {
                Ok(Some(port)) => ports.push(port),
                Ok(None) => {}
                Err(why) => {
                    plan.off = Some(why);
                    return plan;
                }
            }
        }
        if let Some(port) = endpoint.and_then(url_port) {
            ports.push(port);
        }
        ports.sort_unstable();
        ports.dedup();
        plan.tcp_connect = Some(ports);
        plan.tcp_bind.extend(cfg.health.addr().map(|a| a.port()));
        plan.read = SYSTEM_FILES.iter().map(PathBuf::from).collect();
        plan.read.extend(tls.iter().cloned());
        if let Some(home) = std::env::var_os("HOME") {
            plan.read.push(Path::new(&home).join(".config/libvirt"));
        }
        // The test driver's node files (`test:///path/node.xml`; `test:///default` is built in).
        for uri in &cfg.libvirt.uris {
            if let Some(path) = uri.strip_prefix("test://") {
                if path.starts_with('/') && path != "/default" {
                    plan.read.push(PathBuf::from(path));
                }
            }
        }
        plan.read_exec = SYSTEM_CODE.iter().map(PathBuf::from).collect();
        plan.devices = DEVICES.iter().map(PathBuf::from).collect();
        if cfg.libvirt.discover.enabled {
            plan.list.push(cfg.libvirt.discover.kubelet_root.clone());
            for glob in &cfg.libvirt.discover.globs {
                if Path::new(glob).is_absolute() {
                    plan.list.push(literal_prefix(glob));
                }
            }
        }
        plan.read
            .extend(config_file.map(|file| config_dir(file, &plan.list)));
        plan
    }
}

/// Directories shared by the whole system: a configuration file in one of them is allowed on its
/// own, not with its neighbours.
const SHARED_DIRS: &[&str] = &[
    "/", "/etc", "/usr", "/var", "/tmp", "/run", "/root", "/home", "/opt",
];

/// The name of a directory that holds the agent's configuration and nothing else (the package's
/// `/etc/virt-hypervisor-agent`, the DaemonSet's ConfigMap mount at the same path).
const CONFIG_DIR_NAME: &str = "virt-hypervisor-agent";

/// What to allow for reading the configuration file: its directory, so that a reload reads the
/// file that an editor or a ConfigMap update put in its place (a new inode, which a rule on the
/// old file would not cover), when that directory is the agent's own: an absolute path named
/// [`CONFIG_DIR_NAME`], neither containing nor lying under a directory that may only be listed
/// (`listed`: the discovery roots, whose files are other pods'). Anywhere else (`/etc`,
/// `/etc/kubernetes`, a home directory) only the file: its neighbours may be secrets.
fn config_dir(file: &Path, listed: &[PathBuf]) -> PathBuf {
    match file.parent() {
        Some(dir)
            if dir.is_absolute()
                && dir.file_name() == Some(std::ffi::OsStr::new(CONFIG_DIR_NAME))
                && !SHARED_DIRS.iter().any(|d| dir == Path::new(d))
                && !listed
                    .iter()
                    .any(|l| l.starts_with(dir) || dir.starts_with(l)) =>
        {
            dir.to_path_buf()
        }
        _ => file.to_path_buf(),
    }
}

/// The directory part of `glob` before its first pattern component (never its last component,
/// the socket's name).
fn literal_prefix(glob: &str) -> PathBuf {
    let parts: Vec<&str> = glob.split('/').filter(|p| !p.is_empty()).collect();
    let dirs = parts.split_last().map_or(&[][..], |(_, dirs)| dirs);
    let mut out = PathBuf::from("/");
    for part in dirs.iter().take_while(|p| !p.contains(['*', '?', '['])) {
        out.push(part);
    }
    out
}

/// Confine this thread, and every thread it starts from now on, to `plan`. Paths that do not
/// exist are skipped. Returns what was achieved (also kept for [`status`]).
pub fn apply(plan: &Plan) -> Status {
    let status = if plan.off.is_some() {
        Status::Off
    } else {
        match restrict(plan) {
            Ok(RulesetStatus::FullyEnforced) => Status::Full,
            Ok(RulesetStatus::PartiallyEnforced) => Status::Partial,
            Ok(RulesetStatus::NotEnforced) => Status::None,
            Err(e) => {
                tracing::warn!(error = %e, "Landlock confinement failed");
                Status::None
            }
        }
    };
    let _ = STATUS.set(status);
    status
}

fn restrict(plan: &Plan) -> Result<RulesetStatus, RulesetError> {
    let abi = ABI_WANTED;
    let mut rules: Vec<PathBeneath<PathFd>> = Vec::new();
    let mut allow = |paths: &[PathBuf], access: BitFlags<AccessFs>| {
        for path in paths {
            // A path that does not exist here (no /dev/kvm, no ~/.config/libvirt) is skipped.
            let Ok(fd) = PathFd::new(path) else {
                continue;
            };
            // A file takes only file rights.
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            rules.push(PathBeneath::new(fd, access));
        }
    };
    allow(&plan.read, AccessFs::ReadFile | AccessFs::ReadDir);
    allow(&plan.read_exec, AccessFs::from_read(abi));
    allow(&plan.list, AccessFs::ReadDir.into());
    allow(&plan.devices, AccessFs::ReadFile | AccessFs::IoctlDev);
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi))?;
    if plan.tcp_connect.is_some() {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    let ports = plan.tcp_connect.iter().flatten();
    let binds = plan.tcp_bind.iter().filter(|_| plan.tcp_connect.is_some());
    let status = ruleset
        .create()?
        .add_rules(rules.into_iter().map(Ok::<_, RulesetError>))?
        .add_rules(ports.map(|p| Ok::<_, RulesetError>(NetPort::new(*p, AccessNet::ConnectTcp))))?
        .add_rules(binds.map(|p| Ok::<_, RulesetError>(NetPort::new(*p, AccessNet::BindTcp))))?
        .restrict_self()?;
    Ok(status.ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_endpoint_and_tcp_uris() {
        assert_eq!(url_port("http://localhost:4317"), Some(4317));
        assert_eq!(url_port("https://u:p@otel.example/v1/metrics"), Some(443));
        assert_eq!(url_port("http://[::1]:4318/x"), Some(4318));
        assert_eq!(url_port("http://[::1]/x"), Some(80));
        assert_eq!(libvirt_transport("qemu:///system"), Ok(None));
        assert_eq!(
            libvirt_transport("qemu+unix:///session?socket=/x:y"),
            Ok(None)
        );
        assert_eq!(libvirt_transport("qemu+tcp://h/system"), Ok(Some(16509)));
        assert_eq!(
            libvirt_transport("qemu+tls://h:7000/system"),
            Ok(Some(7000))
        );
        assert!(libvirt_transport("qemu+ssh://root@h/system").is_err());
    }

    #[test]
    fn the_plan_lists_discovery_roots_and_reads_only_what_it_needs() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.discover.enabled = true;
        cfg.libvirt.uris = vec!["qemu:///system".into(), "test:///tmp/node.xml".into()];
        let plan = Plan::for_config(
            &cfg,
            Some(Path::new("/etc/virt-hypervisor-agent/config.yaml")),
            Some("https://otel.example:4317"),
            &[PathBuf::from("/etc/vha/ca.pem")],
        );
        assert_eq!(plan.off, None);
        assert_eq!(plan.list, [PathBuf::from("/var/lib/kubelet")]);
        assert_eq!(plan.tcp_connect, Some(vec![4317]));
        assert!(plan.tcp_bind.is_empty(), "no health endpoint, no bind");
        cfg.health.listen = Some("0.0.0.0:8080".into());
        let with_health = Plan::for_config(&cfg, None, Some("https://otel.example:4317"), &[]);
        assert_eq!(
            with_health.tcp_bind,
            [8080],
            "only the health endpoint's port"
        );
        assert_eq!(with_health.tcp_connect, Some(vec![4317]));
        for p in [
            "/etc/virt-hypervisor-agent",
            "/etc/vha/ca.pem",
            "/tmp/node.xml",
            "/etc/machine-id",
        ] {
            assert!(plan.read.contains(&PathBuf::from(p)), "{p}");
        }
        assert!(
            !plan.read.iter().any(|p| p.starts_with("/var/lib/kubelet")),
            "nothing under the kubelet root is readable"
        );
        // The test driver's built-in node is no file.
        let mut plain = AgentConfig::default();
        plain.libvirt.uris = vec!["test:///default".into()];
        let builtin = Plan::for_config(&plain, None, None, &[]);
        assert!(!builtin.read.contains(&PathBuf::from("/default")));
        let running = Plan::for_config(&AgentConfig::default(), None, None, &[]);
        assert_eq!(
            running.covers(&builtin),
            Ok(()),
            "a reload to test:///default needs nothing new"
        );
    }

    #[test]
    fn an_ssh_uri_or_the_switch_turns_confinement_off_with_a_reason() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.uris = vec!["qemu+ssh://root@h/system".into()];
        let plan = Plan::for_config(&cfg, None, None, &[]);
        assert!(plan.off.as_deref().is_some_and(|w| w.contains("ssh")));
        let mut cfg = AgentConfig::default();
        cfg.security.landlock = false;
        assert!(Plan::for_config(&cfg, None, None, &[]).off.is_some());
    }

    #[test]
    fn the_config_files_directory_is_readable_unless_it_is_shared() {
        let dir = |f: &str| config_dir(Path::new(f), &[PathBuf::from("/var/lib/kubelet")]);
        assert_eq!(
            dir("/etc/virt-hypervisor-agent/config.yaml"),
            PathBuf::from("/etc/virt-hypervisor-agent")
        );
        assert_eq!(dir("/etc/vha.yaml"), PathBuf::from("/etc/vha.yaml"));
        assert_eq!(
            dir("/etc/kubernetes/vha.yaml"),
            PathBuf::from("/etc/kubernetes/vha.yaml"),
            "a directory that is not the agent's own: only the file"
        );
        assert_eq!(
            dir("/srv/x/virt-hypervisor-agent/agent.yaml"),
            PathBuf::from("/srv/x/virt-hypervisor-agent")
        );
        assert_eq!(
            dir("virt-hypervisor-agent/agent.yaml"),
            PathBuf::from("virt-hypervisor-agent/agent.yaml"),
            "a relative path: only the file"
        );
        assert_eq!(dir("/tmp/vha.yaml"), PathBuf::from("/tmp/vha.yaml"));
        assert_eq!(dir("vha.yaml"), PathBuf::from("vha.yaml"));
        // Next to (or above, or below) the kubelet root: only the file, never other pods' files.
        assert_eq!(dir("/var/lib/vha.yaml"), PathBuf::from("/var/lib/vha.yaml"));
        assert_eq!(
            dir("/var/lib/kubelet/virt-hypervisor-agent/config.yaml"),
            PathBuf::from("/var/lib/kubelet/virt-hypervisor-agent/config.yaml")
        );
    }

    #[test]
    fn a_reload_is_covered_only_by_what_the_running_plan_allows() {
        let cfg = AgentConfig::default();
        let file = Path::new("/etc/virt-hypervisor-agent/config.yaml");
        let running = Plan::for_config(&cfg, Some(file), Some("http://c:4317"), &[]);
        assert_eq!(running.covers(&running.clone()), Ok(()));
        let other_port = Plan::for_config(&cfg, Some(file), Some("http://c:4318"), &[]);
        assert_eq!(
            running.covers(&other_port),
            Err("TCP connections to port 4318".into())
        );
        let new_ca = Plan::for_config(
            &cfg,
            Some(file),
            Some("http://c:4317"),
            &[PathBuf::from("/srv/ca.pem")],
        );
        assert_eq!(
            running.covers(&new_ca),
            Err("read access to /srv/ca.pem".into())
        );
        let ca_next_to_config = Plan::for_config(
            &cfg,
            Some(file),
            Some("http://c:4317"),
            &[PathBuf::from("/etc/virt-hypervisor-agent/ca.pem")],
        );
        assert_eq!(running.covers(&ca_next_to_config), Ok(()));
        let mut health = cfg.clone();
        health.health.listen = Some("127.0.0.1:9000".into());
        let bind = Plan::for_config(&health, Some(file), Some("http://c:4317"), &[]);
        assert_eq!(running.covers(&bind), Err("binding TCP port 9000".into()));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_pattern() {
        assert_eq!(
            literal_prefix("/run/kv/pods/*/volumes/x/sock"),
            PathBuf::from("/run/kv/pods")
        );
        assert_eq!(literal_prefix("/run/x/sock"), PathBuf::from("/run/x"));
        assert_eq!(literal_prefix("/*/sock"), PathBuf::from("/"));
    }
}
