//! Aggregation: tumbling event-time windows per group. Pure state, no I/O.
//!
//! Input: [`Inferred`] (a window's prediction and the readings it covers).
//! Output: [`Aggregate`], the only type that can reach the cloud uplink.
//!
//! A bucket `[start, start + window_ms)` closes when the group's watermark
//! minus the allowed lateness passes its end. The watermark is one that a
//! single sensor cannot move ([`watermark`]: per-sensor watermarks, the
//! group's the smallest over the sensors that hold it). In live runs, a
//! sensor silent for `idle_close_ms` of monotonic time stops holding its
//! group, and a group whose sensors are all silent has its buckets closed and
//! its state forgotten, so memory follows the sensors that are active. A
//! reading for a closed bucket is late: counted in the next aggregate of its
//! group (`late_readings`) and in metrics, never dropped silently. A reading
//! refused for clock skew is counted in `outpost_rejected_total`.

mod config;
pub mod tombstone;
pub mod watermark;
pub use config::{AggregationConfig, GroupBy};
use tombstone::Tombstones;
use watermark::{ClockSettings, GroupClock};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use outpost_models::manifest::{Manifest, Task};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::inference::{Inferred, Runner};
use crate::ingest::reading::Reading;

/// Version of the aggregate's JSON layout.
pub const AGGREGATE_SCHEMA: u32 = 2;

/// Model identity carried in aggregates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
}

/// Score statistics over a window's inferences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreStats {
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
}

/// The privacy policy an aggregate was released under.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRef {
    /// `privacy.policy_version`.
    pub version: String,
    /// Id of the pseudonymization key in use, when identifiers are pseudonymized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Differential privacy: the epsilon spent on this aggregate's noisy counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// A candidate model run in shadow beside the active one, over the same windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowStats {
    /// The candidate.
    pub model: ModelRef,
    /// Windows both models ran on.
    pub inferences: u64,
    /// Share of those windows where the two agree (same class; same anomaly decision).
    pub agreement: f64,
    /// The candidate's score statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreStats>,
}

/// Drift of this window's inputs and scores against the model's training
/// reference (population stability index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftStats {
    /// Largest PSI over the input features.
    pub input_psi: f64,
    /// The input feature with that PSI.
    pub input_feature: String,
    /// PSI of the model's scores.
    pub score_psi: f64,
    /// Whether either PSI is at or above `governance.drift_alert_psi`.
    pub alert: bool,
}

/// What leaves the gateway: counts and statistics over a group and a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    /// Layout version ([`AGGREGATE_SCHEMA`]).
    pub schema: u32,
    /// Stable unique id: a hash of everything below; the same content always
    /// gets the same id, so a consumer deduplicates re-sent messages by it.
    pub id: String,
    /// Gateway id.
    pub gateway: String,
    /// Group (sensor, site, line ...).
    pub group: String,
    /// Window start, ms since the epoch (inclusive).
    pub window_start: i64,
    /// Window end, ms since the epoch (exclusive).
    pub window_end: i64,
    /// Emitted before the window was complete (at shutdown).
    pub partial: bool,
    /// Readings in the window.
    pub readings: u64,
    /// Readings that arrived after their window had closed, counted here.
    pub late_readings: u64,
    /// Windows inferred.
    pub inferences: u64,
    /// Distinct sensors.
    pub sensors: u64,
    /// Model that produced the inferences.
    pub model: ModelRef,
    /// Inferences per class (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<BTreeMap<String, u64>>,
    /// Anomalous windows (detectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<u64>,
    /// Anomalous windows over inferences (detectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_rate: Option<f64>,
    /// Score statistics; absent when there was no inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreStats>,
    /// The privacy policy applied.
    pub policy: PolicyRef,
    /// Inferences per model (`name@version`) when more than one model
    /// contributed to the window (a model was activated inside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<BTreeMap<String, u64>>,
    /// The shadow candidate's comparison, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStats>,
    /// Drift against the model's training reference, when it carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftStats>,
    /// The first aggregate of its group after an unclean start of a gateway
    /// that cannot replay what it had accepted (memory outbox, journal off):
    /// readings accepted before the crash may be missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gap: bool,
    /// Journal sequence numbers of the readings this aggregate counts (never
    /// serialized: they go to the ingest journal, not to the cloud).
    #[serde(skip)]
    pub covers: Vec<u64>,
}

impl Aggregate {
    /// The id for this content (computed with `id` empty).
    pub fn compute_id(&self) -> String {
        let mut copy = self.clone();
        copy.id = String::new();
        // Serializing plain data with string keys cannot fail.
        let bytes = serde_json::to_vec(&copy).unwrap_or_default();
        hex::encode(&Sha256::digest(&bytes)[..16])
    }

