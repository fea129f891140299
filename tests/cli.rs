//! The binary as a user runs it: bad configurations exit 2 before any connection is opened,
//! `inventory` and `check-config` print what they promise, and SIGTERM stops the agent cleanly
//! even when the collector is unreachable.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_virt-hypervisor-agent");

fn demo_uri() -> String {
    format!("test://{}/config/demo-node.xml", env!("CARGO_MANIFEST_DIR"))
}

/// A unix socket that records whether anybody connected: the URI points libvirt at it.
struct Tripwire {
    _dir: tempfile::TempDir,
    listener: UnixListener,
    uri: String,
}

impl Tripwire {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libvirt-sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let uri = format!("qemu+unix:///system?socket={}", path.display());
        Tripwire {
            _dir: dir,
            listener,
            uri,
        }
    }

    fn touched(&self) -> bool {
        self.listener.accept().is_ok()
    }
}

/// (what, YAML file content, env, extra args, texts the error must contain).
type BadCase = (
    &'static str,
    Option<String>,
    Vec<(String, String)>,
    Vec<String>,
    Vec<&'static str>,
);

/// Malformed configurations: (what, YAML file content or None, env, extra args, text the error must contain).
fn bad_cases(uri: &str) -> Vec<BadCase> {
    let y = |s: &str| Some(format!("libvirt:\n  uris: [\"{uri}\"]\n{s}"));
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    vec![
        (
            "unknown top-level key",
            y("colour: blue\n"),
            vec![],
            vec![],
            vec!["colour"],
        ),
        (
            "unknown nested key",
            y("export:\n  endpont: http://x:4317\n"),
            vec![],
            vec![],
            vec!["export.endpont"],
        ),
        (
            "bad duration",
            y("export:\n  debounce: fast\n"),
            vec![],
            vec![],
            vec!["export.debounce", "fast"],
        ),
        (
            "negative-ish duration",
            y("export:\n  interval: -5s\n"),
            vec![],
            vec![],
            vec!["export.interval"],
        ),
        (
            "wrong type bool",
            y("metric:\n  attributes:\n    uuid: maybe\n"),
            vec![],
            vec![],
            vec!["metric.attributes.uuid", "maybe"],
        ),
        (
            "wrong type number",
            y("").map(|s| s.replace("libvirt:\n", "libvirt:\n  fetch_concurrency: lots\n")),
            vec![],
            vec![],
            vec!["libvirt.fetch_concurrency"],
        ),
        (
            "zero concurrency",
            y("").map(|s| s.replace("libvirt:\n", "libvirt:\n  fetch_concurrency: 0\n")),
            vec![],
            vec![],
            vec!["libvirt.fetch_concurrency", "0"],
        ),
        (
            "bad exporter",
            y("export:\n  exporter: kafka\n"),
            vec![],
            vec![],
            vec!["export.exporter", "kafka"],
        ),
        (
            "bad protocol",
            y("export:\n  protocol: carrier-pigeon\n"),
            vec![],
            vec![],
            vec!["export.protocol", "carrier-pigeon"],
        ),
        (
            "bad compression",
            y("export:\n  compression: zstd\n"),
            vec![],
            vec![],
            vec!["export.compression", "zstd"],
        ),
        (
            "bad endpoint url",
            y("export:\n  endpoint: not a url\n"),
            vec![],
            vec![],
            vec!["export.endpoint", "not a url"],
        ),
        (
            "ftp endpoint",
            y("export:\n  endpoint: ftp://collector:21\n"),
            vec![],
            vec![],
            vec!["export.endpoint", "ftp://collector:21"],
        ),
        (
            "cert without key",
            y("export:\n  tls:\n    cert_file: /etc/hostname\n"),
            vec![],
            vec![],
            vec!["export.tls"],
        ),
        (
            "missing ca file",
            y("export:\n  tls:\n    ca_file: /nonexistent/ca.pem\n"),
            vec![],
            vec![],
            vec!["export.tls.ca_file", "/nonexistent/ca.pem"],
        ),
        (
            "bad log level",
            y("log:\n  level: verbose\n"),
            vec![],
            vec![],
            vec!["log.level", "verbose"],
        ),
        (
            "bad log format",
            y("log:\n  format: xml\n"),
            vec![],
            vec![],
            vec!["log.format", "xml"],
        ),
        (
            "bad metric name",
            y("metric:\n  name: 9lives\n"),
            vec![],
            vec![],
            vec!["metric.name", "9lives"],
        ),
        (
            "zero cardinality",
            y("metric:\n  cardinality_limit: 0\n"),
            vec![],
            vec![],
            vec!["metric.cardinality_limit"],
        ),
        (
            "empty uris, discovery off",
            Some("libvirt:\n  uris: []\n".to_string()),
            vec![],
            vec![],
            vec!["libvirt.uris"],
        ),
        (
            "relative kubelet root",
            y("")
                .map(|s| s + "  discover:\n    enabled: true\n    kubelet_root: var/lib/kubelet\n"),
            vec![],
            vec![],
            vec!["libvirt.discover.kubelet_root"],
        ),
        (
            "backoff inverted",
            y("").map(|s| s + "  reconnect:\n    initial_backoff: 1m\n    max_backoff: 1s\n"),
            vec![],
            vec![],
            vec!["libvirt.reconnect"],
        ),
        (
            "yaml syntax error",
            Some("libvirt: [unclosed\n".to_string()),
            vec![],
            vec![],
            vec!["YAML"],
        ),
        (
            "list where map expected",
            Some(format!("libvirt:\n  uris: [\"{uri}\"]\nexport: [1, 2]\n")),
            vec![],
            vec![],
            vec!["export"],
        ),
        (
            "env: bad duration",
            None,
            env("VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT", "soon"),
            vec![],
            vec!["libvirt.fetch_timeout", "soon"],
        ),
        (
            "env: unknown key",
            None,
            env("VIRT_HYPERVISOR_AGENT_EXPORT__COLOUR", "red"),
            vec![],
            vec!["export.colour"],
        ),
        (
            "env: single underscore nesting",
            None,
            env("VIRT_HYPERVISOR_AGENT_LIBVIRT_URIS", "test:///default"),
            vec![],
            vec!["libvirt_uris"],
        ),
        (
            "flag: bad protocol",
            None,
            vec![],
            vec!["--protocol".into(), "smtp".into()],
            vec!["export.protocol", "smtp"],
        ),
        (
            "flag: --set unknown key",
            None,
            vec![],
            vec!["--set".into(), "export.nope=1".into()],
            vec!["export.nope"],
        ),
        (
            "flag: --set without =",
            None,
            vec![],
            vec!["--set".into(), "export.debounce".into()],
            vec!["--set", "KEY=VALUE"],
        ),
        (
            "missing config file",
            None,
            vec![],
            vec!["--config".into(), "/nonexistent/agent.yaml".into()],
            vec!["/nonexistent/agent.yaml"],
        ),
    ]
}

