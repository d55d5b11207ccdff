//! The gateway's state in one typed snapshot. The same type is served at
//! `/status` on the metrics endpoint (read by `outpost status`) and sent to
//! the cloud as the periodic health message, so an operator sees the same
//! numbers on the gateway and in the cloud.
//!
//! It carries counters and model identity only: no reading, no attribute,
//! no sensor or group name, so it is safe to send off the site.

use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, ModelStatus};

/// [`Status::kind`] of a health message.
pub const HEALTH_KIND: &str = "health";

/// Layout version of [`Status`].
pub const STATUS_SCHEMA: u32 = 1;

/// Where the gateway is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayState {
    /// Model loaded, stages running.
    Running,
    /// Starting, or draining after a stop was requested.
    NotReady,
    /// Sent by the broker for the gateway when its connection ended without
    /// a clean disconnect (the MQTT last will).
    Offline,
}

/// The durable outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutboxStatus {
    /// Aggregates waiting for the cloud.
    pub depth: u64,
    /// Bytes they take on disk.
    pub bytes: u64,
    /// Seconds since the end of the oldest waiting aggregate's window;
    /// absent when nothing waits.
    pub oldest_age_s: Option<f64>,
    /// Dropped by a full outbox since start.
    pub dropped: u64,
    /// Refused by a full outbox (`reject_new`) since start.
    pub rejected: u64,
    /// Lost to corruption since start.
    pub lost: u64,
}

/// The cloud connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UplinkStatus {
    /// A cloud broker is configured; without one, aggregates are logged.
    pub configured: bool,
    /// Connected to the cloud broker now.
    pub connected: bool,
    /// The circuit breaker is open (repeated failed connections).
    pub breaker_open: bool,
    /// Publishes awaiting their PUBACK.
    pub inflight: u64,
    /// Aggregates acknowledged by the cloud since start.
    pub acked: u64,
    /// Reconnections since start.
    pub reconnects: u64,
    /// Bytes of aggregate messages (topic and payload) sent since start.
    pub bytes: u64,
}

/// A snapshot of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Always [`HEALTH_KIND`]: tells a cloud consumer reading one topic
    /// tree a health message from an aggregate.
    pub kind: String,
    /// [`STATUS_SCHEMA`].
    pub schema: u32,
    /// Gateway id.
    pub gateway: String,
    /// Life cycle.
    pub state: GatewayState,
    /// Outpost version.
    pub version: String,
    /// When the snapshot was taken, ms since the epoch.
    pub time_ms: i64,
    /// Seconds since the pipeline became ready (0 before).
    pub uptime_s: u64,
    /// The model.
    pub model: ModelStatus,
    /// Readings accepted since start.
    pub readings: u64,
    /// Readings refused since start (every reason).
    pub rejected: u64,
    /// Windows inferred since start.
    pub inferences: u64,
    /// Inference batches that failed since start.
    pub inference_errors: u64,
    /// Aggregates produced since start.
    pub aggregates: u64,
    /// Mean CPU time per inferred window, microseconds.
    pub cpu_us_per_inference: Option<f64>,
    /// Mean uplink bytes per inferred window (the cost of a decision on the
    /// link).
    pub uplink_bytes_per_inference: Option<f64>,
    /// Resident memory, KiB.
    pub rss_kib: Option<u64>,
    /// The outbox.
    pub outbox: OutboxStatus,
    /// The cloud connection.
    pub uplink: UplinkStatus,
    /// The audit log's last committed entry: kept in the cloud, it anchors
    /// the local log (a rewritten log no longer reaches this hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_head: Option<AuditHead>,
    /// The counts that describe the data (readings, rejects, inferences and
    /// what derives from them) are zeroed: the privacy policy can withhold
    /// aggregates (k-anonymity or differential privacy is on), and exact
    /// running totals would undo the noise of the aggregates, or, minus what
    /// was released, give the counts of the suppressed groups. What remains
    /// counts only what was released (`aggregates`, the outbox, the uplink).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counts_withheld: bool,
    /// The configuration that runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigStatus>,
}

/// The configuration that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigStatus {
    /// sha256 of the configuration file's text (`embedded` for the
    /// embedded default).
    pub sha256: String,
    /// When it was applied, ms since the epoch.
    pub applied_ms: i64,
}

