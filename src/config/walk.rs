//! The schema walk: the merged, untyped tree of all layers checked against [`SCHEMA`] before
//! the typed deserialization. This is what makes errors readable: an unknown key is reported
//! with its full dotted path, where it came from, the keys allowed at that level and a "did you
//! mean"; a wrong type names the key, the value and the accepted form. It also coerces the
//! strings that environment variables and flags carry: `true`/`false`, whole numbers,
//! comma-separated lists (`a,b`), and `k=v,k2=v2` maps (the `OTEL_EXPORTER_OTLP_HEADERS` format,
//! values percent-decoded, parsed by [`super::otel::header_pairs`] as the exporter parses that
//! variable). An empty string from the environment or a flag unsets an optional
//! key and empties a list or map.
//!
//! Why not serde's `deny_unknown_fields` with `serde_path_to_error`: that stops at the first
//! error (this reports all at once), its messages (``unknown field `endpont`, expected one of
//! …``) carry neither the layer the value came from nor a "did you mean" across the `_`/`__`
//! confusion of environment keys, and every environment value arrives as a string, so each
//! bool, number, list and map field would need its own string-coercing deserializer. The walk
//! is one place for all of that; the structs keep `deny_unknown_fields` as a second guard.

use std::collections::BTreeMap;
use std::path::PathBuf;

use config::{Map, Value, ValueKind};

use super::error::{origin_of_key, truncate, ConfigError, Origin};
use super::otel::header_pairs;
use super::schema::{
    all_paths, env_var_for, expected, join, removed, Field, Kind, Removed, DURATION_ALLOWED, SCHEMA,
};

/// A boolean as YAML writes it, or as a string from the environment or a flag.
fn bool_of(value: &Value) -> Option<bool> {
    match &value.kind {
        ValueKind::Boolean(b) => Some(*b),
        ValueKind::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Origin string the `config` crate puts on environment values.
pub(super) const ENV_ORIGIN: &str = "the environment";
/// Origin string we put on command-line overrides.
pub(super) const CLI_ORIGIN: &str = "<command line>";

pub(super) struct Walker {
    /// The config file's origin string (its path) and path.
    pub(super) file: Option<(String, PathBuf)>,
    pub(super) errors: Vec<ConfigError>,
    /// Obsolete keys that were set harmlessly: one line each, for the log.
    pub(super) warnings: Vec<String>,
    /// Where each key's value came from.
    pub(super) origins: BTreeMap<String, Origin>,
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
        // A header's value may be a credential (`authorization=Bearer …`): never repeat it.
        let shown = if key == "export.headers" || key.starts_with("export.headers.") {
            "(value not shown: headers can carry credentials)".to_string()
        } else {
            render(value)
        };
        self.errors.push(ConfigError::Invalid {
            key: key.to_string(),
            what,
            value: shown,
            origin: self.origin(key, value),
            allowed: allowed.into(),
        });
    }

    pub(super) fn section(
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
                None => match removed(&key) {
                    Some(r) => self.removed(r, &value),
                    None => self.unknown(key, path, fields, &value),
                },
            }
        }
        out
    }

    /// A removed boolean key: `false` (its old default) is ignored with a warning, `true` is an
    /// error that says why it is gone. Either way nothing reaches the typed config.
    fn removed(&mut self, r: &'static Removed, value: &Value) {
        let origin = self.origin(r.key, value);
        match bool_of(value) {
            Some(false) => self.warnings.push(format!(
                "{}: obsolete key ignored{origin} ({}); remove it",
                r.key, r.why
            )),
            Some(true) => self.errors.push(ConfigError::Removed {
                key: r.key.to_string(),
                value: render(value),
                origin,
                why: r.why,
            }),
            None => self.invalid(
                r.key,
                "value",
                value,
                format!("{}; the key is obsolete: remove it", expected(&Kind::Bool)),
            ),
        }
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
                let b = bool_of(&value);
                if b.is_none() {
                    self.invalid(key, "value", &value, expected(&field.kind));
                }
                b.map(J::Bool)
            }
            Kind::UInt { max, .. } => match whole_number(&value) {
                Some(n) if n <= max => Some(J::from(n)),
                _ => {
                    self.invalid(key, "value", &value, expected(&field.kind));
                    None
                }
            },
            Kind::UIntList { max } => {
                let items: Vec<Value> = match &value.kind {
                    ValueKind::String(s) => s
                        .split(',')
                        .map(str::trim)
                        .filter(|item| !item.is_empty())
                        .map(|item| Value::from(item.to_string()))
                        .collect(),
                    ValueKind::Array(items) => items.clone(),
                    _ => {
                        self.invalid(key, "value", &value, expected(&field.kind));
                        return None;
                    }
                };
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match whole_number(item) {
                        Some(n) if n <= max => out.push(J::from(n)),
                        _ => self.invalid(
                            &format!("{key}[{i}]"),
                            "value",
                            item,
                            format!("expected a whole number from 0 to {max}"),
                        ),
                    }
                }
                Some(J::Array(out))
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
                ValueKind::String(s) => match header_pairs(s).collect::<Result<Vec<_>, _>>() {
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

/// A scalar as a string (YAML `node_name: 42` is the string `42`); `None` for lists, maps, null.
/// A whole number, from a number or from text.
fn whole_number(value: &Value) -> Option<u64> {
    match &value.kind {
        ValueKind::I64(n) => u64::try_from(*n).ok(),
        ValueKind::U64(n) => Some(*n),
        ValueKind::I128(n) => u64::try_from(*n).ok(),
        ValueKind::U128(n) => u64::try_from(*n).ok(),
        ValueKind::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
