//! The privacy policy (`[privacy]`), in two stages.
//!
//! 1. **At ingest** ([`Privacy`]), on every reading before anything is
//!    windowed or stored (it waits raw only in the bounded in-memory channel
//!    from its source), in this order:
//!    - *allowlist*: attributes not in `allow_attrs` are dropped and counted;
//!    - *free text*: the whole value of each `free_text_attrs` attribute is
//!      replaced by `"[redacted]"`;
//!    - *redaction*: the built-in patterns in `redact` (`email`, `phone`,
//!      `ipv4`, `iban`) and the regular expressions in `redact_patterns` are
//!      cut out of every other string that passes (nested arrays and
//!      objects included, their keys as well as their values), each match
//!      replaced by `[redacted:<name>]`;
//!    - *pseudonymization*: the sensor id (`pseudonymize_sensor`) and the
//!      values of `pseudonymize_attrs` are replaced by keyed tokens,
//!      `p_` followed by the first 32 hex digits (128 bits) of
//!      HMAC-SHA256(key, field name ‖ 0x00 ‖ value); the field name is
//!      `sensor` for sensor ids and the attribute's name otherwise, so the same
//!      value gives different tokens in different fields. A pseudonymized value
//!      is not redacted first (nothing of it remains, and redacting it would
//!      make different identifiers share a token).
//! 2. **At release** ([`Release`]), on every aggregate after aggregation and
//!    before the outbox: k-anonymity, then differential privacy with its
//!    budget, then the aggregate is stamped with the policy (`policy.version`,
//!    `policy.key_id`, `policy.epsilon`) and its `id` recomputed. With
//!    differential privacy, aggregates wait for their window, which is then
//!    released for every declared group at once (empty groups with noised
//!    zero counts), and k-anonymity is decided on the noised counts.
//!
//! Between the two, [`Admission`] refuses (and counts) a reading whose
//! grouping attribute is an array or an object, and, with differential
//! privacy, one whose group is not declared.
//!
//! Raw readings never leave the process: only aggregates reach the outbox and
//! the uplink.
//!
//! # What is guaranteed, and what is not
//!
//! **Allowlist and redaction** are exact for what they describe: an attribute
//! not allowed never passes ingest. Redaction patterns are heuristics: the
//! built-in ones err on the side of removing (`phone` also removes any run of
//! seven or more digits, such as a serial number or a date written as
//! digits); they cannot recognise a name or an address in free text, which is
//! what `free_text_attrs` is for. Sensor ids are never redacted, only
//! pseudonymized.
//!
//! **Pseudonymization** is not anonymization. The same identifier always gives
//! the same token under one key, so a token links one subject's aggregates
//! over time; anyone holding the key can recompute the token of a guessed
//! identifier. Without the key a token reveals nothing (HMAC-SHA256 is a PRF);
//! no unkeyed hash of an identifier is made anywhere (the aggregate `id` is a
//! SHA-256 over the aggregate's content, which then holds tokens only). The
//! key: `<key id>:<hex secret of at least 32 bytes>` in a file (or an
//! environment variable, which cannot be rotated without a restart); the key
//! id (`[A-Za-z0-9_-]`, 1 to 32 characters) is carried in every aggregate as
//! `policy.key_id`. **Rotation without restart**: the file's size,
//! modification time and inode are checked at most once a second; a changed
//! file is read and its key used from the next reading on. Replace the file
//! atomically (write a new file, rename it over the old one). A file that
//! does not parse, or a new secret under the old key id, keeps the previous
//! key in use; the error is logged (never the secret) and counted. Tokens
//! change with the key: across a rotation the same subject appears under two
//! tokens (groups named by tokens are new groups), so a window that spans the
//! rotation can count one sensor twice, and `policy.key_id` names the key
//! current when the aggregate was released.
//!
//! **k-anonymity** (`[privacy.k_anonymity]`): the subjects of an aggregate
//! are its distinct sensors (`sensors`); this holds only where one sensor id
//! belongs to one person or object to protect (one wearable per patient, one
//! badge reader per operator). An aggregate with fewer than `min_subjects`
//! sensors or fewer than `min_readings` readings is suppressed and counted
//! (`action = "suppress"`), or held (`action = "merge"`): the group's next
//! windows are folded into it (`Aggregate::merge`, counts exact) until it
//! meets both thresholds, and it is released as one coarser window; once it
//! covers `max_merge_windows` windows and still does not, it is suppressed.
//! The distinct-sensor count of merged windows is the larger of the two (a
//! lower bound of the true union, never an over-count): merging therefore
//! helps a sparse group reach `min_readings`, and reaches `min_subjects`
//! only through a window that has that many sensors itself. Held aggregates
//! live in memory: at shutdown (and on a crash) they are suppressed. With
//! `aggregation.group_by = "sensor"` every aggregate has one sensor, so
//! `min_subjects > 1` would suppress everything (a configuration error).
//! k-anonymity limits re-identification from small groups; it does not
//! protect against what an attacker already knows about the other members.
//!
//! **Differential privacy** (`[privacy.differential_privacy]`): every count
//! of a released aggregate gets noise from the *discrete* Laplace
//! distribution (the two-sided geometric mechanism: the Laplace mechanism
//! for integers), drawn with exact integer arithmetic (Canonne, Kamath and
//! Steinke, 2020): `readings`, `late_readings`, `inferences`, `sensors`,
//! the per-class counts and `anomalies`. Noisy counts are clamped at 0 (and
//! `anomalies` at `inferences`), and `anomaly_rate` is recomputed from them;
//! this is post-processing and keeps the guarantee. Statistics that are not
//! counts are removed, since their sensitivity is unbounded: `score`, and
//! `models` (exact inferences per model), `shadow` (its exact `inferences`)
//! and `drift`, unless listed in `keep_exact`, which releases them exact and
//! unprotected.
//!
//! - *Unit of privacy*: event-level. Neighbouring inputs differ by one
//!   protected unit that adds or removes at most `sensitivity` (default 1)
//!   to each count of one aggregate (and, being within one sensor, at most 1
//!   to `sensors`). With the default, that is one reading (in `readings` or
//!   `late_readings`) or one inference window (in `inferences`, and in one
//!   class or `anomalies`). A reading also shifts the sliding windows of its
//!   sensor, which can change the outcome of several inferences: that is not
//!   covered unless `sensitivity` bounds it (e.g. the windows one reading
//!   takes part in). This is not user-level privacy: a person contributing
//!   many readings is protected only to the degree `sensitivity` covers them.
//! - *Epsilon per aggregate*: the `m` released statistics (`readings`,
//!   `late_readings`, `inferences`, `sensors`, plus the class histogram or
//!   `anomalies`: m = 5) share `epsilon` by basic composition: each gets
//!   `epsilon / m`, so its noise has scale `sensitivity · m / epsilon` (the
//!   class histogram counts as one statistic of L1 sensitivity `sensitivity`,
//!   since each inference falls in one class). The scale is rounded up to a
//!   multiple of 10⁻⁶, which only adds noise. Each released aggregate is
//!   `epsilon`-DP for its window; `policy.epsilon` says so.
//! - *Budget*: an accountant per group and period (`period_s`, periods
//!   aligned to the epoch, on event time) allows releases while the epsilon
//!   spent stays within `budget` (sequential composition: a unit whose data
//!   falls in one group and period loses at most `budget`). A window that
//!   spans periods is charged to each. When the next release would exceed the
//!   budget, the aggregate is suppressed and counted until the group's next
//!   period. The spend is written to `<state_dir>/privacy/budget.json`
//!   (temporary file, fsync, rename, directory fsync) *before* the aggregate
//!   is released, so a crash or restart cannot refund it; a failed write
//!   suppresses the aggregate. Periods more than 7 periods older than the
//!   newest are pruned from the file and then count as spent (late backfill
//!   of that age is suppressed). A budget file that cannot be read or parsed
//!   stops the start with an error: the spend is unknown, and releasing could
//!   exceed the budget. Restore it from a backup, or delete it to start all
//!   budgets afresh (which gives up the guarantee for the current periods).
//! - *Declared groups* (`groups`, required): whether an aggregate exists
//!   would tell when a group was active, whatever epsilon is. Every window
//!   is released for every declared group: aggregates wait (in memory)
//!   until the newest closed window of any group is `release_delay_ms` past
//!   their window's end, then the window goes out for every declared group,
//!   those without an aggregate as an empty one (zero counts, noised like
//!   any other; the class names and detector fields of the gateway's latest
//!   aggregate; the window's `partial` and `gap` flags). Which groups are
//!   released in a window therefore does not depend on the data. An
//!   aggregate of a window already released (its group closed it too late)
//!   is suppressed and counted (`late_window`); one of a group no longer
//!   declared (the policy changed, or the key rotated, while it waited) is
//!   suppressed and counted (`undeclared`). A silence of the whole gateway
//!   of 1440 windows or more is skipped, not
//!   filled. The release schedule follows the gateway's event time: a
//!   gateway with no reading at all releases nothing, so the cloud sees
//!   when the gateway as a whole had data, not which group.
//! - *k-anonymity under noise*: the thresholds are checked on the noised
//!   counts, after the epsilon is spent: the decision is post-processing,
//!   so P(released | one reading more) ≤ e^epsilon · P(released | without
//!   it). `merge` is refused (it would decide on exact counts).
//! - *Limits*: the guarantee composes over groups only if a unit belongs to
//!   one group (otherwise add the budgets of its groups), and resets each
//!   period: over many periods the loss adds up. A key rotation renames
//!   groups named by tokens, but the budget follows the subject: it is
//!   accounted under the group's declared name (which never leaves the
//!   gateway; the budget file holds it), not its token, so a rotation gives
//!   no fresh budget. Without differential privacy the
//!   k-anonymity decision is made on true counts, so whether an aggregate
//!   is released at all leaks a little about them (around the thresholds);
//!   with `merge`, the width of a released window does too. Fields kept by
//!   `keep_exact` (and whether they are present: `score` only with
//!   inferences), the group name, the window and `partial` are not noised.
//!   The noise comes from a cryptographically secure generator (ChaCha12,
//!   `rand`'s `StdRng`, seeded from the operating system at start); the
//!   discrete sampler has no floating-point rounding in its output, which
//!   avoids the attacks on textbook floating-point Laplace samplers
//!   (Mironov 2012); epsilon itself is a float, and the scale derived from it
//!   is rounded up.

