#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The README's configuration reference cannot drift from the code: every key of the schema
//! appears in the table with the built-in default, and the table names no other key.
//! `VHA_PRINT_CONFIG_TABLE=1 cargo test --test docs_config -- --nocapture` prints the rows.

use std::collections::BTreeMap;

use virt_hypervisor_agent::config::AgentConfig;

/// Flatten the default config into dotted leaf keys with a display value.
fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() && prefix != "export.headers" => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), render(v));
        }
    }
}

fn render(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "unset".into(),
        serde_json::Value::String(s) if s.is_empty() => "\"\"".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a.iter().map(render).collect::<Vec<_>>().join(", "),
        serde_json::Value::Object(m) if m.is_empty() => "{}".into(),
        other => other.to_string(),
    }
}

/// Rows of the README table under "## Configuration reference": `| `key` | `default` | … |`.
fn readme_rows() -> BTreeMap<String, String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("README has a '## Configuration reference' section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let key = cells[1].trim_matches('`').to_string();
        let default = cells[2].replace('`', "").replace("<br>", ", ");
        rows.insert(key, default);
    }
    rows
}

#[test]
fn readme_config_table_matches_the_code_defaults() {
    let v = serde_json::to_value(AgentConfig::default()).unwrap();
    let mut expected = BTreeMap::new();
    leaves("", &v, &mut expected);
    if std::env::var_os("VHA_PRINT_CONFIG_TABLE").is_some() {
        for (k, d) in &expected {
            println!("| `{k}` | `{d}` | |");
        }
    }
    let got = readme_rows();
    let mut problems = Vec::new();
    for (k, d) in &expected {
        match got.get(k) {
            None => problems.push(format!("missing key {k} (default {d})")),
            Some(g) if g != d => {
                problems.push(format!("{k}: README says {g:?}, code default is {d:?}"))
            }
            _ => {}
        }
    }
    for k in got.keys() {
        if !expected.contains_key(k) {
            problems.push(format!(
                "README documents {k}, which the schema does not have"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "README configuration reference is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn reference_config_file_documents_every_key() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.yaml")).unwrap();
    let v = serde_json::to_value(AgentConfig::default()).unwrap();
    let mut expected = BTreeMap::new();
    leaves("", &v, &mut expected);
    for key in expected.keys() {
        let last = key.rsplit('.').next().unwrap();
        assert!(
            text.contains(&format!("{last}:")),
            "config/agent.yaml does not mention {key}"
        );
    }
}
