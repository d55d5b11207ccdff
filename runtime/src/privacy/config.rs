//! `[privacy]`: the privacy policy, applied at ingest (allowlist,
//! pseudonymization, redaction) and at release (k-anonymity, differential
//! privacy).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::check::Collector;
use crate::secret::SecretSource;

/// `[privacy]`: the policy applied to every reading at ingest and to every
/// aggregate before it is queued. The guarantees and their limits are
/// documented in `runtime/src/privacy.rs`. The defaults keep the allowlist
/// only.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Version of this policy, carried in every aggregate (`policy.version`).
    pub policy_version: String,
    /// Attributes allowed past ingest; all others are dropped and counted.
    pub allow_attrs: Vec<String>,
    /// Replace every sensor id by a keyed token (`p_` and 32 hex digits).
    pub pseudonymize_sensor: bool,
    /// Attributes, each also in `allow_attrs`, whose values are replaced by
    /// keyed tokens.
    pub pseudonymize_attrs: Vec<String>,
    /// The pseudonymization key, `<key id>:<hex secret of at least 32
    /// bytes>`, from a file (reloaded when it changes, no restart) or an
    /// environment variable; required when anything is pseudonymized.
    pub key: Option<SecretSource>,
    /// Built-in patterns cut out of every string attribute value that
    /// passes: `email`, `phone`, `ipv4`, `iban`.
    pub redact: Vec<BuiltinPattern>,
    /// Named regular expressions cut out likewise, e.g. `{ badge = "B-[0-9]{6}" }`.
    pub redact_patterns: BTreeMap<String, String>,
    /// Attributes (each also in `allow_attrs`) whose whole value is
    /// replaced by `"[redacted]"`.
    pub free_text_attrs: Vec<String>,
    /// k-anonymity of released aggregates; absent: off.
    pub k_anonymity: Option<KAnonymityConfig>,
    /// Differential privacy of released counts; absent: off.
    pub differential_privacy: Option<DifferentialPrivacyConfig>,
    /// Public key files (`ed25519-public <hex>`) of those who may change
    /// this policy remotely: a fleet document that changes `[privacy]` must
    /// also be signed by one of them (docs/fleet.md). Empty: no remote
    /// change of the policy is ever applied.
    pub trusted_keys: Vec<std::path::PathBuf>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            policy_version: "1".into(),
            allow_attrs: Vec::new(),
            pseudonymize_sensor: false,
            pseudonymize_attrs: Vec::new(),
            key: None,
            redact: Vec::new(),
            redact_patterns: BTreeMap::new(),
            free_text_attrs: Vec::new(),
            k_anonymity: None,
            differential_privacy: None,
            trusted_keys: Vec::new(),
        }
    }
}

/// A built-in redaction pattern (`privacy.redact`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinPattern {
    /// E-mail addresses.
    Email,
    /// Phone numbers: a `+` or a digit and at least six more digits with
    /// single separators (also removes other long digit runs).
    Phone,
    /// IPv4 addresses.
    Ipv4,
    /// IBANs (bank account numbers).
    Iban,
}

impl BuiltinPattern {
    /// Its name in the configuration and in `[redacted:<name>]`.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinPattern::Email => "email",
            BuiltinPattern::Phone => "phone",
            BuiltinPattern::Ipv4 => "ipv4",
            BuiltinPattern::Iban => "iban",
        }
    }
}

/// What happens to an aggregate below the k-anonymity thresholds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KAnonymityAction {
    /// It is dropped and counted.
    #[default]
    Suppress,
    /// It is held and the group's next windows are folded into it until the
    /// thresholds are met, or suppressed after `max_merge_windows` windows.
    Merge,
}

/// `[privacy.k_anonymity]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KAnonymityConfig {
    /// k: fewest distinct subjects (sensors) in a released aggregate.
    pub min_subjects: u64,
    /// Fewest readings in a released aggregate.
    #[serde(default = "default_privacy_min_readings")]
    pub min_readings: u64,
    /// `suppress` (default) or `merge`.
    #[serde(default)]
    pub action: KAnonymityAction,
    /// `merge`: most windows one released aggregate may cover.
    #[serde(default = "default_privacy_max_merge_windows")]
    pub max_merge_windows: u32,
}

fn default_privacy_min_readings() -> u64 {
    1
}

fn default_privacy_max_merge_windows() -> u32 {
    6
}

/// An exact, non-count field of an aggregate that differential privacy
/// would remove (`privacy.differential_privacy.keep_exact`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExactField {
    /// `score` (mean, max, p95 of the window scores).
    Score,
    /// `models` (exact inferences per model).
    Models,
    /// `shadow` (exact inferences and agreement of the shadow model).
    Shadow,
    /// `drift` (PSI against the training reference).
    Drift,
}