#[test]
fn bad_configs_exit_2_naming_the_key_and_open_no_connection() {
    let wire = Tripwire::new();
    let cases = bad_cases(&wire.uri);
    assert!(cases.len() >= 25);
    for (what, yaml, env, args, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        // Every case also carries the tripwire URI (flags only where the case has no file).
        if let Some(y) = &yaml {
            let path = dir.path().join("agent.yaml");
            std::fs::File::create(&path)
                .unwrap()
                .write_all(y.as_bytes())
                .unwrap();
            cmd.arg("--config").arg(&path);
        } else if !args.iter().any(|a| a == "--config") {
            cmd.arg("--uri").arg(&wire.uri);
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.args(&args).arg("run").stdin(Stdio::null());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: expected exit 2, got {:?}; stderr: {stderr}",
            out.status
        );
        for n in needles {
            assert!(
                stderr.contains(n),
                "{what}: error must mention {n:?}; got: {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{what}: panicked: {stderr}");
        assert!(
            !wire.touched(),
            "{what}: a connection was opened despite the bad configuration"
        );
    }
}

#[test]
fn check_config_prints_the_effective_config() {
    let out = Command::new(BIN)
        .args([
            "--uri",
            "test:///default",
            "--set",
            "export.debounce=100ms",
            "check-config",
        ])
        .env("VIRT_HYPERVISOR_AGENT_NODE_NAME", "from-env")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("test:///default"), "{stdout}");
    assert!(stdout.contains("100ms"), "{stdout}");
    assert!(stdout.contains("from-env"), "{stdout}");
}

