//! The release stage: k-anonymity, differential privacy and its budget, and
//! the policy stamp, on every aggregate before the outbox.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{CryptoRng, SeedableRng};

use super::budget::Accountant;
use super::noise::{Scale, noisy_count};
use super::{KeyIdHandle, PrivacyError};
use crate::aggregate::{Aggregate, PolicyRef};
use crate::privacy::ExactField;
use crate::privacy::KAnonymityAction;
use crate::privacy::PrivacyConfig;

/// What [`Release::admit`], [`Release::admit_all`] and [`Release::flush`]
/// did. Every aggregate admitted is counted once: in `released`, `merged`,
/// `suppressed_k`, `suppressed_budget` or `budget_write_failures`, or it is
/// still held ([`Release::held`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseStats {
    /// Aggregates released (appended to the output).
    pub released: u64,
    /// Aggregates suppressed by k-anonymity (below the thresholds; with
    /// `merge`, after `max_merge_windows` windows or at shutdown).
    pub suppressed_k: u64,
    /// Aggregates suppressed because their group's privacy budget for the
    /// period is spent.
    pub suppressed_budget: u64,
    /// Aggregates folded into an earlier, held aggregate of their group.
    pub merged: u64,
    /// Released aggregates whose counts carry noise.
    pub noised: u64,
    /// Aggregates suppressed because the budget spent on them could not be
    /// written to disk.
    pub budget_write_failures: u64,
}

impl ReleaseStats {
    /// Add `other` to these counts.
    pub fn add(&mut self, other: &ReleaseStats) {
        self.released += other.released;
        self.suppressed_k += other.suppressed_k;
        self.suppressed_budget += other.suppressed_budget;
        self.merged += other.merged;
        self.noised += other.noised;
        self.budget_write_failures += other.budget_write_failures;
    }
}

#[derive(Debug, Clone, Copy)]
struct KRule {
    min_subjects: u64,
    min_readings: u64,
    /// `Some(max windows)` with `action = "merge"`.
    merge: Option<u32>,
}

impl KRule {
    fn met(&self, a: &Aggregate) -> bool {
        a.sensors >= self.min_subjects && a.readings >= self.min_readings
    }
}

#[derive(Debug)]
struct Held {
    agg: Aggregate,
    windows: u32,
}

struct Dp {
    epsilon: f64,
    sensitivity: u64,
    keep: Vec<ExactField>,
    accountant: Accountant,
    rng: Box<dyn CryptoRng + Send>,
}

impl fmt::Debug for Dp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dp")
            .field("epsilon", &self.epsilon)
            .field("sensitivity", &self.sensitivity)
            .field("keep", &self.keep)
            .field("accountant", &self.accountant)
            .finish_non_exhaustive()
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

impl Dp {
    /// Noise on every count of `a`; non-count statistics removed unless kept.
    fn apply(&mut self, a: &mut Aggregate) {
        let m = 4 + u32::from(a.classes.is_some()) + u32::from(a.anomalies.is_some());
        let per = self.epsilon / f64::from(m);
        let counts = Scale::at_least(self.sensitivity as f64 / per);
        let sensors = Scale::at_least(1.0 / per);
        let rng = &mut *self.rng;
        a.readings = noisy_count(rng, a.readings, counts);
        a.late_readings = noisy_count(rng, a.late_readings, counts);
        a.inferences = noisy_count(rng, a.inferences, counts);
        a.sensors = noisy_count(rng, a.sensors, sensors);
        if let Some(classes) = a.classes.as_mut() {
            for v in classes.values_mut() {
                *v = noisy_count(rng, *v, counts);
            }
        }
        if let Some(n) = a.anomalies {
            let noisy = noisy_count(rng, n, counts).min(a.inferences);
            a.anomalies = Some(noisy);
            a.anomaly_rate = Some(if a.inferences > 0 {
                round6(noisy as f64 / a.inferences as f64)
            } else {
                0.0
            });
        }
        let keep = |f| self.keep.contains(&f);
        if !keep(ExactField::Score) {
            a.score = None;
        }
        if !keep(ExactField::Models) {
            a.models = None;
        }
        if !keep(ExactField::Shadow) {
            a.shadow = None;
        }
        if !keep(ExactField::Drift) {
            a.drift = None;
        }
    }
}

