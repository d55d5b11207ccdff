//! The model artifact's `manifest.json`: what a model is, what it expects and
//! how it was made. The runtime trusts nothing in an artifact that the manifest
//! does not name and hash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the manifest layout itself.
pub const MANIFEST_SCHEMA: u32 = 1;

/// File name of the manifest inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// File name of the manifest's signature beside it ([`crate::signing`]).
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// What the model's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Softmax over `labels`; the score of a window is the winning class's probability.
    Classifier,
    /// One anomaly score per window; above `anomaly_threshold` is an anomaly.
    Detector,
}

/// What the network reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// The normalized raw window, `channels × length`.
    Raw,
    /// A feature vector per window (`channels × length` with length 1 per feature set).
    Features,
}

/// Input tensor shape for one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Raw samples or extracted features.
    pub kind: InputKind,
    /// Channels per sample (for features: the number of features).
    pub channels: usize,
    /// Samples per window (1 for features).
    pub length: usize,
    /// Names of the feature extractors, in order, when `kind` is `features`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// For `features`: the raw window length (samples) the extractors were
    /// trained on; the runtime's windows must have this size. Absent: any size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
}

/// How a window is normalized before it enters the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Normalization {
    /// No normalization.
    None,
    /// `(x - mean[c]) / std[c]` with statistics computed on the training data.
    PerChannel {
        /// Mean per channel.
        mean: Vec<f32>,
        /// Standard deviation per channel (never zero; clamped at training time).
        std: Vec<f32>,
    },
    /// Each channel of each window z-normalized on its own (UCR convention).
    PerWindow,
}

/// Network architecture and its hyperparameters. A new size needs no rebuild.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Architecture {
    /// Fully convolutional network (Wang et al. 2017): conv-BN-ReLU blocks,
    /// global average pooling, linear head.
    Fcn {
        /// Output channels of each block.
        filters: Vec<usize>,
        /// Kernel size of each block.
        kernels: Vec<usize>,
    },
    /// Multilayer perceptron over a feature vector.
    Mlp {
        /// Widths of the hidden layers.
        hidden: Vec<usize>,
    },
    /// 1D convolutional autoencoder; the score is the mean squared
    /// reconstruction error of the normalized window.
    Autoencoder {
        /// Channels of the encoder's layers, narrowing to the bottleneck; the
        /// decoder mirrors them back to the input channels.
        channels: Vec<usize>,
        /// Kernel size of every layer.
        kernel: usize,
    },
}

impl Architecture {
    /// Short name used in logs, metrics and the CLI (`fcn`, `mlp`).
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Fcn { .. } => "fcn",
            Architecture::Mlp { .. } => "mlp",
            Architecture::Autoencoder { .. } => "autoencoder",
        }
    }
}

/// Where the model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Dataset name as given to the trainer.
    pub dataset: String,
    /// sha256 of the training data as loaded (samples, labels and label names).
    pub data_fingerprint: String,
    /// Samples used for training (after the validation split).
    pub train_samples: usize,
    /// Samples held out for early stopping.
    pub validation_samples: usize,
    /// Seed of every random choice made in training.
    pub seed: u64,
    /// Epochs actually run (early stopping may end before the maximum).
    pub epochs: usize,
    /// Free-form trainer settings (learning rate, batch size, ...).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version of this file ([`MANIFEST_SCHEMA`]).
    pub schema: u32,
    /// Model name, e.g. `basicmotions-fcn`.
    pub name: String,
    /// Semantic version of this model.
    pub version: String,
    /// Classifier or detector.
    pub task: Task,
    /// Network and hyperparameters.
    pub architecture: Architecture,
    /// Input shape of one window.
    pub input: InputSpec,
    /// Input normalization.
    pub normalization: Normalization,
    /// Class names, index = network output (classifiers).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Score above which a window is an anomaly (detectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_threshold: Option<f32>,
    /// Name of the weights file inside the artifact directory.
    pub weights: String,
    /// How the model was trained, if it was trained by Outpost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// Evaluation metrics (e.g. `test_accuracy`).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Reference statistics of the model's inputs and scores on its training
    /// data, against which drift is measured ([`crate::drift`]). Absent in
    /// manifests written before drift detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<crate::reference::Reference>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// sha256 (hex) of every other file in the artifact, by file name.
    pub files: BTreeMap<String, String>,
}

