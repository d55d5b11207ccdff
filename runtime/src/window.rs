//! Windowing and features: per sensor, sliding windows of `size` samples with
//! hop `hop`, raw, or turned into a feature vector for feature models
//! (inference normalizes them with the statistics of the model that runs
//! them, so models can be swapped live). Pure state, no I/O.
//!
//! Input: [`Reading`] (after privacy) with its aggregation group.
//! Output: [`Window`], which also carries the timestamps of the readings it
//! covers for the first time, so aggregation counts every accepted reading
//! exactly once, including those left over at shutdown (a tail window with no data).

mod config;
pub use config::WindowingConfig;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use outpost_models::features::Extractor;
use outpost_models::manifest::{InputKind, Manifest};

use crate::ingest::reading::Reading;
use crate::metrics::Metrics;

/// Errors of building a windower from a model and configuration.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// Window size and model input disagree.
    #[error("windowing.size {size} does not match the model's input length {model} ({name})")]
    SizeMismatch {
        /// Configured size.
        size: usize,
        /// The model's input length.
        model: usize,
        /// The model.
        name: String,
    },
    /// The hop is zero or larger than the window.
    #[error("windowing.hop {hop} must be in 1..={size}")]
    Hop {
        /// Hop.
        hop: usize,
        /// Size.
        size: usize,
    },
    /// The model's feature list is invalid.
    #[error("model features: {0}")]
    Features(String),
    /// Feature count and model input disagree.
    #[error("the model expects {model} features, its extractors give {actual}")]
    FeatureCount {
        /// Expected by the model.
        model: usize,
        /// Produced by the extractors.
        actual: usize,
    },
}

/// One window ready for inference (or a tail of uncovered readings).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Sensor.
    pub sensor: Arc<str>,
    /// Aggregation group.
    pub group: Arc<str>,
    /// Event time of the window's first sample.
    pub start_ms: i64,
    /// Event time of the window's last sample.
    pub end_ms: i64,
    /// Timestamps of the readings this window covers for the first time.
    pub readings: Vec<i64>,
    /// Their ingest journal sequence numbers, in the same order (0: not journaled).
    pub seqs: Vec<u64>,
    /// Model input before normalization (samples `[channels][size]` or features); `None`
    /// for a tail that only carries reading counts.
    pub data: Option<Vec<f32>>,
}

/// Window geometry and preprocessing, derived from the model and the config.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    /// Samples per window.
    pub size: usize,
    /// Samples between window starts.
    pub hop: usize,
    /// Values per reading.
    pub channels: usize,
    features: Vec<String>,
    kind: InputKind,
}

impl WindowSpec {
    /// Derive the spec from the model; `size` must match a raw model's input length.
    pub fn new(manifest: &Manifest, size: Option<usize>, hop: usize) -> Result<Self, WindowError> {
        let kind = manifest.input.kind;
        let size = match (kind, size) {
            (InputKind::Raw, Some(s)) if s != manifest.input.length => {
                return Err(WindowError::SizeMismatch {
                    size: s,
                    model: manifest.input.length,
                    name: manifest.id(),
                });
            }
            (InputKind::Raw, _) => manifest.input.length,
            (InputKind::Features, Some(s)) => match manifest.input.window {
                Some(w) if w != s => {
                    return Err(WindowError::SizeMismatch {
                        size: s,
                        model: w,
                        name: manifest.id(),
                    });
                }
                _ => s,
            },
            (InputKind::Features, None) => manifest.input.window.unwrap_or(100),
        };
        if hop == 0 || hop > size {
            return Err(WindowError::Hop { hop, size });
        }
        let channels = match kind {
            InputKind::Raw => manifest.input.channels,
            InputKind::Features => {
                // For feature models, the reading's channels are the raw channels:
                // the model's `channels` is the feature count.
                let ex = Extractor::new(&manifest.input.features, size)
                    .map_err(WindowError::Features)?;
                let per = ex.width().max(1);
                if !manifest.input.channels.is_multiple_of(per) {
                    return Err(WindowError::FeatureCount {
                        model: manifest.input.channels,
                        actual: per,
                    });
                }
                manifest.input.channels / per
            }
        };
        Ok(Self {
            size,
            hop,
            channels,
            features: manifest.input.features.clone(),
            kind,
        })
    }
}

