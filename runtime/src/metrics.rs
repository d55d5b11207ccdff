//! Metrics (Prometheus text format through `prometheus-client`).
//!
//! The lowest layer of the runtime with [`crate::clock`]: every stage reports
//! numbers here, and this module imports no stage's types (a stage turns its
//! own types into the plain figures below). The HTTP endpoint that serves
//! them is [`crate::http`].

mod config;
pub use config::{DEFAULT_METRICS_LISTEN, MetricsConfig};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use serde::{Deserialize, Serialize};

/// The model serving the aggregates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelStatus {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// sha256 of the weights file, as the signed manifest lists it.
    pub weights_sha256: String,
    /// Inference device (`cpu` or `gpu`).
    pub device: String,
}

/// Labels of per-source counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Source name.
    pub source: String,
}

/// Labels of rejection counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Source name.
    pub source: String,
    /// The reason's label (`RejectReason::as_str` of the ingest stage).
    pub reason: String,
}

/// Labels of source error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceErrorLabels {
    /// Source name.
    pub source: String,
    /// Error kind (`nack`, `arbitration_loss`, `timeout`, `exception`, ...).
    pub kind: String,
}

/// Labels of per-stream outbox gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// Stream (aggregate group).
    pub stream: String,
}

/// Labels of the model info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// Inference device.
    pub device: String,
}