    /// Fold `later` (the same group, a later window) into this aggregate:
    /// one coarser window covering both. Counts stay exact (readings, late
    /// readings, inferences, per-class counts, anomalies); `sensors` becomes
    /// the larger of the two (a distinct count cannot be merged exactly), the
    /// score mean is weighted by inferences, its max is exact and its p95
    /// becomes the larger p95 (an upper bound). The id is recomputed.
    pub fn merge(&mut self, later: &Aggregate) {
        self.window_start = self.window_start.min(later.window_start);
        self.window_end = self.window_end.max(later.window_end);
        self.partial |= later.partial;
        self.gap |= later.gap;
        self.covers.extend_from_slice(&later.covers);
        self.readings += later.readings;
        self.late_readings += later.late_readings;
        self.sensors = self.sensors.max(later.sensors);
        let (n1, n2) = (self.inferences as f64, later.inferences as f64);
        self.inferences += later.inferences;
        if let Some(b) = &later.classes {
            let a = self.classes.get_or_insert_with(BTreeMap::new);
            for (k, v) in b {
                *a.entry(k.clone()).or_insert(0) += v;
            }
        }
        if later.anomalies.is_some() || self.anomalies.is_some() {
            let total = self.anomalies.unwrap_or(0) + later.anomalies.unwrap_or(0);
            self.anomalies = Some(total);
            self.anomaly_rate =
                (self.inferences > 0).then(|| total as f64 / self.inferences as f64);
        }
        self.score = merge_scores(self.score.take(), &later.score, n1, n2);
        // Inferences per model: a single-model aggregate counts all its inferences for `model`.
        let per_model = |a: &Aggregate| {
            a.models.clone().unwrap_or_else(|| {
                [(
                    format!("{}@{}", a.model.name, a.model.version),
                    a.inferences,
                )]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect()
            })
        };
        let mut models = per_model(self);
        for (k, v) in per_model(later) {
            *models.entry(k).or_insert(0) += v;
        }
        self.models = (models.len() > 1).then_some(models);
        self.model = later.model.clone();
        self.shadow = match (self.shadow.take(), &later.shadow) {
            (Some(a), Some(b)) if a.model == b.model => {
                let (s1, s2) = (a.inferences as f64, b.inferences as f64);
                let inferences = a.inferences + b.inferences;
                Some(ShadowStats {
                    agreement: if inferences > 0 {
                        round6((a.agreement * s1 + b.agreement * s2) / (s1 + s2))
                    } else {
                        0.0
                    },
                    score: merge_scores(a.score, &b.score, s1, s2),
                    model: b.model.clone(),
                    inferences,
                })
            }
            (a, b) => b.clone().or(a),
        };
        // Drift of the merged window is bounded by the larger of the two.
        self.drift = match (self.drift.take(), &later.drift) {
            (Some(a), Some(b)) => {
                let (input_psi, input_feature) = if b.input_psi > a.input_psi {
                    (b.input_psi, b.input_feature.clone())
                } else {
                    (a.input_psi, a.input_feature)
                };
                Some(DriftStats {
                    input_psi,
                    input_feature,
                    score_psi: a.score_psi.max(b.score_psi),
                    alert: a.alert || b.alert,
                })
            }
            (a, b) => a.or_else(|| b.clone()),
        };
        self.id = self.compute_id();
    }
}

/// Assigns readings to groups: fixed assignments first, then the rule.
#[derive(Debug, Clone)]
pub struct Grouper {
    rule: GroupBy,
    fixed: BTreeMap<String, Arc<str>>,
    gateway: Arc<str>,
    unassigned: Arc<str>,
}

impl Grouper {
    /// From the aggregation config.
    pub fn new(cfg: &AggregationConfig, gateway: &str) -> Self {
        Self {
            rule: cfg.group_by.clone(),
            fixed: cfg
                .groups
                .iter()
                .map(|(k, v)| (k.clone(), Arc::from(v.as_str())))
                .collect(),
            gateway: Arc::from(gateway),
            unassigned: Arc::from("unassigned"),
        }
    }

    /// The group a sensor is assigned to in `aggregation.groups`, if any.
    pub fn fixed_group(&self, sensor: &str) -> Option<Arc<str>> {
        self.fixed.get(sensor).cloned()
    }

    /// The grouping rule.
    pub fn rule(&self) -> &GroupBy {
        &self.rule
    }

    /// Whether `name` is a fixed group's name (`aggregation.groups`).
    pub fn is_fixed_name(&self, name: &str) -> bool {
        self.fixed.values().any(|g| &**g == name)
    }

    /// The group of a reading. Only a scalar names a group: an array or an
    /// object (whose keys could carry anything) gives `unassigned`; the
    /// privacy stage refuses such readings before they get here.
    pub fn group_of(&self, r: &Reading) -> Arc<str> {
        if let Some(g) = self.fixed.get(&*r.sensor) {
            return g.clone();
        }
        match &self.rule {
            GroupBy::Sensor => r.sensor.clone(),
            GroupBy::Gateway => self.gateway.clone(),
            GroupBy::Attr(a) => match r.attrs.get(a) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Arc::from(s.as_str()),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    Arc::from(v.to_string().as_str())
                }
                _ => self.unassigned.clone(),
            },
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Bucket {
    readings: u64,
    inferences: u64,
    classes: Vec<u64>,
    anomalies: u64,
    scores: Vec<f32>,
    sensors: BTreeSet<Arc<str>>,
    /// Inferences per model.
    models: BTreeMap<Arc<str>, u64>,
    /// The model of the latest inference.
    last_model: Option<Arc<Runner>>,
    /// Drift input summaries, one per inference.
    summaries: Vec<Vec<f32>>,
    shadow: Option<ShadowBucket>,
    /// Journal sequence numbers of the readings counted here.
    covers: Vec<u64>,
}

#[derive(Debug, Clone)]
struct ShadowBucket {
    model: Arc<Runner>,
    inferences: u64,
    agree: u64,
    scores: Vec<f32>,
}

/// Drift settings of the aggregator.
#[derive(Debug, Clone, Copy)]
pub struct DriftSettings {
    /// PSI at or above which an aggregate's drift is an alert.
    pub alert_psi: f64,
    /// Fewest inferences in a window for its drift to be computed (PSI over
    /// a handful of values says nothing).
    pub min_inferences: u64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            alert_psi: 0.25,
            min_inferences: 10,
        }
    }
}

#[derive(Debug)]
struct GroupState {
    /// Its watermark.
    clock: GroupClock,
    /// Every bucket starting before this is closed.
    closed_before: i64,
    open: BTreeMap<i64, Bucket>,
    late_pending: u64,
    /// Journal sequence numbers of the late readings in `late_pending`.
    late_covers: Vec<u64>,
}

/// Counters the aggregator reports for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AggregatorStats {
    /// Late readings so far.
    pub late_readings: u64,
    /// Inferences whose window had already closed.
    pub late_inferences: u64,
    /// Readings refused for clock skew ([`watermark`]).
    pub clock_skew: u64,
    /// Inferences at a time refused for clock skew (their readings are
    /// counted there).
    pub skewed_inferences: u64,
    /// Groups forgotten after idling.
    pub groups_evicted: u64,
}

