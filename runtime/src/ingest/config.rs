//! The ingest stage's configuration: `[ingest]` (validation, the channel to
//! the next stage) and `[[sources]]`, one table per source, each kind's
//! settings beside its code.

use serde::Deserialize;

use super::file::FileSourceConfig;
use super::i2c::I2cSourceConfig;
use super::modbus::ModbusSourceConfig;
use super::mqtt::MqttSourceConfig;
use super::simulated::SimulatedSourceConfig;
use crate::check::Collector;

/// A source of readings: `[[sources]]` with a `type`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Subscribe to the site's MQTT broker.
    Mqtt(Box<MqttSourceConfig>),
    /// Read JSON Lines or CSV from a file or stdin.
    File(FileSourceConfig),
    /// Built-in accelerometer/vibration generator with injected faults.
    Simulated(SimulatedSourceConfig),
    /// An ADXL345 accelerometer on a Linux I2C bus.
    I2c(I2cSourceConfig),
    /// Registers of a Modbus TCP or RTU device, polled.
    Modbus(Box<ModbusSourceConfig>),
}

impl SourceConfig {
    /// The source's name, used in metrics and logs.
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Mqtt(c) => &c.name,
            SourceConfig::File(c) => &c.name,
            SourceConfig::Simulated(c) => &c.name,
            SourceConfig::I2c(c) => &c.name,
            SourceConfig::Modbus(c) => &c.name,
        }
    }
}

/// `[ingest]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest accepted payload in bytes.
    pub max_payload_bytes: usize,
    /// Readings timestamped further than this in the future are rejected.
    pub max_future_ms: i64,
    /// Known sensors; when non-empty, any other sensor is rejected as unknown.
    pub sensors: Vec<String>,
    /// Capacity of the channel from sources to windowing; when full, sources wait
    /// (MQTT: the broker connection stops being read, so the broker queues).
    pub channel_capacity: usize,
    /// Most distinct sensors tracked at once (windows, watermarks): a
    /// reading of a further sensor is refused (`too_many_sensors`) until
    /// idle sensors are evicted. Bounds the gateway's memory when ids churn.
    pub max_sensors: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_future_ms: 5 * 60 * 1000,
            sensors: Vec::new(),
            channel_capacity: 4096,
            max_sensors: 100_000,
        }
    }
}

impl SourceConfig {
    /// Check this source's settings (paths relative to its table).
    pub fn check(&self, c: &mut Collector) {
        match self {
            SourceConfig::Mqtt(m) => m.check(c),
            SourceConfig::File(f) => f.check(c),
            SourceConfig::Simulated(s) => s.check(c),
            SourceConfig::I2c(s) => s.check(c),
            SourceConfig::Modbus(m) => m.check(c),
        }
    }
}

impl IngestConfig {
    /// Check `[ingest]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if self.max_payload_bytes == 0 {
            c.push("max_payload_bytes", "must be at least 1");
        }
        if self.max_future_ms < 0 {
            c.push("max_future_ms", "must not be negative");
        }
        if self.channel_capacity == 0 {
            c.push("channel_capacity", "must be at least 1");
        }
        if self.max_sensors == 0 {
            c.push("max_sensors", "must be at least 1");
        }
        if self.max_sensors > 10_000_000 {
            c.push(
                "max_sensors",
                "must be at most 10000000 (each tracked sensor holds memory)",
            );
        }
    }
}