/// The release stage of the policy; see the module documentation of
/// [`crate::privacy`].
#[derive(Debug)]
pub struct Release {
    version: String,
    key_id: KeyIdHandle,
    k: Option<KRule>,
    dp: Option<Dp>,
    held: BTreeMap<String, Held>,
    /// Journal sequence numbers of the readings of suppressed aggregates:
    /// counted (as suppressed), never to be replayed ([`Release::take_settled`]).
    settled: Vec<u64>,
}

impl Release {
    /// The stage for `cfg`, its budget file under `<state_dir>/privacy/`
    /// (only with differential privacy), the noise from `rand`'s `StdRng`
    /// (ChaCha12) seeded from the operating system. `key_id`: the ingest
    /// stage's [`crate::privacy::Privacy::key_id_handle`].
    pub fn new(
        cfg: &PrivacyConfig,
        state_dir: &Path,
        key_id: KeyIdHandle,
    ) -> Result<Release, PrivacyError> {
        let rng = StdRng::try_from_os_rng().map_err(|e| PrivacyError::Rng(e.to_string()))?;
        Self::with_rng(cfg, state_dir, key_id, Box::new(rng))
    }

    /// [`Release::new`] with the noise from `rng`, which must be a
    /// cryptographically secure generator (tests: a seeded `StdRng`).
    pub fn with_rng(
        cfg: &PrivacyConfig,
        state_dir: &Path,
        key_id: KeyIdHandle,
        rng: Box<dyn CryptoRng + Send>,
    ) -> Result<Release, PrivacyError> {
        let k = cfg.k_anonymity.as_ref().map(|k| KRule {
            min_subjects: k.min_subjects,
            min_readings: k.min_readings,
            merge: (k.action == KAnonymityAction::Merge).then_some(k.max_merge_windows),
        });
        let dp = match &cfg.differential_privacy {
            None => None,
            Some(d) => {
                let invalid = |path, reason: &str| PrivacyError::InvalidConfig {
                    path,
                    reason: reason.to_string(),
                };
                if !(d.epsilon.is_finite() && d.epsilon >= super::MIN_EPSILON) {
                    return Err(invalid(
                        "privacy.differential_privacy.epsilon",
                        "must be a finite number of at least 0.000001",
                    ));
                }
                if !(d.budget.is_finite() && d.budget >= d.epsilon) {
                    return Err(invalid(
                        "privacy.differential_privacy.budget",
                        "must be a finite number, at least epsilon",
                    ));
                }
                if !(1..=super::MAX_SENSITIVITY).contains(&d.sensitivity) {
                    return Err(invalid(
                        "privacy.differential_privacy.sensitivity",
                        "must be between 1 and 1000000",
                    ));
                }
                if !(1..=super::MAX_PERIOD_S).contains(&d.period_s) {
                    return Err(invalid(
                        "privacy.differential_privacy.period_s",
                        "must be between 1 and 315360000 (ten years)",
                    ));
                }
                let accountant = Accountant::open(
                    &state_dir.join("privacy"),
                    d.budget,
                    d.epsilon,
                    d.period_s as i64 * 1000,
                )?;
                Some(Dp {
                    epsilon: d.epsilon,
                    sensitivity: d.sensitivity,
                    keep: d.keep_exact.clone(),
                    accountant,
                    rng,
                })
            }
        };
        Ok(Self {
            version: cfg.policy_version.clone(),
            key_id,
            k,
            dp,
            held: BTreeMap::new(),
            settled: Vec::new(),
        })
    }

    /// Apply a new policy (live reconfiguration): the spend so far is on
    /// disk first, the new stage reads it back, and the aggregates held for
    /// merging stay held. On an error nothing changes.
    pub fn reconfigure(
        &mut self,
        cfg: &PrivacyConfig,
        state_dir: &Path,
        key_id: KeyIdHandle,
    ) -> Result<(), PrivacyError> {
        if let Some(dp) = self.dp.as_mut()
            && dp.accountant.is_dirty()
        {
            dp.accountant.persist()?;
        }
        let mut next = Release::new(cfg, state_dir, key_id)?;
        next.held = std::mem::take(&mut self.held);
        next.settled = std::mem::take(&mut self.settled);
        *self = next;
        Ok(())
    }

