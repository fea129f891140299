//! Configuration errors: each names the key (or file), the offending value, where it came from
//! and what is allowed. Shared by loading ([`super::load`]), the bounded reader
//! ([`super::read`]) and validation ([`super::validate`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Longest rendering of an offending value in a message; longer ones are cut with `…`.
const MAX_VALUE_CHARS: usize = 120;

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
    #[error("config file {}: {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("config file {}: larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("config file {}: {what} at byte {offset} (expected UTF-8 text without NUL bytes)", path.display())]
    Encoding {
        path: PathBuf,
        offset: usize,
        what: &'static str,
    },
    /// Nesting or alias expansion beyond the bounds of [`super::read`].
    #[error("config file {}: line {line}: {what}", path.display())]
    Bounds {
        path: PathBuf,
        line: usize,
        what: String,
    },
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
    /// A key that was removed ([`super::schema::REMOVED`]), set to what it can no longer do.
    #[error("{key}: {value}{origin} is no longer possible: {why}; remove the key")]
    Removed {
        key: String,
        value: String,
        origin: Origin,
        why: &'static str,
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
    /// A value error without origin (filled in by [`super::load`] when known).
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

    pub(super) fn with_origins(self, origins: &BTreeMap<String, Origin>) -> Self {
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
pub(super) fn origin_of_key(origins: &BTreeMap<String, Origin>, key: &str) -> Origin {
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

pub(crate) fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_VALUE_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
