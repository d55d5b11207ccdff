//! `outpost-train`: train and evaluate Outpost models on the CPU.
//!
//! A separate binary so that the gateway's `outpost` carries no training code.
//! A `.ts` dataset trains a classifier (FCN by default); a `.csv` dataset with
//! an `is_anomaly` column trains an anomaly detector (autoencoder).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use outpost_models::artifact::save_artifact;
use outpost_models::drift::store_reference;
use outpost_models::manifest::{Architecture, Task};
use outpost_models::signing::SIGNATURE_FILE;
use outpost_models::{LoadedModel, ModelError};
use outpost_train::dataset::{Dataset, DatasetError, load_csv_windows, load_ts};
use outpost_train::drift::reference_for_dataset;
use outpost_train::eval::{classifier_metrics, detector_metrics, quantile};
use outpost_train::predict::predict_dataset;
use outpost_train::report::{Findings, ReportError, write_report};
use outpost_train::train::{
    DetectorConfig, EpochStats, NormalizationKind, TrainConfig, Trained, train_classifier,
    train_detector,
};

#[derive(Parser)]
#[command(
    name = "outpost-train",
    version,
    about = "Train and evaluate Outpost models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    Fcn,
    Mlp,
    Autoencoder,
}

#[derive(Clone, Copy, ValueEnum)]
enum Norm {
    PerChannel,
    PerWindow,
}

/// How a CSV time series becomes windows.
#[derive(Args, Clone)]
struct CsvWindows {
    /// Samples per window (CSV datasets).
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Samples between window starts (CSV datasets).
    #[arg(long, default_value_t = 64)]
    hop: usize,
    /// Label column (CSV datasets); `is_anomaly` marks a window anomalous if any row is.
    #[arg(long, default_value = "is_anomaly")]
    label_column: String,
}

