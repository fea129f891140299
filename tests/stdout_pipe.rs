//! The stdout exporter when its reader goes away (`agent run | head -c 100`): the failed write is
//! an export failure like a down collector (reported on stderr, no panic), the agent keeps running,
//! and SIGTERM still ends it with exit 0.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_virt-hypervisor-agent");

#[test]
fn a_closed_stdout_is_an_export_failure_not_a_panic() {
    let uri = format!("test://{}/config/demo-node.xml", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(BIN)
        .args([
            "--uri",
            &uri,
            "--exporter",
            "stdout",
            "--config",
            "/dev/null",
            "run",
        ])
        .env("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "1s")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first 100 bytes of the first export, then close the pipe (as `head -c 100` does).
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 100];
    out.read_exact(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("# export "));
    drop(out);

    // The next exports fail on the closed pipe: one warning, and the process is still up.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|l: &String| l.contains("export to stdout failed"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => log.push(l),
            Err(_) => panic!(
                "no 'export to stdout failed' warning within 20 s:\n{}",
                log.join("\n")
            ),
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent exited after the broken pipe"
    );
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "{}",
        log.join("\n")
    );

    // SIGTERM: orderly stop, exit 0, no panic.
    // kill(1) by the PID of the child this test started.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        log.push(l);
    }
    println!("exit after SIGTERM: {status:?} in {:?}", started.elapsed());
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "{}",
        log.join("\n")
    );
}
