//! `outpost privacy report`: what leaves the site under a configuration and
//! model, and what an observer of the cloud broker learns from it, for a
//! privacy officer: every field of every message (aggregate, health, last
//! will, and the local decision to the site broker), whether it is exact,
//! noised, withheld or never sent; the group names and topics an observer
//! sees; epsilon per release and per period with the budget; k; what is
//! suppressed or merged; and what remains observable, with its bound.
//!
//! The fields are not listed by hand: they are taken from the message types
//! themselves (a fully populated aggregate, status and last will,
//! serialized), so a field added to a message appears here (classified
//! `exact` unless a rule below says otherwise). The test
//! `tests/tests/privacy_report.rs` runs a real gateway and checks the report
//! against every message the cloud broker carries.

use std::collections::BTreeMap;

use outpost_models::manifest::{Manifest, Task};
use serde::Serialize;
use serde_json::Value;

use crate::aggregate::{Aggregate, GroupBy};
use crate::config::Config;
use crate::privacy::ExactField;

/// How a field leaves the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exposure {
    /// Its true value.
    Exact,
    /// Its true value plus differential-privacy noise.
    Noised,
    /// A keyed token (`p_…`) instead of the value.
    Token,
    /// Present but always 0 or null: the true value is withheld.
    Withheld,
    /// Never sent under this configuration and model.
    NotSent,
}

/// One field of one message.
#[derive(Debug, Clone, Serialize)]
pub struct Field {
    /// JSON path, `.`-separated; `*` stands for any key of a map.
    pub path: String,
    /// How it leaves.
    pub exposure: Exposure,
    /// What it reveals, in words.
    pub note: String,
}

/// One kind of message.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// `aggregate`, `health`, `last_will` or `decision`.
    pub message: &'static str,
    /// `cloud` or `site`.
    pub broker: &'static str,
    /// Its topic (template placeholders that depend on the data left as
    /// `{group}` / `{sensor}`).
    pub topic: String,
    /// When it is sent.
    pub sent: String,
    /// Every field.
    pub fields: Vec<Field>,
}

/// The group names an observer sees.
#[derive(Debug, Clone, Serialize)]
pub struct Groups {
    /// `aggregation.group_by`.
    pub rule: String,
    /// Whether group names are keyed tokens.
    pub tokens: bool,
    /// With differential privacy: the declared groups and the name each is
    /// released under (its token when pseudonymized; `null` when the key
    /// cannot be read here).
    pub declared: Option<BTreeMap<String, Option<String>>>,
    /// The aggregate topics an observer sees, when the group names are
    /// known in advance (declared); otherwise the template.
    pub topics: Vec<String>,
    /// In words.
    pub note: String,
}

/// Differential privacy in figures.
#[derive(Debug, Clone, Serialize)]
pub struct DpFigures {
    /// Epsilon per released aggregate.
    pub epsilon_per_release: f64,
    /// Statistics sharing it (m).
    pub statistics_per_release: u32,
    /// Epsilon of each statistic (epsilon / m).
    pub epsilon_per_statistic: f64,
    /// Noise scale of the counts (sensitivity · m / epsilon): discrete Laplace.
    pub count_noise_scale: f64,
    /// Noise scale of `sensors` (m / epsilon).
    pub sensors_noise_scale: f64,
    /// The budget per group and period.
    pub budget_per_period: f64,
    /// The period, seconds.
    pub period_s: u64,
    /// Aggregation windows per period.
    pub windows_per_period: u64,
    /// Releases per group and period (every declared group is released in
    /// every window until the budget is spent).
    pub releases_per_period: u64,
    /// Epsilon a group actually spends per period.
    pub epsilon_per_period: f64,
    /// Sensitivity (most one protected unit adds to a count).
    pub sensitivity: u64,
}

/// k-anonymity in figures.
#[derive(Debug, Clone, Serialize)]
pub struct KFigures {
    /// k: fewest distinct sensors.
    pub min_subjects: u64,
    /// Fewest readings.
    pub min_readings: u64,
    /// `suppress` or `merge`.
    pub action: String,
    /// Whether the thresholds are checked on noised counts.
    pub on_noised_counts: bool,
}

