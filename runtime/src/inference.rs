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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_models::manifest::{InputKind, Manifest};
use outpost_models::{LoadedModel, ModelError, Prediction};

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

/// A loaded model with the identity the pipeline carries with its results.
#[derive(Debug)]
pub struct Runner {
    /// The model.
    pub model: Arc<LoadedModel>,
    /// `name@version`.
    pub id: Arc<str>,
}

impl Runner {
    /// Wrap a loaded model.
    pub fn new(model: Arc<LoadedModel>) -> Arc<Self> {
        let id = Arc::from(model.manifest().id());
        Arc::new(Self { model, id })
    }

    /// The model's manifest.
    pub fn manifest(&self) -> &Manifest {
        self.model.manifest()
    }
}

/// The models the inference thread runs: the active one, whose predictions
/// are aggregated, and optionally a shadow (a candidate, or the previous
/// model during a probation) run on the same windows for comparison only.
#[derive(Debug, Clone)]
pub struct ModelSet {
    /// The active model.
    pub active: Arc<Runner>,
    /// The shadow model.
    pub shadow: Option<Arc<Runner>>,
}

/// Hands a new [`ModelSet`] to the inference thread. The thread takes it
/// between two batches, so every window is run by exactly one active model:
/// a swap neither drops nor double-counts a reading.
#[derive(Debug)]
pub struct ModelSlot {
    generation: AtomicU64,
    set: Mutex<ModelSet>,
}

impl ModelSlot {
    /// A slot holding `set`.
    pub fn new(set: ModelSet) -> Arc<Self> {
        Arc::new(Self {
            generation: AtomicU64::new(0),
            set: Mutex::new(set),
        })
    }

    /// The set now in the slot.
    pub fn current(&self) -> ModelSet {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the set; the inference thread takes it before its next batch.
    pub fn replace(&self, set: ModelSet) {
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = set;
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Why `candidate` cannot replace `running` without restarting: windows are
/// cut for the running model's input, so the input must be the same. The
/// normalization may differ (each model normalizes its own windows).
pub fn swap_problems(running: &Manifest, candidate: &Manifest) -> Vec<String> {
    let mut p = Vec::new();
    let (a, b) = (&running.input, &candidate.input);
    if a.kind != b.kind || a.channels != b.channels || a.features != b.features {
        p.push(format!(
            "input differs: {:?} {} channels {:?} vs {:?} {} channels {:?}",
            a.kind, a.channels, a.features, b.kind, b.channels, b.features
        ));
    }
    if a.length != b.length || a.window != b.window {
        p.push(format!(
            "window length differs: {}/{:?} vs {}/{:?}",
            a.length, a.window, b.length, b.window
        ));
    }
    if running.task != candidate.task {
        p.push(format!(
            "task differs: {:?} vs {:?}",
            running.task, candidate.task
        ));
    }
    if running.labels != candidate.labels {
        p.push(format!(
            "labels differ: {:?} vs {:?}",
            running.labels, candidate.labels
        ));
    }
    p
}

/// Normalize `n` windows of the model's input in place, as at training time
/// (the windower leaves windows raw).
pub fn normalize_for(m: &Manifest, windows: &mut [f32]) {
    let length = match m.input.kind {
        InputKind::Raw => m.input.length,
        // A feature window is one vector of `channels` values.
        InputKind::Features => 1,
    };
    outpost_models::artifact::normalize(&m.normalization, m.input.channels, length, windows);
}

/// Run one model over `n` raw windows in `raw`: normalize a copy, predict.
fn run_model(
    runner: &Runner,
    raw: &[f32],
    n: usize,
    buf: &mut Vec<f32>,
) -> Result<Vec<Prediction>, ModelError> {
    buf.clear();
    buf.extend_from_slice(raw);
    normalize_for(runner.manifest(), buf);
    // A panic inside the backend must not take the readings of this batch with it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runner.model.predict(buf, n)
    }))
    .map_err(|_| ModelError::Backend("the backend panicked".into()))?
}

/// Scratch buffers of [`infer_batch`].
#[derive(Debug, Default)]
pub struct Scratch {
    raw: Vec<f32>,
    normalized: Vec<f32>,
}

