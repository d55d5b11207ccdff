//! Configuration: TOML, every table `deny_unknown_fields`, and every problem
//! reported at once with its path (`sources[1].topics`, `uplink.port`, ...).
//!
//! Parsing goes section by section so that one bad section does not hide the
//! problems of the others; semantic checks run after that over whatever parsed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::Digest;

/// One problem in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `sources[0].rate_hz`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Errors of loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// One or more problems; all of them are listed.
    #[error("{} problem(s) in {origin}:\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file (or `<embedded default>`).
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// A secret (password, key) read from a file or the environment. Its value is
/// never printed: `Debug` shows only where it comes from.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// Read the secret from this file (trailing newline trimmed).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Read the secret from this environment variable.
    #[serde(default)]
    pub env: Option<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, &self.env) {
            (Some(p), _) => write!(f, "Secret(file {})", p.display()),
            (None, Some(e)) => write!(f, "Secret(env {e})"),
            (None, None) => write!(f, "Secret(unset)"),
        }
    }
}

impl SecretSource {
    /// Read the secret now. The error names the source, never the value.
    pub fn read(&self) -> Result<String, String> {
        match (&self.file, &self.env) {
            (Some(p), None) => std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read secret file {}: {e}", p.display())),
            (None, Some(e)) => {
                std::env::var(e).map_err(|_| format!("environment variable {e} is not set"))
            }
            _ => Err("exactly one of `file` or `env` must be set".into()),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Gateway identity and process settings.
    pub gateway: GatewayConfig,
    /// Reading sources, run concurrently.
    pub sources: Vec<SourceConfig>,
    /// Validation of incoming readings.
    pub ingest: IngestConfig,
    /// Privacy policy applied at ingest.
    pub privacy: PrivacyConfig,
    /// The model.
    pub model: ModelConfig,
    /// Model registry, signatures, shadow runs, probation and rollback.
    pub governance: GovernanceConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// sha256 of the configuration file's text (audited at start-up); `None`
    /// for the embedded default.
    pub source_sha256: Option<String>,
    /// Sliding windows over each sensor's readings.
    pub windowing: WindowingConfig,
    /// Inference threads and batching.
    pub inference: InferenceConfig,
    /// Tumbling aggregation windows.
    pub aggregation: AggregationConfig,
    /// The outbox between aggregation and uplink.
    pub outbox: OutboxConfig,
    /// The cloud uplink; `None`: aggregates are logged.
    pub uplink: Option<UplinkConfig>,
    /// Local per-window decisions to the site broker.
    pub decisions: Option<DecisionsConfig>,
    /// Metrics endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Gateway id, carried in every aggregate and in topic templates.
    pub id: String,
    /// Directory for state (outbox, registry, audit log); default
    /// `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`) or `/var/lib/outpost`.
    pub state_dir: PathBuf,
    /// Longest time a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: "outpost-dev".into(),
            // systemd's StateDirectory= sets STATE_DIRECTORY.
            state_dir: std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/outpost")),
            shutdown_timeout_ms: 10_000,
        }
    }
}

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

/// Connection to an MQTT broker, shared by the MQTT source, the uplink and decisions.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// Port (1883 plain, 8883 TLS by convention).
    pub port: u16,
    /// Client id; default: `<gateway id>-<role>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, from a file or the environment.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// TLS settings; absent means plaintext, which must be allowed explicitly
    /// for the uplink (`allow_plaintext = true`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_keep_alive() -> u64 {
    30
}

/// TLS with rustls (ring provider).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificates that verify the server; default: the
    /// bundled Mozilla roots (webpki-roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// ALPN protocols, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    #[serde(default)]
    pub alpn: Vec<String>,
}

/// Where the sensor id of an MQTT reading comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SensorFrom {
    /// The `sensor` field of the payload.
    Payload,
    /// The topic level at this index (0-based), e.g. `sensors/+/data` → 1.
    TopicLevel(usize),
}

impl<'de> Deserialize<'de> for SensorFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "payload" {
            return Ok(SensorFrom::Payload);
        }
        match s.strip_prefix("topic:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(SensorFrom::TopicLevel(i)),
            _ => Err(serde::de::Error::custom(format!(
                "expected \"payload\" or \"topic:<level index>\", got {s:?}"
            ))),
        }
    }
}

/// `type = "mqtt"`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Source name.
    #[serde(default = "default_mqtt_name")]
    pub name: String,
    /// The site broker.
    pub broker: BrokerConfig,
    /// Topic filters (`+` and `#` allowed).
    pub topics: Vec<String>,
    /// Where the sensor id comes from.
    #[serde(default = "default_sensor_from")]
    pub sensor_from: SensorFrom,
    /// Subscription QoS (0 or 1).
    #[serde(default = "default_qos1")]
    pub qos: u8,
    /// Keep a persistent session so the broker queues readings while we are down.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
}

fn default_mqtt_name() -> String {
    "mqtt".into()
}
fn default_sensor_from() -> SensorFrom {
    SensorFrom::Payload
}
fn default_qos1() -> u8 {
    1
}
fn default_true() -> bool {
    true
}

/// Format of a file source.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON reading (or array of readings) per line.
    #[default]
    Jsonl,
    /// A header row with `sensor`, `ts`, value columns and optional `attr.*` columns.
    Csv,
}

/// `type = "file"`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Source name.
    #[serde(default = "default_file_name")]
    pub name: String,
    /// Path, or `-` for stdin.
    pub path: PathBuf,
    /// Format.
    #[serde(default)]
    pub format: FileFormat,
}

fn default_file_name() -> String {
    "file".into()
}

/// `type = "simulated"`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedSourceConfig {
    /// Source name.
    pub name: String,
    /// Number of simulated sensors (`sim-0`, `sim-1`, ...).
    pub sensors: usize,
    /// Readings per second per sensor.
    pub rate_hz: f64,
    /// Seed of the generator.
    pub seed: u64,
    /// Probability that a reading carries an injected fault (NaN, infinity,
    /// missing channel, far-future timestamp); faults are rejected at ingest.
    pub fault_rate: f64,
    /// Stop after this many readings per sensor (0: never).
    pub limit: u64,
    /// Pace readings in real time; `false`: as fast as the pipeline takes them.
    pub realtime: bool,
    /// Seconds each simulated activity lasts before the next.
    pub activity_s: f64,
}

impl Default for SimulatedSourceConfig {
    fn default() -> Self {
        Self {
            name: "simulated".into(),
            sensors: 2,
            rate_hz: 10.0,
            seed: 7,
            fault_rate: 0.002,
            limit: 0,
            realtime: true,
            activity_s: 30.0,
        }
    }
}

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

