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

mod config;
pub use config::{DeviceChoice, InferenceConfig};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_models::device::Preference;
use outpost_models::manifest::{InputKind, Manifest};
use outpost_models::{LoadedModel, ModelError, Prediction};

use crate::metrics::Metrics;
use crate::window::Window;

/// A window's result on its way to aggregation.
#[derive(Debug, Clone, Default)]
pub struct Inferred {
    /// Sensor.
    pub sensor: Arc<str>,
    /// Group.
    pub group: Arc<str>,
    /// Event time of the window's last sample.
    pub ts_ms: i64,
    /// Timestamps of the readings counted with this window.
    pub readings: Vec<i64>,
    /// Their ingest journal sequence numbers, in the same order (0: not journaled).
    pub seqs: Vec<u64>,
    /// The prediction (`None` for a tail without inference).
    pub prediction: Option<Prediction>,
    /// The model that made the prediction.
    pub model: Option<Arc<Runner>>,
    /// Input summary of the window for drift ([`outpost_models::drift::input_summary`]).
    pub summary: Option<Vec<f32>>,
    /// The shadow model and its prediction on the same window.
    pub shadow: Option<(Arc<Runner>, Prediction)>,
}

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

/// Batching policy and device.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Largest batch on the CPU.
    pub max_batch: usize,
    /// Largest batch on a GPU.
    pub gpu_max_batch: usize,
    /// Longest wait for a batch to fill; `None`: wait for a full batch or the end of input.
    pub max_wait: Option<Duration>,
    /// Where to run.
    pub device: Preference,
}

impl Batching {
    /// CPU batching: batches of up to `max_batch`, waiting at most `max_wait`.
    pub fn cpu(max_batch: usize, max_wait: Option<Duration>) -> Self {
        Self {
            max_batch,
            gpu_max_batch: max_batch,
            max_wait,
            device: Preference::Cpu,
        }
    }
}

/// The batch sizes a GPU runs: powers of two up to `max`, and `max`. A
/// batch is padded to the next of these, so the device meets only shapes
/// it compiled its kernels for at start-up ([`Placement::start`]).
pub fn gpu_batch_sizes(max: usize) -> Vec<usize> {
    let max = max.max(1);
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < max)
        .collect();
    sizes.push(max);
    sizes
}

/// Where the inference thread runs its models.
enum Placement {
    /// burn's flex backend.
    Cpu,
    /// A GPU, with the models of the current set copied there.
    Gpu(Box<OnGpu>),
}

/// Models on a GPU. The CPU models they were copied from stay in the
/// [`ModelSet`]: they are what a failing GPU falls back to.
struct OnGpu {
    gpu: outpost_models::device::Gpu,
    /// Batch sizes run (padded to), ascending.
    sizes: Vec<usize>,
    /// (CPU model, its runner on the GPU), for the models of the current set.
    placed: Vec<(Arc<LoadedModel>, Arc<Runner>)>,
    /// The current set, on the GPU.
    set: ModelSet,
}

/// Run `f`, turning a panic of the backend into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| ModelError::Backend("the backend panicked".into()))?
}

impl OnGpu {
    /// `r` on the GPU: copied and warmed up at every batch size the first
    /// time, reused after.
    fn runner(&mut self, r: &Arc<Runner>) -> Result<Arc<Runner>, ModelError> {
        if let Some((_, g)) = self.placed.iter().find(|(c, _)| Arc::ptr_eq(c, &r.model)) {
            return Ok(g.clone());
        }
        let model = guarded(|| {
            let m = r.model.to_device(&self.gpu.device);
            m.warm_up(&self.sizes)?;
            Ok(m)
        })?;
        let g = Arc::new(Runner {
            model: Arc::new(model),
            id: r.id.clone(),
        });
        self.placed.push((r.model.clone(), g.clone()));
        Ok(g)
    }

    /// Place `set` on the GPU; models no longer in it are let go.
    fn update(&mut self, set: &ModelSet) -> Result<(), ModelError> {
        let active = self.runner(&set.active)?;
        let shadow = set.shadow.as_ref().map(|s| self.runner(s)).transpose()?;
        self.placed.retain(|(c, _)| {
            Arc::ptr_eq(c, &set.active.model)
                || set
                    .shadow
                    .as_ref()
                    .is_some_and(|s| Arc::ptr_eq(c, &s.model))
        });
        self.set = ModelSet { active, shadow };
        Ok(())
    }

    /// The batch size `n` windows are padded to.
    fn padded(&self, n: usize) -> usize {
        self.sizes.iter().copied().find(|&s| s >= n).unwrap_or(n)
    }
}