    /// Aggregates held for merging (below k so far), over all groups.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The journal sequence numbers of readings whose aggregates were
    /// suppressed since the last call: they are counted, and must not be
    /// replayed after a crash.
    pub fn take_settled(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.settled)
    }

    /// Admit one aggregate; what may be released is appended to `out`.
    pub fn admit(&mut self, agg: Aggregate, out: &mut Vec<Aggregate>) -> ReleaseStats {
        self.admit_all(std::iter::once(agg), out)
    }

    /// Admit several aggregates, in order; the budget spent on them is
    /// written to disk once, before any of them is appended to `out`.
    pub fn admit_all(
        &mut self,
        aggs: impl IntoIterator<Item = Aggregate>,
        out: &mut Vec<Aggregate>,
    ) -> ReleaseStats {
        let mut stats = ReleaseStats::default();
        let mut staged = Vec::new();
        for agg in aggs {
            self.admit_one(agg, &mut staged, &mut stats);
        }
        if let Some(dp) = self.dp.as_mut()
            && dp.accountant.is_dirty()
            && let Err(error) = dp.accountant.persist()
        {
            // The spend stays counted in memory: never a refund.
            tracing::error!(%error, suppressed = staged.len(), "privacy budget not written; aggregates suppressed");
            stats.budget_write_failures += staged.len() as u64;
            for a in &staged {
                self.settled.extend_from_slice(&a.covers);
            }
            return stats;
        }
        stats.released += staged.len() as u64;
        if self.dp.is_some() {
            stats.noised += staged.len() as u64;
        }
        out.extend(staged);
        stats
    }

    /// At shutdown: every aggregate still held (below k) is suppressed.
    pub fn flush(&mut self, _out: &mut Vec<Aggregate>) -> ReleaseStats {
        let stats = ReleaseStats {
            suppressed_k: self.held.len() as u64,
            ..Default::default()
        };
        for h in self.held.values() {
            self.settled.extend_from_slice(&h.agg.covers);
        }
        self.held.clear();
        stats
    }

    fn admit_one(&mut self, agg: Aggregate, staged: &mut Vec<Aggregate>, stats: &mut ReleaseStats) {
        let Some(k) = self.k else {
            self.finish(agg, staged, stats);
            return;
        };
        if let Some(mut h) = self.held.remove(&agg.group) {
            h.agg.merge(&agg);
            h.windows += 1;
            stats.merged += 1;
            if k.met(&h.agg) {
                self.finish(h.agg, staged, stats);
            } else if h.windows >= k.merge.unwrap_or(0) {
                self.settled.extend_from_slice(&h.agg.covers);
                stats.suppressed_k += 1;
            } else {
                self.held.insert(h.agg.group.clone(), h);
            }
            return;
        }
        if k.met(&agg) {
            self.finish(agg, staged, stats);
            return;
        }
        match k.merge {
            Some(max) if max > 1 => {
                self.held
                    .insert(agg.group.clone(), Held { agg, windows: 1 });
            }
            _ => {
                self.settled.extend_from_slice(&agg.covers);
                stats.suppressed_k += 1;
            }
        }
    }

    /// Budget, noise, policy stamp, id.
    fn finish(
        &mut self,
        mut agg: Aggregate,
        staged: &mut Vec<Aggregate>,
        stats: &mut ReleaseStats,
    ) {
        let mut epsilon = None;
        if let Some(dp) = self.dp.as_mut() {
            if !dp
                .accountant
                .try_spend(&agg.group, agg.window_start, agg.window_end)
            {
                self.settled.extend_from_slice(&agg.covers);
                stats.suppressed_budget += 1;
                return;
            }
            dp.apply(&mut agg);
            epsilon = Some(dp.epsilon);
        }
        agg.policy = PolicyRef {
            version: self.version.clone(),
            key_id: self.key_id.get(),
            epsilon,
        };
        agg.id = agg.compute_id();
        staged.push(agg);
    }
}

