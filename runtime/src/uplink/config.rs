//! `[uplink]`: the cloud broker, topics, QoS 1 delivery, batching,
//! backoff and the circuit breaker, health messages, the broker's message
//! size limit and the dead-letter store.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::check::Collector;
use crate::mqtt::{BrokerConfig, check_broker, check_template};

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
    pub compression: super::Compression,
    /// Circuit breaker: after this many connection failures in a row it
    /// opens ...
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// ... and probes once every this many milliseconds, never more than
    /// `backoff_max_ms` (so a cloud that is back is found within it). A
    /// probe that connects sends one message at a time until its PUBACK
    /// closes the breaker.
    #[serde(default = "default_breaker_open")]
    pub breaker_open_ms: u64,
    /// The kind of cloud broker, for its message size limit:
    /// `generic` (default, 512 KiB), `aws_iot_core` (128 KiB payload),
    /// `azure_iot_hub` (256 KiB message).
    #[serde(default)]
    pub broker_profile: BrokerProfile,
    /// The largest payload the broker takes, in bytes; default: the
    /// profile's. A single aggregate larger than this is set aside in the
    /// dead-letter store at once; `batch_max_bytes` may not exceed it.
    #[serde(default)]
    pub max_message_bytes: Option<usize>,
    /// Failed deliveries of an aggregate sent alone (the broker dropped
    /// the connection, or the client refused it) before it is set aside in
    /// the dead-letter store, so that what comes behind it is delivered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Directory of the dead-letter store; default:
    /// `<gateway.state_dir>/deadletter`.
    #[serde(default)]
    pub deadletter_dir: Option<PathBuf>,
    /// Bytes the dead-letter store holds at most; the oldest entries are
    /// removed (counted) to make room.
    #[serde(default = "default_deadletter_max_bytes")]
    pub deadletter_max_bytes: u64,
}

/// The kind of cloud broker: what it takes at most in one message.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BrokerProfile {
    /// Any MQTT broker: 512 KiB (the client itself refuses packets over
    /// 1 MiB).
    #[default]
    Generic,
    /// AWS IoT Core: 128 KiB payload.
    AwsIotCore,
    /// Azure IoT Hub: 256 KiB device-to-cloud message.
    AzureIotHub,
}

impl BrokerProfile {
    /// The largest payload the broker takes, in bytes.
    pub fn max_message_bytes(self) -> usize {
        match self {
            BrokerProfile::Generic => 512 * 1024,
            BrokerProfile::AwsIotCore => 128 * 1024,
            BrokerProfile::AzureIotHub => 256 * 1024,
        }
    }

    /// The name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            BrokerProfile::Generic => "generic",
            BrokerProfile::AwsIotCore => "aws_iot_core",
            BrokerProfile::AzureIotHub => "azure_iot_hub",
        }
    }
}

fn default_max_attempts() -> u32 {
    super::state::DEFAULT_MAX_ATTEMPTS
}

fn default_deadletter_max_bytes() -> u64 {
    64 << 20
}

fn default_health_interval() -> u64 {
    60
}

fn default_health_topic() -> String {
    "outpost/{gateway}/health".into()
}

fn default_compression() -> super::Compression {
    super::Compression::None
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

impl UplinkConfig {
    /// Check `[uplink]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        let u = self;
        check_broker(c, "broker", &u.broker);
        if u.broker.tls.is_none() && !u.allow_plaintext {
            c.push(
                "broker.tls",
                "the uplink needs TLS; set uplink.allow_plaintext = true to send in plaintext",
            );
        }
        check_template(c, "topic", &u.topic, &["gateway", "group"]);
        check_template(c, "health_topic", &u.health_topic, &["gateway"]);
        if u.max_inflight == 0 {
            c.push("max_inflight", "must be at least 1");
        }
        if u.backoff_initial_ms == 0 || u.backoff_initial_ms > u.backoff_max_ms {
            c.push(
                "backoff_initial_ms",
                "must be at least 1 and at most uplink.backoff_max_ms",
            );
        }
        for (path, v) in [
            ("backlog_rate", u.backlog_rate),
            ("max_publish_rate", u.max_publish_rate),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                c.push(path, "must be a finite number, 0 or more (0: no cap)");
            }
        }
        if u.breaker_failures == 0 {
            c.push("breaker_failures", "must be at least 1");
        }
        let limit = u.max_message_bytes();
        if u.max_message_bytes == Some(0) {
            c.push("max_message_bytes", "must be at least 1");
        } else if u.batch_max_bytes > limit {
            let from = match u.max_message_bytes {
                Some(_) => "uplink.max_message_bytes".to_string(),
                None => format!("the {} broker profile's limit", u.broker_profile.name()),
            };
            c.push(
                "batch_max_bytes",
                format!("must be at most {limit} ({from}): the broker refuses larger messages"),
            );
        }
        if u.max_attempts == 0 {
            c.push("max_attempts", "must be at least 1");
        }
        if u.deadletter_max_bytes < 1 << 20 {
            c.push("deadletter_max_bytes", "must be at least 1048576 (1 MiB)");
        }
    }

    /// The largest payload the broker takes: `max_message_bytes`, else the
    /// profile's.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
            .unwrap_or_else(|| self.broker_profile.max_message_bytes())
    }

    /// The dead-letter store's directory.
    pub fn deadletter_dir(&self, state_dir: &Path) -> PathBuf {
        self.deadletter_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("deadletter"))
    }
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(extra: &str) -> Vec<(String, String)> {
        let u: UplinkConfig = toml::from_str(&format!(
            "broker = {{ host = \"h\", port = 1 }}\nallow_plaintext = true\n{extra}"
        ))
        .expect("an [uplink] table");
        let mut c = Collector::new();
        u.check(&mut c);
        c.into_problems()
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect()
    }

    /// Issue 18 (5): `outpost check` refuses a batch the broker would refuse.
    #[test]
    fn batch_max_bytes_must_fit_the_broker_profile() {
        assert!(problems("batch_max_bytes = 131072").is_empty());
        let p = problems("broker_profile = \"aws_iot_core\"\nbatch_max_bytes = 131073");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "batch_max_bytes");
        assert!(p[0].1.contains("131072"), "{p:?}");
        assert!(p[0].1.contains("aws_iot_core"), "{p:?}");
        assert!(
            problems("broker_profile = \"azure_iot_hub\"\nbatch_max_bytes = 262144").is_empty()
        );
        assert_eq!(
            problems("broker_profile = \"azure_iot_hub\"\nbatch_max_bytes = 262145")[0].0,
            "batch_max_bytes"
        );
        // The explicit limit wins over the profile, both ways.
        assert!(problems("broker_profile = \"aws_iot_core\"\nmax_message_bytes = 262144\nbatch_max_bytes = 200000").is_empty());
        let p = problems("max_message_bytes = 8192\nbatch_max_bytes = 65536");
        assert!(p[0].1.contains("uplink.max_message_bytes"), "{p:?}");
        assert_eq!(
            problems("max_attempts = 0\nmax_message_bytes = 0")
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>(),
            vec!["max_message_bytes", "max_attempts"]
        );
    }
}