mod config;
pub use config::{
    BuiltinPattern, DifferentialPrivacyConfig, ExactField, KAnonymityAction, KAnonymityConfig,
    PrivacyConfig,
};

mod budget;
mod key;
mod noise;
mod redact;
mod release;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::Value;

use crate::ingest::reading::Reading;

/// The release stage's task.
pub use release::spawn as spawn_release;
pub use release::{Release, ReleaseStats, ReleaseUpdate};

pub(crate) use redact::compile_pattern;

/// Smallest `differential_privacy.epsilon` accepted.
pub(crate) const MIN_EPSILON: f64 = 1e-6;
/// Largest `differential_privacy.sensitivity` accepted.
pub(crate) const MAX_SENSITIVITY: u64 = 1_000_000;
/// Longest `differential_privacy.period_s` accepted (ten years).
pub(crate) const MAX_PERIOD_S: u64 = 315_360_000;

/// Errors of the privacy stages.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// Something is pseudonymized but `privacy.key` is not set.
    #[error("privacy.key is required when identifiers are pseudonymized")]
    MissingKey,
    /// The key could not be read (the message names the source, never the value).
    #[error("pseudonymization key: {0}")]
    KeyRead(String),
    /// The key does not have the form `<key id>:<hex secret>`.
    #[error("pseudonymization key from {origin}: {reason}")]
    KeyFormat {
        /// Where it was read from.
        origin: String,
        /// What is wrong (never the secret).
        reason: String,
    },
    /// A redaction pattern does not compile.
    #[error("privacy.redact_patterns.{name}: {reason}")]
    Pattern {
        /// The pattern's name.
        name: String,
        /// The compiler's message.
        reason: String,
    },
    /// A setting is out of range (when the config was not checked).
    #[error("{path}: {reason}")]
    InvalidConfig {
        /// The setting.
        path: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The budget file could not be read or written.
    #[error("privacy budget file {path}: {error}")]
    BudgetIo {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// The budget file does not parse: the epsilon spent so far is unknown.
    #[error(
        "privacy budget file {path} is damaged ({reason}): the privacy budget spent so far is unknown, \
         so no aggregate is released with it; restore the file from a backup, or delete it to start \
         every group's budget afresh (this gives up the guarantee for the current periods)"
    )]
    BudgetCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The operating system's random number generator failed.
    #[error("cannot seed the noise generator from the operating system: {0}")]
    Rng(String),
}

