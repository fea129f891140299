//! Layered loading: defaults < YAML file < environment < command-line overrides.
//!
//! The `config` crate reads and merges the layers into one untyped tree. Before the typed
//! deserialization, [`load`] walks that tree against [`SCHEMA`], a static description of
//! [`AgentConfig`] (kept in step with the structs by a unit test). The walk is what makes errors
//! readable: an unknown key is reported with its full dotted path, where it came from, the keys
//! allowed at that level and a "did you mean"; a wrong type names the key, the value and the
//! accepted form. It also coerces the strings that environment variables and flags carry:
//! `true`/`false`, whole numbers, comma-separated lists (`a,b`), and `k=v,k2=v2` maps (the
//! `OTEL_EXPORTER_OTLP_HEADERS` format, values percent-decoded). An empty string from the
//! environment or a flag unsets an optional key and empties a list or map.
//!
//! Environment keys: `VIRT_HYPERVISOR_AGENT_` + the dotted key in upper case with `.` written as
//! `__` (`VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT=5s`, `VIRT_HYPERVISOR_AGENT_NODE_NAME=n1`).
//! A list or map given as one variable replaces the file's value as a whole.
//! `VIRT_HYPERVISOR_AGENT_CONFIG` ([`ENV_CONFIG_PATH`]) is reserved for the config file path and is
//! not a key. Overrides are `(dotted key, string)` pairs, coerced like environment values.
//!
//! After deserialization, [`AgentConfig::validate`](super::AgentConfig::validate) checks
//! semantics, and its errors are annotated with the layer the offending value came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, Environment, FileFormat, Format, Map, Source, Value, ValueKind};

use super::validate::{MAX_CARDINALITY_LIMIT, MAX_FETCH_CONCURRENCY, MAX_KEEPALIVE_COUNT};
use super::{AgentConfig, DEFAULT_CONFIG_PATH, ENV_PREFIX};

/// Environment variable naming the config file (an alternative to `--config`); never a key.
pub const ENV_CONFIG_PATH: &str = "VIRT_HYPERVISOR_AGENT_CONFIG";

/// Origin string the `config` crate puts on environment values.
const ENV_ORIGIN: &str = "the environment";
/// Origin string we put on command-line overrides.
const CLI_ORIGIN: &str = "<command line>";

const DURATION_ALLOWED: &str = "expected a number with a unit like 250ms, 30s, 5m";
/// Longest rendering of an offending value in a message; longer ones are cut with `…`.
const MAX_VALUE_CHARS: usize = 120;

/// Where configuration comes from, besides the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// `--config`; `None` means the default path, used only if it exists.
    pub path: Option<PathBuf>,
    /// Environment to read `VIRT_HYPERVISOR_AGENT_…` keys from; `None` reads the process env.
    pub env: Option<HashMap<String, String>>,
    /// Command-line overrides as (dotted key, value) pairs, applied last.
    pub overrides: Vec<(String, String)>,
}

/// The layer a value came from, shown in error messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// Not known (for example, [`AgentConfig::validate`] called on a config built in code).
    #[default]
    Unknown,
    File(PathBuf),
    /// The environment variable that set it.
    Env(String),
    CommandLine,
}

impl fmt::Display for Origin {
    /// Renders as a suffix: empty, or ` (from …)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Unknown => Ok(()),
            Origin::File(path) => write!(f, " (from {})", path.display()),
            Origin::Env(var) => write!(f, " (from env {var})"),
            Origin::CommandLine => f.write_str(" (from the command line)"),
        }
    }
}