/// Every metric of the runtime.
pub struct Metrics {
    registry: Registry,
    /// Readings accepted, per source.
    pub readings: Family<SourceLabels, Counter>,
    /// Readings refused, per source and reason.
    pub rejected: Family<RejectLabels, Counter>,
    /// Errors of polled sources (bus, device, protocol), per source and kind;
    /// every attempt counts, retried or not.
    pub source_errors: Family<SourceErrorLabels, Counter>,
    /// Samples a polled source gave up after its retries.
    pub source_failed_reads: Family<SourceLabels, Counter>,
    /// Sample slots a polled source missed because a read or the pipeline
    /// ran late.
    pub source_overruns: Family<SourceLabels, Counter>,
    /// Attributes dropped by the privacy allowlist.
    pub attrs_dropped: Counter,
    /// Windows produced.
    pub windows: Counter,
    /// Windows inferred.
    pub inferences: Counter,
    /// Windows per batch.
    pub batch_size: Histogram,
    /// Wall time per batch, seconds.
    pub inference_latency: Histogram,
    /// CPU time of the inference thread, microseconds.
    pub inference_cpu_us: Counter,
    /// Batches whose forward pass failed (their readings are still counted).
    pub inference_errors: Counter,
    /// Times inference fell back from a GPU to the CPU (the GPU would not
    /// open at start, or failed later).
    pub device_fallbacks: Counter,
    /// Seconds from the inference thread's start to its models being ready
    /// on their device (GPU: adapter opened, weights uploaded, kernels compiled).
    pub inference_ready_seconds: Gauge<f64, AtomicU64>,
    /// Aggregates produced.
    pub aggregates: Counter,
    /// Readings that arrived after their window closed.
    pub late_readings: Counter,
    /// Sensors forgotten by windowing after idling (their readings not yet
    /// in a window flushed as tails, still counted).
    pub sensors_evicted: Counter,
    /// Aggregation groups forgotten after idling (their windows closed first).
    pub groups_evicted: Counter,
    /// Records in the outbox.
    pub outbox_depth: Gauge,
    /// Records dropped from a full outbox.
    pub outbox_dropped: Counter,
    /// Bytes the outbox holds on disk.
    pub outbox_bytes: Gauge,
    /// Bytes the outbox holds on disk per stream (aggregate group).
    pub outbox_stream_bytes: Family<StreamLabels, Gauge>,
    streams_seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Seconds since the end of the window of the oldest aggregate waiting
    /// in the outbox (0 when none waits).
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    /// Aggregates refused by a full outbox (`reject_new`).
    pub outbox_rejected: Counter,
    /// Corrupt outbox spans moved to quarantine.
    pub outbox_quarantined: Counter,
    /// Outbox records lost to corruption.
    pub outbox_lost: Counter,
    /// Outbox records merged into coarser windows (policy coarsen).
    pub outbox_coarsened: Counter,
    /// Outbox group commits that succeeded (what feeds the systemd watchdog).
    pub outbox_commits: Counter,
    /// Failed outbox appends (each an aggregate refused or lost) and commits.
    pub outbox_append_failures: Counter,
    /// Outbox appends that failed on an I/O error (a full or failing disk):
    /// the aggregate is kept and tried again, not lost.
    pub outbox_store_retries: Counter,
    /// The ingest journal ([`JournalMetrics`]).
    pub journal: JournalMetrics,
    /// Aggregates published to the cloud (sent, not yet acknowledged).
    pub uplink_sent: Counter,
    /// Aggregates acknowledged by the cloud broker.
    pub uplink_acked: Counter,
    /// Connection attempts after the first.
    pub uplink_reconnects: Counter,
    /// 1 while connected to the cloud broker.
    pub uplink_connected: Gauge,
    /// Publishes handed to the client and not yet acknowledged.
    pub uplink_inflight: Gauge,
    /// 1 while the uplink's circuit breaker is open.
    pub uplink_breaker_open: Gauge,
    /// Probes of the open circuit breaker that failed (no connection, or
    /// dropped before their first PUBACK).
    pub uplink_breaker_probes_failed: Counter,
    /// MQTT messages published to the cloud (a batch is one message).
    pub uplink_messages: Counter,
    /// Bytes of aggregate messages published to the cloud (topic and
    /// payload, after compression).
    pub uplink_bytes: Counter,
    /// Health messages published to the cloud.
    pub health_sent: Counter,
    /// Messages that failed: unacknowledged when a connection was lost,
    /// or refused by the client before they were sent.
    pub uplink_failed_messages: Counter,
    /// Records set aside in the dead-letter store after failing alone
    /// `uplink.max_attempts` times (or larger than the broker takes).
    pub uplink_deadlettered: Counter,
    /// Records the dead-letter store could not take (its write failed, or
    /// the record alone exceeds its bound); the first stay in the outbox.
    pub deadletter_errors: Counter,
    /// Dead-letter entries removed, oldest first, to keep the store within
    /// `uplink.deadletter_max_bytes`.
    pub deadletter_evicted: Counter,
    /// Dead-letter entries put back in the outbox (`outpost deadletter resend`).
    pub deadletter_resent: Counter,
    /// Entries held in the dead-letter store.
    pub deadletter_records: Gauge,
    /// Bytes held in the dead-letter store.
    pub deadletter_bytes: Gauge,
    /// 1, labelled with the model serving the aggregates.
    pub model_info: Family<ModelLabels, Gauge>,
    model: std::sync::Mutex<ModelStatus>,
    /// Decisions published to the site broker.
    pub decisions_published: Counter,
    /// Decisions dropped because the site queue was full or the broker down.
    pub decisions_dropped: Counter,
    ready: AtomicBool,
    started: AtomicU64,
    /// A cloud uplink is configured (else aggregates are logged).
    pub uplink_configured: AtomicBool,
    /// Audit log entries written.
    pub audit_entries: Counter,
    /// Audit log writes that failed.
    pub audit_errors: Counter,
    /// Changes of the running models (activation, shadow start or end).
    pub model_swaps: Counter,
    /// Models refused (signature, checksum, incompatible input).
    pub model_refused: Counter,
    /// Automatic rollbacks.
    pub model_rollbacks: Counter,
    /// Agreement of the shadow model with the active one in the latest aggregate.
    pub shadow_agreement: Gauge<f64, AtomicU64>,
    /// PSI against the training reference in the latest aggregate, by kind
    /// (`input`: the largest over input features; `score`).
    pub drift_psi: Family<KindLabels, Gauge<f64, AtomicU64>>,
    /// Aggregates whose drift reached `governance.drift_alert_psi`.
    pub drift_alerts: Counter,
    /// Identifiers replaced by keyed tokens.
    pub privacy_pseudonymized: Counter,
    /// Redactions in attribute values.
    pub privacy_redactions: Counter,
    /// Aggregates withheld, by reason (`k_anonymity`, `budget`).
    pub privacy_suppressed: Family<KindLabels, Counter>,
    /// Aggregates merged into a coarser window to reach k.
    pub privacy_merged: Counter,
    /// Aggregates released with Laplace noise.
    pub privacy_noised: Counter,
    /// Differential privacy: empty aggregates made for declared groups
    /// without readings in a window (noised like any other).
    pub privacy_empty: Counter,
    /// Pseudonymization key changes picked up without restart.
    pub privacy_key_rotations: Counter,
    /// Key files that could not be read (the previous key stays).
    pub privacy_key_errors: Counter,
    audit_head: std::sync::Mutex<Option<(u64, String)>>,
    /// Configuration changes asked for (`outpost reload`, SIGHUP), by
    /// outcome: `applied`, `unchanged`, `refused` (it has problems) or
    /// `rolled_back` (it could not start; the previous one runs again).
    pub config_reloads: Family<KindLabels, Counter>,
    /// Fleet documents and commands refused, by reason (docs/fleet.md).
    pub fleet_refused: Family<ReasonLabels, Counter>,
    /// Fleet documents and commands accepted, by kind (`desired`, `command`).
    pub fleet_accepted: Family<KindLabels, Counter>,
    /// Fleet failures that are not refusals: the trust memory could not be
    /// read or stored, a key could not be read (fleet operations off).
    pub fleet_errors: Counter,
    /// sha256 of the configuration that runs, and when it was applied (ms
    /// since the epoch).
    config: std::sync::Mutex<Option<(String, i64)>>,
    ready_tx: tokio::sync::watch::Sender<bool>,
    /// When the inference thread's current pass began (ms on the monotonic
    /// clock since `created`, plus one); 0 while no pass runs.
    inference_pass_since: AtomicU64,
    /// The monotonic origin of `inference_pass_since`.
    created: std::time::Instant,
}

