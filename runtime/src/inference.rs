//! Inference: a dedicated OS thread, never the async executor, with dynamic
//! batching: a batch runs when it holds `max_batch` windows or its first
//! window has waited `max_wait`, whichever comes first.
//!
//! Input: [`Window`] over a bounded channel (windowing waits when it is full).
//! Output: [`Inferred`], in input order, over a bounded channel (this thread
//! waits when aggregation is behind). When the input closes, the thread runs
//! what it holds, then closes its output: that is how shutdown drains.
//!
//! With `max_wait = None` (replay), batches fill to `max_batch` or the end of
//! input, independent of timing, so replay output is deterministic.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_models::{LoadedModel, ModelError};

use crate::aggregate::Inferred;
use crate::metrics::Metrics;
use crate::window::Window;

/// Errors of the inference stage.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The model could not be loaded.
    #[error("cannot load model {path}: {source}")]
    Load {
        /// Artifact path (or `<bundled>`).
        path: String,
        /// The cause.
        source: ModelError,
    },
    /// The thread could not be started.
    #[error("cannot start the inference thread: {0}")]
    Spawn(std::io::Error),
    /// A forward pass failed.
    #[error("inference failed: {0}")]
    Run(#[from] ModelError),
    /// The inference thread panicked.
    #[error("the inference thread panicked")]
    Panicked,
}

/// Which model to load.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// The model compiled into the binary.
    Bundled,
    /// An artifact directory.
    Dir(PathBuf),
}

/// Load the configured model on the CPU device.
pub fn load_model(source: &ModelSource) -> Result<LoadedModel, InferenceError> {
    let device = burn::tensor::Device::flex();
    match source {
        ModelSource::Bundled => LoadedModel::load_static(
            outpost_models::bundled::MANIFEST,
            outpost_models::bundled::WEIGHTS,
            &device,
        )
        .map_err(|source| InferenceError::Load {
            path: "<bundled>".into(),
            source,
        }),
        ModelSource::Dir(p) => {
            LoadedModel::load_dir(p, &device).map_err(|source| InferenceError::Load {
                path: p.display().to_string(),
                source,
            })
        }
    }
}

/// Batching policy.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait for a batch to fill; `None`: wait for a full batch or the end of input.
    pub max_wait: Option<Duration>,
}

/// Run the windows of `batch` that carry data through the model and pair
/// every window (tails too) with its prediction, in order.
pub fn infer_batch(
    model: &LoadedModel,
    batch: &[Window],
    scratch: &mut Vec<f32>,
) -> Result<Vec<Inferred>, ModelError> {
    scratch.clear();
    let mut n = 0;
    for w in batch {
        if let Some(d) = &w.data {
            scratch.extend_from_slice(d);
            n += 1;
        }
    }
    let mut preds = if n > 0 {
        // A panic inside the backend must not take the readings of this batch with it.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.predict(scratch, n)))
            .map_err(|_| ModelError::Backend("the backend panicked".into()))??
            .into_iter()
    } else {
        Vec::new().into_iter()
    };
    Ok(batch
        .iter()
        .map(|w| {
            let prediction = if w.data.is_some() { preds.next() } else { None };
            Inferred {
                sensor: w.sensor.clone(),
                group: w.group.clone(),
                ts_ms: w.end_ms,
                readings: w.readings.clone(),
                prediction,
            }
        })
        .collect())
}

/// The batch's windows as results without predictions (after a failed pass).
fn without_predictions(batch: Vec<Window>) -> Vec<Inferred> {
    batch
        .into_iter()
        .map(|w| Inferred {
            sensor: w.sensor,
            group: w.group,
            ts_ms: w.end_ms,
            readings: w.readings,
            prediction: None,
        })
        .collect()
}

/// Start the inference thread.
pub fn spawn(
    model: Arc<LoadedModel>,
    input: flume::Receiver<Window>,
    output: flume::Sender<Inferred>,
    batching: Batching,
    metrics: Arc<Metrics>,
) -> Result<JoinHandle<Result<(), InferenceError>>, InferenceError> {
    std::thread::Builder::new()
        .name("outpost-inference".into())
        .spawn(move || run(&model, &input, &output, batching, &metrics))
        .map_err(InferenceError::Spawn)
}