/// The id of the pseudonymization key in use, shared between the ingest
/// stage (which changes it on rotation) and the release stage (which stamps
/// it on aggregates). Cheap to clone.
///
/// It also carries the names under which the declared groups
/// (`differential_privacy.groups`) are released: tokens when the grouping
/// field is pseudonymized, so they change with the key.
#[derive(Debug, Clone, Default)]
pub struct KeyIdHandle(
    Arc<RwLock<Option<String>>>,
    Arc<RwLock<Option<DeclaredNames>>>,
);

/// The declared groups: each released name (its token when pseudonymized)
/// with the name it is declared under, which the privacy budget is
/// accounted under (stable across key rotations; it never leaves the
/// gateway).
pub type DeclaredNames = Arc<std::collections::BTreeMap<String, String>>;

impl KeyIdHandle {
    /// A handle holding `id`.
    pub fn new(id: Option<String>) -> Self {
        Self(Arc::new(RwLock::new(id)), Arc::default())
    }

    /// The current key id (`None`: nothing is pseudonymized).
    pub fn get(&self) -> Option<String> {
        // A poisoned lock still holds a valid `Option<String>`.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, id: Option<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// The names the declared groups are released under, as the ingest
    /// stage computed them (`None`: not computed; the release stage then
    /// takes the names of its configuration).
    pub fn declared(&self) -> Option<DeclaredNames> {
        self.1.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Set the released names of the declared groups.
    pub fn set_declared(&self, names: Option<DeclaredNames>) {
        *self.1.write().unwrap_or_else(|e| e.into_inner()) = names;
    }
}

/// What [`Privacy::apply`] did to one reading.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Attributes dropped by the allowlist.
    pub attrs_dropped: u64,
    /// Identifiers (sensor id, attribute values) replaced by tokens.
    pub pseudonymized: u64,
    /// Pattern matches cut out of string values.
    pub redactions: u64,
    /// Free-text values replaced whole.
    pub free_text: u64,
    /// The key file changed and its new key is in use.
    pub key_reloads: u64,
    /// The key file changed but could not be used; the previous key stays.
    pub key_reload_failures: u64,
}

impl ApplyStats {
    /// Add `other` to these counts.
    pub fn add(&mut self, other: &ApplyStats) {
        self.attrs_dropped += other.attrs_dropped;
        self.pseudonymized += other.pseudonymized;
        self.redactions += other.redactions;
        self.free_text += other.free_text;
        self.key_reloads += other.key_reloads;
        self.key_reload_failures += other.key_reload_failures;
    }
}

/// Most sensor tokens kept in the cache (it is emptied when full).
const SENSOR_CACHE_MAX: usize = 65_536;

/// The ingest stage of the policy; see the module documentation.
pub struct Privacy {
    allow: BTreeSet<String>,
    free_text: BTreeSet<String>,
    pseudonymize_attrs: BTreeSet<String>,
    pseudonymize_sensor: bool,
    redactor: redact::Redactor,
    key: Option<key::KeyState>,
    key_id: KeyIdHandle,
    sensor_tokens: HashMap<Arc<str>, Arc<str>>,
    /// `differential_privacy.groups`, when differential privacy is on.
    declared: Option<Vec<String>>,
}

impl std::fmt::Debug for Privacy {
    /// The policy, the key id and the number of cached sensor tokens; never
    /// the key, and never a sensor id with its token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Privacy")
            .field("allow", &self.allow)
            .field("free_text", &self.free_text)
            .field("pseudonymize_attrs", &self.pseudonymize_attrs)
            .field("pseudonymize_sensor", &self.pseudonymize_sensor)
            .field("redactor", &self.redactor)
            .field("key_id", &self.key_id())
            .field("sensor_tokens_cached", &self.sensor_tokens.len())
            .finish()
    }
}

