//! Landlock self-confinement (src/confine.rs), checked in a child process: the test binary runs
//! itself again with `VHA_CONFINE_CHILD` set, the child confines itself exactly as the agent's
//! `run` does for a discovery config, then tries what an attacker inside the agent would. The
//! parent checks the child's report. (Confinement cannot be undone, so it never runs in the
//! test harness's own process.)
//!
//! The agent binary itself runs confined in every end-to-end test (confinement is on by default);
//! `the_running_agent_reports_full_confinement` checks that it says so.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::receiver::{Receiver, Series};
use common::{wait_until, Agent};
use virt_hypervisor_agent::config::AgentConfig;
use virt_hypervisor_agent::confine::{self, Plan};

const CHILD: &str = "VHA_CONFINE_CHILD";

/// One attempt and its outcome, as `what: ok` or `what: errno N`.
fn outcome<T>(what: &str, r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => format!("{what}: ok"),
        Err(e) => format!(
            "{what}: {}",
            e.raw_os_error()
                .map(|n| format!("errno {n}"))
                .unwrap_or_else(|| format!("{:?}", e.kind()))
        ),
    }
}

/// The child: confine, then try. Paths and ports come from the environment.
fn child(root: &Path, config: &Path, allowed_port: u16, other_port: u16) {
    let mut cfg = AgentConfig::default();
    cfg.libvirt.uris = vec![];
    cfg.libvirt.discover.enabled = true;
    cfg.libvirt.discover.kubelet_root = root.to_path_buf();
    let endpoint = format!("http://127.0.0.1:{allowed_port}");
    let plan = Plan::for_config(&cfg, Some(config), Some(&endpoint), &[]);
    let status = confine::apply(&plan);
    println!("status: {}", status.as_str());
    let secret_dir = root.join("pods/other-pod/volumes/kubernetes.io~secret/token");
    println!(
        "{}",
        outcome(
            "read another pod's secret",
            std::fs::read(secret_dir.join("token"))
        )
    );
    println!(
        "{}",
        outcome("list the secret volume", std::fs::read_dir(&secret_dir))
    );
    println!("{}", outcome("read the config", std::fs::read(config)));
    println!(
        "{}",
        outcome("read /etc/hosts", std::fs::read("/etc/hosts"))
    );
    println!(
        "{}",
        outcome(
            "write into the kubelet root",
            std::fs::write(root.join("pods/planted"), b"x")
        )
    );
    println!(
        "{}",
        outcome(
            "write into /tmp",
            std::fs::write(std::env::temp_dir().join("vha-confined-write"), b"x")
        )
    );
    println!(
        "{}",
        outcome("read /etc/shadow", std::fs::read("/etc/shadow"))
    );
    let connect = |port: u16| {
        TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().expect("an address"),
            Duration::from_secs(2),
        )
    };
    println!(
        "{}",
        outcome("connect to the export port", connect(allowed_port))
    );
    println!(
        "{}",
        outcome("connect to another port", connect(other_port))
    );
}