/// A configuration error: names the key (or file), the offending value and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An explicitly given config file does not exist.
    #[error("config file {}: not found", path.display())]
    NotFound { path: PathBuf },
    #[error("config file {}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax error, or a document that is not a map of keys.
    #[error("config file {}: invalid YAML", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{key}: environment variable {var} is not valid UTF-8")]
    EnvNotUnicode { key: String, var: String },
    /// A command-line override whose key is not a dotted path.
    #[error(
        "override {key}={value:?}: invalid key, expected a dotted path like libvirt.fetch_timeout"
    )]
    Override {
        key: String,
        value: String,
        #[source]
        source: Box<config::ConfigError>,
    },
    /// The `config` crate could not merge the layers.
    #[error("cannot merge configuration layers")]
    Merge {
        #[source]
        source: Box<config::ConfigError>,
    },
    #[error("{key}: unknown key{origin} with value {value}; {allowed}")]
    UnknownKey {
        key: String,
        value: String,
        origin: Origin,
        /// The keys allowed at that level, as a sentence, and maybe `; did you mean …?`.
        allowed: String,
    },
    /// A value of the wrong type or form, or one that fails a semantic check.
    #[error("{key}: invalid {what} {value}{origin}: {allowed}")]
    Invalid {
        key: String,
        /// What the value is meant to be: `value`, `duration`, `URI`…
        what: &'static str,
        /// The value as given, rendered (strings quoted).
        value: String,
        origin: Origin,
        allowed: String,
    },
    /// The tree passed the schema walk but not typed deserialization: schema and structs disagree.
    #[error("configuration does not match the schema")]
    Deserialize {
        #[source]
        source: serde_json::Error,
    },
    #[error("{} configuration errors:{}", .0.len(), list(.0))]
    Several(Vec<ConfigError>),
}

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

impl ConfigError {
    /// A value error without origin (filled in by [`load`] when known).
    pub fn invalid(
        key: impl Into<String>,
        what: &'static str,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            what,
            value: value.into(),
            origin: Origin::Unknown,
            allowed: allowed.into(),
        }
    }

    /// One error as it is, several as [`ConfigError::Several`]; `Ok` when there are none.
    pub fn from_all(mut errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }

    /// The errors this one stands for (itself, or the members of `Several`).
    pub fn errors(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().collect(),
            other => vec![other],
        }
    }

    fn with_origins(self, origins: &BTreeMap<String, Origin>) -> Self {
        match self {
            ConfigError::Invalid {
                key,
                what,
                value,
                origin: Origin::Unknown,
                allowed,
            } => {
                let origin = origin_of_key(origins, &key);
                ConfigError::Invalid {
                    key,
                    what,
                    value,
                    origin,
                    allowed,
                }
            }
            ConfigError::Several(all) => {
                ConfigError::Several(all.into_iter().map(|e| e.with_origins(origins)).collect())
            }
            other => other,
        }
    }
}

/// Origin of `key` or, failing that, of its nearest recorded ancestor (`a.b[2].c` → `a.b[2]` → `a.b` → `a`).
fn origin_of_key(origins: &BTreeMap<String, Origin>, key: &str) -> Origin {
    let mut key = key;
    loop {
        if let Some(origin) = origins.get(key) {
            return origin.clone();
        }
        match key.rfind(['.', '[']) {
            Some(cut) => key = &key[..cut],
            None => return Origin::Unknown,
        }
    }
}

/// Load the layers, check them against the schema, deserialize and [validate](AgentConfig::validate).
pub fn load(opts: &LoadOptions) -> Result<AgentConfig, ConfigError> {
    let mut builder = Config::builder();
    let mut file_uri = None;
    if let Some((path, text)) = read_file(opts.path.as_deref())? {
        let uri = path.display().to_string();
        let table = FileFormat::Yaml
            .parse(Some(&uri), &text)
            .map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source,
            })?;
        builder = builder.add_source(Parsed(table));
        file_uri = Some((uri, path));
    }
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(Some(env_map(opts.env.as_ref())?.into_iter().collect())),
    );
    let cli = CLI_ORIGIN.to_string();
    for (key, value) in &opts.overrides {
        builder = builder
            .set_override(
                key,
                Value::new(Some(&cli), ValueKind::String(value.clone())),
            )
            .map_err(|source| ConfigError::Override {
                key: key.clone(),
                value: value.clone(),
                source: Box::new(source),
            })?;
    }
    let merged = builder
        .build()
        .and_then(|c| c.collect())
        .map_err(|source| ConfigError::Merge {
            source: Box::new(source),
        })?;

    let mut walker = Walker {
        file: file_uri,
        errors: Vec::new(),
        origins: BTreeMap::new(),
    };
    let tree = walker.section("", SCHEMA, merged);
    ConfigError::from_all(walker.errors)?;
    let cfg: AgentConfig = serde_json::from_value(serde_json::Value::Object(tree))
        .map_err(|source| ConfigError::Deserialize { source })?;
    cfg.validate()
        .map_err(|e| e.with_origins(&walker.origins))?;
    Ok(cfg)
}