/// Replacement of a free-text value.
pub const FREE_TEXT_REDACTED: &str = "[redacted]";

impl Privacy {
    /// The stage for `cfg`; reads the key when anything is pseudonymized.
    pub fn new(cfg: &PrivacyConfig) -> Result<Privacy, PrivacyError> {
        let pseudonymizes = cfg.pseudonymize_sensor || !cfg.pseudonymize_attrs.is_empty();
        let key = if pseudonymizes {
            let source = cfg.key.as_ref().ok_or(PrivacyError::MissingKey)?;
            Some(key::KeyState::load(source)?)
        } else {
            None
        };
        let key_id = KeyIdHandle::new(key.as_ref().map(|k| k.key().id().to_string()));
        Ok(Self {
            allow: cfg.allow_attrs.iter().cloned().collect(),
            free_text: cfg.free_text_attrs.iter().cloned().collect(),
            pseudonymize_attrs: cfg.pseudonymize_attrs.iter().cloned().collect(),
            pseudonymize_sensor: cfg.pseudonymize_sensor,
            redactor: redact::Redactor::new(&cfg.redact, &cfg.redact_patterns)?,
            key,
            key_id,
            sensor_tokens: HashMap::new(),
            declared: cfg.differential_privacy.as_ref().map(|d| d.groups.clone()),
        })
    }

    /// The id of the key in use; `None` when nothing is pseudonymized.
    pub fn key_id(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.key().id().to_string())
    }

    /// The token of `value` in `field` under the current key; `None` when
    /// nothing is pseudonymized.
    pub fn token(&self, field: &str, value: &str) -> Option<String> {
        self.key.as_ref().map(|k| k.key().token(field, value))
    }

    /// Whether the sensor id is pseudonymized.
    pub fn pseudonymizes_sensor(&self) -> bool {
        self.pseudonymize_sensor && self.key.is_some()
    }

    /// Whether the values of attribute `name` are pseudonymized.
    pub fn pseudonymizes_attr(&self, name: &str) -> bool {
        self.pseudonymize_attrs.contains(name) && self.key.is_some()
    }

    /// A handle on the current key id for the release stage, which runs on
    /// another task.
    pub fn key_id_handle(&self) -> KeyIdHandle {
        self.key_id.clone()
    }

    /// Apply the policy to one reading, now.
    pub fn apply(&mut self, r: Reading) -> (Reading, ApplyStats) {
        self.apply_at(r, Instant::now())
    }

    /// [`Privacy::apply`] with the clock given: the key file is checked for a
    /// new key at most once a second of `now`.
    pub fn apply_at(&mut self, mut r: Reading, now: Instant) -> (Reading, ApplyStats) {
        let mut stats = ApplyStats::default();
        self.reload_key_if_changed(now, &mut stats);

        let before = r.attrs.len();
        r.attrs.retain(|k, _| self.allow.contains(k));
        stats.attrs_dropped = (before - r.attrs.len()) as u64;

        for (name, value) in r.attrs.iter_mut() {
            if self.free_text.contains(name) {
                if !value.is_null() {
                    *value = Value::String(FREE_TEXT_REDACTED.to_string());
                    stats.free_text += 1;
                }
            } else if !self.pseudonymize_attrs.contains(name) && !self.redactor.is_empty() {
                stats.redactions += self.redactor.redact_value(value);
            }
        }

        if let Some(k) = &self.key {
            let key = k.key();
            for (name, value) in r.attrs.iter_mut() {
                if !self.pseudonymize_attrs.contains(name) || value.is_null() {
                    continue;
                }
                let token = match &*value {
                    Value::String(s) => key.token(name, s),
                    other => key.token(name, &other.to_string()),
                };
                *value = Value::String(token);
                stats.pseudonymized += 1;
            }
            if self.pseudonymize_sensor {
                let token = match self.sensor_tokens.get(&r.sensor) {
                    Some(t) => t.clone(),
                    None => {
                        if self.sensor_tokens.len() >= SENSOR_CACHE_MAX {
                            self.sensor_tokens.clear();
                        }
                        let t: Arc<str> = Arc::from(key.token("sensor", &r.sensor));
                        self.sensor_tokens.insert(r.sensor.clone(), t.clone());
                        t
                    }
                };
                r.sensor = token;
                stats.pseudonymized += 1;
            }
        }
        (r, stats)
    }

    /// Check the key file (at most once a second of `now`) and switch to its
    /// key when it changed; a file that cannot be used keeps the previous
    /// key, and the failure is logged (never the secret) and counted.
    pub fn reload_key_if_changed(&mut self, now: Instant, stats: &mut ApplyStats) {
        let Some(k) = self.key.as_mut() else { return };
        match k.check(now) {
            key::Reload::Unchanged => {}
            key::Reload::Changed { previous } => {
                let id = k.key().id().to_string();
                tracing::info!(key_id = %id, previous_key_id = %previous, "pseudonymization key reloaded");
                self.key_id.set(Some(id));
                self.sensor_tokens.clear();
                stats.key_reloads += 1;
            }
            key::Reload::Failed(error) => {
                tracing::error!(
                    %error,
                    key_id = %k.key().id(),
                    "the pseudonymization key file changed but cannot be used; the previous key stays in use"
                );
                stats.key_reload_failures += 1;
            }
        }
    }
}

