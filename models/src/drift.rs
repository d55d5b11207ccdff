//! Reference statistics for drift detection.
//!
//! At training time the distribution of each input summary value
//! ([`input_summary`]) and of the model's score ([`crate::Prediction::score`])
//! over the training windows is stored in the manifest as a [`Reference`]:
//! one [`Histogram`] each, with quantile cut points. At run time the
//! runtime counts the same values of a period's windows into the same bins
//! ([`Histogram::counts`], or [`DriftCounts`] for all of them at once) and
//! compares them with the population stability index ([`psi`]) or a binned
//! Kolmogorov-Smirnov statistic ([`ks_statistic`]).
//!
//! Reading the PSI, by the usual rule of thumb:
//!
//! * below 0.1 ([`PSI_MODERATE`]): no significant change;
//! * 0.1 to 0.25: a moderate shift, worth watching;
//! * above 0.25 ([`PSI_SIGNIFICANT`]): a significant shift; the model sees
//!   data unlike its training data.
//!
//! Two things raise the PSI without any drift, so set the alert threshold
//! and the period with them in mind:
//!
//! * Sampling noise. With `k` bins, a period of `n` windows and a reference
//!   of `N` samples, data drawn from the reference distribution itself gives
//!   a PSI of about `(k - 1) · (1/n + 1/N)`: 0.45 for 10 bins and 40 windows
//!   on each side. Compare only periods with enough windows (hundreds for
//!   10 bins), or raise the threshold for short ones.
//! * The reference is computed on the training data, on which a classifier
//!   is more confident than on unseen data: its score is lower on new data
//!   even without drift. (The bundled BasicMotions model scores 0.98 or more
//!   on every training window; its test split gives a score PSI near 2.)
//!
//! The summaries are computed on the normalized model input, which is what
//! the runtime has. A model with `per_window` normalization has every
//! channel's mean at zero by construction, so its input summaries carry no
//! information (one bin each, PSI 0); its score still does.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::artifact::{LoadedModel, MANIFEST_FILE, ModelError, model_dataset, parse_manifest};
use crate::dataset::Dataset;
use crate::features::Feature;
use crate::manifest::{InputKind, Manifest};