/// The config file to read: the given path (which must exist), else the default path if it exists.
fn read_file(given: Option<&Path>) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
        None => return Ok(None),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some((path, text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError::NotFound { path }),
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// The `VIRT_HYPERVISOR_AGENT_…` variables, from the given map or the process environment,
/// without [`ENV_CONFIG_PATH`].
fn env_map(
    given: Option<&HashMap<String, String>>,
) -> Result<HashMap<String, String>, ConfigError> {
    let prefix = format!("{ENV_PREFIX}_");
    let ours = |key: &str| {
        key.len() >= prefix.len()
            && key[..prefix.len()].eq_ignore_ascii_case(&prefix)
            && !key.eq_ignore_ascii_case(ENV_CONFIG_PATH)
    };
    if let Some(map) = given {
        return Ok(map
            .iter()
            .filter(|(k, _)| ours(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect());
    }
    let mut out = HashMap::new();
    for (key, value) in std::env::vars_os() {
        // A key that is not UTF-8 cannot be one of ours.
        let Ok(key) = key.into_string() else { continue };
        if !ours(&key) {
            continue;
        }
        match value.into_string() {
            Ok(value) => out.insert(key, value),
            Err(_) => {
                let dotted = key[prefix.len()..].to_lowercase().replace("__", ".");
                return Err(ConfigError::EnvNotUnicode {
                    key: dotted,
                    var: key,
                });
            }
        };
    }
    Ok(out)
}

/// The YAML file, parsed before the build so that its errors carry the path.
#[derive(Clone, Debug)]
struct Parsed(Map<String, Value>);

impl Source for Parsed {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Schema

/// The type of a key, as the loader checks and coerces it.
#[derive(Debug)]
pub(crate) enum Kind {
    Section(&'static [Field]),
    Str,
    Path,
    Bool,
    /// A whole number up to `max` (the type's bound); `allowed` is the range `validate` accepts,
    /// quoted in messages.
    UInt {
        max: u64,
        allowed: (u64, u64),
    },
    Duration,
    /// A list of strings; from a string, comma-separated.
    List,
    /// A map of strings; from a string, `k=v,k2=v2`.
    Map,
    /// One of these strings (case-insensitive; the first spelling of each is canonical).
    Enum(&'static [&'static str]),
}

#[derive(Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub kind: Kind,
    /// An `Option` in the struct: `null` or an empty string leaves it unset.
    pub optional: bool,
}

const fn req(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        optional: false,
    }
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        optional: true,
    }
}

const fn usize_in(lo: usize, hi: usize) -> Kind {
    Kind::UInt {
        max: usize::MAX as u64,
        allowed: (lo as u64, hi as u64),
    }
}

/// [`AgentConfig`] as the loader sees it, in struct order.
pub(crate) const SCHEMA: &[Field] = &[
    req("node_name", Kind::Str),
    req(
        "log",
        Kind::Section(&[
            req("level", Kind::Str),
            req("format", Kind::Enum(&["text", "json"])),
        ]),
    ),
    req(
        "libvirt",
        Kind::Section(&[
            req("uris", Kind::List),
            req("keepalive_interval", Kind::Duration),
            req(
                "keepalive_count",
                Kind::UInt {
                    max: u32::MAX as u64,
                    allowed: (1, MAX_KEEPALIVE_COUNT as u64),
                },
            ),
            req("fetch_timeout", Kind::Duration),
            req("fetch_concurrency", usize_in(1, MAX_FETCH_CONCURRENCY)),
            req("resync_interval", Kind::Duration),
            req(
                "reconnect",
                Kind::Section(&[
                    req("initial_backoff", Kind::Duration),
                    req("max_backoff", Kind::Duration),
                ]),
            ),
            req(
                "discover",
                Kind::Section(&[
                    req("enabled", Kind::Bool),
                    req("kubelet_root", Kind::Path),
                    req("globs", Kind::List),
                    req("rescan_interval", Kind::Duration),
                ]),
            ),
        ]),
    ),
    req(
        "metric",
        Kind::Section(&[
            req("name", Kind::Str),
            req("cardinality_limit", usize_in(1, MAX_CARDINALITY_LIMIT)),
            req(
                "attributes",
                Kind::Section(&[
                    req("domain", Kind::Bool),
                    req("uuid", Kind::Bool),
                    req("vmi_uid", Kind::Bool),
                    req("machine", Kind::Bool),
                    req("emulator", Kind::Bool),
                    req("arch", Kind::Bool),
                    req("hypervisor_version", Kind::Bool),
                    req("pod_uid", Kind::Bool),
                    req("domain_type", Kind::Bool),
                ]),
            ),
        ]),
    ),
    req(
        "export",
        Kind::Section(&[
            req("exporter", Kind::Enum(&["otlp", "stdout", "none"])),
            opt("protocol", Kind::Enum(&["grpc", "http/protobuf", "http"])),
            opt("endpoint", Kind::Str),
            req("headers", Kind::Map),
            opt("timeout", Kind::Duration),
            opt("compression", Kind::Enum(&["none", "gzip"])),
            opt("interval", Kind::Duration),
            req("debounce", Kind::Duration),
            req("shutdown_timeout", Kind::Duration),
            req(
                "tls",
                Kind::Section(&[
                    opt("ca_file", Kind::Path),
                    opt("cert_file", Kind::Path),
                    opt("key_file", Kind::Path),
                ]),
            ),
        ]),
    ),
];

/// Every key and section of the schema as a dotted path.
fn all_paths(prefix: &str, fields: &[Field], out: &mut Vec<String>) {
    for field in fields {
        let path = join(prefix, field.name);
        if let Kind::Section(inner) = field.kind {
            all_paths(&path, inner, out);
        }
        out.push(path);
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `libvirt.fetch_timeout` → `VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT`.
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.replace('.', "__").to_uppercase())
}

// ---------------------------------------------------------------------------------------------
// The schema walk

struct Walker {
    /// The config file's origin string (its path) and path.
    file: Option<(String, PathBuf)>,
    errors: Vec<ConfigError>,
    /// Where each key's value came from.
    origins: BTreeMap<String, Origin>,
}

impl Walker {
    /// Where `value` (at `key`) came from: its own origin, else that of the first descendant that
    /// has one (the `config` crate drops origins on some tables), else that of an ancestor.
    fn origin(&self, key: &str, value: &Value) -> Origin {
        fn first_origin(value: &Value) -> Option<&str> {
            value.origin().or_else(|| match &value.kind {
                ValueKind::Table(t) => t.values().find_map(first_origin),
                ValueKind::Array(a) => a.iter().find_map(first_origin),
                _ => None,
            })
        }
        match first_origin(value) {
            Some(ENV_ORIGIN) => Origin::Env(env_var_for(key)),
            Some(CLI_ORIGIN) => Origin::CommandLine,
            Some(o) => match &self.file {
                Some((uri, path)) if uri == o => Origin::File(path.clone()),
                _ => Origin::Unknown,
            },
            None => origin_of_key(&self.origins, key),
        }
    }

    fn invalid(
        &mut self,
        key: &str,
        what: &'static str,
        value: &Value,
        allowed: impl Into<String>,
    ) {
        self.errors.push(ConfigError::Invalid {
            key: key.to_string(),
            what,
            value: render(value),
            origin: self.origin(key, value),
            allowed: allowed.into(),
        });
    }

    fn section(
        &mut self,
        path: &str,
        fields: &'static [Field],
        table: Map<String, Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut entries: Vec<_> = table.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = serde_json::Map::new();
        for (name, value) in entries {
            let key = join(path, &name);
            match fields.iter().find(|f| f.name == name) {
                Some(field) => {
                    if let Some(json) = self.value(&key, field, value) {
                        out.insert(name, json);
                    }
                }
                None => self.unknown(key, path, fields, &value),
            }
        }
        out
    }

    fn unknown(&mut self, key: String, parent: &str, fields: &[Field], value: &Value) {
        let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
        let allowed = if parent.is_empty() {
            format!("allowed top-level keys: {}", names.join(", "))
        } else {
            format!("allowed keys in {parent}: {}", names.join(", "))
        };
        self.errors.push(ConfigError::UnknownKey {
            value: render(value),
            origin: self.origin(&key, value),
            allowed: allowed + &hint(&key, &names),
            key,
        });
    }

    /// Check and coerce one value; `None` leaves the key at its default.
    fn value(
        &mut self,
        key: &str,
        field: &'static Field,
        value: Value,
    ) -> Option<serde_json::Value> {
        use serde_json::Value as J;

        let origin = self.origin(key, &value);
        if origin != Origin::Unknown {
            self.origins.insert(key.to_string(), origin);
        }
        if let ValueKind::Nil = value.kind {
            if field.optional || matches!(field.kind, Kind::Section(_)) {
                return None;
            }
            self.invalid(key, "value", &value, expected(&field.kind));
            return None;
        }
        if field.optional && matches!(&value.kind, ValueKind::String(s) if s.trim().is_empty()) {
            return None;
        }
        match field.kind {
            Kind::Section(fields) => match value.kind {
                ValueKind::Table(table) => Some(J::Object(self.section(key, fields, table))),
                _ => {
                    self.invalid(key, "value", &value, expected(&field.kind));
                    None
                }
            },
            Kind::Str | Kind::Path => match scalar_string(&value) {
                Some(s) => Some(J::String(s)),
                None => {
                    self.invalid(key, "value", &value, expected(&field.kind));
                    None
                }
            },
            Kind::Bool => {
                let b = match &value.kind {
                    ValueKind::Boolean(b) => Some(*b),
                    ValueKind::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                        "true" => Some(true),
                        "false" => Some(false),
                        _ => None,
                    },
                    _ => None,
                };
                if b.is_none() {
                    self.invalid(key, "value", &value, expected(&field.kind));
                }
                b.map(J::Bool)
            }
            Kind::UInt { max, .. } => {
                let n = match &value.kind {
                    ValueKind::I64(n) => u64::try_from(*n).ok(),
                    ValueKind::U64(n) => Some(*n),
                    ValueKind::I128(n) => u64::try_from(*n).ok(),
                    ValueKind::U128(n) => u64::try_from(*n).ok(),
                    ValueKind::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match n {
                    Some(n) if n <= max => Some(J::from(n)),
                    _ => {
                        self.invalid(key, "value", &value, expected(&field.kind));
                        None
                    }
                }
            }
            Kind::Duration => {
                let text = match &value.kind {
                    ValueKind::String(s) => Some(s.trim().to_string()),
                    // A bare number: humantime accepts `0`, and explains that others need a unit.
                    ValueKind::I64(_) | ValueKind::U64(_) => scalar_string(&value),
                    _ => None,
                };
                let Some(text) = text else {
                    self.invalid(key, "duration", &value, DURATION_ALLOWED);
                    return None;
                };
                match humantime::parse_duration(&text) {
                    Ok(_) => Some(J::String(text)),
                    Err(e) => {
                        // humantime's unit and overflow messages help; its byte offsets do not.
                        let allowed = match e {
                            humantime::DurationError::UnknownUnit { .. }
                            | humantime::DurationError::NumberOverflow => {
                                format!("{DURATION_ALLOWED} ({e})")
                            }
                            _ => DURATION_ALLOWED.to_string(),
                        };
                        self.invalid(key, "duration", &value, allowed);
                        None
                    }
                }
            }
            Kind::Enum(allowed) => {
                let wanted = scalar_string(&value).map(|s| s.trim().to_ascii_lowercase());
                match wanted.filter(|w| allowed.contains(&w.as_str())) {
                    Some(w) => Some(J::String(w)),
                    None => {
                        self.invalid(key, "value", &value, expected(&field.kind));
                        None
                    }
                }
            }
            Kind::List => match &value.kind {
                ValueKind::String(s) => Some(J::Array(
                    s.split(',')
                        .map(str::trim)
                        .filter(|item| !item.is_empty())
                        .map(|item| J::String(item.to_string()))
                        .collect(),
                )),
                ValueKind::Array(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        match scalar_string(item) {
                            Some(s) => out.push(J::String(s)),
                            None => self.invalid(
                                &format!("{key}[{i}]"),
                                "value",
                                item,
                                "expected a string",
                            ),
                        }
                    }
                    Some(J::Array(out))
                }
                _ => {
                    self.invalid(key, "value", &value, expected(&field.kind));
                    None
                }
            },
            Kind::Map => match &value.kind {
                ValueKind::String(s) => match parse_pairs(s) {
                    Ok(pairs) => Some(J::Object(
                        pairs.into_iter().map(|(k, v)| (k, J::String(v))).collect(),
                    )),
                    Err(why) => {
                        self.invalid(
                            key,
                            "value",
                            &value,
                            format!("{} ({why})", expected(&field.kind)),
                        );
                        None
                    }
                },
                ValueKind::Table(table) => {
                    let mut entries: Vec<_> = table.iter().collect();
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    let mut out = serde_json::Map::new();
                    for (name, item) in entries {
                        match scalar_string(item) {
                            Some(s) => {
                                out.insert(name.clone(), J::String(s));
                            }
                            None => {
                                self.invalid(&join(key, name), "value", item, "expected a string")
                            }
                        }
                    }
                    Some(J::Object(out))
                }
                _ => {
                    self.invalid(key, "value", &value, expected(&field.kind));
                    None
                }
            },
        }
    }
}

