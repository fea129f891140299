//! No credential in any byte the agent writes: an endpoint's userinfo and query, and header
//! values, never reach a log line, an error or a printout, whichever path reports them (a
//! refused connection, a receiver's error answer, a config error, `check-config`). Credentials
//! bound for another host in clear text are refused with a reason.
//!
//! Every secret below contains `s3cret`; each test greps everything the agent wrote for it, and
//! also checks that the path under test really ran (its redacted message is there), so that a
//! test cannot pass by the agent saying nothing.

mod common;

use std::process::Command;
use std::time::Duration;

use common::receiver::Receiver;
use common::session::free_port;
use common::{wait_until, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_virt-hypervisor-agent");
const SECRET: &str = "s3cret";
const HEADERS: &str = "authorization=Bearer%20s3cret-token,x-tenant=t1";

fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains(SECRET),
        "{what}: a credential reached the output:\n{text}"
    );
}

/// Run the agent at debug level against `endpoint` until it has logged `expect` (or 20 s), and
/// return everything it wrote.
fn run_failing(protocol: &str, endpoint: &str, expect: &str) -> String {
    let mut agent = Agent::spawn(
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "test:///default"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", protocol),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", endpoint),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "200ms"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__TIMEOUT", "1s"),
            ("OTEL_EXPORTER_OTLP_HEADERS", HEADERS),
            ("RUST_LOG", "debug"),
        ],
    )
    .expect("spawn the agent");
    let seen = wait_until(Duration::from_secs(20), || agent.log().contains(expect));
    agent
        .terminate(Duration::from_secs(10))
        .expect("the agent stops");
    let log = agent.log();
    assert!(seen.is_ok(), "the agent never logged {expect:?}:\n{log}");
    log
}

#[test]
fn a_refused_export_logs_the_endpoint_redacted() {
    let port = free_port().expect("a free port");
    for (protocol, endpoint) in [
        (
            "grpc",
            format!("http://agent:s3cret-pw@127.0.0.1:{port}?api-key=s3cret-key"),
        ),
        (
            "http/protobuf",
            format!("http://agent:s3cret-pw@127.0.0.1:{port}/v1/metrics?api-key=s3cret-key"),
        ),
    ] {
        let log = run_failing(protocol, &endpoint, "<redacted>@127.0.0.1");
        assert_clean(protocol, &log);
        assert!(
            log.contains("?<redacted>"),
            "{protocol}: the query is redacted:\n{log}"
        );
    }
}

#[test]
fn a_receiver_error_answer_logs_the_endpoint_redacted() {
    let rx = Receiver::start().expect("receiver");
    rx.set_failing(true);
    let endpoint = rx
        .http_endpoint()
        .replacen("http://", "http://agent:s3cret-pw@", 1);
    let log = run_failing("http/protobuf", &endpoint, "answered");
    assert_clean("receiver error", &log);
    assert!(log.contains("<redacted>@127.0.0.1"), "{log}");
}

fn check_config(envs: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(envs.iter().copied())
        .output()
        .expect("run check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn config_errors_and_check_config_show_no_credential() {
    // A header value with a line break (a config error that used to echo the value).
    let (ok, text) = check_config(&[(
        "VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS",
        "authorization=Bearer%20s3cret%0Ax",
    )]);
    assert!(!ok, "a header value with a line break is an error:\n{text}");
    assert!(text.contains("export.headers.authorization"), "{text}");
    assert_clean("header value error", &text);

    // An invalid endpoint with userinfo.
    let (ok, text) = check_config(&[(
        "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
        "http://agent:s3cret@127.0.0.1:0/v1/metrics",
    )]);
    assert!(!ok, "port 0 is an error:\n{text}");
    assert!(
        text.contains("export.endpoint") && text.contains("<redacted>@"),
        "{text}"
    );
    assert_clean("endpoint error", &text);

    // A valid config printed back.
    let (ok, text) = check_config(&[
        (
            "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
            "https://agent:s3cret@otel.example:4317?token=s3cret",
        ),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS", HEADERS),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("authorization"),
        "header names are shown:\n{text}"
    );
    assert_clean("check-config", &text);
}

#[test]
fn credentials_for_another_host_in_clear_text_are_refused_with_a_reason() {
    // From the config: a config error.
    let (ok, text) = check_config(&[
        (
            "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
            "http://otel.example:4317",
        ),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS", HEADERS),
    ]);
    assert!(
        !ok,
        "an authorization header over plain http to another host:\n{text}"
    );
    assert!(
        text.contains("clear text") && text.contains("https://"),
        "{text}"
    );
    assert_clean("clear-text refusal", &text);

    // A tenant header alone is no credential.
    let (ok, text) = check_config(&[
        (
            "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
            "http://otel.example:4317",
        ),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS", "x-scope-orgid=t1"),
    ]);
    assert!(ok, "{text}");

    // From the OpenTelemetry variables, which only the exporter resolves: the agent refuses to
    // start, and says why.
    let out = Command::new(BIN)
        .arg("run")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "test:///default")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://10.0.0.5:4317")
        .env("OTEL_EXPORTER_OTLP_HEADERS", HEADERS)
        .output()
        .expect("run the agent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the agent must not start:\n{text}");
    assert!(text.contains("clear text"), "{text}");
    assert_clean("run refusal", &text);
}