/// `type = "modbus"`: registers of one device, polled every
/// `poll_interval_ms`; one reading per poll with one value per register, in
/// the order of `registers`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusSourceConfig {
    /// Source name.
    #[serde(default = "default_modbus_name")]
    pub name: String,
    /// `tcp`, `rtu` (serial line) or `rtu_over_tcp`.
    pub transport: ModbusTransport,
    /// `tcp` and `rtu_over_tcp`: `host:port` of the device or gateway.
    #[serde(default)]
    pub address: Option<String>,
    /// RTU: the serial device, e.g. `/dev/ttyUSB0`.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// RTU: baud rate.
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    /// RTU: `none`, `even` or `odd`.
    #[serde(default)]
    pub parity: ModbusParity,
    /// RTU: 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Unit (slave) id.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// Time between polls.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Time allowed for one request.
    #[serde(default = "default_modbus_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries of a failed request (after a timeout the connection is made anew).
    #[serde(default = "default_modbus_retries")]
    pub retries: u32,
    /// Sensor id of the readings; default: the source name.
    #[serde(default)]
    pub sensor: Option<String>,
    /// The register map.
    pub registers: Vec<ModbusRegister>,
}

fn default_modbus_name() -> String {
    "modbus".into()
}
fn default_baud() -> u32 {
    9600
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_modbus_timeout_ms() -> u64 {
    500
}
fn default_modbus_retries() -> u32 {
    2
}

/// Modbus transport.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModbusTransport {
    /// Modbus TCP (MBAP header).
    Tcp,
    /// Modbus RTU on a serial line.
    Rtu,
    /// RTU framing over TCP (a serial device server in raw mode).
    RtuOverTcp,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModbusParity {
    /// None (the default).
    #[default]
    None,
    /// Even.
    Even,
    /// Odd.
    Odd,
}

/// One value of the register map.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusRegister {
    /// Name (documentation and logs).
    pub name: String,
    /// First register (0-based protocol address).
    pub address: u16,
    /// `holding`, `input`, `coil` or `discrete`.
    #[serde(default = "default_kind")]
    pub kind: crate::ingest::modbus::RegisterKind,
    /// `u16`, `i16`, `u32`, `i32`, `f32`, `u64`, `i64`, `f64` (registers) or
    /// `bool` (coils and discrete inputs).
    #[serde(default = "default_data_type")]
    pub data_type: crate::ingest::modbus::DataType,
    /// Value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// See `scale`.
    #[serde(default)]
    pub offset: f64,
    /// Unit of the value (documentation).
    #[serde(default)]
    pub unit: Option<String>,
    /// Byte order within a register: `big` (Modbus standard) or `little`.
    #[serde(default)]
    pub byte_order: crate::ingest::modbus::Order,
    /// Register order of multi-register values: `big` (first register most
    /// significant) or `little`.
    #[serde(default)]
    pub word_order: crate::ingest::modbus::Order,
}

fn default_kind() -> crate::ingest::modbus::RegisterKind {
    crate::ingest::modbus::RegisterKind::Holding
}
fn default_data_type() -> crate::ingest::modbus::DataType {
    crate::ingest::modbus::DataType::U16
}
fn default_scale() -> f64 {
    1.0
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
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_future_ms: 5 * 60 * 1000,
            sensors: Vec::new(),
            channel_capacity: 4096,
        }
    }
}

/// `[privacy]`: the policy applied to every reading at ingest and to every
/// aggregate before it is queued. The guarantees and their limits are
/// documented in `runtime/src/privacy.rs`. The defaults keep the allowlist
/// only.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Version of this policy, carried in every aggregate (`policy.version`).
    pub policy_version: String,
    /// Attributes allowed past ingest; all others are dropped and counted.
    pub allow_attrs: Vec<String>,
    /// Replace every sensor id by a keyed token (`p_` and 32 hex digits).
    pub pseudonymize_sensor: bool,
    /// Attributes, each also in `allow_attrs`, whose values are replaced by
    /// keyed tokens.
    pub pseudonymize_attrs: Vec<String>,
    /// The pseudonymization key, `<key id>:<hex secret of at least 32
    /// bytes>`, from a file (reloaded when it changes, no restart) or an
    /// environment variable; required when anything is pseudonymized.
    pub key: Option<SecretSource>,
    /// Built-in patterns cut out of every string attribute value that
    /// passes: `email`, `phone`, `ipv4`, `iban`.
    pub redact: Vec<BuiltinPattern>,
    /// Named regular expressions cut out likewise, e.g. `{ badge = "B-[0-9]{6}" }`.
    pub redact_patterns: BTreeMap<String, String>,
    /// Attributes (each also in `allow_attrs`) whose whole value is
    /// replaced by `"[redacted]"`.
    pub free_text_attrs: Vec<String>,
    /// k-anonymity of released aggregates; absent: off.
    pub k_anonymity: Option<KAnonymityConfig>,
    /// Differential privacy of released counts; absent: off.
    pub differential_privacy: Option<DifferentialPrivacyConfig>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            policy_version: "1".into(),
            allow_attrs: Vec::new(),
            pseudonymize_sensor: false,
            pseudonymize_attrs: Vec::new(),
            key: None,
            redact: Vec::new(),
            redact_patterns: BTreeMap::new(),
            free_text_attrs: Vec::new(),
            k_anonymity: None,
            differential_privacy: None,
        }
    }
}

/// A built-in redaction pattern (`privacy.redact`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinPattern {
    /// E-mail addresses.
    Email,
    /// Phone numbers: a `+` or a digit and at least six more digits with
    /// single separators (also removes other long digit runs).
    Phone,
    /// IPv4 addresses.
    Ipv4,
    /// IBANs (bank account numbers).
    Iban,
}

impl BuiltinPattern {
    /// Its name in the configuration and in `[redacted:<name>]`.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinPattern::Email => "email",
            BuiltinPattern::Phone => "phone",
            BuiltinPattern::Ipv4 => "ipv4",
            BuiltinPattern::Iban => "iban",
        }
    }
}

/// What happens to an aggregate below the k-anonymity thresholds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KAnonymityAction {
    /// It is dropped and counted.
    #[default]
    Suppress,
    /// It is held and the group's next windows are folded into it until the
    /// thresholds are met, or suppressed after `max_merge_windows` windows.
    Merge,
}

/// `[privacy.k_anonymity]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KAnonymityConfig {
    /// k: fewest distinct subjects (sensors) in a released aggregate.
    pub min_subjects: u64,
    /// Fewest readings in a released aggregate.
    #[serde(default = "default_privacy_min_readings")]
    pub min_readings: u64,
    /// `suppress` (default) or `merge`.
    #[serde(default)]
    pub action: KAnonymityAction,
    /// `merge`: most windows one released aggregate may cover.
    #[serde(default = "default_privacy_max_merge_windows")]
    pub max_merge_windows: u32,
}

fn default_privacy_min_readings() -> u64 {
    1
}
fn default_privacy_max_merge_windows() -> u32 {
    6
}

