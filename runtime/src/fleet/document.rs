//! The fleet documents, as they travel (JSON): the desired state a fleet
//! operator publishes for a gateway or a group, the reported state a
//! gateway publishes, commands and their results. Format version
//! [`FORMAT_VERSION`]; docs/fleet.md describes every field with examples.
//!
//! Every type refuses unknown fields: a document a gateway does not fully
//! understand is refused, never half applied.

use std::collections::BTreeMap;

use outpost_models::signing::SignatureFile;
use serde::{Deserialize, Serialize};

/// The document format this gateway reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Whom a signed document or command is for. It is part of the signed
/// bytes, so a document signed for one gateway or group cannot be replayed
/// to another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// One gateway, by its `gateway.id`.
    Gateway(String),
    /// Every gateway with this group in `fleet.groups`.
    Group(String),
}

impl Target {
    /// `gateway:<id>` or `group:<name>`: the key of its applied version.
    pub fn key(&self) -> String {
        match self {
            Target::Gateway(g) => format!("gateway:{g}"),
            Target::Group(g) => format!("group:{g}"),
        }
    }
}

/// One file of a bundle, with its sha256 (the bundle's integrity, like a
/// model manifest's file list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    /// Path inside the bundle: relative, no `..`.
    pub path: String,
    /// sha256 of its bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// Its size in bytes (disk space is checked before a download).
    pub size: u64,
}

/// The model a desired state asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Model name (its manifest's `name`).
    pub name: String,
    /// Model version (its manifest's `version`).
    pub version: String,
    /// Every file of the artifact with its sha256; the artifact's own
    /// signature (`manifest.sig`) is checked by the registry as well.
    pub files: Vec<BundleFile>,
}

/// A configuration change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ConfigChange {
    /// A whole configuration file (TOML text).
    Full(String),
    /// A JSON merge patch (RFC 7396) over the configuration's TOML
    /// document read as JSON: `{"aggregation": {"window_ms": 30000}}`;
    /// `null` removes a key.
    Patch(serde_json::Map<String, serde_json::Value>),
}

/// The desired state of a gateway or of a group (retained on
/// `<prefix>/<gw>/desired` or `<prefix>/group/<g>/desired`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Whom it is for.
    pub target: Target,
    /// Grows with every new document for the same target; a document not
    /// newer than the applied one is a replay.
    pub version: u64,
    /// Unix time in milliseconds after which it is not applied.
    pub expires_at_ms: i64,
    /// The model to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// A configuration change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigChange>,
    /// A new `[privacy]` table (as JSON); needs a signature by a key in
    /// `privacy.trusted_keys` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<serde_json::Map<String, serde_json::Value>>,
    /// Signatures over the canonical bytes (see [`super::canonical`]).
    #[serde(default)]
    pub signatures: Vec<SignatureFile>,
}

/// The state of a model on the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Serving.
    Active,
    /// Running beside the active model, not serving.
    Shadow,
    /// Promoted, watched, rolled back automatically on failure.
    Probation,
}

/// A model as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedModel {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// sha256 of its weights file.
    pub weights_sha256: String,
    /// Its state.
    pub state: ModelState,
}

/// The gateway's health, as in `outpost status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// The pipeline is ready.
    pub ready: bool,
    /// The uplink is connected.
    pub uplink: bool,
    /// Records in the outbox not yet delivered.
    pub backlog: u64,
    /// Errors counted since the start (inference, outbox, uplink).
    pub errors: u64,
    /// Agreement of the shadow model with the active one, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_agreement: Option<f64>,
    /// Drift alerts since the start.
    pub drift_alerts: u64,
}

/// What was refused or failed last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastError {
    /// When, unix milliseconds.
    pub at_ms: i64,
    /// What it was about: `desired:<target key>` or `command:<id>`.
    pub subject: String,
    /// The refusal's reason code ([`super::Refusal::reason`]) or `failed`.
    pub reason: String,
    /// The message.
    pub message: String,
}

/// The reported state of a gateway (retained on `<prefix>/<gw>/reported`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedState {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The gateway's id.
    pub gateway: String,
    /// When this report was made, unix milliseconds.
    pub reported_at_ms: i64,
    /// Applied document version per target key (`gateway:<id>`,
    /// `group:<name>`).
    pub applied: BTreeMap<String, u64>,
    /// Document version accepted by the trust rules per target key (a
    /// newer one than `applied` is being applied, or failed: see
    /// `last_error`).
    #[serde(default)]
    pub accepted: BTreeMap<String, u64>,
    /// The models loaded (active, and a shadow or probation one).
    pub models: Vec<ReportedModel>,
    /// sha256 of the configuration file that runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// `privacy.policy_version` of the policy that runs.
    pub privacy_policy_version: String,
    /// Health.
    pub health: Health,
    /// When the uplink's client certificate expires, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires_at_ms: Option<i64>,
    /// What was refused or failed last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

/// The commands a gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandName {
    /// Report the status document.
    Status,
    /// Reload the configuration file (as `outpost reload`).
    Reload,
    /// Drain and start the pipeline again.
    RestartPipeline,
    /// Upload a diagnostics bundle.
    Diagnostics,
    /// List the dead-letter records.
    DeadletterList,
    /// Send dead-letter records again.
    DeadletterResend,
}

/// A command (on `<prefix>/<gw>/commands` or
/// `<prefix>/group/<g>/commands`, not retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Unique id: a command is run at most once per gateway.
    pub id: String,
    /// Whom it is for.
    pub target: Target,
    /// What to do.
    pub name: CommandName,
    /// Its arguments.
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Unix time in milliseconds after which it is not run.
    pub expires_at_ms: i64,
    /// Signatures over the canonical bytes.
    #[serde(default)]
    pub signatures: Vec<SignatureFile>,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Done.
    Ok,
    /// Refused by the trust rules (see `reason`).
    Refused,
    /// Accepted but failed.
    Failed,
}

/// The result of a command (on `<prefix>/<gw>/results`, not retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The command's id (empty when it could not be read).
    pub id: String,
    /// The gateway.
    pub gateway: String,
    /// How it ended.
    pub status: CommandStatus,
    /// The refusal's reason code, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What it produced.
    #[serde(default)]
    pub output: serde_json::Value,
    /// When it ended, unix milliseconds.
    pub finished_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_desired_state_reads_and_writes_back_the_same() {
        let text = r#"{"format":1,"target":{"group":"north"},"version":7,
            "expires_at_ms":1900000000000,
            "model":{"name":"vibration","version":"3",
                     "files":[{"path":"model.bpk","sha256":"00","size":10}]},
            "config":{"patch":{"aggregation":{"window_ms":30000}}},
            "signatures":[]}"#;
        let d: DesiredState = serde_json::from_str(text).unwrap();
        assert_eq!(d.target, Target::Group("north".into()));
        assert_eq!(d.target.key(), "group:north");
        let back: DesiredState = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn unknown_fields_and_commands_are_refused() {
        let err = serde_json::from_str::<DesiredState>(
            r#"{"format":1,"target":{"gateway":"g"},"version":1,"expires_at_ms":1,"colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = serde_json::from_str::<Command>(
            r#"{"format":1,"id":"c","target":{"gateway":"g"},"name":"format-disk","expires_at_ms":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("format-disk"), "{err}");
        let c: Command = serde_json::from_str(
            r#"{"format":1,"id":"c","target":{"gateway":"g"},"name":"deadletter-resend","expires_at_ms":1}"#,
        )
        .unwrap();
        assert_eq!(c.name, CommandName::DeadletterResend);
    }
}