impl Placement {
    /// Open the device `batching` asks for and place `set` there (weights
    /// uploaded, kernels compiled for every batch size). Whatever fails
    /// leaves the CPU, with a log line and `outpost_inference_device_fallbacks_total`.
    fn start(batching: &Batching, set: &ModelSet, metrics: &Metrics) -> Self {
        let started = Instant::now();
        let placement = match outpost_models::device::gpu(batching.device) {
            Ok(None) => {
                if batching.device == Preference::Auto && !outpost_models::device::GPU_BUILT {
                    tracing::info!("this build has no GPU backend: inference runs on the CPU");
                } else if batching.device == Preference::Auto {
                    tracing::info!(
                        adapters = ?outpost_models::device::adapters().iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "no hardware GPU: inference runs on the CPU"
                    );
                }
                Self::Cpu
            }
            Ok(Some(gpu)) => {
                let adapter = gpu.adapter.to_string();
                let mut on = OnGpu {
                    sizes: gpu_batch_sizes(batching.gpu_max_batch),
                    gpu,
                    placed: Vec::new(),
                    set: set.clone(),
                };
                match on.update(set) {
                    Ok(()) => {
                        tracing::info!(%adapter, batch_sizes = ?on.sizes, "models uploaded to the GPU and its kernels compiled");
                        Self::Gpu(Box::new(on))
                    }
                    Err(e) => Self::fell_back(&format!("{adapter}: {e}"), metrics),
                }
            }
            Err(e) => Self::fell_back(&e.to_string(), metrics),
        };
        if let Err(e) = guarded(|| set.active.model.warm_up(&[1])) {
            tracing::warn!(error = %e, "the model failed its warm-up run on the CPU");
        }
        let ready = started.elapsed();
        metrics.inference_ready_seconds.set(ready.as_secs_f64());
        metrics.set_model_device(placement.name());
        tracing::info!(
            device = placement.name(),
            ready_ms = ready.as_millis() as u64,
            max_batch = placement.max_batch(batching),
            "inference ready"
        );
        placement
    }

    fn fell_back(why: &str, metrics: &Metrics) -> Self {
        tracing::error!(
            error = why,
            "the GPU is unusable: inference runs on the CPU"
        );
        metrics.device_fallbacks.inc();
        metrics.set_model_device("cpu");
        Self::Cpu
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu(_) => "gpu",
        }
    }

    fn max_batch(&self, batching: &Batching) -> usize {
        match self {
            Self::Cpu => batching.max_batch.max(1),
            Self::Gpu(_) => batching.gpu_max_batch.max(1),
        }
    }

    /// A new model set from the slot.
    fn update(&mut self, set: &ModelSet, metrics: &Metrics) {
        if let Self::Gpu(on) = self
            && let Err(e) = on.update(set)
        {
            *self = Self::fell_back(&e.to_string(), metrics);
        }
    }

    /// Run `batch` on the device; a GPU failure moves this placement to the
    /// CPU and runs the batch there, so no window is lost.
    fn infer(
        &mut self,
        set: &ModelSet,
        batch: &[Window],
        scratch: &mut Scratch,
        metrics: &Metrics,
    ) -> Result<(Vec<Inferred>, Option<ModelError>), ModelError> {
        if let Self::Gpu(on) = self {
            let pad = |n: usize| on.padded(n);
            match infer_batch_padded(&on.set, batch, scratch, &pad) {
                Ok(r) => return Ok(r),
                Err(e) => *self = Self::fell_back(&e.to_string(), metrics),
            }
        }
        infer_batch(set, batch, scratch)
    }
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

/// Run one model over `n` raw windows in `raw`: normalize a copy, pad it
/// with zero windows to `pad(n)`, predict; `buf` holds the `n` normalized
/// windows after.
fn run_model(
    runner: &Runner,
    raw: &[f32],
    n: usize,
    buf: &mut Vec<f32>,
    pad: &dyn Fn(usize) -> usize,
) -> Result<Vec<Prediction>, ModelError> {
    buf.clear();
    buf.extend_from_slice(raw);
    normalize_for(runner.manifest(), buf);
    let padded = pad(n).max(n);
    buf.resize(raw.len() / n * padded, 0.0);
    // A panic inside the backend must not take the readings of this batch with it.
    let mut preds = guarded(|| runner.model.predict(buf, padded))?;
    preds.truncate(n);
    buf.truncate(raw.len());
    Ok(preds)
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
    infer_batch_padded(set, batch, scratch, &|n| n)
}

