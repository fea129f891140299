//! [`AgentConfig`](super::AgentConfig) as the loader sees it: every key, its kind (which the
//! schema walk checks and coerces) and whether it is optional. Kept in step with the structs by
//! a unit test.

use super::limits::{
    MAX_CARDINALITY_LIMIT, MAX_DOMAINS_PER_SOCKET, MAX_EVENT_BACKLOG, MAX_FETCH_CONCURRENCY,
    MAX_KEEPALIVE_COUNT,
};
use super::ENV_PREFIX;

pub(super) const DURATION_ALLOWED: &str = "expected a number with a unit like 250ms, 30s, 5m";

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
    /// A list of whole numbers up to `max`; from a string, comma-separated.
    UIntList {
        max: u64,
    },
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

/// [`AgentConfig`](super::AgentConfig) as the loader sees it, in struct order.
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
            req("event_backlog", usize_in(1, MAX_EVENT_BACKLOG)),
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
                    req(
                        "socket_owners",
                        Kind::UIntList {
                            max: u32::MAX as u64,
                        },
                    ),
                    req(
                        "max_domains_per_socket",
                        usize_in(1, MAX_DOMAINS_PER_SOCKET),
                    ),
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
    req("health", Kind::Section(&[opt("listen", Kind::Str)])),
    req("security", Kind::Section(&[req("landlock", Kind::Bool)])),
];

/// A key that was removed from the schema. An existing config that sets it to `false` (what the
/// attribute's default was) still loads, with a warning; `true` asked for something the agent
/// no longer does, which is an error that says why.
#[derive(Debug)]
pub(crate) struct Removed {
    /// The dotted key.
    pub key: &'static str,
    /// Why it is gone and what to use instead.
    pub why: &'static str,
}

/// Keys removed from [`SCHEMA`] (all were booleans that defaulted to `false`).
pub(crate) const REMOVED: &[Removed] = &[Removed {
    key: "metric.attributes.vmi_uid",
    why: "the vmi_uid attribute was removed: KubeVirt v0.59 and later leave the VMI UID out of \
          the domain metadata (its <uid> is empty), so the attribute could no longer appear; \
          metric.attributes.pod_uid (the virt-launcher pod's UID, from the discovered socket \
          path) joins the series to the cluster instead",
}];

/// The removed key at `key`, if it is one.
pub(crate) fn removed(key: &str) -> Option<&'static Removed> {
    REMOVED.iter().find(|r| r.key == key)
}

/// Every key and section of the schema as a dotted path.
pub(super) fn all_paths(prefix: &str, fields: &[Field], out: &mut Vec<String>) {
    for field in fields {
        let path = join(prefix, field.name);
        if let Kind::Section(inner) = field.kind {
            all_paths(&path, inner, out);
        }
        out.push(path);
    }
}

pub(super) fn join(prefix: &str, name: &str) -> String {
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

/// What a kind accepts, as a sentence for error messages.
pub(super) fn expected(kind: &Kind) -> String {
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
        Kind::UIntList { max } => format!(
            "expected a list of whole numbers from 0 to {max} (in the environment or a flag: \
             comma-separated, 107,0)"
        ),
        Kind::Map => "expected a map of strings (in the environment or a flag: k=v,k2=v2)".into(),
        Kind::Enum(allowed) => format!("expected one of {}", allowed.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
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
    fn removed_keys_are_not_in_the_schema_and_their_section_is() {
        let mut paths = Vec::new();
        all_paths("", SCHEMA, &mut paths);
        for r in REMOVED {
            assert!(!paths.iter().any(|p| p == r.key), "{}", r.key);
            let (section, _) = r
                .key
                .rsplit_once('.')
                .expect("a removed key is in a section");
            assert!(paths.iter().any(|p| p == section), "{}", r.key);
        }
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
}
