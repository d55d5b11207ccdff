//! Wiring: ingest → privacy and windowing → inference → aggregation →
//! release → outbox → uplink, with a bounded channel between every two
//! stages. This module only wires: each stage's task is its module's
//! `spawn` (`window::spawn`, `inference::spawn_with_ready`,
//! `aggregate::spawn`, `privacy::spawn_release`, `ingest::run_source`, ...).
//!
//! | channel                  | capacity                     | when full                          |
//! |--------------------------|------------------------------|------------------------------------|
//! | sources → privacy, windowing | `ingest.channel_capacity` | sources wait (MQTT: broker queues) |
//! | windowing → inference    | `windowing.channel_capacity` | windowing waits                    |
//! | inference → aggregation  | `inference.channel_capacity` | the inference thread waits         |
//! | aggregation → release    | 256                          | aggregation waits                  |
//! | release → outbox         | 256                          | release waits                      |
//! | aggregation → decisions  | `decisions.queue_capacity`   | the decision is dropped, counted   |
//! | outbox (disk)            | `outbox.max_bytes`           | `outbox.policy`: oldest segment dropped or new aggregate rejected, counted |
//! | outbox (memory)          | `outbox.max_records`         | oldest dropped, counted            |
//!
//! Shutdown is a drain: sources stop, and each stage finishes what it holds
//! and closes its output when its input closes, down to the uplink, which
//! exits once the outbox is empty, or when `gateway.shutdown_timeout_ms` is up.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use outpost_models::LoadedModel;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{Aggregate, AggregationConfig, Aggregator, DriftSettings, Grouper};
use crate::config::Config;
use crate::decisions::{Decision, DecisionFilter};
use crate::governance::{self, GovernanceTask, Observation, Registry, SharedAudit, Trust};
use crate::inference::{
    self, Batching, InferenceError, Inferred, ModelSet, ModelSlot, ModelSource, Runner,
};
use crate::ingest::SourceConfig;
use crate::ingest::ack::RecentKeys;
use crate::ingest::file::FileFormat;
use crate::ingest::file::FileSourceConfig;
use crate::ingest::reading::{Reading, Validator};
use crate::ingest::{self, IngestCtx, SourceSet};
use crate::journal::Journaled;
use crate::metrics::DEFAULT_METRICS_LISTEN;
use crate::metrics::{Metrics, ModelStatus};
use crate::outbox::OutboxKind;
use crate::outbox::{DiskOutbox, DiskSettings, MemoryOutbox, SharedOutbox, StreamCaps};
use crate::privacy::{Admission, Privacy, Release, ReleaseUpdate};
use crate::sdnotify::{self, Notifier};
use crate::uplink::{self, Stop};
use crate::window::{Window, WindowError, WindowSpec, Windower};

