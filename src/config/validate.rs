//! Semantic checks on a deserialized [`AgentConfig`].
//!
//! Types and key names are checked while loading; this checks what the types cannot say: ranges,
//! URI and name syntax, keys that go together, files that must exist. All problems are reported at
//! once, each naming the dotted key, the value and what is allowed. Nothing here opens a
//! connection; the only I/O is opening the TLS files to prove they are readable.
//!
//! Decisions recorded here (and in `config/agent.yaml`):
//! - keepalive is disabled with `libvirt.keepalive_interval: 0s`, never with a count of 0 (libvirt
//!   gives count 0 a different meaning: close after one silent interval);
//! - `libvirt.resync_interval` and `export.debounce` accept `0s` to disable;
//! - duplicate URIs are an error, since each would export every domain twice.

use std::path::Path;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use super::error::{truncate, ConfigError};
use super::limits::*;
use super::AgentConfig;

const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A duration that must lie in `(min, max)`, inclusive.
fn check_range(
    errs: &mut Vec<ConfigError>,
    key: &'static str,
    d: Duration,
    (min, max): (Duration, Duration),
    example: &str,
) {
    if d < min || d > max {
        errs.push(ConfigError::invalid(
            key,
            "duration",
            dur(d),
            format!(
                "expected a duration from {} to {}, {example}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
}

/// A count that must lie in `1..=max`.
fn check_count(errs: &mut Vec<ConfigError>, key: &'static str, n: usize, max: usize) {
    if !(1..=max).contains(&n) {
        errs.push(ConfigError::invalid(
            key,
            "value",
            n.to_string(),
            format!("expected a whole number from 1 to {max}"),
        ));
    }
}

fn dur(d: Duration) -> String {
    format!("{:?}", humantime::format_duration(d).to_string())
}

fn quoted(s: &str) -> String {
    truncate(format!("{s:?}"))
}

fn path(p: &Path) -> String {
    quoted(&p.display().to_string())
}

impl AgentConfig {
    /// Check the semantics of the whole configuration; all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        self.check_node_and_log(&mut errs);
        self.check_libvirt(&mut errs);
        self.check_metric(&mut errs);
        self.check_export(&mut errs);
        self.check_health(&mut errs);
        ConfigError::from_all(errs)
    }

    fn check_node_and_log(&self, errs: &mut Vec<ConfigError>) {
        let node = &self.node_name;
        if node.chars().count() > MAX_NODE_NAME_LEN
            || node.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            errs.push(ConfigError::invalid(
                "node_name",
                "value",
                quoted(node),
                format!(
                    "expected at most {MAX_NODE_NAME_LEN} characters without spaces or control characters \
                     (empty: NODE_NAME, else the host name)"
                ),
            ));
        }
        if let Err(why) = check_log_level(&self.log.level) {
            errs.push(ConfigError::invalid(
                "log.level",
                "value",
                quoted(&self.log.level),
                format!(
                    "expected a level ({}) or comma-separated target=level directives \
                     like virt_hypervisor_agent=debug,info ({why})",
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
    }

    fn check_libvirt(&self, errs: &mut Vec<ConfigError>) {
        let lv = &self.libvirt;
        if lv.uris.is_empty() && !lv.discover.enabled {
            errs.push(ConfigError::invalid(
                "libvirt.uris",
                "value",
                "[]",
                "expected at least one URI (like qemu:///system) unless libvirt.discover.enabled is true",
            ));
        }
        if lv.uris.len() > MAX_URIS {
            errs.push(ConfigError::invalid(
                "libvirt.uris",
                "value",
                format!("a list of {} URIs", lv.uris.len()),
                format!(
                    "expected at most {MAX_URIS} URIs (use libvirt.discover for launcher pods)"
                ),
            ));
        } else {
            let mut seen = std::collections::HashSet::new();
            for (i, uri) in lv.uris.iter().enumerate() {
                if let Err(why) = check_libvirt_uri(uri) {
                    errs.push(ConfigError::invalid(
                        format!("libvirt.uris[{i}]"),
                        "URI",
                        quoted(uri),
                        format!(
                            "expected driver[+transport]://[host]/path like qemu:///system ({why})"
                        ),
                    ));
                } else if !seen.insert(uri.as_str()) {
                    errs.push(ConfigError::invalid(
                        format!("libvirt.uris[{i}]"),
                        "URI",
                        quoted(uri),
                        "expected each URI once (a duplicate would export its domains twice)",
                    ));
                }
            }
        }
        let ka = lv.keepalive_interval;
        if !ka.is_zero()
            && (ka < Duration::from_secs(1)
                || ka.subsec_nanos() != 0
                || ka > MAX_KEEPALIVE_INTERVAL)
        {
            errs.push(ConfigError::invalid(
                "libvirt.keepalive_interval",
                "duration",
                dur(ka),
                format!(
                    "expected whole seconds from 1s to {} (libvirt counts keepalive in seconds), or 0s to disable keepalive",
                    humantime::format_duration(MAX_KEEPALIVE_INTERVAL)
                ),
            ));
        }
        if !(1..=MAX_KEEPALIVE_COUNT).contains(&lv.keepalive_count) {
            errs.push(ConfigError::invalid(
                "libvirt.keepalive_count",
                "value",
                lv.keepalive_count.to_string(),
                format!(
                    "expected a whole number from 1 to {MAX_KEEPALIVE_COUNT} \
                     (to disable keepalive, set libvirt.keepalive_interval to 0s)"
                ),
            ));
        }
        check_range(
            errs,
            "libvirt.fetch_timeout",
            lv.fetch_timeout,
            FETCH_TIMEOUT_RANGE,
            "like 10s (a shorter bound cannot open a connection)",
        );
        check_count(
            errs,
            "libvirt.fetch_concurrency",
            lv.fetch_concurrency,
            MAX_FETCH_CONCURRENCY,
        );
        check_count(
            errs,
            "libvirt.event_backlog",
            lv.event_backlog,
            MAX_EVENT_BACKLOG,
        );
        let resync = lv.resync_interval;
        if !resync.is_zero() {
            check_range(
                errs,
                "libvirt.resync_interval",
                resync,
                RESYNC_INTERVAL_RANGE,
                "like 5m, or 0s to disable",
            );
        }
        let rc = &lv.reconnect;
        if rc.initial_backoff < BACKOFF_RANGE.0 || rc.initial_backoff > rc.max_backoff {
            errs.push(ConfigError::invalid(
                "libvirt.reconnect.initial_backoff",
                "duration",
                dur(rc.initial_backoff),
                format!(
                    "expected a duration of at least {} and at most libvirt.reconnect.max_backoff ({})",
                    humantime::format_duration(BACKOFF_RANGE.0),
                    humantime::format_duration(rc.max_backoff)
                ),
            ));
        }
        check_range(
            errs,
            "libvirt.reconnect.max_backoff",
            rc.max_backoff,
            BACKOFF_RANGE,
            "like 30s",
        );
        let d = &lv.discover;
        if !d.kubelet_root.is_absolute() {
            errs.push(ConfigError::invalid(
                "libvirt.discover.kubelet_root",
                "path",
                path(&d.kubelet_root),
                "expected an absolute path, like /var/lib/kubelet",
            ));
        }
        if d.enabled && d.globs.is_empty() {
            errs.push(ConfigError::invalid(
                "libvirt.discover.globs",
                "value",
                "[]",
                "expected at least one socket glob when libvirt.discover.enabled is true",
            ));
        }
        if d.globs.len() > MAX_GLOBS {
            errs.push(ConfigError::invalid(
                "libvirt.discover.globs",
                "value",
                format!("a list of {} globs", d.globs.len()),
                format!("expected at most {MAX_GLOBS} socket globs"),
            ));
        }
        for (i, glob) in d.globs.iter().enumerate().take(MAX_GLOBS) {
            if glob.trim().is_empty() || glob.contains('\0') {
                errs.push(ConfigError::invalid(
                    format!("libvirt.discover.globs[{i}]"),
                    "glob",
                    quoted(glob),
                    "expected a non-empty path glob, relative to libvirt.discover.kubelet_root or absolute",
                ));
            }
        }
        if d.socket_owners.is_empty() || d.socket_owners.len() > MAX_SOCKET_OWNERS {
            errs.push(ConfigError::invalid(
                "libvirt.discover.socket_owners",
                "value",
                format!("a list of {} uids", d.socket_owners.len()),
                format!(
                    "expected 1 to {MAX_SOCKET_OWNERS} uids that may own a launcher socket, \
                     like [107, 0] (KubeVirt's non-root and root launchers)"
                ),
            ));
        }
        check_count(
            errs,
            "libvirt.discover.max_domains_per_socket",
            d.max_domains_per_socket,
            MAX_DOMAINS_PER_SOCKET,
        );
        check_range(
            errs,
            "libvirt.discover.rescan_interval",
            d.rescan_interval,
            RESCAN_INTERVAL_RANGE,
            "like 30s",
        );
    }

    fn check_metric(&self, errs: &mut Vec<ConfigError>) {
        let m = &self.metric;
        if !is_instrument_name(&m.name) {
            errs.push(ConfigError::invalid(
                "metric.name",
                "value",
                quoted(&m.name),
                format!(
                    "expected an OpenTelemetry instrument name: an ASCII letter, then letters, digits, \
                     _ . - or /, at most {MAX_METRIC_NAME_LEN} characters"
                ),
            ));
        }
        check_count(
            errs,
            "metric.cardinality_limit",
            m.cardinality_limit,
            MAX_CARDINALITY_LIMIT,
        );
    }

    fn check_health(&self, errs: &mut Vec<ConfigError>) {
        if let Some(listen) = &self.health.listen {
            if listen.trim().parse::<std::net::SocketAddr>().is_err() {
                errs.push(ConfigError::invalid(
                    "health.listen",
                    "address",
                    quoted(listen),
                    "expected an IP address and port like 0.0.0.0:8080, [::]:8080 or \
                     127.0.0.1:8080 (no host names)"
                        .to_string(),
                ));
            }
        }
    }

    fn check_export(&self, errs: &mut Vec<ConfigError>) {
        let e = &self.export;
        if let Some(endpoint) = &e.endpoint {
            if let Err(why) = check_http_url(endpoint) {
                errs.push(ConfigError::invalid(
                    "export.endpoint",
                    "URL",
                    quoted(&super::redact::endpoint(endpoint)),
                    format!(
                        "expected an http:// or https:// URL like http://localhost:4317 ({why})"
                    ),
                ));
            }
        }
        if e.headers.len() > MAX_HEADERS {
            errs.push(ConfigError::invalid(
                "export.headers",
                "value",
                format!("a map of {} headers", e.headers.len()),
                format!("expected at most {MAX_HEADERS} headers"),
            ));
        }
        for (name, value) in e.headers.iter().take(MAX_HEADERS) {
            let key = format!("export.headers.{name}");
            if name.is_empty() || !name.bytes().all(is_tchar) {
                errs.push(ConfigError::invalid(
                    key.clone(),
                    "header name",
                    quoted(name),
                    "expected letters, digits and !#$%&'*+-.^_`|~",
                ));
            }
            // The value is never shown: it is usually a credential.
            if value.chars().any(|c| c.is_control() && c != '\t') {
                errs.push(ConfigError::invalid(
                    key,
                    "header value",
                    "<redacted>",
                    "expected no control characters (no line breaks)",
                ));
            }
        }
        if let Some(endpoint) = &e.endpoint {
            let client_tls = e.tls.cert_file.is_some() || e.tls.key_file.is_some();
            if let Err(why) = super::redact::credentials_in_clear(
                endpoint,
                e.headers.keys().map(String::as_str),
                client_tls,
            ) {
                errs.push(ConfigError::invalid(
                    "export.endpoint",
                    "URL",
                    quoted(&super::redact::endpoint(endpoint)),
                    why,
                ));
            }
        }
        if let Some(timeout) = e.timeout {
            check_range(
                errs,
                "export.timeout",
                timeout,
                EXPORT_TIMEOUT_RANGE,
                "like 10s (or unset for OTEL_EXPORTER_OTLP_TIMEOUT)",
            );
        }
        if let Some(interval) = e.interval {
            check_range(
                errs,
                "export.interval",
                interval,
                (MIN_EXPORT_INTERVAL, MAX_EXPORT_INTERVAL),
                "like 30s (or unset for OTEL_METRIC_EXPORT_INTERVAL)",
            );
        }
        if e.debounce > MAX_DEBOUNCE {
            errs.push(ConfigError::invalid(
                "export.debounce",
                "duration",
                dur(e.debounce),
                format!(
                    "expected at most {} (0s disables push on change)",
                    humantime::format_duration(MAX_DEBOUNCE)
                ),
            ));
        }
        check_range(
            errs,
            "export.shutdown_timeout",
            e.shutdown_timeout,
            SHUTDOWN_TIMEOUT_RANGE,
            "like 2s",
        );
        let tls = &e.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), None) => errs.push(ConfigError::invalid(
                "export.tls.key_file",
                "value",
                "null",
                format!("expected a PEM key file, given together with export.tls.cert_file (which is {})", path(cert)),
            )),
            (None, Some(key)) => errs.push(ConfigError::invalid(
                "export.tls.cert_file",
                "value",
                "null",
                format!("expected a PEM certificate file, given together with export.tls.key_file (which is {})", path(key)),
            )),
            _ => {}
        }
        for (key, file) in [
            ("export.tls.ca_file", &tls.ca_file),
            ("export.tls.cert_file", &tls.cert_file),
            ("export.tls.key_file", &tls.key_file),
        ] {
            let Some(file) = file else { continue };
            // Opening proves existence and permission; the exporter reads the content later.
            let problem = match std::fs::File::open(file) {
                Ok(f) => match f.metadata() {
                    Ok(meta) if meta.is_file() => None,
                    Ok(_) => Some("not a regular file".to_string()),
                    Err(e) => Some(e.to_string()),
                },
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = problem {
                errs.push(ConfigError::invalid(
                    key,
                    "file",
                    path(file),
                    format!("expected a readable PEM file ({why})"),
                ));
            }
        }
    }
}

/// `EnvFilter` accepts a bare word as a target name (`verbose` would mean "target verbose at
/// TRACE"), which hides typos of level names; bare words must therefore be levels. Also used
/// for `RUST_LOG`.
pub fn check_log_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("empty".into());
    }
    for directive in level.split(',').map(str::trim) {
        if !directive.contains('=')
            && !directive.contains('[')
            && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(format!("{directive:?} is neither a level nor target=level"));
        }
    }
    EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn check_libvirt_uri(uri: &str) -> Result<(), &'static str> {
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains spaces or control characters");
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err("missing ://");
    };
    let mut chars = scheme.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err("the scheme must be a letter followed by letters, digits, + - or .");
    }
    if rest.is_empty() {
        return Err("nothing after ://");
    }
    Ok(())
}