#[test]
fn check_config_warns_once_about_the_removed_vmi_uid_and_refuses_true() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, "metric:\n  attributes:\n    vmi_uid: false\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "--config".as_ref(),
            path.as_os_str(),
            "check-config".as_ref(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("warning: ").count(), 1, "{stderr}");
    assert!(
        stderr.contains("metric.attributes.vmi_uid: obsolete key ignored"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("vmi_uid"));

    std::fs::write(&path, "metric:\n  attributes:\n    vmi_uid: true\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "--config".as_ref(),
            path.as_os_str(),
            "check-config".as_ref(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("metric.attributes.vmi_uid") && stderr.contains("pod_uid"),
        "{stderr}"
    );
}

#[test]
fn version_flag_prints_the_package_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn inventory_json_lists_the_demo_node_with_identities_and_types() {
    let out = Command::new(BIN)
        .args([
            "--uri",
            &demo_uri(),
            "--node-name",
            "n1",
            "inventory",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |dom: &str| rows.iter().find(|r| r["domain"] == dom).cloned().unwrap();
    assert_eq!(rows.len(), 6);
    let web = find("prod_web-frontend");
    assert_eq!(web["namespace"], "prod");
    assert_eq!(web["name"], "web-frontend");
    assert_eq!(web["hypervisor_type"], "kvm");
    assert_eq!(web["node"], "n1");
    assert_eq!(find("ci_build-runner")["hypervisor_type"], "qemu-tcg");
    let plain = find("legacy_app");
    assert!(
        plain["namespace"].is_null(),
        "plain domains have no namespace"
    );
    assert_eq!(plain["name"], "legacy_app");
    assert_eq!(find("odd-one")["hypervisor_type"], "unknown");
    // KubeVirt's hyperv-direct, in the current launcher shape (empty <uid/>).
    let sql = find("win-apps_sql-01");
    assert_eq!(sql["namespace"], "win-apps");
    assert_eq!(sql["name"], "sql-01");
    assert_eq!(sql["hypervisor_type"], "mshv");
    // The VMI UID is no longer reported (the launcher leaves it out of the metadata).
    assert!(rows.iter().all(|r| r.get("vmi_uid").is_none()));
}

#[test]
fn inventory_fails_when_no_connection_can_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "qemu+unix:///system?socket={}/nothing-here",
        dir.path().display()
    );
    let out = Command::new(BIN)
        .args(["--uri", &uri, "inventory"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing-here"));
}

#[test]
fn sigterm_exits_zero_quickly_even_with_the_collector_down() {
    // Port 9 on loopback: nothing listens, every export fails.
    let mut child = Command::new(BIN)
        .args([
            "--uri",
            &demo_uri(),
            "--endpoint",
            "http://127.0.0.1:9",
            "--set",
            "export.interval=1s",
            "run",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500)); // past the first failing exports
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Duration::from_secs(4);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let took = sent.elapsed();
            println!("SIGTERM -> exit took {took:?}");
            assert_eq!(st.code(), Some(0));
            assert!(took <= deadline, "took {took:?}");
            break;
        }
        if sent.elapsed() > deadline {
            let _ = child.kill();
            panic!("agent did not exit within {deadline:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the binary with `args`, killing it if it has not exited within `limit` (a hang guard:
/// before the bounded reader, a FIFO blocked forever and an alias bomb ran for minutes).
fn run_bounded(args: &[&std::ffi::OsStr], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("VIRT_HYPERVISOR_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Config files that are hostile or damaged: each is refused with exit 2 and a message that
/// names the file and the problem, quickly, without a crash and without opening a connection.
#[test]
fn hostile_config_files_are_refused_quickly_with_exit_2() {
    let wire = Tripwire::new();
    let dir = tempfile::tempdir().unwrap();
    let head = format!("libvirt:\n  uris: [\"{}\"]\n", wire.uri);
    let mut bomb = head.clone()
        + "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n";
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        bomb += &format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 9].join(",")
        );
    }
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "alias bomb",
            bomb.into_bytes(),
            vec!["line 8", "aliases are expanded"],
        ),
        (
            "10,000 nested sequences",
            format!("{head}node_name:\n{}x\n", "- ".repeat(10_000)).into_bytes(),
            vec!["line 4", "nested deeper than 32 levels"],
        ),
        (
            "NUL byte hiding an unknown key",
            [
                head.as_bytes(),
                b"node_name: good\n\0\nlibvirt:\n  bogus: 1\n",
            ]
            .concat(),
            vec!["NUL byte at byte"],
        ),
        (
            "invalid UTF-8",
            [head.as_bytes(), b"node_name: go\xffod\n"].concat(),
            vec!["invalid UTF-8 at byte"],
        ),
        (
            "more than 1 MiB",
            format!("{head}# {}\n", "x".repeat(1024 * 1024)).into_bytes(),
            vec!["larger than 1048576 bytes"],
        ),
    ];
    for (what, bytes, needles) in cases {
        let path = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&path, &bytes).unwrap();
        let (code, _, stderr) = run_bounded(
            &["--config".as_ref(), path.as_os_str(), "run".as_ref()],
            Duration::from_secs(10),
        );
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{what}: {stderr}"
        );
        for n in needles {
            assert!(stderr.contains(n), "{what}: must mention {n:?}: {stderr}");
        }
        assert!(!wire.touched(), "{what}: a connection was opened");
    }

    // Not regular files: a FIFO (used to block forever), a character device (used to grow
    // without bound), a directory.
    let fifo = dir.path().join("fifo.yaml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for (path, kind) in [
        (fifo.as_path(), "a FIFO"),
        (std::path::Path::new("/dev/zero"), "a character device"),
        (dir.path(), "a directory"),
    ] {
        let (code, _, stderr) = run_bounded(
            &[
                "--config".as_ref(),
                path.as_os_str(),
                "check-config".as_ref(),
            ],
            Duration::from_secs(10),
        );
        assert_eq!(code, Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(&format!("{kind}, not a regular file")),
            "{}: {stderr}",
            path.display()
        );
    }
}

