//! The config loader on arbitrary file contents: the bounded reader, the YAML pre-scan, the
//! `config` crate's parse, the schema walk and validation must end in a config or a
//! `ConfigError`, never a panic, a stack overflow or unbounded memory.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virt_hypervisor_agent::config::{load, LoadOptions};

/// One file, rewritten for every input (the loader reads the config from a path).
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vha-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz directory");
        dir.join("agent.yaml")
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).expect("write the fuzz input");
    let opts = LoadOptions {
        path: Some(path().clone()),
        env: Some(HashMap::new()),
        overrides: vec![],
    };
    let _ = load(&opts);
});