/// An exact, non-count field of an aggregate that differential privacy
/// would remove (`privacy.differential_privacy.keep_exact`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExactField {
    /// `score` (mean, max, p95 of the window scores).
    Score,
    /// `models` (exact inferences per model).
    Models,
    /// `shadow` (exact inferences and agreement of the shadow model).
    Shadow,
    /// `drift` (PSI against the training reference).
    Drift,
}

/// `[privacy.differential_privacy]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DifferentialPrivacyConfig {
    /// Epsilon spent on each released aggregate, shared by its counts.
    pub epsilon: f64,
    /// Epsilon a group may spend per period; then its aggregates are
    /// suppressed until the next period.
    pub budget: f64,
    /// Length of a budget period in seconds (event time, aligned to the epoch).
    #[serde(default = "default_privacy_period_s")]
    pub period_s: u64,
    /// Most one protected unit adds to any one count of an aggregate
    /// (1: one reading or one inference window).
    #[serde(default = "default_privacy_sensitivity")]
    pub sensitivity: u64,
    /// Non-count fields released exact, without protection; by default they
    /// are removed.
    #[serde(default)]
    pub keep_exact: Vec<ExactField>,
}

fn default_privacy_period_s() -> u64 {
    86_400
}
fn default_privacy_sensitivity() -> u64 {
    1
}

impl PrivacyConfig {
    fn check(&self, c: &mut Collector, aggregation: &AggregationConfig) {
        let v = &self.policy_version;
        if v.trim().is_empty() || v.len() > 64 || v.chars().any(char::is_control) {
            c.push(
                "privacy.policy_version",
                "must be 1 to 64 characters, without control characters",
            );
        }
        let allowed = |a: &str| self.allow_attrs.iter().any(|x| x == a);
        for (i, a) in self.pseudonymize_attrs.iter().enumerate() {
            let path = format!("privacy.pseudonymize_attrs[{i}]");
            if !allowed(a) {
                c.push(
                    &path,
                    format!("{a:?} is not in privacy.allow_attrs: it would be dropped, not pseudonymized"),
                );
            }
            if self.free_text_attrs.contains(a) {
                c.push(&path, format!("{a:?} is also in privacy.free_text_attrs"));
            }
            if a.contains('\0') {
                c.push(&path, "must not contain a NUL character");
            }
        }
        for (i, a) in self.free_text_attrs.iter().enumerate() {
            if !allowed(a) {
                c.push(
                    format!("privacy.free_text_attrs[{i}]"),
                    format!("{a:?} is not in privacy.allow_attrs: it would be dropped anyway"),
                );
            }
        }
        let pseudonymizes = self.pseudonymize_sensor || !self.pseudonymize_attrs.is_empty();
        match &self.key {
            None if pseudonymizes => c.push(
                "privacy.key",
                "required when pseudonymize_sensor or pseudonymize_attrs is set, e.g. \
                 key = { file = \"/etc/outpost/pseudonym.key\" } holding `<key id>:<hex secret of at least 32 bytes>`",
            ),
            Some(k) if k.file.is_some() == k.env.is_some() => {
                c.push("privacy.key", "set exactly one of `file` or `env`")
            }
            _ => {}
        }
        for (name, pattern) in &self.redact_patterns {
            let path = format!("privacy.redact_patterns.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                c.push(&path, "the name must be letters, digits, '_' or '-'");
            }
            if let Err(e) = crate::privacy::compile_pattern(pattern) {
                c.push(&path, e);
            }
        }
        if let Some(k) = &self.k_anonymity {
            if k.min_subjects == 0 {
                c.push("privacy.k_anonymity.min_subjects", "must be at least 1");
            }
            if k.min_subjects > 1
                && aggregation.group_by == GroupBy::Sensor
                && aggregation.groups.is_empty()
            {
                c.push(
                    "privacy.k_anonymity.min_subjects",
                    format!(
                        "with aggregation.group_by = \"sensor\" every aggregate covers one sensor, \
                         so {} would suppress them all; group by an attribute or the gateway",
                        k.min_subjects
                    ),
                );
            }
            if k.action == KAnonymityAction::Merge && k.max_merge_windows < 2 {
                c.push(
                    "privacy.k_anonymity.max_merge_windows",
                    "must be at least 2 with action = \"merge\"",
                );
            }
        }
        if let Some(d) = &self.differential_privacy {
            let p = "privacy.differential_privacy";
            let epsilon_ok = d.epsilon.is_finite() && d.epsilon >= crate::privacy::MIN_EPSILON;
            if !epsilon_ok {
                c.push(
                    format!("{p}.epsilon"),
                    "must be a finite number greater than 0 (at least 0.000001)",
                );
            }
            if !(d.budget.is_finite() && d.budget > 0.0) {
                c.push(
                    format!("{p}.budget"),
                    "must be a finite number greater than 0",
                );
            } else if epsilon_ok && d.budget < d.epsilon {
                c.push(
                    format!("{p}.budget"),
                    format!(
                        "must be at least epsilon ({}): a smaller budget allows no release",
                        d.epsilon
                    ),
                );
            }
            if !(1..=crate::privacy::MAX_PERIOD_S).contains(&d.period_s) {
                c.push(
                    format!("{p}.period_s"),
                    "must be between 1 and 315360000 (ten years)",
                );
            }
            if !(1..=crate::privacy::MAX_SENSITIVITY).contains(&d.sensitivity) {
                c.push(format!("{p}.sensitivity"), "must be between 1 and 1000000");
            }
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Artifact directory; absent: the bundled BasicMotions FCN.
    pub path: Option<PathBuf>,
}

/// `[governance]`: which models may run, and how a new one earns its place.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    /// Follow the model registry (off in the embedded default, which keeps
    /// nothing on disk).
    pub enabled: bool,
    /// The model registry; absent: `<gateway.state_dir>/models`.
    pub registry_dir: Option<PathBuf>,
    /// Public key files of trusted model publishers (`ed25519-public <hex>`).
    pub trusted_keys: Vec<PathBuf>,
    /// Refuse models not signed by a trusted key; default: true as soon as
    /// `trusted_keys` is not empty. The bundled model is part of the binary
    /// and needs no signature.
    pub require_signature: Option<bool>,
    /// How often the gateway looks for a new desired state in the registry.
    pub poll_interval_ms: u64,
    /// Least agreement between a shadow (candidate, or the baseline during a
    /// probation) and the active model; under it a candidate is rejected and a
    /// model on probation rolled back.
    pub min_agreement: f64,
    /// Fewest inferences in an aggregate for it to be judged.
    pub min_inferences: u64,
    /// Aggregates a promoted model must pass before its probation ends; 0:
    /// no probation (no automatic rollback).
    pub probation_windows: u32,
    /// Highest anomaly rate of a model on probation (detectors).
    pub max_anomaly_rate: Option<f64>,
    /// Lowest mean score of a model on probation.
    pub min_mean_score: Option<f64>,
    /// PSI at or above which drift is an alert (aggregates, metrics, log).
    pub drift_alert_psi: f64,
    /// Fewest inferences in an aggregation window for its drift to be computed.
    pub drift_min_inferences: u64,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            registry_dir: None,
            trusted_keys: Vec::new(),
            require_signature: None,
            poll_interval_ms: 1000,
            min_agreement: 0.8,
            min_inferences: 10,
            probation_windows: 6,
            max_anomaly_rate: None,
            min_mean_score: None,
            drift_alert_psi: 0.25,
            drift_min_inferences: 10,
        }
    }
}