/// `[privacy.differential_privacy]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DifferentialPrivacyConfig {
    /// Epsilon spent on each released aggregate, shared by its counts.
    pub epsilon: f64,
    /// Epsilon a group may spend per period; then its aggregates are
    /// suppressed until the next period.
    pub budget: f64,
    /// Length of a budget period in seconds (event time, aligned to the epoch).
    #[serde(default = "default_privacy_period_s")]
    pub period_s: u64,
    /// Most one protected unit adds to any one count of an aggregate
    /// (1: one reading or one inference window).
    #[serde(default = "default_privacy_sensitivity")]
    pub sensitivity: u64,
    /// Non-count fields released exact, without protection; by default they
    /// are removed.
    #[serde(default)]
    pub keep_exact: Vec<ExactField>,
    /// The declared groups (required): every one is released in every
    /// window, those without readings with noised zero counts, so the set of
    /// released groups does not depend on the data; readings of any other
    /// group are refused at ingest and counted. Names as the grouping rule
    /// gives them before pseudonymization (a sensor id, an attribute value,
    /// a fixed group); a pseudonymized group is released under its token.
    #[serde(default)]
    pub groups: Vec<String>,
    /// How far (ms, event time) the gateway's newest closed window must be
    /// past a window's end before that window is released for every
    /// declared group; an aggregate of a window already released is
    /// suppressed and counted. Keep it above
    /// `aggregation.allowed_lateness_ms` plus the slack between groups.
    #[serde(default = "default_privacy_release_delay_ms")]
    pub release_delay_ms: i64,
}

fn default_privacy_release_delay_ms() -> i64 {
    60_000
}

/// Most declared groups (`differential_privacy.groups`).
pub(crate) const MAX_DECLARED_GROUPS: usize = 100_000;

fn default_privacy_period_s() -> u64 {
    86_400
}

fn default_privacy_sensitivity() -> u64 {
    1
}

impl PrivacyConfig {
    /// Whether the release stage can withhold an aggregate (k-anonymity or
    /// differential privacy is on): then the health message carries no
    /// exact data totals, since they minus what was released would reveal
    /// what was withheld.
    pub fn can_suppress(&self) -> bool {
        self.k_anonymity.is_some() || self.differential_privacy.is_some()
    }

    /// Check `[privacy]` (paths relative to it); what depends on the
    /// aggregation settings is checked by [`crate::config`].
    pub fn check(&self, c: &mut Collector) {
        for (i, k) in self.trusted_keys.iter().enumerate() {
            if let Err(e) = outpost_models::signing::read_public_key(k) {
                c.push(format!("trusted_keys[{i}]"), e.to_string());
            }
        }
        let v = &self.policy_version;
        if v.trim().is_empty() || v.len() > 64 || v.chars().any(char::is_control) {
            c.push(
                "policy_version",
                "must be 1 to 64 characters, without control characters",
            );
        }
        let allowed = |a: &str| self.allow_attrs.iter().any(|x| x == a);
        for (i, a) in self.pseudonymize_attrs.iter().enumerate() {
            let path = format!("pseudonymize_attrs[{i}]");
            if !allowed(a) {
                c.push(
                    &path,
                    format!("{a:?} is not in privacy.allow_attrs: it would be dropped, not pseudonymized"),
                );
            }
            if self.free_text_attrs.contains(a) {
                c.push(&path, format!("{a:?} is also in privacy.free_text_attrs"));
            }
            if a.contains('\0') {
                c.push(&path, "must not contain a NUL character");
            }
        }
        for (i, a) in self.free_text_attrs.iter().enumerate() {
            if !allowed(a) {
                c.push(
                    format!("free_text_attrs[{i}]"),
                    format!("{a:?} is not in privacy.allow_attrs: it would be dropped anyway"),
                );
            }
        }
        let pseudonymizes = self.pseudonymize_sensor || !self.pseudonymize_attrs.is_empty();
        match &self.key {
            None if pseudonymizes => c.push(
                "key",
                "required when pseudonymize_sensor or pseudonymize_attrs is set, e.g. \
                 key = { file = \"/etc/outpost/pseudonym.key\" } holding `<key id>:<hex secret of at least 32 bytes>`",
            ),
            Some(k) if k.file.is_some() == k.env.is_some() => {
                c.push("key", "set exactly one of `file` or `env`")
            }
            _ => {}
        }
        for (name, pattern) in &self.redact_patterns {
            let path = format!("redact_patterns.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                c.push(&path, "the name must be letters, digits, '_' or '-'");
            }
            if let Err(e) = super::compile_pattern(pattern) {
                c.push(&path, e);
            }
        }
        if let Some(k) = &self.k_anonymity {
            if k.min_subjects == 0 {
                c.push("k_anonymity.min_subjects", "must be at least 1");
            }
            if k.action == KAnonymityAction::Merge && k.max_merge_windows < 2 {
                c.push(
                    "k_anonymity.max_merge_windows",
                    "must be at least 2 with action = \"merge\"",
                );
            }
        }
        if let Some(d) = &self.differential_privacy {
            let p = "differential_privacy";
            let epsilon_ok = d.epsilon.is_finite() && d.epsilon >= super::MIN_EPSILON;
            if !epsilon_ok {
                c.push(
                    format!("{p}.epsilon"),
                    "must be a finite number greater than 0 (at least 0.000001)",
                );
            }
            if !(d.budget.is_finite() && d.budget > 0.0) {
                c.push(
                    format!("{p}.budget"),
                    "must be a finite number greater than 0",
                );
            } else if epsilon_ok && d.budget < d.epsilon {
                c.push(
                    format!("{p}.budget"),
                    format!(
                        "must be at least epsilon ({}): a smaller budget allows no release",
                        d.epsilon
                    ),
                );
            }
            if !(1..=super::MAX_PERIOD_S).contains(&d.period_s) {
                c.push(
                    format!("{p}.period_s"),
                    "must be between 1 and 315360000 (ten years)",
                );
            }
            if !(1..=super::MAX_SENSITIVITY).contains(&d.sensitivity) {
                c.push(format!("{p}.sensitivity"), "must be between 1 and 1000000");
            }
            if let Some(reason) = groups_problem(&d.groups) {
                c.push(format!("{p}.groups"), reason);
            }
            if d.release_delay_ms < 0 {
                c.push(format!("{p}.release_delay_ms"), "must not be negative");
            }
            if self
                .k_anonymity
                .as_ref()
                .is_some_and(|k| k.action == KAnonymityAction::Merge)
            {
                c.push(
                    "k_anonymity.action",
                    "\"merge\" cannot be combined with differential_privacy: which windows \
                     are merged would be decided on exact counts; use \"suppress\" (decided on \
                     the noised counts)",
                );
            }
        }
    }
}