/// The aggregation state machine.
#[derive(Debug)]
pub struct Aggregator {
    window_ms: i64,
    lateness_ms: i64,
    idle_close_ms: i64,
    max_skew_ms: i64,
    /// Live runs: readings too far ahead of their group may be refused.
    live: bool,
    /// Whether the gateway's wall clock is set (at the latest tick).
    wall_clock_set: bool,
    /// Monotonic time of the latest [`Aggregator::tick`].
    now_ms: i64,
    gateway: String,
    model: ModelRef,
    task: Task,
    labels: Vec<String>,
    groups: BTreeMap<Arc<str>, GroupState>,
    stats: AggregatorStats,
    drift: DriftSettings,
    /// After an unclean start without a journal: the groups whose first
    /// aggregate has been marked `gap` ([`Aggregator::with_gap`]).
    gap: Option<BTreeSet<Arc<str>>>,
    /// Groups forgotten after idling, by where they had closed.
    tombstones: Tombstones,
    /// Journal sequences of readings refused here (clock skew), accounted
    /// for without an aggregate ([`Aggregator::take_settled`]).
    settled: Vec<u64>,
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Score statistics of two windows with `n1` and `n2` inferences: the mean
/// weighted, the max exact, the p95 the larger (an upper bound).
fn merge_scores(
    a: Option<ScoreStats>,
    b: &Option<ScoreStats>,
    n1: f64,
    n2: f64,
) -> Option<ScoreStats> {
    match (a, b) {
        (Some(a), Some(b)) => Some(ScoreStats {
            mean: if n1 + n2 > 0.0 {
                (a.mean * n1 + b.mean * n2) / (n1 + n2)
            } else {
                a.mean
            },
            max: a.max.max(b.max),
            p95: a.p95.max(b.p95),
        }),
        (a, b) => a.or_else(|| b.clone()),
    }
}

/// Mean, max and p95 (nearest rank) of `scores`; `None` when empty.
fn score_stats(scores: &[f32]) -> Option<ScoreStats> {
    if scores.is_empty() {
        return None;
    }
    let mut s = scores.to_vec();
    s.sort_by(f32::total_cmp);
    let n = s.len();
    let mean = s.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
    Some(ScoreStats {
        mean: round6(mean),
        max: round6(s[n - 1] as f64),
        p95: round6(s[rank - 1] as f64),
    })
}

impl Aggregator {
    /// An aggregator for `model`'s outputs.
    pub fn new(cfg: &AggregationConfig, gateway: &str, model: &Manifest) -> Self {
        Self {
            window_ms: cfg.window_ms.max(1),
            lateness_ms: cfg.allowed_lateness_ms.max(0),
            idle_close_ms: cfg.idle_close_ms.max(0),
            max_skew_ms: cfg.max_skew_ms.max(1),
            live: false,
            wall_clock_set: true,
            now_ms: 0,
            gateway: gateway.to_string(),
            model: ModelRef {
                name: model.name.clone(),
                version: model.version.clone(),
            },
            task: model.task,
            labels: model.labels.clone(),
            groups: BTreeMap::new(),
            stats: AggregatorStats::default(),
            drift: DriftSettings::default(),
            gap: None,
            tombstones: Tombstones::default(),
            settled: Vec::new(),
        }
    }

    /// Apply the settings of a new `[aggregation]` table that can change
    /// while windows are open (live reconfiguration): the lateness allowed
    /// and the idle close. The window length cannot (a window would change
    /// its bounds, and its id, while open): that takes a restart, which
    /// closes the open windows first.
    pub fn reconfigure(&mut self, cfg: &AggregationConfig) {
        self.lateness_ms = cfg.allowed_lateness_ms.max(0);
        self.idle_close_ms = cfg.idle_close_ms.max(0);
        self.max_skew_ms = cfg.max_skew_ms.max(1);
    }

    /// How the groups' watermarks treat their sensors now.
    fn clock_settings(&self) -> ClockSettings {
        ClockSettings {
            max_skew_ms: self.max_skew_ms,
            idle_ms: self.idle_close_ms,
            refuse_skew: self.live && !self.wall_clock_set,
        }
    }

    /// Groups tracked.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// With these drift settings.
    pub fn with_drift(mut self, drift: DriftSettings) -> Self {
        self.drift = drift;
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> AggregatorStats {
        self.stats
    }

    /// Open buckets over all groups.
    pub fn open_windows(&self) -> usize {
        self.groups.values().map(|g| g.open.len()).sum()
    }

    /// Mark the first aggregate of each group `gap`: the gateway did not
    /// stop cleanly and cannot replay the readings it had accepted.
    pub fn with_gap(mut self) -> Self {
        self.gap = Some(BTreeSet::new());
        self
    }

    /// Set `gap` on the first aggregate of each group in `out` (see
    /// [`Aggregator::with_gap`]).
    pub fn mark_gaps(&mut self, out: &mut [Aggregate]) {
        let Some(marked) = self.gap.as_mut() else {
            return;
        };
        for a in out {
            if !marked.contains(a.group.as_str()) {
                marked.insert(Arc::from(a.group.as_str()));
                a.gap = true;
                a.id = a.compute_id();
            }
        }
        // Bounded under sensor churn: once this many groups have had their
        // first aggregate since the start, marking stops (a group seen
        // before the crash that only comes back after that many others is
        // not marked; new groups lost nothing to the crash).
        if marked.len() >= tombstone::TOMBSTONES_MAX {
            self.gap = None;
        }
    }

    fn align(&self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.window_ms)
    }