impl GovernanceConfig {
    /// The registry's directory.
    pub fn registry_dir(&self, gateway: &GatewayConfig) -> PathBuf {
        self.registry_dir
            .clone()
            .unwrap_or_else(|| gateway.state_dir.join("models"))
    }

    fn check(&self, c: &mut Collector) {
        if !(0.0..=1.0).contains(&self.min_agreement) {
            c.push("governance.min_agreement", "must be between 0 and 1");
        }
        if let Some(r) = self.max_anomaly_rate
            && !(0.0..=1.0).contains(&r)
        {
            c.push("governance.max_anomaly_rate", "must be between 0 and 1");
        }
        if self.poll_interval_ms == 0 {
            c.push("governance.poll_interval_ms", "must be at least 1");
        }
        if !(self.drift_alert_psi.is_finite() && self.drift_alert_psi > 0.0) {
            c.push("governance.drift_alert_psi", "must be a positive number");
        }
        if self.require_signature == Some(true) && self.trusted_keys.is_empty() {
            c.push(
                "governance.require_signature",
                "signatures are required but governance.trusted_keys is empty: no model could load",
            );
        }
        for (i, k) in self.trusted_keys.iter().enumerate() {
            if let Err(e) = outpost_models::signing::read_public_key(k) {
                c.push(format!("governance.trusted_keys[{i}]"), e.to_string());
            }
        }
    }
}

/// `[audit]`: the hash-chained audit log.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Keep the audit log (off in the embedded default, which keeps nothing on disk).
    pub enabled: bool,
    /// The log file; absent: `<gateway.state_dir>/audit/audit.log`.
    pub path: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
        }
    }
}

impl AuditConfig {
    /// The log file.
    pub fn path(&self, gateway: &GatewayConfig) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| crate::audit::default_path(&gateway.state_dir))
    }
}

/// `[windowing]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WindowingConfig {
    /// Samples per window; must equal the model's input length for raw models.
    /// Absent: the model's input length.
    pub size: Option<usize>,
    /// Samples between the starts of consecutive windows.
    pub hop: usize,
    /// Capacity of the channel from windowing to inference; when full, windowing waits.
    pub channel_capacity: usize,
}

impl Default for WindowingConfig {
    fn default() -> Self {
        Self {
            size: None,
            hop: 50,
            channel_capacity: 256,
        }
    }
}

/// Where inference runs (`outpost_models::device`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// burn's flex CPU backend.
    #[default]
    Cpu,
    /// burn's wgpu backend (build feature `gpu`) on a GPU adapter, a
    /// software one (lavapipe) when there is no hardware one; the CPU when
    /// no adapter opens or the device fails.
    Gpu,
    /// A hardware GPU when there is one (build feature `gpu`), else the CPU.
    Auto,
}

impl DeviceChoice {
    /// The name as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
            Self::Auto => "auto",
        }
    }

    /// The device preference this names.
    pub fn preference(self) -> outpost_models::device::Preference {
        use outpost_models::device::Preference;
        match self {
            Self::Cpu => Preference::Cpu,
            Self::Gpu => Preference::Gpu,
            Self::Auto => Preference::Auto,
        }
    }
}

/// `[inference]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Device.
    pub device: DeviceChoice,
    /// Largest batch of windows per forward pass on the CPU.
    pub max_batch: usize,
    /// Largest batch of windows per forward pass on a GPU, where a dispatch
    /// has a fixed cost and larger batches amortize it.
    pub gpu_max_batch: usize,
    /// Longest a window waits for its batch to fill.
    pub max_wait_ms: u64,
    /// Capacity of the channel from inference to aggregation; when full, inference waits.
    pub channel_capacity: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            max_batch: 32,
            gpu_max_batch: 256,
            max_wait_ms: 20,
            channel_capacity: 1024,
        }
    }
}

/// How readings are grouped into aggregates.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupBy {
    /// One group per sensor.
    Sensor,
    /// One group for the whole gateway.
    Gateway,
    /// The value of this reading attribute (`unassigned` when absent).
    Attr(String),
}

impl<'de> Deserialize<'de> for GroupBy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "sensor" => Ok(GroupBy::Sensor),
            "gateway" => Ok(GroupBy::Gateway),
            _ => match s.strip_prefix("attr:") {
                Some(a) if !a.is_empty() => Ok(GroupBy::Attr(a.to_string())),
                _ => Err(serde::de::Error::custom(format!(
                    "expected \"sensor\", \"gateway\" or \"attr:<name>\", got {s:?}"
                ))),
            },
        }
    }
}

/// `[aggregation]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// Length of the tumbling windows (event time), aligned to the epoch.
    pub window_ms: i64,
    /// How long after a window's end readings may still arrive for it.
    pub allowed_lateness_ms: i64,
    /// Live runs only: close a group's open windows once its event time has
    /// not advanced for this long on the wall clock (its sensors went quiet).
    pub idle_close_ms: i64,
    /// Grouping rule.
    pub group_by: GroupBy,
    /// Fixed sensor → group assignments, taking precedence over `group_by`.
    pub groups: BTreeMap<String, String>,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            allowed_lateness_ms: 5_000,
            idle_close_ms: 5_000,
            group_by: GroupBy::Sensor,
            groups: BTreeMap::new(),
        }
    }
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// `disk` (durable segment log, the default) or `memory` (lost at exit).
    pub kind: OutboxKind,
    /// Directory of the disk outbox; absent: `<gateway.state_dir>/outbox`.
    pub dir: Option<PathBuf>,
    /// Bytes on disk at most.
    pub max_bytes: u64,
    /// Bytes per segment file.
    pub segment_bytes: u64,
    /// When full: `drop_oldest`, `reject_new` or `coarsen`. Applies to the
    /// total cap and to each stream's cap.
    pub policy: crate::outbox::FullPolicy,
    /// Bytes on disk at most per stream (aggregate group), so that one
    /// chatty stream cannot take the whole outbox; 0 (default): no cap but
    /// `max_bytes`.
    pub stream_max_bytes: u64,
    /// Caps of named streams, overriding `stream_max_bytes` (0: none), e.g.
    /// `streams = { "line-1" = 104857600 }`.
    pub streams: std::collections::BTreeMap<String, u64>,
    /// Group commit: appends are synced to disk at most this long after they
    /// are written (0: every aggregate is synced on its own).
    pub fsync_interval_ms: u64,
    /// Most records held by the memory outbox; when full, the oldest is dropped and counted.
    pub max_records: usize,
}