#[test]
fn a_byte_order_mark_at_the_start_of_the_config_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bom.yaml");
    std::fs::write(&path, b"\xef\xbb\xbfnode_name: with-bom\n").unwrap();
    let (code, stdout, stderr) = run_bounded(
        &[
            "--config".as_ref(),
            path.as_os_str(),
            "--uri".as_ref(),
            "test:///default".as_ref(),
            "check-config".as_ref(),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("node_name: \"with-bom\""), "{stdout}");
}

#[test]
fn check_config_redacts_the_endpoint_password() {
    let out = Command::new(BIN)
        .args([
            "--uri",
            "test:///default",
            "--endpoint",
            "https://agent:s3cret@otel.example:4318",
            "check-config",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("endpoint: \"https://<redacted>@otel.example:4318\""),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"), "{stdout}");
}

/// Environment the agent reads but cannot reject (it is not configuration): a junk value is
/// reported once at startup instead of being ignored without a word.
#[test]
fn junk_rust_log_and_export_interval_env_are_warned_about() {
    let mut child = Command::new(BIN)
        .args(["--uri", "test:///default", "--exporter", "none", "run"])
        .env("RUST_LOG", "verbose")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "junk")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let line = line.unwrap();
                let done = line.contains("initial sync done");
                lines.lock().unwrap().push(line);
                if done {
                    break;
                }
            }
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        });
    });
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = lines.into_inner().unwrap().join("\n");
    assert!(
        text.contains("WARN") && text.contains("RUST_LOG=\"verbose\" ignored"),
        "{text}"
    );
    assert!(
        text.contains("OTEL_METRIC_EXPORT_INTERVAL=\"junk\" ignored"),
        "{text}"
    );
    // The configured level (info) still applies.
    assert!(text.contains("INFO"), "{text}");
}

/// Run the agent until a stderr line contains `until`, then send `signal`; returns the exit
/// code and the whole log. Killed (and failed) if it does not exit within 10 s.
fn run_until_then_signal(args: &[&str], until: &str, signal: &str) -> (Option<i32>, String) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = Vec::new();
    let mut sent = false;
    let started = Instant::now();
    for line in stderr.lines() {
        let line = line.unwrap();
        if !sent && line.contains(until) {
            let ok = Command::new("kill").args([signal, &pid]).status().unwrap();
            assert!(ok.success());
            sent = true;
        }
        log.push(line);
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("still running: {}", log.join("\n"));
        }
    }
    (child.wait().unwrap().code(), log.join("\n"))
}

#[test]
fn initial_sync_says_which_connections_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!(
        "qemu+unix:///system?socket={}/nothing-here",
        dir.path().display()
    );
    let (code, log) = run_until_then_signal(
        &[
            "--uri",
            &demo_uri(),
            "--uri",
            &missing,
            "--exporter",
            "none",
            "run",
        ],
        "initial sync done",
        "-TERM",
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("initial sync done without every connection")
            && log.contains("synced=1 unavailable=1"),
        "{log}"
    );
    // Nothing about a sync after the stop.
    let after_stop = log.split("shutting down").nth(1).unwrap_or_default();
    assert!(!after_stop.contains("initial sync"), "{log}");
}
