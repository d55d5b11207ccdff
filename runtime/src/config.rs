//! Configuration: TOML, every table `deny_unknown_fields`, and every problem
//! reported at once with its path (`sources[1].topics`, `uplink.port`, ...).
//!
//! Parsing goes section by section so that one bad section does not hide the
//! problems of the others; semantic checks run after that over whatever parsed.
//!
//! This module only assembles: each stage owns its table's type, defaults
//! and checks (`ingest::IngestConfig`, `privacy::PrivacyConfig`, ...), and
//! checks them with paths relative to its table; [`Config::check`] places
//! each at its path and checks what crosses stages (unique source names,
//! k-anonymity against the grouping).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

use crate::aggregate::{AggregationConfig, GroupBy};
use crate::audit::AuditConfig;
pub use crate::check::{Collector, Problem};
use crate::decisions::DecisionsConfig;
use crate::fleet::FleetConfig;
use crate::governance::{GovernanceConfig, ModelConfig};
use crate::inference::InferenceConfig;
use crate::ingest::simulated::SimulatedSourceConfig;
use crate::ingest::{IngestConfig, SourceConfig};
use crate::metrics::MetricsConfig;
use crate::outbox::{OutboxConfig, OutboxKind};
use crate::privacy::PrivacyConfig;
use crate::uplink::UplinkConfig;
use crate::window::WindowingConfig;