/// Sequence number and hash of an audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// Sequence number.
    pub seq: u64,
    /// SHA-256 of the entry, hex.
    pub sha256: String,
}

impl Status {
    /// A snapshot of `metrics` for `gateway`, at `now_ms`.
    pub fn snapshot(metrics: &Metrics, gateway: &str, now_ms: i64) -> Self {
        let inferences = metrics.inferences.get();
        let per = |v: u64| (inferences > 0).then(|| v as f64 / inferences as f64);
        let age = metrics.outbox_oldest_age.get();
        Self {
            kind: HEALTH_KIND.into(),
            schema: STATUS_SCHEMA,
            gateway: gateway.into(),
            state: if metrics.is_ready() {
                GatewayState::Running
            } else {
                GatewayState::NotReady
            },
            version: env!("CARGO_PKG_VERSION").into(),
            time_ms: now_ms,
            uptime_s: metrics.uptime().as_secs(),
            model: metrics.model(),
            readings: metrics.readings_total(),
            rejected: metrics.rejected_all(),
            inferences,
            inference_errors: metrics.inference_errors.get(),
            aggregates: metrics.aggregates.get(),
            cpu_us_per_inference: per(metrics.inference_cpu_us.get()),
            uplink_bytes_per_inference: per(metrics.uplink_bytes.get()),
            rss_kib: crate::metrics::rss_kib("self"),
            outbox: OutboxStatus {
                depth: metrics.outbox_depth.get().max(0) as u64,
                bytes: metrics.outbox_bytes.get().max(0) as u64,
                oldest_age_s: (metrics.outbox_depth.get() > 0 && age >= 0.0).then_some(age),
                dropped: metrics.outbox_dropped.get(),
                rejected: metrics.outbox_rejected.get(),
                lost: metrics.outbox_lost.get(),
            },
            uplink: UplinkStatus {
                configured: metrics
                    .uplink_configured
                    .load(std::sync::atomic::Ordering::Relaxed),
                connected: metrics.uplink_connected.get() == 1,
                breaker_open: metrics.uplink_breaker_open.get() == 1,
                inflight: metrics.uplink_inflight.get().max(0) as u64,
                acked: metrics.uplink_acked.get(),
                reconnects: metrics.uplink_reconnects.get(),
                bytes: metrics.uplink_bytes.get(),
            },
            audit_head: metrics
                .audit_head()
                .map(|(seq, sha256)| AuditHead { seq, sha256 }),
            counts_withheld: false,
            config: metrics
                .config()
                .map(|(sha256, applied_ms)| ConfigStatus { sha256, applied_ms }),
        }
    }

    /// This status with the data counts zeroed (see
    /// [`Status::counts_withheld`]): what the cloud gets when the privacy
    /// policy can withhold aggregates or adds noise to them.
    pub fn withhold_counts(mut self) -> Self {
        self.readings = 0;
        self.rejected = 0;
        self.inferences = 0;
        self.inference_errors = 0;
        self.cpu_us_per_inference = None;
        self.uplink_bytes_per_inference = None;
        self.counts_withheld = true;
        self
    }

    /// A human summary, a few lines (`outpost status`).
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let state = match self.state {
            GatewayState::Running => "running",
            GatewayState::NotReady => "not ready (starting or draining)",
            GatewayState::Offline => "offline",
        };
        let _ = writeln!(
            s,
            "gateway {}: {state}, up {}, outpost {}",
            self.gateway,
            duration(self.uptime_s as f64),
            self.version
        );
        let _ = writeln!(
            s,
            "model   {}@{} on {} (weights sha256 {})",
            self.model.name,
            self.model.version,
            self.model.device,
            short(&self.model.weights_sha256)
        );
        let _ = writeln!(
            s,
            "ingest  {} readings, {} rejected",
            self.readings, self.rejected
        );
        let cost = self
            .cpu_us_per_inference
            .map(|c| format!(", {c:.0} µs CPU per window"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "infer   {} windows, {} failed batches{cost}; {} aggregates",
            self.inferences, self.inference_errors, self.aggregates
        );
        let age = self
            .outbox
            .oldest_age_s
            .map(|a| format!(", oldest {}", duration(a)))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "outbox  {} waiting ({}){age}; dropped {}, refused {}, lost {}",
            self.outbox.depth,
            bytes(self.outbox.bytes),
            self.outbox.dropped,
            self.outbox.rejected,
            self.outbox.lost
        );
        if self.uplink.configured {
            let link = match (self.uplink.connected, self.uplink.breaker_open) {
                (true, _) => "connected",
                (false, true) => "disconnected, circuit breaker open",
                (false, false) => "disconnected",
            };
            let per = self
                .uplink_bytes_per_inference
                .map(|b| format!(", {b:.1} B per window"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "uplink  {link}; {} acked, {} in flight, {} reconnects, {} sent{per}",
                self.uplink.acked,
                self.uplink.inflight,
                self.uplink.reconnects,
                bytes(self.uplink.bytes)
            );
        } else {
            let _ = writeln!(
                s,
                "uplink  none configured: {} aggregates logged",
                self.uplink.acked
            );
        }
        if let Some(kib) = self.rss_kib {
            let _ = writeln!(s, "memory  {} resident", bytes(kib * 1024));
        }
        if let Some(c) = &self.config {
            let _ = writeln!(
                s,
                "config  sha256 {}, applied {} ago",
                short(&c.sha256),
                duration((self.time_ms - c.applied_ms).max(0) as f64 / 1000.0)
            );
        }
        s
    }
}

