//! The trust rules of fleet documents and commands, free of I/O: what
//! arrives is checked here, and only what passes is applied.
//!
//! A desired-state document is applied only when, in this order:
//!
//! 1. it is at most `fleet.max_document_bytes` and a JSON object;
//! 2. it carries a signature ([`super::canonical`]) that verifies with a key
//!    of `fleet.trusted_keys`; a signature naming a trusted key that does
//!    not verify refuses the document, whatever else it carries;
//! 3. it is of format [`FORMAT_VERSION`] and for this gateway or one of its
//!    groups;
//! 4. its version is newer than the one applied for its target (the same
//!    version with the same bytes is [`DesiredOutcome::Unchanged`]: a
//!    retained document delivered again);
//! 5. the gateway's clock is set ([`crate::clock::is_set`]), and it has
//!    not expired, and claims no longer validity than
//!    `fleet.max_validity_s`;
//! 6. if it changes the `[privacy]` table (its `privacy`, or a `privacy`
//!    table in its configuration or patch that differs from the running
//!    one), it also carries a signature that verifies with a key of
//!    `privacy.trusted_keys`: the fleet key alone cannot loosen privacy;
//! 7. its bundle is well formed (relative paths, a sha256 per file) and a
//!    full configuration is TOML.
//!
//! A command likewise (1, 2, 3, 5), and its id must not have been accepted
//! before (ids are remembered until they expire, at most
//! `fleet.max_pending_commands` of them).
//!
//! Every refusal is a [`Refusal`] with a reason code for metrics, audit and
//! the reported state. What this machine remembers ([`TrustMemory`]) is
//! stored by its caller so that a restart does not reopen replays.

use std::collections::BTreeMap;

use outpost_models::signing::{BytesSignatureError, SignatureFile, TrustedKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::canonical::{Kind, signed_bytes};
use super::document::{Command, ConfigChange, DesiredState, FORMAT_VERSION, Target};

/// Why a document or command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Larger than `fleet.max_document_bytes`.
    #[error("{size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON, or not a document of the format.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A format this gateway does not read.
    #[error("format {found} is not supported (this gateway reads format {FORMAT_VERSION})")]
    UnsupportedFormat {
        /// The document's format.
        found: u32,
    },
    /// For another gateway, or a group this gateway is not in.
    #[error("it is for {target}, not for this gateway or its groups")]
    WrongTarget {
        /// The document's target key.
        target: String,
    },
    /// No signature at all.
    #[error("not signed")]
    Unsigned,
    /// Signed, but by no trusted key.
    #[error("signed only by keys that are not trusted: {}", key_ids.join(", "))]
    UntrustedKey {
        /// The keys named by its signatures.
        key_ids: Vec<String>,
    },
    /// A signature that names a trusted key does not verify (or is not
    /// well formed): the content was changed after signing.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// The gateway's clock is not set (before 2020): no expiry can be
    /// checked, so nothing is applied until it is.
    #[error("the gateway's clock is not set (it reads {now_ms}): expiry cannot be checked")]
    ClockNotSet {
        /// The gateway's clock, unix ms.
        now_ms: i64,
    },
    /// Past its expiry.
    #[error("expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        /// Its expiry, unix ms.
        expires_at_ms: i64,
        /// The gateway's clock, unix ms.
        now_ms: i64,
    },
    /// It claims a longer validity than `fleet.max_validity_s`.
    #[error("valid until {expires_at_ms}, beyond the {max_validity_s} s allowed")]
    ValidityTooLong {
        /// Its expiry, unix ms.
        expires_at_ms: i64,
        /// The limit.
        max_validity_s: u64,
    },
    /// Not newer than the applied document of its target.
    #[error("version {version} of {target} is not newer than the applied version {applied}")]
    Replayed {
        /// Its target key.
        target: String,
        /// Its version.
        version: u64,
        /// The applied version.
        applied: u64,
    },
    /// A command id accepted before.
    #[error("command {id} was accepted before")]
    DuplicateCommand {
        /// The id.
        id: String,
    },
    /// `fleet.max_pending_commands` unexpired command ids are remembered.
    #[error("{max} unexpired commands are remembered already")]
    TooManyCommands {
        /// The limit.
        max: usize,
    },
    /// It changes the privacy policy without a signature by a key of
    /// `privacy.trusted_keys`.
    #[error(
        "it changes the [privacy] table but carries no valid signature by a key of privacy.trusted_keys"
    )]
    PrivacyNotCountersigned,
    /// Signed and fresh, but its content is not valid.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl Refusal {
    /// The reason code: the `reason` label of
    /// `outpost_fleet_refused_total`, and `last_error.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => "too_large",
            Refusal::Malformed(_) => "malformed",
            Refusal::UnsupportedFormat { .. } => "unsupported_format",
            Refusal::WrongTarget { .. } => "wrong_target",
            Refusal::Unsigned => "unsigned",
            Refusal::UntrustedKey { .. } => "untrusted_key",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::ClockNotSet { .. } => "clock_not_set",
            Refusal::Expired { .. } => "expired",
            Refusal::ValidityTooLong { .. } => "validity_too_long",
            Refusal::Replayed { .. } => "replayed",
            Refusal::DuplicateCommand { .. } => "duplicate_command",
            Refusal::TooManyCommands { .. } => "too_many_commands",
            Refusal::PrivacyNotCountersigned => "privacy_not_countersigned",
            Refusal::Invalid(_) => "invalid",
        }
    }

    /// Every reason code, for metrics that start at zero.
    pub const REASONS: [&'static str; 15] = [
        "too_large",
        "malformed",
        "unsupported_format",
        "wrong_target",
        "unsigned",
        "untrusted_key",
        "bad_signature",
        "clock_not_set",
        "expired",
        "validity_too_long",
        "replayed",
        "duplicate_command",
        "too_many_commands",
        "privacy_not_countersigned",
        "invalid",
    ];
}