/// Where the outbox keeps aggregates.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// The segment log under `outbox.dir`.
    Disk,
    /// In memory (the embedded demo; tests).
    Memory,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            kind: OutboxKind::Disk,
            dir: None,
            max_bytes: 1 << 30,
            segment_bytes: 8 << 20,
            policy: crate::outbox::FullPolicy::DropOldest,
            stream_max_bytes: 0,
            streams: std::collections::BTreeMap::new(),
            fsync_interval_ms: 100,
            max_records: 100_000,
        }
    }
}

impl OutboxConfig {
    /// The disk outbox's directory.
    pub fn dir(&self, gateway: &GatewayConfig) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| gateway.state_dir.join("outbox"))
    }
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// The cloud broker.
    pub broker: BrokerConfig,
    /// Topic template; `{gateway}` and `{group}` are replaced.
    #[serde(default = "default_agg_topic")]
    pub topic: String,
    /// Allow a connection without TLS (tests, a local bridge).
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Seconds between health messages (a [`crate::status::Status`], QoS 0)
    /// while connected; 0: none and no last will.
    #[serde(default = "default_health_interval")]
    pub health_interval_s: u64,
    /// Topic of the health messages and of the last will (`state:
    /// "offline"`, QoS 1) the broker publishes when the connection drops
    /// uncleanly; `{gateway}` is replaced.
    #[serde(default = "default_health_topic")]
    pub health_topic: String,
    /// Publish health messages and the last will retained, so a consumer
    /// that subscribes later sees the gateway's last state at once. Off for
    /// brokers without retained messages (Azure IoT Hub).
    #[serde(default = "default_true")]
    pub health_retain: bool,
    /// Most unacknowledged publishes at once.
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// First reconnect delay.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// After a reconnect, send aggregates produced since before the backlog
    /// (which drains oldest first at `backlog_rate`). `false`: strictly in
    /// order, oldest first, at full speed.
    #[serde(default = "default_true")]
    pub live_first: bool,
    /// Backlog records per second at most (0, the default: no cap beyond
    /// `max_publish_rate`; live data goes first either way).
    #[serde(default = "default_backlog_rate")]
    pub backlog_rate: f64,
    /// Publishes per second at most, everything included (0: no cap). AWS
    /// IoT Core allows 100 per connection.
    #[serde(default)]
    pub max_publish_rate: f64,
    /// Several aggregates per message (a JSON array) up to this many bytes
    /// before compression; 0 (default): one aggregate per message. Runs of
    /// one group per message when the topic names `{group}`.
    #[serde(default)]
    pub batch_max_bytes: usize,
    /// `none` (default) or `zstd` (the topic gets a `/zstd` suffix).
    #[serde(default = "default_compression")]
    pub compression: crate::uplink::Compression,
    /// Circuit breaker: after this many connection failures in a row ...
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// ... wait this long before trying again (then back to the backoff).
    #[serde(default = "default_breaker_open")]
    pub breaker_open_ms: u64,
}

fn default_health_interval() -> u64 {
    60
}
fn default_health_topic() -> String {
    "outpost/{gateway}/health".into()
}
fn default_compression() -> crate::uplink::Compression {
    crate::uplink::Compression::None
}
fn default_backlog_rate() -> f64 {
    0.0
}
fn default_breaker_failures() -> u32 {
    10
}
fn default_breaker_open() -> u64 {
    300_000
}

fn default_agg_topic() -> String {
    "outpost/{gateway}/agg/{group}".into()
}
fn default_inflight() -> u16 {
    32
}
fn default_backoff_initial() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    60_000
}

/// Which per-window decisions go to the site broker.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecisionMode {
    /// Every window.
    All,
    /// Anomalous windows only (detectors).
    Anomalies,
    /// Windows whose class differs from the sensor's previous one.
    #[default]
    Changes,
}

/// `[decisions]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecisionsConfig {
    /// The site broker.
    pub broker: BrokerConfig,
    /// Topic template; `{gateway}`, `{group}` and `{sensor}` are replaced.
    #[serde(default = "default_decision_topic")]
    pub topic: String,
    /// Which windows.
    #[serde(default)]
    pub mode: DecisionMode,
    /// Capacity of the queue to the site broker; when full, new decisions are
    /// dropped and counted (a stale decision is worth less than a fresh one).
    #[serde(default = "default_decision_capacity")]
    pub queue_capacity: usize,
}

fn default_decision_topic() -> String {
    "outpost/{gateway}/decision/{sensor}".into()
}
fn default_decision_capacity() -> usize {
    1024
}

/// The metrics endpoint's address when `metrics.listen` is not set:
/// loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`).
    pub enabled: bool,
    /// Its address. Absent: [`DEFAULT_METRICS_LISTEN`], best effort (a port
    /// already taken is logged and the gateway runs without the endpoint);
    /// set: the gateway does not start when it cannot listen there.
    pub listen: Option<String>,
    /// Interval of the summary log line, in seconds (0: off).
    pub log_interval_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            log_interval_s: 60,
        }
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level filter (`info`, `debug`, `outpost=debug,rumqttc=warn`); `RUST_LOG` overrides.
    pub level: String,
    /// Format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for Config {
    /// The embedded default: one simulated source, the bundled model, no
    /// cloud (aggregates are logged).
    fn default() -> Self {
        Self {
            gateway: GatewayConfig::default(),
            sources: vec![SourceConfig::Simulated(SimulatedSourceConfig::default())],
            ingest: IngestConfig::default(),
            privacy: PrivacyConfig::default(),
            model: ModelConfig::default(),
            governance: GovernanceConfig::default(),
            audit: AuditConfig::default(),
            source_sha256: None,
            windowing: WindowingConfig::default(),
            inference: InferenceConfig::default(),
            aggregation: AggregationConfig {
                window_ms: 10_000,
                ..AggregationConfig::default()
            },
            outbox: OutboxConfig::default(),
            uplink: None,
            decisions: None,
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

pub(crate) struct Collector {
    problems: Vec<Problem>,
}

impl Collector {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserialize one section; record every problem with its full path.
    /// An unknown field is recorded, removed, and the section parsed again,
    /// so that one typo does not hide the section's other problems.
    fn section<T: DeserializeOwned>(&mut self, path: &str, mut value: toml::Value) -> Option<T> {
        for _ in 0..32 {
            match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) => return Some(v),
                Err(e) => {
                    let inner: Vec<String> = e
                        .path()
                        .iter()
                        .filter_map(|seg| match seg {
                            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                            serde_path_to_error::Segment::Seq { index } => {
                                Some(format!("[{index}]"))
                            }
                            _ => None,
                        })
                        .collect();
                    let message = e.into_inner().to_string().trim().replace('\n', " ");
                    let unknown = message
                        .strip_prefix("unknown field `")
                        .and_then(|m| m.split('`').next())
                        .map(str::to_string);
                    let mut full = path.to_string();
                    for seg in &inner {
                        if !seg.starts_with('[') {
                            full.push('.');
                        }
                        full.push_str(seg);
                    }
                    match unknown {
                        Some(field) => {
                            // Some deserializers point at the field itself, some at its table.
                            let (table, field_path) = if inner.last() == Some(&field) {
                                (&inner[..inner.len() - 1], full)
                            } else {
                                (&inner[..], format!("{full}.{field}"))
                            };
                            self.push(field_path, message);
                            let removed = table_at(&mut value, table)
                                .and_then(|t| t.remove(&field))
                                .is_some();
                            if !removed {
                                return None;
                            }
                        }
                        None => {
                            self.push(full, message);
                            return None;
                        }
                    }
                }
            }
        }
        None
    }
}