/// Run the release stage: every closed aggregate is observed (metrics; the
/// governor, which sees true figures that never leave the process), passes
/// the privacy release (k-anonymity, noise, budget), and what is released
/// goes to `released`. What is waiting is taken as one batch, so the budget
/// is written once per batch. When `aggregates` closes, what the release
/// still holds is accounted for and `released` closes.
pub fn spawn(
    mut release: Release,
    aggregates: flume::Receiver<Aggregate>,
    updates: flume::Receiver<ReleaseUpdate>,
    observations: Option<flume::Sender<crate::governance::Observation>>,
    released: flume::Sender<Aggregate>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    settle: impl Fn(Vec<u64>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = Vec::new();
        let mut out = Vec::new();
        let mut updates_open = true;
        loop {
            let first = tokio::select! {
                biased;
                u = updates.recv_async(), if updates_open => {
                    match u {
                        Ok(u) => {
                            let r = release.reconfigure(&u.cfg, &u.state_dir, u.key_id);
                            let _ = u.reply.send(r);
                        }
                        Err(_) => updates_open = false,
                    }
                    continue;
                }
                a = aggregates.recv_async() => match a {
                    Ok(a) => a,
                    Err(_) => break,
                },
            };
            batch.push(first);
            batch.extend(aggregates.try_iter());
            for a in &batch {
                metrics.observe_quality(
                    a.shadow.as_ref().map(|s| s.agreement),
                    a.drift.as_ref().map(|d| crate::metrics::Drift {
                        input_psi: d.input_psi,
                        score_psi: d.score_psi,
                        alert: d.alert,
                    }),
                );
                if let Some(tx) = &observations {
                    // Full: the governor misses one aggregate, the data does not.
                    let _ = tx.try_send(crate::governance::Observation::of(a));
                }
            }
            let stats = release.admit_all(batch.drain(..), &mut out);
            count(&metrics, &stats);
            let settled = release.take_settled();
            if !settled.is_empty() {
                settle(settled);
            }
            for a in out.drain(..) {
                metrics.aggregates.inc();
                if released.send_async(a).await.is_err() {
                    return;
                }
            }
        }
        let stats = release.flush(&mut out);
        count(&metrics, &stats);
        let settled = release.take_settled();
        if !settled.is_empty() {
            settle(settled);
        }
        for a in out.drain(..) {
            metrics.aggregates.inc();
            if released.send_async(a).await.is_err() {
                return;
            }
        }
    })
}

/// A new policy for the running release stage ([`Release::reconfigure`]).
pub struct ReleaseUpdate {
    /// The new `[privacy]` table.
    pub cfg: PrivacyConfig,
    /// The gateway's state directory (the budget file).
    pub state_dir: std::path::PathBuf,
    /// The key id handle of the new ingest-side policy.
    pub key_id: KeyIdHandle,
    /// Whether it applied.
    pub reply: tokio::sync::oneshot::Sender<Result<(), PrivacyError>>,
}