/// Run the windows of `batch` that carry data through the active model (and
/// the shadow, if any) and pair every window (tails too) with its
/// prediction, in order. A failing shadow never costs the active results:
/// its predictions are left out and the error is returned beside them.
pub fn infer_batch(
    set: &ModelSet,
    batch: &[Window],
    scratch: &mut Scratch,
) -> Result<(Vec<Inferred>, Option<ModelError>), ModelError> {
    scratch.raw.clear();
    let mut n = 0;
    for w in batch {
        if let Some(d) = &w.data {
            scratch.raw.extend_from_slice(d);
            n += 1;
        }
    }
    let (preds, shadow, summaries, shadow_error) = if n > 0 {
        let active = run_model(&set.active, &scratch.raw, n, &mut scratch.normalized)?;
        // Drift summaries of the active model's normalized input.
        let per = scratch.normalized.len() / n;
        let summaries: Vec<Vec<f32>> = scratch
            .normalized
            .chunks_exact(per.max(1))
            .map(|w| outpost_models::drift::input_summary(set.active.manifest(), w))
            .collect();
        let (shadow, err) = match &set.shadow {
            Some(s) => match run_model(s, &scratch.raw, n, &mut scratch.normalized) {
                Ok(p) => (Some((s.id.clone(), p)), None),
                Err(e) => (None, Some(e)),
            },
            None => (None, None),
        };
        (active, shadow, summaries, err)
    } else {
        (Vec::new(), None, Vec::new(), None)
    };
    let mut preds = preds.into_iter();
    let mut summaries = summaries.into_iter();
    let (shadow_id, mut shadow_preds) = match shadow {
        Some((id, p)) => (Some(id), p.into_iter()),
        None => (None, Vec::new().into_iter()),
    };
    let out = batch
        .iter()
        .map(|w| {
            let data = w.data.is_some();
            Inferred {
                sensor: w.sensor.clone(),
                group: w.group.clone(),
                ts_ms: w.end_ms,
                readings: w.readings.clone(),
                prediction: if data { preds.next() } else { None },
                model: data.then(|| set.active.clone()),
                summary: if data { summaries.next() } else { None },
                shadow: match (&shadow_id, data) {
                    (Some(_), true) => shadow_preds
                        .next()
                        .and_then(|p| set.shadow.clone().map(|r| (r, p))),
                    _ => None,
                },
            }
        })
        .collect();
    Ok((out, shadow_error))
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
            model: None,
            summary: None,
            shadow: None,
        })
        .collect()
}

/// Start the inference thread. It takes a new model set from `slot`
/// between batches.
pub fn spawn(
    slot: Arc<ModelSlot>,
    input: flume::Receiver<Window>,
    output: flume::Sender<Inferred>,
    batching: Batching,
    metrics: Arc<Metrics>,
) -> Result<JoinHandle<Result<(), InferenceError>>, InferenceError> {
    std::thread::Builder::new()
        .name("outpost-inference".into())
        .spawn(move || run(&slot, &input, &output, batching, &metrics))
        .map_err(InferenceError::Spawn)
}