/// The table at `path` (keys and `[i]` indices) inside `v`.
fn table_at<'a>(v: &'a mut toml::Value, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut cur = v;
    for seg in path {
        cur = match seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(i) => cur.as_array_mut()?.get_mut(i.parse::<usize>().ok()?)?,
            None => cur.as_table_mut()?.get_mut(seg)?,
        };
    }
    cur.as_table_mut()
}

impl Config {
    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse and check configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            invalid(vec![Problem {
                path: "<toml>".into(),
                message: e.to_string().trim().replace('\n', " "),
            }])
        })?;
        let mut c = Collector {
            problems: Vec::new(),
        };
        // A file starts from each section's defaults (the embedded default's
        // simulated source and short aggregation windows are for demos only).
        let mut cfg = Config {
            sources: Vec::new(),
            aggregation: AggregationConfig::default(),
            ..Config::default()
        };
        cfg.source_sha256 = Some(hex::encode(sha2::Sha256::digest(text.as_bytes())));
        let mut saw_sources = false;
        for (key, value) in table {
            match key.as_str() {
                "gateway" => cfg.gateway = c.section(&key, value).unwrap_or_default(),
                "ingest" => cfg.ingest = c.section(&key, value).unwrap_or_default(),
                "privacy" => cfg.privacy = c.section(&key, value).unwrap_or_default(),
                "model" => cfg.model = c.section(&key, value).unwrap_or_default(),
                "governance" => cfg.governance = c.section(&key, value).unwrap_or_default(),
                "audit" => cfg.audit = c.section(&key, value).unwrap_or_default(),
                "windowing" => cfg.windowing = c.section(&key, value).unwrap_or_default(),
                "inference" => cfg.inference = c.section(&key, value).unwrap_or_default(),
                "aggregation" => cfg.aggregation = c.section(&key, value).unwrap_or_default(),
                "outbox" => cfg.outbox = c.section(&key, value).unwrap_or_default(),
                "uplink" => cfg.uplink = c.section(&key, value),
                "decisions" => cfg.decisions = c.section(&key, value),
                "metrics" => cfg.metrics = c.section(&key, value).unwrap_or_default(),
                "log" => cfg.log = c.section(&key, value).unwrap_or_default(),
                "sources" => {
                    saw_sources = true;
                    match value {
                        toml::Value::Array(items) => {
                            for (i, item) in items.into_iter().enumerate() {
                                if let Some(s) = c.section(&format!("sources[{i}]"), item) {
                                    cfg.sources.push(s);
                                }
                            }
                        }
                        _ => c.push("sources", "must be an array of tables ([[sources]])"),
                    }
                }
                other => c.push(other, "unknown section"),
            }
        }
        if !saw_sources {
            c.push("sources", "at least one [[sources]] is required");
        }
        cfg.check(&mut c);
        if c.problems.is_empty() {
            Ok(cfg)
        } else {
            Err(invalid(c.problems))
        }
    }

    fn check(&self, c: &mut Collector) {
        self.governance.check(c);
        self.privacy.check(c, &self.aggregation);
        if self.gateway.id.trim().is_empty() || self.gateway.id.contains(['+', '#', '/']) {
            c.push(
                "gateway.id",
                "must be non-empty and contain no '/', '+' or '#'",
            );
        }
        let mut names = BTreeMap::new();
        for (i, s) in self.sources.iter().enumerate() {
            let p = format!("sources[{i}]");
            if let Some(prev) = names.insert(s.name().to_string(), i) {
                c.push(
                    format!("{p}.name"),
                    format!("{:?} is also the name of sources[{prev}]", s.name()),
                );
            }
            match s {
                SourceConfig::Mqtt(m) => {
                    check_broker(c, &format!("{p}.broker"), &m.broker);
                    if m.topics.is_empty() {
                        c.push(
                            format!("{p}.topics"),
                            "at least one topic filter is required",
                        );
                    }
                    for (j, t) in m.topics.iter().enumerate() {
                        if let Err(e) = check_filter(t) {
                            c.push(format!("{p}.topics[{j}]"), e);
                        }
                    }
                    if m.qos > 1 {
                        c.push(format!("{p}.qos"), "must be 0 or 1");
                    }
                }
                SourceConfig::File(f) => {
                    if f.path.as_os_str().is_empty() {
                        c.push(
                            format!("{p}.path"),
                            "must not be empty (use \"-\" for stdin)",
                        );
                    }
                }
                SourceConfig::Simulated(s) => {
                    if s.sensors == 0 {
                        c.push(format!("{p}.sensors"), "must be at least 1");
                    }
                    if !(s.rate_hz > 0.0 && s.rate_hz <= 100_000.0) {
                        c.push(format!("{p}.rate_hz"), "must be in (0, 100000]");
                    }
                    if !(0.0..=1.0).contains(&s.fault_rate) {
                        c.push(format!("{p}.fault_rate"), "must be in [0, 1]");
                    }
                    if s.activity_s <= 0.0 {
                        c.push(format!("{p}.activity_s"), "must be positive");
                    }
                }
                SourceConfig::I2c(s) => {
                    if !(s.rate_hz > 0.0 && s.rate_hz <= 3200.0) {
                        c.push(
                            format!("{p}.rate_hz"),
                            "must be in (0, 3200] (the ADXL345's rates)",
                        );
                    }
                    if ![2, 4, 8, 16].contains(&s.range_g) {
                        c.push(format!("{p}.range_g"), "must be 2, 4, 8 or 16");
                    }
                    if s.address > 0x7f {
                        c.push(
                            format!("{p}.address"),
                            "must be a 7-bit address (0x53 or 0x1d for an ADXL345)",
                        );
                    }
                }
                SourceConfig::Modbus(m) => crate::ingest::modbus::check_config(c, &p, m),
            }
        }
        if self.ingest.max_payload_bytes == 0 {
            c.push("ingest.max_payload_bytes", "must be at least 1");
        }
        if self.ingest.max_future_ms < 0 {
            c.push("ingest.max_future_ms", "must not be negative");
        }
        for (path, cap) in [
            ("ingest.channel_capacity", self.ingest.channel_capacity),
            (
                "windowing.channel_capacity",
                self.windowing.channel_capacity,
            ),
            (
                "inference.channel_capacity",
                self.inference.channel_capacity,
            ),
            ("inference.max_batch", self.inference.max_batch),
            ("inference.gpu_max_batch", self.inference.gpu_max_batch),
            ("outbox.max_records", self.outbox.max_records),
        ] {
            if cap == 0 {
                c.push(path, "must be at least 1");
            }
        }
        // `auto` means the CPU in a build without the GPU backend; `gpu`
        // cannot be had at all.
        if self.inference.device == DeviceChoice::Gpu && !outpost_models::device::GPU_BUILT {
            c.push(
                "inference.device",
                format!(
                    "{:?} needs a build with the `gpu` cargo feature; this binary runs inference on the CPU only (\"auto\" is accepted and means the CPU here)",
                    self.inference.device.name()
                ),
            );
        }
        if self.outbox.segment_bytes < 4096 {
            c.push("outbox.segment_bytes", "must be at least 4096");
        }
        if self.outbox.max_bytes < self.outbox.segment_bytes.saturating_mul(2) {
            c.push(
                "outbox.max_bytes",
                format!(
                    "must be at least twice outbox.segment_bytes ({})",
                    self.outbox.segment_bytes
                ),
            );
        }
        for (path, cap) in std::iter::once((
            "outbox.stream_max_bytes".to_string(),
            self.outbox.stream_max_bytes,
        ))
        .chain(
            self.outbox
                .streams
                .iter()
                .map(|(k, v)| (format!("outbox.streams.{k}"), *v)),
        ) {
            if cap == 0 {
                continue;
            }
            if cap < 4096 {
                c.push(path.clone(), "must be 0 (no cap) or at least 4096");
            } else if cap > self.outbox.max_bytes {
                c.push(
                    &path,
                    format!(
                        "must not exceed outbox.max_bytes ({})",
                        self.outbox.max_bytes
                    ),
                );
            }
            if self.outbox.kind == OutboxKind::Memory {
                c.push(path.clone(), "per-stream caps need outbox.kind = \"disk\"");
            }
        }
        if self.windowing.hop == 0 {
            c.push("windowing.hop", "must be at least 1");
        }
        if let Some(size) = self.windowing.size {
            if size == 0 {
                c.push("windowing.size", "must be at least 1");
            }
            if self.windowing.hop > size {
                c.push(
                    "windowing.hop",
                    format!("must not exceed windowing.size ({size})"),
                );
            }
        }
        if self.aggregation.window_ms <= 0 {
            c.push("aggregation.window_ms", "must be positive");
        }
        if self.aggregation.allowed_lateness_ms < 0 {
            c.push("aggregation.allowed_lateness_ms", "must not be negative");
        }
        if self.aggregation.idle_close_ms < 0 {
            c.push("aggregation.idle_close_ms", "must not be negative");
        }
        if let Some(u) = &self.uplink {
            check_broker(c, "uplink.broker", &u.broker);
            if u.broker.tls.is_none() && !u.allow_plaintext {
                c.push(
                    "uplink.broker.tls",
                    "the uplink needs TLS; set uplink.allow_plaintext = true to send in plaintext",
                );
            }
            check_template(c, "uplink.topic", &u.topic, &["gateway", "group"]);
            check_template(c, "uplink.health_topic", &u.health_topic, &["gateway"]);
            if u.max_inflight == 0 {
                c.push("uplink.max_inflight", "must be at least 1");
            }
            if u.backoff_initial_ms == 0 || u.backoff_initial_ms > u.backoff_max_ms {
                c.push(
                    "uplink.backoff_initial_ms",
                    "must be at least 1 and at most uplink.backoff_max_ms",
                );
            }
            for (path, v) in [
                ("uplink.backlog_rate", u.backlog_rate),
                ("uplink.max_publish_rate", u.max_publish_rate),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    c.push(path, "must be a finite number, 0 or more (0: no cap)");
                }
            }
            if u.breaker_failures == 0 {
                c.push("uplink.breaker_failures", "must be at least 1");
            }
            if u.batch_max_bytes > 512 * 1024 {
                c.push(
                    "uplink.batch_max_bytes",
                    "must be at most 524288 (brokers limit message size: AWS IoT Core 128 KiB)",
                );
            }
        }
        if let Some(d) = &self.decisions {
            check_broker(c, "decisions.broker", &d.broker);
            check_template(
                c,
                "decisions.topic",
                &d.topic,
                &["gateway", "group", "sensor"],
            );
            if d.queue_capacity == 0 {
                c.push("decisions.queue_capacity", "must be at least 1");
            }
        }
        if let Some(l) = &self.metrics.listen
            && l.parse::<std::net::SocketAddr>().is_err()
        {
            c.push(
                "metrics.listen",
                format!("{l:?} is not an address like 127.0.0.1:9464"),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            c.push("log.level", e.to_string());
        }
    }
}

