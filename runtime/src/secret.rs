//! Secrets (passwords, keys) named in a configuration: read from a file or
//! the environment when needed, never printed.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// A secret (password, key) read from a file or the environment. Its value is
/// never printed: `Debug` shows only where it comes from.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// Read the secret from this file (trailing newline trimmed).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Read the secret from this environment variable.
    #[serde(default)]
    pub env: Option<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, &self.env) {
            (Some(p), _) => write!(f, "Secret(file {})", p.display()),
            (None, Some(e)) => write!(f, "Secret(env {e})"),
            (None, None) => write!(f, "Secret(unset)"),
        }
    }
}

impl SecretSource {
    /// Read the secret now. The error names the source, never the value.
    pub fn read(&self) -> Result<String, String> {
        match (&self.file, &self.env) {
            (Some(p), None) => std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read secret file {}: {e}", p.display())),
            (None, Some(e)) => {
                std::env::var(e).map_err(|_| format!("environment variable {e} is not set"))
            }
            _ => Err("exactly one of `file` or `env` must be set".into()),
        }
    }
}
