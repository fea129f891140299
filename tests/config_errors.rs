//! Configuration loading end to end: malformed configs are rejected with messages that name the
//! dotted key and the offending value; valid layers combine with the documented precedence; the
//! reference and demo configs in `config/` load.
//!
//! The environment is always given as a map (`LoadOptions::env`), never taken from the process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use virt_hypervisor_agent::config::{
    load, load_with_warnings, to_yaml, AgentConfig, Compression, ConfigError, ExporterKind,
    LoadOptions, LogFormat, Protocol,
};

/// One configuration layer set: a YAML file (written to a temp dir), env vars, overrides.
#[derive(Default)]
struct Layers<'a> {
    yaml: Option<&'a str>,
    env: &'a [(&'a str, &'a str)],
    overrides: &'a [(&'a str, &'a str)],
}

fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn options(dir: &Path, layers: &Layers<'_>) -> LoadOptions {
    // Always an explicit file, so a /etc/virt-hypervisor-agent/config.yaml on the test host is never read.
    let path = dir.join("agent.yaml");
    std::fs::write(&path, layers.yaml.unwrap_or("")).expect("write temp config");
    LoadOptions {
        path: Some(path),
        env: Some(env_of(layers.env)),
        overrides: layers
            .overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn load_layers(layers: Layers<'_>) -> Result<AgentConfig, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    load(&options(dir.path(), &layers))
}

fn load_ok(layers: Layers<'_>) -> AgentConfig {
    match load_layers(layers) {
        Ok(cfg) => cfg,
        Err(e) => panic!("expected a valid config, got: {}", chain(&e)),
    }
}

/// The error and all its sources, as the binary prints them.
fn chain(err: &ConfigError) -> String {
    virt_hypervisor_agent::logging::error_chain(err)
}

fn yaml(text: &'static str) -> Layers<'static> {
    Layers {
        yaml: Some(text),
        ..Layers::default()
    }
}

fn env(pairs: &'static [(&'static str, &'static str)]) -> Layers<'static> {
    Layers {
        env: pairs,
        ..Layers::default()
    }
}

fn flags(pairs: &'static [(&'static str, &'static str)]) -> Layers<'static> {
    Layers {
        overrides: pairs,
        ..Layers::default()
    }
}

/// (case name, layers, substrings the full error chain must contain: the key and the bad value first).
type Case = (&'static str, Layers<'static>, &'static [&'static str]);

fn malformed() -> Vec<Case> {
    vec![
        // Unknown keys, at every nesting level, from every layer.
        (
            "unknown top-level key",
            yaml("colour: blue\n"),
            &[
                "colour",
                "\"blue\"",
                "allowed top-level keys: node_name, log, libvirt",
            ],
        ),
        (
            "unknown key in log",
            yaml("log:\n  levle: debug\n"),
            &["log.levle", "\"debug\"", "did you mean level?"],
        ),
        (
            "unknown key in libvirt",
            yaml("libvirt:\n  foo: bar\n"),
            &["libvirt.foo", "\"bar\"", "allowed keys in libvirt: uris,"],
        ),
        (
            "unknown key in libvirt.reconnect",
            yaml("libvirt:\n  reconnect:\n    initial: 1s\n"),
            &[
                "libvirt.reconnect.initial",
                "\"1s\"",
                "initial_backoff, max_backoff",
            ],
        ),
        (
            "unknown key in libvirt.discover",
            yaml("libvirt:\n  discover:\n    enable: true\n"),
            &["libvirt.discover.enable", "true", "did you mean enabled?"],
        ),
        (
            "unknown key in metric",
            yaml("metric:\n  unit: s\n"),
            &[
                "metric.unit",
                "\"s\"",
                "name, cardinality_limit, attributes",
            ],
        ),
        (
            "unknown key in metric.attributes",
            yaml("metric:\n  attributes:\n    pod: true\n"),
            &["metric.attributes.pod", "true", "pod_uid"],
        ),
        (
            "unknown key in export",
            yaml("export:\n  insecure: true\n"),
            &["export.insecure", "true", "allowed keys in export"],
        ),
        (
            "unknown key in export.tls",
            yaml("export:\n  tls:\n    ca: /x.pem\n"),
            &[
                "export.tls.ca",
                "\"/x.pem\"",
                "ca_file, cert_file, key_file",
            ],
        ),
        (
            "unknown section value is shown",
            yaml("extra:\n  a: 1\n"),
            &["extra", "{a: 1}"],
        ),
        (
            "env with one _ where __ nests",
            env(&[("VIRT_HYPERVISOR_AGENT_LIBVIRT_FETCH_TIMEOUT", "5s")]),
            &[
                "libvirt_fetch_timeout",
                "\"5s\"",
                "VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT",
            ],
        ),
        (
            "unknown nested env key",
            env(&[("VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CA", "/ca.pem")]),
            &[
                "export.tls.ca",
                "\"/ca.pem\"",
                "from env VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CA",
            ],
        ),
        (
            "unknown override key",
            flags(&[("export.foo", "1")]),
            &["export.foo", "\"1\"", "from the command line"],
        ),
        // Wrong types.
        (
            "count is not a number",
            yaml("libvirt:\n  keepalive_count: abc\n"),
            &["libvirt.keepalive_count", "\"abc\"", "whole number"],
        ),
        (
            "uris is a number",
            yaml("libvirt:\n  uris: 5\n"),
            &["libvirt.uris", "5", "list of strings"],
        ),
        (
            "section is a string",
            yaml("libvirt: qemu:///system\n"),
            &["libvirt", "\"qemu:///system\"", "section"],
        ),
        (
            "bool from env is not a bool",
            env(&[("VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__ENABLED", "maybe")]),
            &["libvirt.discover.enabled", "\"maybe\"", "true or false"],
        ),
        (
            "attribute flag is a list",
            yaml("metric:\n  attributes:\n    uuid: [1]\n"),
            &["metric.attributes.uuid", "[1]", "true or false"],
        ),
        (
            "float where a count goes",
            yaml("metric:\n  cardinality_limit: 1.5\n"),
            &["metric.cardinality_limit", "1.5", "whole number"],
        ),
        (
            "uri list item is a map",
            yaml("libvirt:\n  uris:\n    - {a: 1}\n"),
            &["libvirt.uris[0]", "{a: 1}", "expected a string"],
        ),
        (
            "headers is a list",
            yaml("export:\n  headers: [a, b]\n"),
            &["export.headers", "value not shown", "map of strings"],
        ),
        (
            "header value is a map",
            yaml("export:\n  headers:\n    a: {b: c}\n"),
            &["export.headers.a", "value not shown", "expected a string"],
        ),
        (
            "headers from env without =",
            env(&[("VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS", "a=b,novalue")]),
            &["export.headers", "value not shown", "k=v,k2=v2"],
        ),
        (
            "null where a value is required",
            yaml("libvirt:\n  fetch_timeout: ~\n"),
            &["libvirt.fetch_timeout", "null"],
        ),
        // Numbers out of range.
        (
            "negative concurrency",
            yaml("libvirt:\n  fetch_concurrency: -1\n"),
            &["libvirt.fetch_concurrency", "-1", "whole number"],
        ),
        (
            "zero concurrency",
            yaml("libvirt:\n  fetch_concurrency: 0\n"),
            &["libvirt.fetch_concurrency", "0", "1 to 1024"],
        ),
        (
            "too much concurrency from env",
            env(&[("VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_CONCURRENCY", "5000")]),
            &[
                "libvirt.fetch_concurrency",
                "5000",
                "1 to 1024",
                "VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_CONCURRENCY",
            ],
        ),
        (
            "zero event backlog",
            yaml("libvirt:\n  event_backlog: 0\n"),
            &["libvirt.event_backlog", "0", "1 to 1048576"],
        ),
        (
            "huge event backlog from env",
            env(&[("VIRT_HYPERVISOR_AGENT_LIBVIRT__EVENT_BACKLOG", "99999999")]),
            &[
                "libvirt.event_backlog",
                "99999999",
                "1 to 1048576",
                "VIRT_HYPERVISOR_AGENT_LIBVIRT__EVENT_BACKLOG",
            ],
        ),
        (
            "zero keepalive count",
            yaml("libvirt:\n  keepalive_count: 0\n"),
            &["libvirt.keepalive_count", "0", "keepalive_interval to 0s"],
        ),
        (
            "keepalive count beyond u32",
            yaml("libvirt:\n  keepalive_count: 5000000000\n"),
            &["libvirt.keepalive_count", "5000000000", "1 to 2147483647"],
        ),
        (
            "zero cardinality limit",
            flags(&[("metric.cardinality_limit", "0")]),
            &["metric.cardinality_limit", "0", "1 to 10000000"],
        ),
        // Durations.
        (
            "duration is a word",
            env(&[("VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE", "fast")]),
            &[
                "export.debounce: invalid duration \"fast\"",
                "expected a number with a unit like 250ms, 30s, 5m",
            ],
        ),
        (
            "duration without unit",
            yaml("libvirt:\n  fetch_timeout: 10\n"),
            &["libvirt.fetch_timeout", "10", "time unit needed"],
        ),
        (
            "duration with unknown unit",
            yaml("export:\n  interval: 5 fortnights\n"),
            &["export.interval", "\"5 fortnights\"", "unknown time unit"],
        ),
        (
            "negative duration",
            yaml("libvirt:\n  resync_interval: -5m\n"),
            &["libvirt.resync_interval", "\"-5m\"", "250ms, 30s, 5m"],
        ),
        (
            "zero fetch timeout",
            yaml("libvirt:\n  fetch_timeout: 0s\n"),
            &["libvirt.fetch_timeout", "\"0s\"", "from 100ms to 10m"],
        ),
        (
            "nanosecond fetch timeout (could never open a connection)",
            yaml("libvirt:\n  fetch_timeout: 1ns\n"),
            &["libvirt.fetch_timeout", "\"1ns\"", "from 100ms to 10m"],
        ),
        (
            "absurdly long export interval",
            yaml("export:\n  interval: 99999999999h\n"),
            &["export.interval", "from 100ms to 1day"],
        ),
        (
            "absurdly long resync interval",
            yaml("libvirt:\n  resync_interval: 99999999999h\n"),
            &["libvirt.resync_interval", "from 1s to 1day"],
        ),
        (
            "absurdly long keepalive interval",
            yaml("libvirt:\n  keepalive_interval: 2h\n"),
            &["libvirt.keepalive_interval", "\"2h\"", "from 1s to 1h"],
        ),
        (
            "absurdly long max backoff",
            yaml("libvirt:\n  reconnect:\n    max_backoff: 30days\n"),
            &["libvirt.reconnect.max_backoff", "from 10ms to 1h"],
        ),
        (
            "absurdly long shutdown timeout",
            yaml("export:\n  shutdown_timeout: 1year\n"),
            &["export.shutdown_timeout", "from 100ms to 10m"],
        ),
        (
            "sub-second keepalive",
            yaml("libvirt:\n  keepalive_interval: 500ms\n"),
            &["libvirt.keepalive_interval", "\"500ms\"", "whole seconds"],
        ),
        (
            "resync too frequent",
            yaml("libvirt:\n  resync_interval: 10ms\n"),
            &[
                "libvirt.resync_interval",
                "\"10ms\"",
                "from 1s to 1day, like 5m, or 0s to disable",
            ],
        ),
        (
            "initial backoff above max",
            yaml("libvirt:\n  reconnect:\n    initial_backoff: 1m\n"),
            &[
                "libvirt.reconnect.initial_backoff",
                "\"1m\"",
                "max_backoff (30s)",
            ],
        ),
        (
            "zero initial backoff",
            yaml("libvirt:\n  reconnect:\n    initial_backoff: 0s\n"),
            &[
                "libvirt.reconnect.initial_backoff",
                "\"0s\"",
                "at least 10ms",
            ],
        ),
        (
            "zero rescan interval",
            yaml("libvirt:\n  discover:\n    rescan_interval: 0s\n"),
            &["libvirt.discover.rescan_interval", "\"0s\""],
        ),
        (
            "a socket owner that is not a uid",
            yaml("libvirt:\n  discover:\n    socket_owners: [107, qemu]\n"),
            &[
                "libvirt.discover.socket_owners[1]",
                "\"qemu\"",
                "whole number from 0 to 4294967295",
            ],
        ),
        (
            "a negative socket owner from the environment",
            env(&[(
                "VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__SOCKET_OWNERS",
                "107,-1",
            )]),
            &["libvirt.discover.socket_owners[1]", "\"-1\""],
        ),
        (
            "no socket owner",
            yaml("libvirt:\n  discover:\n    socket_owners: []\n"),
            &["libvirt.discover.socket_owners", "1 to 64 uids"],
        ),
        (
            "a zero domain bound per socket",
            yaml("libvirt:\n  discover:\n    max_domains_per_socket: 0\n"),
            &[
                "libvirt.discover.max_domains_per_socket",
                "from 1 to 100000",
            ],
        ),
        (
            "zero export timeout",
            yaml("export:\n  timeout: 0s\n"),
            &["export.timeout", "\"0s\"", "from 100ms to 10m"],
        ),
        (
            "export interval too short",
            yaml("export:\n  interval: 50ms\n"),
            &["export.interval", "\"50ms\"", "from 100ms to 1day"],
        ),
        (
            "debounce too long",
            flags(&[("export.debounce", "11s")]),
            &["export.debounce", "\"11s\"", "at most 10s"],
        ),
        (
            "zero shutdown timeout",
            yaml("export:\n  shutdown_timeout: 0s\n"),
            &["export.shutdown_timeout", "\"0s\""],
        ),
        // Enums.
        (
            "bad log format",
            yaml("log:\n  format: xml\n"),
            &["log.format", "\"xml\"", "one of text, json"],
        ),
        (
            "bad exporter",
            env(&[("VIRT_HYPERVISOR_AGENT_EXPORT__EXPORTER", "prometheus")]),
            &[
                "export.exporter",
                "\"prometheus\"",
                "one of otlp, stdout, none",
            ],
        ),
        (
            "bad protocol",
            yaml("export:\n  protocol: http/json\n"),
            &[
                "export.protocol",
                "\"http/json\"",
                "grpc, http/protobuf, http",
            ],
        ),
        (
            "bad compression",
            flags(&[("export.compression", "zstd")]),
            &["export.compression", "\"zstd\"", "none, gzip"],
        ),
        // URIs and URLs.
        (
            "uri without scheme",
            yaml("libvirt:\n  uris: [qemu]\n"),
            &["libvirt.uris[0]", "\"qemu\"", "missing ://"],
        ),
        (
            "bad uri in env list",
            env(&[(
                "VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS",
                "qemu:///system,qemu:///sys tem",
            )]),
            &[
                "libvirt.uris[1]",
                "\"qemu:///sys tem\"",
                "VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS",
            ],
        ),
        (
            "duplicate uri",
            yaml("libvirt:\n  uris: [qemu:///system, qemu:///system]\n"),
            &["libvirt.uris[1]", "\"qemu:///system\"", "once"],
        ),
        (
            "empty uris, discovery off",
            yaml("libvirt:\n  uris: []\n"),
            &["libvirt.uris", "[]", "libvirt.discover.enabled"],
        ),
        (
            "empty uris from env, discovery off",
            env(&[("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "")]),
            &["libvirt.uris", "[]", "unless libvirt.discover.enabled"],
        ),
        (
            "endpoint without scheme",
            yaml("export:\n  endpoint: localhost:4317\n"),
            &[
                "export.endpoint",
                "\"localhost:4317\"",
                "http:// or https://",
            ],
        ),
        (
            "endpoint with other scheme",
            flags(&[("export.endpoint", "grpc://collector:4317")]),
            &[
                "export.endpoint",
                "\"grpc://collector:4317\"",
                "http or https",
            ],
        ),
        (
            "endpoint with bad port",
            yaml("export:\n  endpoint: http://collector:99999\n"),
            &["export.endpoint", "\"http://collector:99999\"", "port"],
        ),
        (
            "header value with line break",
            yaml("export:\n  headers:\n    x-a: \"v\\r\\nx-b: w\"\n"),
            // The value is a credential as often as not: shown as <redacted>, never echoed
            // (tests/no_credentials_in_output.rs greps the whole output for it).
            &["export.headers.x-a", "<redacted>", "control characters"],
        ),
        // TLS.
        (
            "cert without key",
            yaml("export:\n  tls:\n    cert_file: /etc/hostname\n"),
            &["export.tls.key_file", "\"/etc/hostname\"", "together"],
        ),
        (
            "key without cert",
            yaml("export:\n  tls:\n    key_file: /etc/hostname\n"),
            &["export.tls.cert_file", "\"/etc/hostname\"", "together"],
        ),
        (
            "missing ca file",
            yaml("export:\n  tls:\n    ca_file: /nonexistent/ca.pem\n"),
            &[
                "export.tls.ca_file",
                "\"/nonexistent/ca.pem\"",
                "readable PEM file",
            ],
        ),
        (
            "ca file is a directory",
            yaml("export:\n  tls:\n    ca_file: /\n"),
            &["export.tls.ca_file", "\"/\"", "not a regular file"],
        ),
        // Names and paths.
        (
            "bare word log level",
            yaml("log:\n  level: verbose\n"),
            &[
                "log.level",
                "\"verbose\"",
                "trace, debug, info, warn, error, off",
            ],
        ),
        (
            "bad level in directive",
            env(&[(
                "VIRT_HYPERVISOR_AGENT_LOG__LEVEL",
                "virt_hypervisor_agent=loud",
            )]),
            &["log.level", "\"virt_hypervisor_agent=loud\""],
        ),
        (
            "metric name starts with digit",
            yaml("metric:\n  name: 1vms\n"),
            &["metric.name", "\"1vms\"", "ASCII letter"],
        ),
        (
            "metric name with colon",
            flags(&[("metric.name", "vm:info")]),
            &["metric.name", "\"vm:info\"", "at most 255"],
        ),
        (
            "relative kubelet root",
            yaml("libvirt:\n  discover:\n    kubelet_root: var/lib/kubelet\n"),
            &[
                "libvirt.discover.kubelet_root",
                "\"var/lib/kubelet\"",
                "absolute",
            ],
        ),
        (
            "discovery without globs",
            yaml("libvirt:\n  discover:\n    enabled: true\n    globs: []\n"),
            &["libvirt.discover.globs", "[]", "at least one"],
        ),
        (
            "node name with space",
            env(&[("VIRT_HYPERVISOR_AGENT_NODE_NAME", "node 1")]),
            &["node_name", "\"node 1\"", "without spaces"],
        ),
        (
            "node name with control char",
            yaml("node_name: \"n\\x01\"\n"),
            &["node_name", "\"n\\u{1}\"", "control characters"],
        ),
        // Whole-file problems.
        (
            "yaml syntax error",
            yaml("libvirt:\n  uris: [qemu:///system\n"),
            &["agent.yaml", "invalid YAML", "line"],
        ),
        (
            "yaml not a map",
            yaml("- a\n- b\n"),
            &["agent.yaml", "invalid YAML"],
        ),
        (
            "two yaml documents",
            yaml("a: 1\n---\nb: 2\n"),
            &["agent.yaml", "2 YAML documents"],
        ),
        (
            "override key is not a path",
            flags(&[("libvirt..uris", "x")]),
            &["libvirt..uris", "\"x\"", "dotted path"],
        ),
    ]
}

#[test]
fn malformed_configs_are_rejected_with_key_and_value() {
    let cases = malformed();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (name, layers, wanted) in cases {
        match load_layers(layers) {
            Ok(_) => failures.push(format!("{name}: loaded without error")),
            Err(e) => {
                let text = chain(&e);
                for w in wanted {
                    if !text.contains(w) {
                        failures.push(format!("{name}: {w:?} not in: {text}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn nonexistent_config_path_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.yaml");
    let opts = LoadOptions {
        path: Some(path.clone()),
        env: Some(HashMap::new()),
        overrides: vec![],
    };
    let err = load(&opts).expect_err("missing file");
    assert!(matches!(err, ConfigError::NotFound { .. }), "{err:?}");
    assert_eq!(
        chain(&err),
        format!("config file {}: not found", path.display())
    );
}

#[test]
fn unreadable_config_path_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = LoadOptions {
        path: Some(dir.path().to_path_buf()),
        env: Some(HashMap::new()),
        overrides: vec![],
    };
    let err = load(&opts).expect_err("a directory is not a file");
    assert!(matches!(err, ConfigError::NotRegular { .. }), "{err:?}");
    assert!(chain(&err).contains("a directory, not a regular file"));
    assert!(chain(&err).contains(&dir.path().display().to_string()));
}

#[test]
fn all_problems_are_reported_together_with_their_origin() {
    let err = load_layers(Layers {
        yaml: Some("libvirt:\n  fetch_timeout: soon\n  foo: 1\n"),
        env: &[("VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE", "fast")],
        overrides: &[("metric.cardinality_limit", "-3")],
    })
    .expect_err("invalid");
    let text = chain(&err);
    assert!(text.starts_with("4 configuration errors:"), "{text}");
    assert!(text.contains("export.debounce: invalid duration \"fast\" (from env VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE)"), "{text}");
    assert!(
        text.contains("libvirt.fetch_timeout: invalid duration \"soon\" (from /"),
        "{text}"
    );
    assert!(text.contains("libvirt.foo: unknown key (from /"), "{text}");
    assert!(
        text.contains("metric.cardinality_limit: invalid value \"-3\" (from the command line)"),
        "{text}"
    );
}

#[test]
fn semantic_errors_name_the_layer_that_set_the_value() {
    let err = load_layers(Layers {
        yaml: Some("libvirt:\n  fetch_concurrency: 4000\n"),
        ..Layers::default()
    })
    .expect_err("invalid");
    assert!(
        chain(&err).contains("libvirt.fetch_concurrency: invalid value 4000 (from /"),
        "{}",
        chain(&err)
    );
}

#[test]
fn no_layers_give_the_defaults() {
    assert_eq!(load_ok(Layers::default()), AgentConfig::default());
    // No --config: the default path is read only when it exists.
    if !Path::new(virt_hypervisor_agent::config::DEFAULT_CONFIG_PATH).exists() {
        let opts = LoadOptions {
            path: None,
            env: Some(HashMap::new()),
            overrides: vec![],
        };
        assert_eq!(load(&opts).expect("defaults"), AgentConfig::default());
    }
}

#[test]
fn yaml_then_env_then_overrides() {
    let cfg = load_ok(Layers {
        yaml: Some(
            "node_name: from-yaml\nlibvirt:\n  uris: [test:///default]\n  fetch_timeout: 1s\n  fetch_concurrency: 2\n\
             export:\n  debounce: 100ms\n",
        ),
        env: &[
            ("VIRT_HYPERVISOR_AGENT_NODE_NAME", "from-env"),
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT", "2s"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE", "200ms"),
            ("UNRELATED_VARIABLE", "ignored"),
        ],
        overrides: &[("node_name", "from-flag"), ("export.debounce", "300ms")],
    });
    assert_eq!(cfg.node_name, "from-flag");
    assert_eq!(cfg.libvirt.uris, ["test:///default"]);
    assert_eq!(cfg.libvirt.fetch_timeout, Duration::from_secs(2));
    assert_eq!(cfg.libvirt.fetch_concurrency, 2);
    assert_eq!(cfg.export.debounce, Duration::from_millis(300));
    // Untouched keys keep their defaults.
    assert_eq!(
        cfg.libvirt.keepalive_count,
        AgentConfig::default().libvirt.keepalive_count
    );
}

#[test]
fn env_values_are_coerced_to_lists_maps_numbers_and_bools() {
    let cfg = load_ok(env(&[
        (
            "VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS",
            "qemu:///system, test:///default",
        ),
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_CONCURRENCY", "16"),
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__KEEPALIVE_COUNT", "5"),
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__ENABLED", "TRUE"),
        (
            "VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__GLOBS",
            "pods/*/sock",
        ),
        ("VIRT_HYPERVISOR_AGENT_METRIC__CARDINALITY_LIMIT", "50000"),
        (
            "VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__SOCKET_OWNERS",
            "107, 0,1000",
        ),
        ("VIRT_HYPERVISOR_AGENT_METRIC__ATTRIBUTES__UUID", "true"),
        (
            "VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS",
            "authorization=Bearer%20abc%3D,x-tenant=t1",
        ),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", "http/protobuf"),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__COMPRESSION", "GZIP"),
        ("VIRT_HYPERVISOR_AGENT_LOG__FORMAT", "json"),
    ]));
    assert_eq!(cfg.libvirt.uris, ["qemu:///system", "test:///default"]);
    assert_eq!(cfg.libvirt.fetch_concurrency, 16);
    assert_eq!(cfg.libvirt.keepalive_count, 5);
    assert!(cfg.libvirt.discover.enabled);
    assert_eq!(cfg.libvirt.discover.globs, ["pods/*/sock"]);
    assert_eq!(cfg.libvirt.discover.socket_owners, [107, 0, 1000]);
    assert_eq!(cfg.metric.cardinality_limit, 50_000);
    assert!(cfg.metric.attributes.uuid);
    assert_eq!(
        cfg.export.headers,
        BTreeMap::from([
            ("authorization".to_string(), "Bearer abc=".to_string()),
            ("x-tenant".to_string(), "t1".to_string()),
        ])
    );
    assert_eq!(cfg.export.protocol, Some(Protocol::HttpProtobuf));
    assert_eq!(cfg.export.compression, Some(Compression::Gzip));
    assert_eq!(cfg.log.format, LogFormat::Json);
}

#[test]
fn header_overrides_merge_into_the_file_map() {
    let cfg = load_ok(Layers {
        yaml: Some("export:\n  headers:\n    Authorization: Bearer x\n"),
        overrides: &[("export.headers.x-tenant", "t1")],
        ..Layers::default()
    });
    assert_eq!(
        cfg.export.headers.get("Authorization").map(String::as_str),
        Some("Bearer x")
    );
    assert_eq!(
        cfg.export.headers.get("x-tenant").map(String::as_str),
        Some("t1")
    );
}

#[test]
fn a_malformed_header_never_echoes_its_credential() {
    for layers in [
        env(&[(
            "VIRT_HYPERVISOR_AGENT_EXPORT__HEADERS",
            "authorization=Bearer s3cr3t-token,broken",
        )]),
        yaml("export:\n  headers:\n    authorization: [Bearer, s3cr3t-token]\n"),
    ] {
        let err = load_layers(layers).expect_err("a malformed header is refused");
        let text = chain(&err);
        assert!(text.contains("export.headers"), "{text}");
        assert!(
            !text.contains("s3cr3t-token"),
            "the credential leaked: {text}"
        );
    }
}

#[test]
fn empty_env_value_unsets_an_optional_key() {
    let cfg = load_ok(Layers {
        yaml: Some("export:\n  endpoint: http://collector:4317\n  interval: 10s\n"),
        env: &[("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", "")],
        ..Layers::default()
    });
    assert_eq!(cfg.export.endpoint, None);
    assert_eq!(cfg.export.interval, Some(Duration::from_secs(10)));
}

#[test]
fn durations_are_human_strings() {
    let cfg = load_ok(yaml(
        "libvirt:\n  fetch_timeout: 250ms\n  keepalive_interval: 30s\n  resync_interval: 5m\n\
         export:\n  interval: 1m30s\n  timeout: 2s\n",
    ));
    assert_eq!(cfg.libvirt.fetch_timeout, Duration::from_millis(250));
    assert_eq!(cfg.libvirt.keepalive_interval, Duration::from_secs(30));
    assert_eq!(cfg.libvirt.resync_interval, Duration::from_secs(300));
    assert_eq!(cfg.export.interval, Some(Duration::from_secs(90)));
    assert_eq!(cfg.export.timeout, Some(Duration::from_secs(2)));
}

#[test]
fn zero_disables_resync_debounce_and_keepalive() {
    let cfg = load_ok(env(&[
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__RESYNC_INTERVAL", "0s"),
        ("VIRT_HYPERVISOR_AGENT_EXPORT__DEBOUNCE", "0"),
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__KEEPALIVE_INTERVAL", "0s"),
    ]));
    assert_eq!(cfg.libvirt.resync_interval, Duration::ZERO);
    assert_eq!(cfg.export.debounce, Duration::ZERO);
    assert_eq!(cfg.libvirt.keepalive_interval, Duration::ZERO);
}

#[test]
fn discovery_allows_an_empty_uri_list() {
    let cfg = load_ok(env(&[
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", ""),
        ("VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__ENABLED", "true"),
    ]));
    assert!(cfg.libvirt.uris.is_empty());
}

#[test]
fn tls_files_that_exist_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client-key.pem");
    std::fs::write(&cert, "cert").expect("write");
    std::fs::write(&key, "key").expect("write");
    let opts = LoadOptions {
        path: None,
        env: Some(env_of(&[
            (
                "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CERT_FILE",
                cert.to_str().expect("utf-8"),
            ),
            (
                "VIRT_HYPERVISOR_AGENT_EXPORT__TLS__KEY_FILE",
                key.to_str().expect("utf-8"),
            ),
            (
                "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
                "https://collector:4317",
            ),
        ])),
        overrides: vec![],
    };
    if Path::new(virt_hypervisor_agent::config::DEFAULT_CONFIG_PATH).exists() {
        return;
    }
    let cfg = load(&opts).expect("valid");
    assert_eq!(cfg.export.tls.cert_file.as_deref(), Some(cert.as_path()));
    assert_eq!(cfg.export.tls.key_file.as_deref(), Some(key.as_path()));
}

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

#[test]
fn reference_config_is_exactly_the_defaults() {
    let opts = LoadOptions {
        path: Some(repo_file("agent.yaml")),
        env: Some(HashMap::new()),
        overrides: vec![],
    };
    assert_eq!(
        load(&opts).expect("config/agent.yaml loads"),
        AgentConfig::default()
    );
}

#[test]
fn demo_config_loads_with_the_uri_from_the_environment() {
    let uri = format!("test://{}", repo_file("demo-node.xml").display());
    let opts = LoadOptions {
        path: Some(repo_file("demo.yaml")),
        env: Some(env_of(&[(
            "VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS",
            uri.as_str(),
        )])),
        overrides: vec![],
    };
    let cfg = load(&opts).expect("config/demo.yaml loads");
    assert_eq!(cfg.libvirt.uris, [uri]);
    assert_eq!(cfg.node_name, "demo-node");
    assert_eq!(cfg.export.exporter, ExporterKind::Stdout);
    assert_eq!(cfg.export.interval, Some(Duration::from_secs(5)));
    assert_eq!(cfg.libvirt.resync_interval, Duration::from_secs(60));
    assert!(cfg.metric.attributes.domain && cfg.metric.attributes.uuid);
}

#[test]
fn printed_config_loads_back_unchanged() {
    let cfg = load_ok(yaml(
        "node_name: \"n-1\"\nlibvirt:\n  uris: [qemu:///system, \"test:///default\"]\n  resync_interval: 0s\n\
         export:\n  exporter: stdout\n  protocol: http\n  interval: 1m30s\n",
    ));
    let printed = to_yaml(&cfg);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("printed.yaml");
    std::fs::write(&path, &printed).expect("write");
    let opts = LoadOptions {
        path: Some(path),
        env: Some(HashMap::new()),
        overrides: vec![],
    };
    assert_eq!(load(&opts).expect("printed config loads"), cfg, "{printed}");
}

/// Not an assertion: prints a sample of messages (`cargo test --test config_errors -- --nocapture show`).
#[test]
fn show_sample_messages() {
    for (name, layers, _) in malformed().into_iter().take(80) {
        if let Err(e) = load_layers(layers) {
            println!("{name}:\n  {}", chain(&e));
        }
    }
}

#[test]
fn uri_lists_are_bounded_before_they_are_checked_item_by_item() {
    // 300,000 URIs took the quadratic duplicate check over 20 s; a list is now refused by its
    // length first, and duplicates in a list of allowed length are found with a set.
    let many: Vec<String> = (0..300_000).map(|i| format!("test:///n{i}")).collect();
    let joined = many.join(",");
    let err = load_layers(Layers {
        overrides: &[("libvirt.uris", &joined)],
        ..Layers::default()
    })
    .expect_err("too many URIs");
    let text = chain(&err);
    assert!(text.contains("libvirt.uris"), "{text}");
    assert!(text.contains("a list of 300000 URIs"), "{text}");
    assert!(text.contains("at most 1024 URIs"), "{text}");

    let mut dup: Vec<String> = many[..1024].to_vec();
    dup[1023] = dup[0].clone();
    let joined = dup.join(",");
    let err = load_layers(Layers {
        overrides: &[("libvirt.uris", &joined)],
        ..Layers::default()
    })
    .expect_err("duplicate");
    assert!(
        chain(&err).contains("libvirt.uris[1023]"),
        "{}",
        chain(&err)
    );
}

/// `metric.attributes.vmi_uid` was removed (current KubeVirt leaves the VMI UID out of the domain
/// metadata). A config that kept its old default still loads, with one warning; asking for it
/// is an error that says why and names the replacement.
#[test]
fn removed_vmi_uid_false_loads_with_one_warning() {
    for layers in [
        yaml("metric:\n  attributes:\n    vmi_uid: false\n    uuid: true\n"),
        env(&[("VIRT_HYPERVISOR_AGENT_METRIC__ATTRIBUTES__VMI_UID", "false")]),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let loaded = match load_with_warnings(&options(dir.path(), &layers)) {
            Ok(l) => l,
            Err(e) => panic!("expected a valid config, got: {}", chain(&e)),
        };
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        let w = &loaded.warnings[0];
        assert!(
            w.starts_with("metric.attributes.vmi_uid: obsolete key ignored"),
            "{w}"
        );
        assert!(w.contains("pod_uid"), "{w}");
        // Nothing else changed; the removed key is not printed back.
        let printed = to_yaml(&loaded.config);
        assert!(!printed.contains("vmi_uid"), "{printed}");
    }
    let cfg = load_ok(yaml(
        "metric:\n  attributes:\n    vmi_uid: false\n    uuid: true\n",
    ));
    assert!(cfg.metric.attributes.uuid);
}

#[test]
fn removed_vmi_uid_true_is_an_error_naming_the_replacement() {
    for layers in [
        yaml("metric:\n  attributes:\n    vmi_uid: true\n"),
        Layers {
            overrides: &[("metric.attributes.vmi_uid", "true")],
            ..Layers::default()
        },
    ] {
        let err = load_layers(layers).expect_err("vmi_uid: true must not load");
        let msg = chain(&err);
        assert!(matches!(err, ConfigError::Removed { .. }), "{msg}");
        for part in [
            "metric.attributes.vmi_uid",
            "true",
            "KubeVirt v0.59",
            "metric.attributes.pod_uid",
            "remove the key",
        ] {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }
    }
    // Not a boolean at all: a value error that still says the key is obsolete.
    let msg =
        chain(&load_layers(yaml("metric:\n  attributes:\n    vmi_uid: maybe\n")).unwrap_err());
    assert!(
        msg.contains("metric.attributes.vmi_uid") && msg.contains("obsolete"),
        "{msg}"
    );
}