/// What a kind accepts, as a sentence for error messages.
fn expected(kind: &Kind) -> String {
    match kind {
        Kind::Section(fields) => format!(
            "expected a section (map) with keys {}",
            fields.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
        ),
        Kind::Str => "expected a string".into(),
        Kind::Path => "expected a file system path".into(),
        Kind::Bool => "expected true or false".into(),
        Kind::UInt {
            allowed: (lo, hi), ..
        } => format!("expected a whole number from {lo} to {hi}"),
        Kind::Duration => DURATION_ALLOWED.into(),
        Kind::List => {
            "expected a list of strings (in the environment or a flag: comma-separated, a,b)".into()
        }
        Kind::Map => "expected a map of strings (in the environment or a flag: k=v,k2=v2)".into(),
        Kind::Enum(allowed) => format!("expected one of {}", allowed.join(", ")),
    }
}

/// A scalar as a string (YAML `node_name: 42` is the string `42`); `None` for lists, maps, null.
fn scalar_string(value: &Value) -> Option<String> {
    match &value.kind {
        ValueKind::String(s) => Some(s.clone()),
        ValueKind::Boolean(b) => Some(b.to_string()),
        ValueKind::I64(n) => Some(n.to_string()),
        ValueKind::I128(n) => Some(n.to_string()),
        ValueKind::U64(n) => Some(n.to_string()),
        ValueKind::U128(n) => Some(n.to_string()),
        ValueKind::Float(n) => Some(n.to_string()),
        ValueKind::Nil | ValueKind::Table(_) | ValueKind::Array(_) => None,
    }
}