/// The privacy stage as the windowing stage runs it, reading by reading:
/// the group is taken (a fixed group names the sensor as configured, before
/// its id is pseudonymized), the policy applied, and what it did counted;
/// a key rotation goes to the audit log. A reading is refused (and counted in
/// `outpost_rejected_total{source="privacy"}`) when the attribute it is
/// grouped by is an array or an object (`group_not_scalar`: a group name is
/// one value, never a structure whose keys could carry personal data), or
/// when differential privacy is on and its group is not declared
/// (`undeclared_group`).
pub struct Admission {
    privacy: Privacy,
    grouper: crate::aggregate::Grouper,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    audit: Option<crate::governance::SharedAudit>,
    /// `differential_privacy.groups` as configured.
    declared: Option<Vec<String>>,
    /// Their released names under the current key.
    released: Option<DeclaredNames>,
}

/// Why [`Admission::admit`] refused a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The grouping attribute holds an array or an object.
    GroupNotScalar,
    /// Differential privacy is on and the reading's group is not declared.
    UndeclaredGroup,
}

impl Refusal {
    /// Its `reason` label in `outpost_rejected_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::GroupNotScalar => "group_not_scalar",
            Refusal::UndeclaredGroup => "undeclared_group",
        }
    }
}

/// The names the declared groups are released under: a declared name that
/// is a fixed group (`aggregation.groups`) stays as it is; otherwise, when
/// the field the rule groups by is pseudonymized, its token.
pub fn released_names(
    declared: &[String],
    privacy: &Privacy,
    grouper: &crate::aggregate::Grouper,
) -> std::collections::BTreeMap<String, String> {
    use crate::aggregate::GroupBy;
    declared
        .iter()
        .map(|name| {
            if grouper.is_fixed_name(name) {
                return (name.clone(), name.clone());
            }
            let token = match grouper.rule() {
                GroupBy::Sensor if privacy.pseudonymizes_sensor() => privacy.token("sensor", name),
                GroupBy::Attr(a) if privacy.pseudonymizes_attr(a) => privacy.token(a, name),
                _ => None,
            };
            (token.unwrap_or_else(|| name.clone()), name.clone())
        })
        .collect()
}

impl Admission {
    /// The stage for `privacy`, grouping with `grouper`; with differential
    /// privacy, the released names of the declared groups are published on
    /// the privacy's [`KeyIdHandle`] for the release stage.
    pub fn new(
        privacy: Privacy,
        grouper: crate::aggregate::Grouper,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        audit: Option<crate::governance::SharedAudit>,
    ) -> Self {
        let declared = privacy.declared.clone();
        let mut a = Self {
            privacy,
            grouper,
            metrics,
            audit,
            declared,
            released: None,
        };
        a.refresh_declared();
        a
    }

    fn refresh_declared(&mut self) {
        self.released = self
            .declared
            .as_ref()
            .map(|d| Arc::new(released_names(d, &self.privacy, &self.grouper)));
        self.privacy.key_id.set_declared(self.released.clone());
    }

    /// The reading as it may be kept, and its group; or why it is refused
    /// (counted here; the caller settles its journal entry).
    pub fn admit(&mut self, r: Reading) -> Result<(Reading, std::sync::Arc<str>), Refusal> {
        let fixed = self.grouper.fixed_group(&r.sensor);
        if fixed.is_none()
            && let crate::aggregate::GroupBy::Attr(a) = self.grouper.rule()
            && matches!(r.attrs.get(a), Some(Value::Array(_) | Value::Object(_)))
        {
            return Err(self.refuse(Refusal::GroupNotScalar));
        }
        let (r, s) = self.privacy.apply(r);
        self.count(&s);
        if s.key_reloads > 0 {
            self.refresh_declared();
            crate::governance::audit(
                &self.audit,
                &self.metrics,
                &[(
                    crate::audit::kinds::PRIVACY_KEY_ROTATED,
                    serde_json::json!({ "key_id": self.privacy.key_id() }),
                )],
            );
        }
        let group = fixed.unwrap_or_else(|| self.grouper.group_of(&r));
        if let Some(names) = &self.released
            && !names.contains_key(&*group)
        {
            return Err(self.refuse(Refusal::UndeclaredGroup));
        }
        Ok((r, group))
    }

    fn refuse(&self, why: Refusal) -> Refusal {
        // Never the value or the group: either may be personal.
        tracing::debug!(
            reason = why.as_str(),
            "reading refused by the privacy policy"
        );
        self.metrics.reject("privacy", why.as_str());
        why
    }