/// The keys: fleet operators' and privacy officers'.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// `fleet.trusted_keys`.
    pub fleet: Vec<TrustedKey>,
    /// `privacy.trusted_keys`.
    pub privacy: Vec<TrustedKey>,
}

/// Limits from `[fleet]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `fleet.max_document_bytes`.
    pub max_document_bytes: usize,
    /// `fleet.max_pending_commands`.
    pub max_pending_commands: usize,
    /// `fleet.max_validity_s`.
    pub max_validity_s: u64,
}

impl From<&super::FleetConfig> for Limits {
    fn from(c: &super::FleetConfig) -> Self {
        Self {
            max_document_bytes: c.max_document_bytes,
            max_pending_commands: c.max_pending_commands,
            max_validity_s: c.max_validity_s,
        }
    }
}

/// The applied version of one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applied {
    /// Its version.
    pub version: u64,
    /// sha256 of its signed bytes (hex).
    pub digest: String,
}

/// What the machine remembers; its caller stores it across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustMemory {
    /// Applied document per target key.
    pub applied: BTreeMap<String, Applied>,
    /// Accepted command ids and their expiry (unix ms).
    pub commands: BTreeMap<String, i64>,
}

/// A desired-state document that passed.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedDesired {
    /// The document.
    pub doc: DesiredState,
    /// sha256 of its signed bytes (hex), to [`Trust::record_applied`].
    pub digest: String,
    /// Ids of the fleet keys whose signatures verified.
    pub signed_by: Vec<String>,
    /// Ids of the privacy keys whose signatures verified (only checked when
    /// it changes the privacy policy).
    pub privacy_signed_by: Vec<String>,
    /// It changes the `[privacy]` table.
    pub changes_privacy: bool,
}

/// The outcome of a desired-state document that is not refused.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredOutcome {
    /// New: apply it, then [`Trust::record_applied`].
    Apply(Box<AcceptedDesired>),
    /// The document applied already (a retained message delivered again).
    Unchanged,
}

/// A document as received: its JSON object, its signed bytes and its
/// signatures.
struct Received {
    value: Map<String, Value>,
    signed: Vec<u8>,
    signatures: Vec<SignatureFile>,
}

/// The trust state of one gateway.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Keys,
    gateway: String,
    groups: Vec<String>,
    limits: Limits,
    memory: TrustMemory,
}

impl Trust {
    /// A gateway's trust with nothing applied yet.
    pub fn new(keys: Keys, gateway: &str, groups: &[String], limits: Limits) -> Self {
        Self {
            keys,
            gateway: gateway.to_string(),
            groups: groups.to_vec(),
            limits,
            memory: TrustMemory::default(),
        }
    }

    /// Continue from a stored memory.
    pub fn with_memory(mut self, memory: TrustMemory) -> Self {
        self.memory = memory;
        self
    }

    /// What to store.
    pub fn memory(&self) -> &TrustMemory {
        &self.memory
    }