/// Bins of the histograms computed by [`reference_from`].
pub const DEFAULT_BINS: usize = 10;

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

    fn single() -> Self {
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
    /// The value's name ([`input_summary_names`]).
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
    /// One histogram per input summary value, in [`input_summary`] order.
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

/// The summary of one model input (`[channels][length]`, normalized, as the
/// runtime's windower produces it): the mean of each channel over the
/// window. For a feature model (length 1) that is the feature vector itself.
/// `input.channels` values for a whole window; a shorter slice gives values
/// for the channels it holds in full.
pub fn input_summary(manifest: &Manifest, window: &[f32]) -> Vec<f32> {
    let length = manifest.input.length.max(1);
    window
        .chunks_exact(length)
        .take(manifest.input.channels)
        .map(|series| (series.iter().map(|&v| v as f64).sum::<f64>() / length as f64) as f32)
        .collect()
}

/// Names of the [`input_summary`] values, `input.channels` of them: `ch0`,
/// `ch1`, ... for raw models (the mean of that channel); for feature models
/// the raw channel and the extractor, `ch0.rms`, `ch0.bands:8[3]`, ... in the
/// extractors' channel-major order ([`crate::features`]). Feature names that
/// do not fit the manifest fall back to `f0`, `f1`, ...
pub fn input_summary_names(manifest: &Manifest) -> Vec<String> {
    let channels = manifest.input.channels;
    match manifest.input.kind {
        InputKind::Raw => (0..channels).map(|c| format!("ch{c}")).collect(),
        InputKind::Features => feature_names(&manifest.input.features, channels)
            .unwrap_or_else(|| (0..channels).map(|i| format!("f{i}")).collect()),
    }
}

fn feature_names(names: &[String], channels: usize) -> Option<Vec<String>> {
    let parsed = names
        .iter()
        .map(|n| Feature::parse(n).ok().map(|f| (n, f)))
        .collect::<Option<Vec<_>>>()?;
    let width: usize = parsed.iter().map(|(_, f)| f.width()).sum();
    if width == 0 || !channels.is_multiple_of(width) {
        return None;
    }
    let mut out = Vec::with_capacity(channels);
    for c in 0..channels / width {
        for (name, f) in &parsed {
            match f {
                Feature::Bands(n) => out.extend((0..*n).map(|b| format!("ch{c}.{name}[{b}]"))),
                _ => out.push(format!("ch{c}.{name}")),
            }
        }
    }
    Some(out)
}

/// The reference of `model` over `n` model inputs `windows`
/// (`[n][channels][length]`, normalized: exactly what the runtime feeds the
/// network): histograms of the input summaries and of the scores, with
/// [`DEFAULT_BINS`] quantile bins each.
pub fn reference_from(
    model: &LoadedModel,
    windows: &[f32],
    n: usize,
) -> Result<Reference, ModelError> {
    let manifest = model.manifest();
    let per = model.window_values();
    if n == 0 || windows.len() != n * per {
        return Err(ModelError::InputShape {
            actual: windows.len(),
            expected: n * per,
            n,
            channels: manifest.input.channels,
            length: manifest.input.length,
        });
    }
    let channels = manifest.input.channels;
    let mut columns = vec![Vec::with_capacity(n); channels];
    let mut scores = Vec::with_capacity(n);
    for batch in windows.chunks(64 * per) {
        for p in model.predict(batch, batch.len() / per)? {
            scores.push(p.score as f64);
        }
        for window in batch.chunks_exact(per) {
            for (column, v) in columns.iter_mut().zip(input_summary(manifest, window)) {
                column.push(v as f64);
            }
        }
    }
    let features = input_summary_names(manifest)
        .into_iter()
        .zip(&columns)
        .map(|(name, column)| NamedHistogram {
            name,
            histogram: Histogram::from_samples(column, DEFAULT_BINS),
        })
        .collect();
    Ok(Reference {
        samples: n,
        features,
        score: Histogram::from_samples(&scores, DEFAULT_BINS),
    })
}

/// The reference of `model` over every sample of `ds`, prepared as at
/// inference (features extracted for feature models, then normalized as the
/// manifest says).
pub fn reference_for_dataset(model: &LoadedModel, ds: &Dataset) -> Result<Reference, ModelError> {
    if ds.is_empty() {
        return Err(ModelError::Data(format!(
            "{}: no sample to compute a reference on",
            ds.name
        )));
    }
    let input = model_dataset(model, ds)?;
    let spec = &model.manifest().input;
    if (input.channels, input.length) != (spec.channels, spec.length) {
        return Err(ModelError::Data(format!(
            "{}: the data gives {}×{} model inputs, the model reads {}×{}",
            ds.name, input.channels, input.length, spec.channels, spec.length
        )));
    }
    let mut x = input.x.clone();
    model.normalize(&mut x);
    reference_from(model, &x, input.len())
}

/// Store `reference` in the manifest of the artifact in `dir`, rewriting
/// manifest.json (nothing else changes; the file hashes stay valid). Any
/// `manifest.sig` no longer matches afterwards: the artifact must be signed
/// again. Returns the new manifest.
pub fn store_reference(dir: &Path, reference: Reference) -> Result<Manifest, ModelError> {
    let path = dir.join(MANIFEST_FILE);
    let origin = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let mut manifest = parse_manifest(&bytes, &origin)?;
    manifest.reference = Some(reference);
    let problems = manifest.problems();
    if !problems.is_empty() {
        return Err(ModelError::ManifestInvalid {
            path: origin,
            problems,
        });
    }
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| ModelError::ManifestSyntax {
        path: origin,
        message: e.to_string(),
    })?;
    // Never half a manifest, even after a power cut.
    crate::fsutil::write_atomic(&path, (text + "\n").as_bytes())
        .map_err(|source| ModelError::Io { path, source })?;
    Ok(manifest)
}

