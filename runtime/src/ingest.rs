//! Ingest: sources of readings, run concurrently, each validating what it
//! reads with the shared [`Validator`]: simulated, file, MQTT, an I2C
//! accelerometer and Modbus devices (the last two polled at a fixed rate,
//! [`pacer`]).
//!
//! Output: validated [`Reading`]s into one bounded channel. When the channel
//! is full, sources wait: the simulated and file sources slow down, the MQTT
//! source stops reading its broker connection (so the broker queues, QoS 1).
//! Refused readings are counted per source and reason and logged at most once
//! per reason every ten seconds per source.

pub mod ack;
mod config;
pub mod file;
pub mod i2c;
pub mod modbus;
pub mod mqtt;
pub mod pacer;
pub mod reading;
mod set;
pub mod simulated;

pub use config::{IngestConfig, SourceConfig};
pub use set::{SourceChanges, SourceSet};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::ingest::reading::{Reading, RejectReason, Rejection, Validator};
use crate::metrics::Metrics;

/// Errors of a source.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A file could not be opened or read.
    #[error("{source_name}: {message}")]
    Io {
        /// Source name.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// The MQTT connection could not be set up.
    #[error("{source_name}: {error}")]
    Mqtt {
        /// Source name.
        source_name: String,
        /// The cause.
        error: crate::mqtt::MqttSetupError,
    },
}

/// What every source needs: the validator, the output channel, metrics.
#[derive(Clone)]
pub struct IngestCtx {
    /// Source name.
    pub name: String,
    /// The shared checks.
    pub validator: Arc<Validator>,
    /// Output.
    pub tx: flume::Sender<Reading>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    limiter: Arc<std::sync::Mutex<LogLimiter>>,
    /// Messages whose readings the journal holds ([`ack::RecentKeys`]);
    /// `None` without a journal.
    pub recent: Option<Arc<ack::RecentKeys>>,
}

/// At most one log line per reason per interval, with the count suppressed.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: HashMap<RejectReason, (Instant, u64)>,
}

impl LogLimiter {
    /// A limiter with `interval` between lines of the same reason.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    /// Whether to log now, and how many were suppressed since the last line.
    pub fn allow(&mut self, reason: RejectReason, now: Instant) -> Option<u64> {
        match self.last.get_mut(&reason) {
            Some((t, suppressed)) if now.duration_since(*t) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((t, suppressed)) => {
                let n = *suppressed;
                *t = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                self.last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

impl IngestCtx {
    /// A context for source `name`.
    pub fn new(
        name: &str,
        validator: Arc<Validator>,
        tx: flume::Sender<Reading>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name: name.to_string(),
            validator,
            tx,
            metrics,
            limiter: Arc::new(std::sync::Mutex::new(LogLimiter::new(Duration::from_secs(
                10,
            )))),
            recent: None,
        }
    }

    /// See [`IngestCtx::recent`].
    pub fn with_recent(mut self, recent: Option<Arc<ack::RecentKeys>>) -> Self {
        self.recent = recent;
        self
    }

    /// Count and (rate-limited) log a refused reading.
    pub fn reject(&self, r: &Rejection) {
        self.metrics.reject(&self.name, r.reason.as_str());
        let allow = self
            .limiter
            .lock()
            .map(|mut l| l.allow(r.reason, Instant::now()))
            .unwrap_or(None);
        if let Some(suppressed) = allow {
            tracing::warn!(source = %self.name, reason = %r.reason, suppressed, "reading refused: {}", r.detail);
        }
    }

    /// Forward decoded readings; `false` when the pipeline is gone.
    pub async fn deliver(&self, results: Vec<Result<Reading, Rejection>>) -> bool {
        self.deliver_acked(results, None).await
    }

    /// [`IngestCtx::deliver`], with the acknowledgement owed for the
    /// message the readings came in: it goes out once every reading of it is
    /// journaled (or taken by the windows, without a journal), or at once
    /// when none was accepted.
    pub async fn deliver_acked(
        &self,
        results: Vec<Result<Reading, Rejection>>,
        ack: Option<ack::Ack>,
    ) -> bool {
        for r in results {
            match r {
                Ok(mut reading) => {
                    reading.ack = ack.clone();
                    if self.tx.send_async(reading).await.is_err() {
                        return false;
                    }
                    self.metrics.reading(&self.name);
                }
                Err(rej) => self.reject(&rej),
            }
        }
        true
    }
}

/// Run one configured source until it ends or `shutdown` fires.
pub async fn run_source(
    cfg: SourceConfig,
    ctx: IngestCtx,
    gateway: String,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    match cfg {
        SourceConfig::Simulated(c) => {
            simulated::run(c, ctx, shutdown).await;
            Ok(())
        }
        SourceConfig::File(c) => file::run(c, ctx, shutdown).await,
        SourceConfig::Mqtt(c) => mqtt::run(*c, ctx, &gateway, shutdown).await,
        SourceConfig::I2c(c) => i2c::run(c, ctx, shutdown).await,
        SourceConfig::Modbus(c) => modbus::run(*c, ctx, shutdown).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_suppresses_within_interval() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow(RejectReason::Malformed, t0), Some(0));
        assert_eq!(
            l.allow(RejectReason::Malformed, t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            l.allow(RejectReason::NonFinite, t0 + Duration::from_secs(1)),
            Some(0)
        );
        assert_eq!(
            l.allow(RejectReason::Malformed, t0 + Duration::from_secs(11)),
            Some(1)
        );
    }
}