/// The drift figures of one aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drift {
    /// The largest PSI over the input features.
    pub input_psi: f64,
    /// PSI of the scores.
    pub score_psi: f64,
    /// Whether it reached the alert level.
    pub alert: bool,
}

/// The outbox's figures, as the outbox stage reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxCounts {
    /// Records held.
    pub depth: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Records dropped because the outbox was full (since start).
    pub dropped: u64,
    /// Aggregates refused because the outbox was full (since start).
    pub rejected: u64,
    /// Corrupt spans moved to quarantine (since start).
    pub quarantined: u64,
    /// Records lost to corruption (since start).
    pub lost: u64,
    /// Records merged into others by the `coarsen` policy (since start).
    pub coarsened: u64,
}

/// The ingest journal's figures.
#[derive(Debug, Default)]
pub struct JournalMetrics {
    /// Readings replayed from the journal at start.
    pub replayed: Counter,
    /// Aggregates appended to the outbox again at start (a crash came
    /// between the journal's commit and the outbox's).
    pub reappended: Counter,
    /// Torn or corrupt journal records found at start, and replayed
    /// readings that could not be decoded.
    pub corrupt: Counter,
    /// Journal commits that failed (retried; the sources wait).
    pub commit_failures: Counter,
    /// Messages a site broker sent again whose readings the journal
    /// already held (acknowledged, not counted again).
    pub duplicates: Counter,
    /// Times the journal was full and the sources waited.
    pub full_waits: Counter,
    /// Times the journal's file system was nearly full (under
    /// `journal.min_free_bytes`) and the sources waited.
    pub low_space_waits: Counter,
    /// Bytes in the journal.
    pub bytes: Gauge,
    /// Readings in the journal not yet counted in a committed aggregate.
    pub outstanding: Gauge,
}

impl JournalMetrics {
    fn register(&self, r: &mut Registry) {
        let c = |r: &mut Registry, name: &str, help: &str, m: &Counter| {
            r.register(name, help, m.clone())
        };
        c(
            r,
            "journal_replayed",
            "Readings replayed from the ingest journal at start",
            &self.replayed,
        );
        c(
            r,
            "journal_reappended",
            "Aggregates appended to the outbox again from the journal at start",
            &self.reappended,
        );
        c(
            r,
            "journal_corrupt",
            "Torn or corrupt ingest journal records found at start",
            &self.corrupt,
        );
        c(
            r,
            "journal_commit_failures",
            "Failed ingest journal commits (retried)",
            &self.commit_failures,
        );
        c(
            r,
            "journal_duplicates",
            "Messages sent again by a site broker whose readings the journal held",
            &self.duplicates,
        );
        c(
            r,
            "journal_full_waits",
            "Times the ingest journal was full and sources waited",
            &self.full_waits,
        );
        c(
            r,
            "journal_low_space_waits",
            "Times the disk was nearly full (journal.min_free_bytes) and sources waited",
            &self.low_space_waits,
        );
        r.register(
            "journal_bytes",
            "Bytes in the ingest journal",
            self.bytes.clone(),
        );
        r.register(
            "journal_outstanding",
            "Journaled readings not yet counted in a committed aggregate",
            self.outstanding.clone(),
        );
    }
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason.
    pub reason: String,
}

/// A `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: String,
}