/// The last will the broker publishes for a gateway that vanished.
pub fn offline_message(gateway: &str) -> Vec<u8> {
    serde_json::json!({
        "kind": HEALTH_KIND,
        "schema": STATUS_SCHEMA,
        "gateway": gateway,
        "state": GatewayState::Offline,
    })
    .to_string()
    .into_bytes()
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn duration(s: f64) -> String {
    let s = s.max(0.0);
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86_400.0)
    }
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_the_metrics_and_round_trips() {
        let m = Metrics::new();
        m.set_model(&ModelStatus {
            name: "fcn".into(),
            version: "1.2.0".into(),
            weights_sha256: "ab".repeat(32),
            device: "cpu".into(),
        });
        m.reading("s");
        m.reading("s");
        m.reject("s", "malformed");
        m.observe_batch(
            4,
            std::time::Duration::from_millis(2),
            std::time::Duration::from_micros(400),
        );
        m.uplink_bytes.inc_by(1000);
        m.outbox_depth.set(3);
        m.outbox_oldest_age.set(90.0);
        m.uplink_configured
            .store(true, std::sync::atomic::Ordering::Relaxed);
        m.set_ready(true);
        let s = Status::snapshot(&m, "gw-1", crate::clock::now_ms());
        assert_eq!(s.state, GatewayState::Running);
        assert_eq!((s.readings, s.rejected, s.inferences), (2, 1, 4));
        assert_eq!(s.cpu_us_per_inference, Some(100.0));
        assert_eq!(s.uplink_bytes_per_inference, Some(250.0));
        assert_eq!(s.outbox.oldest_age_s, Some(90.0));
        assert_eq!(s.model.version, "1.2.0");
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let h = s.human();
        assert!(h.contains("gateway gw-1: running"), "{h}");
        assert!(
            h.contains("model   fcn@1.2.0 on cpu (weights sha256 abababababab)"),
            "{h}"
        );
        assert!(h.contains("outbox  3 waiting (0 B), oldest 90 s"), "{h}");
        assert!(h.contains("250.0 B per window"), "{h}");
    }

    #[test]
    fn withheld_counts_are_zero_and_marked() {
        let m = Metrics::new();
        m.inferences.inc_by(40);
        m.inference_cpu_us.inc_by(4000);
        let s = Status::snapshot(&m, "gw", 0).withhold_counts();
        assert_eq!((s.inferences, s.cpu_us_per_inference), (0, None));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"counts_withheld\":true"), "{json}");
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn nothing_waiting_has_no_age_and_the_will_says_offline() {
        let m = Metrics::new();
        m.outbox_oldest_age.set(12.0);
        let s = Status::snapshot(&m, "gw", 0);
        assert_eq!(s.outbox.oldest_age_s, None);
        assert_eq!(s.cpu_us_per_inference, None);
        assert!(
            s.human()
                .contains("uplink  none configured: 0 aggregates logged")
        );
        let will: serde_json::Value = serde_json::from_slice(&offline_message("gw")).unwrap();
        assert_eq!(will["state"], "offline");
        assert_eq!(will["kind"], "health");
    }
}