fn run(
    slot: &ModelSlot,
    input: &flume::Receiver<Window>,
    output: &flume::Sender<Inferred>,
    batching: Batching,
    metrics: &Metrics,
) -> Result<(), InferenceError> {
    let max_batch = batching.max_batch.max(1);
    let mut scratch = Scratch::default();
    let mut generation = slot.generation();
    let mut set = slot.current();
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
        // A new model set applies from a batch boundary on.
        let g = slot.generation();
        if g != generation {
            generation = g;
            set = slot.current();
            tracing::info!(model = %set.active.id, shadow = ?set.shadow.as_ref().map(|s| &s.id), "inference switched models");
        }
        let started = Instant::now();
        let cpu_before = crate::metrics::thread_cpu_time();
        let results = match infer_batch(&set, &batch, &mut scratch) {
            Ok((r, shadow_error)) => {
                if let Some(e) = shadow_error {
                    tracing::warn!(error = %e, "the shadow model failed for a batch");
                    metrics.inference_errors.inc();
                }
                r
            }
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

    fn bundled() -> Arc<Runner> {
        Runner::new(Arc::new(
            load_model(&ModelSource::Bundled).expect("bundled model loads"),
        ))
    }

    /// The bundled model under another version, with other statistics.
    fn variant(version: &str, std_scale: f32) -> Arc<Runner> {
        let base = load_model(&ModelSource::Bundled).expect("bundled model loads");
        let mut m = base.manifest().clone();
        m.version = version.into();
        if let outpost_models::manifest::Normalization::PerChannel { std, .. } =
            &mut m.normalization
        {
            std.iter_mut().for_each(|s| *s *= std_scale);
        }
        let net = base.network().clone();
        Runner::new(Arc::new(LoadedModel::from_network(m, net, base.device())))
    }

    #[test]
    fn batches_by_count_keep_order_and_pass_tails_through() {
        let runner = bundled();
        let slot = ModelSlot::new(ModelSet {
            active: runner.clone(),
            shadow: None,
        });
        let metrics = Arc::new(Metrics::new());
        let (win_tx, win_rx) = flume::bounded(64);
        let (inf_tx, inf_rx) = flume::bounded(64);
        let handle = spawn(
            slot.clone(),
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
            assert_eq!(w.data.is_some(), r.summary.is_some());
        }
        // 10 windows with data in batches of 4, 4, 2.
        assert_eq!(metrics.inferences.get(), 10);
        // Batching does not change a window's prediction.
        let mut scratch = Scratch::default();
        let set = slot.current();
        let (alone, _) = infer_batch(&set, &inputs[0..1], &mut scratch).unwrap();
        let p1 = alone[0].prediction.as_ref().unwrap();
        let p2 = out[0].prediction.as_ref().unwrap();
        assert_eq!(p1.class, p2.class);
        assert!((p1.score - p2.score).abs() < 1e-5);
    }

    #[test]
    fn a_swap_mid_stream_neither_drops_nor_repeats_a_window() {
        let a = bundled();
        let b = variant("9.9.9", 1.0);
        let slot = ModelSlot::new(ModelSet {
            active: a.clone(),
            shadow: None,
        });
        let metrics = Arc::new(Metrics::new());
        // Small channels: inference can be at most a few windows ahead of
        // this test when it swaps, so the swap lands mid-stream.
        let (win_tx, win_rx) = flume::bounded(4);
        let (inf_tx, inf_rx) = flume::bounded(4);
        let handle = spawn(
            slot.clone(),
            win_rx,
            inf_tx,
            Batching {
                max_batch: 3,
                max_wait: Some(Duration::from_millis(1)),
            },
            metrics,
        )
        .unwrap();
        let n = 200;
        let sender = std::thread::spawn(move || {
            for i in 0..n {
                win_tx.send(window(i, true)).unwrap();
            }
        });
        // Swap once results are flowing, while windows are still queued.
        let mut out: Vec<Inferred> = Vec::new();
        while out.len() < 20 {
            out.push(inf_rx.recv().unwrap());
        }
        slot.replace(ModelSet {
            active: b.clone(),
            shadow: Some(a.clone()),
        });
        // Drain before joining the sender: with small channels, it waits on us.
        out.extend(inf_rx.iter());
        sender.join().unwrap();
        handle.join().unwrap().unwrap();
        assert_eq!(out.len(), n, "every window once");
        let ends: Vec<i64> = out.iter().map(|r| r.ts_ms).collect();
        let expected: Vec<i64> = (0..n).map(|i| i as i64 * 10).collect();
        assert_eq!(ends, expected, "in order, none repeated");
        let ids: Vec<&str> = out
            .iter()
            .map(|r| &*r.model.as_ref().expect("every window has a model").id)
            .collect();
        let first_b = ids
            .iter()
            .position(|id| *id == &*b.id)
            .expect("the swap took effect");
        assert!(first_b >= 20, "results before the swap are the old model's");
        assert!(ids[..first_b].iter().all(|id| *id == &*a.id));
        assert!(ids[first_b..].iter().all(|id| *id == &*b.id), "no way back");
        // After the swap, the old model runs in shadow on the same windows and,
        // with the same weights and statistics, agrees everywhere.
        for r in &out[first_b..] {
            let (shadow, sp) = r.shadow.as_ref().expect("shadow prediction");
            assert_eq!(shadow.id, a.id);
            assert_eq!(sp.class, r.prediction.as_ref().unwrap().class);
        }
    }

    #[test]
    fn each_model_normalizes_with_its_own_statistics() {
        let a = bundled();
        let flat = variant("2.0.0", 1000.0);
        let set = ModelSet {
            active: a.clone(),
            shadow: Some(flat.clone()),
        };
        let windows: Vec<Window> = (0..8).map(|i| window(i, true)).collect();
        let (out, err) = infer_batch(&set, &windows, &mut Scratch::default()).unwrap();
        assert!(err.is_none());
        let differs = out.iter().any(|r| {
            let (_, sp) = r.shadow.as_ref().unwrap();
            (sp.score - r.prediction.as_ref().unwrap().score).abs() > 1e-4
        });
        assert!(differs, "the shadow used its own normalization");
        assert!(
            swap_problems(a.manifest(), flat.manifest()).is_empty(),
            "statistics may differ"
        );
        let mut other = a.manifest().clone();
        other.input.channels = 3;
        assert_eq!(swap_problems(a.manifest(), &other).len(), 1);
    }
}
