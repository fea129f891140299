//! The node KVM capability, end to end: the agent binary probes the real `/dev/kvm` and exports
//! `virt_hypervisor_agent_node_kvm_available` to a real OTLP receiver. 1 where the device
//! answers; 0 when the agent is started without access to it, denied the way deployments deny
//! it: as an unprivileged user (EACCES), and in a mount namespace where `/dev/kvm` is another
//! device (`/dev/null` bind-mounted over it; the host's `/dev/kvm` is left alone). The libvirt
//! side is the in-process test driver: the check does not depend on it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::Agent;
use virt_hypervisor_agent::node::{kvm, probe_kvm};

const METRIC: &str = "virt_hypervisor_agent_node_kvm_available";
/// Generous: the first export follows the first sync of a test-driver connection (milliseconds).
const BOUND: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // The effective uid, from /proc (no unsafe call needed).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Start the agent (through `wrapper`), wait for its first export with the capability metric,
/// and return (its value, its `node` attribute, the agent's log).
fn observe(wrapper: &[&str], node: &str) -> (f64, Option<String>, String) {
    let rx = Receiver::start().unwrap();
    let uri = format!("test://{}/config/demo-node.xml", env!("CARGO_MANIFEST_DIR"));
    let endpoint = rx.grpc_endpoint();
    let since = Instant::now();
    let agent = Agent::spawn_wrapped(
        wrapper,
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uri.as_str()),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", endpoint.as_str()),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "1s"),
            ("VIRT_HYPERVISOR_AGENT_NODE_NAME", node),
        ],
    )
    .unwrap();
    let obs = rx
        .wait_for_request(since, BOUND, |r| r.has_metric(METRIC))
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(40)));
    println!(
        "{METRIC} arrived {:?} after the start (bound {BOUND:?})",
        obs.latency
    );
    let series = obs.request.series(METRIC);
    assert_eq!(series.len(), 1, "one capability series per agent");
    let value = series[0].value.as_f64();
    let node_attr = series[0].attr("node").map(str::to_string);
    (value, node_attr, agent.log())
}

#[test]
fn capability_is_1_where_dev_kvm_answers_the_kvm_api() {
    let dev = Path::new(kvm::KVM_DEVICE);
    if !dev.exists() {
        println!("SKIP: {} does not exist on this machine", dev.display());
        return;
    }
    let here = probe_kvm(dev);
    if !here.available() {
        println!(
            "SKIP: {} exists but this test process cannot use it ({}: {})",
            dev.display(),
            here.reason(),
            here.hint()
        );
        return;
    }
    let (value, node, log) = observe(&[], "kvm-node");
    assert_eq!(value, 1.0, "agent log:\n{log}");
    assert_eq!(node.as_deref(), Some("kvm-node"));
    assert!(
        log.contains("this node can run KVM guests"),
        "the agent logs what it found:\n{log}"
    );
    println!(
        "observed: {METRIC}{{node=\"kvm-node\"}} = 1 ({})",
        here.reason()
    );
}

#[test]
fn capability_is_0_when_the_agent_runs_as_a_user_without_access() {
    if !is_root() || !have("setpriv") {
        println!("SKIP: needs root and setpriv (util-linux) to start the agent as nobody");
        return;
    }
    // /dev/kvm is 0600 root (or 0660 root:kvm): nobody may not open it.
    let (value, node, log) = observe(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        "user-node",
    );
    assert_eq!(value, 0.0, "agent log:\n{log}");
    assert_eq!(node.as_deref(), Some("user-node"));
    let expected = if Path::new(kvm::KVM_DEVICE).exists() {
        "reason=permission denied"
    } else {
        "reason=no KVM device"
    };
    assert!(log.contains(expected), "expected {expected} in:\n{log}");
    assert!(
        log.contains("this node cannot run KVM guests"),
        "agent log:\n{log}"
    );
}

#[test]
fn capability_is_0_when_dev_kvm_is_not_the_kvm_device() {
    if !is_root() || !have("unshare") || !Path::new(kvm::KVM_DEVICE).exists() {
        println!("SKIP: needs root, unshare (util-linux) and an existing /dev/kvm to cover it");
        return;
    }
    let before = probe_kvm(Path::new(kvm::KVM_DEVICE));
    // A private mount namespace (unshare makes its mounts private: nothing reaches the host)
    // where /dev/kvm is /dev/null; then exec the agent, so its pid is the child's.
    let (value, node, log) = observe(
        &[
            "unshare",
            "--mount",
            "--",
            "sh",
            "-c",
            "mount --bind /dev/null /dev/kvm && exec \"$0\" \"$@\"",
        ],
        "fake-node",
    );
    assert_eq!(value, 0.0, "agent log:\n{log}");
    assert_eq!(node.as_deref(), Some("fake-node"));
    assert!(
        log.contains("reason=not the KVM device"),
        "agent log:\n{log}"
    );
    // The host's device is untouched.
    assert_eq!(probe_kvm(Path::new(kvm::KVM_DEVICE)), before);
}