/// Errors of starting or running the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The model.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// Windows and model disagree.
    #[error(transparent)]
    Window(#[from] WindowError),
    /// A source failed to start.
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    /// A broker connection could not be configured.
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttSetupError),
    /// The metrics endpoint could not bind.
    #[error("metrics endpoint {addr}: {error}")]
    Metrics {
        /// Address.
        addr: String,
        /// Cause.
        error: std::io::Error,
    },
    /// Writing replay output failed.
    #[error("output: {0}")]
    Output(std::io::Error),
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    /// The ingest journal could not be opened.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalStageError),
    /// A model was refused, or the registry is unusable.
    #[error(transparent)]
    Governance(#[from] governance::GovernanceError),
    /// The privacy policy cannot be applied (key, budget state).
    #[error(transparent)]
    Privacy(#[from] crate::privacy::PrivacyError),
    /// The audit log cannot be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// The model source a config names.
pub fn model_source(cfg: &Config) -> ModelSource {
    match &cfg.model.path {
        Some(p) => ModelSource::Dir(p.clone()),
        None => ModelSource::Bundled,
    }
}

/// Everything the core stages need, checked before anything starts.
pub struct Prepared {
    /// The configuration.
    pub cfg: Config,
    /// The configured model (`model.path` or the bundled one): windows are
    /// cut for its input, and it runs unless the registry activates another.
    pub model: Arc<LoadedModel>,
    /// The same, as the inference thread runs it.
    pub configured: Arc<Runner>,
    /// Where the inference thread takes its models (hot swap).
    pub slot: Arc<ModelSlot>,
    /// Which models may load.
    pub trust: Trust,
    /// The key that signed the configured model, when it was verified.
    pub signed_by: Option<String>,
    /// Window geometry.
    pub spec: WindowSpec,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The audit log when it is already open (it outlives a pipeline that
    /// restarts on a new configuration); `None`: `run` opens it.
    pub audit: Option<SharedAudit>,
}

impl Prepared {
    /// Load the model (verifying its signature when the configuration
    /// requires one) and check the windows against it.
    pub fn new(cfg: Config) -> Result<Self, PipelineError> {
        Self::with_metrics(cfg, Arc::new(Metrics::new()))
    }

    /// [`Prepared::new`] reporting into `metrics` (kept across restarts).
    pub fn with_metrics(cfg: Config, metrics: Arc<Metrics>) -> Result<Self, PipelineError> {
        let trust = Trust::from_config(&cfg.governance)?;
        let (model, signed_by) = match model_source(&cfg) {
            ModelSource::Dir(dir) => {
                let l = governance::load_artifact(&dir, &trust, &burn::tensor::Device::flex())?;
                (l.model, l.key_id)
            }
            // Part of the binary: as trusted as the binary itself.
            bundled => (inference::load_model(&bundled)?, None),
        };
        let spec = WindowSpec::new(model.manifest(), cfg.windowing.size, cfg.windowing.hop)?;
        let model = Arc::new(model);
        let configured = Runner::new(model.clone());
        let slot = ModelSlot::new(ModelSet {
            active: configured.clone(),
            shadow: None,
        });
        Ok(Self {
            cfg,
            model,
            configured,
            slot,
            trust,
            signed_by,
            spec,
            metrics,
            audit: None,
        })
    }

    /// The validator every source uses.
    pub fn validator(&self) -> Arc<Validator> {
        Arc::new(Validator {
            channels: self.spec.channels,
            max_payload_bytes: self.cfg.ingest.max_payload_bytes,
            max_future_ms: self.cfg.ingest.max_future_ms,
            sensors: self.cfg.ingest.sensors.clone(),
        })
    }
}

/// Capacity of the channels that carry aggregates (closed, and released).
const AGGREGATES_CAPACITY: usize = 256;

/// Handles of the core stages.
struct Core {
    aggregates: flume::Receiver<Aggregate>,
    /// A new ingest-side privacy policy and grouping, taken before the next reading.
    admission: flume::Sender<Admission>,
    /// A new release-side privacy policy.
    release: flume::Sender<ReleaseUpdate>,
    /// New aggregation timing.
    aggregation: flume::Sender<AggregationConfig>,
    /// Resolves when the models are ready on their device.
    inference_ready: tokio::sync::oneshot::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    inference: std::thread::JoinHandle<Result<(), InferenceError>>,
}

/// How the core runs.
struct CoreMode {
    /// Close idle windows on the wall clock and batch on time.
    live: bool,
    /// Where the readings of aggregates that never reach the outbox
    /// (suppressed) are recorded as counted.
    journal: Option<Journaled>,
    /// Mark the first aggregate of each group `gap` (an unclean start
    /// without a journal).
    gap: bool,
}

/// Start windowing, inference and aggregation reading from `readings`.
fn start_core(
    p: &Prepared,
    readings: flume::Receiver<Reading>,
    decisions: Option<(flume::Sender<Decision>, DecisionFilter)>,
    observations: Option<flume::Sender<Observation>>,
    audit: Option<SharedAudit>,
    privacy_state: &std::path::Path,
    mode: CoreMode,
) -> Result<Core, PipelineError> {
    let CoreMode { live, journal, gap } = mode;
    // Readings refused after the journal took them (or counted in an
    // aggregate that is suppressed): accounted for, never replayed.
    let settle = |journal: &Option<Journaled>| {
        let journal = journal.clone();
        move |seqs: &[u64]| {
            if let Some(j) = &journal {
                j.done(seqs, None);
            }
        }
    };
    let (win_tx, win_rx) = flume::bounded::<Window>(p.cfg.windowing.channel_capacity);
    let (inf_tx, inf_rx) = flume::bounded::<Inferred>(p.cfg.inference.channel_capacity);
    let (closed_tx, closed_rx) = flume::bounded::<Aggregate>(AGGREGATES_CAPACITY);
    let (agg_tx, agg_rx) = flume::bounded::<Aggregate>(AGGREGATES_CAPACITY);
    let (admission_tx, admission_rx) = flume::unbounded::<Admission>();
    let (release_tx, release_rx) = flume::unbounded::<ReleaseUpdate>();
    let (aggregation_tx, aggregation_rx) = flume::unbounded::<AggregationConfig>();
    let mut tasks = Vec::new();

    // Privacy (reading by reading) and windowing.
    let privacy = Privacy::new(&p.cfg.privacy)?;
    let key_handle = privacy.key_id_handle();
    let mut admission = Admission::new(
        privacy,
        Grouper::new(&p.cfg.aggregation, &p.cfg.gateway.id),
        p.metrics.clone(),
        audit,
    );
    tasks.push(crate::window::spawn(
        Windower::new(p.spec.clone())?.with_limits(
            live.then_some(p.cfg.windowing.idle_evict_ms),
            p.cfg.ingest.max_sensors,
        ),
        readings,
        move |r| {
            // A live reconfiguration applies from the next reading on.
            while let Ok(a) = admission_rx.try_recv() {
                admission = a;
            }
            admission.admit(r)
        },
        win_tx,
        p.metrics.clone(),
        settle(&journal),
    ));

    // Inference, on its own thread.
    let batching = Batching {
        max_batch: p.cfg.inference.max_batch,
        gpu_max_batch: p.cfg.inference.gpu_max_batch,
        max_wait: live.then(|| Duration::from_millis(p.cfg.inference.max_wait_ms)),
        device: p.cfg.inference.device.preference(),
    };
    let (inference, inference_ready) =
        inference::spawn_with_ready(p.slot.clone(), win_rx, inf_tx, batching, p.metrics.clone())?;

    // Aggregation (and local decisions).
    let mut aggregator = Aggregator::new(&p.cfg.aggregation, &p.cfg.gateway.id, p.model.manifest())
        .with_drift(DriftSettings {
            alert_psi: p.cfg.governance.drift_alert_psi,
            min_inferences: p.cfg.governance.drift_min_inferences,
        });
    if gap {
        aggregator = aggregator.with_gap();
    }
    tasks.push(crate::aggregate::spawn(
        aggregator,
        inf_rx,
        decisions,
        closed_tx,
        aggregation_rx,
        p.metrics.clone(),
        crate::aggregate::StageMode {
            live,
            settle: settle(&journal),
        },
    ));

    // Release: observed, k-anonymity, noise, budget.
    tasks.push(crate::privacy::spawn_release(
        Release::new(&p.cfg.privacy, privacy_state, key_handle)?,
        closed_rx,
        release_rx,
        observations,
        agg_tx,
        p.metrics.clone(),
        // Readings of suppressed aggregates are counted: never replayed.
        {
            let settle = settle(&journal);
            move |settled: Vec<u64>| settle(&settled)
        },
    ));

    Ok(Core {
        aggregates: agg_rx,
        admission: admission_tx,
        release: release_tx,
        aggregation: aggregation_tx,
        inference_ready,
        tasks,
        inference,
    })
}

/// Serve the local endpoint of `cfg.metrics` ([`crate::http`]) until
/// `stop`; `None` when it is off, or when the default address is taken
/// (logged). An explicit `metrics.listen` that cannot bind is an error.
pub async fn serve_http(
    cfg: &Config,
    metrics: Arc<Metrics>,
    control: Option<crate::control::Control>,
    stop: CancellationToken,
) -> Result<Option<JoinHandle<()>>, PipelineError> {
    if !cfg.metrics.enabled {
        return Ok(None);
    }
    let explicit = cfg.metrics.listen.is_some();
    let addr = cfg
        .metrics
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_string());
    match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => {
            tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint listening");
            Ok(Some(tokio::spawn(crate::http::serve(
                listener,
                metrics,
                cfg.gateway.id.clone(),
                control,
                stop,
            ))))
        }
        Err(error) if explicit => Err(PipelineError::Metrics { addr, error }),
        Err(error) => {
            tracing::warn!(
                %addr, %error,
                "the default metrics endpoint is not available (set metrics.listen to choose another address); running without it"
            );
            Ok(None)
        }
    }
}

/// What a run did, for the final log line and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunReport {
    /// Records left undelivered in the outbox at exit.
    pub undelivered: u64,
}