impl KindLabels {
    /// The label `kind = k`.
    pub fn of(k: &str) -> Self {
        Self { kind: k.into() }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost");
        let m = Self {
            readings: Family::default(),
            rejected: Family::default(),
            source_errors: Family::default(),
            source_failed_reads: Family::default(),
            source_overruns: Family::default(),
            attrs_dropped: Counter::default(),
            windows: Counter::default(),
            inferences: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            inference_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            inference_cpu_us: Counter::default(),
            inference_errors: Counter::default(),
            device_fallbacks: Counter::default(),
            inference_ready_seconds: Gauge::default(),
            aggregates: Counter::default(),
            late_readings: Counter::default(),
            sensors_evicted: Counter::default(),
            groups_evicted: Counter::default(),
            outbox_depth: Gauge::default(),
            outbox_dropped: Counter::default(),
            outbox_bytes: Gauge::default(),
            outbox_stream_bytes: Family::default(),
            outbox_oldest_age: Gauge::default(),
            streams_seen: Default::default(),
            outbox_rejected: Counter::default(),
            outbox_quarantined: Counter::default(),
            outbox_lost: Counter::default(),
            outbox_coarsened: Counter::default(),
            outbox_commits: Counter::default(),
            outbox_append_failures: Counter::default(),
            outbox_store_retries: Counter::default(),
            journal: JournalMetrics::default(),
            uplink_sent: Counter::default(),
            uplink_acked: Counter::default(),
            uplink_reconnects: Counter::default(),
            uplink_connected: Gauge::default(),
            uplink_inflight: Gauge::default(),
            uplink_breaker_open: Gauge::default(),
            uplink_breaker_probes_failed: Counter::default(),
            uplink_messages: Counter::default(),
            uplink_bytes: Counter::default(),
            uplink_failed_messages: Counter::default(),
            uplink_deadlettered: Counter::default(),
            deadletter_errors: Counter::default(),
            deadletter_evicted: Counter::default(),
            deadletter_resent: Counter::default(),
            deadletter_records: Gauge::default(),
            deadletter_bytes: Gauge::default(),
            health_sent: Counter::default(),
            model_info: Family::default(),
            model: Default::default(),
            decisions_published: Counter::default(),
            decisions_dropped: Counter::default(),
            ready: AtomicBool::new(false),
            config_reloads: Family::default(),
            fleet_refused: Family::default(),
            fleet_accepted: Family::default(),
            fleet_errors: Counter::default(),
            config: Default::default(),
            ready_tx: tokio::sync::watch::channel(false).0,
            inference_pass_since: AtomicU64::new(0),
            created: std::time::Instant::now(),
            started: AtomicU64::new(0),
            uplink_configured: AtomicBool::new(false),
            audit_entries: Counter::default(),
            audit_errors: Counter::default(),
            model_swaps: Counter::default(),
            model_refused: Counter::default(),
            model_rollbacks: Counter::default(),
            shadow_agreement: Gauge::default(),
            drift_psi: Family::default(),
            drift_alerts: Counter::default(),
            privacy_pseudonymized: Counter::default(),
            privacy_redactions: Counter::default(),
            privacy_suppressed: Family::default(),
            privacy_merged: Counter::default(),
            privacy_noised: Counter::default(),
            privacy_empty: Counter::default(),
            privacy_key_rotations: Counter::default(),
            privacy_key_errors: Counter::default(),
            audit_head: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("readings", "Readings accepted", m.readings.clone());
        registry.register(
            "rejected",
            "Readings refused, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "attrs_dropped",
            "Attributes dropped by the privacy allowlist",
            m.attrs_dropped.clone(),
        );
        registry.register("windows", "Windows produced", m.windows.clone());
        registry.register("inferences", "Windows inferred", m.inferences.clone());
        registry.register(
            "inference_batch_size",
            "Windows per inference batch",
            m.batch_size.clone(),
        );
        registry.register(
            "inference_latency_seconds",
            "Wall time per inference batch",
            m.inference_latency.clone(),
        );
        registry.register(
            "inference_cpu_microseconds",
            "CPU time spent in inference",
            m.inference_cpu_us.clone(),
        );
        registry.register(
            "inference_errors",
            "Inference batches that failed",
            m.inference_errors.clone(),
        );
        registry.register(
            "inference_device_fallbacks",
            "Times inference fell back from the GPU to the CPU",
            m.device_fallbacks.clone(),
        );
        registry.register(
            "inference_ready_seconds",
            "Seconds until the models were ready on their device (GPU: opened, uploaded, kernels compiled)",
            m.inference_ready_seconds.clone(),
        );
        registry.register("aggregates", "Aggregates produced", m.aggregates.clone());
        registry.register(
            "late_readings",
            "Readings after their window closed",
            m.late_readings.clone(),
        );
        registry.register(
            "sensors_evicted",
            "Sensors forgotten by windowing after idling (uncovered readings flushed as tails)",
            m.sensors_evicted.clone(),
        );
        registry.register(
            "groups_evicted",
            "Aggregation groups forgotten after idling (their windows closed first)",
            m.groups_evicted.clone(),
        );
        registry.register(
            "outbox_depth",
            "Records in the outbox",
            m.outbox_depth.clone(),
        );
        registry.register(
            "outbox_dropped",
            "Records dropped from a full outbox",
            m.outbox_dropped.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Bytes the outbox holds on disk",
            m.outbox_bytes.clone(),
        );
        registry.register(
            "source_errors",
            "Errors of polled sources (bus, device, protocol) per kind; every attempt counts",
            m.source_errors.clone(),
        );
        registry.register(
            "source_failed_reads",
            "Samples a polled source gave up after its retries",
            m.source_failed_reads.clone(),
        );
        registry.register(
            "source_overruns",
            "Sample slots a polled source missed because a read or the pipeline ran late",
            m.source_overruns.clone(),
        );
        registry.register(
            "outbox_stream_bytes",
            "Bytes the outbox holds on disk per stream (aggregate group)",
            m.outbox_stream_bytes.clone(),
        );
        registry.register(
            "outbox_rejected",
            "Aggregates refused by a full outbox (reject_new)",
            m.outbox_rejected.clone(),
        );
        registry.register(
            "outbox_quarantined",
            "Corrupt outbox spans moved to quarantine",
            m.outbox_quarantined.clone(),
        );
        registry.register(
            "outbox_lost",
            "Outbox records lost to corruption",
            m.outbox_lost.clone(),
        );
        registry.register(
            "outbox_coarsened",
            "Outbox records merged into coarser windows (policy coarsen)",
            m.outbox_coarsened.clone(),
        );
        registry.register(
            "outbox_commits",
            "Outbox group commits",
            m.outbox_commits.clone(),
        );
        registry.register(
            "outbox_append_failures",
            "Failed outbox appends (each an aggregate refused or lost) and commits",
            m.outbox_append_failures.clone(),
        );
        registry.register(
            "outbox_store_retries",
            "Outbox appends that failed on an I/O error; the aggregate is kept and tried again",
            m.outbox_store_retries.clone(),
        );
        m.journal.register(&mut registry);
        registry.register(
            "uplink_sent",
            "Aggregates published to the cloud",
            m.uplink_sent.clone(),
        );
        registry.register(
            "uplink_failed_messages",
            "Uplink messages unacknowledged when a connection was lost, or refused before sending",
            m.uplink_failed_messages.clone(),
        );
        registry.register(
            "uplink_deadlettered",
            "Records set aside in the dead-letter store after failing alone uplink.max_attempts times",
            m.uplink_deadlettered.clone(),
        );
        registry.register(
            "deadletter_errors",
            "Records the dead-letter store could not take (write failed, or larger than its bound)",
            m.deadletter_errors.clone(),
        );
        registry.register(
            "deadletter_evicted",
            "Dead-letter entries removed, oldest first, to stay within uplink.deadletter_max_bytes",
            m.deadletter_evicted.clone(),
        );
        registry.register(
            "deadletter_resent",
            "Dead-letter entries put back in the outbox (outpost deadletter resend)",
            m.deadletter_resent.clone(),
        );
        registry.register(
            "deadletter_records",
            "Entries held in the dead-letter store",
            m.deadletter_records.clone(),
        );
        registry.register(
            "deadletter_bytes",
            "Bytes held in the dead-letter store",
            m.deadletter_bytes.clone(),
        );
        registry.register(
            "uplink_acked",
            "Aggregates acknowledged by the cloud",
            m.uplink_acked.clone(),
        );
        registry.register(
            "uplink_reconnects",
            "Cloud connection attempts after the first",
            m.uplink_reconnects.clone(),
        );
        registry.register(
            "uplink_connected",
            "1 while connected to the cloud",
            m.uplink_connected.clone(),
        );
        registry.register(
            "uplink_inflight",
            "Publishes sent and not yet acknowledged",
            m.uplink_inflight.clone(),
        );
        registry.register(
            "uplink_breaker_open",
            "1 while the uplink circuit breaker is open",
            m.uplink_breaker_open.clone(),
        );
        registry.register(
            "uplink_breaker_probes_failed",
            "Probes of the open uplink circuit breaker that failed",
            m.uplink_breaker_probes_failed.clone(),
        );
        registry.register(
            "uplink_messages",
            "MQTT messages published to the cloud (a batch is one)",
            m.uplink_messages.clone(),
        );
        registry.register(
            "uplink_bytes",
            "Bytes of aggregate messages published to the cloud (topic and payload, after compression)",
            m.uplink_bytes.clone(),
        );
        registry.register(
            "health_messages",
            "Health messages published to the cloud",
            m.health_sent.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Seconds since the window end of the oldest aggregate waiting in the outbox (0: none waits)",
            m.outbox_oldest_age.clone(),
        );
        registry.register(
            "model",
            "The model serving the aggregates (value 1)",
            m.model_info.clone(),
        );
        registry.register(
            "decisions_published",
            "Decisions published on site",
            m.decisions_published.clone(),
        );
        registry.register(
            "decisions_dropped",
            "Decisions dropped",
            m.decisions_dropped.clone(),
        );
        registry.register(
            "audit_entries",
            "Audit log entries written",
            m.audit_entries.clone(),
        );
        registry.register(
            "audit_errors",
            "Audit log writes that failed",
            m.audit_errors.clone(),
        );
        registry.register(
            "model_swaps",
            "Changes of the running models",
            m.model_swaps.clone(),
        );
        registry.register(
            "model_refused",
            "Models refused (signature, checksum, incompatible input)",
            m.model_refused.clone(),
        );
        registry.register(
            "model_rollbacks",
            "Automatic model rollbacks",
            m.model_rollbacks.clone(),
        );
        registry.register(
            "shadow_agreement",
            "Agreement of the shadow model with the active one, latest aggregate",
            m.shadow_agreement.clone(),
        );
        registry.register(
            "drift_psi",
            "Population stability index against the training reference, latest aggregate",
            m.drift_psi.clone(),
        );
        registry.register(
            "fleet_refused",
            "Fleet documents and commands refused, by reason",
            m.fleet_refused.clone(),
        );
        registry.register(
            "fleet_accepted",
            "Fleet documents and commands accepted, by kind (desired, command)",
            m.fleet_accepted.clone(),
        );
        registry.register(
            "fleet_errors",
            "Fleet failures that are not refusals (trust memory not read or stored, keys unreadable)",
            m.fleet_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration changes asked for, by outcome (applied, unchanged, refused, rolled_back)",
            m.config_reloads.clone(),
        );
        registry.register(
            "drift_alerts",
            "Aggregates whose drift reached governance.drift_alert_psi",
            m.drift_alerts.clone(),
        );
        registry.register(
            "privacy_pseudonymized",
            "Identifiers replaced by keyed tokens",
            m.privacy_pseudonymized.clone(),
        );
        registry.register(
            "privacy_redactions",
            "Redactions in attribute values",
            m.privacy_redactions.clone(),
        );
        registry.register(
            "privacy_suppressed",
            "Aggregates withheld by the privacy policy, by reason",
            m.privacy_suppressed.clone(),
        );
        registry.register(
            "privacy_merged",
            "Aggregates merged into a coarser window to reach k",
            m.privacy_merged.clone(),
        );
        registry.register(
            "privacy_noised",
            "Aggregates released with Laplace noise",
            m.privacy_noised.clone(),
        );
        registry.register(
            "privacy_empty",
            "Empty aggregates made for declared groups without readings (differential privacy)",
            m.privacy_empty.clone(),
        );
        registry.register(
            "privacy_key_rotations",
            "Pseudonymization key changes picked up without restart",
            m.privacy_key_rotations.clone(),
        );
        registry.register(
            "privacy_key_errors",
            "Pseudonymization key files that could not be read",
            m.privacy_key_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Count an accepted reading.
    pub fn reading(&self, source: &str) {
        self.readings
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    /// Count an error of a polled source.
    pub fn source_error(&self, source: &str, kind: &str) {
        self.source_errors
            .get_or_create(&SourceErrorLabels {
                source: source.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Count a sample given up.
    pub fn source_failed_read(&self, source: &str) {
        self.source_failed_reads
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    /// Count missed sample slots.
    pub fn source_overruns(&self, source: &str, missed: u64) {
        self.source_overruns
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc_by(missed);
    }

    /// Count a refused reading.
    pub fn reject(&self, source: &str, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabels {
                source: source.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Rejections for a reason over all sources.
    pub fn rejected_total(&self, reason: &str) -> u64 {
        self.sum_series("outpost_rejected_total", &format!("reason=\"{reason}\""))
    }

    /// Rejections over all sources and reasons.
    pub fn rejected_all(&self) -> u64 {
        self.sum_series("outpost_rejected_total", "")
    }

    /// Readings accepted over all sources.
    pub fn readings_total(&self) -> u64 {
        self.sum_series("outpost_readings_total", "")
    }

    /// The sum of a counter family's series whose labels contain `needle`.
    /// A family has no iterator; sources are few, so sum what the encoder
    /// shows (status requests and health messages only, not a hot path).
    fn sum_series(&self, name: &str, needle: &str) -> u64 {
        let text = self.encode();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && l.contains(needle)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The model serving the aggregates: kept for the status and exported
    /// as `outpost_model{model,version,weights_sha256,device} 1`. An empty
    /// `device` keeps the one the inference thread last reported
    /// ([`Metrics::set_model_device`]; `cpu` before it reports).
    pub fn set_model(&self, model: &ModelStatus) {
        let mut current = self
            .model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut model = model.clone();
        if model.device.is_empty() {
            model.device = match current.device.as_str() {
                "" => "cpu".to_string(),
                d => d.to_string(),
            };
        }
        self.model_info.clear();
        self.model_info
            .get_or_create(&ModelLabels {
                model: model.name.clone(),
                version: model.version.clone(),
                weights_sha256: model.weights_sha256.clone(),
                device: model.device.clone(),
            })
            .set(1);
        *current = model;
    }

    /// The device the serving model runs on (`cpu`, `gpu`).
    pub fn set_model_device(&self, device: &str) {
        let mut model = self.model();
        model.device = device.to_string();
        self.set_model(&model);
    }

    /// The audit log's last committed entry (sequence number, hash).
    pub fn set_audit_head(&self, head: (u64, String)) {
        *self
            .audit_head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(head);
    }

    /// The configuration that runs: its sha256 and when it was applied.
    pub fn set_config(&self, sha256: &str, applied_ms: i64) {
        *self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((sha256.to_string(), applied_ms));
    }

    /// See [`Metrics::set_config`].
    pub fn config(&self) -> Option<(String, i64)> {
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Count a configuration change by its outcome.
    pub fn config_reload(&self, outcome: &str) {
        self.config_reloads
            .get_or_create(&KindLabels::of(outcome))
            .inc();
    }

    /// Follows readiness ([`Metrics::set_ready`]).
    pub fn ready_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// See [`Metrics::set_audit_head`].
    pub fn audit_head(&self) -> Option<(u64, String)> {
        self.audit_head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Record the shadow and drift figures of an aggregate: the shadow
    /// model's agreement, and the drift (input PSI, score PSI, alert).
    pub fn observe_quality(&self, shadow_agreement: Option<f64>, drift: Option<Drift>) {
        if let Some(a) = shadow_agreement {
            self.shadow_agreement.set(a);
        }
        if let Some(d) = drift {
            for (kind, psi) in [("input", d.input_psi), ("score", d.score_psi)] {
                self.drift_psi.get_or_create(&KindLabels::of(kind)).set(psi);
            }
            if d.alert {
                self.drift_alerts.inc();
            }
        }
    }

    /// The model set by [`Metrics::set_model`].
    pub fn model(&self) -> ModelStatus {
        self.model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Time since the pipeline became ready, on the monotonic clock (a
    /// wall-clock step does not change it); zero when it is not ready.
    pub fn uptime(&self) -> Duration {
        if !self.is_ready() {
            return Duration::ZERO;
        }
        let started = self.started.load(Ordering::SeqCst);
        Duration::from_millis((crate::clock::mono_ms().max(0) as u64).saturating_sub(started))
    }

    /// Record a batch.
    pub fn observe_batch(&self, windows: usize, wall: Duration, cpu: Duration) {
        self.inferences.inc_by(windows as u64);
        self.batch_size.observe(windows as f64);
        self.inference_latency.observe(wall.as_secs_f64());
        self.inference_cpu_us.inc_by(cpu.as_micros() as u64);
    }

    /// Mirror the outbox's counters (they only grow, so the difference is
    /// added). Called by one thread only (the outbox writer).
    pub fn observe_outbox(&self, s: &OutboxCounts) {
        self.outbox_depth.set(s.depth as i64);
        self.outbox_bytes.set(s.bytes as i64);
        for (c, v) in [
            (&self.outbox_dropped, s.dropped),
            (&self.outbox_rejected, s.rejected),
            (&self.outbox_quarantined, s.quarantined),
            (&self.outbox_lost, s.lost),
            (&self.outbox_coarsened, s.coarsened),
        ] {
            c.inc_by(v.saturating_sub(c.get()));
        }
    }

    /// Per-stream outbox bytes (writer thread only, like `observe_outbox`).
    /// A stream that is gone reads 0 once, so a scrape can see it drained,
    /// and is then forgotten.
    pub fn observe_streams(&self, streams: &[(String, u64)]) {
        let mut seen = self
            .streams_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: std::collections::BTreeSet<&str> =
            streams.iter().map(|(s, _)| s.as_str()).collect();
        // A stream gone reads 0 for one observation, then its series goes:
        // with sensor ids that keep changing (a stream per group), gone
        // streams would otherwise pile up in memory and in every scrape.
        seen.retain(|stream| {
            if held.contains(stream.as_str()) {
                return true;
            }
            let labels = StreamLabels {
                stream: stream.clone(),
            };
            let gauge = self.outbox_stream_bytes.get_or_create(&labels);
            if gauge.get() == 0 {
                drop(gauge);
                self.outbox_stream_bytes.remove(&labels);
                false
            } else {
                gauge.set(0);
                true
            }
        });
        for (stream, bytes) in streams {
            self.outbox_stream_bytes
                .get_or_create(&StreamLabels {
                    stream: stream.clone(),
                })
                .set(*bytes as i64);
            seen.insert(stream.clone());
        }
    }

    /// Run one forward pass of the inference thread, on record: the
    /// watchdog sees a pass that does not return ([`Metrics::inference_stuck_for`]).
    pub fn inference_pass<T>(&self, pass: impl FnOnce() -> T) -> T {
        let since = self.created.elapsed().as_millis() as u64 + 1;
        self.inference_pass_since.store(since, Ordering::SeqCst);
        let r = pass();
        self.inference_pass_since.store(0, Ordering::SeqCst);
        r
    }

    /// How long the inference pass under way has run; `None` when none runs.
    pub fn inference_stuck_for(&self) -> Option<std::time::Duration> {
        match self.inference_pass_since.load(Ordering::SeqCst) {
            0 => None,
            since => Some(
                self.created
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(since - 1)),
            ),
        }
    }

    /// Mark the runtime ready (model loaded, stages running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.ready_tx.send_replace(ready);
        if ready {
            self.started
                .store(crate::clock::mono_ms().max(0) as u64, Ordering::SeqCst);
        }
    }

    /// Whether the runtime is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Log a summary line every `every` seconds (`metrics.log_interval_s`; 0:
/// none) until `stop`; `outbox_depth` reads the outbox's depth.
pub fn spawn_summary(
    every: u64,
    metrics: std::sync::Arc<Metrics>,
    outbox_depth: impl Fn() -> u64 + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if every == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(every));
        t.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = t.tick() => {}
            }
            let depth = outbox_depth();
            tracing::info!(
                windows = metrics.windows.get(),
                inferences = metrics.inferences.get(),
                aggregates = metrics.aggregates.get(),
                outbox_depth = depth,
                acked = metrics.uplink_acked.get(),
                "summary"
            );
        }
    }))
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is valid on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Resident memory of a process in KiB, from Linux's `/proc/<pid>/status`
/// (`"self"` for this one); `None` where it cannot be read.
pub fn rss_kib(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 (8): a stream per group, and groups that keep changing; a
    /// gone stream reads 0 once, then its series goes.
    #[test]
    fn gone_streams_read_zero_once_then_go() {
        let m = Metrics::new();
        let series = |m: &Metrics| {
            m.encode()
                .lines()
                .filter(|l| l.starts_with("outpost_outbox_stream_bytes{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        m.observe_streams(&[("a".into(), 5), ("b".into(), 3)]);
        assert_eq!(series(&m).len(), 2);
        m.observe_streams(&[("a".into(), 5)]);
        assert!(series(&m).contains(&"outpost_outbox_stream_bytes{stream=\"b\"} 0".to_string()));
        m.observe_streams(&[("a".into(), 5)]);
        assert_eq!(
            series(&m),
            vec!["outpost_outbox_stream_bytes{stream=\"a\"} 5".to_string()]
        );
        for k in 0..1000 {
            m.observe_streams(&[(format!("s{k}"), 1)]);
        }
        m.observe_streams(&[]);
        m.observe_streams(&[]);
        assert!(series(&m).is_empty());
    }
}