#[derive(Debug, Default)]
struct SensorBuf {
    samples: VecDeque<(i64, Vec<f32>)>,
    since_last: usize,
    emitted_any: bool,
    pending: Vec<i64>,
    /// Journal sequence numbers of `pending`, in the same order.
    pending_seqs: Vec<u64>,
    group: Option<Arc<str>>,
    /// Monotonic time of its latest reading ([`Windower::evict_idle`]).
    seen: i64,
}

/// Per-sensor sliding windows. Sensors are kept in a sorted map so that the
/// order of tail windows at shutdown is deterministic.
#[derive(Debug)]
pub struct Windower {
    spec: WindowSpec,
    sensors: BTreeMap<Arc<str>, SensorBuf>,
    extractor: Option<Extractor>,
    /// Forget a sensor idle for this long (monotonic ms); `None`: never
    /// (replay, which must not depend on how fast it runs).
    evict_after_ms: Option<i64>,
    /// Most sensors tracked at once.
    max_sensors: usize,
    /// Monotonic time of the latest [`Windower::evict_idle`].
    now_ms: i64,
    /// Sensors evicted so far.
    evicted: u64,
}

impl Windower {
    /// A windower for `spec`.
    pub fn new(spec: WindowSpec) -> Result<Self, WindowError> {
        let extractor = match spec.kind {
            InputKind::Raw => None,
            InputKind::Features => {
                Some(Extractor::new(&spec.features, spec.size).map_err(WindowError::Features)?)
            }
        };
        Ok(Self {
            spec,
            sensors: BTreeMap::new(),
            extractor,
            evict_after_ms: None,
            max_sensors: usize::MAX,
            now_ms: 0,
            evicted: 0,
        })
    }

    /// With memory bounds: sensors idle for `evict_after_ms` (monotonic, live
    /// runs; `None`: never) are evicted by [`Windower::evict_idle`], and at
    /// most `max_sensors` are tracked ([`Windower::admits`]).
    pub fn with_limits(mut self, evict_after_ms: Option<u64>, max_sensors: usize) -> Self {
        self.evict_after_ms = evict_after_ms.map(|ms| ms.min(i64::MAX as u64) as i64);
        self.max_sensors = max_sensors.max(1);
        self
    }

    /// Whether a reading of `sensor` can be taken: it is tracked already, or
    /// fewer than `max_sensors` are. A refused one is counted
    /// (`too_many_sensors`) by the stage.
    pub fn admits(&self, sensor: &str) -> bool {
        self.sensors.len() < self.max_sensors || self.sensors.contains_key(sensor)
    }

    /// Sensors evicted for idleness so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// At monotonic time `now_ms`: forget every sensor idle for
    /// `evict_after_ms` (nothing when eviction is off). Their readings not
    /// yet covered by a window are returned as tails, like at shutdown, so
    /// they are still counted; the buffers are freed. Later readings of
    /// such a sensor start a new buffer.
    pub fn evict_idle(&mut self, now_ms: i64) -> Vec<Window> {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(after) = self.evict_after_ms else {
            return Vec::new();
        };
        let now = self.now_ms;
        let idle: Vec<Arc<str>> = self
            .sensors
            .iter()
            .filter(|(_, b)| now.saturating_sub(b.seen) >= after)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for sensor in idle {
            if let Some(buf) = self.sensors.remove(&sensor) {
                self.evicted += 1;
                out.extend(tail(sensor, buf));
            }
        }
        out
    }

    /// The spec.
    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    /// Sensors with buffered samples.
    pub fn sensors(&self) -> usize {
        self.sensors.len()
    }

