//! The systemd protocol the unit relies on (`Type=notify`, `WatchdogSec=`): the agent sends
//! `READY=1` after its first sync, `WATCHDOG=1` pings at half the watchdog interval, and
//! `STOPPING=1` on SIGTERM. A datagram socket stands in for systemd's `NOTIFY_SOCKET`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ready_watchdog_and_stopping_are_notified() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let uri = format!("test://{}/config/demo-node.xml", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_virt-hypervisor-agent"))
        .args(["--uri", &uri, "--exporter", "none", "run"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000") // 0.4 s: pings every 0.2 s
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut seen: Vec<String> = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let ready = seen.iter().any(|m| m.lines().any(|l| l == "READY=1"));
        let pings = seen
            .iter()
            .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
            .count();
        if ready && pings >= 3 {
            break;
        }
    }
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1: {seen:?}"
    );
    let pings = seen
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(pings >= 3, "expected watchdog pings, got {seen:?}");

    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut stopping = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "STOPPING=1")
            {
                stopping = true;
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
    }
    // Drain what arrived before the exit.
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}
