//! Which keys differ between two configurations (a reload says what it applied and what waits
//! for a restart). Only key names are reported, never values: a header may carry a credential.

use super::AgentConfig;

/// The dotted keys whose values differ between `old` and `new` (a changed list is one key).
pub fn changed_keys(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        // Unreachable for these plain structs; say that something changed rather than nothing.
        return vec!["(unknown)".into()];
    };
    let mut keys = Vec::new();
    walk("", &a, &b, &mut keys);
    keys
}

fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, keys: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                let null = Value::Null;
                walk(
                    &key,
                    a.get(name).unwrap_or(&null),
                    b.get(name).unwrap_or(&null),
                    keys,
                );
            }
        }
        (a, b) if a != b => keys.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_changed_keys_are_named() {
        let old = AgentConfig::default();
        assert!(changed_keys(&old, &old.clone()).is_empty());
        let mut new = old.clone();
        new.libvirt.uris.push("test:///default".into());
        new.export
            .headers
            .insert("authorization".into(), "Bearer s3cret".into());
        new.metric.attributes.uuid = !old.metric.attributes.uuid;
        let keys = changed_keys(&old, &new);
        assert_eq!(
            keys,
            [
                "export.headers.authorization",
                "libvirt.uris",
                "metric.attributes.uuid"
            ]
        );
        assert!(!format!("{keys:?}").contains("s3cret"), "no value is named");
    }
}