    /// Add one result; closed aggregates are appended to `out`, oldest first.
    pub fn push(&mut self, ev: Inferred, out: &mut Vec<Aggregate>) {
        let window_ms = self.window_ms;
        let start_of = |ts: i64| ts - ts.rem_euclid(window_ms);
        let classes = self.labels.len();
        let settings = self.clock_settings();
        let now = self.now_ms;
        let tombstones = &mut self.tombstones;
        let gs = self
            .groups
            .entry(ev.group.clone())
            .or_insert_with(|| GroupState {
                clock: GroupClock::new(),
                // A group evicted a while ago goes on where it had closed.
                closed_before: tombstones.raise(&ev.group).unwrap_or(i64::MIN),
                open: BTreeMap::new(),
                late_pending: 0,
                late_covers: Vec::new(),
            });
        let inference_skewed = gs.clock.is_skewed(&ev.sensor, ev.ts_ms, &settings);
        for (i, &ts) in ev.readings.iter().enumerate() {
            let start = start_of(ts);
            // 0: not journaled.
            let seq = ev.seqs.get(i).copied().unwrap_or(0);
            if !gs.clock.observe(&ev.sensor, ts, now, &settings) {
                // Refused (counted in metrics); its journal sequence is
                // settled: accounted for, never replayed.
                self.stats.clock_skew += 1;
                if seq != 0 {
                    self.settled.push(seq);
                }
                continue;
            }
            if start < gs.closed_before {
                gs.late_pending += 1;
                if seq != 0 {
                    gs.late_covers.push(seq);
                }
                self.stats.late_readings += 1;
                continue;
            }
            let b = gs.open.entry(start).or_default();
            if seq != 0 {
                b.covers.push(seq);
            }
            b.readings += 1;
            b.sensors.insert(ev.sensor.clone());
        }
        if let Some(p) = &ev.prediction {
            let start = start_of(ev.ts_ms);
            if inference_skewed {
                self.stats.skewed_inferences += 1;
            } else if start < gs.closed_before {
                self.stats.late_inferences += 1;
            } else {
                let b = gs.open.entry(start).or_default();
                b.inferences += 1;
                b.sensors.insert(ev.sensor.clone());
                if b.classes.len() < classes {
                    b.classes.resize(classes, 0);
                }
                if let Some(c) = p.class
                    && c < classes
                {
                    b.classes[c] += 1;
                }
                if p.anomaly {
                    b.anomalies += 1;
                }
                b.scores.push(p.score);
                if let Some(m) = &ev.model {
                    *b.models.entry(m.id.clone()).or_insert(0) += 1;
                    b.last_model = Some(m.clone());
                }
                if let Some(s) = ev.summary {
                    b.summaries.push(s);
                }
                if let Some((runner, sp)) = ev.shadow {
                    let agree = match self.task {
                        Task::Classifier => sp.class == p.class,
                        Task::Detector => sp.anomaly == p.anomaly,
                    };
                    // A new shadow model starts its own comparison.
                    let sb = match &mut b.shadow {
                        Some(sb) if sb.model.id == runner.id => sb,
                        _ => b.shadow.insert(ShadowBucket {
                            model: runner,
                            inferences: 0,
                            agree: 0,
                            scores: Vec::new(),
                        }),
                    };
                    sb.inferences += 1;
                    sb.agree += u64::from(agree);
                    sb.scores.push(sp.score);
                }
            }
        }
        let watermark = gs.clock.advance(&settings);
        let group = ev.group;
        if let Some(w) = watermark {
            self.close_group(&group, w.saturating_sub(self.lateness_ms), false, out);
        }
    }

    /// Close every bucket of `group` that ends at or before `until`.
    fn close_group(
        &mut self,
        group: &Arc<str>,
        until: i64,
        partial: bool,
        out: &mut Vec<Aggregate>,
    ) {
        let aligned = if until == i64::MAX {
            i64::MAX
        } else {
            self.align(until)
        };
        let Some(gs) = self.groups.get_mut(group) else {
            return;
        };
        if aligned > gs.closed_before {
            gs.closed_before = aligned;
        }
        let still_open = gs.open.split_off(&gs.closed_before);
        let closing = std::mem::replace(&mut gs.open, still_open);
        let late = if closing.is_empty() {
            (0, Vec::new())
        } else {
            (
                std::mem::take(&mut gs.late_pending),
                std::mem::take(&mut gs.late_covers),
            )
        };
        self.emit(group, closing, late, |_, _| partial, out);
    }

    /// Finish `buckets` in order; late readings go to the first.
    fn emit(
        &self,
        group: &str,
        buckets: BTreeMap<i64, Bucket>,
        mut late: (u64, Vec<u64>),
        partial: impl Fn(i64, i64) -> bool,
        out: &mut Vec<Aggregate>,
    ) {
        for (start, b) in buckets {
            let p = partial(start, start + self.window_ms);
            out.push(self.finish(group, start, b, std::mem::take(&mut late), p));
        }
    }

    /// PSI of the window's input summaries and scores against the reference
    /// of the model that ran last; `None` without a reference or with too
    /// few inferences.
    fn drift_of(&self, b: &Bucket) -> Option<DriftStats> {
        let runner = b.last_model.as_ref()?;
        let reference = runner.manifest().reference.as_ref()?;
        if b.inferences < self.drift.min_inferences || b.summaries.is_empty() {
            return None;
        }
        let mut input_psi = 0.0f64;
        let mut input_feature = String::new();
        for (i, named) in reference.features.iter().enumerate() {
            let values: Vec<f64> = b
                .summaries
                .iter()
                .filter_map(|s| s.get(i).map(|&v| v as f64))
                .collect();
            let psi = outpost_models::drift::psi(
                &named.histogram.proportions,
                &named.histogram.counts(&values),
            );
            if psi > input_psi || input_feature.is_empty() {
                input_psi = psi;
                input_feature = named.name.clone();
            }
        }
        let scores: Vec<f64> = b.scores.iter().map(|&v| v as f64).collect();
        let score_psi = outpost_models::drift::psi(
            &reference.score.proportions,
            &reference.score.counts(&scores),
        );
        let (input_psi, score_psi) = (round6(input_psi), round6(score_psi));
        Some(DriftStats {
            alert: input_psi >= self.drift.alert_psi || score_psi >= self.drift.alert_psi,
            input_psi,
            input_feature,
            score_psi,
        })
    }