fn check_broker(c: &mut Collector, path: &str, b: &BrokerConfig) {
    if b.host.trim().is_empty() {
        c.push(format!("{path}.host"), "must not be empty");
    }
    if b.port == 0 {
        c.push(format!("{path}.port"), "must not be 0");
    }
    if let Some(p) = &b.password
        && (p.file.is_some() == p.env.is_some())
    {
        c.push(
            format!("{path}.password"),
            "set exactly one of `file` or `env`",
        );
    }
    if let Some(t) = &b.tls
        && (t.cert_file.is_some() != t.key_file.is_some())
    {
        c.push(
            format!("{path}.tls"),
            "cert_file and key_file go together (mutual TLS)",
        );
    }
}

fn check_template(c: &mut Collector, path: &str, template: &str, allowed: &[&str]) {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            c.push(path, "unclosed '{'");
            return;
        };
        let name = &rest[open + 1..open + close];
        if !allowed.contains(&name) {
            c.push(
                path,
                format!(
                    "unknown placeholder {{{name}}}; allowed: {}",
                    allowed.join(", ")
                ),
            );
        }
        rest = &rest[open + close + 1..];
    }
    if template.contains(['+', '#']) || template.is_empty() {
        c.push(path, "a topic must be non-empty and contain no wildcards");
    }
}

