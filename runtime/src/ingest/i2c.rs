//! The I2C source: an ADXL345 accelerometer ([`outpost_adxl345`]) read at a
//! fixed rate on a Linux I2C bus (`/dev/i2c-N` through `linux-embedded-hal`).
//!
//! Each sample is one reading with three values (X, Y, Z in g), timestamped
//! when it is read. Bus errors (NACK, arbitration loss ...) are retried up to
//! `retries` times and counted per kind (`outpost_source_errors_total`); a
//! sample that still fails is counted in `outpost_source_failed_reads_total`;
//! slots missed because a read or the pipeline ran late are counted in
//! `outpost_source_overruns_total`. The loop is generic over
//! [`embedded_hal::i2c::I2c`] and runs on its own thread (I2C is blocking).

use std::sync::Arc;
use std::time::{Duration, Instant};

use embedded_hal::i2c::{Error as _, ErrorKind, I2c};
use outpost_adxl345::{Adxl345, DataRate, Error as DevError, Range};
use tokio_util::sync::CancellationToken;

use super::pacer::Pacer;
use super::{IngestCtx, IngestError};
use crate::check::Collector;
use crate::clock::now_ms;
use crate::ingest::reading::Reading;
use serde::Deserialize;
use std::path::PathBuf;

/// `type = "i2c"`: an ADXL345 on `/dev/i2c-N`; one reading of X, Y, Z in g
/// per sample.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct I2cSourceConfig {
    /// Source name.
    pub name: String,
    /// The bus device.
    pub bus: PathBuf,
    /// 7-bit device address: 0x53 (ALT ADDRESS low) or 0x1D (high).
    pub address: u8,
    /// Samples per second (the device's data rate is set to the next one up,
    /// 6.25 to 3200 Hz).
    pub rate_hz: f64,
    /// Range in g: 2, 4, 8 or 16 (full resolution, 3.9 mg per LSB).
    pub range_g: u8,
    /// Sensor id of the readings; default: the source name.
    pub sensor: Option<String>,
    /// Retries of a failed bus transaction before the sample is given up.
    pub retries: u32,
}

impl Default for I2cSourceConfig {
    fn default() -> Self {
        Self {
            name: "i2c".into(),
            bus: PathBuf::from("/dev/i2c-1"),
            address: 0x53,
            rate_hz: 100.0,
            range_g: 4,
            sensor: None,
            retries: 2,
        }
    }
}

impl I2cSourceConfig {
    /// Check this source's table.
    pub fn check(&self, c: &mut Collector) {
        if !(self.rate_hz > 0.0 && self.rate_hz <= 3200.0) {
            c.push("rate_hz", "must be in (0, 3200] (the ADXL345's rates)");
        }
        if ![2, 4, 8, 16].contains(&self.range_g) {
            c.push("range_g", "must be 2, 4, 8 or 16");
        }
        if self.address > 0x7f {
            c.push(
                "address",
                "must be a 7-bit address (0x53 or 0x1d for an ADXL345)",
            );
        }
    }
}

/// The metric label of a driver error.
pub fn error_kind<E: embedded_hal::i2c::Error>(e: &DevError<E>) -> &'static str {
    match e {
        DevError::I2c(e) => match e.kind() {
            ErrorKind::NoAcknowledge(_) => "nack",
            ErrorKind::ArbitrationLoss => "arbitration_loss",
            ErrorKind::Bus => "bus",
            ErrorKind::Overrun => "overrun",
            _ => "other",
        },
        DevError::WrongDevice(_) => "wrong_device",
    }
}