    fn finish(
        &self,
        group: &str,
        start: i64,
        mut b: Bucket,
        (late, late_covers): (u64, Vec<u64>),
        partial: bool,
    ) -> Aggregate {
        b.covers.extend(late_covers);
        let drift = self.drift_of(&b);
        let score = score_stats(&b.scores);
        let model = match &b.last_model {
            Some(r) => ModelRef {
                name: r.manifest().name.clone(),
                version: r.manifest().version.clone(),
            },
            None => self.model.clone(),
        };
        let models = (b.models.len() > 1).then(|| {
            b.models
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        });
        let shadow = b.shadow.as_ref().map(|sb| ShadowStats {
            model: ModelRef {
                name: sb.model.manifest().name.clone(),
                version: sb.model.manifest().version.clone(),
            },
            inferences: sb.inferences,
            agreement: if sb.inferences > 0 {
                round6(sb.agree as f64 / sb.inferences as f64)
            } else {
                0.0
            },
            score: score_stats(&sb.scores),
        });
        let (classes, anomalies, anomaly_rate) = match self.task {
            Task::Classifier => {
                let mut m = BTreeMap::new();
                for (i, label) in self.labels.iter().enumerate() {
                    m.insert(label.clone(), b.classes.get(i).copied().unwrap_or(0));
                }
                (Some(m), None, None)
            }
            Task::Detector => {
                let rate = if b.inferences > 0 {
                    round6(b.anomalies as f64 / b.inferences as f64)
                } else {
                    0.0
                };
                (None, Some(b.anomalies), Some(rate))
            }
        };
        let mut agg = Aggregate {
            schema: AGGREGATE_SCHEMA,
            id: String::new(),
            gateway: self.gateway.clone(),
            group: group.to_string(),
            window_start: start,
            window_end: start + self.window_ms,
            partial,
            readings: b.readings,
            late_readings: late,
            inferences: b.inferences,
            sensors: b.sensors.len() as u64,
            model,
            classes,
            anomalies,
            anomaly_rate,
            score,
            policy: PolicyRef::default(),
            models,
            shadow,
            drift,
            gap: false,
            covers: b.covers,
        };
        agg.id = agg.compute_id();
        agg
    }

    /// The journal sequences of the readings refused since the last call
    /// (`clock_skew`): the journal may forget them.
    pub fn take_settled(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.settled)
    }

    /// The monotonic time (ms) readings pushed from now on arrive at: a
    /// sensor is seen when its readings arrive ([`Aggregator::tick`]).
    pub fn set_now(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Live runs: whether the gateway's wall clock is set
    /// ([`crate::clock::is_set`]). While it is not, ingest cannot refuse
    /// readings from the future, and a reading far ahead of the rest of its
    /// group is refused here instead (`clock_skew`, [`watermark`]).
    pub fn set_wall_clock(&mut self, set: bool) {
        self.wall_clock_set = set;
    }

    /// Live runs, called periodically with the monotonic clock (ms): a
    /// sensor silent for `idle_close_ms` stops holding its group's watermark
    /// (which may close buckets); a group whose sensors are all silent has
    /// its open buckets closed (not partial: its sensors went quiet) and its
    /// state forgotten, so a gateway's memory follows its active sensors. A
    /// group seen again later starts afresh. Event times are never compared
    /// with a clock here, so backfilled or replayed data with old timestamps
    /// aggregates exactly like live data.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Aggregate>) {
        self.now_ms = self.now_ms.max(now_ms);
        let (now, idle_ms, lateness) = (self.now_ms, self.idle_close_ms, self.lateness_ms);
        let settings = self.clock_settings();
        let mut closes = Vec::new();
        let mut gone = Vec::new();
        for (k, g) in &mut self.groups {
            g.clock.evict_idle(now, idle_ms);
            if g.clock.sensors() == 0 {
                gone.push(k.clone());
            } else if let Some(w) = g.clock.advance(&settings) {
                closes.push((k.clone(), w.saturating_sub(lateness)));
            }
        }
        for (g, until) in closes {
            self.close_group(&g, until, false, out);
        }
        for g in gone {
            self.evict_group(&g, |_, _| false, out);
            self.stats.groups_evicted += 1;
        }
        self.tombstones.expire(self.now_ms);
    }

    /// Emit every open bucket of `group` (its late readings with the first,
    /// or in an aggregate of their own when none is open, so they are still
    /// counted) and forget the group.
    fn evict_group(
        &mut self,
        group: &Arc<str>,
        partial: impl Fn(i64, i64) -> bool,
        out: &mut Vec<Aggregate>,
    ) {
        let Some(gs) = self.groups.remove(group) else {
            return;
        };
        let late = (gs.late_pending, gs.late_covers);
        let mut closed_before = gs.closed_before;
        if let Some(last) = gs.open.keys().next_back() {
            closed_before = closed_before.max(last + self.window_ms);
            self.emit(group, gs.open, late, partial, out);
        } else if late.0 > 0 {
            // In an aggregate of their own, for the next window (each window
            // of a group is delivered once, so ids stay distinct), which is
            // closed from now on.
            out.push(self.finish(group, closed_before, Bucket::default(), late, false));
            closed_before = closed_before.saturating_add(self.window_ms);
        }
        self.tombstones
            .bury(group.clone(), closed_before, self.now_ms);
    }

    /// At shutdown or end of input: emit every open bucket. Buckets whose end
    /// the watermark had not reached are marked `partial`.
    pub fn flush(&mut self, out: &mut Vec<Aggregate>) {
        let groups: Vec<Arc<str>> = self.groups.keys().cloned().collect();
        for g in groups {
            let Some(gs) = self.groups.get(&g) else {
                continue;
            };
            let watermark = gs
                .clock
                .watermark()
                .map_or(i64::MIN, |w| w.saturating_sub(self.lateness_ms));
            self.evict_group(&g, |_, end| end > watermark, out);
        }
    }
}

/// How [`spawn`] runs.
#[derive(Debug, Clone, Copy)]
pub struct StageMode<F> {
    /// A live run (not a replay): ticks on the monotonic clock, see [`spawn`].
    pub live: bool,
    /// Takes the journal sequences of readings refused here (accounted for,
    /// never to be replayed).
    pub settle: F,
}