impl Manifest {
    /// Number of network outputs.
    pub fn outputs(&self) -> usize {
        match self.task {
            Task::Classifier => self.labels.len(),
            Task::Detector => 1,
        }
    }

    /// `name@version`, as carried in aggregates and logs.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Problems that make the manifest unusable, all of them.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.schema != MANIFEST_SCHEMA {
            p.push(format!(
                "schema {} is not supported (expected {MANIFEST_SCHEMA})",
                self.schema
            ));
        }
        if !is_plain_name(&self.name) {
            p.push(format!(
                "name {:?} must be letters, digits, '.', '_' or '-', not starting with '.' (it names a directory)",
                self.name
            ));
        }
        if !self
            .version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            p.push(format!(
                "version {:?} may only hold letters, digits, '.', '-' and '+'",
                self.version
            ));
        }
        for f in self.files.keys() {
            if !is_plain_name(f) {
                p.push(format!(
                    "files: {f:?} must be a plain file name in the artifact directory"
                ));
            }
        }
        if !is_semver(&self.version) {
            p.push(format!(
                "version {:?} is not a semantic version (MAJOR.MINOR.PATCH)",
                self.version
            ));
        }
        if self.input.channels == 0 || self.input.length == 0 {
            p.push("input.channels and input.length must be at least 1".into());
        }
        match self.input.kind {
            InputKind::Raw if !self.input.features.is_empty() || self.input.window.is_some() => {
                p.push("input.features and input.window belong to feature models only".into())
            }
            InputKind::Features if self.input.features.is_empty() => {
                p.push("a feature model needs input.features".into())
            }
            InputKind::Features if self.input.window.is_some_and(|w| w < 2) => {
                p.push("input.window must be at least 2 samples".into())
            }
            InputKind::Features if self.normalization == Normalization::PerWindow => p.push(
                "per_window normalization does not apply to feature vectors (use per_channel)"
                    .into(),
            ),
            _ => {}
        }
        match self.task {
            Task::Classifier if self.labels.len() < 2 => {
                p.push("a classifier needs at least two labels".into())
            }
            Task::Detector if self.anomaly_threshold.is_none() => {
                p.push("a detector needs anomaly_threshold".into())
            }
            _ => {}
        }
        if let Normalization::PerChannel { mean, std } = &self.normalization {
            if mean.len() != self.input.channels || std.len() != self.input.channels {
                p.push(format!(
                    "normalization has {} means and {} stds for {} channels",
                    mean.len(),
                    std.len(),
                    self.input.channels
                ));
            }
            if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                p.push("normalization.std must be finite and positive".into());
            }
        }
        match &self.architecture {
            Architecture::Fcn { filters, kernels } => {
                if filters.is_empty() || filters.len() != kernels.len() {
                    p.push("fcn needs as many kernels as filters, at least one".into());
                }
                if filters.contains(&0) || kernels.contains(&0) {
                    p.push("fcn filters and kernels must be at least 1".into());
                }
            }
            Architecture::Mlp { hidden } => {
                if hidden.contains(&0) {
                    p.push("mlp hidden widths must be at least 1".into());
                }
            }
            Architecture::Autoencoder { channels, kernel } => {
                if channels.is_empty() || channels.contains(&0) || *kernel == 0 {
                    p.push(
                        "autoencoder needs at least one layer, channels and kernel at least 1"
                            .into(),
                    );
                }
                if self.task != Task::Detector {
                    p.push("an autoencoder is a detector (task = \"detector\")".into());
                }
            }
        }
        if let Some(r) = &self.reference {
            p.extend(r.problems(self.input.channels));
        }
        if !self.files.contains_key(&self.weights) {
            p.push(format!(
                "files has no hash for the weights {:?}",
                self.weights
            ));
        }
        p
    }
}

/// A file or directory name that stays inside its directory.
fn is_plain_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with('.')
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn is_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_their_directory() {
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        for good in ["basicmotions-fcn", "model.bpk", "v1_2"] {
            assert!(is_plain_name(good), "{good:?}");
        }
    }

    #[test]
    fn semver_check() {
        assert!(is_semver("1.2.3"));
        assert!(is_semver("0.1.0-rc.1"));
        assert!(!is_semver("1.2"));
        assert!(!is_semver("v1.2.3"));
    }
}
