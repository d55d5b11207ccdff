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

use crate::artifact::LoadedModel;
use crate::error::ModelError;
use crate::features::Feature;
use crate::files::parse_manifest;
use crate::manifest::{InputKind, MANIFEST_FILE, Manifest};
pub use crate::reference::{
    Histogram, NamedHistogram, PSI_FLOOR, PSI_MODERATE, PSI_SIGNIFICANT, Reference, ks_statistic,
    psi,
};

/// Bins of the histograms computed by [`reference_from`].
pub const DEFAULT_BINS: usize = 10;

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
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|source| ModelError::ManifestSyntax {
            path: origin,
            source,
        })?;
    // Never half a manifest, even after a power cut.
    outpost_storage::fsutil::write_atomic(&path, (text + "\n").as_bytes())
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