    /// Add a reading (its values must have `spec.channels` entries: ingest
    /// checks that); returns the window it completes, if any.
    pub fn push(&mut self, r: Reading, group: Arc<str>) -> Option<Window> {
        let size = self.spec.size;
        let buf = self.sensors.entry(r.sensor.clone()).or_default();
        buf.seen = self.now_ms;
        buf.group = Some(group.clone());
        buf.pending.push(r.ts_ms);
        buf.pending_seqs.push(r.seq);
        buf.samples.push_back((r.ts_ms, r.values));
        if buf.samples.len() > size {
            buf.samples.pop_front();
        }
        buf.since_last += 1;
        let due =
            buf.samples.len() == size && (!buf.emitted_any || buf.since_last >= self.spec.hop);
        if !due {
            return None;
        }
        buf.emitted_any = true;
        buf.since_last = 0;
        let start_ms = buf.samples.front().map(|s| s.0).unwrap_or(r.ts_ms);
        let end_ms = r.ts_ms;
        let readings = std::mem::take(&mut buf.pending);
        let seqs = std::mem::take(&mut buf.pending_seqs);
        // Channel-major [channels][size].
        let c = self.spec.channels;
        let mut data = vec![0f32; c * size];
        for (t, (_, values)) in buf.samples.iter().enumerate() {
            for (ch, v) in values.iter().enumerate().take(c) {
                data[ch * size + t] = *v;
            }
        }
        // Not normalized here: each model normalizes with its own statistics
        // (inference), so a model with new statistics can be swapped in live.
        let data = match &mut self.extractor {
            None => data,
            Some(ex) => {
                let mut f = Vec::with_capacity(c * ex.width());
                ex.extract(&data, &mut f);
                f
            }
        };
        Some(Window {
            sensor: r.sensor,
            group,
            start_ms,
            end_ms,
            readings,
            seqs,
            data: Some(data),
        })
    }

    /// At shutdown: one tail per sensor with readings not yet covered by a
    /// window, so they are still counted. Buffers are emptied.
    pub fn flush(&mut self) -> Vec<Window> {
        std::mem::take(&mut self.sensors)
            .into_iter()
            .filter_map(|(sensor, buf)| tail(sensor, buf))
            .collect()
    }
}

/// The tail of a sensor's buffer: its readings not yet covered by a window
/// (at shutdown or eviction), `None` when there are none.
fn tail(sensor: Arc<str>, buf: SensorBuf) -> Option<Window> {
    if buf.pending.is_empty() {
        return None;
    }
    let start_ms = buf.pending.iter().copied().min().unwrap_or(0);
    let end_ms = buf.pending.iter().copied().max().unwrap_or(0);
    Some(Window {
        sensor,
        group: buf.group.unwrap_or_else(|| Arc::from("unassigned")),
        start_ms,
        end_ms,
        readings: buf.pending,
        seqs: buf.pending_seqs,
        data: None,
    })
}

