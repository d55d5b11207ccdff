//! `[aggregation]`: tumbling windows per group.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::check::Collector;

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
    /// Live runs only: a sensor silent for this long (monotonic clock) stops
    /// holding its group's watermark; a group whose sensors are all silent
    /// has its open windows closed and its state forgotten.
    pub idle_close_ms: i64,
    /// How far (event time) a sensor may run ahead of the rest of its group:
    /// a sensor more than twice this behind the group's leading sensor stops
    /// holding the group back, and, while the gateway's clock is not set, a
    /// reading more than this ahead of the others is refused (`clock_skew`).
    pub max_skew_ms: i64,
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
            max_skew_ms: 300_000,
            group_by: GroupBy::Sensor,
            groups: BTreeMap::new(),
        }
    }
}

impl AggregationConfig {
    /// Check `[aggregation]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if self.window_ms <= 0 {
            c.push("window_ms", "must be positive");
        }
        if self.allowed_lateness_ms < 0 {
            c.push("allowed_lateness_ms", "must not be negative");
        }
        if self.idle_close_ms < 0 {
            c.push("idle_close_ms", "must not be negative");
        }
        if self.max_skew_ms <= 0 {
            c.push("max_skew_ms", "must be positive");
        }
    }
}
