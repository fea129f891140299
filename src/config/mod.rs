//! Agent configuration: the schema, its defaults, and layered loading.
//!
//! Layers, lowest to highest precedence: built-in defaults < YAML file (`--config`, default
//! `/etc/virt-hypervisor-agent/config.yaml` when it exists) < environment
//! (`VIRT_HYPERVISOR_AGENT_…`, nested keys joined with `__`) < command-line flags.
//! Unknown keys are errors. Durations are human strings (`250ms`, `30s`, `5m`).
//! Every error names the key, the offending value and what is allowed; loading never
//! touches libvirt or the network.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod diff;
mod error;
pub mod limits;
pub mod load;
mod otel;
mod print;
mod read;
pub mod redact;
mod schema;
mod validate;
mod walk;
pub use error::{ConfigError, Origin};
pub use limits::{
    MAX_CARDINALITY_LIMIT, MAX_CONFIG_BYTES, MAX_DEBOUNCE, MAX_EVENT_BACKLOG, MAX_EXPORT_INTERVAL,
    MAX_FETCH_CONCURRENCY, MIN_EXPORT_INTERVAL,
};
pub use load::{load, load_with_warnings, LoadOptions, Loaded, ENV_CONFIG_PATH};
pub use otel::{
    export_interval, header_pairs, HeaderPairError, IntervalEnvProblem, EXPORT_INTERVAL_VAR,
};
pub use print::to_yaml;
pub use schema::env_var_for;
pub use validate::check_log_level;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/virt-hypervisor-agent/config.yaml";
pub const ENV_PREFIX: &str = "VIRT_HYPERVISOR_AGENT";
pub const DEFAULT_URI: &str = "qemu:///system";
pub const DEFAULT_METRIC_NAME: &str = "kubevirt_vmi_hypervisor_info";
pub const DEFAULT_CARDINALITY_LIMIT: usize = 20_000;
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_KEEPALIVE_COUNT: u32 = 3;
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_FETCH_CONCURRENCY: usize = 8;
pub const DEFAULT_EVENT_BACKLOG: usize = 1024;
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_millis(500);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// Owners of the launcher sockets KubeVirt makes: 107 (its non-root virt-launcher, the `qemu`
/// user) and 0 (the root launcher).
pub const DEFAULT_SOCKET_OWNERS: [u32; 2] = [107, 0];
/// A launcher pod runs one VMI; a migration target briefly holds a second. Leaves room for both
/// and a little more, while one socket reporting thousands of domains cannot crowd out the rest.
pub const DEFAULT_MAX_DOMAINS_PER_SOCKET: usize = 4;
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(250);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// The collector when neither `export.endpoint` nor `OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT` names
/// one (the OpenTelemetry SDKs' defaults), per protocol; `export/otlp.rs` falls back to them.
pub const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
pub const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318/v1/metrics";

/// Socket globs relative to the kubelet root: current KubeVirt (virtqemud) and older (libvirtd).
pub const DEFAULT_DISCOVER_GLOBS: [&str; 2] = [
    "pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock",
    "pods/*/volumes/kubernetes.io~empty-dir/libvirt-runtime/libvirt-sock",
];

/// The whole effective configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Node name for the `node` attribute; empty means `NODE_NAME` env, else the host name.
    pub node_name: String,
    pub log: LogConfig,
    pub libvirt: LibvirtConfig,
    pub metric: MetricConfig,
    pub export: ExportConfig,
    pub health: HealthConfig,
    pub security: SecurityConfig,
}

/// The HTTP health endpoint (`src/health.rs`): `GET /livez` and `GET /readyz` for a kubelet's
/// probes. Off unless an address is given; the systemd unit uses `sd_notify` instead.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Address to listen on (`0.0.0.0:8080`, `[::]:8080`, `127.0.0.1:8080`); unset: no endpoint.
    pub listen: Option<String>,
}

impl HealthConfig {
    /// The parsed address; `None` when unset (or invalid, which validation refuses first).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_deref().and_then(|a| a.trim().parse().ok())
    }
}