/// What is wrong with `differential_privacy.groups`, if anything.
pub(crate) fn groups_problem(groups: &[String]) -> Option<String> {
    if groups.is_empty() {
        return Some(
            "required with differential privacy: declare every group that may be released, \
             e.g. groups = [\"line-a\", \"line-b\"]; each is released in every window (without \
             readings: noised zero counts), so the cloud cannot tell which groups were active, \
             and readings of other groups are refused"
                .into(),
        );
    }
    if groups.len() > MAX_DECLARED_GROUPS {
        return Some(format!("at most {MAX_DECLARED_GROUPS} groups"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for g in groups {
        if g.is_empty() || g.chars().any(char::is_control) {
            return Some(format!(
                "{g:?}: a group name must not be empty or hold control characters"
            ));
        }
        if !seen.insert(g) {
            return Some(format!("{g:?} is declared twice"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(cfg: &PrivacyConfig) -> Vec<String> {
        let mut c = Collector::new();
        cfg.check(&mut c);
        c.into_problems()
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn differential_privacy_needs_declared_groups_and_suppress() {
        let dp = |groups: &[&str], delay: i64| DifferentialPrivacyConfig {
            epsilon: 1.0,
            budget: 10.0,
            period_s: 86_400,
            sensitivity: 1,
            keep_exact: vec![],
            groups: groups.iter().map(|g| g.to_string()).collect(),
            release_delay_ms: delay,
        };
        let mut cfg = PrivacyConfig {
            differential_privacy: Some(dp(&[], 0)),
            ..Default::default()
        };
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].starts_with("differential_privacy.groups: required"),
            "{p:?}"
        );
        for (groups, delay, want) in [
            (
                &["a", "a"][..],
                0,
                "differential_privacy.groups: \"a\" is declared twice",
            ),
            (
                &["a", ""][..],
                0,
                "differential_privacy.groups: \"\": a group name must not be empty",
            ),
            (
                &["a"][..],
                -1,
                "differential_privacy.release_delay_ms: must not be negative",
            ),
        ] {
            cfg.differential_privacy = Some(dp(groups, delay));
            let p = problems(&cfg);
            assert!(p.len() == 1 && p[0].starts_with(want), "{p:?}");
        }
        cfg.differential_privacy = Some(dp(&["a", "b"], 0));
        assert!(problems(&cfg).is_empty());
        cfg.k_anonymity = Some(KAnonymityConfig {
            min_subjects: 2,
            min_readings: 1,
            action: KAnonymityAction::Merge,
            max_merge_windows: 3,
        });
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].starts_with("k_anonymity.action: \"merge\" cannot be combined"),
            "{p:?}"
        );
        assert!(cfg.can_suppress());
        assert!(!PrivacyConfig::default().can_suppress());
        // The default delay: one minute.
        let d: DifferentialPrivacyConfig =
            toml::from_str("epsilon = 1.0\nbudget = 2.0\ngroups = [\"a\"]").unwrap();
        assert_eq!(d.release_delay_ms, 60_000);
    }
}
