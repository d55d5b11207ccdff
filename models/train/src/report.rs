//! Evaluation reports: Markdown with the metrics, and SVG plots of the
//! training curve and the confusion matrix (plotters, SVG backend only).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use outpost_models::Manifest;

use crate::eval::{ClassifierMetrics, DetectorMetrics};
use crate::train::EpochStats;

/// Errors of writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file or directory could not be written.
    #[error("{path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A plot could not be drawn into its SVG file.
    #[error("{path}: {source}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The cause.
        source: DrawingAreaErrorKind<std::io::Error>,
    },
}

fn write_err(path: &Path, source: std::io::Error) -> ReportError {
    ReportError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn plot_err(path: &Path, source: DrawingAreaErrorKind<std::io::Error>) -> ReportError {
    ReportError::Plot {
        path: path.to_path_buf(),
        source,
    }
}

/// Plot training and validation loss per epoch.
pub fn training_curve_svg(history: &[EpochStats], path: &Path) -> Result<(), ReportError> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let finite = |v: f64| if v.is_finite() { Some(v) } else { None };
    let max_loss = history
        .iter()
        .flat_map(|h| [finite(h.train_loss), finite(h.validation_loss)])
        .flatten()
        .fold(0f64, f64::max)
        .max(1e-6);
    let epochs = history.len().max(2) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Training curve", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..epochs, 0f64..max_loss * 1.05)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let series = |f: fn(&EpochStats) -> f64| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|h| finite(f(h)).map(|v| (h.epoch as f64, v)))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(series(|h| h.train_loss), &BLUE))
        .map_err(|e| plot_err(path, e))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(series(|h| h.validation_loss), &RED))
        .map_err(|e| plot_err(path, e))?
        .label("validation loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

/// Plot a confusion matrix as a heat map with counts.
pub fn confusion_svg(
    confusion: &[Vec<u64>],
    labels: &[String],
    path: &Path,
) -> Result<(), ReportError> {
    let n = confusion.len().max(1);
    let cell = 64i32;
    let left = 130i32;
    let top = 60i32;
    let size = (
        left as u32 + (n as u32) * cell as u32 + 20,
        top as u32 + (n as u32) * cell as u32 + 40,
    );
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let max = confusion
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    root.draw(&Text::new(
        "Confusion matrix (rows: truth, columns: predicted)",
        (10, 10),
        ("sans-serif", 16),
    ))
    .map_err(|e| plot_err(path, e))?;
    for (t, row) in confusion.iter().enumerate() {
        let y = top + t as i32 * cell;
        let name = labels.get(t).map(String::as_str).unwrap_or("?");
        root.draw(&Text::new(
            name.to_string(),
            (8, y + cell / 2 - 6),
            ("sans-serif", 13),
        ))
        .map_err(|e| plot_err(path, e))?;
        for (p, &v) in row.iter().enumerate() {
            let x = left + p as i32 * cell;
            let shade = 255 - (200.0 * v as f64 / max) as u8;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell - 2, y + cell - 2)],
                RGBColor(shade, shade, 255).filled(),
            ))
            .map_err(|e| plot_err(path, e))?;
            root.draw(&Text::new(
                v.to_string(),
                (x + cell / 2 - 8, y + cell / 2 - 6),
                ("sans-serif", 14),
            ))
            .map_err(|e| plot_err(path, e))?;
        }
    }
    for (p, name) in labels.iter().enumerate().take(n) {
        let x = left + p as i32 * cell;
        root.draw(&Text::new(
            name.clone(),
            (x + 2, top - 18),
            ("sans-serif", 12),
        ))
        .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))
}

/// What an evaluation found.
pub enum Findings<'a> {
    /// A classifier's metrics.
    Classifier(&'a ClassifierMetrics),
    /// A detector's metrics and the trivial baseline's.
    Detector {
        /// The model.
        model: &'a DetectorMetrics,
        /// Threshold on window RMS.
        baseline: &'a DetectorMetrics,
    },
}