#[test]
fn a_confined_agent_cannot_read_other_pods_secrets_write_files_or_connect_elsewhere() {
    if let Some(spec) = std::env::var_os(CHILD) {
        let spec = spec.to_string_lossy().into_owned();
        let parts: Vec<&str> = spec.split('\n').collect();
        child(
            Path::new(parts[0]),
            Path::new(parts[1]),
            parts[2].parse().expect("port"),
            parts[3].parse().expect("port"),
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("kubelet");
    let secret_dir = root.join("pods/other-pod/volumes/kubernetes.io~secret/token");
    std::fs::create_dir_all(&secret_dir).expect("secret volume");
    std::fs::write(secret_dir.join("token"), b"s3cret-token").expect("secret");
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "libvirt:\n  uris: []\n").expect("config");
    let allowed = TcpListener::bind("127.0.0.1:0").expect("listener");
    let other = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = |l: &TcpListener| l.local_addr().expect("addr").port();
    let spec = [
        root.to_string_lossy().into_owned(),
        config.to_string_lossy().into_owned(),
        port(&allowed).to_string(),
        port(&other).to_string(),
    ]
    .join("\n");
    // A leftover from an unconfined run would make "nothing was written" fail for no reason.
    let _ = std::fs::remove_file(std::env::temp_dir().join("vha-confined-write"));
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_confined_agent_cannot_read_other_pods_secrets_write_files_or_connect_elsewhere",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, spec)
        .output()
        .expect("run the child");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{report}");
    assert!(
        out.status.success(),
        "the child failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |what: &str| {
        // The harness may print "test NAME ... " on the same line before the child's first.
        let tag = format!("{what}: ");
        report
            .lines()
            .find_map(|l| l.find(&tag).map(|at| l[at..].to_string()))
            .unwrap_or_else(|| panic!("no line for {what}:\n{report}"))
    };
    let eacces = format!("errno {}", libc::EACCES);
    assert_eq!(
        line("status"),
        "status: full",
        "this kernel offers Landlock ABI 6+"
    );
    for denied in [
        "read another pod's secret",
        "write into the kubelet root",
        "write into /tmp",
        "read /etc/shadow",
        "connect to another port",
    ] {
        assert_eq!(line(denied), format!("{denied}: {eacces}"), "{report}");
    }
    for allowed in [
        "list the secret volume",
        "read the config",
        "read /etc/hosts",
        "connect to the export port",
    ] {
        assert_eq!(line(allowed), format!("{allowed}: ok"), "{report}");
    }
    assert!(
        !std::env::temp_dir().join("vha-confined-write").exists(),
        "nothing was written"
    );
}

/// Run the agent on the test driver through `wrapper` (empty: directly) until it has exported
/// its Landlock status and a VM, plus `settle`; its `virt_hypervisor_agent_landlock` series and
/// everything it logged.
fn run_until_landlock_reported(wrapper: &[&str], settle: Duration) -> (Vec<Series>, String) {
    let rx = Receiver::start().expect("receiver");
    let mut agent = Agent::spawn_wrapped(
        wrapper,
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "test:///default"),
            (
                "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
                &rx.grpc_endpoint(),
            ),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "1s"),
            ("RUST_LOG", "info"),
        ],
    )
    .expect("spawn the agent");
    let seen = wait_until(Duration::from_secs(20), || {
        rx.latest_series("virt_hypervisor_agent_landlock")
            .is_some_and(|s| !s.is_empty())
            && rx
                .latest_series("kubevirt_vmi_hypervisor_info")
                .is_some_and(|s| !s.is_empty())
    });
    std::thread::sleep(settle);
    agent
        .terminate(Duration::from_secs(10))
        .expect("the agent stops");
    let log = agent.log();
    assert!(seen.is_ok(), "no landlock series or no VM:\n{log}");
    let series = rx
        .latest_series("virt_hypervisor_agent_landlock")
        .unwrap_or_default();
    (series, log)
}

#[test]
fn the_running_agent_reports_full_confinement() {
    let (series, log) = run_until_landlock_reported(&[], Duration::ZERO);
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(series[0].attr("status"), Some("full"), "{log}");
    assert!(log.contains("confined with Landlock"), "{log}");
}

/// Runs the agent with Landlock's three system calls answering `ENOSYS`, as on a kernel built
/// without it (a seccomp filter installed by Debian's python3-seccomp, then exec).
const NO_LANDLOCK: &str = r#"
import errno, os, sys, seccomp
f = seccomp.SyscallFilter(seccomp.ALLOW)
for call in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), call)
f.load()
os.execv(sys.argv[1], sys.argv[1:])
"#;

#[test]
fn without_landlock_the_agent_warns_once_says_so_and_keeps_working() {
    let usable = Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        assert!(
            !common::libvirt::e2e_required(),
            "/usr/bin/python3 with the seccomp module (Debian python3-seccomp) is required"
        );
        eprintln!("skipped: /usr/bin/python3 cannot import seccomp (Debian python3-seccomp)");
        return;
    }
    // A few more exports after the first: the warning is not repeated.
    let (series, log) = run_until_landlock_reported(
        &["/usr/bin/python3", "-c", NO_LANDLOCK],
        Duration::from_secs(2),
    );
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(series[0].attr("status"), Some("none"), "{log}");
    assert_eq!(
        log.matches("Landlock is not available on this kernel")
            .count(),
        1,
        "one warning:\n{log}"
    );
}
