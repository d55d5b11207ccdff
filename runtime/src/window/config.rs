//! `[windowing]`: sliding windows over each sensor's readings.

use serde::Deserialize;

use crate::check::Collector;

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
    /// Live runs: a sensor that sent nothing for this long (monotonic clock)
    /// is forgotten: its readings not yet in a window go on as a tail (counted
    /// like those left at shutdown) and its buffer is freed.
    pub idle_evict_ms: u64,
}

impl Default for WindowingConfig {
    fn default() -> Self {
        Self {
            size: None,
            hop: 50,
            channel_capacity: 256,
            idle_evict_ms: 60_000,
        }
    }
}

impl WindowingConfig {
    /// Check `[windowing]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if self.channel_capacity == 0 {
            c.push("channel_capacity", "must be at least 1");
        }
        if self.idle_evict_ms == 0 {
            c.push("idle_evict_ms", "must be at least 1");
        }
        if self.hop == 0 {
            c.push("hop", "must be at least 1");
        }
        if let Some(size) = self.size {
            if size == 0 {
                c.push("size", "must be at least 1");
            }
            if self.hop > size {
                c.push("hop", format!("must not exceed windowing.size ({size})"));
            }
        }
    }
}
