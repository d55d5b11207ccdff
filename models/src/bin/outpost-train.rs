//! `outpost-train`: train and evaluate Outpost models on the CPU.
//!
//! A separate binary so that the gateway's `outpost` carries no training code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outpost_models::artifact::save_artifact;
use outpost_models::dataset::{Dataset, DatasetError, load_ts};
use outpost_models::manifest::Architecture;
use outpost_models::train::{NormalizationKind, TrainConfig, accuracy, train_classifier};
use outpost_models::{LoadedModel, ModelError};

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
}

#[derive(Clone, Copy, ValueEnum)]
enum Norm {
    PerChannel,
    PerWindow,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a `.ts` dataset (the `_TRAIN` file) and write an artifact.
    Train {
        /// Training data: a UCR/UEA `.ts` file.
        #[arg(long)]
        dataset: PathBuf,
        /// Test data, evaluated into the manifest's metrics (default: the
        /// `_TEST` file beside a `_TRAIN` file, when it exists).
        #[arg(long)]
        test: Option<PathBuf>,
        /// Architecture.
        #[arg(long, value_enum, default_value = "fcn")]
        arch: Arch,
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
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Normalization.
        #[arg(long, value_enum, default_value = "per-channel")]
        normalization: Norm,
        /// Creation time to record (RFC 3339); default: now.
        #[arg(long)]
        created_at: Option<String>,
    },
    /// Evaluate an artifact on a `.ts` dataset.
    Eval {
        /// Artifact directory.
        #[arg(long)]
        model: PathBuf,
        /// Dataset.
        #[arg(long)]
        dataset: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn default_test(train: &Path) -> Option<PathBuf> {
    let name = train.file_name()?.to_str()?;
    let test = train.with_file_name(name.replace("_TRAIN", "_TEST"));
    (test != train && test.exists()).then_some(test)
}

fn now_rfc3339() -> String {
    // Seconds since the epoch rendered as a UTC timestamp without extra crates.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
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
            seed,
            normalization,
            created_at,
        } => {
            let ds = load_ts(&dataset)?;
            let mut cfg = TrainConfig {
                seed,
                normalization: match normalization {
                    Norm::PerChannel => NormalizationKind::PerChannel,
                    Norm::PerWindow => NormalizationKind::PerWindow,
                },
                ..TrainConfig::default()
            };
            if let Arch::Mlp = arch {
                cfg.architecture = Architecture::Mlp {
                    hidden: vec![128, 64],
                };
            }
            if let Some(e) = epochs {
                cfg.epochs = e;
            }
            let name = name.unwrap_or_else(|| {
                format!("{}-{}", ds.name.to_lowercase(), cfg.architecture.name())
            });
            eprintln!(
                "training {name} on {} ({} samples, {}×{}, {} classes)",
                dataset.display(),
                ds.len(),
                ds.channels,
                ds.length,
                ds.labels.len()
            );
            let trained = train_classifier(&ds, &cfg, &name, &model_version, |s| {
                eprintln!(
                    "epoch {:>4}  loss {:.4}  train acc {:.3}  val loss {:.4}  val acc {:.3}",
                    s.epoch,
                    s.train_loss,
                    s.train_accuracy,
                    s.validation_loss,
                    s.validation_accuracy
                );
            })?;
            let mut manifest = trained.manifest;
            manifest.created_at = created_at.unwrap_or_else(now_rfc3339);
            let saved = save_artifact(&out, manifest.clone(), &trained.network)?;
            if let Some(test) = test.or_else(|| default_test(&dataset)) {
                let test_ds = load_ts(&test)?;
                let model = LoadedModel::load_dir(&out, &burn::tensor::Device::flex())?;
                let (acc, _) = accuracy(&model, &test_ds)?;
                eprintln!("test accuracy {acc:.4} on {}", test.display());
                let mut manifest = saved;
                manifest.metrics.insert("test_accuracy".into(), acc);
                manifest.files.clear();
                save_artifact(&out, manifest, &trained.network)?;
            }
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Eval { model, dataset } => {
            let model = LoadedModel::load_dir(&model, &burn::tensor::Device::flex())?;
            let ds: Dataset = load_ts(&dataset)?;
            let (acc, _) = accuracy(&model, &ds)?;
            println!("accuracy {acc:.4} ({} samples)", ds.len());
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
