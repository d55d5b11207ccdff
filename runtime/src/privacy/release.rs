//! The release stage: k-anonymity, differential privacy and its budget, and
//! the policy stamp, on every aggregate before the outbox.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{CryptoRng, SeedableRng};

use super::budget::Accountant;
use super::noise::{Scale, noisy_count};
use super::{DeclaredNames, KeyIdHandle, PrivacyError};
use crate::aggregate::{Aggregate, PolicyRef};
use crate::privacy::ExactField;
use crate::privacy::KAnonymityAction;
use crate::privacy::PrivacyConfig;

/// What [`Release::admit`], [`Release::admit_all`] and [`Release::flush`]
/// did. Every aggregate admitted is counted once: in `released`, `merged`,
/// `suppressed_k`, `suppressed_budget`, `budget_write_failures`,
/// `suppressed_late` or `suppressed_undeclared`, or it is still held
/// ([`Release::held`], [`Release::pending`]). With differential privacy,
/// `released` also counts the empty aggregates the stage made (`empty`).
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
    /// Differential privacy: aggregates of a window already released for
    /// every declared group (their group closed it too late).
    pub suppressed_late: u64,
    /// Differential privacy: aggregates of a group no longer declared (the
    /// policy changed, or the key rotated, while they were pending).
    pub suppressed_undeclared: u64,
    /// Differential privacy: released aggregates of declared groups that
    /// had no reading in their window (noised zero counts).
    pub empty: u64,
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
        self.suppressed_late += other.suppressed_late;
        self.suppressed_undeclared += other.suppressed_undeclared;
        self.empty += other.empty;
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
    /// The declared groups of the configuration (their names before
    /// pseudonymization: used when the ingest stage published none).
    groups: DeclaredNames,
    release_delay_ms: i64,
    windows: Windows,
}

/// Differential privacy's window schedule: aggregates wait per window until
/// the window is released for every declared group at once.
#[derive(Debug, Default)]
struct Windows {
    /// Window length (ms), taken from the aggregates.
    width: Option<i64>,
    /// End of the newest window seen (event time).
    frontier: Option<i64>,
    /// Every window starting before this is released.
    cursor: Option<i64>,
    /// Aggregates waiting, by window start, then group.
    pending: BTreeMap<i64, BTreeMap<String, Aggregate>>,
    /// The latest aggregate seen, counts aside: what an empty one looks like
    /// (gateway, model, class names, detector fields).
    template: Option<Aggregate>,
}

/// Longest run of windows without any aggregate, gateway-wide, that is
/// filled with empty releases; a longer silence of the whole gateway is
/// skipped (visible as a gap).
pub(crate) const MAX_EMPTY_RUN_WINDOWS: i64 = 1440;