    /// Check a desired-state document received as `bytes` at `now_ms`;
    /// `running_privacy` is the `[privacy]` table that runs (as JSON), or
    /// `None` when it is not known: then any `privacy` in the document and
    /// any full configuration counts as a change of the policy.
    pub fn check_desired(
        &self,
        bytes: &[u8],
        now_ms: i64,
        running_privacy: Option<&Map<String, Value>>,
    ) -> Result<DesiredOutcome, Refusal> {
        let Received {
            value,
            signed,
            signatures,
        } = self.read(bytes, Kind::Desired)?;
        let signed_by = verify(&signed, &signatures, &self.keys.fleet)?;
        let doc: DesiredState = serde_json::from_value(Value::Object(value))
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        self.check_format_and_target(doc.format, &doc.target)?;
        let digest = hex::encode(Sha256::digest(&signed));
        let key = doc.target.key();
        if let Some(applied) = self.memory.applied.get(&key) {
            if doc.version == applied.version && digest == applied.digest {
                return Ok(DesiredOutcome::Unchanged);
            }
            if doc.version <= applied.version {
                return Err(Refusal::Replayed {
                    target: key,
                    version: doc.version,
                    applied: applied.version,
                });
            }
        }
        self.check_expiry(doc.expires_at_ms, now_ms)?;
        let changes_privacy = changes_privacy(&doc, running_privacy)?;
        let privacy_signed_by = if changes_privacy {
            match verify(&signed, &signatures, &self.keys.privacy) {
                Ok(ids) => ids,
                Err(Refusal::BadSignature(e)) => return Err(Refusal::BadSignature(e)),
                Err(_) => return Err(Refusal::PrivacyNotCountersigned),
            }
        } else {
            Vec::new()
        };
        check_content(&doc)?;
        Ok(DesiredOutcome::Apply(Box::new(AcceptedDesired {
            doc,
            digest,
            signed_by,
            privacy_signed_by,
            changes_privacy,
        })))
    }

    /// A document of `target` at `version` is applied (or its applying
    /// was attempted: a version is never applied twice).
    pub fn record_applied(&mut self, target: &Target, version: u64, digest: &str) {
        self.memory.applied.insert(
            target.key(),
            Applied {
                version,
                digest: digest.to_string(),
            },
        );
    }

    /// Check a command received as `bytes` at `now_ms`; when it passes its
    /// id is remembered (until it expires), so it is never run twice.
    pub fn accept_command(&mut self, bytes: &[u8], now_ms: i64) -> Result<Command, Refusal> {
        let Received {
            value,
            signed,
            signatures,
        } = self.read(bytes, Kind::Command)?;
        verify(&signed, &signatures, &self.keys.fleet)?;
        let cmd: Command = serde_json::from_value(Value::Object(value))
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        self.check_format_and_target(cmd.format, &cmd.target)?;
        if self.memory.commands.contains_key(&cmd.id) {
            return Err(Refusal::DuplicateCommand { id: cmd.id });
        }
        self.check_expiry(cmd.expires_at_ms, now_ms)?;
        if cmd.id.is_empty() || cmd.id.len() > 128 || cmd.id.chars().any(char::is_control) {
            return Err(Refusal::Invalid(
                "a command id is 1 to 128 characters, without control characters".into(),
            ));
        }
        // Expired ids can go: an expired command is refused anyway.
        self.memory.commands.retain(|_, exp| *exp > now_ms);
        if self.memory.commands.len() >= self.limits.max_pending_commands {
            return Err(Refusal::TooManyCommands {
                max: self.limits.max_pending_commands,
            });
        }
        self.memory
            .commands
            .insert(cmd.id.clone(), cmd.expires_at_ms);
        Ok(cmd)
    }

    /// The JSON object, its signed bytes and its signatures.
    fn read(&self, bytes: &[u8], kind: Kind) -> Result<Received, Refusal> {
        if bytes.len() > self.limits.max_document_bytes {
            return Err(Refusal::TooLarge {
                size: bytes.len(),
                max: self.limits.max_document_bytes,
            });
        }
        let value: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let signatures: Vec<SignatureFile> = match value.get("signatures") {
            None => Vec::new(),
            Some(s) => serde_json::from_value(s.clone())
                .map_err(|e| Refusal::Malformed(format!("signatures: {e}")))?,
        };
        let signed = signed_bytes(kind, &value);
        Ok(Received {
            value,
            signed,
            signatures,
        })
    }

    fn check_format_and_target(&self, format: u32, target: &Target) -> Result<(), Refusal> {
        if format != FORMAT_VERSION {
            return Err(Refusal::UnsupportedFormat { found: format });
        }
        let ours = match target {
            Target::Gateway(g) => *g == self.gateway,
            Target::Group(g) => self.groups.contains(g),
        };
        if !ours {
            return Err(Refusal::WrongTarget {
                target: target.key(),
            });
        }
        Ok(())
    }

