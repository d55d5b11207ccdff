//! The drift reference a manifest stores: quantile [`Histogram`]s of a
//! model's input summaries and scores ([`Reference`]), and the statistics
//! that compare a period's counts with them ([`psi`], [`ks_statistic`]).
//! Pure data and arithmetic, below [`crate::manifest`]; what computes a
//! reference from a model, and counts a period's windows, is [`crate::drift`].

use serde::{Deserialize, Serialize};

/// Smallest proportion [`psi`] uses: empty bins (in the reference or in the
/// observation) count as this, so that the index stays finite.
pub const PSI_FLOOR: f64 = 1e-4;

/// PSI from which a shift is moderate (below: stable).
pub const PSI_MODERATE: f64 = 0.1;

/// PSI from which a shift is significant.
pub const PSI_SIGNIFICANT: f64 = 0.25;

/// A histogram with inner cut points: bin `i` holds the values `x` with
/// `edges[i-1] <= x < edges[i]` (the first bin is open below, the last open
/// above), so the bin of `x` is the number of edges `<= x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    /// Inner cut points, strictly ascending and finite.
    pub edges: Vec<f64>,
    /// Fraction of the reference values in each bin; `edges.len() + 1`
    /// entries summing to 1.
    pub proportions: Vec<f64>,
}

impl Histogram {
    /// A histogram of `samples` with up to `bins` bins of about equal counts
    /// (quantile cut points). Cut points lie halfway between two distinct
    /// sample values, never on one; values tied across a quantile stay in one
    /// bin, so ties give fewer bins, constant data a single bin. No bin is
    /// empty. Non-finite samples are ignored; with no finite sample (or
    /// `bins <= 1`) the histogram has a single bin.
    pub fn from_samples(samples: &[f64], bins: usize) -> Self {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 || bins <= 1 {
            return Self::single();
        }
        // Split indices s: the cut lies between sorted[s - 1] and sorted[s].
        let mut splits = Vec::with_capacity(bins);
        for i in 1..bins {
            let k = i * n / bins;
            if k == 0 || k >= n {
                continue;
            }
            if sorted[k - 1] < sorted[k] {
                splits.push(k);
                continue;
            }
            // A run of equal values straddles the quantile: cut before or
            // after the run, whichever is nearer.
            let v = sorted[k];
            let before = sorted.partition_point(|x| *x < v);
            let after = sorted.partition_point(|x| *x <= v);
            let candidates = [(after < n).then_some(after), (before > 0).then_some(before)];
            if let Some(s) = candidates
                .into_iter()
                .flatten()
                .min_by_key(|s| s.abs_diff(k))
            {
                splits.push(s);
            }
        }
        splits.sort_unstable();
        splits.dedup();
        let mut edges: Vec<f64> = Vec::with_capacity(splits.len());
        let mut lower = 0usize; // Index of the first value in the current bin.
        for s in splits {
            let edge = round_for_json(sorted[s - 1] / 2.0 + sorted[s] / 2.0);
            // Rounding may put the midpoint on a neighbour; keep only cuts
            // that leave a value on each side.
            let below = sorted.partition_point(|x| *x < edge);
            if below > lower && below < n && edges.last().is_none_or(|e| *e < edge) {
                edges.push(edge);
                lower = below;
            }
        }
        let mut h = Self {
            proportions: Vec::new(),
            edges,
        };
        h.proportions = h
            .counts(&sorted)
            .iter()
            .map(|&c| round_for_json(c as f64 / n as f64))
            .collect();
        h
    }

    pub(crate) fn single() -> Self {
        Self {
            edges: Vec::new(),
            proportions: vec![1.0],
        }
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.edges.len() + 1
    }

    /// The bin of `x`: the number of edges `<= x`. `None` for NaN.
    pub fn bin(&self, x: f64) -> Option<usize> {
        (!x.is_nan()).then(|| self.edges.partition_point(|e| *e <= x))
    }

    /// How many of `values` fall in each bin ([`Histogram::bin`]); NaN is not counted.
    pub fn counts(&self, values: &[f64]) -> Vec<u64> {
        let mut counts = vec![0u64; self.bins()];
        for b in values.iter().filter_map(|&v| self.bin(v)) {
            counts[b] += 1;
        }
        counts
    }

    /// PSI of `values` against this histogram ([`psi`]).
    pub fn psi(&self, values: &[f64]) -> f64 {
        psi(&self.proportions, &self.counts(values))
    }

