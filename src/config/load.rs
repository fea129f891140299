//! Layered loading: defaults < YAML file < environment < command-line overrides.
//!
//! The file is read by the bounded reader ([`super::read`]); the `config` crate parses it and
//! merges the layers into one untyped tree, which the schema walk ([`super::walk`]) checks
//! against [`SCHEMA`] and coerces before the typed deserialization.
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
use std::path::PathBuf;

use config::{Config, Environment, FileFormat, Format, Map, Source, Value, ValueKind};

use super::error::ConfigError;
use super::schema::SCHEMA;
use super::walk::{Walker, CLI_ORIGIN};
use super::{AgentConfig, ENV_PREFIX};

/// Environment variable naming the config file (an alternative to `--config`); never a key.
pub const ENV_CONFIG_PATH: &str = "VIRT_HYPERVISOR_AGENT_CONFIG";

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

/// A configuration that loaded, with what the operator should still be told.
#[derive(Debug)]
pub struct Loaded {
    pub config: AgentConfig,
    /// One line per obsolete key that was set harmlessly (and ignored), to be logged.
    pub warnings: Vec<String>,
}

/// Load the layers, check them against the schema, deserialize and [validate](AgentConfig::validate).
/// Warnings are dropped: the binary uses [`load_with_warnings`].
pub fn load(opts: &LoadOptions) -> Result<AgentConfig, ConfigError> {
    load_with_warnings(opts).map(|l| l.config)
}

/// [`load`], keeping the warnings (obsolete keys that were ignored).
pub fn load_with_warnings(opts: &LoadOptions) -> Result<Loaded, ConfigError> {
    let mut builder = Config::builder();
    let mut file_uri = None;
    if let Some((path, text)) = super::read::read_file(opts.path.as_deref())? {
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
        warnings: Vec::new(),
        origins: BTreeMap::new(),
    };
    let tree = walker.section("", SCHEMA, merged);
    ConfigError::from_all(walker.errors)?;
    let cfg: AgentConfig = serde_json::from_value(serde_json::Value::Object(tree))
        .map_err(|source| ConfigError::Deserialize { source })?;
    cfg.validate()
        .map_err(|e| e.with_origins(&walker.origins))?;
    Ok(Loaded {
        config: cfg,
        warnings: walker.warnings,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

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