// Parsed once at start-up; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a model and write an artifact.
    Train {
        /// Training data: a UCR/UEA `.ts` file or a CSV time series.
        #[arg(long)]
        dataset: PathBuf,
        /// Test data, evaluated into the manifest's metrics (default: the
        /// `_TEST` file beside a `_TRAIN` file, when it exists).
        #[arg(long)]
        test: Option<PathBuf>,
        /// Architecture (default: fcn for `.ts`, autoencoder for `.csv`).
        #[arg(long, value_enum)]
        arch: Option<Arch>,
        /// Output artifact directory.
        #[arg(long)]
        out: PathBuf,
        /// Model name (default: dataset name and architecture).
        #[arg(long)]
        name: Option<String>,
        /// Model semantic version.
        #[arg(long, default_value = "1.0.0")]
        model_version: String,
        /// Maximum epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// FCN filters per block, e.g. `128,256,128` (default 64,128,64; 16,32,16
        /// for series over 512 samples).
        #[arg(long, value_delimiter = ',')]
        filters: Option<Vec<usize>>,
        /// FCN kernel sizes per block (default 8,5,3; 16,8,4 for series over 512 samples).
        #[arg(long, value_delimiter = ',')]
        kernels: Option<Vec<usize>>,
        /// MLP hidden widths, e.g. `128,64` (default 128,64).
        #[arg(long, value_delimiter = ',')]
        hidden: Option<Vec<usize>>,
        /// Feature extractors of an MLP, e.g. `rms,peak,bands:8`
        /// (default rms,peak,crest,kurtosis,bands:8).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        /// Adam learning rate (default 1e-3).
        #[arg(long)]
        learning_rate: Option<f64>,
        /// Mini-batch size (default 16; 32 for autoencoders).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Early stopping: epochs without a better validation result (default 40; 10 for autoencoders).
        #[arg(long)]
        patience: Option<usize>,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Normalization.
        #[arg(long, value_enum, default_value = "per-channel")]
        normalization: Norm,
        /// Anomaly threshold: this quantile of the training windows' scores (detectors).
        #[arg(long, default_value_t = 0.99)]
        threshold_quantile: f64,
        /// Creation time to record (RFC 3339); default: now.
        #[arg(long)]
        created_at: Option<String>,
        #[command(flatten)]
        csv: CsvWindows,
    },
    /// Bring your own weights: turn a PyTorch safetensors file for one of
    /// Outpost's architectures into a verified artifact.
    Import {
        /// Manifest describing the network (its `files` are filled in here).
        #[arg(long)]
        manifest: PathBuf,
        /// Weights saved from PyTorch (`safetensors.torch.save_file(model.state_dict(), ...)`).
        #[arg(long)]
        safetensors: PathBuf,
        /// Output artifact directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate an artifact on a dataset and write a report.
    Eval {
        /// Artifact directory.
        #[arg(long)]
        model: PathBuf,
        /// Dataset (`.ts` or CSV).
        #[arg(long)]
        dataset: PathBuf,
        /// Directory for report.md and its plots.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write each sample's prediction as JSON Lines here
        /// (`{"sample","truth","class","score","anomaly"}`).
        #[arg(long)]
        predictions: Option<PathBuf>,
        #[command(flatten)]
        csv: CsvWindows,
    },
    /// Compute the drift reference statistics of an existing artifact from a
    /// dataset (normally its training split) and store them in its
    /// manifest.json. Any signature of the artifact must be made again.
    Reference {
        /// Artifact directory (its manifest.json is rewritten; the weights stay as they are).
        #[arg(long)]
        model: PathBuf,
        /// Dataset (`.ts` or CSV), e.g. `BasicMotions_TRAIN.ts`.
        #[arg(long)]
        dataset: PathBuf,
        #[command(flatten)]
        csv: CsvWindows,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{0}")]
    Usage(String),
}

fn is_csv(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

fn load(path: &Path, csv: &CsvWindows) -> Result<Dataset, DatasetError> {
    if is_csv(path) {
        load_csv_windows(path, csv.window, csv.hop, &csv.label_column)
    } else {
        load_ts(path)
    }
}

fn default_test(train: &Path) -> Option<PathBuf> {
    let name = train.file_name()?.to_str()?;
    let test = train.with_file_name(name.replace("_TRAIN", "_TEST"));
    (test != train && test.exists()).then_some(test)
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn progress_bar(epochs: usize) -> ProgressBar {
    let pb = ProgressBar::new(epochs as u64);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

fn epoch_message(s: &EpochStats) -> String {
    if s.train_accuracy.is_finite() {
        format!(
            "loss {:.4} acc {:.3} | val loss {:.4} acc {:.3}",
            s.train_loss, s.train_accuracy, s.validation_loss, s.validation_accuracy
        )
    } else {
        format!(
            "loss {:.5} | val loss {:.5}",
            s.train_loss, s.validation_loss
        )
    }
}

/// Window RMS of normalized-free raw samples: the trivial anomaly score.
fn rms_scores(ds: &Dataset) -> Vec<f32> {
    (0..ds.len())
        .map(|i| {
            let s = ds.sample(i);
            (s.iter().map(|v| v * v).sum::<f32>() / s.len().max(1) as f32).sqrt()
        })
        .collect()
}

/// Evaluate; returns the headline metrics for the manifest.
fn evaluate(
    model: &LoadedModel,
    ds: &Dataset,
    report: Option<&Path>,
    history: Option<&[EpochStats]>,
) -> Result<Vec<(String, f64)>, CliError> {
    let m = model.manifest();
    let preds = predict_dataset(model, ds)?;
    match m.task {
        Task::Classifier => {
            // Map the dataset's labels onto the model's by name.
            let truth: Vec<usize> =
                ds.y.iter()
                    .map(|&y| {
                        m.labels
                            .iter()
                            .position(|l| *l == ds.labels[y])
                            .unwrap_or(usize::MAX)
                    })
                    .collect();
            let predicted: Vec<usize> = preds
                .iter()
                .map(|p| p.class.unwrap_or(usize::MAX))
                .collect();
            let cm = classifier_metrics(&truth, &predicted, m.labels.len());
            println!(
                "accuracy {:.4}  macro-F1 {:.4}  ({} samples)",
                cm.accuracy, cm.macro_f1, cm.samples
            );
            if let Some(dir) = report {
                let path = write_report(dir, m, &ds.name, Findings::Classifier(&cm), history)?;
                println!("report {}", path.display());
            }
            Ok(vec![
                ("test_accuracy".into(), cm.accuracy),
                ("test_macro_f1".into(), cm.macro_f1),
            ])
        }
        Task::Detector => {
            let anomalous = ds.labels.iter().position(|l| l == "1");
            let truth: Vec<bool> = ds.y.iter().map(|&y| Some(y) == anomalous).collect();
            let scores: Vec<f32> = preds.iter().map(|p| p.score).collect();
            let threshold = m.anomaly_threshold.unwrap_or(f32::INFINITY);
            let dm = detector_metrics(&truth, &scores, threshold);
            // Baseline: window RMS, thresholded at the same quantile of the normal windows.
            let rms = rms_scores(ds);
            let normal_rms: Vec<f32> = rms
                .iter()
                .zip(&truth)
                .filter(|(_, t)| !**t)
                .map(|(s, _)| *s)
                .collect();
            let q = m
                .provenance
                .as_ref()
                .and_then(|p| p.settings.get("threshold_quantile"))
                .and_then(|q| q.parse().ok())
                .unwrap_or(0.99);
            let baseline = detector_metrics(&truth, &rms, quantile(&normal_rms, q));
            let flagged = scores.iter().filter(|s| **s > threshold).count();
            println!(
                "precision {:.4} recall {:.4} F1 {:.4} ROC-AUC {}  flagged {flagged}/{} (anomalous {})",
                dm.precision,
                dm.recall,
                dm.f1,
                dm.roc_auc
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "n/a".into()),
                dm.samples,
                dm.positives
            );
            println!("baseline (window RMS) F1 {:.4}", baseline.f1);
            if let Some(dir) = report {
                let path = write_report(
                    dir,
                    m,
                    &ds.name,
                    Findings::Detector {
                        model: &dm,
                        baseline: &baseline,
                    },
                    history,
                )?;
                println!("report {}", path.display());
            }
            Ok(vec![
                ("test_f1".into(), dm.f1),
                (
                    "test_flagged_fraction".into(),
                    flagged as f64 / scores.len().max(1) as f64,
                ),
            ])
        }
    }
}

fn write_predictions(model: &LoadedModel, ds: &Dataset, path: &Path) -> Result<(), CliError> {
    let labels = &model.manifest().labels;
    let mut out = String::new();
    for (i, p) in predict_dataset(model, ds)?.iter().enumerate() {
        let line = serde_json::json!({
            "sample": i,
            "truth": ds.labels[ds.y[i]],
            "class": p.class.and_then(|c| labels.get(c)),
            "score": p.score,
            "anomaly": p.anomaly,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Train {
            dataset,
            test,
            arch,
            out,
            name,
            model_version,
            epochs,
            filters,
            kernels,
            hidden,
            features,
            learning_rate,
            batch_size,
            patience,
            seed,
            normalization,
            threshold_quantile,
            created_at,
            csv,
        } => {
            let ds = load(&dataset, &csv)?;
            let arch = arch.unwrap_or(if is_csv(&dataset) {
                Arch::Autoencoder
            } else {
                Arch::Fcn
            });
            let mut base = TrainConfig {
                seed,
                normalization: match normalization {
                    Norm::PerChannel => NormalizationKind::PerChannel,
                    Norm::PerWindow => NormalizationKind::PerWindow,
                },
                ..TrainConfig::for_length(ds.length)
            };
            let detector = matches!(arch, Arch::Autoencoder);
            let mut det = DetectorConfig {
                threshold_quantile,
                ..DetectorConfig::default()
            };
            match arch {
                Arch::Fcn => {
                    if let Architecture::Fcn {
                        filters: f,
                        kernels: k,
                    } = &mut base.architecture
                    {
                        if let Some(v) = filters {
                            *f = v;
                        }
                        if let Some(v) = kernels {
                            *k = v;
                        }
                        if f.len() != k.len() {
                            return Err(CliError::Usage(format!(
                                "{} filters but {} kernels",
                                f.len(),
                                k.len()
                            )));
                        }
                    }
                }
                Arch::Mlp => {
                    base.architecture = Architecture::Mlp {
                        hidden: hidden.unwrap_or_else(|| vec![128, 64]),
                    };
                    base.features = features.unwrap_or_else(|| {
                        outpost_models::features::DEFAULT_FEATURES
                            .iter()
                            .map(|s| s.to_string())
                            .collect()
                    });
                }
                Arch::Autoencoder => {
                    det.base.seed = base.seed;
                    det.base.normalization = base.normalization;
                    base = det.base.clone();
                }
            }
            if let Some(e) = epochs {
                base.epochs = e;
            }
            if let Some(v) = learning_rate {
                base.learning_rate = v;
            }
            if let Some(v) = batch_size {
                base.batch_size = v;
            }
            if let Some(v) = patience {
                base.patience = v;
            }
            det.base = base.clone();
            let name = name.unwrap_or_else(|| {
                format!("{}-{}", ds.name.to_lowercase(), base.architecture.name())
            });
            eprintln!(
                "training {name} on {} ({} samples, {}×{}, {} labels)",
                dataset.display(),
                ds.len(),
                ds.channels,
                ds.length,
                ds.labels.len()
            );
            let pb = progress_bar(base.epochs);
            let on_epoch = |s: &EpochStats| {
                pb.set_position(s.epoch as u64);
                pb.set_message(epoch_message(s));
            };
            let trained: Trained = if detector {
                train_detector(&ds, &det, &name, &model_version, on_epoch)?
            } else {
                train_classifier(&ds, &base, &name, &model_version, on_epoch)?
            };
            pb.finish();
            let history = serde_json::to_vec_pretty(&trained.history)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let mut manifest = trained.manifest;
            manifest.created_at = created_at.unwrap_or_else(now_rfc3339);
            let extras: [(&str, &[u8]); 1] = [("training.json", &history)];
            save_artifact(&out, manifest.clone(), &trained.network, &extras)?;
            if let Some(test) = test.or_else(|| default_test(&dataset)) {
                let test_ds = load(&test, &csv)?;
                let model = LoadedModel::load_dir(&out, &burn::tensor::Device::flex())?;
                for (k, v) in evaluate(&model, &test_ds, None, None)? {
                    manifest.metrics.insert(k, v);
                }
                save_artifact(&out, manifest, &trained.network, &extras)?;
            }
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Import {
            manifest,
            safetensors,
            out,
        } => {
            let text = std::fs::read(&manifest)
                .map_err(|e| CliError::Usage(format!("{}: {e}", manifest.display())))?;
            let mut m: outpost_models::Manifest = serde_json::from_slice(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", manifest.display())))?;
            if m.created_at.is_empty() {
                m.created_at = now_rfc3339();
            }
            let saved = outpost_train::import::import_safetensors(m, &safetensors, &out)?;
            eprintln!("wrote {} ({})", out.display(), saved.id());
            Ok(())
        }
        Command::Eval {
            model,
            dataset,
            report,
            predictions,
            csv,
        } => {
            let loaded = LoadedModel::load_dir(&model, &burn::tensor::Device::flex())?;
            let ds = load(&dataset, &csv)?;
            if let Some(path) = predictions {
                write_predictions(&loaded, &ds, &path)?;
            }
            let history: Option<Vec<EpochStats>> = std::fs::read(model.join("training.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            evaluate(&loaded, &ds, report.as_deref(), history.as_deref())?;
            Ok(())
        }
        Command::Reference {
            model,
            dataset,
            csv,
        } => {
            let loaded = LoadedModel::load_dir(&model, &burn::tensor::Device::flex())?;
            let ds = load(&dataset, &csv)?;
            if let Some(p) = &loaded.manifest().provenance
                && p.data_fingerprint != ds.fingerprint()
            {
                eprintln!(
                    "note: {} is not the data {} was trained on (fingerprints differ)",
                    dataset.display(),
                    loaded.manifest().id()
                );
            }
            let reference = reference_for_dataset(&loaded, &ds)?;
            let bins: Vec<String> = reference
                .features
                .iter()
                .map(|f| format!("{} {}", f.name, f.histogram.bins()))
                .collect();
            println!(
                "reference over {} windows: bins per input value [{}], score {} bins",
                reference.samples,
                bins.join(", "),
                reference.score.bins()
            );
            store_reference(&model, reference)?;
            let manifest = model.join(outpost_models::artifact::MANIFEST_FILE);
            println!("rewrote {}", manifest.display());
            if model.join(SIGNATURE_FILE).exists() {
                println!(
                    "{} no longer matches the manifest: sign the artifact again",
                    model.join(SIGNATURE_FILE).display()
                );
            } else {
                println!("any signature of this artifact must be made again");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
