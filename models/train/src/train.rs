//! Training on the CPU with burn autodiff: seeded, with a stratified
//! validation split and early stopping on validation accuracy.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};

use outpost_models::ModelError;
use outpost_models::arch::Network;
use outpost_models::artifact::normalize;
use outpost_models::manifest::{
    Architecture, InputKind, InputSpec, MANIFEST_SCHEMA, Manifest, Normalization, Provenance, Task,
};

use crate::dataset::Dataset;

/// Trainer settings; the defaults give a good result with no flag.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Network to train.
    pub architecture: Architecture,
    /// Maximum epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation result.
    pub patience: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Fraction of the training data held out for early stopping.
    pub validation_fraction: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Input normalization to fit.
    pub normalization: NormalizationKind,
    /// Feature extractors the network reads instead of the raw window
    /// (empty: raw windows). Feature models are always normalized per channel.
    pub features: Vec<String>,
}

/// Which normalization the trainer fits and stores in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizationKind {
    /// Per-channel statistics of the training data.
    PerChannel,
    /// Each window z-normalized on its own.
    PerWindow,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            architecture: Architecture::Fcn {
                filters: vec![64, 128, 64],
                kernels: vec![8, 5, 3],
            },
            epochs: 200,
            patience: 40,
            batch_size: 16,
            learning_rate: 1e-3,
            validation_fraction: 0.2,
            seed: 42,
            normalization: NormalizationKind::PerChannel,
            features: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// The defaults for series of `length` samples. Long series (over 512
    /// samples) get a narrower FCN with wider kernels and more epochs: the
    /// receptive field grows with the series while the cost per epoch stays
    /// within the 10-minute budget on a 2-core gateway-class machine.
    pub fn for_length(length: usize) -> Self {
        let mut cfg = Self::default();
        if length > LONG_SERIES {
            cfg.architecture = Architecture::Fcn {
                filters: vec![16, 32, 16],
                kernels: vec![16, 8, 4],
            };
            cfg.epochs = 400;
        }
        cfg
    }
}

/// Series longer than this get the long-series defaults of [`TrainConfig::for_length`].
pub const LONG_SERIES: usize = 512;

/// One epoch of the training curve.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochStats {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_accuracy: f64,
    /// Validation accuracy.
    pub validation_accuracy: f64,
    /// Validation loss.
    pub validation_loss: f64,
}

/// A trained network and the manifest that describes it (without file hashes:
/// [`outpost_models::artifact::save_artifact`] fills those in).
pub struct Trained {
    /// The network, in validation mode on a plain device.
    pub network: Network,
    /// Its manifest.
    pub manifest: Manifest,
    /// The training curve.
    pub history: Vec<EpochStats>,
}

/// Deterministic splitmix64 generator for shuffling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Per-channel mean and standard deviation over all samples and time steps.
pub fn channel_stats(ds: &Dataset) -> (Vec<f32>, Vec<f32>) {
    let (c, l) = (ds.channels, ds.length);
    let mut sum = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for i in 0..ds.len() {
        for (ch, series) in ds.sample(i).chunks_exact(l).enumerate() {
            for &v in series {
                sum[ch] += v as f64;
                sq[ch] += (v as f64) * (v as f64);
            }
        }
    }
    let n = (ds.len() * l).max(1) as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let std = sum
        .iter()
        .zip(&sq)
        .map(|(s, q)| {
            let m = s / n;
            let var = (q / n - m * m).max(0.0);
            (var.sqrt() as f32).max(1e-6)
        })
        .collect();
    (mean, std)
}

/// The normalization of `kind`, with statistics from `train`.
pub fn fit_normalization(kind: NormalizationKind, train: &Dataset) -> Normalization {
    match kind {
        NormalizationKind::PerChannel => {
            let (mean, std) = channel_stats(train);
            Normalization::PerChannel { mean, std }
        }
        NormalizationKind::PerWindow => Normalization::PerWindow,
    }
}