/// [`infer_batch`], the forward passes padded to `pad(n)` windows.
fn infer_batch_padded(
    set: &ModelSet,
    batch: &[Window],
    scratch: &mut Scratch,
    pad: &dyn Fn(usize) -> usize,
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
        let active = run_model(&set.active, &scratch.raw, n, &mut scratch.normalized, pad)?;
        // Drift summaries of the active model's normalized input.
        let per = scratch.normalized.len() / n;
        let summaries: Vec<Vec<f32>> = scratch
            .normalized
            .chunks_exact(per.max(1))
            .map(|w| outpost_models::drift::input_summary(set.active.manifest(), w))
            .collect();
        let (shadow, err) = match &set.shadow {
            Some(s) => match run_model(s, &scratch.raw, n, &mut scratch.normalized, pad) {
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
                seqs: w.seqs.clone(),
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
            seqs: w.seqs,
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
    spawn_with_ready(slot, input, output, batching, metrics).map(|(handle, _)| handle)
}

/// [`spawn`], and a receiver that resolves once the models are ready on
/// their device (a GPU opened, the weights uploaded and the kernels
/// compiled, or the fallback to the CPU taken), before the first window.
#[allow(clippy::type_complexity)]
pub fn spawn_with_ready(
    slot: Arc<ModelSlot>,
    input: flume::Receiver<Window>,
    output: flume::Sender<Inferred>,
    batching: Batching,
    metrics: Arc<Metrics>,
) -> Result<
    (
        JoinHandle<Result<(), InferenceError>>,
        tokio::sync::oneshot::Receiver<()>,
    ),
    InferenceError,
> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("outpost-inference".into())
        .spawn(move || run(&slot, &input, &output, batching, &metrics, ready_tx))
        .map(|handle| (handle, ready_rx))
        .map_err(InferenceError::Spawn)
}

fn run(
    slot: &ModelSlot,
    input: &flume::Receiver<Window>,
    output: &flume::Sender<Inferred>,
    batching: Batching,
    metrics: &Metrics,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), InferenceError> {
    let mut scratch = Scratch::default();
    let mut generation = slot.generation();
    let mut set = slot.current();
    let mut placement = Placement::start(&batching, &set, metrics);
    // Nobody waiting is fine: replay and the tests do not ask.
    let _ = ready.send(());
    let mut closed = false;
    while !closed {
        let max_batch = placement.max_batch(&batching);
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
            placement.update(&set, metrics);
            tracing::info!(model = %set.active.id, shadow = ?set.shadow.as_ref().map(|s| &s.id), "inference switched models");
        }
        let started = Instant::now();
        let cpu_before = crate::metrics::thread_cpu_time();
        let results = match metrics
            .inference_pass(|| placement.infer(&set, &batch, &mut scratch, metrics))
        {
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
            seqs: vec![0],
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

    /// The inference thread on `runner` with batches of four filled by
    /// count: its slot, metrics, window input, results and handle.
    #[allow(clippy::type_complexity)]
    fn thread_on(
        runner: Arc<Runner>,
    ) -> (
        Arc<ModelSlot>,
        Arc<Metrics>,
        flume::Sender<Window>,
        flume::Receiver<Inferred>,
        JoinHandle<Result<(), InferenceError>>,
    ) {
        let slot = ModelSlot::new(ModelSet {
            active: runner,
            shadow: None,
        });
        let metrics = Arc::new(Metrics::new());
        let (win_tx, win_rx) = flume::bounded(64);
        let (inf_tx, inf_rx) = flume::bounded(64);
        let handle = spawn(
            slot.clone(),
            win_rx,
            inf_tx,
            Batching::cpu(4, None),
            metrics.clone(),
        )
        .unwrap();
        (slot, metrics, win_tx, inf_rx, handle)
    }

    #[test]
    fn batches_by_count_keep_order_and_pass_tails_through() {
        let (slot, metrics, win_tx, inf_rx, handle) = thread_on(bundled());
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

    /// The bundled network (6 input channels) under a manifest that says
    /// its windows have 5 channels of 120 samples: the same 600 values
    /// pass the checks, and the first convolution panics in the backend.
    fn panicking() -> Arc<Runner> {
        let base = load_model(&ModelSource::Bundled).expect("bundled model loads");
        let mut m = base.manifest().clone();
        m.version = "0.0.1-panics".into();
        assert_eq!((m.input.channels, m.input.length), (6, 100));
        m.input.channels = 5;
        m.input.length = 120;
        let net = base.network().clone();
        Runner::new(Arc::new(LoadedModel::from_network(m, net, base.device())))
    }

    #[test]
    fn a_model_that_panics_costs_no_reading_and_the_thread_goes_on() {
        let (slot, metrics, win_tx, inf_rx, handle) = thread_on(panicking());
        for i in 0..8 {
            win_tx.send(window(i, true)).unwrap();
        }
        let failed: Vec<Inferred> = (0..8).map(|_| inf_rx.recv().unwrap()).collect();
        assert!(failed.iter().all(|r| r.prediction.is_none()));
        assert_eq!(
            failed.iter().map(|r| r.readings.len()).sum::<usize>(),
            8,
            "the readings of the failed batches go on"
        );
        assert_eq!(metrics.inference_errors.get(), 2, "two batches of four");
        // The thread survived the panics: a working model answers.
        slot.replace(ModelSet {
            active: bundled(),
            shadow: None,
        });
        for i in 8..12 {
            win_tx.send(window(i, true)).unwrap();
        }
        drop(win_tx);
        let ok: Vec<Inferred> = inf_rx.iter().collect();
        assert_eq!(ok.len(), 4);
        assert!(ok.iter().all(|r| r.prediction.is_some()));
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn the_backend_panic_is_what_the_guard_reports() {
        let raw: Vec<f32> = (0..600).map(|k| k as f32 / 600.0).collect();
        let err = run_model(&panicking(), &raw, 1, &mut Vec::new(), &|n| n)
            .expect_err("the forward pass cannot take these windows");
        assert_eq!(
            err.to_string(),
            ModelError::Backend("the backend panicked".into()).to_string()
        );
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
            Batching::cpu(3, Some(Duration::from_millis(1))),
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
