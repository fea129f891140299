#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The health endpoint (`health.listen`, src/health.rs) of the agent binary, confined by Landlock
//! as always: `/readyz` is 503 while the first sync is still pending and 200 after it, `/livez`
//! is 200 throughout, other paths are 404. The first sync is held up by a unix socket that
//! accepts connections but never answers (libvirt's open then waits until `fetch_timeout`).
//! That the liveness probe restarts a hung agent is shown on a real kubelet (tests/e2e_k8s.rs).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::session::free_port;
use common::{wait_until, Agent};

/// `GET path` over HTTP/1.1; the status code, or `None` when nothing answered.
fn get(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn readyz_follows_the_first_sync_and_livez_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent-sock");
    // Never accepted from: the connection is queued, and libvirt's open waits for an answer.
    let _silent = UnixListener::bind(&sock).unwrap();
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let uri = format!("qemu+unix:///system?socket={}", sock.display());
    let started = Instant::now();
    let mut agent = Agent::spawn(
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uri.as_str()),
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT", "6s"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__EXPORTER", "none"),
            ("VIRT_HYPERVISOR_AGENT_HEALTH__LISTEN", listen.as_str()),
            ("RUST_LOG", "info"),
        ],
    )
    .unwrap();

    let up = wait_until(Duration::from_secs(20), || get(port, "/livez").is_some());
    assert!(up.is_ok(), "no answer on {listen}:\n{}", agent.log());
    let before = get(port, "/readyz");
    let asked_at = started.elapsed();
    assert_eq!(get(port, "/livez"), Some(200), "{}", agent.log());
    assert_eq!(get(port, "/metrics"), Some(404));
    if asked_at < Duration::from_secs(5) {
        assert_eq!(
            before,
            Some(503),
            "not ready before the first sync (asked {asked_at:?} after the start):\n{}",
            agent.log()
        );
        println!("/readyz 503 at {asked_at:?}, while the first sync waits on a silent socket");
    } else {
        println!("SKIP the 503 check: the endpoint was only asked {asked_at:?} after the start");
    }
    let ready = wait_until(Duration::from_secs(30), || {
        get(port, "/readyz") == Some(200)
    });
    assert!(ready.is_ok(), "never ready:\n{}", agent.log());
    println!(
        "/readyz 200 {:?} after the start (fetch_timeout 6s)",
        started.elapsed()
    );
    assert_eq!(get(port, "/livez"), Some(200), "{}", agent.log());
    agent.check_running().unwrap();
    agent.terminate(Duration::from_secs(10)).unwrap();
    let log = agent.log();
    assert!(log.contains("health endpoint listening"), "{log}");
    assert!(
        log.contains("confined with Landlock"),
        "the bind passed Landlock:\n{log}"
    );
}

#[test]
fn a_taken_port_is_an_error_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let mut agent = Agent::spawn(
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "test:///default"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__EXPORTER", "none"),
            ("VIRT_HYPERVISOR_AGENT_HEALTH__LISTEN", listen.as_str()),
        ],
    )
    .unwrap();
    let exited = wait_until(Duration::from_secs(20), || agent.check_running().is_err());
    assert!(exited.is_ok(), "still running:\n{}", agent.log());
    let status = agent.terminate(Duration::from_secs(5)).unwrap();
    let log = agent.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("health.listen"), "{log}");
}