    /// Binned KS statistic of `values` against this histogram ([`ks_statistic`]).
    pub fn ks(&self, values: &[f64]) -> f64 {
        ks_statistic(&self.proportions, &self.counts(values))
    }

    /// What makes this histogram unusable, if anything.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.proportions.len() != self.edges.len() + 1 {
            p.push(format!(
                "{} proportions for {} edges (expected {})",
                self.proportions.len(),
                self.edges.len(),
                self.edges.len() + 1
            ));
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            p.push("edges must be finite and strictly ascending".into());
        }
        if self
            .proportions
            .iter()
            .any(|q| !(q.is_finite() && *q >= 0.0))
        {
            p.push("proportions must be finite and non-negative".into());
        } else if (self.proportions.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            p.push("proportions must sum to 1".into());
        }
        p
    }
}

/// `x` to 12 significant digits: such a number is written to JSON in at most
/// 12 digits and read back bit for bit (serde_json reads longer numbers to
/// within one unit in the last place only), so a manifest round-trips exactly.
/// Data of `f32` precision (7 digits) keeps its cut points strictly between
/// neighbouring values.
fn round_for_json(x: f64) -> f64 {
    format!("{x:.11e}").parse().unwrap_or(x)
}

/// A histogram of one named value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedHistogram {
    /// The value's name ([`crate::drift::input_summary_names`]).
    pub name: String,
    /// Its reference distribution.
    pub histogram: Histogram,
}

/// Reference statistics of a model, stored in its manifest at training time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Windows the statistics were computed on.
    pub samples: usize,
    /// One histogram per input summary value, in [`crate::drift::input_summary`] order.
    pub features: Vec<NamedHistogram>,
    /// Histogram of the model's score ([`crate::Prediction::score`]).
    pub score: Histogram,
}

impl Reference {
    /// What makes this reference unusable for a model with `channels` input
    /// channels (one summary value each), if anything.
    pub fn problems(&self, channels: usize) -> Vec<String> {
        let mut p = Vec::new();
        if self.samples == 0 {
            p.push("reference.samples must be at least 1".into());
        }
        if self.features.len() != channels {
            p.push(format!(
                "reference has {} feature histograms for {channels} input channels",
                self.features.len()
            ));
        }
        for f in &self.features {
            for problem in f.histogram.problems() {
                p.push(format!("reference feature {:?}: {problem}", f.name));
            }
        }
        for problem in self.score.problems() {
            p.push(format!("reference score: {problem}"));
        }
        p
    }
}

/// Population stability index of observed bin counts against the expected
/// proportions of the same bins: `Σ (o - e) · ln(o / e)` over the bins, with
/// `o` the observed proportion and both proportions floored at
/// [`PSI_FLOOR`] so that an empty bin does not make it infinite.
///
/// 0 for identical distributions; below 0.1 stable, 0.1 to 0.25 a moderate
/// shift, above 0.25 a significant one. NaN when nothing was observed or the
/// bin counts differ (no evidence either way; compare with `>` so that NaN
/// never alerts).
pub fn psi(expected: &[f64], observed_counts: &[u64]) -> f64 {
    let Some(observed) = observed_proportions(expected, observed_counts) else {
        return f64::NAN;
    };
    expected
        .iter()
        .zip(observed)
        .map(|(&e, o)| {
            let (e, o) = (e.max(PSI_FLOOR), o.max(PSI_FLOOR));
            (o - e) * (o / e).ln()
        })
        .sum()
}

/// Kolmogorov-Smirnov statistic on the bins: the largest difference between
/// the expected and the observed cumulative proportions at the bin edges, in
/// 0..=1. A lower bound of the KS statistic of the unbinned data. NaN when
/// nothing was observed or the bin counts differ.
pub fn ks_statistic(expected: &[f64], observed_counts: &[u64]) -> f64 {
    let Some(observed) = observed_proportions(expected, observed_counts) else {
        return f64::NAN;
    };
    let (mut ce, mut co, mut d) = (0.0f64, 0.0f64, 0.0f64);
    for (&e, o) in expected.iter().zip(observed) {
        ce += e;
        co += o;
        d = d.max((ce - co).abs());
    }
    d.min(1.0)
}

fn observed_proportions<'a>(
    expected: &[f64],
    counts: &'a [u64],
) -> Option<impl Iterator<Item = f64> + 'a> {
    let total: u64 = counts.iter().sum();
    (total > 0 && counts.len() == expected.len())
        .then(|| counts.iter().map(move |&c| c as f64 / total as f64))
}