fn run(
    model: &LoadedModel,
    input: &flume::Receiver<Window>,
    output: &flume::Sender<Inferred>,
    batching: Batching,
    metrics: &Metrics,
) -> Result<(), InferenceError> {
    let max_batch = batching.max_batch.max(1);
    let mut scratch = Vec::new();
    let mut closed = false;
    while !closed {
        let Ok(first) = input.recv() else { break };
        let deadline = batching.max_wait.map(|w| Instant::now() + w);
        let mut with_data = usize::from(first.data.is_some());
        let mut batch = vec![first];
        while with_data < max_batch {
            let next = match deadline {
                Some(d) => input
                    .recv_deadline(d)
                    .map_err(|e| matches!(e, flume::RecvTimeoutError::Disconnected)),
                None => input.recv().map_err(|_| true),
            };
            match next {
                Ok(w) => {
                    with_data += usize::from(w.data.is_some());
                    batch.push(w);
                }
                Err(disconnected) => {
                    closed = disconnected;
                    break;
                }
            }
        }
        let started = Instant::now();
        let cpu_before = crate::metrics::thread_cpu_time();
        let results = match infer_batch(model, &batch, &mut scratch) {
            Ok(r) => r,
            Err(e) => {
                // Keep the readings counted; the windows go without a prediction.
                tracing::error!(error = %e, windows = with_data, "inference failed for a batch");
                metrics.inference_errors.inc();
                without_predictions(batch)
            }
        };
        if with_data > 0 {
            let cpu = crate::metrics::thread_cpu_time().saturating_sub(cpu_before);
            metrics.observe_batch(with_data, started.elapsed(), cpu);
        }
        for r in results {
            if output.send(r).is_err() {
                // Aggregation is gone: nothing downstream can take results.
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(i: usize, data: bool) -> Window {
        Window {
            sensor: Arc::from(format!("s{}", i % 3)),
            group: Arc::from("g"),
            start_ms: i as i64,
            end_ms: i as i64 * 10,
            readings: vec![i as i64],
            data: data.then(|| {
                (0..600)
                    .map(|k| ((k * (i + 1)) % 17) as f32 / 17.0)
                    .collect()
            }),
        }
    }

    #[test]
    fn batches_by_count_keep_order_and_pass_tails_through() {
        let model = Arc::new(load_model(&ModelSource::Bundled).expect("bundled model loads"));
        let metrics = Arc::new(Metrics::new());
        let (win_tx, win_rx) = flume::bounded(64);
        let (inf_tx, inf_rx) = flume::bounded(64);
        let handle = spawn(
            model.clone(),
            win_rx,
            inf_tx,
            Batching {
                max_batch: 4,
                max_wait: None,
            },
            metrics.clone(),
        )
        .unwrap();
        let inputs: Vec<Window> = (0..12).map(|i| window(i, i % 5 != 4)).collect();
        for w in inputs.clone() {
            win_tx.send(w).unwrap();
        }
        drop(win_tx);
        let out: Vec<Inferred> = inf_rx.iter().collect();
        handle.join().unwrap().unwrap();
        assert_eq!(out.len(), 12);
        for (w, r) in inputs.iter().zip(&out) {
            assert_eq!(w.end_ms, r.ts_ms, "results come out in input order");
            assert_eq!(w.data.is_some(), r.prediction.is_some());
        }
        // 10 windows with data in batches of 4, 4, 2.
        assert_eq!(metrics.inferences.get(), 10);
        // Batching does not change a window's prediction.
        let mut scratch = Vec::new();
        let alone = infer_batch(&model, &inputs[0..1], &mut scratch).unwrap();
        let p1 = alone[0].prediction.as_ref().unwrap();
        let p2 = out[0].prediction.as_ref().unwrap();
        assert_eq!(p1.class, p2.class);
        assert!((p1.score - p2.score).abs() < 1e-5);
    }
}