/// The manifest of a freshly trained model (no file hashes, no creation time
/// yet). `ds` is what the network reads; `window` is the raw window length of
/// a feature model.
#[allow(clippy::too_many_arguments)]
fn manifest_for(
    name: &str,
    version: &str,
    task: Task,
    cfg: &TrainConfig,
    ds: &Dataset,
    window: Option<usize>,
    normalization: Normalization,
    anomaly_threshold: Option<f32>,
    split: (usize, usize),
    epochs: usize,
    mut settings: BTreeMap<String, String>,
) -> Manifest {
    settings.insert("learning_rate".into(), cfg.learning_rate.to_string());
    settings.insert("batch_size".into(), cfg.batch_size.to_string());
    settings.insert("patience".into(), cfg.patience.to_string());
    settings.insert("max_epochs".into(), cfg.epochs.to_string());
    settings.insert("optimizer".into(), "adam".into());
    Manifest {
        schema: MANIFEST_SCHEMA,
        name: name.to_string(),
        version: version.to_string(),
        task,
        architecture: cfg.architecture.clone(),
        input: match window {
            None => InputSpec {
                kind: InputKind::Raw,
                channels: ds.channels,
                length: ds.length,
                features: Vec::new(),
                window: None,
            },
            Some(w) => InputSpec {
                kind: InputKind::Features,
                channels: ds.channels,
                length: ds.length,
                features: cfg.features.clone(),
                window: Some(w),
            },
        },
        normalization,
        labels: if task == Task::Classifier {
            ds.labels.clone()
        } else {
            Vec::new()
        },
        anomaly_threshold,
        weights: "model.bpk".into(),
        provenance: Some(Provenance {
            dataset: ds.name.clone(),
            data_fingerprint: ds.fingerprint(),
            train_samples: split.0,
            validation_samples: split.1,
            seed: cfg.seed,
            epochs,
            settings,
        }),
        metrics: BTreeMap::new(),
        reference: None,
        created_at: String::new(),
        files: BTreeMap::new(),
    }
}

/// Drift reference statistics ([`outpost_models::drift`]) of a freshly trained
/// network over every window of the data it was given (`ds`, as loaded:
/// training and validation windows; for a detector, the anomalous ones too,
/// at the rate the data has them), prepared exactly as the runtime prepares
/// its windows. `outpost-train reference` computes the same from the same file.
fn training_reference(
    manifest: &Manifest,
    network: &Network,
    ds: &Dataset,
) -> Result<outpost_models::drift::Reference, ModelError> {
    let model = outpost_models::LoadedModel::from_network(
        manifest.clone(),
        network.clone(),
        &Device::flex(),
    );
    crate::drift::reference_for_dataset(&model, ds)
}

fn batch_tensors(
    ds: &Dataset,
    idx: &[usize],
    norm: &Normalization,
    device: &Device,
) -> (Tensor<3>, Tensor<1, Int>) {
    let (c, l) = (ds.channels, ds.length);
    let mut x = Vec::with_capacity(idx.len() * c * l);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend_from_slice(ds.sample(i));
        y.push(ds.y[i] as i64);
    }
    normalize(norm, c, l, &mut x);
    (
        Tensor::<3>::from_data(TensorData::new(x, [idx.len(), c, l]), device),
        Tensor::<1, Int>::from_data(TensorData::new(y, [idx.len()]), device),
    )
}

/// Loss and accuracy of `net` (validation mode) over `ds`.
fn evaluate(net: &Network, ds: &Dataset, norm: &Normalization, device: &Device) -> (f64, f64) {
    if ds.is_empty() {
        return (0.0, 0.0);
    }
    let idx: Vec<usize> = (0..ds.len()).collect();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut loss_sum = 0.0;
    let mut correct = 0usize;
    for chunk in idx.chunks(64) {
        let (x, y) = batch_tensors(ds, chunk, norm, device);
        let logits = net.forward(x);
        let loss: f32 = loss_fn
            .forward(logits.clone(), y.clone())
            .into_scalar::<f32>();
        loss_sum += loss as f64 * chunk.len() as f64;
        let pred: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .try_to_vec_as::<i64>()
            .unwrap_or_default();
        let truth: Vec<i64> = y.into_data().try_to_vec_as::<i64>().unwrap_or_default();
        correct += pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
    }
    (loss_sum / ds.len() as f64, correct as f64 / ds.len() as f64)
}