/// Run the gateway until `shutdown` fires or every source has ended; then drain.
pub async fn run(
    p: Prepared,
    shutdown: CancellationToken,
    updates: flume::Receiver<LiveUpdate>,
) -> Result<RunReport, PipelineError> {
    let cfg = p.cfg.clone();
    let metrics = p.metrics.clone();
    tracing::info!(
        model = %p.model.manifest().id(),
        window = p.spec.size,
        hop = p.spec.hop,
        sources = cfg.sources.len(),
        uplink = cfg.uplink.as_ref().map(|u| format!("{}:{}", u.broker.host, u.broker.port)).unwrap_or_else(|| "none (aggregates are logged)".into()),
        "outpost starting"
    );
    let stop_sources = CancellationToken::new();
    let stop_all = CancellationToken::new();
    // Group names leave the gateway, in each aggregate and its topic.
    if cfg.privacy.key.is_some() && cfg.uplink.is_some() {
        let raw = match &cfg.aggregation.group_by {
            crate::aggregate::GroupBy::Sensor => !cfg.privacy.pseudonymize_sensor,
            crate::aggregate::GroupBy::Attr(a) => !cfg.privacy.pseudonymize_attrs.contains(a),
            crate::aggregate::GroupBy::Gateway => false,
        };
        if raw {
            tracing::warn!(
                group_by = ?cfg.aggregation.group_by,
                "aggregates are grouped by a field that is not pseudonymized, and group names are published: if it can identify a person, pseudonymize it (privacy.pseudonymize_sensor or privacy.pseudonymize_attrs)"
            );
        }
    }

    let manifest = p.model.manifest();
    metrics.set_model(&ModelStatus {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        weights_sha256: manifest
            .files
            .get(&manifest.weights)
            .cloned()
            .unwrap_or_default(),
        device: String::new(),
    });

    // Decisions.
    let decisions = match &cfg.decisions {
        Some(d) => {
            let (tx, rx) = flume::bounded(d.queue_capacity);
            tokio::spawn(crate::decisions::run_sink(
                d.clone(),
                cfg.gateway.id.clone(),
                rx,
                metrics.clone(),
                stop_all.clone(),
            ));
            Some((
                tx,
                DecisionFilter::new(d.mode, p.model.manifest().labels.clone()),
            ))
        }
        None => None,
    };

    // Audit log: what runs, under which configuration and policy.
    let audit = match p.audit.clone() {
        Some(a) => Some(a),
        None => open_shared_audit(&cfg, &metrics).await?,
    };
    governance::audit(
        &audit,
        &metrics,
        &[(
            crate::audit::kinds::START,
            serde_json::json!({
                "outpost": env!("CARGO_PKG_VERSION"),
                "gateway": &cfg.gateway.id,
                "config_sha256": &cfg.source_sha256,
                "policy_version": &cfg.privacy.policy_version,
                "model": &*p.configured.id,
                "weights_sha256": manifest.files.get(&manifest.weights),
                "signed_by": &p.signed_by,
            }),
        )],
    );

    // Governance: follow the registry (applied once before the first window).
    let (obs_tx, obs_rx) = flume::bounded::<Observation>(64);
    let governance_task = if cfg.governance.enabled {
        let registry = Registry::open(&cfg.governance.registry_dir(&cfg.gateway.state_dir))?;
        let mut task = GovernanceTask::new(
            registry,
            p.trust.clone(),
            p.configured.clone(),
            p.slot.clone(),
            audit.clone(),
            metrics.clone(),
            &cfg.governance,
        );
        task.poll_once().await;
        Some(tokio::spawn(task.run(obs_rx, stop_all.clone())))
    } else {
        None
    };
    let observations = governance_task.is_some().then_some(obs_tx);

    // The ingest journal, between the sources and the core; or, without
    // one, a gap marker after an unclean start.
    let unclean = mark_running(&cfg.gateway.state_dir);
    let journal_on = cfg
        .journal
        .enabled
        .unwrap_or(cfg.outbox.kind == OutboxKind::Disk);
    let recent = Arc::new(RecentKeys::new(RECENT_KEYS));
    let (read_tx, read_rx) = flume::bounded(cfg.ingest.channel_capacity);
    let (journal, core_rx, reappend, journal_thread) = if journal_on {
        let (j, mut recovered) =
            Journaled::open(&cfg.journal, &cfg.gateway.state_dir, metrics.clone())?;
        if !recovered.readings.is_empty() || !recovered.reappend.is_empty() {
            tracing::info!(
                readings = recovered.readings.len(),
                aggregates = recovered.reappend.len(),
                corrupt = recovered.corrupt,
                "journal: replaying what a crash left"
            );
        }
        let (tx, rx) = flume::bounded(cfg.ingest.channel_capacity);
        let reappend = std::mem::take(&mut recovered.reappend);
        let thread = crate::journal::spawn(
            j.clone(),
            recovered,
            recent.clone(),
            read_rx,
            tx,
            cfg.journal.max_batch,
        )
        .map_err(PipelineError::Output)?;
        (Some(j), rx, reappend, Some(thread))
    } else {
        if unclean {
            tracing::warn!(
                "the last run did not stop cleanly and there is no journal: the first aggregate of each group is marked gap"
            );
        }
        (None, read_rx, Vec::new(), None)
    };
    let mut core = start_core(
        &p,
        core_rx,
        decisions,
        observations,
        audit.clone(),
        &cfg.gateway.state_dir,
        CoreMode {
            live: true,
            journal: journal.clone(),
            gap: unclean && !journal_on,
        },
    )?;
    // The models are on their device (a GPU's kernels compiled) before any
    // source starts and before readiness is reported. An error means the
    // thread ended; joining it below reports why.
    let _ = (&mut core.inference_ready).await;

    // Outbox and uplink.
    let outbox: Box<dyn crate::outbox::Outbox> = match cfg.outbox.kind {
        OutboxKind::Memory => Box::new(MemoryOutbox::new(cfg.outbox.max_records)),
        OutboxKind::Disk => {
            let dir = cfg.outbox.dir(&cfg.gateway.state_dir);
            let started = std::time::Instant::now();
            let o = DiskOutbox::open(DiskSettings {
                dir: dir.clone(),
                segment_bytes: outpost_storage::fsutil::fit_segment(
                    cfg.outbox.segment_bytes,
                    &dir,
                    4096,
                ),
                max_bytes: cfg.outbox.max_bytes,
                policy: cfg.outbox.policy,
                protect_oldest: cfg.uplink.as_ref().map_or(0, |u| u.max_inflight as usize),
                stream_caps: StreamCaps {
                    default: cfg.outbox.stream_max_bytes,
                    per_stream: cfg.outbox.streams.clone(),
                },
            })?;
            let s = crate::outbox::Outbox::stats(&o);
            tracing::info!(
                dir = %dir.display(),
                pending = s.depth,
                bytes = s.bytes,
                quarantined = s.quarantined,
                open_ms = started.elapsed().as_millis() as u64,
                "outbox opened"
            );
            Box::new(o)
        }
    };
    let outbox = SharedOutbox::new(outbox);
    if let Some(j) = &journal {
        reappend_from_journal(j, &reappend, &outbox, &metrics);
    }
    metrics.observe_outbox(&crate::outbox::counts(&outbox.stats()));
    // Cancelled by the outbox writer once the last aggregate is in: the
    // uplink then exits when the outbox is empty.
    let drain = CancellationToken::new();
    let uplink_task = UplinkRun::start(&cfg, &outbox, &metrics, &drain, &stop_all, &audit)?;

    // Outbox writer: the end of the core, on a blocking thread (file I/O and
    // fsync). Appends are committed as a group every `fsync_interval_ms`;
    // the uplink only sees committed records.
    let writer = {
        let (outbox, metrics, drain) = (outbox.clone(), metrics.clone(), drain.clone());
        let aggregates = core.aggregates.clone();
        let interval = Duration::from_millis(cfg.outbox.fsync_interval_ms);
        let audit = audit.clone();
        let journal = journal.clone();
        tokio::task::spawn_blocking(move || {
            crate::outbox::write(&aggregates, &outbox, &audit, &journal, &metrics, interval);
            drain.cancel();
            outbox.wake();
        })
    };
    drop(core.aggregates);

    // Sources.
    let mut sources = SourceSet::new(p.validator(), read_tx, metrics.clone(), &cfg.gateway.id)
        .with_recent(journal.as_ref().map(|_| recent.clone()));
    for s in cfg.sources.clone() {
        sources.start(s);
    }
    metrics.set_ready(true);
    tracing::info!("outpost ready");
    let notifier = systemd_notifier();
    let watchdog = notifier
        .clone()
        .and_then(|n| sdnotify::spawn_watchdog(n, metrics.clone(), stop_sources.clone()));

    let summary = Summary::start(&cfg, &metrics, &outbox, &stop_all);
    let observer =
        crate::outbox::spawn_backlog_age(metrics.clone(), outbox.clone(), stop_all.clone());

    // Run, applying live changes, until a signal or every source ended.
    let mut live = Live {
        cfg: cfg.clone(),
        sources,
        admission: core.admission.clone(),
        release: core.release.clone(),
        aggregation: core.aggregation.clone(),
        uplink: uplink_task,
        summary,
        metrics: metrics.clone(),
        audit: audit.clone(),
        outbox: outbox.clone(),
        drain: drain.clone(),
        stop_all: stop_all.clone(),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                tracing::info!("shutdown requested: stopping sources and draining");
                break;
            }
            _ = live.sources.ended() => {
                tracing::info!("every source has ended: draining");
                break;
            }
            Ok(u) = updates.recv_async() => {
                let r = live.apply(u.cfg, u.renew_uplink).await;
                let _ = u.reply.send(r);
            }
        }
    }
    let Live {
        sources,
        uplink: uplink_task,
        summary,
        ..
    } = live;
    stop_sources.cancel();
    metrics.set_ready(false);
    if let Some(n) = &notifier {
        let _ = n.notify("STOPPING=1");
    }
    let deadline = Duration::from_millis(cfg.gateway.shutdown_timeout_ms);
    let drained = tokio::time::timeout(deadline, async {
        sources.stop().await;
        for t in core.tasks {
            let _ = t.await;
        }
        let _ = writer.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("pipeline did not drain within gateway.shutdown_timeout_ms");
    }
    if let Some(t) = journal_thread
        && drained.is_ok()
    {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    let undelivered = match tokio::time::timeout(deadline, uplink_task.task).await {
        Ok(Ok(n)) => n,
        _ => {
            stop_all.cancel();
            outbox.stats().depth
        }
    };
    stop_all.cancel();
    // Persist the acknowledgements of the drain.
    if let Err(e) = outbox.commit() {
        tracing::error!(error = %e, "outbox commit at exit failed");
    }
    summary.stop().await;
    let _ = observer.await;
    if let Some(g) = governance_task {
        let _ = g.await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let inference_result = core.inference.join();
    if drained.is_ok() {
        clear_running(&cfg.gateway.state_dir);
    }
    if undelivered > 0 {
        tracing::warn!(undelivered, "aggregates left undelivered in the outbox");
    }
    tracing::info!(
        aggregates = metrics.aggregates.get(),
        windows = metrics.windows.get(),
        acked = metrics.uplink_acked.get(),
        "outpost stopped"
    );
    match inference_result {
        Ok(Ok(())) => Ok(RunReport { undelivered }),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(InferenceError::Panicked.into()),
    }
}

/// Keys of recent site messages remembered against redelivery ([`RecentKeys`]).
const RECENT_KEYS: usize = 65_536;

/// The marker of a running gateway in its state directory.
fn running_marker(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("running")
}

/// Mark the gateway as running; whether the last run left its marker (it
/// did not stop cleanly).
fn mark_running(state_dir: &std::path::Path) -> bool {
    let path = running_marker(state_dir);
    let unclean = path.exists();
    let _ = std::fs::create_dir_all(state_dir);
    if let Err(e) =
        outpost_storage::fsutil::write_atomic(&path, std::process::id().to_string().as_bytes())
    {
        tracing::warn!(error = %e, path = %path.display(), "cannot write the running marker");
    }
    unclean
}

/// A clean stop: everything accepted was counted and committed.
fn clear_running(state_dir: &std::path::Path) {
    let _ = std::fs::remove_file(running_marker(state_dir));
    let _ = outpost_storage::fsutil::sync_dir(state_dir);
}

/// Append again the aggregates whose outbox commit a crash cut off (the
/// journal had their done records); a consumer deduplicates them by id.
fn reappend_from_journal(
    journal: &Journaled,
    reappend: &[Vec<u8>],
    outbox: &SharedOutbox,
    metrics: &Metrics,
) {
    if reappend.is_empty() {
        return;
    }
    for bytes in reappend {
        match serde_json::from_slice::<Aggregate>(bytes) {
            Ok(a) => match outbox.append(&a) {
                Ok(_) => {
                    metrics.journal.reappended.inc();
                }
                Err(e) => {
                    metrics.outbox_append_failures.inc();
                    tracing::error!(error = %e, id = %a.id, "journal: aggregate not appended again");
                }
            },
            Err(e) => {
                metrics.journal.corrupt.inc();
                tracing::error!(error = %e, "journal: an aggregate record does not decode");
            }
        }
    }
    match outbox.commit() {
        Ok(()) => {
            if let Err(e) = journal.confirm_recovered() {
                tracing::error!(error = %e, "journal: cannot record the aggregates appended again");
            }
        }
        Err(e) => tracing::error!(error = %e, "outbox commit of the journal's aggregates failed"),
    }
}

/// The audit log of `cfg`, open and shared (`None` when it is off).
pub async fn open_shared_audit(
    cfg: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<SharedAudit>, PipelineError> {
    if !cfg.audit.enabled {
        return Ok(None);
    }
    let path = cfg.audit.path(&cfg.gateway.state_dir);
    let m = metrics.clone();
    let log = tokio::task::spawn_blocking(move || open_audit(&path, &m))
        .await
        .map_err(|_| InferenceError::Panicked)??;
    metrics.set_audit_head(log.committed());
    Ok(Some(Arc::new(std::sync::Mutex::new(log))))
}

/// Open the audit log. A log that no longer matches its head file (cut
/// short, rewritten) is evidence: it is moved aside with its head file,
/// untouched, and a new chain starts whose first entry says where the old
/// one went and why, so the gateway keeps running and the break is on record.
fn open_audit(
    path: &std::path::Path,
    metrics: &Metrics,
) -> Result<crate::audit::AuditLog, crate::audit::AuditError> {
    match crate::audit::AuditLog::open(path) {
        Err(crate::audit::AuditError::Corrupt { detail, .. }) => {
            metrics.audit_errors.inc();
            let stamp = crate::clock::now_ms();
            let suffixed = |suffix: &str| {
                let mut p = path.as_os_str().to_os_string();
                p.push(suffix);
                std::path::PathBuf::from(p)
            };
            let moved = suffixed(&format!(".corrupt-{stamp}"));
            let head = suffixed(".head");
            let moved_head = suffixed(&format!(".head.corrupt-{stamp}"));
            tracing::error!(log = %path.display(), moved_to = %moved.display(), %detail, "the audit log does not match its head: moved aside, a new chain starts");
            std::fs::rename(path, &moved).map_err(|source| crate::audit::AuditError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if head.exists() {
                let _ = std::fs::rename(&head, &moved_head);
            }
            let mut log = crate::audit::AuditLog::open(path)?;
            log.append(
                crate::audit::kinds::AUDIT_RESTARTED,
                serde_json::json!({ "reason": detail, "previous_log": moved.display().to_string() }),
            )?;
            log.commit()?;
            Ok(log)
        }
        other => other,
    }
}

/// systemd's notification socket, with `READY=1` sent, when run by systemd.
fn systemd_notifier() -> Option<Arc<Notifier>> {
    match Notifier::from_env()? {
        Ok(n) => {
            if let Err(e) = n.notify("READY=1") {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
            Some(Arc::new(n))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach systemd's notification socket");
            None
        }
    }
}

/// A new configuration for the running pipeline, sent by the supervisor
/// when every part that changed applies live (see
/// [`crate::supervisor`]); the reply says what changed, or why it did not
/// apply (then the parts applied before the failure stay applied: the
/// supervisor sends the previous configuration back).
pub struct LiveUpdate {
    /// The new configuration.
    pub cfg: Config,
    /// Reconnect the uplink even when its settings are the same: the files
    /// it reads (certificates, password) changed.
    pub renew_uplink: bool,
    /// What was applied.
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<String>, String>>,
}

/// The uplink of a running pipeline: stopped and started again on new
/// settings; the outbox keeps what it has not delivered.
struct UplinkRun {
    task: JoinHandle<u64>,
    now: CancellationToken,
}

impl UplinkRun {
    fn start(
        cfg: &Config,
        outbox: &SharedOutbox,
        metrics: &Arc<Metrics>,
        drain: &CancellationToken,
        stop_all: &CancellationToken,
        audit: &Option<SharedAudit>,
    ) -> Result<Self, crate::mqtt::MqttSetupError> {
        let stop = Stop {
            drain: drain.child_token(),
            now: stop_all.child_token(),
        };
        let task = uplink::spawn(
            cfg.uplink.as_ref(),
            &cfg.gateway.id,
            cfg.privacy.can_suppress(),
            outbox.clone(),
            metrics.clone(),
            stop.clone(),
            &cfg.gateway.state_dir,
            audit.clone(),
            crate::fleet::control(
                crate::fleet::Setup {
                    fleet: cfg.fleet.as_ref(),
                    privacy: &cfg.privacy,
                    gateway: &cfg.gateway.id,
                    state_dir: &cfg.gateway.state_dir,
                    config_sha256: cfg.source_sha256.as_deref(),
                    audit: audit.clone(),
                    deadletter_dir: cfg
                        .uplink
                        .as_ref()
                        .map(|u| u.deadletter_dir(&cfg.gateway.state_dir)),
                },
                metrics,
            ),
        )?;
        Ok(Self {
            task,
            now: stop.now,
        })
    }

    /// A stand-in while one uplink replaces another: a task that has ended.
    fn idle() -> Self {
        Self {
            task: tokio::spawn(async { 0 }),
            now: CancellationToken::new(),
        }
    }

    /// Stop now (what is in flight stays in the outbox, sent again).
    async fn stop(self) {
        self.now.cancel();
        let _ = self.task.await;
    }
}

/// The summary log line's task.
struct Summary {
    task: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Summary {
    fn start(
        cfg: &Config,
        metrics: &Arc<Metrics>,
        outbox: &SharedOutbox,
        stop_all: &CancellationToken,
    ) -> Self {
        let stop = stop_all.child_token();
        let outbox = outbox.clone();
        let task = crate::metrics::spawn_summary(
            cfg.metrics.log_interval_s,
            metrics.clone(),
            move || outbox.stats().depth,
            stop.clone(),
        );
        Self { task, stop }
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Some(t) = self.task {
            let _ = t.await;
        }
    }
}

/// What a running pipeline changes live, and what it needs to.
struct Live {
    /// What is applied, part by part.
    cfg: Config,
    sources: SourceSet,
    admission: flume::Sender<Admission>,
    release: flume::Sender<ReleaseUpdate>,
    aggregation: flume::Sender<AggregationConfig>,
    uplink: UplinkRun,
    summary: Summary,
    metrics: Arc<Metrics>,
    audit: Option<SharedAudit>,
    outbox: SharedOutbox,
    drain: CancellationToken,
    stop_all: CancellationToken,
}

impl Live {
    /// Apply the parts of `new` that differ from what runs, each in its
    /// stage: the uplink reconnects on its new settings, the release and
    /// admission stages take the new privacy policy and grouping, the
    /// aggregator its new timing, sources are added, removed or replaced,
    /// the summary line its interval. Windows stay open throughout.
    async fn apply(&mut self, new: Config, renew_uplink: bool) -> Result<Vec<String>, String> {
        let mut applied = Vec::new();
        let dp = |c: &Config| c.privacy.can_suppress();
        if renew_uplink || self.cfg.uplink != new.uplink || dp(&self.cfg) != dp(&new) {
            // What would fail the start fails here, before the old one stops.
            if let Some(u) = &new.uplink {
                crate::mqtt::options(&u.broker, &new.gateway.id, "uplink")
                    .map_err(|e| format!("uplink: {e}"))?;
            }
            // The old one stops first: one session per client id.
            let (tx, rx) = (&self.drain, &self.stop_all);
            let old = std::mem::replace(&mut self.uplink, UplinkRun::idle());
            old.stop().await;
            self.uplink =
                match UplinkRun::start(&new, &self.outbox, &self.metrics, tx, rx, &self.audit) {
                    Ok(u) => u,
                    Err(e) => {
                        self.uplink = UplinkRun::start(
                            &self.cfg,
                            &self.outbox,
                            &self.metrics,
                            tx,
                            rx,
                            &self.audit,
                        )
                        .map_err(|e| format!("uplink: {e}"))?;
                        return Err(format!("uplink: {e}"));
                    }
                };
            self.cfg.uplink = new.uplink.clone();
            applied.push("uplink".to_string());
        }
        if self.cfg.privacy != new.privacy || self.cfg.aggregation != new.aggregation {
            let privacy = Privacy::new(&new.privacy).map_err(|e| format!("privacy: {e}"))?;
            let key_id = privacy.key_id_handle();
            // Made first: it publishes the released names of the declared
            // groups (which depend on the grouping) on `key_id`.
            let admission = Admission::new(
                privacy,
                Grouper::new(&new.aggregation, &new.gateway.id),
                self.metrics.clone(),
                self.audit.clone(),
            );
            let declared_moved = new.privacy.differential_privacy.is_some()
                && self.cfg.aggregation != new.aggregation;
            if self.cfg.privacy != new.privacy || declared_moved {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let update = ReleaseUpdate {
                    cfg: new.privacy.clone(),
                    state_dir: new.gateway.state_dir.clone(),
                    key_id,
                    reply,
                };
                if self.release.send(update).is_err() {
                    return Err("privacy: the release stage has ended".into());
                }
                match answer.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("privacy: {e}")),
                    Err(_) => return Err("privacy: the release stage has ended".into()),
                }
                if self.cfg.privacy != new.privacy {
                    applied.push("privacy".to_string());
                }
            }
            let _ = self.admission.send(admission);
            self.cfg.privacy = new.privacy.clone();
            if self.cfg.aggregation != new.aggregation {
                let _ = self.aggregation.send(new.aggregation.clone());
                self.cfg.aggregation = new.aggregation.clone();
                applied.push("aggregation".to_string());
            }
        }
        if self.cfg.sources != new.sources {
            let c = self.sources.apply(&new.sources).await;
            for (what, names) in [
                ("added", &c.added),
                ("removed", &c.removed),
                ("replaced", &c.replaced),
            ] {
                for n in names {
                    applied.push(format!("source {n:?} {what}"));
                }
            }
            self.cfg.sources = new.sources.clone();
        }
        if self.cfg.metrics.log_interval_s != new.metrics.log_interval_s {
            let next = Summary::start(&new, &self.metrics, &self.outbox, &self.stop_all);
            std::mem::replace(&mut self.summary, next).stop().await;
            applied.push("metrics".to_string());
        }
        self.cfg = new;
        Ok(applied)
    }
}

/// Replay recorded readings through the same stages and write the aggregates
/// as JSON Lines. Deterministic: no wall-clock window closing, batches filled
/// by count only, sensors and groups in sorted order.
pub async fn replay(
    p: Prepared,
    input: std::path::PathBuf,
    format: FileFormat,
    out: &mut dyn Write,
) -> Result<Arc<Metrics>, PipelineError> {
    let (read_tx, read_rx) = flume::bounded(p.cfg.ingest.channel_capacity);
    // Replay never spends (or is stopped by) the gateway's privacy budget:
    // its accountant lives in a directory of its own, removed at the end.
    let scratch = std::env::temp_dir().join(format!(
        "outpost-replay-{}-{}",
        std::process::id(),
        crate::clock::now_ms()
    ));
    let mode = CoreMode {
        live: false,
        journal: None,
        gap: false,
    };
    let core = start_core(&p, read_rx, None, None, None, &scratch, mode);
    let result = match core {
        Ok(core) => replay_core(&p, core, read_tx, input, format, out).await,
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| p.metrics.clone())
}

async fn replay_core(
    p: &Prepared,
    core: Core,
    read_tx: flume::Sender<Reading>,
    input: std::path::PathBuf,
    format: FileFormat,
    out: &mut dyn Write,
) -> Result<(), PipelineError> {
    let ctx = IngestCtx::new("replay", p.validator(), read_tx, p.metrics.clone());
    let source = SourceConfig::File(FileSourceConfig {
        name: "replay".into(),
        path: input,
        format,
    });
    let reader = tokio::spawn(ingest::run_source(
        source,
        ctx,
        p.cfg.gateway.id.clone(),
        CancellationToken::new(),
    ));
    while let Ok(a) = core.aggregates.recv_async().await {
        let line = serde_json::to_string(&a).map_err(|e| PipelineError::Output(e.into()))?;
        writeln!(out, "{line}").map_err(PipelineError::Output)?;
    }
    out.flush().map_err(PipelineError::Output)?;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {}
    }
    for t in core.tasks {
        let _ = t.await;
    }
    match core.inference.join() {
        Ok(r) => r?,
        Err(_) => return Err(InferenceError::Panicked.into()),
    }
    Ok(())
}
