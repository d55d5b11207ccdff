//! `[metrics]`: the local endpoint and the periodic summary log line.

use serde::Deserialize;

use crate::check::Collector;

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

impl MetricsConfig {
    /// Check `[metrics]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if let Some(l) = &self.listen
            && l.parse::<std::net::SocketAddr>().is_err()
        {
            c.push(
                "listen",
                format!("{l:?} is not an address like 127.0.0.1:9464"),
            );
        }
    }
}