/// Something still observable, with its bound.
#[derive(Debug, Clone, Serialize)]
pub struct Observable {
    /// What.
    pub what: String,
    /// How much it reveals.
    pub bound: String,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Gateway id.
    pub gateway: String,
    /// `privacy.policy_version`.
    pub policy_version: String,
    /// Every message that can leave the gateway.
    pub messages: Vec<Message>,
    /// The group names.
    pub groups: Groups,
    /// Differential privacy; absent: off.
    pub differential_privacy: Option<DpFigures>,
    /// k-anonymity; absent: off.
    pub k_anonymity: Option<KFigures>,
    /// What is suppressed, merged or refused, in words.
    pub withheld: Vec<String>,
    /// What never leaves the site.
    pub hidden: Vec<String>,
    /// What remains observable, with its bound.
    pub observable: Vec<Observable>,
}

/// Maps whose keys are data (class names, model ids): `*` in a path.
const MAP_FIELDS: [&str; 2] = ["classes", "models"];

/// Every JSON path of `v`, leaves only (`*` for the keys of [`MAP_FIELDS`]).
pub fn paths(v: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let star = MAP_FIELDS.contains(&prefix);
                for (k, x) in m {
                    let key = if star { "*" } else { k.as_str() };
                    let p = if prefix.is_empty() {
                        key.to_string()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(x, &p, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out.sort();
    out.dedup();
    out
}

fn sample_aggregate() -> Aggregate {
    use crate::aggregate::{DriftStats, ModelRef, PolicyRef, ScoreStats, ShadowStats};
    let score = ScoreStats {
        mean: 0.0,
        max: 0.0,
        p95: 0.0,
    };
    let model = ModelRef {
        name: String::new(),
        version: String::new(),
    };
    Aggregate {
        schema: crate::aggregate::AGGREGATE_SCHEMA,
        id: String::new(),
        gateway: String::new(),
        group: String::new(),
        window_start: 0,
        window_end: 0,
        partial: true,
        readings: 0,
        late_readings: 0,
        inferences: 0,
        sensors: 0,
        model: model.clone(),
        classes: Some([("c".to_string(), 0)].into()),
        anomalies: Some(0),
        anomaly_rate: Some(0.0),
        score: Some(score.clone()),
        policy: PolicyRef {
            version: String::new(),
            key_id: Some(String::new()),
            epsilon: Some(0.0),
        },
        models: Some([("m".to_string(), 0)].into()),
        shadow: Some(ShadowStats {
            model,
            inferences: 0,
            agreement: 0.0,
            score: Some(score),
        }),
        drift: Some(DriftStats {
            input_psi: 0.0,
            input_feature: String::new(),
            score_psi: 0.0,
            alert: false,
        }),
        gap: true,
        covers: Vec::new(),
    }
}

fn sample_status() -> crate::status::Status {
    let mut s = crate::status::Status::snapshot(&crate::metrics::Metrics::new(), "", 0);
    s.audit_head = Some(crate::status::AuditHead {
        seq: 0,
        sha256: String::new(),
    });
    s.config = Some(crate::status::ConfigStatus {
        sha256: String::new(),
        applied_ms: 0,
    });
    s.counts_withheld = true;
    s
}

fn field(path: &str, exposure: Exposure, note: impl Into<String>) -> Field {
    Field {
        path: path.to_string(),
        exposure,
        note: note.into(),
    }
}

/// Whether the group names are keyed tokens (the field grouped by is
/// pseudonymized).
fn groups_are_tokens(cfg: &Config) -> bool {
    let p = &cfg.privacy;
    match &cfg.aggregation.group_by {
        GroupBy::Sensor => p.pseudonymize_sensor,
        GroupBy::Attr(a) => p.pseudonymize_attrs.contains(a),
        GroupBy::Gateway => false,
    }
}

fn aggregate_fields(cfg: &Config, manifest: &Manifest) -> Vec<Field> {
    let dp = cfg.privacy.differential_privacy.as_ref();
    let keep = |f: ExactField| dp.is_none_or(|d| d.keep_exact.contains(&f));
    let classifier = manifest.task == Task::Classifier;
    let pseudonymizes =
        cfg.privacy.pseudonymize_sensor || !cfg.privacy.pseudonymize_attrs.is_empty();
    let count = |what: &str| match dp {
        Some(_) => (
            Exposure::Noised,
            format!("{what}, with discrete Laplace noise"),
        ),
        None => (Exposure::Exact, format!("{what}, exact")),
    };
    let sample = serde_json::to_value(sample_aggregate()).unwrap_or_default();
    paths(&sample)
        .into_iter()
        .map(|p| {
            let top = p.split('.').next().unwrap_or_default();
            let (exposure, note) = match top {
                "group" if groups_are_tokens(cfg) => (
                    Exposure::Token,
                    "the group as a keyed token: links one group's aggregates over time, reveals nothing without the key".to_string(),
                ),
                "group" => (
                    Exposure::Exact,
                    format!("the group's name as `aggregation.group_by = {}` gives it", group_rule(cfg)),
                ),
                "readings" => count("readings in the window"),
                "late_readings" => count("readings that came after their window closed"),
                "inferences" => count("windows inferred"),
                "sensors" => count("distinct sensors"),
                "classes" if !classifier => (Exposure::NotSent, "the model is a detector".into()),
                "classes" => count("inferences per class"),
                "anomalies" | "anomaly_rate" if classifier => {
                    (Exposure::NotSent, "the model is a classifier".into())
                }
                "anomalies" => count("anomalous windows"),
                "anomaly_rate" => match dp {
                    Some(_) => (Exposure::Noised, "recomputed from the noised counts".into()),
                    None => (Exposure::Exact, "anomalies over inferences, exact".into()),
                },
                "score" if !keep(ExactField::Score) => {
                    (Exposure::NotSent, "removed under differential privacy".into())
                }
                "models" if !keep(ExactField::Models) => {
                    (Exposure::NotSent, "removed under differential privacy".into())
                }
                "shadow" if !keep(ExactField::Shadow) => {
                    (Exposure::NotSent, "removed under differential privacy".into())
                }
                "drift" if !keep(ExactField::Drift) => {
                    (Exposure::NotSent, "removed under differential privacy".into())
                }
                "score" | "models" | "shadow" | "drift" => (
                    Exposure::Exact,
                    if dp.is_some() {
                        "kept exact by keep_exact: unprotected, and present only with inferences".to_string()
                    } else {
                        "exact statistics of the window (present when they exist)".to_string()
                    },
                ),
                "policy" if p == "policy.epsilon" && dp.is_none() => {
                    (Exposure::NotSent, "differential privacy is off".into())
                }
                "policy" if p == "policy.key_id" && !pseudonymizes => {
                    (Exposure::NotSent, "nothing is pseudonymized".into())
                }
                "policy" => (Exposure::Exact, "the policy applied (constant)".into()),
                "window_start" | "window_end" => (
                    Exposure::Exact,
                    match cfg.privacy.k_anonymity.as_ref().map(|k| k.action) {
                        Some(crate::privacy::KAnonymityAction::Merge) => "the window; a merged window is wider, which tells that the group was below k (decided on exact counts)".to_string(),
                        _ => "the window (event time, aligned)".to_string(),
                    },
                ),
                "partial" | "gap" => (Exposure::Exact, "shutdown / unclean-start flags; under differential privacy the same for every group of a window".into()),
                "id" => (Exposure::Exact, "a hash of the released content".into()),
                _ => (Exposure::Exact, "constant for the gateway and model".into()),
            };
            field(&p, exposure, note)
        })
        .collect()
}

/// Health fields withheld when anything can be suppressed.
const WITHHELD_HEALTH: [&str; 6] = [
    "readings",
    "rejected",
    "inferences",
    "inference_errors",
    "cpu_us_per_inference",
    "uplink_bytes_per_inference",
];

fn health_fields(cfg: &Config) -> Vec<Field> {
    let withheld = cfg.privacy.can_suppress();
    let sample = serde_json::to_value(sample_status()).unwrap_or_default();
    paths(&sample)
        .into_iter()
        .map(|p| {
            let (exposure, note) = match p.as_str() {
                x if WITHHELD_HEALTH.contains(&x) && withheld => (
                    Exposure::Withheld,
                    "always 0 or null: the exact total, minus what was released, would reveal what was withheld",
                ),
                x if WITHHELD_HEALTH.contains(&x) => (
                    Exposure::Exact,
                    "exact running total since start, every group included",
                ),
                "counts_withheld" if !withheld => (Exposure::NotSent, "nothing can be suppressed"),
                "counts_withheld" => (Exposure::Exact, "true: the data counts are withheld"),
                "aggregates" => (Exposure::Exact, "aggregates released since start"),
                "rss_kib" => (
                    Exposure::Exact,
                    "resident memory: grows with the sensors and windows held, a coarse signal of load",
                ),
                x if x.starts_with("outbox.") || x.starts_with("uplink.") => (
                    Exposure::Exact,
                    "about released aggregates only (queue, delivery)",
                ),
                _ => (Exposure::Exact, "gateway state, no data"),
            };
            field(&p, exposure, note)
        })
        .collect()
}

fn group_rule(cfg: &Config) -> String {
    match &cfg.aggregation.group_by {
        GroupBy::Sensor => "sensor".into(),
        GroupBy::Gateway => "gateway".into(),
        GroupBy::Attr(a) => format!("attr:{a}"),
    }
}

fn window_note(cfg: &Config) -> String {
    format!("{} ms", cfg.aggregation.window_ms)
}

/// The report for `cfg` and its model.
pub fn report(cfg: &Config, manifest: &Manifest) -> Report {
    let gw = &cfg.gateway.id;
    let p = &cfg.privacy;
    let dp = p.differential_privacy.as_ref();
    let tokens = groups_are_tokens(cfg);
    let mut messages = Vec::new();
    if let Some(u) = &cfg.uplink {
        let suffix = if u.compression == crate::uplink::Compression::Zstd {
            crate::uplink::ZSTD_TOPIC_SUFFIX
        } else {
            ""
        };
        let topic = crate::mqtt::render_topic(&u.topic, &[("gateway", gw), ("group", "{group}")]);
        messages.push(Message {
            message: "aggregate",
            broker: "cloud",
            topic: format!("{topic}{suffix}"),
            sent: match dp {
                Some(d) => format!(
                    "one per declared group and window ({}), every window, once the gateway's newest closed window is {} ms past its end{}",
                    window_note(cfg),
                    d.release_delay_ms,
                    if u.batch_max_bytes > 0 { "; several in one JSON array (topic of the first)" } else { "" }
                ),
                None => format!(
                    "one per group with readings and window ({}), when the window closes{}",
                    window_note(cfg),
                    if u.batch_max_bytes > 0 { "; several in one JSON array (topic of the first)" } else { "" }
                ),
            },
            fields: aggregate_fields(cfg, manifest),
        });
        if u.health_interval_s > 0 {
            let health_topic = crate::mqtt::render_topic(&u.health_topic, &[("gateway", gw)]);
            messages.push(Message {
                message: "health",
                broker: "cloud",
                topic: health_topic.clone(),
                sent: format!(
                    "every {} s while connected and at each connection",
                    u.health_interval_s
                ),
                fields: health_fields(cfg),
            });
            let will: Value =
                serde_json::from_slice(&crate::status::offline_message(gw)).unwrap_or_default();
            messages.push(Message {
                message: "last_will",
                broker: "cloud",
                topic: health_topic,
                sent: "by the broker when the gateway's connection ends uncleanly".into(),
                fields: paths(&will)
                    .iter()
                    .map(|f| field(f, Exposure::Exact, "gateway state, no data"))
                    .collect(),
            });
        }
    }
    if let Some(d) = &cfg.decisions {
        let sensor = if p.pseudonymize_sensor {
            (Exposure::Token, "the sensor as a keyed token")
        } else {
            (Exposure::Exact, "the sensor id")
        };
        messages.push(Message {
            message: "decision",
            broker: "site",
            topic: crate::mqtt::render_topic(
                &d.topic,
                &[("gateway", gw), ("group", "{group}"), ("sensor", "{sensor}")],
            ),
            sent: "to the site broker only (never the cloud), per inferred window as decisions.mode selects".into(),
            fields: vec![
                field("sensor", sensor.0, sensor.1),
                field(
                    "group",
                    if tokens { Exposure::Token } else { Exposure::Exact },
                    "the group",
                ),
                field("ts", Exposure::Exact, "event time of the window's last sample"),
                field(
                    "class",
                    if manifest.task == Task::Classifier {
                        Exposure::Exact
                    } else {
                        Exposure::NotSent
                    },
                    "the window's class, exact",
                ),
                field("score", Exposure::Exact, "the window's score, exact"),
                field("anomaly", Exposure::Exact, "the window's anomaly decision, exact"),
            ],
        });
    }

    let declared = dp.map(|d| {
        let privacy = crate::privacy::Privacy::new(p).ok();
        let grouper = crate::aggregate::Grouper::new(&cfg.aggregation, gw);
        d.groups
            .iter()
            .map(|g| {
                let name = match &privacy {
                    Some(pr) => {
                        crate::privacy::released_names(std::slice::from_ref(g), pr, &grouper)
                            .into_keys()
                            .next()
                    }
                    None if !tokens => Some(g.clone()),
                    None => None,
                };
                (g.clone(), name)
            })
            .collect::<BTreeMap<_, _>>()
    });
    let topics = match (&cfg.uplink, &declared) {
        (Some(u), Some(names)) => names
            .values()
            .flatten()
            .map(|n| crate::mqtt::render_topic(&u.topic, &[("gateway", gw), ("group", n)]))
            .collect(),
        (Some(u), None) => vec![crate::mqtt::render_topic(
            &u.topic,
            &[("gateway", gw), ("group", "{group}")],
        )],
        (None, _) => Vec::new(),
    };
    let groups = Groups {
        rule: group_rule(cfg),
        tokens,
        declared,
        topics,
        note: match (dp.is_some(), tokens) {
            (true, true) => "the declared groups, each under its keyed token, in every window: the observer sees how many groups are declared, never which was active; a key rotation changes every token at once".into(),
            (true, false) => "the declared group names, in every window: the observer sees the names, never which group was active".into(),
            (false, true) => "a keyed token per group with readings in a window: the observer links one group over time and sees when it was active".into(),
            (false, false) => "the name of every group with readings in a window: the observer sees which groups exist and when each was active".into(),
        },
    };

    let classifier_m = 5u32;
    let figures = dp.map(|d| {
        let m = classifier_m;
        let windows =
            (d.period_s.saturating_mul(1000) / cfg.aggregation.window_ms.max(1) as u64).max(1);
        let affordable = (d.budget / d.epsilon * (1.0 + 1e-9)).floor() as u64;
        let releases = affordable.min(windows);
        DpFigures {
            epsilon_per_release: d.epsilon,
            statistics_per_release: m,
            epsilon_per_statistic: d.epsilon / f64::from(m),
            count_noise_scale: d.sensitivity as f64 * f64::from(m) / d.epsilon,
            sensors_noise_scale: f64::from(m) / d.epsilon,
            budget_per_period: d.budget,
            period_s: d.period_s,
            windows_per_period: windows,
            releases_per_period: releases,
            epsilon_per_period: releases as f64 * d.epsilon,
            sensitivity: d.sensitivity,
        }
    });
    let k = p.k_anonymity.as_ref().map(|k| KFigures {
        min_subjects: k.min_subjects,
        min_readings: k.min_readings,
        action: match k.action {
            crate::privacy::KAnonymityAction::Suppress => "suppress".into(),
            crate::privacy::KAnonymityAction::Merge => "merge".into(),
        },
        on_noised_counts: dp.is_some(),
    });

    let mut withheld = Vec::new();
    if let Some(k) = &p.k_anonymity {
        withheld.push(match (k.action, dp.is_some()) {
            (_, true) => format!(
                "an aggregate whose noised counts show fewer than {} sensors or {} readings is suppressed (the decision is post-processing of the noise)",
                k.min_subjects, k.min_readings
            ),
            (crate::privacy::KAnonymityAction::Suppress, false) => format!(
                "an aggregate with fewer than {} sensors or {} readings is suppressed (decided on exact counts)",
                k.min_subjects, k.min_readings
            ),
            (crate::privacy::KAnonymityAction::Merge, false) => format!(
                "an aggregate with fewer than {} sensors or {} readings is merged with its group's next windows (at most {}), then suppressed (decided on exact counts)",
                k.min_subjects, k.min_readings, k.max_merge_windows
            ),
        });
    }
    if let Some(f) = &figures {
        if f.releases_per_period < f.windows_per_period {
            withheld.push(format!(
                "after {} releases in a period every declared group is suppressed until the next period (budget {} / epsilon {}; {} windows per period)",
                f.releases_per_period, f.budget_per_period, f.epsilon_per_release, f.windows_per_period
            ));
        } else {
            withheld.push(format!(
                "the budget ({} per {} s) covers every window of a period",
                f.budget_per_period, f.period_s
            ));
        }
        withheld.push("readings of an undeclared group are refused at ingest and counted; an aggregate closing after its window was released is suppressed and counted".into());
    }
    withheld.push(
        "a reading whose grouping attribute is an array or an object is refused and counted".into(),
    );

    let mut hidden = vec![
        "raw readings: their values and timestamps never leave; only aggregates do".to_string(),
        "attributes: only a group name derived from one can leave (as its token when pseudonymized); other attributes never leave".to_string(),
    ];
    if !matches!(cfg.aggregation.group_by, GroupBy::Sensor) {
        hidden.push("sensor ids (the cloud sees a count of distinct sensors, not which)".into());
    } else if p.pseudonymize_sensor {
        hidden.push("sensor ids (they go out as keyed tokens)".into());
    }
    if cfg.privacy.can_suppress() {
        hidden.push(
            "exact totals of readings, rejects and inferences (the health message withholds them)"
                .into(),
        );
    }
    if dp.is_some() {
        hidden.push(
            "which declared group had readings in a window, and exact counts (up to epsilon)"
                .into(),
        );
    }

    let mut observable = vec![
        Observable {
            what: "message timing".into(),
            bound: match dp {
                Some(_) => "windows are released on the gateway's event time: the observer sees when the gateway as a whole had readings (a gateway with none releases nothing), not which group; the time of each release follows the newest closed window".into(),
                None => "each group's aggregate goes when its window closes: the observer sees which group was active in which window".into(),
            },
        },
        Observable {
            what: "message sizes".into(),
            bound: match dp {
                Some(_) => "a message's length follows its (noised) digits and the group name's length: no more than the noised values and the declared names already show".into(),
                None => "a message's length follows its exact counts' digits".into(),
            },
        },
        Observable {
            what: "group existence".into(),
            bound: match dp {
                Some(_) => "fixed: the declared groups, every window (a gateway-wide silence of more than 1440 windows shows as a gap)".into(),
                None => "the groups with readings in each window".into(),
            },
        },
    ];
    if cfg.uplink.as_ref().is_some_and(|u| u.health_interval_s > 0) {
        observable.push(Observable {
            what: "health message".into(),
            bound: if cfg.privacy.can_suppress() {
                "uptime, resident memory (coarse load), the count of released aggregates and the queue; no data total".into()
            } else {
                "exact running totals of readings, rejects and inferences over every group".into()
            },
        });
    }
    if let Some(k) = p.k_anonymity.as_ref().filter(|_| dp.is_none()) {
        observable.push(Observable {
            what: "k-anonymity decisions".into(),
            bound: format!(
                "made on exact counts: a missing aggregate says its group had fewer than {} sensors or {} readings in that window{}",
                k.min_subjects,
                k.min_readings,
                if k.action == crate::privacy::KAnonymityAction::Merge {
                    "; a merged window's width says its first windows alone were below"
                } else {
                    ""
                }
            ),
        });
    }
    if let Some(f) = &figures {
        observable.push(Observable {
            what: "counts".into(),
            bound: format!(
                "each release is {}-differentially private for one protected unit (event level: one reading or inference window, sensitivity {}); a group loses at most {} per {} s period; over n periods, n times that",
                f.epsilon_per_release, f.sensitivity, f.epsilon_per_period, f.period_s
            ),
        });
    }
    Report {
        gateway: gw.clone(),
        policy_version: p.policy_version.clone(),
        messages,
        groups,
        differential_privacy: figures,
        k_anonymity: k,
        withheld,
        hidden,
        observable,
    }
}

impl Report {
    /// The report in plain language.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Privacy report for gateway {} (policy {})",
            self.gateway, self.policy_version
        );
        let _ = writeln!(s, "\nWhat leaves the site:");
        if self.messages.is_empty() {
            let _ = writeln!(s, "  nothing: no uplink and no decisions are configured");
        }
        for m in &self.messages {
            let _ = writeln!(
                s,
                "\n  {} -> {} broker, topic {}\n    sent {}",
                m.message, m.broker, m.topic, m.sent
            );
            for f in &m.fields {
                let how = match f.exposure {
                    Exposure::Exact => "exact",
                    Exposure::Noised => "noised",
                    Exposure::Token => "token",
                    Exposure::Withheld => "withheld",
                    Exposure::NotSent => "not sent",
                };
                let _ = writeln!(s, "    {:<28} {:<9} {}", f.path, how, f.note);
            }
        }
        let _ = writeln!(
            s,
            "\nGroup names ({}): {}",
            self.groups.rule, self.groups.note
        );
        if let Some(d) = &self.groups.declared {
            for (g, name) in d {
                let _ = writeln!(
                    s,
                    "  declared {g:?} released as {}",
                    name.as_deref()
                        .unwrap_or("(token: the key cannot be read here)")
                );
            }
        }
        for t in &self.groups.topics {
            let _ = writeln!(s, "  topic {t}");
        }
        match &self.differential_privacy {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "\nDifferential privacy: epsilon {} per release, shared by {} statistics ({} each); \
                     discrete Laplace noise of scale {} on the counts and {} on sensors; budget {} per {} s: \
                     {} of {} windows released per period, epsilon {} per group and period",
                    f.epsilon_per_release,
                    f.statistics_per_release,
                    f.epsilon_per_statistic,
                    f.count_noise_scale,
                    f.sensors_noise_scale,
                    f.budget_per_period,
                    f.period_s,
                    f.releases_per_period,
                    f.windows_per_period,
                    f.epsilon_per_period
                );
            }
            None => {
                let _ = writeln!(s, "\nDifferential privacy: off (counts are exact)");
            }
        }
        match &self.k_anonymity {
            Some(k) => {
                let _ = writeln!(
                    s,
                    "k-anonymity: k = {} sensors, at least {} readings, {} ({})",
                    k.min_subjects,
                    k.min_readings,
                    k.action,
                    if k.on_noised_counts {
                        "on noised counts"
                    } else {
                        "on exact counts"
                    }
                );
            }
            None => {
                let _ = writeln!(s, "k-anonymity: off");
            }
        }
        let _ = writeln!(s, "\nSuppressed, merged or refused:");
        for w in &self.withheld {
            let _ = writeln!(s, "  - {w}");
        }
        let _ = writeln!(s, "\nNever leaves the site:");
        for h in &self.hidden {
            let _ = writeln!(s, "  - {h}");
        }
        let _ = writeln!(s, "\nStill observable:");
        for o in &self.observable {
            let _ = writeln!(s, "  - {}: {}", o.what, o.bound);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_flatten_with_stars_for_data_keys() {
        let v = serde_json::json!({"a": 1, "b": {"c": null, "d": [1]}, "classes": {"x": 1, "y": 2}, "e": {}});
        assert_eq!(paths(&v), vec!["a", "b.c", "b.d", "classes.*", "e"]);
    }
}