    fn check_expiry(&self, expires_at_ms: i64, now_ms: i64) -> Result<(), Refusal> {
        if !crate::clock::is_set(now_ms) {
            return Err(Refusal::ClockNotSet { now_ms });
        }
        if expires_at_ms <= now_ms {
            return Err(Refusal::Expired {
                expires_at_ms,
                now_ms,
            });
        }
        let max_ms =
            i64::try_from(self.limits.max_validity_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        if expires_at_ms - now_ms > max_ms {
            return Err(Refusal::ValidityTooLong {
                expires_at_ms,
                max_validity_s: self.limits.max_validity_s,
            });
        }
        Ok(())
    }
}

/// The ids of the keys of `keys` whose signatures verify over `signed`.
/// Signatures by other keys are passed over (a privacy officer's, for the
/// fleet keys); one naming a key of `keys` that does not verify refuses.
fn verify(
    signed: &[u8],
    signatures: &[SignatureFile],
    keys: &[TrustedKey],
) -> Result<Vec<String>, Refusal> {
    if signatures.is_empty() {
        return Err(Refusal::Unsigned);
    }
    let mut good = Vec::new();
    let mut others = Vec::new();
    for sig in signatures {
        match outpost_models::signing::verify_bytes(signed, sig, keys) {
            Ok(id) => good.push(id),
            Err(BytesSignatureError::UntrustedKey { key_id }) => others.push(key_id),
            Err(e) => return Err(Refusal::BadSignature(e.to_string())),
        }
    }
    if good.is_empty() {
        return Err(Refusal::UntrustedKey { key_ids: others });
    }
    Ok(good)
}

/// Does `doc` change the running `[privacy]` table? Conservative: a full
/// configuration without a `[privacy]` table changes a non-empty one, and
/// with the running table unknown every mention of privacy is a change.
fn changes_privacy(
    doc: &DesiredState,
    running: Option<&Map<String, Value>>,
) -> Result<bool, Refusal> {
    let Some(running) = running else {
        let patch_touches =
            matches!(&doc.config, Some(ConfigChange::Patch(p)) if p.contains_key("privacy"));
        let full = matches!(&doc.config, Some(ConfigChange::Full(_)));
        if full {
            // Still refuse a full configuration that is not TOML.
            changes_privacy(doc, Some(&Map::new()))?;
        }
        return Ok(doc.privacy.is_some() || patch_touches || full);
    };
    if doc.privacy.as_ref().is_some_and(|p| p != running) {
        return Ok(true);
    }
    match &doc.config {
        None => Ok(false),
        Some(ConfigChange::Full(text)) => {
            let table: toml::Table = toml::from_str(text)
                .map_err(|e| Refusal::Invalid(format!("config: not TOML: {e}")))?;
            let privacy = match table.get("privacy") {
                None => Map::new(),
                Some(v) => match serde_json::to_value(v) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err(Refusal::Invalid("config: [privacy] is not a table".into())),
                },
            };
            Ok(&privacy != running)
        }
        Some(ConfigChange::Patch(patch)) => match patch.get("privacy") {
            None => Ok(false),
            Some(p) => {
                let mut merged = Value::Object(running.clone());
                merge_patch(&mut merged, p);
                Ok(merged != Value::Object(running.clone()))
            }
        },
    }
}