    fn count(&self, s: &ApplyStats) {
        if *s == ApplyStats::default() {
            return;
        }
        let m = &self.metrics;
        m.attrs_dropped.inc_by(s.attrs_dropped);
        m.privacy_pseudonymized.inc_by(s.pseudonymized);
        m.privacy_redactions.inc_by(s.redactions + s.free_text);
        m.privacy_key_rotations.inc_by(s.key_reloads);
        m.privacy_key_errors.inc_by(s.key_reload_failures);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    use std::time::Duration;

    const SECRET_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const SECRET_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn reading(sensor: &str, attrs: serde_json::Value) -> Reading {
        Reading {
            sensor: Arc::from(sensor),
            ts_ms: 1,
            values: vec![1.0],
            attrs: attrs
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            seq: 0,
            ack: None,
        }
    }

    /// The token computed here from the definition, with the hmac crate.
    fn expected_token(secret_hex: &str, field: &str, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&hex::decode(secret_hex).unwrap()).unwrap();
        mac.update(field.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        let out = mac.finalize().into_bytes();
        format!("p_{}", &hex::encode(out)[..32])
    }

    fn key_file(dir: &std::path::Path, content: &str) -> PathBuf {
        let p = dir.join("pseudonym.key");
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Replace the key file the recommended way: a new file renamed over it.
    fn rotate(path: &std::path::Path, content: &str) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn pseudonymizing(path: &std::path::Path) -> PrivacyConfig {
        PrivacyConfig {
            allow_attrs: vec!["line".into(), "patient".into()],
            pseudonymize_sensor: true,
            pseudonymize_attrs: vec!["patient".into()],
            key: Some(SecretSource {
                file: Some(path.to_path_buf()),
                env: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_allowed_attributes_pass() {
        let mut p = Privacy::new(&PrivacyConfig {
            allow_attrs: vec!["line".into()],
            ..Default::default()
        })
        .unwrap();
        let (r, stats) = p.apply(reading(
            "s",
            serde_json::json!({"line": "A", "patient": "Jane Doe", "ward": 3}),
        ));
        assert_eq!(stats.attrs_dropped, 2);
        assert_eq!(r.attrs.keys().collect::<Vec<_>>(), vec!["line"]);
        assert_eq!(r.attrs["line"], "A");
        assert_eq!(&*r.sensor, "s", "sensor ids pass unless pseudonymized");
        assert_eq!(p.key_id(), None);
    }

    #[test]
    fn pseudonymization_known_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), &format!("k1:{SECRET_A}\n"));
        let mut p = Privacy::new(&pseudonymizing(&path)).unwrap();
        assert_eq!(p.key_id().as_deref(), Some("k1"));
        assert_eq!(p.key_id_handle().get().as_deref(), Some("k1"));
        let (r, stats) = p.apply(reading(
            "wearable-17",
            serde_json::json!({"line": "A", "patient": "MRN-0042"}),
        ));
        assert_eq!(stats.pseudonymized, 2);
        assert_eq!(
            &*r.sensor,
            expected_token(SECRET_A, "sensor", "wearable-17")
        );
        assert_eq!(
            r.attrs["patient"],
            expected_token(SECRET_A, "patient", "MRN-0042")
        );
        assert_eq!(r.attrs["line"], "A", "other attributes keep their values");
        let token = r.sensor.to_string();
        assert_eq!(token.len(), 34);
        // Deterministic under one key (the cache and the computation agree).
        let (again, _) = p.apply(reading("wearable-17", serde_json::json!({})));
        assert_eq!(&*again.sensor, token);
        // Domain separation: the same value in another field, another token.
        let (r2, _) = p.apply(reading(
            "MRN-0042",
            serde_json::json!({"patient": "MRN-0042"}),
        ));
        assert_ne!(r2.sensor.as_ref(), r2.attrs["patient"].as_str().unwrap());
        // Non-string values are tokenized through their JSON text.
        let (r3, _) = p.apply(reading("x", serde_json::json!({"patient": 42})));
        assert_eq!(
            r3.attrs["patient"],
            expected_token(SECRET_A, "patient", "42")
        );
        // Another key, other tokens.
        let path_b = dir.path().join("b.key");
        std::fs::write(&path_b, format!("k2:{SECRET_B}")).unwrap();
        let mut q = Privacy::new(&pseudonymizing(&path_b)).unwrap();
        let (rb, _) = q.apply(reading("wearable-17", serde_json::json!({})));
        assert_eq!(
            &*rb.sensor,
            expected_token(SECRET_B, "sensor", "wearable-17")
        );
        assert_ne!(&*rb.sensor, token);
    }

    #[test]
    fn key_rotates_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), &format!("k1:{SECRET_A}"));
        let mut p = Privacy::new(&pseudonymizing(&path)).unwrap();
        let handle = p.key_id_handle();
        let t0 = Instant::now();
        let (r, stats) = p.apply_at(reading("s1", serde_json::json!({})), t0);
        assert_eq!(stats.key_reloads, 0);
        assert_eq!(&*r.sensor, expected_token(SECRET_A, "sensor", "s1"));

        rotate(&path, &format!("k2:{SECRET_B}"));
        // Within the second: the file is not looked at yet.
        let (r, _) = p.apply_at(
            reading("s1", serde_json::json!({})),
            t0 + Duration::from_millis(500),
        );
        assert_eq!(&*r.sensor, expected_token(SECRET_A, "sensor", "s1"));
        assert_eq!(p.key_id().as_deref(), Some("k1"));

        let (r, stats) = p.apply_at(
            reading("s1", serde_json::json!({})),
            t0 + Duration::from_millis(1000),
        );
        assert_eq!(stats.key_reloads, 1);
        assert_eq!(&*r.sensor, expected_token(SECRET_B, "sensor", "s1"));
        assert_eq!(p.key_id().as_deref(), Some("k2"));
        assert_eq!(
            handle.get().as_deref(),
            Some("k2"),
            "the shared handle follows"
        );

        // Rewritten in place (another size) works too; an unchanged file is not reloaded.
        let (_, stats) = p.apply_at(
            reading("s1", serde_json::json!({})),
            t0 + Duration::from_millis(2500),
        );
        assert_eq!(stats.key_reloads, 0);
        std::fs::write(&path, format!("key-three:{SECRET_A}\n")).unwrap();
        let (r, stats) = p.apply_at(
            reading("s1", serde_json::json!({})),
            t0 + Duration::from_millis(3600),
        );
        assert_eq!(stats.key_reloads, 1);
        assert_eq!(p.key_id().as_deref(), Some("key-three"));
        assert_eq!(&*r.sensor, expected_token(SECRET_A, "sensor", "s1"));
    }