/// Train a classifier on `ds` and describe it in a manifest named `name@version`.
pub fn train_classifier(
    ds: &Dataset,
    cfg: &TrainConfig,
    name: &str,
    version: &str,
    mut progress: impl FnMut(&EpochStats),
) -> Result<Trained, ModelError> {
    let raw = ds;
    let converted;
    let (ds, window, norm_kind) = if cfg.features.is_empty() {
        (ds, None, cfg.normalization)
    } else {
        converted =
            crate::features::dataset_features(ds, &cfg.features).map_err(ModelError::Data)?;
        (&converted, Some(ds.length), NormalizationKind::PerChannel)
    };
    let (train, val) = if cfg.validation_fraction > 0.0 {
        ds.split_stratified(cfg.validation_fraction, cfg.seed)
    } else {
        (ds.clone(), ds.clone())
    };
    let normalization = fit_normalization(norm_kind, &train);
    let device = Device::flex().autodiff();
    device.seed(cfg.seed);
    let plain = Device::flex();
    let mut net = Network::init(
        &cfg.architecture,
        ds.channels,
        ds.length,
        ds.labels.len(),
        &device,
    );
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = SplitMix(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut best: Option<(f64, f64, Network)> = None;
    let mut since_best = 0usize;
    let mut history = Vec::new();
    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        let mut correct = 0usize;
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            // A batch of one breaks batch norm's statistics; fold it into the previous step.
            if chunk.len() < 2 && train.len() >= 2 {
                continue;
            }
            let (x, y) = batch_tensors(&train, chunk, &normalization, &device);
            let logits = net.forward(x);
            let loss = loss_fn.forward(logits.clone(), y.clone());
            loss_sum += loss.clone().into_scalar::<f32>() as f64 * chunk.len() as f64;
            let pred: Vec<i64> = logits
                .argmax(1)
                .into_data()
                .try_to_vec_as::<i64>()
                .unwrap_or_default();
            let truth: Vec<i64> = y.into_data().try_to_vec_as::<i64>().unwrap_or_default();
            correct += pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(cfg.learning_rate, net, grads);
        }
        let valid = net.valid();
        let (val_loss, val_acc) = evaluate(&valid, &val, &normalization, &plain);
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / train.len().max(1) as f64,
            train_accuracy: correct as f64 / train.len().max(1) as f64,
            validation_accuracy: val_acc,
            validation_loss: val_loss,
        };
        progress(&stats);
        history.push(stats);
        let better = match &best {
            None => true,
            Some((acc, loss, _)) => val_acc > *acc || (val_acc == *acc && val_loss < *loss),
        };
        if better {
            best = Some((val_acc, val_loss, valid));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    let network = match best {
        Some((_, _, n)) => n,
        None => net.valid(),
    };
    let mut manifest = manifest_for(
        name,
        version,
        Task::Classifier,
        cfg,
        ds,
        window,
        normalization,
        None,
        (train.len(), val.len()),
        history.len(),
        BTreeMap::new(),
    );
    if let Some(p) = manifest.provenance.as_mut() {
        // The fingerprint names the recorded data, not the derived features.
        p.data_fingerprint = raw.fingerprint();
    }
    manifest.reference = Some(training_reference(&manifest, &network, raw)?);
    Ok(Trained {
        network,
        manifest,
        history,
    })
}

/// Detector training settings.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// The shared settings (architecture must be an autoencoder).
    pub base: TrainConfig,
    /// Quantile of the training windows' scores used as the anomaly threshold.
    pub threshold_quantile: f64,
    /// Label of normal windows; only they are trained on (all windows when no label matches).
    pub normal_label: String,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            base: TrainConfig {
                architecture: Architecture::Autoencoder {
                    channels: vec![16, 4],
                    kernel: 7,
                },
                epochs: 60,
                patience: 10,
                batch_size: 32,
                learning_rate: 1e-3,
                validation_fraction: 0.2,
                seed: 42,
                normalization: NormalizationKind::PerChannel,
                features: Vec::new(),
            },
            threshold_quantile: 0.99,
            normal_label: "0".into(),
        }
    }
}

/// Anomaly scores of `net` (validation mode) over every window of `ds`.
pub fn detector_scores(
    net: &Network,
    ds: &Dataset,
    norm: &Normalization,
    device: &Device,
) -> Vec<f32> {
    let idx: Vec<usize> = (0..ds.len()).collect();
    let mut out = Vec::with_capacity(ds.len());
    for chunk in idx.chunks(64) {
        let (x, _) = batch_tensors(ds, chunk, norm, device);
        let s: Vec<f32> = net
            .forward(x)
            .into_data()
            .try_to_vec_as::<f32>()
            .unwrap_or_default();
        out.extend(s);
    }
    out
}