/// Run the aggregation stage: each inferred window is offered to the local
/// decisions (dropped and counted when their queue is full) and added to
/// its group's bucket; closed aggregates go to `aggregates`. `live`: every
/// 500 ms of the monotonic clock, silent sensors stop holding their groups
/// and silent groups are closed and forgotten, and a reading far ahead of
/// its group is refused while the gateway's clock is not set (its journal
/// sequence goes to `settle`).
/// When `inferred` closes, every bucket is flushed and `aggregates` closes.
pub fn spawn(
    mut aggregator: Aggregator,
    inferred: flume::Receiver<Inferred>,
    mut decisions: Option<(
        flume::Sender<crate::decisions::Decision>,
        crate::decisions::DecisionFilter,
    )>,
    aggregates: flume::Sender<Aggregate>,
    settings: flume::Receiver<AggregationConfig>,
    metrics: Arc<crate::metrics::Metrics>,
    mode: StageMode<impl Fn(&[u64]) + Send + 'static>,
) -> tokio::task::JoinHandle<()> {
    let StageMode { live, settle } = mode;
    tokio::spawn(async move {
        aggregator.live = live;
        let mut out = Vec::new();
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(500));
        let mut seen = AggregatorStats::default();
        // The aggregator's counters into metrics (they only grow).
        let report = |a: &Aggregator, seen: &mut AggregatorStats| {
            let s = a.stats();
            metrics
                .late_readings
                .inc_by(s.late_readings - seen.late_readings);
            if s.clock_skew > seen.clock_skew {
                metrics
                    .rejected
                    .get_or_create(&crate::metrics::RejectLabels {
                        source: "aggregation".into(),
                        reason: crate::ingest::reading::RejectReason::ClockSkew
                            .as_str()
                            .into(),
                    })
                    .inc_by(s.clock_skew - seen.clock_skew);
            }
            metrics
                .groups_evicted
                .inc_by(s.groups_evicted - seen.groups_evicted);
            *seen = s;
        };
        let send = |out: &mut Vec<Aggregate>| {
            let batch: Vec<Aggregate> = std::mem::take(out);
            let tx = aggregates.clone();
            async move {
                for a in batch {
                    if tx.send_async(a).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        loop {
            if let Ok(cfg) = settings.try_recv() {
                aggregator.reconfigure(&cfg);
            }
            let next = if live {
                tokio::select! {
                    r = inferred.recv_async() => r.ok(),
                    _ = ticker.tick() => {
                        aggregator.set_wall_clock(crate::clock::is_set(crate::clock::now_ms()));
                        aggregator.tick(crate::clock::mono_ms(), &mut out);
                        report(&aggregator, &mut seen);
                        aggregator.mark_gaps(&mut out);
                        if !send(&mut out).await { return; }
                        continue;
                    }
                }
            } else {
                inferred.recv_async().await.ok()
            };
            let Some(inf) = next else { break };
            if let Some((tx, filter)) = decisions.as_mut()
                && let Some(d) = filter.decide(&inf)
                && tx.try_send(d).is_err()
            {
                metrics.decisions_dropped.inc();
            }
            if live {
                aggregator.set_now(crate::clock::mono_ms());
            }
            aggregator.push(inf, &mut out);
            report(&aggregator, &mut seen);
            let settled = aggregator.take_settled();
            if !settled.is_empty() {
                settle(&settled);
            }
            aggregator.mark_gaps(&mut out);
            if !send(&mut out).await {
                return;
            }
        }
        aggregator.flush(&mut out);
        aggregator.mark_gaps(&mut out);
        send(&mut out).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_models::Prediction;
    use outpost_models::manifest::*;
    use proptest::prelude::*;

    fn manifest() -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            name: "m".into(),
            version: "1.0.0".into(),
            task: Task::Classifier,
            architecture: Architecture::Mlp { hidden: vec![] },
            input: InputSpec {
                kind: InputKind::Raw,
                channels: 1,
                length: 4,
                features: vec![],
                window: None,
            },
            normalization: Normalization::None,
            labels: vec!["a".into(), "b".into(), "c".into()],
            anomaly_threshold: None,
            weights: "w".into(),
            provenance: None,
            metrics: Default::default(),
            created_at: String::new(),
            files: [("w".to_string(), String::new())].into(),
            reference: None,
        }
    }

    fn cfg(window_ms: i64, lateness: i64) -> AggregationConfig {
        AggregationConfig {
            window_ms,
            allowed_lateness_ms: lateness,
            ..Default::default()
        }
    }

    fn ev(
        group: &str,
        sensor: &str,
        ts: i64,
        n_readings: i64,
        class: usize,
        score: f32,
    ) -> Inferred {
        Inferred {
            sensor: Arc::from(sensor),
            group: Arc::from(group),
            ts_ms: ts,
            readings: (0..n_readings).map(|k| ts - k).collect(),
            prediction: Some(Prediction {
                class: Some(class),
                score,
                anomaly: false,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn closes_on_watermark_and_counts_late() {
        let m = manifest();
        let mut a = Aggregator::new(&cfg(1000, 100), "gw", &m);
        let mut out = Vec::new();
        a.push(ev("g", "s", 500, 1, 0, 0.5), &mut out);
        a.push(ev("g", "s", 1050, 1, 1, 0.7), &mut out);
        assert!(out.is_empty(), "watermark 500 - 100 has not passed 1000");
        // The sensor's watermark is the older of its two latest readings:
        // 1050 - 100 has not passed 1000 either.
        a.push(ev("g", "s", 1150, 1, 1, 0.9), &mut out);
        assert!(out.is_empty());
        a.push(ev("g", "s", 1160, 1, 1, 0.8), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].window_start, out[0].readings, out[0].inferences),
            (0, 1, 1)
        );
        assert_eq!(out[0].classes.as_ref().unwrap()["a"], 1);
        // A reading for the closed bucket is late, and reported with the next aggregate.
        a.push(ev("g", "s", 900, 1, 2, 0.1), &mut out);
        assert_eq!(a.stats().late_readings, 1);
        a.flush(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].late_readings, 1);
        assert_eq!(out[1].readings, 3);
        assert!(out[1].partial);
        assert_eq!(out[1].score.as_ref().unwrap().max, round6(0.9f32 as f64));
        assert_ne!(out[0].id, out[1].id);
        assert_eq!(out[0].id, out[0].compute_id());
    }

    #[test]
    fn grouping_rules() {
        let r = |sensor: &str, attrs: serde_json::Value| Reading {
            sensor: Arc::from(sensor),
            ts_ms: 0,
            values: vec![],
            attrs: attrs
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            seq: 0,
            ack: None,
        };
        let mut cfg = AggregationConfig {
            group_by: GroupBy::Attr("line".into()),
            ..Default::default()
        };
        cfg.groups.insert("pump-7".into(), "line-z".into());
        let g = Grouper::new(&cfg, "gw");
        assert_eq!(
            &*g.group_of(&r("a", serde_json::json!({"line": "L1"}))),
            "L1"
        );
        assert_eq!(&*g.group_of(&r("a", serde_json::json!({"line": 4}))), "4");
        assert_eq!(&*g.group_of(&r("a", serde_json::json!({}))), "unassigned");
        assert_eq!(
            &*g.group_of(&r("pump-7", serde_json::json!({"line": "L1"}))),
            "line-z",
            "fixed assignments first"
        );
        let g = Grouper::new(
            &AggregationConfig {
                group_by: GroupBy::Gateway,
                ..Default::default()
            },
            "gw",
        );
        assert_eq!(&*g.group_of(&r("a", serde_json::json!({}))), "gw");
    }

    /// `n` values spread over `h`'s bins in its proportions.
    fn like(h: &outpost_models::drift::Histogram, n: usize) -> Vec<f64> {
        let e = &h.edges;
        let mut v = Vec::new();
        for (i, p) in h.proportions.iter().enumerate() {
            let rep = match (i, e.len()) {
                (_, 0) => 0.0,
                (0, _) => e[0] - 1.0,
                (i, l) if i == l => e[l - 1] + 1.0,
                (i, _) => (e[i - 1] + e[i]) / 2.0,
            };
            v.extend(std::iter::repeat_n(rep, (p * n as f64).round() as usize));
        }
        v.resize(n, v.last().copied().unwrap_or(0.0));
        v
    }

    #[test]
    fn drift_against_the_training_reference() {
        let model = crate::inference::load_model(&crate::inference::ModelSource::Bundled)
            .expect("bundled model loads");
        let reference = model
            .manifest()
            .reference
            .clone()
            .expect("the bundled manifest has a reference");
        let runner = Runner::new(Arc::new(model));
        let n = 400;
        let features: Vec<Vec<f64>> = reference
            .features
            .iter()
            .map(|f| like(&f.histogram, n))
            .collect();
        let scores = like(&reference.score, n);
        let run = |shift: f64| {
            let mut a = Aggregator::new(&cfg(1_000_000, 0), "gw", runner.manifest()).with_drift(
                DriftSettings {
                    alert_psi: 0.25,
                    min_inferences: 10,
                },
            );
            let mut out = Vec::new();
            for k in 0..n {
                a.push(
                    Inferred {
                        sensor: Arc::from("s"),
                        group: Arc::from("g"),
                        ts_ms: k as i64,
                        readings: vec![k as i64],
                        prediction: Some(Prediction {
                            class: Some(0),
                            score: scores[k] as f32,
                            anomaly: false,
                        }),
                        model: Some(runner.clone()),
                        summary: Some(features.iter().map(|f| (f[k] + shift) as f32).collect()),
                        shadow: None,
                        seqs: Vec::new(),
                    },
                    &mut out,
                );
            }
            a.flush(&mut out);
            out.remove(0)
                .drift
                .expect("drift with a reference and enough inferences")
        };
        let same = run(0.0);
        assert!(same.input_psi < 0.1 && same.score_psi < 0.1, "{same:?}");
        assert!(!same.alert);
        let shifted = run(100.0);
        assert!(shifted.input_psi > 0.25, "{shifted:?}");
        assert!(shifted.alert);
        assert!(shifted.input_feature.starts_with("ch"), "{shifted:?}");
    }

    #[test]
    fn detector_aggregates_count_anomalies() {
        let mut m = manifest();
        m.task = Task::Detector;
        m.labels.clear();
        m.anomaly_threshold = Some(0.5);
        let mut a = Aggregator::new(&cfg(1000, 0), "gw", &m);
        let mut out = Vec::new();
        for (ts, anomaly) in [(10, true), (20, false), (30, true), (40, false)] {
            a.push(
                Inferred {
                    sensor: Arc::from("s"),
                    group: Arc::from("g"),
                    ts_ms: ts,
                    readings: vec![ts],
                    prediction: Some(Prediction {
                        class: None,
                        score: if anomaly { 0.9 } else { 0.1 },
                        anomaly,
                    }),
                    ..Default::default()
                },
                &mut out,
            );
        }
        a.flush(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].anomalies, Some(2));
        assert_eq!(out[0].anomaly_rate, Some(0.5));
        assert!(out[0].classes.is_none());
    }

    #[test]
    fn tick_closes_idle_windows() {
        let m = manifest();
        let mut a = Aggregator::new(
            &AggregationConfig {
                window_ms: 1000,
                allowed_lateness_ms: 0,
                idle_close_ms: 500,
                ..Default::default()
            },
            "gw",
            &m,
        );
        let mut out = Vec::new();
        // Ticks on the monotonic clock; event times are never compared with it.
        a.tick(3_600_000, &mut out);
        a.push(ev("g", "s", 100, 1, 0, 0.5), &mut out);
        a.tick(3_600_400, &mut out);
        assert!(out.is_empty(), "idle for 400 ms only");
        a.push(ev("g", "s", 200, 1, 0, 0.5), &mut out);
        a.tick(3_600_800, &mut out);
        assert!(out.is_empty(), "a new reading restarts the idle time");
        a.tick(3_600_900, &mut out);
        assert_eq!(out.len(), 1);
        assert!(!out[0].partial);
        assert_eq!(out[0].readings, 2);
        // The silent group is forgotten; a reading for its delivered window
        // that comes after is late, as if the group had stayed, and goes in
        // an aggregate of the next window (never the same window twice).
        assert_eq!((a.groups(), a.stats().groups_evicted), (0, 1));
        a.push(ev("g", "s", 300, 1, 0, 0.5), &mut out);
        assert_eq!(a.stats().late_readings, 1);
        a.flush(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[1].window_start, out[1].readings, out[1].late_readings),
            (1000, 0, 1)
        );
        // Seen again, it goes on after that window.
        a.push(ev("g", "s", 2_500, 1, 0, 0.5), &mut out);
        a.flush(&mut out);
        assert_eq!((out[2].window_start, out[2].readings), (2000, 1));
        assert_eq!(a.stats().late_readings, 1);
    }

    /// One sensor whose clock is four minutes ahead does not close its
    /// group's windows early: no reading of the others is late (issue 18,
    /// item 7). Its own readings wait in their windows.
    #[test]
    fn a_sensor_ahead_does_not_close_its_groups_windows() {
        let m = manifest();
        let mut a = Aggregator::new(&cfg(1000, 100), "gw", &m);
        a.live = true;
        let mut out = Vec::new();
        for t in (0..5_000).step_by(100) {
            a.push(ev("g", "good-1", t, 1, 0, 0.5), &mut out);
            a.push(ev("g", "good-2", t + 7, 1, 0, 0.5), &mut out);
            if t == 1_200 {
                // A single reading far ahead, then a sensor that stays ahead.
                a.push(ev("g", "good-1", t + 240_000, 1, 0, 0.5), &mut out);
            }
            a.push(ev("g", "ahead", t + 240_000, 1, 0, 0.5), &mut out);
        }
        assert_eq!(a.stats().late_readings, 0);
        assert_eq!(a.stats().clock_skew, 0, "the gateway's clock is set");
        // Closed so far: the windows the good sensors completed, nothing ahead.
        assert!(out.iter().all(|x| x.window_end <= 5_000), "{out:?}");
        assert_eq!(out.iter().map(|x| x.readings).sum::<u64>(), 2 * 40);
        a.flush(&mut out);
        assert_eq!(out.iter().map(|x| x.readings).sum::<u64>(), 3 * 50 + 1);
    }

    /// While the gateway's clock is not set, a sensor far ahead of the rest
    /// of its group is refused and counted (`clock_skew`); replay never refuses.
    #[test]
    fn far_ahead_of_its_group_is_refused_while_the_clock_is_unset() {
        let m = manifest();
        // The first skewed reading, with nothing to compare it with yet, is taken.
        for (live, set, refused) in [(true, false, 9), (true, true, 0), (false, false, 0)] {
            let mut a = Aggregator::new(&cfg(1000, 100), "gw", &m);
            a.live = live;
            a.set_wall_clock(set);
            let mut out = Vec::new();
            for t in (0..1_000).step_by(100) {
                a.push(ev("g", "good", t, 1, 0, 0.5), &mut out);
                let mut skewed = ev("g", "skewed", t + 3_600_000, 1, 0, 0.5);
                skewed.seqs = vec![1_000 + t as u64];
                a.push(skewed, &mut out);
            }
            a.flush(&mut out);
            let s = a.stats();
            assert_eq!(s.clock_skew, refused, "{live} {set}");
            // The journal may forget refused readings: they are settled.
            assert_eq!(a.take_settled().len() as u64, refused);
            // Every reading counted once: in a window, late, or refused.
            let counted: u64 = out.iter().map(|x| x.readings + x.late_readings).sum();
            assert_eq!(counted + s.clock_skew, 20);
        }
    }

    /// Key of an aggregate for comparison, without id and partial flag.
    fn key(
        a: &Aggregate,
    ) -> (
        String,
        i64,
        u64,
        u64,
        u64,
        BTreeMap<String, u64>,
        Option<ScoreStats>,
    ) {
        (
            a.group.clone(),
            a.window_start,
            a.readings,
            a.inferences,
            a.sensors,
            a.classes.clone().unwrap_or_default(),
            a.score.clone(),
        )
    }

    proptest! {
        /// Streaming aggregation with a watermark equals aggregating the whole
        /// batch at once, when disorder stays within the allowed lateness.
        #[test]
        fn stream_equals_batch(
            events in proptest::collection::vec((0usize..3, 0usize..4, 0i64..20_000, 0usize..3, 0u32..1000), 1..200),
            window_ms in 100i64..5000,
            jitter in 0i64..500,
        ) {
            let m = manifest();
            // Event times increase, with disorder of at most `jitter` ms.
            let mut evs: Vec<Inferred> = Vec::new();
            let mut t = 0i64;
            for (i, (g, s, dt, class, score)) in events.iter().enumerate() {
                t += dt % 300;
                let ts = (t - if i % 2 == 0 { jitter.min(t) } else { 0 }).max(0);
                evs.push(ev(&format!("g{g}"), &format!("s{s}"), ts, 1, *class, *score as f32 / 1000.0));
            }
            let mut streaming = Aggregator::new(&cfg(window_ms, jitter), "gw", &m);
            let mut out = Vec::new();
            for e in evs.clone() {
                streaming.push(e, &mut out);
            }
            streaming.flush(&mut out);
            prop_assert_eq!(streaming.stats().late_readings, 0);

            // Batch: lateness so large nothing closes before the flush.
            let mut batch = Aggregator::new(&cfg(window_ms, i64::MAX / 4), "gw", &m);
            let mut whole = Vec::new();
            for e in evs {
                batch.push(e, &mut whole);
            }
            prop_assert!(whole.is_empty());
            batch.flush(&mut whole);

            let mut a: Vec<_> = out.iter().map(key).collect();
            let mut b: Vec<_> = whole.iter().map(key).collect();
            a.sort_by_key(|x| (x.0.clone(), x.1));
            b.sort_by_key(|x| (x.0.clone(), x.1));
            prop_assert_eq!(a, b);
        }
    }
}