/// Errors of loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// One or more problems; all of them are listed.
    #[error("{} problem(s) in {origin}:\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file (or `<embedded default>`).
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Gateway identity and process settings.
    pub gateway: GatewayConfig,
    /// Reading sources, run concurrently.
    pub sources: Vec<SourceConfig>,
    /// Validation of incoming readings.
    pub ingest: IngestConfig,
    /// Privacy policy applied at ingest.
    pub privacy: PrivacyConfig,
    /// The model.
    pub model: ModelConfig,
    /// Model registry, signatures, shadow runs, probation and rollback.
    pub governance: GovernanceConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// sha256 of the configuration file's text (audited at start-up); `None`
    /// for the embedded default.
    pub source_sha256: Option<String>,
    /// Sliding windows over each sensor's readings.
    pub windowing: WindowingConfig,
    /// Inference threads and batching.
    pub inference: InferenceConfig,
    /// Tumbling aggregation windows.
    pub aggregation: AggregationConfig,
    /// The outbox between aggregation and uplink.
    pub outbox: OutboxConfig,
    /// The ingest journal: accepted readings on disk until counted.
    pub journal: crate::journal::JournalConfig,
    /// The cloud uplink; `None`: aggregates are logged.
    pub uplink: Option<UplinkConfig>,
    /// Local per-window decisions to the site broker.
    pub decisions: Option<DecisionsConfig>,
    /// Fleet operations over the uplink; `None`: managed locally only.
    pub fleet: Option<FleetConfig>,
    /// Metrics endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Gateway id, carried in every aggregate and in topic templates.
    pub id: String,
    /// Directory for state (outbox, journal, registry, audit log); default
    /// `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`) or `/var/lib/outpost`.
    pub state_dir: PathBuf,
    /// Longest time a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: "outpost-dev".into(),
            // systemd's StateDirectory= sets STATE_DIRECTORY.
            state_dir: std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/outpost")),
            shutdown_timeout_ms: 10_000,
        }
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level filter (`info`, `debug`, `outpost=debug,rumqttc=warn`); `RUST_LOG` overrides.
    pub level: String,
    /// Format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for Config {
    /// The embedded default: one simulated source, the bundled model, no
    /// cloud (aggregates are logged).
    fn default() -> Self {
        Self {
            gateway: GatewayConfig::default(),
            sources: vec![SourceConfig::Simulated(SimulatedSourceConfig::default())],
            ingest: IngestConfig::default(),
            privacy: PrivacyConfig::default(),
            model: ModelConfig::default(),
            governance: GovernanceConfig::default(),
            audit: AuditConfig::default(),
            source_sha256: None,
            windowing: WindowingConfig::default(),
            inference: InferenceConfig::default(),
            aggregation: AggregationConfig {
                window_ms: 10_000,
                ..AggregationConfig::default()
            },
            outbox: OutboxConfig::default(),
            journal: Default::default(),
            uplink: None,
            decisions: None,
            fleet: None,
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Config {
    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse and check configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            invalid(vec![Problem {
                path: "<toml>".into(),
                message: e.to_string().trim().replace('\n', " "),
            }])
        })?;
        let mut c = Collector::new();
        // A file starts from each section's defaults (the embedded default's
        // simulated source and short aggregation windows are for demos only).
        let mut cfg = Config {
            sources: Vec::new(),
            aggregation: AggregationConfig::default(),
            ..Config::default()
        };
        cfg.source_sha256 = Some(hex::encode(sha2::Sha256::digest(text.as_bytes())));
        let mut saw_sources = false;
        for (key, value) in table {
            match key.as_str() {
                "gateway" => cfg.gateway = c.section(&key, value).unwrap_or_default(),
                "ingest" => cfg.ingest = c.section(&key, value).unwrap_or_default(),
                "privacy" => cfg.privacy = c.section(&key, value).unwrap_or_default(),
                "model" => cfg.model = c.section(&key, value).unwrap_or_default(),
                "governance" => cfg.governance = c.section(&key, value).unwrap_or_default(),
                "audit" => cfg.audit = c.section(&key, value).unwrap_or_default(),
                "windowing" => cfg.windowing = c.section(&key, value).unwrap_or_default(),
                "inference" => cfg.inference = c.section(&key, value).unwrap_or_default(),
                "aggregation" => cfg.aggregation = c.section(&key, value).unwrap_or_default(),
                "outbox" => cfg.outbox = c.section(&key, value).unwrap_or_default(),
                "journal" => cfg.journal = c.section(&key, value).unwrap_or_default(),
                "uplink" => cfg.uplink = c.section(&key, value),
                "decisions" => cfg.decisions = c.section(&key, value),
                "fleet" => cfg.fleet = c.section(&key, value),
                "metrics" => cfg.metrics = c.section(&key, value).unwrap_or_default(),
                "log" => cfg.log = c.section(&key, value).unwrap_or_default(),
                "sources" => {
                    saw_sources = true;
                    match value {
                        toml::Value::Array(items) => {
                            for (i, item) in items.into_iter().enumerate() {
                                if let Some(s) = c.section(&format!("sources[{i}]"), item) {
                                    cfg.sources.push(s);
                                }
                            }
                        }
                        _ => c.push("sources", "must be an array of tables ([[sources]])"),
                    }
                }
                other => c.push(other, "unknown section"),
            }
        }
        if !saw_sources {
            c.push("sources", "at least one [[sources]] is required");
        }
        cfg.check(&mut c);
        if c.is_empty() {
            Ok(cfg)
        } else {
            Err(invalid(c.into_problems()))
        }
    }

    /// Every stage checks its own table; what crosses stages is checked here.
    fn check(&self, c: &mut Collector) {
        c.within("governance", |c| self.governance.check(c));
        c.within("privacy", |c| self.privacy.check(c));
        self.check_privacy_against_aggregation(c);
        if self.gateway.id.trim().is_empty() || self.gateway.id.contains(['+', '#', '/']) {
            c.push(
                "gateway.id",
                "must be non-empty and contain no '/', '+' or '#'",
            );
        }
        let mut names = BTreeMap::new();
        for (i, s) in self.sources.iter().enumerate() {
            let p = format!("sources[{i}]");
            if let Some(prev) = names.insert(s.name().to_string(), i) {
                c.push(
                    format!("{p}.name"),
                    format!("{:?} is also the name of sources[{prev}]", s.name()),
                );
            }
            c.within(&p, |c| s.check(c));
        }
        c.within("ingest", |c| self.ingest.check(c));
        c.within("windowing", |c| self.windowing.check(c));
        c.within("inference", |c| self.inference.check(c));
        c.within("outbox", |c| self.outbox.check(c));
        c.within("journal", |c| self.journal.check(c));
        if self.journal.enabled == Some(true) && self.outbox.kind == OutboxKind::Memory {
            c.push(
                "journal.enabled",
                "the journal needs outbox.kind = \"disk\": a memory outbox loses what the journal forgets",
            );
        }
        c.within("aggregation", |c| self.aggregation.check(c));
        if let Some(u) = &self.uplink {
            c.within("uplink", |c| u.check(c));
        }
        if let Some(d) = &self.decisions {
            c.within("decisions", |c| d.check(c));
        }
        if let Some(f) = &self.fleet {
            c.within("fleet", |c| f.check(c));
            self.check_fleet_against_privacy(f, c);
        }
        c.within("metrics", |c| self.metrics.check(c));
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            c.push("log.level", e.to_string());
        }
    }

    /// Fleet documents travel over the uplink's connection, and a fleet
    /// key that is also a privacy key would let the fleet operator alone
    /// change the privacy policy.
    fn check_fleet_against_privacy(&self, f: &FleetConfig, c: &mut Collector) {
        if self.uplink.is_none() {
            c.push(
                "fleet",
                "fleet operations use the uplink's connection: configure [uplink]",
            );
        }
        let id = |p: &PathBuf| {
            outpost_models::signing::read_public_key(p)
                .ok()
                .map(|k| k.key_id)
        };
        let privacy: Vec<String> = self.privacy.trusted_keys.iter().filter_map(id).collect();
        for (i, path) in f.trusted_keys.iter().enumerate() {
            if let Some(id) = id(path).filter(|id| privacy.contains(id)) {
                c.push(
                    format!("fleet.trusted_keys[{i}]"),
                    format!("key {id} is also in privacy.trusted_keys: the fleet key alone could change the privacy policy"),
                );
            }
        }
    }

    /// k-anonymity needs aggregates that cover more than one subject.
    fn check_privacy_against_aggregation(&self, c: &mut Collector) {
        if let Some(k) = &self.privacy.k_anonymity
            && k.min_subjects > 1
            && self.aggregation.group_by == GroupBy::Sensor
            && self.aggregation.groups.is_empty()
        {
            c.push(
                "privacy.k_anonymity.min_subjects",
                format!(
                    "with aggregation.group_by = \"sensor\" every aggregate covers one sensor, \
                     so {} would suppress them all; group by an attribute or the gateway",
                    k.min_subjects
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{check_filter, render_topic};
    use crate::privacy::{ExactField, KAnonymityAction};
    use crate::secret::SecretSource;

    #[test]
    fn empty_sources_and_many_problems_reported_together() {
        let text = r#"
            [gateway]
            id = "a/b"
            [[sources]]
            type = "simulated"
            sensors = 0
            bogus = 1
            [[sources]]
            type = "mqtt"
            topics = ["a/#/b"]
            broker = { host = "", port = 0 }
            [uplink]
            broker = { host = "x", port = 8883 }
            topic = "t/{nope}"
            [windowing]
            hop = 0
            [outbox]
            kind = "memory"
            stream_max_bytes = 100
            streams = { "line-1" = 4294967296000 }
            [nonsense]
        "#;
        let err = Config::parse(text, "t.toml").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "gateway.id",
            "sources[0].bogus",
            "sources[1].topics[0]",
            "sources[1].broker.host",
            "sources[1].broker.port",
            "uplink.broker.tls",
            "uplink.topic",
            "windowing.hop",
            "outbox.stream_max_bytes",
            "outbox.streams.line-1",
            "nonsense",
        ] {
            assert!(
                paths.iter().any(|p| p.starts_with(want)),
                "missing {want} in {paths:?}"
            );
        }
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let cfg = Config::parse("[[sources]]\ntype = \"simulated\"\n", "t").unwrap();
        assert_eq!(cfg.sources.len(), 1);
        assert_eq!(cfg.aggregation.window_ms, 60_000);
        assert!(cfg.uplink.is_none());
    }

    #[test]
    fn secret_debug_never_shows_value() {
        let s = SecretSource {
            file: None,
            env: Some("OUTPOST_TEST_SECRET_X".into()),
        };
        assert_eq!(format!("{s:?}"), "Secret(env OUTPOST_TEST_SECRET_X)");
    }

    #[test]
    fn filters_and_templates() {
        assert!(check_filter("a/+/b/#").is_ok());
        assert!(check_filter("a/b#").is_err());
        assert!(check_filter("a/x+/b").is_err());
        assert_eq!(
            render_topic(
                "o/{gateway}/agg/{group}",
                &[("gateway", "g1"), ("group", "a/b+")]
            ),
            "o/g1/agg/a%2Fb%2B"
        );
    }

    #[test]
    fn privacy_problems_are_reported_with_their_paths() {
        let text = r#"
            [[sources]]
            type = "simulated"
            [privacy]
            policy_version = ""
            allow_attrs = ["line", "note"]
            pseudonymize_attrs = ["patient", "note"]
            free_text_attrs = ["note", "ward"]
            redact_patterns = { badge = "B-[0-9", any = "x*", "bad name" = "y" }
            [privacy.k_anonymity]
            min_subjects = 3
            action = "merge"
            max_merge_windows = 1
            [privacy.differential_privacy]
            epsilon = 0.0
            budget = -1.0
            period_s = 0
            sensitivity = 0
        "#;
        let ConfigError::Invalid { problems, .. } = Config::parse(text, "t").unwrap_err() else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "privacy.policy_version",
            "privacy.pseudonymize_attrs[0]",
            "privacy.pseudonymize_attrs[1]",
            "privacy.free_text_attrs[1]",
            "privacy.key",
            "privacy.redact_patterns.badge",
            "privacy.redact_patterns.any",
            "privacy.redact_patterns.bad name",
            "privacy.k_anonymity.min_subjects",
            "privacy.k_anonymity.max_merge_windows",
            "privacy.differential_privacy.epsilon",
            "privacy.differential_privacy.budget",
            "privacy.differential_privacy.period_s",
            "privacy.differential_privacy.sensitivity",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        assert!(!paths.contains(&"privacy.free_text_attrs[0]"), "{paths:?}");
        assert!(!paths.contains(&"privacy.redact_patterns.y"), "{paths:?}");

        // An unknown built-in pattern.
        let text = r#"
            [[sources]]
            type = "simulated"
            [privacy]
            redact = ["email", "fax"]
        "#;
        let ConfigError::Invalid { problems, .. } = Config::parse(text, "t").unwrap_err() else {
            panic!("expected Invalid")
        };
        let text = problems.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert!(
            text.iter()
                .any(|p| p.starts_with("privacy.redact[1]") && p.contains("fax")),
            "{text:?}"
        );

        // A key given both ways; a budget smaller than epsilon.
        let text = r#"
            [[sources]]
            type = "simulated"
            [privacy]
            pseudonymize_sensor = true
            key = { file = "/k", env = "K" }
            [privacy.differential_privacy]
            epsilon = 1.0
            budget = 0.5
            groups = ["a"]
        "#;
        let ConfigError::Invalid { problems, .. } = Config::parse(text, "t").unwrap_err() else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["privacy.key", "privacy.differential_privacy.budget"]
        );
    }

    #[test]
    fn a_full_privacy_policy_parses() {
        let text = r#"
            [[sources]]
            type = "simulated"
            [aggregation]
            group_by = "attr:line"
            [privacy]
            policy_version = "2026-01"
            allow_attrs = ["line", "patient", "note"]
            pseudonymize_sensor = true
            pseudonymize_attrs = ["patient"]
            key = { file = "/etc/outpost/pseudonym.key" }
            redact = ["email", "phone", "ipv4", "iban"]
            redact_patterns = { badge = "B-[0-9]{6}" }
            free_text_attrs = ["note"]
            [privacy.k_anonymity]
            min_subjects = 3
            [privacy.differential_privacy]
            epsilon = 0.5
            budget = 10.0
            keep_exact = ["drift"]
            groups = ["L1", "L2"]
        "#;
        let cfg = Config::parse(text, "t").unwrap();
        let p = &cfg.privacy;
        assert_eq!(p.redact.len(), 4);
        let k = p.k_anonymity.as_ref().unwrap();
        assert_eq!(
            (k.min_readings, k.action, k.max_merge_windows),
            (1, KAnonymityAction::Suppress, 6)
        );
        let d = p.differential_privacy.as_ref().unwrap();
        assert_eq!((d.period_s, d.sensitivity), (86_400, 1));
        assert_eq!(d.keep_exact, vec![ExactField::Drift]);
        // The defaults: the allowlist only.
        let cfg = Config::parse("[[sources]]\ntype = \"simulated\"\n", "t").unwrap();
        assert_eq!(cfg.privacy, PrivacyConfig::default());
        assert_eq!(cfg.privacy.policy_version, "1");
        assert!(cfg.privacy.k_anonymity.is_none() && cfg.privacy.differential_privacy.is_none());
    }
}