/// Train an autoencoder on the normal windows of `ds`; the threshold is the
/// configured quantile of the training windows' reconstruction errors.
pub fn train_detector(
    ds: &Dataset,
    cfg: &DetectorConfig,
    name: &str,
    version: &str,
    mut progress: impl FnMut(&EpochStats),
) -> Result<Trained, ModelError> {
    let normal: Vec<usize> = match ds.labels.iter().position(|l| *l == cfg.normal_label) {
        Some(c) => (0..ds.len()).filter(|&i| ds.y[i] == c).collect(),
        None => (0..ds.len()).collect(),
    };
    let normal_ds = ds.subset(&normal);
    let (train, val) = normal_ds.split_stratified(cfg.base.validation_fraction, cfg.base.seed);
    let normalization = fit_normalization(cfg.base.normalization, &train);
    let device = Device::flex().autodiff();
    device.seed(cfg.base.seed);
    let plain = Device::flex();
    let mut net = Network::init(&cfg.base.architecture, ds.channels, ds.length, 1, &device);
    let mut optim = AdamConfig::new().init();
    let mut rng = SplitMix(cfg.base.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut best: Option<(f64, Network)> = None;
    let mut since_best = 0;
    let mut history = Vec::new();
    for epoch in 1..=cfg.base.epochs {
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(cfg.base.batch_size.max(1)) {
            let (x, _) = batch_tensors(&train, chunk, &normalization, &device);
            let loss = net.forward(x).mean();
            loss_sum += loss.clone().into_scalar::<f32>() as f64 * chunk.len() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(cfg.base.learning_rate, net, grads);
        }
        let valid = net.valid();
        let val_scores = detector_scores(
            &valid,
            if val.is_empty() { &train } else { &val },
            &normalization,
            &plain,
        );
        let val_loss =
            val_scores.iter().map(|&s| s as f64).sum::<f64>() / val_scores.len().max(1) as f64;
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / train.len().max(1) as f64,
            train_accuracy: f64::NAN,
            validation_accuracy: f64::NAN,
            validation_loss: val_loss,
        };
        progress(&stats);
        history.push(stats);
        if best.as_ref().is_none_or(|(l, _)| val_loss < *l) {
            best = Some((val_loss, valid));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.base.patience {
                break;
            }
        }
    }
    let network = match best {
        Some((_, n)) => n,
        None => net.valid(),
    };
    let train_scores = detector_scores(&network, &train, &normalization, &plain);
    let threshold = crate::eval::quantile(&train_scores, cfg.threshold_quantile);
    let mut settings = BTreeMap::new();
    settings.insert(
        "threshold_quantile".into(),
        cfg.threshold_quantile.to_string(),
    );
    let mut manifest = manifest_for(
        name,
        version,
        Task::Detector,
        &cfg.base,
        ds,
        None,
        normalization,
        Some(threshold),
        (train.len(), val.len()),
        history.len(),
        settings,
    );
    manifest.reference = Some(training_reference(&manifest, &network, ds)?);
    Ok(Trained {
        network,
        manifest,
        history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes of sine windows, `n` samples of 2 channels × 32.
    fn synthetic(n: usize) -> Dataset {
        let (channels, length) = (2, 32);
        let mut x = Vec::with_capacity(n * channels * length);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let class = i % 2;
            for c in 0..channels {
                for t in 0..length {
                    let f = 0.2 + 0.3 * class as f32 + 0.05 * c as f32;
                    x.push((t as f32 * f + i as f32).sin() * (1.0 + class as f32));
                }
            }
            y.push(class);
        }
        Dataset {
            name: "synthetic".into(),
            channels,
            length,
            labels: vec!["0".into(), "1".into()],
            channel_names: Vec::new(),
            x,
            y,
        }
    }

    #[test]
    fn trained_classifier_carries_its_training_reference() {
        let ds = synthetic(24);
        let cfg = TrainConfig {
            architecture: Architecture::Mlp { hidden: vec![8] },
            epochs: 1,
            features: vec!["rms".into(), "bands:2".into()],
            ..TrainConfig::default()
        };
        let t = train_classifier(&ds, &cfg, "syn", "1.0.0", |_| {}).unwrap();
        let r = t.manifest.reference.clone().unwrap();
        assert_eq!(r.samples, 24);
        let names: Vec<&str> = r.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ch0.rms",
                "ch0.bands:2[0]",
                "ch0.bands:2[1]",
                "ch1.rms",
                "ch1.bands:2[0]",
                "ch1.bands:2[1]"
            ]
        );
        // What the trainer stores is what the reference of the saved artifact gives.
        let dir = tempfile::tempdir().unwrap();
        outpost_models::artifact::save_artifact(dir.path(), t.manifest, &t.network, &[]).unwrap();
        let model = outpost_models::LoadedModel::load_dir(dir.path(), &Device::flex()).unwrap();
        assert_eq!(model.manifest().reference.as_ref(), Some(&r));
        assert_eq!(crate::drift::reference_for_dataset(&model, &ds).unwrap(), r);
    }

    #[test]
    fn trained_detector_carries_its_training_reference() {
        let ds = synthetic(24);
        let mut cfg = DetectorConfig::default();
        cfg.base.architecture = Architecture::Autoencoder {
            channels: vec![4],
            kernel: 3,
        };
        cfg.base.epochs = 1;
        let t = train_detector(&ds, &cfg, "syn", "1.0.0", |_| {}).unwrap();
        let r = t.manifest.reference.clone().unwrap();
        assert_eq!(r.samples, 24);
        assert_eq!(r.features.len(), 2);
        assert!(r.score.bins() > 1, "{r:?}");
        let dir = tempfile::tempdir().unwrap();
        outpost_models::artifact::save_artifact(dir.path(), t.manifest, &t.network, &[]).unwrap();
        let model = outpost_models::LoadedModel::load_dir(dir.path(), &Device::flex()).unwrap();
        assert_eq!(model.manifest().reference.as_ref(), Some(&r));
    }
}
