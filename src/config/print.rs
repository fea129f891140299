//! The effective configuration as YAML, for `check-config`.

use super::schema::{join, Field, Kind, SCHEMA};
use super::AgentConfig;

/// The effective configuration as YAML (for `check-config`), keys in schema order.
///
/// Every leaf is written in JSON syntax, which YAML reads as it is, so the output loads back
/// as the same configuration, except that `export.headers` values and the userinfo and query
/// of `export.endpoint` (`https://user:password@…?key=…`) are shown as `<redacted>` (they hold
/// credentials). Unset optional keys are written as `null`.
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
        let redacted;
        let value = match value {
            J::String(url) if key == "export.endpoint" => {
                redacted = J::String(super::redact::endpoint(url));
                &redacted
            }
            other => other,
        };
        match (&field.kind, value) {
            (Kind::Section(inner), J::Object(map)) => {
                out.push_str(&format!("{indent}{}:\n", field.name));
                write_section(out, depth + 1, &key, inner, map);
            }
            (Kind::List | Kind::UIntList { .. }, J::Array(items)) if !items.is_empty() => {
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
    use std::collections::HashMap;

    use super::*;
    use crate::config::{load, LoadOptions};

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
    fn to_yaml_redacts_endpoint_userinfo() {
        let mut cfg = AgentConfig::default();
        cfg.export.endpoint =
            Some("https://agent:s3cret@otel.example:4318/v1/metrics?a=b@c".into());
        let yaml = to_yaml(&cfg);
        assert!(
            yaml.contains(
                "endpoint: \"https://<redacted>@otel.example:4318/v1/metrics?<redacted>\""
            ),
            "{yaml}"
        );
        assert!(
            !yaml.contains("s3cret") && !yaml.contains("agent:"),
            "{yaml}"
        );
    }
}