/// Write `report.md` (and plots) into `dir`; returns the report's path.
pub fn write_report(
    dir: &Path,
    manifest: &Manifest,
    dataset: &str,
    findings: Findings<'_>,
    history: Option<&[EpochStats]>,
) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Evaluation of {} on {dataset}\n", manifest.id());
    let _ = writeln!(
        md,
        "Architecture `{}`, input {}×{}, task {:?}.\n",
        manifest.architecture.name(),
        manifest.input.channels,
        manifest.input.length,
        manifest.task
    );
    match findings {
        Findings::Classifier(m) => {
            let _ = writeln!(md, "| metric | value |\n|---|---|");
            let _ = writeln!(md, "| samples | {} |", m.samples);
            let _ = writeln!(md, "| accuracy | {:.4} |", m.accuracy);
            let _ = writeln!(md, "| macro-F1 | {:.4} |\n", m.macro_f1);
            let _ = writeln!(
                md,
                "## Confusion matrix (rows: truth, columns: predicted)\n"
            );
            let _ = writeln!(md, "| | {} |", manifest.labels.join(" | "));
            let _ = writeln!(md, "|---|{}", "---|".repeat(manifest.labels.len()));
            for (t, row) in m.confusion.iter().enumerate() {
                let cells: Vec<String> = row.iter().map(u64::to_string).collect();
                let _ = writeln!(
                    md,
                    "| **{}** | {} |",
                    manifest.labels.get(t).map(String::as_str).unwrap_or("?"),
                    cells.join(" | ")
                );
            }
            confusion_svg(&m.confusion, &manifest.labels, &dir.join("confusion.svg"))?;
            let _ = writeln!(md, "\n![confusion matrix](confusion.svg)\n");
        }
        Findings::Detector { model, baseline } => {
            let auc = |a: Option<f64>| {
                a.map(|v| format!("{v:.4}"))
                    .unwrap_or_else(|| "n/a (one class only)".into())
            };
            let _ = writeln!(
                md,
                "Samples {}, anomalous windows {}.\n",
                model.samples, model.positives
            );
            let _ = writeln!(
                md,
                "| | precision | recall | F1 | ROC-AUC |\n|---|---|---|---|---|"
            );
            let _ = writeln!(
                md,
                "| {} | {:.4} | {:.4} | {:.4} | {} |",
                manifest.architecture.name(),
                model.precision,
                model.recall,
                model.f1,
                auc(model.roc_auc)
            );
            let _ = writeln!(
                md,
                "| baseline: threshold on window RMS | {:.4} | {:.4} | {:.4} | {} |",
                baseline.precision,
                baseline.recall,
                baseline.f1,
                auc(baseline.roc_auc)
            );
            if model.positives == 0 {
                let _ = writeln!(
                    md,
                    "\nThe data has no anomalous window: precision, recall and F1 are 0 by definition and ROC-AUC is undefined; what remains informative is how few windows each method flags."
                );
            }
        }
    }
    if let Some(h) = history.filter(|h| !h.is_empty()) {
        training_curve_svg(h, &dir.join("training_curve.svg"))?;
        let _ = writeln!(
            md,
            "## Training\n\n{} epochs.\n\n![training curve](training_curve.svg)",
            h.len()
        );
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| write_err(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        let h: Vec<EpochStats> = (1..=5)
            .map(|e| EpochStats {
                epoch: e,
                train_loss: 1.0 / e as f64,
                train_accuracy: 0.5,
                validation_accuracy: 0.5,
                validation_loss: 1.2 / e as f64,
            })
            .collect();
        training_curve_svg(&h, &dir.path().join("c.svg")).unwrap();
        let labels = vec!["walk".to_string(), "run".to_string()];
        confusion_svg(
            &[vec![3, 1], vec![0, 4]],
            &labels,
            &dir.path().join("m.svg"),
        )
        .unwrap();
        let c = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
        let m = std::fs::read_to_string(dir.path().join("m.svg")).unwrap();
        assert!(c.starts_with("<svg") && c.contains("Training curve"));
        assert!(m.contains("\nwalk\n") && m.contains("\n4\n"), "{m}");
    }
}