/// `k=v,k2=v2` as in `OTEL_EXPORTER_OTLP_HEADERS`: keys trimmed, values percent-decoded.
fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("{pair:?} has no `=`"));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        out.push((
            k.to_string(),
            percent_decode(v.trim()).ok_or_else(|| format!("{pair:?}: bad %-escape"))?,
        ));
    }
    Ok(out)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A value for a message: strings quoted, lists and maps inline, cut at [`MAX_VALUE_CHARS`].
fn render(value: &Value) -> String {
    fn go(value: &Value, out: &mut String) {
        match &value.kind {
            ValueKind::Nil => out.push_str("null"),
            ValueKind::String(s) => out.push_str(&format!("{s:?}")),
            ValueKind::Table(t) => {
                let mut entries: Vec<_> = t.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(k);
                    out.push_str(": ");
                    go(v, out);
                }
                out.push('}');
            }
            ValueKind::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    go(v, out);
                }
                out.push(']');
            }
            _ => out.push_str(&scalar_string(value).unwrap_or_default()),
        }
    }
    let mut out = String::new();
    go(value, &mut out);
    truncate(out)
}

pub(crate) fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_VALUE_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `; did you mean …?` for an unknown key, or empty.
fn hint(key: &str, siblings: &[&str]) -> String {
    // `VIRT_HYPERVISOR_AGENT_LIBVIRT_URIS` (one `_` where `__` was meant) reads as `libvirt_uris`.
    let flat = key.replace('.', "_");
    let mut paths = Vec::new();
    all_paths("", SCHEMA, &mut paths);
    if let Some(found) = paths.iter().find(|p| p.replace('.', "_") == flat) {
        return format!(
            "; did you mean {found}? (in the environment, nested keys are joined with __: {})",
            env_var_for(found)
        );
    }
    let name = key.rsplit('.').next().unwrap_or(key);
    let best = siblings
        .iter()
        .map(|s| (edit_distance(name, s), *s))
        .filter(|(d, s)| *d <= 2.max(s.len() / 4))
        .min();
    match best {
        Some((_, s)) => format!("; did you mean {s}?"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Printing

/// The effective configuration as YAML (for `check-config`), keys in schema order.
///
/// Every leaf is written in JSON syntax, which YAML reads as it is, so the output loads back
/// as the same configuration, except that `export.headers` values are shown as `<redacted>`
/// (they often hold credentials). Unset optional keys are written as `null`.
pub fn to_yaml(cfg: &AgentConfig) -> String {
    let tree = match serde_json::to_value(cfg) {
        Ok(serde_json::Value::Object(map)) => map,
        // Unreachable for these plain structs; degrade to an explanation rather than panic.
        Ok(_) | Err(_) => return "# cannot render the configuration\n".into(),
    };
    let mut out = String::new();
    write_section(&mut out, 0, "", SCHEMA, &tree);
    out
}

fn write_section(
    out: &mut String,
    depth: usize,
    path: &str,
    fields: &[Field],
    tree: &serde_json::Map<String, serde_json::Value>,
) {
    use serde_json::Value as J;

    let indent = "  ".repeat(depth);
    for field in fields {
        let key = join(path, field.name);
        let value = tree.get(field.name).unwrap_or(&J::Null);
        match (&field.kind, value) {
            (Kind::Section(inner), J::Object(map)) => {
                out.push_str(&format!("{indent}{}:\n", field.name));
                write_section(out, depth + 1, &key, inner, map);
            }
            (Kind::List, J::Array(items)) if !items.is_empty() => {
                out.push_str(&format!("{indent}{}:\n", field.name));
                for item in items {
                    out.push_str(&format!("{indent}  - {item}\n"));
                }
            }
            (Kind::Map, J::Object(map)) if !map.is_empty() => {
                out.push_str(&format!("{indent}{}:\n", field.name));
                for k in map.keys() {
                    let redacted = J::String("<redacted>".into());
                    out.push_str(&format!("{indent}  {}: {redacted}\n", J::String(k.clone())));
                }
            }
            (_, leaf) => out.push_str(&format!("{indent}{}: {leaf}\n", field.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key tree of `value`: `a`, `a.b`, … (the contents of `headers` are data, not keys).
    fn keys_of(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let path = join(prefix, k);
                if path != "export.headers" {
                    keys_of(&path, v, out);
                }
                out.push(path);
            }
        }
    }

    #[test]
    fn errors_stay_small() {
        // clippy::result_large_err: keep `Result<_, ConfigError>` cheap to return.
        assert!(
            std::mem::size_of::<ConfigError>() < 128,
            "{}",
            std::mem::size_of::<ConfigError>()
        );
    }

    #[test]
    fn schema_matches_the_structs() {
        let mut from_structs = Vec::new();
        let defaults = serde_json::to_value(AgentConfig::default()).expect("serializable");
        keys_of("", &defaults, &mut from_structs);
        from_structs.sort();
        let mut from_schema = Vec::new();
        all_paths("", SCHEMA, &mut from_schema);
        from_schema.sort();
        assert_eq!(from_structs, from_schema);
    }

    #[test]
    fn schema_optional_flags_match_option_fields() {
        // Option fields serialize as null in the defaults, and only they do.
        fn check(prefix: &str, fields: &[Field], tree: &serde_json::Value) {
            for field in fields {
                let v = &tree[field.name];
                let path = join(prefix, field.name);
                assert_eq!(field.optional, v.is_null(), "{path}");
                if let Kind::Section(inner) = field.kind {
                    check(&path, inner, v);
                }
            }
        }
        check(
            "",
            SCHEMA,
            &serde_json::to_value(AgentConfig::default()).expect("serializable"),
        );
    }

    #[test]
    fn every_enum_spelling_deserializes() {
        for (key, values) in [
            ("log.format", &["text", "json"][..]),
            ("export.exporter", &["otlp", "stdout", "none"]),
            ("export.protocol", &["grpc", "http/protobuf", "http"]),
            ("export.compression", &["none", "gzip"]),
        ] {
            for v in values {
                let opts = LoadOptions {
                    path: None,
                    env: Some(HashMap::new()),
                    overrides: vec![(key.to_string(), v.to_string())],
                };
                assert!(load(&opts).is_ok(), "{key}={v}");
            }
        }
    }

    #[test]
    fn to_yaml_round_trips_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("effective.yaml");
        std::fs::write(&path, to_yaml(&AgentConfig::default())).expect("write");
        let opts = LoadOptions {
            path: Some(path),
            env: Some(HashMap::new()),
            overrides: vec![],
        };
        assert_eq!(load(&opts).expect("loads"), AgentConfig::default());
    }

    #[test]
    fn to_yaml_redacts_header_values() {
        let mut cfg = AgentConfig::default();
        cfg.export
            .headers
            .insert("authorization".into(), "Bearer secret".into());
        let yaml = to_yaml(&cfg);
        assert!(yaml.contains("\"authorization\": \"<redacted>\""), "{yaml}");
        assert!(!yaml.contains("secret"));
    }

    #[test]
    fn pairs_are_percent_decoded() {
        assert_eq!(
            parse_pairs("a=b%3Dc, x = y=z ,").expect("valid"),
            vec![
                ("a".to_string(), "b=c".to_string()),
                ("x".to_string(), "y=z".to_string())
            ]
        );
        assert!(parse_pairs("novalue").is_err());
        assert!(parse_pairs("=v").is_err());
        assert!(parse_pairs("a=%zz").is_err());
    }

    #[test]
    fn hint_spots_single_underscore_env_nesting() {
        let h = hint("libvirt_fetch_timeout", &["node_name", "libvirt"]);
        assert!(h.contains("libvirt.fetch_timeout"), "{h}");
        assert!(
            h.contains("VIRT_HYPERVISOR_AGENT_LIBVIRT__FETCH_TIMEOUT"),
            "{h}"
        );
    }

    #[test]
    fn hint_suggests_near_sibling() {
        assert_eq!(
            hint("libvirt.uri", &["uris", "fetch_timeout"]),
            "; did you mean uris?"
        );
        assert_eq!(hint("libvirt.zzz", &["uris", "fetch_timeout"]), "");
    }

    #[test]
    fn origin_falls_back_to_ancestor() {
        let mut origins = BTreeMap::new();
        origins.insert("libvirt.uris".to_string(), Origin::CommandLine);
        assert_eq!(
            origin_of_key(&origins, "libvirt.uris[2]"),
            Origin::CommandLine
        );
        assert_eq!(
            origin_of_key(&origins, "libvirt.fetch_timeout"),
            Origin::Unknown
        );
    }

    #[test]
    fn config_path_variable_is_not_a_key() {
        let env = HashMap::from([(ENV_CONFIG_PATH.to_string(), "/x.yaml".to_string())]);
        let opts = LoadOptions {
            path: None,
            env: Some(env),
            overrides: vec![],
        };
        assert_eq!(load(&opts).expect("loads"), AgentConfig::default());
    }
}
