//! Privacy, applied at ingest before anything is windowed, stored or queued.
//!
//! Input and output: [`Reading`]. Here: the attribute allowlist (every
//! attribute not allowed is dropped and counted). Raw values never leave this
//! process: only aggregates reach the uplink (see `outbox`).

use crate::config::PrivacyConfig;
use crate::reading::Reading;

/// The privacy stage.
#[derive(Debug, Clone)]
pub struct Privacy {
    allow: Vec<String>,
}

impl Privacy {
    /// From the policy.
    pub fn new(cfg: &PrivacyConfig) -> Self {
        Self {
            allow: cfg.allow_attrs.clone(),
        }
    }

    /// Apply the policy; returns the reading and the number of attributes dropped.
    pub fn apply(&self, mut r: Reading) -> (Reading, usize) {
        let before = r.attrs.len();
        r.attrs.retain(|k, _| self.allow.iter().any(|a| a == k));
        let dropped = before - r.attrs.len();
        (r, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn only_allowed_attributes_pass() {
        let p = Privacy::new(&PrivacyConfig {
            allow_attrs: vec!["line".into()],
        });
        let r = Reading {
            sensor: Arc::from("s"),
            ts_ms: 1,
            values: vec![1.0],
            attrs: [
                ("line".to_string(), "A".into()),
                ("patient".to_string(), "Jane Doe".into()),
            ]
            .into(),
        };
        let (r, dropped) = p.apply(r);
        assert_eq!(dropped, 1);
        assert_eq!(r.attrs.keys().collect::<Vec<_>>(), vec!["line"]);
    }
}