/// Counts of a period's windows in the bins of a [`Reference`], for the PSI
/// of every input summary value and of the score at the period's end.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftCounts {
    reference: Reference,
    features: Vec<Vec<u64>>,
    score: Vec<u64>,
    windows: u64,
}

/// The drift of one period against the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftStats {
    /// Windows counted.
    pub windows: u64,
    /// PSI of each input summary value, in [`input_summary_names`] order.
    pub features: Vec<f64>,
    /// Largest of `features` (NaN when there is none or nothing was counted).
    pub max_feature_psi: f64,
    /// PSI of the score.
    pub score: f64,
}

impl DriftCounts {
    /// Empty counts in the bins of `reference`.
    pub fn new(reference: Reference) -> Self {
        let features = reference
            .features
            .iter()
            .map(|f| vec![0; f.histogram.bins()])
            .collect();
        let score = vec![0; reference.score.bins()];
        Self {
            reference,
            features,
            score,
            windows: 0,
        }
    }

    /// Count one window: its [`input_summary`] and its score.
    pub fn add(&mut self, summary: &[f32], score: f32) {
        for ((counts, f), &v) in self
            .features
            .iter_mut()
            .zip(&self.reference.features)
            .zip(summary)
        {
            if let Some(b) = f.histogram.bin(v as f64) {
                counts[b] += 1;
            }
        }
        if let Some(b) = self.reference.score.bin(score as f64) {
            self.score[b] += 1;
        }
        self.windows += 1;
    }

    /// Windows counted since the last [`DriftCounts::clear`].
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// The PSI of everything counted.
    pub fn stats(&self) -> DriftStats {
        let features: Vec<f64> = self
            .features
            .iter()
            .zip(&self.reference.features)
            .map(|(c, f)| psi(&f.histogram.proportions, c))
            .collect();
        let max_feature_psi = features
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .reduce(f64::max)
            .unwrap_or(f64::NAN);
        DriftStats {
            windows: self.windows,
            features,
            max_feature_psi,
            score: psi(&self.reference.score.proportions, &self.score),
        }
    }

    /// Start a new period.
    pub fn clear(&mut self) {
        self.features.iter_mut().for_each(|c| c.fill(0));
        self.score.fill(0);
        self.windows = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Architecture, InputSpec, MANIFEST_SCHEMA, Normalization, Task};

