//! SIGHUP reloads the configuration of the running binary: libvirt URIs added and removed
//! through the registry, export settings swapped at the next export (with the staleness markers
//! owed carried over), an invalid file logged with its key while the running configuration
//! stays, and a reload that Landlock would not allow refused with what it needs. Test driver
//! nodes and the test OTLP receiver: no daemon needed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::receiver::{Receiver, Series};
use common::Agent;

const INFO: &str = "kubevirt_vmi_hypervisor_info";
const WAIT: Duration = Duration::from_secs(20);

/// A test driver node file with one running domain named `name`.
fn node(dir: &Path, name: &str, uuid_tail: u32) -> String {
    let path = dir.join(format!("{name}.xml"));
    let xml = format!(
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>\
         <cores>2</cores><threads>1</threads></cpu><memory>8388608</memory>\
         <domain type='kvm'><name>{name}</name><uuid>00000000-0000-4000-8000-{uuid_tail:012}</uuid>\
         <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
         </domain></node>"
    );
    std::fs::write(&path, xml).unwrap();
    format!("test://{}", path.display())
}

/// Write the agent's configuration file.
fn write_config(path: &Path, uris: &[&str], endpoint: &str, extra: &str) {
    let uris: Vec<String> = uris.iter().map(|u| format!("    - {u}")).collect();
    let yaml = format!(
        "libvirt:\n  uris:\n{}\nexport:\n  endpoint: {endpoint}\n  interval: 1s\n  debounce: 50ms\n{extra}",
        uris.join("\n")
    );
    // Replaced, not rewritten in place: a new file, as an editor or a ConfigMap update makes.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn hup(agent: &Agent) {
    let ok = Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn names(series: &[Series]) -> Vec<String> {
    let mut n: Vec<String> = series
        .iter()
        .filter_map(|s| s.attr("name").map(String::from))
        .collect();
    n.sort();
    n
}

/// Wait until the agent's log contains `needle` (after `from` bytes of it).
fn wait_log(agent: &Agent, from: usize, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let log = agent.log();
        if log.get(from..).is_some_and(|l| l.contains(needle)) {
            return log[from..].to_string();
        }
        assert!(
            start.elapsed() < WAIT,
            "no log line with {needle:?} within {WAIT:?}:\n{}",
            agent.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    a: String,
    b: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // The agent's own directory, as /etc/virt-hypervisor-agent is: under Landlock, everything in
    // it (a config file replaced, the test nodes) is readable at a reload.
    let own = dir.path().join("virt-hypervisor-agent");
    std::fs::create_dir(&own).unwrap();
    let a = node(&own, "reload-a", 1);
    let b = node(&own, "reload-b", 2);
    let config = own.join("config.yaml");
    Setup {
        config,
        a,
        b,
        _dir: dir,
    }
}

#[test]
fn sighup_adds_and_removes_uris_and_swaps_the_export_without_stopping() {
    let s = setup();
    let (rx1, rx2) = (Receiver::start().unwrap(), Receiver::start().unwrap());
    // Landlock would hold the agent to rx1's port (the next test): off here, to swap endpoints.
    let unconfined = "security:\n  landlock: false\n";
    write_config(&s.config, &[&s.a], &rx1.grpc_endpoint(), unconfined);
    let since = Instant::now();
    let mut agent = Agent::spawn(&["--config", &s.config.to_string_lossy(), "run"], &[]).unwrap();
    rx1.wait_for_series(since, WAIT, INFO, |s| names(s) == ["reload-a"])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    let pid = agent.pid();

    // B instead of A, and the export to the second receiver.
    write_config(&s.config, &[&s.b], &rx2.grpc_endpoint(), unconfined);
    let mark = agent.log().len();
    let since = Instant::now();
    hup(&agent);
    let obs = rx2
        .wait_for_series(since, WAIT, INFO, |s| names(s) == ["reload-b"])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    println!(
        "reload -> B exported (and A gone) at the new endpoint after {:?}",
        obs.latency
    );
    let log = wait_log(&agent, mark, "configuration reloaded");
    assert!(log.contains(&format!("added=[\"{}\"]", s.b)), "{log}");
    assert!(log.contains(&format!("removed=[\"{}\"]", s.a)), "{log}");
    assert!(log.contains("export_settings=true"), "{log}");
    // A's series was owed a staleness marker, and it went to where the export goes now.
    let stale = rx2
        .wait_for_request(since, WAIT, |r| {
            names(&r.stale_series(INFO)) == ["reload-a"]
        })
        .unwrap_or_else(|e| panic!("no staleness marker for A at the new endpoint: {e}"));
    assert!(stale.request.at >= since);
    agent.check_running().unwrap();
    assert_eq!(agent.pid(), pid, "the same process");
    // Nothing reaches the old endpoint after the swap took effect.
    let swapped = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        rx1.requests_since(swapped).is_empty(),
        "the old endpoint still gets exports"
    );

    // An invalid file: logged with its key, the running configuration kept.
    std::fs::write(
        &s.config,
        format!(
            "libvirt:\n  uris: [{}]\n  fetch_timeout: 1ns\nexport:\n  endpoint: {}\n{unconfined}",
            s.a,
            rx1.grpc_endpoint()
        ),
    )
    .unwrap();
    let mark = agent.log().len();
    hup(&agent);
    let log = wait_log(&agent, mark, "configuration not reloaded");
    assert!(log.contains("libvirt.fetch_timeout"), "{log}");
    assert!(log.contains("the running configuration is kept"), "{log}");
    let since = Instant::now();
    rx2.wait_for_series(since, WAIT, INFO, |s| names(s) == ["reload-b"])
        .unwrap_or_else(|e| panic!("after a bad reload: {e}\n{}", agent.log_tail(40)));
    agent.check_running().unwrap();

    // A reload that changes a key fixed at start says so, and applies the rest.
    write_config(
        &s.config,
        &[&s.a, &s.b],
        &rx2.grpc_endpoint(),
        &format!("{unconfined}metric:\n  attributes:\n    uuid: true\n"),
    );
    let mark = agent.log().len();
    let since = Instant::now();
    hup(&agent);
    rx2.wait_for_series(since, WAIT, INFO, |s| {
        names(s) == ["reload-a", "reload-b"] && s.iter().all(|s| s.attr("uuid").is_none())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    let log = wait_log(&agent, mark, "take effect only when the agent restarts");
    assert!(log.contains("metric.attributes.uuid"), "{log}");

    let status = agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn under_landlock_a_reload_that_needs_another_port_is_refused() {
    let s = setup();
    let (rx1, rx2) = (Receiver::start().unwrap(), Receiver::start().unwrap());
    write_config(&s.config, &[&s.a], &rx1.grpc_endpoint(), "");
    let since = Instant::now();
    let mut agent = Agent::spawn(&["--config", &s.config.to_string_lossy(), "run"], &[]).unwrap();
    rx1.wait_for_series(since, WAIT, INFO, |s| names(s) == ["reload-a"])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    assert!(
        agent.log().contains("confined with Landlock"),
        "the agent must run confined for this test:\n{}",
        agent.log_tail(20)
    );

    // The agent's directory: the new file is readable; the new port is not allowed.
    write_config(&s.config, &[&s.a, &s.b], &rx2.grpc_endpoint(), "");
    let mark = agent.log().len();
    hup(&agent);
    let port = rx2.grpc_endpoint().rsplit(':').next().unwrap().to_string();
    let log = wait_log(&agent, mark, "configuration not reloaded");
    assert!(
        log.contains(&format!("TCP connections to port {port}")),
        "{log}"
    );
    // Nothing of it was applied: B is not connected, and A still exports to the old endpoint.
    let since = Instant::now();
    rx1.wait_for_series(since, WAIT, INFO, |s| names(s) == ["reload-a"])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    assert!(
        rx2.requests().is_empty(),
        "nothing went to the refused endpoint"
    );

    // A file the confinement set at start does not cover: refused, naming it.
    let outside = tempfile::tempdir().unwrap();
    let c = node(outside.path(), "reload-c", 3);
    write_config(&s.config, &[&s.a, &c], &rx1.grpc_endpoint(), "");
    let mark = agent.log().len();
    hup(&agent);
    let log = wait_log(&agent, mark, "configuration not reloaded");
    assert!(
        log.contains(&format!(
            "read access to {}",
            c.trim_start_matches("test://")
        )),
        "{log}"
    );

    // Within what Landlock allows (the file replaced in the same directory), a reload applies.
    write_config(&s.config, &[&s.a, &s.b], &rx1.grpc_endpoint(), "");
    let since = Instant::now();
    hup(&agent);
    rx1.wait_for_series(since, WAIT, INFO, |s| names(s) == ["reload-a", "reload-b"])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    agent.check_running().unwrap();
    let status = agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
}