/// RFC 7396 JSON merge patch of `target` by `patch`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A bundle's paths are relative and plain, each with a sha256.
fn check_content(doc: &DesiredState) -> Result<(), Refusal> {
    let Some(model) = &doc.model else {
        return Ok(());
    };
    if model.files.is_empty() {
        return Err(Refusal::Invalid("model: no files".into()));
    }
    for (i, f) in model.files.iter().enumerate() {
        let plain = !f.path.is_empty()
            && !f.path.starts_with('/')
            && !f.path.contains(['\\', '\0'])
            && f.path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !plain {
            return Err(Refusal::Invalid(format!(
                "model.files[{i}].path {:?} must be a relative path without `.` or `..`",
                f.path
            )));
        }
        if !is_sha256(&f.sha256) {
            return Err(Refusal::Invalid(format!(
                "model.files[{i}].sha256 must be 64 lowercase hex digits"
            )));
        }
        if model.files[..i].iter().any(|g| g.path == f.path) {
            return Err(Refusal::Invalid(format!(
                "model.files[{i}].path {:?} is listed twice",
                f.path
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::canonical::sign;
    use outpost_models::signing::{SigningKey, generate_keypair, read_public_key, read_secret_key};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000;
    const HOUR: i64 = 3_600_000;

    struct Keyring {
        _dir: tempfile::TempDir,
        fleet: SigningKey,
        privacy: SigningKey,
        stranger: SigningKey,
        trust: Trust,
    }

    fn pair(dir: &std::path::Path, name: &str) -> (SigningKey, TrustedKey) {
        let (s, p) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pub")),
        );
        generate_keypair(&s, &p).unwrap();
        (read_secret_key(&s).unwrap(), read_public_key(&p).unwrap())
    }

    fn keyring() -> Keyring {
        let dir = tempfile::tempdir().unwrap();
        let (fleet, fleet_pub) = pair(dir.path(), "fleet");
        let (privacy, privacy_pub) = pair(dir.path(), "privacy");
        let (stranger, _) = pair(dir.path(), "stranger");
        let keys = Keys {
            fleet: vec![fleet_pub],
            privacy: vec![privacy_pub],
        };
        let trust = Trust::new(
            keys,
            "gw-1",
            &["north".to_string()],
            Limits::from(&crate::fleet::FleetConfig {
                max_pending_commands: 2,
                ..Default::default()
            }),
        );
        Keyring {
            _dir: dir,
            fleet,
            privacy,
            stranger,
            trust,
        }
    }

    fn desired(version: u64, extra: Value) -> Map<String, Value> {
        let mut doc = json!({
            "format": 1,
            "target": {"gateway": "gw-1"},
            "version": version,
            "expires_at_ms": NOW + HOUR,
            "config": {"patch": {"aggregation": {"window_ms": 30000}}},
        });
        merge_patch(&mut doc, &extra);
        match doc {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    fn signed(kind: Kind, mut doc: Map<String, Value>, keys: &[&SigningKey]) -> Vec<u8> {
        for k in keys {
            sign(kind, &mut doc, k);
        }
        serde_json::to_vec(&doc).unwrap()
    }

    fn running_privacy() -> Map<String, Value> {
        match json!({"policy_version": "3", "allow_attrs": ["line"]}) {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    fn check(k: &Keyring, bytes: &[u8]) -> Result<DesiredOutcome, Refusal> {
        k.trust.check_desired(bytes, NOW, Some(&running_privacy()))
    }

    fn accepted(k: &Keyring, bytes: &[u8]) -> AcceptedDesired {
        match check(k, bytes) {
            Ok(DesiredOutcome::Apply(a)) => *a,
            other => panic!("expected the document to be accepted: {other:?}"),
        }
    }

    #[test]
    fn a_signed_fresh_document_is_accepted_then_unchanged_when_delivered_again() {
        let mut k = keyring();
        let bytes = signed(Kind::Desired, desired(1, json!({})), &[&k.fleet]);
        let a = accepted(&k, &bytes);
        assert_eq!(a.doc.version, 1);
        assert_eq!(a.signed_by, vec![k.trust.keys.fleet[0].key_id.clone()]);
        assert!(!a.changes_privacy);
        k.trust
            .record_applied(&a.doc.target, a.doc.version, &a.digest);
        assert_eq!(check(&k, &bytes), Ok(DesiredOutcome::Unchanged));
        // Key order and whitespace do not matter: the canonical form is signed.
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        assert_eq!(check(&k, &pretty), Ok(DesiredOutcome::Unchanged));
        // A group document of its group passes too.
        let group = signed(
            Kind::Desired,
            desired(1, json!({"target": {"gateway": null, "group": "north"}})),
            &[&k.fleet],
        );
        assert_eq!(
            accepted(&k, &group).doc.target,
            Target::Group("north".into())
        );
    }

    #[test]
    fn an_unsigned_document_is_refused() {
        let k = keyring();
        let bytes = serde_json::to_vec(&desired(1, json!({}))).unwrap();
        assert_eq!(check(&k, &bytes), Err(Refusal::Unsigned));
        let bytes = serde_json::to_vec(&desired(1, json!({"signatures": []}))).unwrap();
        assert_eq!(check(&k, &bytes).unwrap_err().reason(), "unsigned");
    }

    #[test]
    fn a_document_signed_by_an_untrusted_key_is_refused() {
        let k = keyring();
        let bytes = signed(Kind::Desired, desired(1, json!({})), &[&k.stranger]);
        let err = check(&k, &bytes).unwrap_err();
        assert!(
            matches!(&err, Refusal::UntrustedKey { key_ids } if key_ids.len() == 1),
            "{err}"
        );
        assert_eq!(err.reason(), "untrusted_key");
        // The privacy officer's key is not a fleet key either.
        let bytes = signed(Kind::Desired, desired(1, json!({})), &[&k.privacy]);
        assert_eq!(check(&k, &bytes).unwrap_err().reason(), "untrusted_key");
    }

    #[test]
    fn a_document_changed_after_signing_is_refused() {
        let k = keyring();
        let bytes = signed(Kind::Desired, desired(1, json!({})), &[&k.fleet]);
        let mut v: Value = serde_json::from_slice(&bytes).unwrap();
        v["config"]["patch"]["aggregation"]["window_ms"] = json!(1);
        let err = check(&k, &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "bad_signature", "{err}");
        // A valid signature beside a bad one by a trusted key does not help.
        let mut doc = desired(1, json!({}));
        sign(Kind::Desired, &mut doc, &k.fleet);
        let good = doc["signatures"][0].clone();
        let mut forged = good.clone();
        forged["signature"] = json!("00".repeat(64));
        doc.insert("signatures".into(), json!([good, forged]));
        let err = check(&k, &serde_json::to_vec(&doc).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "bad_signature", "{err}");
        // A malformed signature entry is refused, not skipped.
        let doc = desired(
            1,
            json!({"signatures": [{"algorithm": "rsa", "key_id": "x", "signature": "y"}]}),
        );
        let err = check(&k, &serde_json::to_vec(&doc).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "bad_signature", "{err}");
    }

    #[test]
    fn a_command_signature_is_not_valid_for_a_desired_document() {
        let k = keyring();
        let bytes = signed(Kind::Command, desired(1, json!({})), &[&k.fleet]);
        assert_eq!(check(&k, &bytes).unwrap_err().reason(), "bad_signature");
    }

    #[test]
    fn a_replayed_document_is_refused() {
        let mut k = keyring();
        let v1 = signed(Kind::Desired, desired(1, json!({})), &[&k.fleet]);
        let v2 = signed(Kind::Desired, desired(2, json!({})), &[&k.fleet]);
        let a = accepted(&k, &v2);
        k.trust.record_applied(&a.doc.target, 2, &a.digest);
        let err = check(&k, &v1).unwrap_err();
        assert_eq!(
            err,
            Refusal::Replayed {
                target: "gateway:gw-1".into(),
                version: 1,
                applied: 2
            }
        );
        // The same version with other content is a replay too.
        let other = signed(
            Kind::Desired,
            desired(
                2,
                json!({"config": {"patch": {"aggregation": {"window_ms": 5}}}}),
            ),
            &[&k.fleet],
        );
        assert_eq!(check(&k, &other).unwrap_err().reason(), "replayed");
        // What is remembered survives a restart.
        let restored = Trust::new(k.trust.keys.clone(), "gw-1", &[], k.trust.limits)
            .with_memory(k.trust.memory().clone());
        assert_eq!(
            restored
                .check_desired(&v1, NOW, Some(&running_privacy()))
                .unwrap_err()
                .reason(),
            "replayed"
        );
        // A newer version passes.
        let v3 = signed(Kind::Desired, desired(3, json!({})), &[&k.fleet]);
        assert_eq!(accepted(&k, &v3).doc.version, 3);
    }

    #[test]
    fn an_expired_document_is_refused_and_so_is_an_overlong_validity() {
        let k = keyring();
        let bytes = signed(
            Kind::Desired,
            desired(1, json!({"expires_at_ms": NOW})),
            &[&k.fleet],
        );
        assert_eq!(
            check(&k, &bytes),
            Err(Refusal::Expired {
                expires_at_ms: NOW,
                now_ms: NOW
            })
        );
        let bytes = signed(
            Kind::Desired,
            desired(1, json!({"expires_at_ms": NOW + 10_000 * 24 * HOUR})),
            &[&k.fleet],
        );
        assert_eq!(check(&k, &bytes).unwrap_err().reason(), "validity_too_long");
        // A gateway whose clock is not set cannot tell: nothing passes.
        let bytes = signed(
            Kind::Desired,
            desired(1, json!({"expires_at_ms": 10_000})),
            &[&k.fleet],
        );
        assert_eq!(
            k.trust
                .check_desired(&bytes, 5_000, Some(&running_privacy())),
            Err(Refusal::ClockNotSet { now_ms: 5_000 })
        );
    }

    #[test]
    fn a_document_for_another_gateway_or_group_is_refused() {
        let k = keyring();
        let bytes = signed(
            Kind::Desired,
            desired(1, json!({"target": {"gateway": "gw-2"}})),
            &[&k.fleet],
        );
        assert_eq!(
            check(&k, &bytes),
            Err(Refusal::WrongTarget {
                target: "gateway:gw-2".into()
            })
        );
        let bytes = signed(
            Kind::Desired,
            desired(1, json!({"target": {"gateway": null, "group": "south"}})),
            &[&k.fleet],
        );
        assert_eq!(check(&k, &bytes).unwrap_err().reason(), "wrong_target");
    }

    #[test]
    fn malformed_oversized_and_unknown_format_documents_are_refused() {
        let k = keyring();
        assert_eq!(check(&k, b"not json").unwrap_err().reason(), "malformed");
        assert_eq!(check(&k, b"[1]").unwrap_err().reason(), "malformed");
        let bytes = signed(
            Kind::Desired,
            desired(1, json!({"colour": "red"})),
            &[&k.fleet],
        );
        assert_eq!(check(&k, &bytes).unwrap_err().reason(), "malformed");
        let bytes = signed(Kind::Desired, desired(1, json!({"format": 2})), &[&k.fleet]);
        assert_eq!(
            check(&k, &bytes),
            Err(Refusal::UnsupportedFormat { found: 2 })
        );
        let big = vec![b' '; (1 << 20) + 1];
        assert_eq!(check(&k, &big).unwrap_err().reason(), "too_large");
    }

    #[test]
    fn a_bundle_with_a_bad_path_or_hash_is_refused() {
        let k = keyring();
        let model = |path: &str, sha: &str| {
            json!({"model": {"name": "m", "version": "2",
                "files": [{"path": path, "sha256": sha, "size": 1}]}})
        };
        let good = "ab".repeat(32);
        let bytes = signed(
            Kind::Desired,
            desired(1, model("model.bpk", &good)),
            &[&k.fleet],
        );
        assert!(matches!(check(&k, &bytes), Ok(DesiredOutcome::Apply(_))));
        for (path, sha) in [
            ("../etc/passwd", good.as_str()),
            ("/etc/passwd", good.as_str()),
            ("a//b", good.as_str()),
            ("model.bpk", "AB"),
        ] {
            let bytes = signed(Kind::Desired, desired(1, model(path, sha)), &[&k.fleet]);
            assert_eq!(
                check(&k, &bytes).unwrap_err().reason(),
                "invalid",
                "{path} {sha}"
            );
        }
    }

    #[test]
    fn a_privacy_change_signed_by_the_fleet_key_only_is_refused() {
        let k = keyring();
        let loosened = json!({"policy_version": "4", "allow_attrs": ["line", "patient"]});
        let changes = [
            json!({"privacy": loosened}),
            json!({"config": {"patch": {"privacy": {"allow_attrs": ["line", "patient"]}}}}),
            json!({"config": {"patch": null, "full": "[privacy]\npolicy_version = \"4\"\n"}}),
            // A whole configuration without [privacy] drops the policy.
            json!({"config": {"patch": null, "full": "[[sources]]\nkind = \"simulated\"\n"}}),
        ];
        for change in changes {
            let fleet_only = signed(Kind::Desired, desired(1, change.clone()), &[&k.fleet]);
            assert_eq!(
                check(&k, &fleet_only),
                Err(Refusal::PrivacyNotCountersigned),
                "{change}"
            );
            let both = signed(
                Kind::Desired,
                desired(1, change.clone()),
                &[&k.fleet, &k.privacy],
            );
            let a = accepted(&k, &both);
            assert!(a.changes_privacy, "{change}");
            assert_eq!(a.privacy_signed_by.len(), 1, "{change}");
            // The privacy officer alone cannot deploy anything.
            let privacy_only = signed(Kind::Desired, desired(1, change.clone()), &[&k.privacy]);
            assert_eq!(
                check(&k, &privacy_only).unwrap_err().reason(),
                "untrusted_key"
            );
        }
        // Restating the running policy is no change: the fleet key suffices.
        let same = signed(
            Kind::Desired,
            desired(
                1,
                json!({"privacy": running_privacy(),
                "config": {"patch": {"privacy": {"policy_version": "3"}}}}),
            ),
            &[&k.fleet],
        );
        assert!(!accepted(&k, &same).changes_privacy);
    }

    #[test]
    fn with_the_running_policy_unknown_every_privacy_mention_needs_the_privacy_key() {
        let k = keyring();
        for change in [
            json!({"privacy": running_privacy()}),
            json!({"config": {"patch": {"privacy": {"policy_version": "3"}}}}),
            json!({"config": {"patch": null, "full": "[[sources]]\ntype = \"simulated\"\n"}}),
        ] {
            let fleet_only = signed(Kind::Desired, desired(1, change.clone()), &[&k.fleet]);
            assert_eq!(
                k.trust.check_desired(&fleet_only, NOW, None),
                Err(Refusal::PrivacyNotCountersigned),
                "{change}"
            );
        }
        let plain = signed(Kind::Desired, desired(1, json!({})), &[&k.fleet]);
        assert!(matches!(
            k.trust.check_desired(&plain, NOW, None),
            Ok(DesiredOutcome::Apply(_))
        ));
    }

    fn command(id: &str, extra: Value) -> Map<String, Value> {
        let mut doc = json!({
            "format": 1,
            "id": id,
            "target": {"gateway": "gw-1"},
            "name": "status",
            "expires_at_ms": NOW + HOUR,
        });
        merge_patch(&mut doc, &extra);
        match doc {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    #[test]
    fn a_signed_command_runs_once_and_is_refused_when_replayed() {
        let mut k = keyring();
        let bytes = signed(Kind::Command, command("c1", json!({})), &[&k.fleet]);
        let c = k.trust.accept_command(&bytes, NOW).unwrap();
        assert_eq!(c.name, crate::fleet::CommandName::Status);
        assert_eq!(
            k.trust.accept_command(&bytes, NOW),
            Err(Refusal::DuplicateCommand { id: "c1".into() })
        );
    }

    #[test]
    fn unsigned_wrongly_signed_expired_and_excess_commands_are_refused() {
        let mut k = keyring();
        let unsigned = serde_json::to_vec(&command("c1", json!({}))).unwrap();
        assert_eq!(
            k.trust.accept_command(&unsigned, NOW),
            Err(Refusal::Unsigned)
        );
        let stranger = signed(Kind::Command, command("c1", json!({})), &[&k.stranger]);
        assert_eq!(
            k.trust.accept_command(&stranger, NOW).unwrap_err().reason(),
            "untrusted_key"
        );
        let as_desired = signed(Kind::Desired, command("c1", json!({})), &[&k.fleet]);
        assert_eq!(
            k.trust
                .accept_command(&as_desired, NOW)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        let expired = signed(
            Kind::Command,
            command("c1", json!({"expires_at_ms": NOW - 1})),
            &[&k.fleet],
        );
        assert_eq!(
            k.trust.accept_command(&expired, NOW).unwrap_err().reason(),
            "expired"
        );
        let other = signed(
            Kind::Command,
            command("c1", json!({"target": {"gateway": "gw-2"}})),
            &[&k.fleet],
        );
        assert_eq!(
            k.trust.accept_command(&other, NOW).unwrap_err().reason(),
            "wrong_target"
        );
        // Nothing refused was remembered; two pass, the third is one too many
        // until the first two expire.
        for id in ["c1", "c2"] {
            let c = signed(Kind::Command, command(id, json!({})), &[&k.fleet]);
            k.trust.accept_command(&c, NOW).unwrap();
        }
        let c3 = signed(
            Kind::Command,
            command("c3", json!({"expires_at_ms": NOW + 3 * HOUR})),
            &[&k.fleet],
        );
        assert_eq!(
            k.trust.accept_command(&c3, NOW),
            Err(Refusal::TooManyCommands { max: 2 })
        );
        k.trust.accept_command(&c3, NOW + 2 * HOUR).unwrap();
    }

    #[test]
    fn every_reason_code_is_listed() {
        let all = [
            Refusal::TooLarge { size: 0, max: 0 },
            Refusal::Malformed(String::new()),
            Refusal::UnsupportedFormat { found: 0 },
            Refusal::WrongTarget {
                target: String::new(),
            },
            Refusal::Unsigned,
            Refusal::UntrustedKey { key_ids: vec![] },
            Refusal::BadSignature(String::new()),
            Refusal::ClockNotSet { now_ms: 0 },
            Refusal::Expired {
                expires_at_ms: 0,
                now_ms: 0,
            },
            Refusal::ValidityTooLong {
                expires_at_ms: 0,
                max_validity_s: 0,
            },
            Refusal::Replayed {
                target: String::new(),
                version: 0,
                applied: 0,
            },
            Refusal::DuplicateCommand { id: String::new() },
            Refusal::TooManyCommands { max: 0 },
            Refusal::PrivacyNotCountersigned,
            Refusal::Invalid(String::new()),
        ];
        let codes: Vec<&str> = all.iter().map(Refusal::reason).collect();
        assert_eq!(codes, Refusal::REASONS);
    }
}