/// An aggregate of `group` for `[start, end)` with no reading, shaped like
/// `template`.
fn empty_like(template: &Aggregate, group: &str, start: i64, end: i64) -> Aggregate {
    let mut a = template.clone();
    a.id.clear();
    a.group = group.to_string();
    (a.window_start, a.window_end) = (start, end);
    (a.readings, a.late_readings, a.inferences, a.sensors) = (0, 0, 0, 0);
    if let Some(c) = a.classes.as_mut() {
        c.values_mut().for_each(|v| *v = 0);
    }
    a.anomalies = a.anomalies.map(|_| 0);
    a.anomaly_rate = a.anomaly_rate.map(|_| 0.0);
    // Nothing that is not a count: no score, no per-model counts, no shadow,
    // no drift (differential privacy removes them from the others too,
    // unless kept exact).
    (a.score, a.models, a.shadow, a.drift) = (None, None, None, None);
    (a.partial, a.gap) = (false, false);
    a.policy = PolicyRef::default();
    a.covers.clear();
    a
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
                if let Some(reason) = super::config::groups_problem(&d.groups) {
                    return Err(PrivacyError::InvalidConfig {
                        path: "privacy.differential_privacy.groups",
                        reason,
                    });
                }
                if d.release_delay_ms < 0 {
                    return Err(invalid(
                        "privacy.differential_privacy.release_delay_ms",
                        "must not be negative",
                    ));
                }
                if k.is_some_and(|k| k.merge.is_some()) {
                    return Err(invalid(
                        "privacy.k_anonymity.action",
                        "\"merge\" cannot be combined with differential privacy",
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
                    groups: std::sync::Arc::new(
                        d.groups.iter().map(|g| (g.clone(), g.clone())).collect(),
                    ),
                    release_delay_ms: d.release_delay_ms,
                    windows: Windows::default(),
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
        if let Some(old) = self.dp.as_mut() {
            let windows = std::mem::take(&mut old.windows);
            match next.dp.as_mut() {
                Some(new) => new.windows = windows,
                None => {
                    // Differential privacy turned off: what waited under it
                    // is not released without it.
                    let n: usize = windows.pending.values().map(BTreeMap::len).sum();
                    if n > 0 {
                        tracing::warn!(
                            suppressed = n,
                            "differential privacy turned off: aggregates waiting under it are suppressed"
                        );
                    }
                    for a in windows.pending.values().flat_map(BTreeMap::values) {
                        next.settled.extend_from_slice(&a.covers);
                    }
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// Aggregates held for merging (below k so far), over all groups.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Differential privacy: aggregates waiting for their window to be
    /// released for every declared group.
    pub fn pending(&self) -> usize {
        self.dp
            .as_ref()
            .map_or(0, |d| d.windows.pending.values().map(BTreeMap::len).sum())
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
        if let Some(limit) = self.dp.as_ref().and_then(|d| {
            d.windows
                .frontier
                .map(|f| f.saturating_sub(d.release_delay_ms))
        }) {
            self.release_windows(limit, &mut staged, &mut stats);
        }
        self.commit(staged, out, stats)
    }

    /// The budget spent on `staged` is written to disk, then they go to
    /// `out`; if it cannot be written they are suppressed.
    fn commit(
        &mut self,
        staged: Vec<Aggregate>,
        out: &mut Vec<Aggregate>,
        mut stats: ReleaseStats,
    ) -> ReleaseStats {
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

    /// At shutdown: every aggregate still held (below k) is suppressed;
    /// with differential privacy, every window up to the newest seen is
    /// released for every declared group.
    pub fn flush(&mut self, out: &mut Vec<Aggregate>) -> ReleaseStats {
        let mut stats = ReleaseStats {
            suppressed_k: self.held.len() as u64,
            ..Default::default()
        };
        for h in self.held.values() {
            self.settled.extend_from_slice(&h.agg.covers);
        }
        self.held.clear();
        let mut staged = Vec::new();
        self.release_windows(i64::MAX, &mut staged, &mut stats);
        self.commit(staged, out, stats)
    }

    /// The names the declared groups are released under.
    fn declared(&self) -> DeclaredNames {
        self.key_id
            .declared()
            .or_else(|| self.dp.as_ref().map(|d| d.groups.clone()))
            .unwrap_or_default()
    }

    /// Differential privacy: the aggregate waits for its window.
    fn pend(&mut self, agg: Aggregate, staged: &mut Vec<Aggregate>, stats: &mut ReleaseStats) {
        let width = agg.window_end - agg.window_start;
        if self
            .dp
            .as_ref()
            .and_then(|d| d.windows.width)
            .is_some_and(|w| w != width)
        {
            // The window length changed: what waits under the old one goes now.
            self.release_windows(i64::MAX, staged, stats);
        }
        let declared = self.declared();
        let Some(w) = self.dp.as_mut().map(|d| &mut d.windows) else {
            return;
        };
        let width = width.max(1);
        if w.width != Some(width) {
            // Windows of the new length start at the first of them not
            // before what is released (aligned to the epoch, like the
            // aggregator's).
            w.cursor = w
                .cursor
                .map(|c| c.saturating_add(width - 1).div_euclid(width) * width);
        }
        w.width = Some(width);
        if w.cursor.is_some_and(|c| agg.window_start < c) {
            self.settled.extend_from_slice(&agg.covers);
            stats.suppressed_late += 1;
            return;
        }
        if !declared.contains_key(&agg.group) {
            self.settled.extend_from_slice(&agg.covers);
            stats.suppressed_undeclared += 1;
            return;
        }
        w.frontier = Some(w.frontier.unwrap_or(i64::MIN).max(agg.window_end));
        let mut template = agg.clone();
        template.covers = Vec::new();
        w.template = Some(template);
        let window = w.pending.entry(agg.window_start).or_default();
        match window.get_mut(&agg.group) {
            // The same group and window twice (closed, evicted, reopened): one aggregate.
            Some(a) => {
                a.merge(&agg);
                stats.merged += 1;
            }
            None => {
                window.insert(agg.group.clone(), agg);
            }
        }
    }

    /// Differential privacy: release every window that ends at or before
    /// `limit` (and at or before the newest window seen), each for every
    /// declared group, in order.
    fn release_windows(
        &mut self,
        limit: i64,
        staged: &mut Vec<Aggregate>,
        stats: &mut ReleaseStats,
    ) {
        loop {
            let declared = self.declared();
            let Some(dp) = self.dp.as_mut() else { return };
            let w = &mut dp.windows;
            let (Some(width), Some(frontier), Some(template)) =
                (w.width, w.frontier, w.template.clone())
            else {
                return;
            };
            let first_pending = w.pending.keys().next().copied();
            let mut start = match (w.cursor, first_pending) {
                (Some(c), _) => c,
                (None, Some(p)) => p,
                (None, None) => return,
            };
            // A long silence of the whole gateway is skipped, not filled.
            if let Some(p) = first_pending
                && p.saturating_sub(start) >= MAX_EMPTY_RUN_WINDOWS.saturating_mul(width)
            {
                start = p;
            }
            let end = start.saturating_add(width);
            if end > limit.min(frontier) {
                return;
            }
            let starts: Vec<i64> = w.pending.range(..end).map(|(k, _)| *k).collect();
            let mut got: BTreeMap<String, Aggregate> = BTreeMap::new();
            for k in starts {
                for (g, a) in w.pending.remove(&k).unwrap_or_default() {
                    match got.get_mut(&g) {
                        Some(x) => x.merge(&a),
                        None => {
                            got.insert(g, a);
                        }
                    }
                }
            }
            w.cursor = Some(end);
            // Flags and field shapes are the window's, not the group's.
            let partial = got.values().any(|a| a.partial);
            let gap = got.values().any(|a| a.gap);
            let mut window = Vec::with_capacity(declared.len());
            for g in declared.keys() {
                let mut a = match got.remove(g) {
                    Some(a) => a,
                    None => {
                        stats.empty += 1;
                        empty_like(&template, g, start, end)
                    }
                };
                a.partial = partial;
                a.gap = gap;
                if let (Some(c), Some(t)) = (a.classes.as_mut(), template.classes.as_ref()) {
                    for k in t.keys() {
                        c.entry(k.clone()).or_insert(0);
                    }
                }
                window.push(a);
            }
            for a in got.into_values() {
                self.settled.extend_from_slice(&a.covers);
                stats.suppressed_undeclared += 1;
            }
            for a in window {
                let account = declared.get(&a.group).cloned();
                self.finish_as(a, account.as_deref(), staged, stats);
            }
        }
    }

    fn admit_one(&mut self, agg: Aggregate, staged: &mut Vec<Aggregate>, stats: &mut ReleaseStats) {
        if self.dp.is_some() {
            self.pend(agg, staged, stats);
            return;
        }
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
    fn finish(&mut self, agg: Aggregate, staged: &mut Vec<Aggregate>, stats: &mut ReleaseStats) {
        self.finish_as(agg, None, staged, stats);
    }

    /// [`Release::finish`], the budget accounted under `account` (a
    /// declared group's declared name: the same across key rotations)
    /// rather than the group's released name.
    fn finish_as(
        &mut self,
        mut agg: Aggregate,
        account: Option<&str>,
        staged: &mut Vec<Aggregate>,
        stats: &mut ReleaseStats,
    ) {
        let mut epsilon = None;
        if let Some(dp) = self.dp.as_mut() {
            if !dp.accountant.try_spend(
                account.unwrap_or(&agg.group),
                agg.window_start,
                agg.window_end,
            ) {
                self.settled.extend_from_slice(&agg.covers);
                stats.suppressed_budget += 1;
                return;
            }
            dp.apply(&mut agg);
            epsilon = Some(dp.epsilon);
            // k-anonymity under noise decides on the noised counts
            // (post-processing: the epsilon spent covers the decision).
            if self.k.is_some_and(|k| !k.met(&agg)) {
                self.settled.extend_from_slice(&agg.covers);
                stats.suppressed_k += 1;
                return;
            }
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
        ("late_window", s.suppressed_late),
        ("undeclared", s.suppressed_undeclared),
    ] {
        m.privacy_suppressed
            .get_or_create(&crate::metrics::KindLabels::of(kind))
            .inc_by(n);
    }
    m.privacy_merged.inc_by(s.merged);
    m.privacy_noised.inc_by(s.noised);
    m.privacy_empty.inc_by(s.empty);
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

    /// Differential privacy with `groups` declared, each window released as
    /// soon as it is closed.
    fn dp_groups(epsilon: f64, budget: f64, groups: &[&str]) -> PrivacyConfig {
        PrivacyConfig {
            differential_privacy: Some(DifferentialPrivacyConfig {
                epsilon,
                budget,
                period_s: 86_400,
                sensitivity: 1,
                keep_exact: vec![],
                groups: groups.iter().map(|g| g.to_string()).collect(),
                release_delay_ms: 0,
            }),
            ..Default::default()
        }
    }

    fn dp_cfg(epsilon: f64, budget: f64) -> PrivacyConfig {
        dp_groups(epsilon, budget, &["g"])
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
        let dir_z = tempfile::tempdir().unwrap();
        let mut r = seeded(&dp_groups(0.5, 1000.0, &["z"]), dir_z.path(), 43);
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
        let mut cfg = dp_groups(1.0, 1000.0, &["d"]);
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
        // Three releases per group and day; every window is released for
        // both declared groups, so both spend alike whatever their data.
        let mut r = seeded(&dp_groups(0.5, 1.5, &["g", "h"]), dir.path(), 1);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        for w in 0..5 {
            total.add(&r.admit(agg("g", w, 100, 3), &mut out));
        }
        assert_eq!((total.released, total.suppressed_budget), (6, 4));
        assert_eq!(total.empty, 5, "h had no reading: empty aggregates");
        assert_eq!(
            out.iter()
                .map(|a| (a.group.as_str(), a.window_start / MIN))
                .collect::<Vec<_>>(),
            vec![("g", 0), ("h", 0), ("g", 1), ("h", 1), ("g", 2), ("h", 2)]
        );
        // The next day: released again. The windows between (no reading
        // anywhere) are released empty too, but today's budget is spent.
        let next_day = DAY / MIN;
        total.add(&r.admit(agg("g", next_day, 100, 3), &mut out));
        assert_eq!(total.released, 8);
        assert_eq!(out.last().unwrap().window_start, DAY);
        assert_eq!(total.suppressed_budget, 4 + 2 * (next_day - 5) as u64);
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
    fn k_anonymity_under_noise_decides_on_noised_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = k_cfg(2, 50, KAnonymityAction::Suppress);
        cfg.differential_privacy = dp_cfg(0.5, 1000.0).differential_privacy;
        let mut r = seeded(&cfg, dir.path(), 5);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        // Far above k: released; far below: suppressed, after the spend.
        total.add(&r.admit(agg("g", 0, 5000, 400), &mut out));
        total.add(&r.admit(agg("g", 1, 0, 0), &mut out));
        assert_eq!((total.released, total.suppressed_k), (1, 1));
        assert_eq!(out[0].policy.epsilon, Some(0.5));
        // Merging decides on exact counts: refused with noise.
        let mut cfg = k_cfg(2, 50, KAnonymityAction::Merge);
        cfg.differential_privacy = dp_cfg(0.5, 1000.0).differential_privacy;
        let e = Release::new(&cfg, dir.path(), KeyIdHandle::default()).unwrap_err();
        assert!(e.to_string().contains("privacy.k_anonymity.action"), "{e}");
    }

    /// Aggregates of `groups` (readings, sensors) for windows `ws`.
    fn aggs_of(groups: &[(&str, u64, u64)], ws: std::ops::Range<i64>) -> Vec<Aggregate> {
        ws.flat_map(|w| groups.iter().map(move |&(g, n, s)| agg(g, w, n, s)))
            .collect()
    }

    #[test]
    fn every_declared_group_is_released_in_every_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = dp_groups(1.0, 1e6, &["a", "b", "c"]);
        if let Some(d) = cfg.differential_privacy.as_mut() {
            d.release_delay_ms = MIN;
        }
        let mut r = seeded(&cfg, dir.path(), 9);
        let mut out = Vec::new();
        let mut total = ReleaseStats::default();
        // Only `a` has readings, in windows 0, 1 and 3; `x` is not declared.
        total.add(&r.admit_all(
            [agg("a", 0, 50, 2), agg("x", 0, 50, 2), agg("a", 1, 50, 2)],
            &mut out,
        ));
        // Window 0 is one window behind the newest: released for a, b and c.
        let seen = |out: &[Aggregate]| {
            out.iter()
                .map(|a| (a.window_start / MIN, a.group.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            seen(&out),
            vec![(0, "a".into()), (0, "b".into()), (0, "c".into())]
        );
        assert_eq!(total.suppressed_undeclared, 1);
        assert_eq!(r.pending(), 1, "window 1 waits for the delay");
        total.add(&r.admit(agg("a", 3, 50, 2), &mut out));
        // Windows 1 and 2 now, 2 with no reading anywhere: three empties.
        assert_eq!(out.len(), 9);
        assert!(
            out[3..9]
                .iter()
                .all(|a| (1..=2).contains(&(a.window_start / MIN)))
        );
        // A window already released: suppressed, never a second release.
        total.add(&r.admit(agg("b", 1, 50, 2), &mut out));
        assert_eq!((out.len(), total.suppressed_late), (9, 1));
        total.add(&r.flush(&mut out));
        assert_eq!(out.len(), 12, "window 3 at shutdown");
        assert_eq!(r.pending(), 0);
        for w in 0..4 {
            let groups: Vec<&str> = out
                .iter()
                .filter(|a| a.window_start == w * MIN)
                .map(|a| a.group.as_str())
                .collect();
            assert_eq!(groups, vec!["a", "b", "c"], "window {w}");
        }
        for a in &out {
            // Every release has the same shape: the class names, no score.
            assert_eq!(a.classes.as_ref().unwrap().len(), 2, "{a:?}");
            assert!(a.score.is_none());
            assert_eq!(a.policy.epsilon, Some(1.0));
            assert_eq!(a.window_end - a.window_start, MIN);
        }
        assert_eq!(total.empty, 12 - 3);
        assert_eq!(total.released, 12);
        assert_eq!(total.noised, 12);
    }

    #[test]
    fn a_short_silence_is_filled_and_a_long_one_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = seeded(&dp_groups(1.0, 1e9, &["g"]), dir.path(), 3);
        let mut out = Vec::new();
        r.admit(agg("g", 0, 5, 1), &mut out);
        // Five windows without any reading at the gateway: released empty.
        r.admit(agg("g", 6, 5, 1), &mut out);
        assert_eq!(
            out.iter().map(|a| a.window_start / MIN).collect::<Vec<_>>(),
            (0..=6).collect::<Vec<_>>()
        );
        // A silence of MAX_EMPTY_RUN_WINDOWS windows or more: skipped.
        let far = 7 + MAX_EMPTY_RUN_WINDOWS;
        let s = r.admit(agg("g", far, 5, 1), &mut out);
        assert_eq!((s.released, s.empty), (1, 0));
        assert_eq!(out.last().unwrap().window_start / MIN, far);
    }

    #[test]
    fn a_new_window_length_starts_after_what_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = seeded(&dp_groups(1.0, 1e9, &["g", "h"]), dir.path(), 4);
        let mut out = Vec::new();
        r.admit_all([agg("g", 0, 5, 1), agg("g", 1, 5, 1)], &mut out);
        assert_eq!(out.len(), 4);
        // 90 s windows from now on: [90 s, 180 s) overlaps what was released.
        let wide = |start_s: i64| {
            let mut a = agg("g", 0, 5, 1);
            (a.window_start, a.window_end) = (start_s * 1000, (start_s + 90) * 1000);
            a
        };
        let s = r.admit_all([wide(90), wide(180)], &mut out);
        assert_eq!(s.suppressed_late, 1, "[90 s, 180 s) starts before 120 s");
        r.flush(&mut out);
        let last: Vec<(i64, i64)> = out[4..]
            .iter()
            .map(|a| (a.window_start / 1000, a.window_end / 1000))
            .collect();
        assert_eq!(last, vec![(180, 270), (180, 270)]);
    }

    #[test]
    fn declared_names_from_the_ingest_stage_take_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let handle = KeyIdHandle::default();
        handle.set_declared(Some(std::sync::Arc::new(
            [("p_tok".to_string(), "raw-id".to_string())].into(),
        )));
        let mut r = Release::with_rng(
            &dp_groups(1.0, 1e6, &["raw-id"]),
            dir.path(),
            handle,
            Box::new(StdRng::seed_from_u64(1)),
        )
        .unwrap();
        let mut out = Vec::new();
        r.admit(agg("p_tok", 0, 5, 1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].group, "p_tok");
    }

    /// The budget follows the declared group across a key rotation: it is
    /// accounted under the declared name, not the token.
    #[test]
    fn the_budget_follows_a_declared_group_across_a_key_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let handle = KeyIdHandle::default();
        let names = |token: &str| {
            Some(std::sync::Arc::new(
                [(token.to_string(), "MRN-1".to_string())].into(),
            ))
        };
        handle.set_declared(names("p_old"));
        let mut r = Release::with_rng(
            &dp_groups(0.5, 1.0, &["MRN-1"]),
            dir.path(),
            handle.clone(),
            Box::new(StdRng::seed_from_u64(1)),
        )
        .unwrap();
        let mut out = Vec::new();
        let s = r.admit_all([agg("p_old", 0, 5, 1), agg("p_old", 1, 5, 1)], &mut out);
        assert_eq!(s.released, 2, "the day's budget spent");
        // The key rotates: the same subject under a new token.
        handle.set_declared(names("p_new"));
        let s = r.admit(agg("p_new", 2, 5, 1), &mut out);
        assert_eq!((s.released, s.suppressed_budget), (0, 1), "no fresh budget");
        let budget = std::fs::read_to_string(dir.path().join("privacy/budget.json")).unwrap();
        assert!(
            !budget.contains("p_old") && budget.contains("MRN-1"),
            "{budget}"
        );
    }

    /// Whether a group with one reading in a window is released differs
    /// from one with none by at most e^epsilon: with k-anonymity off every
    /// declared group is released every window (ratio 1); with it on, the
    /// decision on the noised counts is a post-processing of the noise.
    #[test]
    fn release_probability_ratio_is_bounded_by_e_epsilon() {
        const N: i64 = 6000;
        let epsilon = 1.0f64;
        for k in [None, Some(1)] {
            let rate = |readings: u64, seed: u64| {
                let dir = tempfile::tempdir().unwrap();
                let mut cfg = dp_groups(epsilon, 1e9, &["g", "o"]);
                if let Some(min) = k {
                    cfg.k_anonymity = k_cfg(min, 1, KAnonymityAction::Suppress).k_anonymity;
                }
                let mut r = seeded(&cfg, dir.path(), seed);
                let mut out = Vec::new();
                // `o` keeps the gateway's clock going; `g` has 0 or 1 reading.
                let mut input = aggs_of(&[("o", 10_000, 1_000)], 0..N);
                if readings > 0 {
                    input.extend(aggs_of(&[("g", readings, 1)], 0..N));
                    input.sort_by_key(|a| a.window_start);
                }
                r.admit_all(input, &mut out);
                r.flush(&mut out);
                let g = out.iter().filter(|a| a.group == "g").count();
                g as f64 / N as f64
            };
            let (p1, p0) = (rate(1, 11), rate(0, 12));
            let ratio = p1 / p0;
            // Sampling error: four standard errors of the ratio's logarithm.
            let se = ((1.0 - p1) / (p1 * N as f64) + (1.0 - p0) / (p0 * N as f64)).sqrt();
            assert!(
                ratio.ln() <= epsilon + 4.0 * se,
                "k {k:?}: P(released|1) {p1} / P(released|0) {p0} = {ratio} > e^{epsilon}"
            );
            match k {
                None => assert_eq!((p1, p0), (1.0, 1.0), "always released"),
                Some(_) => {
                    // The theory: both noised counts (scale 5) at least 1.
                    let a = (-1.0f64 / 5.0).exp();
                    let (q1, q0) = (1.0 / (1.0 + a), a / (1.0 + a));
                    assert!((p1 - q1 * q1).abs() < 4.0 * (q1 * q1 / N as f64).sqrt() + 0.01);
                    assert!((p0 - q0 * q0).abs() < 4.0 * (q0 * q0 / N as f64).sqrt() + 0.01);
                }
            }
        }
    }

    /// The noise on the released counts follows the documented distribution:
    /// discrete Laplace of scale `sensitivity · m / epsilon` (m = 5 released
    /// statistics for a classifier), checked with a chi-square goodness-of-fit
    /// test at significance level 0.001 (fixed seed), on `readings` and on
    /// `sensors` (scale `m / epsilon`).
    #[test]
    fn released_count_noise_has_the_documented_distribution() {
        const N: i64 = 20_000;
        let dir = tempfile::tempdir().unwrap();
        let epsilon = 1.0;
        let mut r = seeded(&dp_groups(epsilon, 1e9, &["g"]), dir.path(), 2026);
        let mut out = Vec::new();
        r.admit_all(aggs_of(&[("g", 1000, 500)], 0..N), &mut out);
        assert_eq!(out.len() as i64, N);
        let scale = Scale::at_least(1.0 * 5.0 / epsilon).value();
        let a = (-1.0 / scale).exp();
        let pmf = |y: i64| (1.0 - a) / (1.0 + a) * a.powi(y.abs() as i32);
        // Bins -15..=15, and the two tails: 33 bins, 32 degrees of freedom.
        const CRITICAL_DF32_ALPHA_0001: f64 = 62.487;
        for (field, truth) in [("readings", 1000i64), ("sensors", 500)] {
            let noise: Vec<i64> = out
                .iter()
                .map(|a| {
                    let v = if field == "readings" {
                        a.readings
                    } else {
                        a.sensors
                    };
                    v as i64 - truth
                })
                .collect();
            let mut chi2 = 0.0;
            let inner: f64 = (-15..=15).map(pmf).sum();
            let tail = (1.0 - inner) / 2.0;
            let mut bins: Vec<(f64, usize)> = (-15..=15)
                .map(|y| (pmf(y), noise.iter().filter(|&&x| x == y).count()))
                .collect();
            bins.push((tail, noise.iter().filter(|&&x| x < -15).count()));
            bins.push((tail, noise.iter().filter(|&&x| x > 15).count()));
            for (p, observed) in bins {
                let expected = p * N as f64;
                chi2 += (observed as f64 - expected).powi(2) / expected;
            }
            assert!(
                chi2 < CRITICAL_DF32_ALPHA_0001,
                "{field}: chi-square {chi2} over the critical value: not discrete Laplace of scale {scale}"
            );
        }
        // The test has power: noise of another scale fails it.
        let wrong = (-1.0f64 / 4.0).exp();
        let p_wrong0 = (1.0 - wrong) / (1.0 + wrong);
        let zeros = out.iter().filter(|a| a.readings == 1000).count() as f64;
        let expected_wrong = p_wrong0 * N as f64;
        assert!(
            (zeros - expected_wrong).powi(2) / expected_wrong > CRITICAL_DF32_ALPHA_0001 / 4.0,
            "zeros {zeros} fit scale 4 too well"
        );
    }
}