fn count(m: &crate::metrics::Metrics, s: &ReleaseStats) {
    for (kind, n) in [
        ("k_anonymity", s.suppressed_k),
        ("budget", s.suppressed_budget),
        ("budget_write", s.budget_write_failures),
    ] {
        m.privacy_suppressed
            .get_or_create(&crate::metrics::KindLabels::of(kind))
            .inc_by(n);
    }
    m.privacy_merged.inc_by(s.merged);
    m.privacy_noised.inc_by(s.noised);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{AGGREGATE_SCHEMA, ModelRef, ScoreStats};
    use crate::privacy::DifferentialPrivacyConfig;
    use crate::privacy::KAnonymityConfig;

    const MIN: i64 = 60_000;
    const DAY: i64 = 86_400_000;

    fn agg(group: &str, window: i64, readings: u64, sensors: u64) -> Aggregate {
        let mut a = Aggregate {
            schema: AGGREGATE_SCHEMA,
            id: String::new(),
            gateway: "gw".into(),
            group: group.into(),
            window_start: window * MIN,
            window_end: (window + 1) * MIN,
            partial: false,
            readings,
            late_readings: 0,
            inferences: readings / 10,
            sensors,
            model: ModelRef {
                name: "m".into(),
                version: "1".into(),
            },
            classes: Some([("a".to_string(), readings / 10), ("b".to_string(), 0)].into()),
            anomalies: None,
            anomaly_rate: None,
            score: Some(ScoreStats {
                mean: 0.5,
                max: 0.9,
                p95: 0.8,
            }),
            policy: PolicyRef::default(),
            models: None,
            shadow: None,
            drift: None,
            gap: false,
            covers: Vec::new(),
        };
        a.id = a.compute_id();
        a
    }

    fn k_cfg(min_subjects: u64, min_readings: u64, action: KAnonymityAction) -> PrivacyConfig {
        PrivacyConfig {
            k_anonymity: Some(KAnonymityConfig {
                min_subjects,
                min_readings,
                action,
                max_merge_windows: 3,
            }),
            ..Default::default()
        }
    }

    fn dp_cfg(epsilon: f64, budget: f64) -> PrivacyConfig {
        PrivacyConfig {
            differential_privacy: Some(DifferentialPrivacyConfig {
                epsilon,
                budget,
                period_s: 86_400,
                sensitivity: 1,
                keep_exact: vec![],
            }),
            ..Default::default()
        }
    }

    fn seeded(cfg: &PrivacyConfig, dir: &Path, seed: u64) -> Release {
        Release::with_rng(
            cfg,
            dir,
            KeyIdHandle::default(),
            Box::new(StdRng::seed_from_u64(seed)),
        )
        .unwrap()
    }

    #[test]
    fn without_rules_aggregates_pass_stamped_with_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PrivacyConfig {
            policy_version: "2026-01".into(),
            ..Default::default()
        };
        let handle = KeyIdHandle::new(Some("k7".into()));
        let mut r = Release::new(&cfg, dir.path(), handle.clone()).unwrap();
        let mut out = Vec::new();
        let a = agg("g", 0, 5, 1);
        let s = r.admit(a.clone(), &mut out);
        assert_eq!(s.released, 1);
        assert_eq!(out[0].policy.version, "2026-01");
        assert_eq!(out[0].policy.key_id.as_deref(), Some("k7"));
        assert_eq!(out[0].policy.epsilon, None);
        assert_eq!(out[0].readings, 5);
        assert_eq!(out[0].id, out[0].compute_id());
        assert_ne!(out[0].id, a.id, "the id covers the policy");
        // The key id follows the ingest stage's rotation.
        handle.set(Some("k8".into()));
        r.admit(agg("g", 1, 5, 1), &mut out);
        assert_eq!(out[1].policy.key_id.as_deref(), Some("k8"));
        assert!(
            !dir.path().join("privacy").exists(),
            "no budget file without DP"
        );
    }

    #[test]
    fn k_anonymity_suppresses_below_k_and_releases_at_k() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = seeded(&k_cfg(3, 10, KAnonymityAction::Suppress), dir.path(), 1);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        total.add(&r.admit(agg("g", 0, 100, 2), &mut out));
        assert!(out.is_empty());
        assert_eq!(total.suppressed_k, 1);
        total.add(&r.admit(agg("g", 1, 9, 5), &mut out));
        assert_eq!(total.suppressed_k, 2, "below min_readings");
        total.add(&r.admit(agg("g", 2, 10, 3), &mut out));
        assert_eq!(total.released, 1, "at k and at min_readings");
        assert_eq!(out[0].window_start, 2 * MIN);
        assert_eq!((out[0].readings, out[0].sensors), (10, 3));
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn merge_folds_small_windows_into_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = seeded(&k_cfg(2, 50, KAnonymityAction::Merge), dir.path(), 1);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        total.add(&r.admit(agg("g", 0, 30, 2), &mut out));
        total.add(&r.admit(agg("other", 0, 500, 4), &mut out));
        assert_eq!(out.len(), 1, "the other group passes on its own");
        assert_eq!(r.held(), 1);
        total.add(&r.admit(agg("g", 1, 25, 2), &mut out));
        assert_eq!(out.len(), 2);
        let m = &out[1];
        assert_eq!(m.group, "g");
        assert_eq!((m.window_start, m.window_end), (0, 2 * MIN));
        assert_eq!(m.readings, 55, "exact sum");
        assert_eq!(m.inferences, 5);
        assert_eq!(m.classes.as_ref().unwrap()["a"], 5);
        assert_eq!(m.id, m.compute_id());
        assert_eq!(r.held(), 0);
        assert_eq!(
            (total.released, total.merged, total.suppressed_k),
            (2, 1, 0)
        );

        // Three windows (max_merge_windows) still below: suppressed.
        for w in 10..13 {
            total.add(&r.admit(agg("g", w, 10, 1), &mut out));
        }
        assert_eq!(out.len(), 2);
        assert_eq!(r.held(), 0);
        assert_eq!((total.merged, total.suppressed_k), (3, 1));

        // Held at shutdown: suppressed.
        total.add(&r.admit(agg("g", 20, 10, 5), &mut out));
        assert_eq!(r.held(), 1);
        total.add(&r.flush(&mut out));
        assert_eq!(r.held(), 0);
        assert_eq!(out.len(), 2);
        assert_eq!(total.suppressed_k, 2);
        // Every admitted aggregate counted once.
        assert_eq!(
            total.released + total.merged + total.suppressed_k,
            7,
            "{total:?}"
        );
    }

    #[test]
    fn noise_changes_counts_and_marks_the_aggregate() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = seeded(&dp_cfg(0.5, 1000.0), dir.path(), 42);
        let mut out = Vec::new();
        let mut stats = ReleaseStats::default();
        for w in 0..20 {
            let mut a = agg("g", w, 1000, 7);
            a.late_readings = 3;
            stats.add(&r.admit(a, &mut out));
        }
        assert_eq!((stats.released, stats.noised), (20, 20));
        let changed = out.iter().filter(|a| a.readings != 1000).count();
        assert!(
            changed >= 15,
            "noise of scale 10 rarely leaves a count: {changed}"
        );
        let mut sum = 0i64;
        for a in &out {
            assert_eq!(a.policy.epsilon, Some(0.5));
            assert!(a.score.is_none(), "scores are not counts");
            assert_eq!(a.id, a.compute_id());
            // u64 already: non-negative integers; within a generous bound of the truth.
            assert!(a.readings.abs_diff(1000) < 200, "{}", a.readings);
            sum += a.readings as i64 - 1000;
        }
        assert!(sum.abs() < 20 * 60, "noise is centred: {sum}");
        // Small counts clamp at 0, never below.
        let mut zero = agg("z", 0, 0, 0);
        zero.classes = Some([("a".to_string(), 0)].into());
        let mut zs = Vec::new();
        for w in 0..20 {
            let mut a = zero.clone();
            a.window_start = w * MIN;
            a.window_end = (w + 1) * MIN;
            r.admit(a, &mut zs);
        }
        assert!(zs.iter().any(|a| a.readings > 0 || a.sensors > 0));
        // The same seed gives the same noise: deterministic tests.
        let dir2 = tempfile::tempdir().unwrap();
        let mut r2 = seeded(&dp_cfg(0.5, 1000.0), dir2.path(), 42);
        let mut out2 = Vec::new();
        let mut a = agg("g", 0, 1000, 7);
        a.late_readings = 3;
        r2.admit(a, &mut out2);
        assert_eq!(out2[0], out[0]);
    }

    #[test]
    fn detector_rates_follow_noisy_counts_and_kept_fields_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = dp_cfg(1.0, 1000.0);
        if let Some(d) = cfg.differential_privacy.as_mut() {
            d.keep_exact = vec![ExactField::Score];
        }
        let mut r = seeded(&cfg, dir.path(), 7);
        let mut out = Vec::new();
        for w in 0..20 {
            let mut a = agg("d", w, 100, 2);
            a.classes = None;
            a.inferences = 10;
            a.anomalies = Some(9);
            a.anomaly_rate = Some(0.9);
            r.admit(a, &mut out);
        }
        for a in &out {
            let (n, k) = (a.inferences, a.anomalies.unwrap());
            assert!(k <= n);
            let rate = a.anomaly_rate.unwrap();
            if n > 0 {
                assert!((rate - k as f64 / n as f64).abs() < 1e-6);
            } else {
                assert_eq!(rate, 0.0);
            }
            assert!(a.score.is_some(), "kept exact on request");
        }
    }

    #[test]
    fn the_budget_stops_releases_and_resumes_next_period() {
        let dir = tempfile::tempdir().unwrap();
        // Three releases per group and day.
        let mut r = seeded(&dp_cfg(0.5, 1.5), dir.path(), 1);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        for w in 0..5 {
            total.add(&r.admit(agg("g", w, 100, 3), &mut out));
        }
        assert_eq!((total.released, total.suppressed_budget), (3, 2));
        assert_eq!(
            out.iter().map(|a| a.window_start / MIN).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // Another group has its own budget.
        total.add(&r.admit(agg("h", 4, 100, 3), &mut out));
        assert_eq!(total.released, 4);
        // The next day: released again.
        let next_day = DAY / MIN;
        total.add(&r.admit(agg("g", next_day, 100, 3), &mut out));
        assert_eq!(total.released, 5);
        assert_eq!(out.last().unwrap().window_start, DAY);
        assert_eq!(total.suppressed_budget, 2);
    }

    #[test]
    fn the_budget_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dp_cfg(0.5, 1.0);
        let mut out = Vec::new();
        {
            let mut r = seeded(&cfg, dir.path(), 1);
            let s = r.admit_all([agg("g", 0, 100, 3), agg("g", 1, 100, 3)], &mut out);
            assert_eq!(s.released, 2);
            assert!(dir.path().join("privacy/budget.json").exists());
        }
        // A new stage on the same state directory: nothing left today.
        let mut r = seeded(&cfg, dir.path(), 2);
        let s = r.admit(agg("g", 2, 100, 3), &mut out);
        assert_eq!((s.released, s.suppressed_budget), (0, 1));
        let s = r.admit(agg("g", DAY / MIN, 100, 3), &mut out);
        assert_eq!(s.released, 1);
        // A damaged file stops the start instead of refunding the budget.
        std::fs::write(dir.path().join("privacy/budget.json"), b"{\"version\":1,").unwrap();
        let e = Release::with_rng(
            &cfg,
            dir.path(),
            KeyIdHandle::default(),
            Box::new(StdRng::seed_from_u64(3)),
        )
        .unwrap_err();
        assert!(matches!(e, PrivacyError::BudgetCorrupt { .. }), "{e}");
    }

    #[test]
    fn an_unwritable_budget_suppresses_instead_of_releasing() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = seeded(&dp_cfg(0.5, 10.0), dir.path(), 1);
        // The budget file's place taken by a directory: every write fails.
        let file = dir.path().join("privacy/budget.json");
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let mut out = Vec::new();
        let s = r.admit(agg("g", 0, 100, 3), &mut out);
        assert!(out.is_empty());
        assert_eq!((s.released, s.budget_write_failures), (0, 1));
    }

    #[test]
    fn k_anonymity_before_noise_and_merged_windows_spend_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = k_cfg(2, 50, KAnonymityAction::Merge);
        cfg.differential_privacy = dp_cfg(0.5, 1.0).differential_privacy;
        let mut r = seeded(&cfg, dir.path(), 5);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        total.add(&r.admit(agg("g", 0, 30, 2), &mut out));
        total.add(&r.admit(agg("g", 1, 30, 2), &mut out));
        assert_eq!((total.released, total.noised, total.merged), (1, 1, 1));
        assert_eq!(out[0].window_end - out[0].window_start, 2 * MIN);
        assert_eq!(out[0].policy.epsilon, Some(0.5));
        total.add(&r.admit(agg("g", 2, 60, 2), &mut out));
        total.add(&r.admit(agg("g", 3, 60, 2), &mut out));
        assert_eq!((total.released, total.suppressed_budget), (2, 1));
    }
}
