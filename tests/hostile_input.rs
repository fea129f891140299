//! Hostile and careless input that reaches the agent through libvirt, on test-driver nodes (no
//! daemon): domain names that try to forge log lines or break the inventory table, two
//! connections whose domains map to the same series, and more series than the cardinality
//! limit. Each case checks what the operator sees: `inventory`, the logs, and the export at a
//! real OTLP receiver.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::Agent;

const BIN: &str = env!("CARGO_BIN_EXE_virt-hypervisor-agent");

/// A name a daemon user can give a domain: it ends the log line and starts a forged one.
const FORGED: &str = "2026-12-01T00:00:00.000000Z  INFO virt_hypervisor_agent: FORGED LINE";

/// A test-driver node file with KubeVirt-style domains `ns_<name>` (uuid prefix `tag`).
fn node_file(dir: &Path, file: &str, tag: u32, names: &[String]) -> PathBuf {
    let mut xml = String::from(
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>\
         <cores>2</cores><threads>1</threads></cpu><memory>8388608</memory>\n",
    );
    for (i, name) in names.iter().enumerate() {
        xml.push_str(&format!(
            "<domain type='kvm'><name>ns_{name}</name>\
             <uuid>00000000-0000-4000-8000-{tag:04}{i:08}</uuid>\
             <metadata><kubevirt xmlns='http://kubevirt.io'><uid>u</uid></kubevirt></metadata>\
             <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os></domain>\n"
        ));
    }
    xml.push_str("</node>\n");
    let path = dir.join(file);
    std::fs::write(&path, xml).unwrap();
    path
}

fn uri(path: &Path) -> String {
    format!("test://{}", path.display())
}

/// Five names, the first (lowest uuid) with an XML-escaped newline followed by a forged log line.
fn five_names() -> Vec<String> {
    let mut names = vec![format!("evil&#10;{FORGED}")];
    names.extend((1..5).map(|i| format!("vm{i}")));
    names
}

fn inventory(args: &[&str], json: bool) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("inventory")
        .args(json.then_some("--json"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// No line of `text` may start with the forged text (or anything but what the agent wrote).
/// `virt-hypervisor-agent ARGS… run` watching `uris` (comma-separated), exporting to `rx` over
/// gRPC every second, logging at info.
fn run_exporting(args: &[&str], uris: &str, rx: &Receiver) -> Agent {
    Agent::spawn(
        &[args, &["run"]].concat(),
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uris),
            (
                "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
                &rx.grpc_endpoint(),
            ),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "1s"),
            ("RUST_LOG", "info"),
        ],
    )
    .unwrap()
}

fn assert_no_forged_line(what: &str, text: &str) {
    for line in text.lines() {
        assert!(
            !line.starts_with(FORGED) && !line.starts_with("INFO") && !line.contains("]]"),
            "{what}: a forged line: {line:?}\n{text}"
        );
    }
}

#[test]
fn inventory_table_keeps_one_row_per_domain_and_says_which_share_a_series() {
    let dir = tempfile::tempdir().unwrap();
    let a = node_file(dir.path(), "a.xml", 1, &five_names());
    let b = node_file(dir.path(), "b.xml", 2, &five_names());
    let (code, stdout, stderr) = inventory(
        &["--uri", &uri(&a), "--uri", &uri(&b), "--node-name", "n1"],
        false,
    );
    assert_eq!(code, 0, "{stderr}");
    // Header, ten rows, the summary: a newline in a name does not add a line.
    assert_eq!(stdout.lines().count(), 12, "{stdout}");
    assert_no_forged_line("inventory", &stdout);
    assert!(stdout.contains(&format!("ns_evil\\n{FORGED}")), "{stdout}");
    assert_eq!(
        stdout.matches("(same series as a domain above)").count(),
        5,
        "{stdout}"
    );
    assert!(stdout.contains("10 active domain(s), 5 series"), "{stdout}");
    assert!(
        stderr.contains("5 domain(s) share an attribute set with another domain"),
        "{stderr}"
    );

    // The JSON form says the same per row.
    let (code, stdout, _) = inventory(&["--uri", &uri(&a), "--uri", &uri(&b)], true);
    assert_eq!(code, 0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let shared = rows.iter().filter(|r| r["series"] == "shared").count();
    assert_eq!((rows.len(), shared), (10, 5));
    assert!(rows.iter().any(|r| r["name"] == format!("evil\n{FORGED}")));
}

#[test]
fn colliding_domains_export_one_series_each_with_a_warning_and_a_self_metric() {
    let dir = tempfile::tempdir().unwrap();
    let a = node_file(dir.path(), "a.xml", 1, &five_names());
    let b = node_file(dir.path(), "b.xml", 2, &five_names());
    let rx = Receiver::start().unwrap();
    let since = Instant::now();
    let uris = format!("{},{}", uri(&a), uri(&b));
    let mut agent = run_exporting(&[], &uris, &rx);
    let obs = rx
        .wait_for_request(since, Duration::from_secs(20), |r| {
            r.series("kubevirt_vmi_hypervisor_info").len() == 5
                && r.series("virt_hypervisor_agent_info_collisions")
                    .iter()
                    .any(|s| s.value.as_f64() == 5.0)
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(40)));
    let over = obs
        .request
        .series("virt_hypervisor_agent_info_sets_over_limit");
    assert_eq!(over.len(), 1);
    assert_eq!(over[0].value.as_f64(), 0.0);
    agent.terminate(Duration::from_secs(5)).unwrap();
    let log = agent.log();
    assert!(
        log.contains("domains share an attribute set with another domain")
            && log.contains("collisions=5"),
        "{log}"
    );
    // The example domain in the warning (a Display field, written unquoted) is the forged
    // name, escaped onto the same line.
    assert!(
        log.contains(&format!("example=ns_evil\\n{FORGED}")),
        "{log}"
    );
    assert_no_forged_line("agent log", &log);
}

#[test]
fn sets_beyond_the_cardinality_limit_are_warned_counted_and_shown_by_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..30).map(|i| format!("vm{i:02}")).collect();
    let node = node_file(dir.path(), "node.xml", 3, &names);
    let limit = ["--set", "metric.cardinality_limit=20"];

    let (code, stdout, stderr) = inventory(&[&["--uri", &uri(&node)][..], &limit].concat(), false);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout
            .matches("(over metric.cardinality_limit: not exported)")
            .count(),
        10,
        "{stdout}"
    );
    assert!(
        stderr.contains("10 of 30 attribute sets are beyond metric.cardinality_limit (20)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("30 active domain(s), 30 series (10 beyond metric.cardinality_limit)"),
        "{stdout}"
    );

    let rx = Receiver::start().unwrap();
    let since = Instant::now();
    let uri = uri(&node);
    let mut agent = run_exporting(&limit, &uri, &rx);
    let obs = rx
        .wait_for_request(since, Duration::from_secs(20), |r| {
            r.series("virt_hypervisor_agent_info_sets_over_limit")
                .iter()
                .any(|s| s.value.as_f64() == 10.0)
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(40)));
    // The SDK: the first 20 sets, then one overflow point for the rest.
    let info = obs.request.series("kubevirt_vmi_hypervisor_info");
    let overflow = info
        .iter()
        .filter(|s| s.attr("otel.metric.overflow") == Some("true"))
        .count();
    assert_eq!((info.len(), overflow), (21, 1));
    agent.terminate(Duration::from_secs(5)).unwrap();
    let log = agent.log();
    assert_eq!(
        log.matches("more attribute sets than metric.cardinality_limit")
            .count(),
        1,
        "warned once: {log}"
    );
    assert!(log.contains("over_limit=10"), "{log}");
}