/// Run the windowing stage: each reading passes `admit` (the privacy
/// stage: [`crate::privacy::Admission::admit`]), then into its sensor's
/// window; a full window goes to `windows` (waiting while it is full). When
/// `readings` closes, the partial windows are flushed and `windows` closes.
/// With eviction on ([`Windower::with_limits`]), idle sensors are evicted on
/// the monotonic clock (their tails go to `windows`), and a reading of a new
/// sensor beyond `max_sensors` is refused and counted (`too_many_sensors`);
/// `admit` may refuse a reading too (counting it itself). The journal
/// sequence of a refused reading goes to `settle` (it is accounted for,
/// never to be replayed).
pub fn spawn<Refused>(
    mut windower: Windower,
    readings: flume::Receiver<Reading>,
    mut admit: impl FnMut(Reading) -> Result<(Reading, Arc<str>), Refused> + Send + 'static,
    windows: flume::Sender<Window>,
    metrics: Arc<Metrics>,
    settle: impl Fn(&[u64]) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = windower
            .evict_after_ms
            .map(|ms| std::time::Duration::from_millis((ms / 4).clamp(10, 1_000) as u64));
        let mut ticker =
            tokio::time::interval(every.unwrap_or(std::time::Duration::from_secs(3600)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        windower.evict_idle(crate::clock::mono_ms());
        loop {
            let next = if every.is_some() {
                tokio::select! {
                    r = readings.recv_async() => r,
                    _ = ticker.tick() => {
                        let before = windower.evicted();
                        let tails = windower.evict_idle(crate::clock::mono_ms());
                        metrics.sensors_evicted.inc_by(windower.evicted() - before);
                        for tail in tails {
                            if windows.send_async(tail).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                }
            } else {
                readings.recv_async().await
            };
            let Ok(r) = next else { break };
            let seq = r.seq;
            let Ok((r, group)) = admit(r) else {
                // Refused by the privacy policy and counted there; its
                // acknowledgement went with it: it is not sent again.
                if seq != 0 {
                    settle(&[seq]);
                }
                continue;
            };
            if !windower.admits(&r.sensor) {
                // Counted where it is refused; its acknowledgement (if any)
                // goes with it: a refused reading is not sent again.
                metrics.reject(
                    "windowing",
                    crate::ingest::reading::RejectReason::TooManySensors.as_str(),
                );
                if r.seq != 0 {
                    settle(&[r.seq]);
                }
                continue;
            }
            if let Some(w) = windower.push(r, group) {
                metrics.windows.inc();
                if windows.send_async(w).await.is_err() {
                    return;
                }
            }
        }
        for tail in windower.flush() {
            if windows.send_async(tail).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_models::manifest::*;

    fn manifest(len: usize) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            name: "t".into(),
            version: "1.0.0".into(),
            task: Task::Classifier,
            architecture: Architecture::Mlp { hidden: vec![] },
            input: InputSpec {
                kind: InputKind::Raw,
                channels: 2,
                length: len,
                features: vec![],
                window: None,
            },
            normalization: Normalization::PerChannel {
                mean: vec![1.0, 0.0],
                std: vec![2.0, 1.0],
            },
            labels: vec!["a".into(), "b".into()],
            anomaly_threshold: None,
            weights: "w".into(),
            provenance: None,
            metrics: Default::default(),
            created_at: String::new(),
            files: [("w".to_string(), String::new())].into(),
            reference: None,
        }
    }

    fn reading(sensor: &str, ts: i64, v: f32) -> Reading {
        Reading {
            sensor: Arc::from(sensor),
            ts_ms: ts,
            values: vec![v, -v],
            attrs: Default::default(),
            seq: 0,
            ack: None,
        }
    }

    #[test]
    fn sliding_windows_cover_every_reading_once() {
        let spec = WindowSpec::new(&manifest(4), None, 2).unwrap();
        let mut w = Windower::new(spec).unwrap();
        let g: Arc<str> = Arc::from("g");
        let mut windows = Vec::new();
        for t in 0..9 {
            windows.extend(w.push(reading("s", t, t as f32), g.clone()));
        }
        // Windows end at samples 3, 5, 7.
        assert_eq!(
            windows.iter().map(|w| w.end_ms).collect::<Vec<_>>(),
            vec![3, 5, 7]
        );
        assert_eq!(windows[0].readings, vec![0, 1, 2, 3]);
        assert_eq!(windows[1].readings, vec![4, 5]);
        // Channel-major, raw (each model normalizes in inference).
        assert_eq!(
            &windows[0].data.as_ref().unwrap()[..4],
            &[0.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(
            &windows[0].data.as_ref().unwrap()[4..],
            &[0.0, -1.0, -2.0, -3.0]
        );
        let tail = w.flush();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].readings, vec![8]);
        assert!(tail[0].data.is_none());
        let covered: usize = windows.iter().chain(&tail).map(|w| w.readings.len()).sum();
        assert_eq!(covered, 9);
    }

    #[test]
    fn feature_models_get_feature_vectors() {
        let mut m = manifest(4);
        m.input = InputSpec {
            kind: InputKind::Features,
            channels: 2 * 3,
            length: 1,
            features: vec!["rms".into(), "peak".into(), "crest".into()],
            window: Some(4),
        };
        m.normalization = Normalization::None;
        let spec = WindowSpec::new(&m, Some(4), 4).unwrap();
        assert_eq!(spec.channels, 2, "readings keep their raw channels");
        let mut w = Windower::new(spec).unwrap();
        let mut out = None;
        for (t, v) in [3.0f32, -3.0, 3.0, -3.0].into_iter().enumerate() {
            out = w.push(reading("s", t as i64, v), Arc::from("g"));
        }
        let f = out.unwrap().data.unwrap();
        // Channel 0 is ±3, channel 1 its negation: rms 3, peak 3, crest 1 for both.
        assert_eq!(f, vec![3.0, 3.0, 1.0, 3.0, 3.0, 1.0]);
        assert_eq!(
            WindowSpec::new(&m, None, 4).unwrap().size,
            4,
            "trained window"
        );
        assert!(matches!(
            WindowSpec::new(&m, Some(8), 4),
            Err(WindowError::SizeMismatch { model: 4, .. })
        ));
        m.input.channels = 5;
        assert!(matches!(
            WindowSpec::new(&m, Some(4), 4),
            Err(WindowError::FeatureCount { .. })
        ));
    }

    /// An idle sensor is forgotten, its uncovered readings going on as a
    /// tail (with their journal sequences); a busy one keeps its buffer.
    #[test]
    fn idle_sensors_are_evicted_with_their_readings_as_tails() {
        let spec = WindowSpec::new(&manifest(4), None, 2).unwrap();
        let mut w = Windower::new(spec).unwrap().with_limits(Some(1_000), 10);
        let g: Arc<str> = Arc::from("g");
        assert!(w.evict_idle(0).is_empty());
        let mut r = reading("quiet", 5, 1.0);
        r.seq = 42;
        assert!(w.push(r, g.clone()).is_none());
        w.push(reading("busy", 5, 1.0), g.clone());
        assert!(w.evict_idle(600).is_empty(), "idle for 600 ms only");
        w.push(reading("busy", 6, 1.0), g.clone());
        let tails = w.evict_idle(1_000);
        assert_eq!(tails.len(), 1);
        assert_eq!(&*tails[0].sensor, "quiet");
        assert_eq!(
            (tails[0].readings.clone(), tails[0].seqs.clone()),
            (vec![5], vec![42])
        );
        assert!(tails[0].data.is_none());
        assert_eq!((w.sensors(), w.evicted()), (1, 1));
        // The busy one goes once it idles too; the whole buffer, once.
        let tails = w.evict_idle(1_600);
        assert_eq!(tails[0].readings, vec![5, 6]);
        assert_eq!((w.sensors(), w.evicted()), (0, 2));
        // Without eviction (replay), nothing is ever forgotten.
        let mut keep = Windower::new(WindowSpec::new(&manifest(4), None, 2).unwrap()).unwrap();
        keep.push(reading("s", 1, 1.0), g);
        assert!(keep.evict_idle(i64::MAX).is_empty());
        assert_eq!(keep.sensors(), 1);
    }

    /// At most `max_sensors` are tracked; known ones are always taken, and
    /// room made by an eviction is used again.
    #[test]
    fn the_sensor_cap_refuses_new_sensors_until_some_idle() {
        let spec = WindowSpec::new(&manifest(4), None, 2).unwrap();
        let mut w = Windower::new(spec).unwrap().with_limits(Some(1_000), 2);
        let g: Arc<str> = Arc::from("g");
        for s in ["a", "b"] {
            assert!(w.admits(s));
            w.push(reading(s, 1, 1.0), g.clone());
        }
        assert!(!w.admits("c"));
        assert!(w.admits("a"), "a tracked sensor is always taken");
        w.evict_idle(1_000);
        assert!(w.admits("c"));
    }

    #[test]
    fn size_must_match_raw_model() {
        assert!(matches!(
            WindowSpec::new(&manifest(4), Some(5), 2),
            Err(WindowError::SizeMismatch { .. })
        ));
        assert!(matches!(
            WindowSpec::new(&manifest(4), None, 5),
            Err(WindowError::Hop { .. })
        ));
    }
}
