//! `[model]` and `[governance]`: which model runs, which models may run,
//! and how a new one earns its place.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::check::Collector;

/// `[model]`
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Artifact directory; absent: the bundled BasicMotions FCN.
    pub path: Option<PathBuf>,
}

/// `[governance]`: which models may run, and how a new one earns its place.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    /// Follow the model registry (off in the embedded default, which keeps
    /// nothing on disk).
    pub enabled: bool,
    /// The model registry; absent: `<gateway.state_dir>/models`.
    pub registry_dir: Option<PathBuf>,
    /// Public key files of trusted model publishers (`ed25519-public <hex>`).
    pub trusted_keys: Vec<PathBuf>,
    /// Refuse models not signed by a trusted key; default: true as soon as
    /// `trusted_keys` is not empty. The bundled model is part of the binary
    /// and needs no signature.
    pub require_signature: Option<bool>,
    /// How often the gateway looks for a new desired state in the registry.
    pub poll_interval_ms: u64,
    /// Least agreement between a shadow (candidate, or the baseline during a
    /// probation) and the active model; under it a candidate is rejected and a
    /// model on probation rolled back.
    pub min_agreement: f64,
    /// Fewest inferences in an aggregate for it to be judged.
    pub min_inferences: u64,
    /// Aggregates a promoted model must pass before its probation ends; 0:
    /// no probation (no automatic rollback).
    pub probation_windows: u32,
    /// Highest anomaly rate of a model on probation (detectors).
    pub max_anomaly_rate: Option<f64>,
    /// Lowest mean score of a model on probation.
    pub min_mean_score: Option<f64>,
    /// PSI at or above which drift is an alert (aggregates, metrics, log).
    pub drift_alert_psi: f64,
    /// Fewest inferences in an aggregation window for its drift to be computed.
    pub drift_min_inferences: u64,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            registry_dir: None,
            trusted_keys: Vec::new(),
            require_signature: None,
            poll_interval_ms: 1000,
            min_agreement: 0.8,
            min_inferences: 10,
            probation_windows: 6,
            max_anomaly_rate: None,
            min_mean_score: None,
            drift_alert_psi: 0.25,
            drift_min_inferences: 10,
        }
    }
}

impl GovernanceConfig {
    /// The registry's directory.
    pub fn registry_dir(&self, state_dir: &Path) -> PathBuf {
        self.registry_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("models"))
    }

    /// Check `[governance]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if !(0.0..=1.0).contains(&self.min_agreement) {
            c.push("min_agreement", "must be between 0 and 1");
        }
        if let Some(r) = self.max_anomaly_rate
            && !(0.0..=1.0).contains(&r)
        {
            c.push("max_anomaly_rate", "must be between 0 and 1");
        }
        if self.poll_interval_ms == 0 {
            c.push("poll_interval_ms", "must be at least 1");
        }
        if !(self.drift_alert_psi.is_finite() && self.drift_alert_psi > 0.0) {
            c.push("drift_alert_psi", "must be a positive number");
        }
        if self.require_signature == Some(true) && self.trusted_keys.is_empty() {
            c.push(
                "require_signature",
                "signatures are required but governance.trusted_keys is empty: no model could load",
            );
        }
        for (i, k) in self.trusted_keys.iter().enumerate() {
            if let Err(e) = outpost_models::signing::read_public_key(k) {
                c.push(format!("trusted_keys[{i}]"), e.to_string());
            }
        }
    }
}
