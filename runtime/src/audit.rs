//! The audit log: an append-only, hash-chained, crash-safe record of what the
//! gateway did with its models, policies and data: model loads, activations,
//! promotions and rollbacks, policy and configuration versions, and for every
//! published aggregate its id, model version and policy version ([`kinds`]).
//!
//! The log itself (file format, durability, recovery, what [`verify`]
//! catches) is `outpost_storage::audit`; this module names the gateway's
//! entry kinds and where the log lives under the state directory
//! ([`default_path`]), which describe the gateway rather than the store.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use outpost_storage::audit::{
    AuditError, AuditLog, AuditProblem, GENESIS, MAX_ENTRY, ProblemKind, VerifyReport, verify,
};

/// Entry kinds written by the runtime (the `kind` field) and their `data`.
pub mod kinds {
    /// A torn tail was quarantined at open ([`super::AuditLog::open`]):
    /// `{quarantined_bytes, file, offset}`. Written by the log itself.
    pub use outpost_storage::audit::kinds::RECOVERED;
    /// The log did not match its head file at start-up and was moved aside;
    /// this new chain starts here: `{reason, previous_log}`.
    pub const AUDIT_RESTARTED: &str = "audit_restarted";
    /// A run started: `{outpost, gateway, config_sha256, policy_version,
    /// model, weights_sha256, signed_by}`.
    pub const START: &str = "start";
    /// A new configuration runs after a reload: `{config_sha256,
    /// previous_sha256}`.
    pub const CONFIG_APPLIED: &str = "config_applied";
    /// A reload found problems in the configuration file; nothing changed:
    /// `{config_sha256, problems}`.
    pub const CONFIG_REFUSED: &str = "config_refused";
    /// A reloaded configuration could not start; the previous one runs
    /// again: `{config_sha256, restored_sha256, error}`.
    pub const CONFIG_ROLLED_BACK: &str = "config_rolled_back";
    /// A model was loaded from the registry: `{model, role (active|shadow),
    /// weights_sha256, signed_by}`.
    pub const MODEL_LOADED: &str = "model_loaded";
    /// The inference thread was handed a new model set: `{active, shadow, generation}`.
    pub const MODEL_ACTIVATED: &str = "model_activated";
    /// A model was refused (signature, checksum, incompatible input): `{model, reason}`.
    pub const MODEL_REFUSED: &str = "model_refused";
    /// A registry change, `model_<action>` for every action of the
    /// registry's history (`model_install`, `model_shadow`, `model_promote`,
    /// `model_rollback`, `model_reject_candidate`, `model_probation_passed`,
    /// `model_activation_failed`): the history event `{n, ts_ms, action,
    /// model, from, reason, by}`.
    pub const MODEL_REGISTRY_PREFIX: &str = "model_";
    /// The pseudonymization key changed (rotation without restart): `{key_id}`.
    pub const PRIVACY_KEY_ROTATED: &str = "privacy_key_rotated";
    /// An aggregate was released to the outbox: `{id, group, window_start,
    /// model, policy}`.
    pub const AGGREGATE: &str = "aggregate";
    /// The outbox merged committed aggregates into one (policy
    /// `coarsen`): `{id, group, from}` (the ids it replaces).
    pub const AGGREGATE_MERGED: &str = "aggregate_merged";
    /// The uplink set an aggregate the broker keeps refusing aside in the
    /// dead-letter store: `{entry, id, group, seq, attempts, reason, bytes}`.
    pub const DEADLETTER: &str = "deadletter";
    /// A dead-letter entry was removed to keep the store within its bound:
    /// `{entry, id, group}`.
    pub const DEADLETTER_EVICTED: &str = "deadletter_evicted";
    /// A dead-letter entry was put back in the outbox (`outpost deadletter
    /// resend`): `{entry, id, group}`.
    pub const DEADLETTER_RESENT: &str = "deadletter_resent";
    /// A fleet document or command passed the trust rules
    /// (docs/fleet.md): `{subject, version, digest, signed_by,
    /// privacy_signed_by}` for a desired state, `{subject, name}` for a
    /// command.
    pub const FLEET_ACCEPTED: &str = "fleet_accepted";
    /// A fleet document or command was refused: `{subject, reason, message}`.
    pub const FLEET_REFUSED: &str = "fleet_refused";
}

/// Where the audit log lives under the runtime's state directory.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit").join("audit.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_is_under_the_state_dir() {
        assert_eq!(
            default_path(Path::new("/var/lib/outpost")),
            PathBuf::from("/var/lib/outpost/audit/audit.log")
        );
    }

    #[test]
    fn recovery_entries_have_the_kind_the_runtime_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(dir.path());
        let mut log = AuditLog::open(&path).unwrap();
        log.append(kinds::START, serde_json::json!({})).unwrap();
        log.commit().unwrap();
        drop(log);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"seq\":2,\"ts").unwrap();
        drop(f);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.committed().0, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["kind"], kinds::RECOVERED);
        assert!(verify(&path).unwrap().ok());
    }
}

/// `[audit]`: the hash-chained audit log.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Keep the audit log (off in the embedded default, which keeps nothing on disk).
    pub enabled: bool,
    /// The log file; absent: `<gateway.state_dir>/audit/audit.log`.
    pub path: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
        }
    }
}

impl AuditConfig {
    /// The log file.
    pub fn path(&self, state_dir: &Path) -> PathBuf {
        self.path.clone().unwrap_or_else(|| default_path(state_dir))
    }
}