    #[test]
    fn a_broken_key_file_keeps_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), &format!("k1:{SECRET_A}"));
        let mut p = Privacy::new(&pseudonymizing(&path)).unwrap();
        let t0 = Instant::now();
        p.apply_at(reading("s1", serde_json::json!({})), t0);
        let mut now = t0;
        for (i, broken) in [
            "k2 without a colon".to_string(),
            format!("k2:{}", &SECRET_B[..40]), // 20 bytes: too short
            format!("k2:{}zz", &SECRET_B[..62]), // not hex
            format!("bad id!:{SECRET_B}"),     // key id charset
            format!("k1:{SECRET_B}"),          // new secret, old id
            String::new(),
        ]
        .iter()
        .enumerate()
        {
            rotate(&path, broken);
            now += Duration::from_secs(1);
            let (r, stats) = p.apply_at(reading("s1", serde_json::json!({})), now);
            assert_eq!(stats.key_reload_failures, 1, "case {i}");
            assert_eq!(stats.key_reloads, 0, "case {i}");
            assert_eq!(
                &*r.sensor,
                expected_token(SECRET_A, "sensor", "s1"),
                "case {i}"
            );
            assert_eq!(p.key_id().as_deref(), Some("k1"));
            // The failure is reported once, not at every check.
            now += Duration::from_secs(1);
            let (_, stats) = p.apply_at(reading("s1", serde_json::json!({})), now);
            assert_eq!(stats.key_reload_failures, 0, "case {i}");
        }
        // A missing file, too.
        std::fs::remove_file(&path).unwrap();
        now += Duration::from_secs(1);
        let (r, stats) = p.apply_at(reading("s1", serde_json::json!({})), now);
        assert_eq!(stats.key_reload_failures, 1);
        assert_eq!(&*r.sensor, expected_token(SECRET_A, "sensor", "s1"));
        // A good file again: taken.
        rotate(&path, &format!("k2:{SECRET_B}"));
        now += Duration::from_secs(1);
        let (r, stats) = p.apply_at(reading("s1", serde_json::json!({})), now);
        assert_eq!(stats.key_reloads, 1);
        assert_eq!(&*r.sensor, expected_token(SECRET_B, "sensor", "s1"));
    }

    #[test]
    fn a_bad_key_at_start_is_an_error_without_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), &format!("k1:{}", &SECRET_A[..60]));
        let err = Privacy::new(&pseudonymizing(&path)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("at least 32 bytes"), "{text}");
        assert!(!text.contains(&SECRET_A[..60]), "{text}");
        let mut cfg = pseudonymizing(&path);
        cfg.key = None;
        assert!(matches!(
            Privacy::new(&cfg).unwrap_err(),
            PrivacyError::MissingKey
        ));
        cfg.key = Some(SecretSource {
            file: Some(dir.path().join("missing")),
            env: None,
        });
        assert!(matches!(
            Privacy::new(&cfg).unwrap_err(),
            PrivacyError::KeyRead(_)
        ));
        // Debug never shows the secret.
        let path = key_file(dir.path(), &format!("k1:{SECRET_A}"));
        let mut p = Privacy::new(&pseudonymizing(&path)).unwrap();
        p.apply(reading("wearable-17", serde_json::json!({})));
        let debug = format!("{p:?}");
        assert!(!debug.contains("wearable-17"), "{debug}");
        assert!(debug.contains("k1"), "{debug}");
        assert!(
            !debug.contains(SECRET_A) && !debug.contains("0, 1, 2, 3"),
            "{debug}"
        );
    }

    #[test]
    fn redaction_of_patterns_and_free_text() {
        let mut p = Privacy::new(&PrivacyConfig {
            allow_attrs: vec![
                "comment".into(),
                "note".into(),
                "contact".into(),
                "tags".into(),
                "count".into(),
            ],
            redact: vec![
                crate::privacy::BuiltinPattern::Email,
                crate::privacy::BuiltinPattern::Phone,
                crate::privacy::BuiltinPattern::Ipv4,
                crate::privacy::BuiltinPattern::Iban,
            ],
            redact_patterns: [("badge".to_string(), "B-[0-9]{6}".to_string())].into(),
            free_text_attrs: vec!["note".into()],
            ..Default::default()
        })
        .unwrap();
        let (r, stats) = p.apply(reading(
            "s",
            serde_json::json!({
                "comment": "call jane.doe@example.org or +41 44 668 18 00, badge B-123456, host 192.168.1.20, IBAN DE89370400440532013000 ok",
                "note": "Patient Jane Doe complained about pain",
                "contact": "(044) 668-1800",
                "tags": ["x", {"who": "bob@example.com"}],
                "count": 7,
                "dropped": "a@b.cc"
            }),
        ));
        assert_eq!(
            r.attrs["comment"],
            "call [redacted:email] or [redacted:phone], badge [redacted:badge], host [redacted:ipv4], IBAN [redacted:iban] ok"
        );
        assert_eq!(r.attrs["note"], FREE_TEXT_REDACTED);
        assert_eq!(r.attrs["contact"], "[redacted:phone]");
        assert_eq!(
            r.attrs["tags"],
            serde_json::json!(["x", {"who": "[redacted:email]"}])
        );
        assert_eq!(r.attrs["count"], 7, "numbers are not redacted");
        assert!(!r.attrs.contains_key("dropped"));
        assert_eq!(stats.redactions, 7);
        assert_eq!(stats.free_text, 1);
        assert_eq!(stats.attrs_dropped, 1);
        // Nothing to redact: the value is unchanged and nothing counted.
        let (r, stats) = p.apply(reading("s", serde_json::json!({"comment": "line A ok"})));
        assert_eq!(r.attrs["comment"], "line A ok");
        assert_eq!(stats.redactions, 0);
    }

    #[test]
    fn admission_refuses_structured_group_values_and_undeclared_groups() {
        use crate::aggregate::{AggregationConfig, GroupBy, Grouper};
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), &format!("k1:{SECRET_A}"));
        let mut cfg = pseudonymizing(&path);
        cfg.redact = vec![crate::privacy::BuiltinPattern::Email];
        cfg.differential_privacy = Some(crate::privacy::DifferentialPrivacyConfig {
            epsilon: 1.0,
            budget: 100.0,
            period_s: 86_400,
            sensitivity: 1,
            keep_exact: vec![],
            groups: vec!["MRN-1".into(), "MRN-2".into(), "ward-a".into()],
            release_delay_ms: 0,
        });
        let privacy = Privacy::new(&cfg).unwrap();
        let handle = privacy.key_id_handle();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let agg_cfg = AggregationConfig {
            group_by: GroupBy::Attr("patient".into()),
            groups: [("fixed-sensor".to_string(), "ward-a".to_string())].into(),
            ..Default::default()
        };
        let mut a = Admission::new(privacy, Grouper::new(&agg_cfg, "gw"), metrics.clone(), None);
        // The declared names as released: tokens, the fixed group as it is.
        let names = handle.declared().unwrap();
        let want: std::collections::BTreeMap<String, String> = [
            (expected_token(SECRET_A, "patient", "MRN-1"), "MRN-1".into()),
            (expected_token(SECRET_A, "patient", "MRN-2"), "MRN-2".into()),
            ("ward-a".to_string(), "ward-a".into()),
        ]
        .into();
        assert_eq!(*names, want);
        let (_, g) = a
            .admit(reading("s1", serde_json::json!({"patient": "MRN-1"})))
            .unwrap();
        assert_eq!(&*g, expected_token(SECRET_A, "patient", "MRN-1"));
        let (_, g) = a
            .admit(reading("fixed-sensor", serde_json::json!({})))
            .unwrap();
        assert_eq!(&*g, "ward-a");
        assert_eq!(
            a.admit(reading("s1", serde_json::json!({"patient": "MRN-9"})))
                .unwrap_err(),
            Refusal::UndeclaredGroup
        );
        // An object or an array never names a group, whatever its keys hold.
        for v in [
            serde_json::json!({"patient": {"jane.doe@example.org": 1}}),
            serde_json::json!({"patient": ["MRN-1"]}),
        ] {
            assert_eq!(
                a.admit(reading("s1", v)).unwrap_err(),
                Refusal::GroupNotScalar
            );
        }
        assert_eq!(metrics.rejected_total("group_not_scalar"), 2);
        assert_eq!(metrics.rejected_total("undeclared_group"), 1);
        // The grouper on its own: a structure is `unassigned`, never its text.
        let g = Grouper::new(&agg_cfg, "gw");
        let structured = reading("s", serde_json::json!({"patient": {"a@b.cc": 1}}));
        assert_eq!(&*g.group_of(&structured), "unassigned");
    }

    #[test]
    fn pseudonymized_values_are_not_redacted_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), &format!("k1:{SECRET_A}"));
        let mut cfg = pseudonymizing(&path);
        cfg.redact = vec![crate::privacy::BuiltinPattern::Email];
        let mut p = Privacy::new(&cfg).unwrap();
        let (a, _) = p.apply(reading(
            "s",
            serde_json::json!({"patient": "a@example.org"}),
        ));
        let (b, _) = p.apply(reading(
            "s",
            serde_json::json!({"patient": "b@example.org"}),
        ));
        assert_eq!(
            a.attrs["patient"],
            expected_token(SECRET_A, "patient", "a@example.org")
        );
        assert_ne!(a.attrs["patient"], b.attrs["patient"]);
    }
}
