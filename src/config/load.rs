//! Layered loading and validation (placeholder until the loader lands).

use std::collections::HashMap;
use std::path::PathBuf;

use super::AgentConfig;

/// A configuration error: always names the key, the value and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

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

/// Load and validate the configuration.
pub fn load(_opts: &LoadOptions) -> Result<AgentConfig, ConfigError> {
    Ok(AgentConfig::default())
}