/// How the agent confines itself (`src/confine.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Restrict the `run` process with Landlock before the first connection.
    pub landlock: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self { landlock: true }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter directive (`info`, `debug`, `virt_hypervisor_agent=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LibvirtConfig {
    /// Explicit connections, each opened read-only.
    pub uris: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// Bound on one libvirt call made for a domain (XML fetch) or a listing.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// How many libvirt calls (fetches, listings) may run at once on one connection.
    pub fetch_concurrency: usize,
    /// Lifecycle events queued per connection; when full, new ones are dropped (counted) and
    /// the connection is resynced instead.
    pub event_backlog: usize,
    /// Periodic full resync; `0s` disables it.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    pub reconnect: ReconnectConfig,
    pub discover: DiscoverConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoverConfig {
    pub enabled: bool,
    pub kubelet_root: PathBuf,
    /// Globs relative to `kubelet_root` (absolute globs are used as they are).
    pub globs: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Uids that may own a discovered socket; a socket owned by anyone else is not connected to.
    pub socket_owners: Vec<u32>,
    /// Domains exported per discovered socket; the rest are counted, not exported.
    pub max_domains_per_socket: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricConfig {
    pub name: String,
    /// Per-metric cardinality limit handed to the SDK (its own default, 2000, would drop VMs).
    pub cardinality_limit: usize,
    pub attributes: OptionalAttributes,
}

/// Optional data-point attributes, each off by default except `pod_uid`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptionalAttributes {
    pub domain: bool,
    pub uuid: bool,
    // `vmi_uid` was removed: see `schema::REMOVED`.
    pub machine: bool,
    pub emulator: bool,
    pub arch: bool,
    pub hypervisor_version: bool,
    pub pod_uid: bool,
    /// The root `type` of the domain XML, exactly as libvirt reports it.
    pub domain_type: bool,
}

impl Default for OptionalAttributes {
    /// `pod_uid` is on: a discovered launcher daemon is untrusted, and the pod UID (from the
    /// socket's kubelet path, which a pod cannot choose) is what lets Prometheus check the
    /// namespace it claims (deploy/prometheus/virt-hypervisor-agent.rules.yml, "FORGED SERIES").
    /// It appears only on discovered connections' series.
    fn default() -> Self {
        Self {
            domain: false,
            uuid: false,
            machine: false,
            emulator: false,
            arch: false,
            hypervisor_version: false,
            pod_uid: true,
            domain_type: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    Otlp,
    Stdout,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf", alias = "http")]
    HttpProtobuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

/// The export settings. What is left unset falls through to the standard OpenTelemetry
/// variables, which the agent resolves itself (no SDK reads them): the transport's in
/// `export/otlp.rs` (`OTEL_EXPORTER_OTLP_METRICS_*` before `OTEL_EXPORTER_OTLP_*`), the interval's
/// in [`export_interval`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    pub exporter: ExporterKind,
    /// `None`: `OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL`, else grpc.
    pub protocol: Option<Protocol>,
    /// `None`: `OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`, else the protocol's default
    /// ([`DEFAULT_GRPC_ENDPOINT`], [`DEFAULT_HTTP_ENDPOINT`]).
    pub endpoint: Option<String>,
    /// Extra request headers (merged over `OTEL_EXPORTER_OTLP_(METRICS_)HEADERS`).
    pub headers: BTreeMap<String, String>,
    /// `None`: `OTEL_EXPORTER_OTLP_(METRICS_)TIMEOUT` (milliseconds), else 10s.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// `None`: `OTEL_EXPORTER_OTLP_(METRICS_)COMPRESSION`, else none.
    pub compression: Option<Compression>,
    /// `None`: `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds), else 30s.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Push-on-change debounce; `0s` disables push on change.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// Deadline for the final flush at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub tls: TlsConfig,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA bundle to verify the collector (`OTEL_EXPORTER_OTLP_CERTIFICATE` when unset).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mTLS (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`).
    pub cert_file: Option<PathBuf>,
    /// PEM client key for mTLS (`OTEL_EXPORTER_OTLP_CLIENT_KEY`).
    pub key_file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            uris: vec![DEFAULT_URI.into()],
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_count: DEFAULT_KEEPALIVE_COUNT,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            fetch_concurrency: DEFAULT_FETCH_CONCURRENCY,
            event_backlog: DEFAULT_EVENT_BACKLOG,
            resync_interval: DEFAULT_RESYNC_INTERVAL,
            reconnect: ReconnectConfig::default(),
            discover: DiscoverConfig::default(),
        }
    }
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial_backoff: DEFAULT_RECONNECT_INITIAL,
            max_backoff: DEFAULT_RECONNECT_MAX,
        }
    }
}

impl Default for DiscoverConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kubelet_root: PathBuf::from(DEFAULT_KUBELET_ROOT),
            globs: DEFAULT_DISCOVER_GLOBS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            socket_owners: DEFAULT_SOCKET_OWNERS.to_vec(),
            max_domains_per_socket: DEFAULT_MAX_DOMAINS_PER_SOCKET,
        }
    }
}

impl Default for MetricConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_METRIC_NAME.into(),
            cardinality_limit: DEFAULT_CARDINALITY_LIMIT,
            attributes: OptionalAttributes::default(),
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            exporter: ExporterKind::Otlp,
            protocol: None,
            endpoint: None,
            headers: BTreeMap::new(),
            timeout: None,
            compression: None,
            interval: None,
            debounce: DEFAULT_DEBOUNCE,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            tls: TlsConfig::default(),
        }
    }
}
