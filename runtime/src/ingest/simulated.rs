//! The simulated source: a 6-axis accelerometer + gyroscope (the layout of
//! the bundled BasicMotions model) worn through a cycle of activities, with
//! injected faults (NaN, infinity, a missing channel, a far-future
//! timestamp). It is the embedded default, so `outpost run` needs no config,
//! broker or hardware. Deterministic for a given seed.

use std::f64::consts::TAU;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::IngestCtx;
use crate::check::Collector;
use crate::clock::now_ms;
use crate::ingest::reading::Reading;
use serde::Deserialize;

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

impl SimulatedSourceConfig {
    /// Check this source's table.
    pub fn check(&self, c: &mut Collector) {
        if self.sensors == 0 {
            c.push("sensors", "must be at least 1");
        }
        if !(self.rate_hz > 0.0 && self.rate_hz <= 100_000.0) {
            c.push("rate_hz", "must be in (0, 100000]");
        }
        if !(0.0..=1.0).contains(&self.fault_rate) {
            c.push("fault_rate", "must be in [0, 1]");
        }
        if self.activity_s <= 0.0 {
            c.push("activity_s", "must be positive");
        }
    }
}

/// Activity profiles: name, mean per channel, amplitude per channel, frequency (Hz).
const ACTIVITIES: [(&str, [f64; 6], [f64; 6], f64); 4] = [
    (
        "standing",
        [-0.2, 0.1, 0.0, 0.0, 0.0, 0.0],
        [0.2, 0.6, 0.2, 0.1, 0.07, 0.25],
        0.3,
    ),
    (
        "walking",
        [1.0, 0.2, -0.2, 0.1, -0.05, 0.0],
        [1.4, 3.6, 1.0, 0.8, 0.5, 1.5],
        1.8,
    ),
    (
        "running",
        [4.0, -4.5, -2.0, 0.0, 0.0, 0.0],
        [10.0, 9.0, 3.2, 1.7, 1.4, 5.0],
        2.8,
    ),
    (
        "badminton",
        [4.0, -0.8, -0.9, -0.2, -0.2, -0.3],
        [7.0, 6.5, 6.0, 3.0, 3.0, 4.0],
        1.2,
    ),
];

/// Generates readings for a set of sensors; pure and seeded.
pub struct Generator {
    rng: SmallRng,
    sensors: Vec<Arc<str>>,
    phases: Vec<[f64; 6]>,
    period_ms: i64,
    activity_ms: i64,
    fault_rate: f64,
}

impl Generator {
    /// A generator for `cfg`.
    pub fn new(cfg: &SimulatedSourceConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let sensors: Vec<Arc<str>> = (0..cfg.sensors)
            .map(|i| Arc::from(format!("sim-{i}")))
            .collect();
        let phases = sensors
            .iter()
            .map(|_| std::array::from_fn(|_| rng.random::<f64>() * TAU))
            .collect();
        Self {
            rng,
            sensors,
            phases,
            period_ms: ((1000.0 / cfg.rate_hz).round() as i64).max(1),
            activity_ms: (cfg.activity_s * 1000.0) as i64,
            fault_rate: cfg.fault_rate,
        }
    }

    /// Milliseconds between readings of one sensor.
    pub fn period_ms(&self) -> i64 {
        self.period_ms
    }

    /// The readings of every sensor at event time `ts_ms` (sample index `k`).
    /// Faulty readings are included as they would arrive; ingest refuses them.
    pub fn tick(&mut self, k: u64, ts_ms: i64) -> Vec<Reading> {
        let mut out = Vec::with_capacity(self.sensors.len());
        for (i, sensor) in self.sensors.iter().enumerate() {
            // Sensors start the activity cycle at different points.
            let slot = (ts_ms / self.activity_ms.max(1)) as usize + i;
            let (_, mean, amp, freq) = ACTIVITIES[slot % ACTIVITIES.len()];
            let t = k as f64 * self.period_ms as f64 / 1000.0;
            let mut values: Vec<f32> = (0..6)
                .map(|c| {
                    let s = (TAU * freq * t + self.phases[i][c]).sin() * std::f64::consts::SQRT_2;
                    let noise: f64 = self.rng.random_range(-0.5..0.5);
                    (mean[c] + amp[c] * (0.8 * s + 0.4 * noise)) as f32
                })
                .collect();
            let mut ts = ts_ms;
            if self.fault_rate > 0.0 && self.rng.random_bool(self.fault_rate) {
                match self.rng.random_range(0..4) {
                    0 => values[self.rng.random_range(0..6)] = f32::NAN,
                    1 => values[0] = f32::INFINITY,
                    2 => {
                        values.pop();
                    }
                    _ => ts += 24 * 3600 * 1000,
                }
            }
            out.push(Reading {
                sensor: sensor.clone(),
                ts_ms: ts,
                values,
                attrs: Default::default(),
                seq: 0,
                ack: None,
            });
        }
        out
    }
}

/// Generate readings until the limit or shutdown.
pub async fn run(cfg: SimulatedSourceConfig, ctx: IngestCtx, shutdown: CancellationToken) {
    let mut generator = Generator::new(&cfg);
    let period = generator.period_ms();
    let start = if cfg.realtime || cfg.limit == 0 {
        now_ms()
    } else {
        now_ms() - cfg.limit as i64 * period
    };
    let mut interval = tokio::time::interval(Duration::from_millis(period as u64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut k = 0u64;
    loop {
        if cfg.limit > 0 && k >= cfg.limit {
            return;
        }
        if cfg.realtime {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
        } else if shutdown.is_cancelled() {
            return;
        }
        let ts = start + k as i64 * period;
        let results = generator
            .tick(k, ts)
            .into_iter()
            .map(|r| ctx.validator.check(r, now_ms()))
            .collect();
        if !ctx.deliver(results).await {
            return;
        }
        k += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_faulty_at_the_configured_rate() {
        let cfg = SimulatedSourceConfig {
            sensors: 3,
            fault_rate: 0.1,
            ..Default::default()
        };
        let mut a = Generator::new(&cfg);
        let mut b = Generator::new(&cfg);
        let mut faults = 0;
        for k in 0..1000 {
            let ra = a.tick(k, k as i64 * 100);
            let rb = b.tick(k, k as i64 * 100);
            assert_eq!(format!("{ra:?}"), format!("{rb:?}"));
            faults += ra
                .iter()
                .filter(|r| {
                    r.values.len() != 6
                        || r.values.iter().any(|v| !v.is_finite())
                        || r.ts_ms != k as i64 * 100
                })
                .count();
        }
        assert!(
            (200..400).contains(&faults),
            "{faults} faults in 3000 readings"
        );
    }
}