/// One sample, retrying bus errors up to `retries` times; `on_error` sees
/// every error's kind.
pub fn sample<I: I2c>(
    dev: &mut Adxl345<I>,
    retries: u32,
    mut on_error: impl FnMut(&'static str),
) -> Option<[f32; 3]> {
    for _ in 0..=retries {
        match dev.read_g() {
            Ok(v) => return Some(v),
            Err(e) => on_error(error_kind(&e)),
        }
    }
    None
}

/// Initialize the device, retrying bus errors like a sample.
fn init<I: I2c>(
    dev: &mut Adxl345<I>,
    cfg: &I2cSourceConfig,
    ctx: &IngestCtx,
) -> Result<(), IngestError> {
    let range = Range::from_g(cfg.range_g).unwrap_or(Range::G4);
    let rate = DataRate::at_least(cfg.rate_hz as f32)
        .unwrap_or(DataRate::at_least(3200.0).expect("3200 Hz is the ADXL345's top rate"));
    let mut last = String::new();
    for _ in 0..=cfg.retries {
        match dev.init(range, rate) {
            Ok(()) => return Ok(()),
            Err(e) => {
                ctx.metrics.source_error(&ctx.name, error_kind(&e));
                last = match e {
                    DevError::WrongDevice(id) => {
                        format!(
                            "device id 0x{id:02x} at 0x{:02x}: not an ADXL345",
                            cfg.address
                        )
                    }
                    DevError::I2c(e) => format!("{:?}", e.kind()),
                };
            }
        }
    }
    Err(IngestError::Io {
        source_name: ctx.name.clone(),
        message: format!(
            "ADXL345 on {} at 0x{:02x}: {last}",
            cfg.bus.display(),
            cfg.address
        ),
    })
}

/// Sample at `cfg.rate_hz` until `shutdown`, the pipeline is gone, or
/// `max_samples` samples were taken (tests; slots missed under load do not
/// count, so a test's bus transcript does not depend on the machine's load).
pub fn poll<I: I2c>(
    dev: &mut Adxl345<I>,
    cfg: &I2cSourceConfig,
    ctx: &IngestCtx,
    shutdown: &CancellationToken,
    max_samples: Option<u64>,
) {
    let sensor: Arc<str> = Arc::from(cfg.sensor.as_deref().unwrap_or(&cfg.name));
    let mut pacer = Pacer::new(Duration::from_secs_f64(1.0 / cfg.rate_hz), Instant::now());
    let mut taken = 0u64;
    while !shutdown.is_cancelled() && max_samples.is_none_or(|m| taken < m) {
        // Sleep to the slot in steps, so that a shutdown is seen promptly.
        loop {
            let now = Instant::now();
            if now >= pacer.due() || shutdown.is_cancelled() {
                break;
            }
            std::thread::sleep((pacer.due() - now).min(Duration::from_millis(100)));
        }
        let ts = now_ms();
        match sample(dev, cfg.retries, |k| ctx.metrics.source_error(&ctx.name, k)) {
            Some(v) => {
                let r = Reading {
                    sensor: sensor.clone(),
                    ts_ms: ts,
                    values: v.to_vec(),
                    attrs: Default::default(),
                    seq: 0,
                    ack: None,
                };
                match ctx.validator.check(r, ts) {
                    Ok(r) => {
                        // A full pipeline blocks here; the slots it costs are overruns.
                        if ctx.tx.send(r).is_err() {
                            return;
                        }
                        ctx.metrics.reading(&ctx.name);
                    }
                    Err(rej) => ctx.reject(&rej),
                }
            }
            None => ctx.metrics.source_failed_read(&ctx.name),
        }
        taken += 1;
        let missed = pacer.advance(Instant::now());
        if missed > 0 {
            ctx.metrics.source_overruns(&ctx.name, missed);
        }
    }
}

/// Open the bus, initialize the device and sample until shutdown, on a
/// blocking thread.
pub async fn run(
    cfg: I2cSourceConfig,
    ctx: IngestCtx,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let name = ctx.name.clone();
    let bus = match linux_embedded_hal::I2cdev::new(&cfg.bus) {
        Ok(bus) => bus,
        Err(e) => {
            return Err(IngestError::Io {
                source_name: name,
                message: format!("{}: {e}", cfg.bus.display()),
            });
        }
    };
    run_on_bus(bus, cfg, ctx, shutdown).await
}

/// [`run`] on a bus given by the caller (the source contract test passes a
/// simulated device).
pub async fn run_on_bus<B: I2c + Send + 'static>(
    bus: B,
    cfg: I2cSourceConfig,
    ctx: IngestCtx,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let name = ctx.name.clone();
    tokio::task::spawn_blocking(move || {
        let mut dev = Adxl345::new(bus, cfg.address);
        init(&mut dev, &cfg, &ctx)?;
        tracing::info!(source = %ctx.name, bus = %cfg.bus.display(), address = cfg.address, rate_hz = cfg.rate_hz, "ADXL345 sampling");
        poll(&mut dev, &cfg, &ctx, &shutdown, None);
        Ok(())
    })
    .await
    .map_err(|e| IngestError::Io {
        source_name: name,
        message: format!("sampling thread: {e}"),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::reading::Validator;
    use crate::metrics::Metrics;
    use embedded_hal::i2c::NoAcknowledgeSource;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use outpost_adxl345::{ADDRESS_LOW, reg};

    fn validator() -> Validator {
        Validator {
            channels: 3,
            max_payload_bytes: 1 << 16,
            max_future_ms: 60_000,
            sensors: Vec::new(),
        }
    }

    fn read(bytes: [u8; 6]) -> T {
        T::write_read(ADDRESS_LOW, vec![reg::DATAX0], bytes.to_vec())
    }

    fn nack() -> T {
        read([0; 6]).with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data))
    }

    #[test]
    fn bus_errors_are_retried_and_counted_and_samples_are_timestamped() {
        let mut i2c = Mock::new(&[
            read([0x00, 0x01, 0, 0, 0, 0]),
            // Two NACKs, then the sample.
            nack(),
            nack(),
            read([0x00, 0x02, 0, 0, 0, 0]),
            // Arbitration lost on every try: the sample is given up.
            read([0; 6]).with_error(ErrorKind::ArbitrationLoss),
            read([0; 6]).with_error(ErrorKind::ArbitrationLoss),
            read([0; 6]).with_error(ErrorKind::ArbitrationLoss),
            read([0x00, 0xFF, 0, 0, 0, 0]),
        ]);
        let mut dev = Adxl345::new(i2c.clone(), ADDRESS_LOW);
        let (tx, rx) = flume::bounded(16);
        let metrics = Arc::new(Metrics::new());
        let ctx = IngestCtx::new("acc", Arc::new(validator()), tx, metrics.clone());
        let cfg = I2cSourceConfig {
            rate_hz: 500.0,
            retries: 2,
            ..Default::default()
        };
        poll(&mut dev, &cfg, &ctx, &CancellationToken::new(), Some(4));
        i2c.done();
        let got: Vec<Reading> = rx.drain().collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!((got[0].values[0] - 256.0 * 0.0039).abs() < 1e-6);
        assert!((got[1].values[0] - 512.0 * 0.0039).abs() < 1e-6);
        assert!((got[2].values[0] + 256.0 * 0.0039).abs() < 1e-6);
        assert!(got.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
        assert_eq!(&*got[0].sensor, "i2c");
        let text = metrics.encode();
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(line("kind=\"nack\""), "2");
        assert_eq!(line("kind=\"arbitration_loss\""), "3");
        assert_eq!(
            line("outpost_source_failed_reads_total{source=\"acc\"}"),
            "1"
        );
    }

    #[test]
    fn init_failure_names_the_device() {
        let mut i2c = Mock::new(&[T::write_read(ADDRESS_LOW, vec![reg::DEVID], vec![0x42])]);
        let mut dev = Adxl345::new(i2c.clone(), ADDRESS_LOW);
        let (tx, _rx) = flume::bounded(1);
        let ctx = IngestCtx::new("acc", Arc::new(validator()), tx, Arc::new(Metrics::new()));
        let cfg = I2cSourceConfig {
            retries: 0,
            ..Default::default()
        };
        let e = init(&mut dev, &cfg, &ctx).unwrap_err().to_string();
        assert!(e.contains("0x42") && e.contains("not an ADXL345"), "{e}");
        i2c.done();
    }
}