    /// Deterministic values spread over 0..1 (a low-discrepancy sequence).
    fn uniform(n: usize, offset: f64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as f64 * 0.618_033_988_75) % 1.0) + offset)
            .collect()
    }

    #[test]
    fn psi_of_identical_distributions_is_about_zero() {
        let h = Histogram::from_samples(&uniform(1000, 0.0), 10);
        assert_eq!(h.bins(), 10);
        for p in &h.proportions {
            assert!((p - 0.1).abs() < 0.005, "{:?}", h.proportions);
        }
        let same = h.psi(&uniform(1000, 0.0));
        assert!(same.abs() < 1e-9, "{same}");
        // Another sample of the same distribution: small.
        let other: Vec<f64> = uniform(3000, 0.0).into_iter().skip(1000).collect();
        assert!(h.psi(&other) < 0.01, "{}", h.psi(&other));
        assert!(h.ks(&other) < 0.02);
    }

    #[test]
    fn psi_of_a_shifted_distribution_is_significant() {
        let h = Histogram::from_samples(&uniform(1000, 0.0), 10);
        let shifted = uniform(1000, 0.5);
        let v = h.psi(&shifted);
        assert!(v > PSI_SIGNIFICANT, "{v}");
        let ks = h.ks(&shifted);
        assert!((ks - 0.5).abs() < 0.02, "{ks}");
        // Everything beyond the reference: one bin holds it all.
        let far = vec![10.0; 50];
        assert!(h.psi(&far) > 1.0);
        assert!((h.ks(&far) - 0.9).abs() < 0.01);
    }

    #[test]
    fn psi_smoothing_and_degenerate_input() {
        // An empty expected bin does not make the index infinite.
        let v = psi(&[0.5, 0.5, 0.0], &[1, 1, 2]);
        assert!(v.is_finite() && v > 1.0, "{v}");
        let expected =
            (0.5 - 0.25) * (0.5f64 / 0.25).ln() * 2.0 + (0.5 - 1e-4) * (0.5 / 1e-4f64).ln();
        assert!((v - expected).abs() < 1e-12, "{v} {expected}");
        assert!(psi(&[0.5, 0.5], &[0, 0]).is_nan());
        assert!(psi(&[0.5, 0.5], &[1, 1, 1]).is_nan());
        assert!(ks_statistic(&[1.0], &[]).is_nan());
    }

    #[test]
    fn constant_data_gives_one_bin() {
        let h = Histogram::from_samples(&[3.5; 40], 10);
        assert_eq!(h, Histogram::single());
        assert!(h.problems().is_empty());
        assert_eq!(h.counts(&[-1e9, 3.5, 1e9]), vec![3]);
        assert_eq!(h.psi(&[100.0]), 0.0);
        assert_eq!(Histogram::from_samples(&[], 10), Histogram::single());
        assert_eq!(
            Histogram::from_samples(&[f64::NAN, f64::INFINITY], 10),
            Histogram::single()
        );
    }

    #[test]
    fn ties_stay_in_one_bin_and_no_bin_is_empty() {
        // 30 zeros and 10 ones: the quantile cuts fall in the run of zeros.
        let mut data = vec![0.0; 30];
        data.extend([1.0; 10]);
        let h = Histogram::from_samples(&data, 10);
        assert_eq!(h.edges, vec![0.5]);
        assert_eq!(h.proportions, vec![0.75, 0.25]);
        // Distinct values: exactly equal counts, cuts halfway between values.
        let data: Vec<f64> = (0..20).map(|i| i as f64).collect();
        let h = Histogram::from_samples(&data, 4);
        assert_eq!(h.edges, vec![4.5, 9.5, 14.5]);
        assert_eq!(h.proportions, vec![0.25; 4]);
        // Heavy ties everywhere.
        let data: Vec<f64> = (0..100).map(|i| (i % 3) as f64).collect();
        let h = Histogram::from_samples(&data, 10);
        assert!(h.problems().is_empty(), "{:?}", h.problems());
        assert!(h.proportions.iter().all(|p| *p > 0.0), "{h:?}");
        assert_eq!(h.bins(), 3);
    }

    #[test]
    fn counts_at_bin_edges() {
        let h = Histogram {
            edges: vec![0.0, 1.0],
            proportions: vec![0.25, 0.5, 0.25],
        };
        // An edge belongs to the bin above it.
        assert_eq!(h.bin(-0.001), Some(0));
        assert_eq!(h.bin(0.0), Some(1));
        assert_eq!(h.bin(0.999), Some(1));
        assert_eq!(h.bin(1.0), Some(2));
        assert_eq!(h.bin(f64::NEG_INFINITY), Some(0));
        assert_eq!(h.bin(f64::INFINITY), Some(2));
        assert_eq!(h.bin(f64::NAN), None);
        assert_eq!(
            h.counts(&[-5.0, 0.0, 0.5, 1.0, 2.0, f64::NAN]),
            vec![1, 2, 2]
        );
    }

    #[test]
    fn histogram_problems_are_found() {
        let bad = Histogram {
            edges: vec![1.0, 0.0],
            proportions: vec![0.5, 0.6],
        };
        let p = bad.problems();
        assert_eq!(p.len(), 3, "{p:?}");
    }

    fn tiny_manifest(kind: InputKind, channels: usize, length: usize) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            name: "tiny".into(),
            version: "1.0.0".into(),
            task: Task::Classifier,
            architecture: Architecture::Mlp { hidden: vec![4] },
            input: InputSpec {
                kind,
                channels,
                length,
                features: if kind == InputKind::Features {
                    vec!["rms".into(), "bands:2".into()]
                } else {
                    Vec::new()
                },
                window: None,
            },
            normalization: Normalization::None,
            labels: vec!["a".into(), "b".into()],
            anomaly_threshold: None,
            weights: "w".into(),
            provenance: None,
            metrics: Default::default(),
            reference: None,
            created_at: String::new(),
            files: [("w".to_string(), String::new())].into(),
        }
    }

    #[test]
    fn input_summary_layout() {
        // Raw: [channels][length], one mean per channel.
        let m = tiny_manifest(InputKind::Raw, 2, 3);
        let window = [1.0, 2.0, 3.0, -1.0, -1.0, 5.0];
        assert_eq!(input_summary(&m, &window), vec![2.0, 1.0]);
        assert_eq!(input_summary_names(&m), vec!["ch0", "ch1"]);
        // Features: the vector itself, channel-major names.
        let m = tiny_manifest(InputKind::Features, 6, 1);
        let f = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        assert_eq!(input_summary(&m, &f), f.to_vec());
        assert_eq!(
            input_summary_names(&m),
            vec![
                "ch0.rms",
                "ch0.bands:2[0]",
                "ch0.bands:2[1]",
                "ch1.rms",
                "ch1.bands:2[0]",
                "ch1.bands:2[1]"
            ]
        );
        // Names that do not fit the channel count fall back to indices.
        let m = tiny_manifest(InputKind::Features, 4, 1);
        assert_eq!(input_summary_names(&m), vec!["f0", "f1", "f2", "f3"]);
    }

    fn reference() -> Reference {
        Reference {
            samples: 1000,
            features: vec![NamedHistogram {
                name: "ch0".into(),
                histogram: Histogram::from_samples(&uniform(1000, 0.0), 10),
            }],
            score: Histogram::from_samples(&uniform(1000, 0.0), 4),
        }
    }

    #[test]
    fn manifest_round_trips_with_and_without_reference() {
        let mut m = tiny_manifest(InputKind::Raw, 1, 3);
        let text = serde_json::to_string_pretty(&m).unwrap();
        assert!(!text.contains("reference"));
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
        m.reference = Some(reference());
        assert!(m.problems().is_empty(), "{:?}", m.problems());
        let text = serde_json::to_string_pretty(&m).unwrap();
        assert!(text.contains("\"reference\""));
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
        // The bundled manifest parses either way.
        let bundled: Manifest = serde_json::from_slice(crate::bundled::MANIFEST).unwrap();
        let again = serde_json::to_vec_pretty(&bundled).unwrap();
        assert_eq!(serde_json::from_slice::<Manifest>(&again).unwrap(), bundled);
        // A reference that does not fit the input is a manifest problem.
        let mut wrong = m.clone();
        wrong.input.channels = 2;
        wrong.normalization = Normalization::None;
        assert!(
            wrong
                .problems()
                .iter()
                .any(|p| p.contains("feature histograms")),
            "{:?}",
            wrong.problems()
        );
    }

    #[test]
    fn drift_counts_measure_each_period() {
        let mut counts = DriftCounts::new(reference());
        for v in uniform(500, 0.0) {
            counts.add(&[v as f32], v as f32);
        }
        let s = counts.stats();
        assert_eq!(s.windows, 500);
        assert!(s.features[0] < 0.05 && s.score < 0.05, "{s:?}");
        assert_eq!(s.max_feature_psi, s.features[0]);
        counts.clear();
        assert!(counts.stats().score.is_nan());
        for v in uniform(500, 0.7) {
            counts.add(&[v as f32], 0.1);
        }
        let s = counts.stats();
        assert!(
            s.features[0] > PSI_SIGNIFICANT && s.score > PSI_SIGNIFICANT,
            "{s:?}"
        );
    }

    #[test]
    fn stored_reference_keeps_the_artifact_loadable() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["manifest.json", "model.bpk"] {
            std::fs::copy(
                std::path::Path::new(crate::bundled::DIR).join(f),
                dir.path().join(f),
            )
            .unwrap();
        }
        let device = burn::tensor::Device::flex();
        let model = LoadedModel::load_dir(dir.path(), &device).unwrap();
        let ds = Dataset {
            name: "synthetic".into(),
            channels: 6,
            length: 100,
            labels: vec!["a".into()],
            channel_names: Vec::new(),
            x: (0..12 * 600).map(|i| (i as f32 * 0.11).cos()).collect(),
            y: vec![0; 12],
        };
        let r = reference_for_dataset(&model, &ds).unwrap();
        assert_eq!(r.samples, 12);
        let weights = std::fs::read(dir.path().join("model.bpk")).unwrap();
        let stored = store_reference(dir.path(), r.clone()).unwrap();
        assert_eq!(stored.reference.as_ref(), Some(&r));
        let reloaded = LoadedModel::load_dir(dir.path(), &device).unwrap();
        assert_eq!(reloaded.manifest().reference.as_ref(), Some(&r));
        assert_eq!(
            std::fs::read(dir.path().join("model.bpk")).unwrap(),
            weights
        );
        // Everything but the reference is unchanged.
        let mut without = reloaded.manifest().clone();
        without.reference = None;
        let mut original = model.manifest().clone();
        original.reference = None;
        assert_eq!(without, original);
        // Data that does not fit the model is refused with a clear error.
        let short = Dataset {
            length: 50,
            x: ds.x[..12 * 300].to_vec(),
            ..ds
        };
        let err = reference_for_dataset(&model, &short).unwrap_err();
        assert!(err.to_string().contains("6×50"), "{err}");
    }

    /// PSI of every summary value and of the score of `ds` against `r`.
    fn psi_against(model: &LoadedModel, r: &Reference, ds: &Dataset) -> DriftStats {
        let mut x = ds.x.clone();
        model.normalize(&mut x);
        let preds = model.predict(&x, ds.len()).unwrap();
        let mut counts = DriftCounts::new(r.clone());
        for (window, p) in x.chunks_exact(model.window_values()).zip(&preds) {
            counts.add(&input_summary(model.manifest(), window), p.score);
        }
        counts.stats()
    }

    #[test]
    fn bundled_manifest_carries_the_training_reference() {
        let device = burn::tensor::Device::flex();
        let model =
            LoadedModel::load_static(crate::bundled::MANIFEST, crate::bundled::WEIGHTS, &device)
                .unwrap();
        let r = model
            .manifest()
            .reference
            .clone()
            .expect("the bundled manifest has a reference (outpost-train reference)");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/datasets");
        let path = dir.join("BasicMotions/BasicMotions_TRAIN.ts");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-datasets.sh first",
            path.display()
        );
        let train = crate::dataset::load_ts(&path).unwrap();
        assert_eq!(r.samples, train.len());
        // The training split against its own reference: no drift at all.
        let s = psi_against(&model, &r, &train);
        assert!(s.max_feature_psi < 1e-9 && s.score < 1e-9, "{s:?}");
    }

    #[test]
    fn reference_of_the_bundled_model() {
        let device = burn::tensor::Device::flex();
        let model =
            LoadedModel::load_static(crate::bundled::MANIFEST, crate::bundled::WEIGHTS, &device)
                .unwrap();
        let n = 20;
        let mut x: Vec<f32> = (0..n * 600).map(|i| (i as f32 * 0.37).sin()).collect();
        model.normalize(&mut x);
        let r = reference_from(&model, &x, n).unwrap();
        assert_eq!(r.samples, n);
        assert_eq!(r.features.len(), 6);
        assert_eq!(r.features[5].name, "ch5");
        assert!(r.problems(6).is_empty(), "{:?}", r.problems(6));
        // The score histogram holds exactly the predictions' scores.
        let scores: Vec<f64> = model
            .predict(&x, n)
            .unwrap()
            .iter()
            .map(|p| p.score as f64)
            .collect();
        assert!(r.score.psi(&scores).abs() < 1e-9);
        assert!(matches!(
            reference_from(&model, &x[1..], n),
            Err(ModelError::InputShape { .. })
        ));
        assert!(reference_from(&model, &[], 0).is_err());
    }
}