fn check_http_url(url: &str) -> Result<(), &'static str> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains spaces or control characters");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("missing scheme");
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err("the scheme must be http or https");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => return Err("unclosed ["),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err("the port must be a number from 1 to 65535");
    }
    Ok(())
}

fn is_instrument_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_METRIC_NAME_LEN
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'))
}

/// RFC 9110 token character (header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cfg: &AgentConfig) -> Vec<String> {
        match cfg.validate() {
            Ok(()) => vec![],
            Err(e) => e
                .errors()
                .into_iter()
                .map(|e| match e {
                    ConfigError::Invalid { key, .. } => key.clone(),
                    other => other.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(keys(&AgentConfig::default()), Vec::<String>::new());
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.fetch_concurrency = 0;
        cfg.metric.cardinality_limit = 0;
        let err = cfg.validate().expect_err("invalid");
        assert_eq!(
            keys(&cfg),
            ["libvirt.fetch_concurrency", "metric.cardinality_limit"]
        );
        assert!(
            err.to_string().starts_with("2 configuration errors:"),
            "{err}"
        );
    }

    #[test]
    fn discovery_allows_empty_uri_list() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.uris.clear();
        assert_eq!(keys(&cfg), ["libvirt.uris"]);
        cfg.libvirt.discover.enabled = true;
        assert_eq!(keys(&cfg), Vec::<String>::new());
    }

    #[test]
    fn duplicate_uris_are_rejected() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.uris = vec![
            "qemu:///system".into(),
            "test:///default".into(),
            "qemu:///system".into(),
        ];
        assert_eq!(keys(&cfg), ["libvirt.uris[2]"]);
    }

    #[test]
    fn libvirt_uris_need_a_scheme() {
        for ok in [
            "qemu:///system",
            "qemu+ssh://root@h/system",
            "test:///default",
            "qemu+unix:///session?socket=/a/b",
        ] {
            assert_eq!(check_libvirt_uri(ok), Ok(()), "{ok}");
        }
        for bad in [
            "qemu",
            "://x",
            "1qemu:///system",
            "qemu://",
            "qemu:///sys tem",
            "qe_mu:///system",
        ] {
            assert!(check_libvirt_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        for ok in [
            "http://localhost:4317",
            "https://otel.example:443/v1/metrics",
            "http://[::1]:4318",
            "http://c",
        ] {
            assert_eq!(check_http_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "localhost:4317",
            "grpc://c:4317",
            "http://",
            "http://:4317",
            "http://c:99999",
            "http://c:x",
            "http://[::1",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_health_endpoint_needs_an_ip_address_and_port() {
        let mut cfg = AgentConfig::default();
        assert_eq!(cfg.health.addr(), None, "off by default");
        for ok in ["0.0.0.0:8080", "[::]:8080", "127.0.0.1:1"] {
            cfg.health.listen = Some(ok.into());
            assert!(cfg.validate().is_ok(), "{ok}");
            assert!(cfg.health.addr().is_some(), "{ok}");
        }
        for bad in [
            "8080",
            "localhost:8080",
            ":8080",
            "0.0.0.0",
            "0.0.0.0:99999",
            "",
        ] {
            cfg.health.listen = Some(bad.into());
            let err = cfg.validate().expect_err(bad).to_string();
            assert!(err.contains("health.listen"), "{bad}: {err}");
        }
    }

    #[test]
    fn instrument_names_follow_the_otel_syntax() {
        for ok in ["kubevirt_vmi_hypervisor_info", "a", "a.b-c/d_1"] {
            assert!(is_instrument_name(ok), "{ok}");
        }
        let too_long = "a".repeat(256);
        for bad in ["", "1abc", "_a", "a b", "a:b", "é", too_long.as_str()] {
            assert!(!is_instrument_name(bad), "{bad}");
        }
    }

    #[test]
    fn log_levels_reject_bare_non_level_words() {
        for ok in [
            "info",
            "DEBUG",
            "virt_hypervisor_agent=debug,info",
            "off",
            "info,opentelemetry=warn",
        ] {
            assert_eq!(check_log_level(ok), Ok(()), "{ok}");
        }
        for bad in ["", "verbose", "info,loud", "x=loud"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keepalive_is_disabled_by_interval_zero_not_count_zero() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.keepalive_interval = Duration::ZERO;
        assert_eq!(keys(&cfg), Vec::<String>::new());
        cfg.libvirt.keepalive_count = 0;
        assert_eq!(keys(&cfg), ["libvirt.keepalive_count"]);
        cfg.libvirt.keepalive_count = 3;
        cfg.libvirt.keepalive_interval = Duration::from_millis(1500);
        assert_eq!(keys(&cfg), ["libvirt.keepalive_interval"]);
    }

    #[test]
    fn backoff_must_not_exceed_its_maximum() {
        let mut cfg = AgentConfig::default();
        cfg.libvirt.reconnect.initial_backoff = Duration::from_secs(60);
        assert_eq!(keys(&cfg), ["libvirt.reconnect.initial_backoff"]);
        cfg.libvirt.reconnect.max_backoff = Duration::from_secs(60);
        assert_eq!(keys(&cfg), Vec::<String>::new());
    }

    #[test]
    fn header_injection_is_rejected() {
        let mut cfg = AgentConfig::default();
        cfg.export
            .headers
            .insert("x-a".into(), "v\r\nx-b: w".into());
        cfg.export.headers.insert("bad name".into(), "v".into());
        assert_eq!(
            keys(&cfg),
            ["export.headers.bad name", "export.headers.x-a"]
        );
    }
}
