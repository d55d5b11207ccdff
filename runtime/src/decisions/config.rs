//! `[decisions]`: per-window decisions published to the site broker.

use serde::Deserialize;

use crate::check::Collector;
use crate::mqtt::{BrokerConfig, check_broker, check_template};

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

impl DecisionsConfig {
    /// Check `[decisions]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        check_broker(c, "broker", &self.broker);
        check_template(c, "topic", &self.topic, &["gateway", "group", "sensor"]);
        if self.queue_capacity == 0 {
            c.push("queue_capacity", "must be at least 1");
        }
    }
}