/// Check an MQTT topic filter: `#` only last and alone in its level, `+` alone in its level.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty topic filter".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(format!("{filter:?}: '#' must be the whole last level"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Fill a topic template.
pub fn render_topic(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), &sanitize_level(v));
    }
    out
}

/// A topic level from arbitrary text: no separators or wildcards.
fn sanitize_level(v: &str) -> String {
    v.chars()
        .map(|ch| {
            if matches!(ch, '/' | '+' | '#') || ch.is_control() {
                '_'
            } else {
                ch
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sources_and_many_problems_reported_together() {
        let text = r#"
            [gateway]
            id = "a/b"
            [[sources]]
            type = "simulated"
            sensors = 0
            bogus = 1
            [[sources]]
            type = "mqtt"
            topics = ["a/#/b"]
            broker = { host = "", port = 0 }
            [uplink]
            broker = { host = "x", port = 8883 }
            topic = "t/{nope}"
            [windowing]
            hop = 0
            [outbox]
            kind = "memory"
            stream_max_bytes = 100
            streams = { "line-1" = 4294967296000 }
            [nonsense]
        "#;
        let err = Config::parse(text, "t.toml").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "gateway.id",
            "sources[0].bogus",
            "sources[1].topics[0]",
            "sources[1].broker.host",
            "sources[1].broker.port",
            "uplink.broker.tls",
            "uplink.topic",
            "windowing.hop",
            "outbox.stream_max_bytes",
            "outbox.streams.line-1",
            "nonsense",
        ] {
            assert!(
                paths.iter().any(|p| p.starts_with(want)),
                "missing {want} in {paths:?}"
            );
        }
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let cfg = Config::parse("[[sources]]\ntype = \"simulated\"\n", "t").unwrap();
        assert_eq!(cfg.sources.len(), 1);
        assert_eq!(cfg.aggregation.window_ms, 60_000);
        assert!(cfg.uplink.is_none());
    }

    #[test]
    fn secret_debug_never_shows_value() {
        let s = SecretSource {
            file: None,
            env: Some("OUTPOST_TEST_SECRET_X".into()),
        };
        assert_eq!(format!("{s:?}"), "Secret(env OUTPOST_TEST_SECRET_X)");
    }

    #[test]
    fn filters_and_templates() {
        assert!(check_filter("a/+/b/#").is_ok());
        assert!(check_filter("a/b#").is_err());
        assert!(check_filter("a/x+/b").is_err());
        assert_eq!(
            render_topic(
                "o/{gateway}/agg/{group}",
                &[("gateway", "g1"), ("group", "a/b+")]
            ),
            "o/g1/agg/a_b_"
        );
    }

    #[test]
    fn privacy_problems_are_reported_with_their_paths() {
        let text = r#"
            [[sources]]
            type = "simulated"
            [privacy]
            policy_version = ""
            allow_attrs = ["line", "note"]
            pseudonymize_attrs = ["patient", "note"]
            free_text_attrs = ["note", "ward"]
            redact_patterns = { badge = "B-[0-9", any = "x*", "bad name" = "y" }
            [privacy.k_anonymity]
            min_subjects = 3
            action = "merge"
            max_merge_windows = 1
            [privacy.differential_privacy]
            epsilon = 0.0
            budget = -1.0
            period_s = 0
            sensitivity = 0
        "#;
        let ConfigError::Invalid { problems, .. } = Config::parse(text, "t").unwrap_err() else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "privacy.policy_version",
            "privacy.pseudonymize_attrs[0]",
            "privacy.pseudonymize_attrs[1]",
            "privacy.free_text_attrs[1]",
            "privacy.key",
            "privacy.redact_patterns.badge",
            "privacy.redact_patterns.any",
            "privacy.redact_patterns.bad name",
            "privacy.k_anonymity.min_subjects",
            "privacy.k_anonymity.max_merge_windows",
            "privacy.differential_privacy.epsilon",
            "privacy.differential_privacy.budget",
            "privacy.differential_privacy.period_s",
            "privacy.differential_privacy.sensitivity",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        assert!(!paths.contains(&"privacy.free_text_attrs[0]"), "{paths:?}");
        assert!(!paths.contains(&"privacy.redact_patterns.y"), "{paths:?}");

        // An unknown built-in pattern.
        let text = r#"
            [[sources]]
            type = "simulated"
            [privacy]
            redact = ["email", "fax"]
        "#;
        let ConfigError::Invalid { problems, .. } = Config::parse(text, "t").unwrap_err() else {
            panic!("expected Invalid")
        };
        let text = problems.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert!(
            text.iter()
                .any(|p| p.starts_with("privacy.redact[1]") && p.contains("fax")),
            "{text:?}"
        );

        // A key given both ways; a budget smaller than epsilon.
        let text = r#"
            [[sources]]
            type = "simulated"
            [privacy]
            pseudonymize_sensor = true
            key = { file = "/k", env = "K" }
            [privacy.differential_privacy]
            epsilon = 1.0
            budget = 0.5
        "#;
        let ConfigError::Invalid { problems, .. } = Config::parse(text, "t").unwrap_err() else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["privacy.key", "privacy.differential_privacy.budget"]
        );
    }

    #[test]
    fn a_full_privacy_policy_parses() {
        let text = r#"
            [[sources]]
            type = "simulated"
            [aggregation]
            group_by = "attr:line"
            [privacy]
            policy_version = "2026-01"
            allow_attrs = ["line", "patient", "note"]
            pseudonymize_sensor = true
            pseudonymize_attrs = ["patient"]
            key = { file = "/etc/outpost/pseudonym.key" }
            redact = ["email", "phone", "ipv4", "iban"]
            redact_patterns = { badge = "B-[0-9]{6}" }
            free_text_attrs = ["note"]
            [privacy.k_anonymity]
            min_subjects = 3
            [privacy.differential_privacy]
            epsilon = 0.5
            budget = 10.0
            keep_exact = ["drift"]
        "#;
        let cfg = Config::parse(text, "t").unwrap();
        let p = &cfg.privacy;
        assert_eq!(p.redact.len(), 4);
        let k = p.k_anonymity.as_ref().unwrap();
        assert_eq!(
            (k.min_readings, k.action, k.max_merge_windows),
            (1, KAnonymityAction::Suppress, 6)
        );
        let d = p.differential_privacy.as_ref().unwrap();
        assert_eq!((d.period_s, d.sensitivity), (86_400, 1));
        assert_eq!(d.keep_exact, vec![ExactField::Drift]);
        // The defaults: the allowlist only.
        let cfg = Config::parse("[[sources]]\ntype = \"simulated\"\n", "t").unwrap();
        assert_eq!(cfg.privacy, PrivacyConfig::default());
        assert_eq!(cfg.privacy.policy_version, "1");
        assert!(cfg.privacy.k_anonymity.is_none() && cfg.privacy.differential_privacy.is_none());
    }
}
