//! A group's event-time watermark, which one sensor cannot move. Pure
//! state, no I/O: times come in as arguments (event times in ms since the
//! epoch, `now` in monotonic ms).
//!
//! - **A sensor's watermark** is the older of its two latest readings'
//!   times, and never goes back. One reading stamped ahead (a glitch, a
//!   clock that jumps) moves nothing; two in a row do (the sensor's clock
//!   really changed). A sensor with a single reading has none yet.
//! - **The group's watermark** is the smallest watermark of the sensors that
//!   hold it, and never goes back. A sensor holds its group while it has a
//!   watermark, was seen within `idle_ms` of monotonic time (a sensor that
//!   went quiet, or died, stops holding after that, so it cannot freeze its
//!   group), and is within `2 × max_skew_ms` of the group's leading sensor
//!   (one far behind, a clock that is late or a dead sensor in a replay,
//!   stops holding: its readings become late, the others' do not wait).
//! - **Held**: a reading ahead of its group's watermark waits in its own
//!   window, which closes when the group's watermark gets there. While the
//!   gateway's clock is set, ingest refuses readings more than
//!   `ingest.max_future_ms` ahead of it, which bounds what is held.
//! - **Clock skew**: with refusal on (live runs while the gateway's clock is
//!   not set, so ingest cannot judge the future), a reading more than
//!   `max_skew_ms` ahead of the leading watermark of the *other* sensors of
//!   its group is refused: its sensor's clock is wrong. It moves nothing,
//!   and does not count as activity, so when every sensor of a group jumps
//!   together (the gateway's own clock stepped forward), they go idle, are
//!   forgotten after `idle_ms`, and start afresh. Alone in its group, a
//!   sensor is never refused. Replay refuses nothing: a gap in a recording
//!   looks like a jump of every clock, and replay has no time to wait on.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// How a group's watermark treats its sensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSettings {
    /// How far ahead of the rest of its group a sensor's readings may be.
    pub max_skew_ms: i64,
    /// A sensor not seen for this long (monotonic) stops holding its group.
    pub idle_ms: i64,
    /// Refuse readings too far ahead of the rest of their group (live runs
    /// while the gateway's clock is not set).
    pub refuse_skew: bool,
}

#[derive(Debug, Clone, Copy)]
struct SensorClock {
    /// Time of its latest accepted reading.
    latest: i64,
    /// Its watermark; `None` until its second reading.
    watermark: Option<i64>,
    /// Monotonic time it was last seen.
    seen: i64,
}

/// The watermark state of one group.
#[derive(Debug, Default)]
pub struct GroupClock {
    sensors: HashMap<Arc<str>, SensorClock>,
    /// Sensors with a watermark, by watermark.
    by_watermark: BTreeSet<(i64, Arc<str>)>,
    watermark: Option<i64>,
}

impl GroupClock {
    /// No sensor yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The group's watermark as of the last [`GroupClock::advance`]; `None`
    /// until one of its sensors has one.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Sensors tracked.
    pub fn sensors(&self) -> usize {
        self.sensors.len()
    }

    /// A reading of `sensor` at event time `ts`, seen at monotonic `now`.
    /// `false`: refused for clock skew (nothing changed).
    pub fn observe(&mut self, sensor: &Arc<str>, ts: i64, now: i64, s: &ClockSettings) -> bool {
        if s.refuse_skew
            && let Some(lead) = self.others_lead(sensor)
            && ts > lead.saturating_add(s.max_skew_ms)
        {
            return false;
        }
        let Some(c) = self.sensors.get_mut(sensor) else {
            self.sensors.insert(
                sensor.clone(),
                SensorClock {
                    latest: ts,
                    watermark: None,
                    seen: now,
                },
            );
            return true;
        };
        c.seen = c.seen.max(now);
        let candidate = c.latest.min(ts);
        c.latest = ts;
        if c.watermark.is_none_or(|w| candidate > w) {
            if let Some(w) = c.watermark {
                self.by_watermark.remove(&(w, sensor.clone()));
            }
            c.watermark = Some(candidate);
            self.by_watermark.insert((candidate, sensor.clone()));
        }
        true
    }

    /// Whether a reading of `sensor` at `ts` would be refused for clock skew.
    pub fn is_skewed(&self, sensor: &Arc<str>, ts: i64, s: &ClockSettings) -> bool {
        s.refuse_skew
            && self
                .others_lead(sensor)
                .is_some_and(|lead| ts > lead.saturating_add(s.max_skew_ms))
    }

    /// The leading watermark of the sensors other than `sensor`.
    fn others_lead(&self, sensor: &Arc<str>) -> Option<i64> {
        self.by_watermark
            .iter()
            .rev()
            .take(2)
            .find(|(_, s)| s != sensor)
            .map(|(w, _)| *w)
    }

    /// Recompute the group's watermark from the sensors that hold it.
    pub fn advance(&mut self, s: &ClockSettings) -> Option<i64> {
        if let Some((lead, _)) = self.by_watermark.last() {
            let floor = lead.saturating_sub(s.max_skew_ms.saturating_mul(2));
            let holding = self
                .by_watermark
                .range((floor, Arc::<str>::from(""))..)
                .next()
                .map(|(w, _)| *w);
            if let Some(w) = holding {
                self.watermark = Some(self.watermark.map_or(w, |old| old.max(w)));
            }
        }
        self.watermark
    }

    /// Forget the sensors not seen for `idle_ms` by monotonic `now`; returns
    /// how many. The group's watermark stays where it is.
    pub fn evict_idle(&mut self, now: i64, idle_ms: i64) -> usize {
        let idle: Vec<Arc<str>> = self
            .sensors
            .iter()
            .filter(|(_, c)| now.saturating_sub(c.seen) >= idle_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &idle {
            if let Some(c) = self.sensors.remove(k)
                && let Some(w) = c.watermark
            {
                self.by_watermark.remove(&(w, k.clone()));
            }
        }
        idle.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: ClockSettings = ClockSettings {
        max_skew_ms: 300_000,
        idle_ms: 5_000,
        refuse_skew: true,
    };
    const MIN: i64 = 60_000;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn one_reading_ahead_does_not_move_its_sensor() {
        let mut g = GroupClock::new();
        let s = id("s");
        assert!(g.observe(&s, 1_000, 0, &S));
        assert_eq!(g.advance(&S), None, "one reading: no watermark yet");
        assert!(g.observe(&s, 1_100, 0, &S));
        assert_eq!(g.advance(&S), Some(1_000));
        // Four minutes ahead, once: alone in its group, taken, but held.
        assert!(g.observe(&s, 1_200 + 4 * MIN, 0, &S));
        assert_eq!(g.advance(&S), Some(1_100));
        assert!(g.observe(&s, 1_300, 0, &S));
        assert_eq!(g.advance(&S), Some(1_300), "the outlier is passed over");
        assert!(g.observe(&s, 1_250, 0, &S));
        assert_eq!(g.advance(&S), Some(1_300), "never back");
        // Two in a row: the clock really moved.
        assert!(g.observe(&s, 10 * MIN, 0, &S));
        assert!(g.observe(&s, 10 * MIN + 100, 0, &S));
        assert_eq!(g.advance(&S), Some(10 * MIN));
    }

    #[test]
    fn the_group_waits_for_its_slowest_active_sensor() {
        let mut g = GroupClock::new();
        for (s, t) in [("a", 1_000), ("b", 2_000), ("a", 1_500), ("b", 2_500)] {
            assert!(g.observe(&id(s), t, 0, &S));
        }
        assert_eq!(g.advance(&S), Some(1_000));
        // A sensor ahead (within the skew) does not move the group.
        let c = id("c");
        assert!(g.observe(&c, 2 * MIN, 0, &S));
        assert!(g.observe(&c, 2 * MIN + 100, 0, &S));
        assert_eq!(g.advance(&S), Some(1_000));
        assert!(g.observe(&id("a"), 3_000, 0, &S));
        assert_eq!(g.advance(&S), Some(1_500));
    }

    #[test]
    fn a_sensor_far_ahead_of_the_others_is_refused() {
        let mut g = GroupClock::new();
        for (s, t) in [("a", 1_000), ("b", 1_000), ("a", 1_100), ("b", 1_100)] {
            g.observe(&id(s), t, 0, &S);
        }
        let x = id("x");
        assert!(!g.observe(&x, 1_100 + 6 * MIN, 0, &S));
        assert!(g.is_skewed(&x, 1_100 + 6 * MIN, &S));
        assert_eq!(g.sensors(), 2, "a refused reading leaves no state");
        assert!(g.observe(&x, 1_100 + 4 * MIN, 0, &S), "within the skew");
        // Refusal off (replay): taken.
        let replay = ClockSettings {
            refuse_skew: false,
            ..S
        };
        assert!(g.observe(&x, 1_100 + 60 * MIN, 0, &replay));
    }

    #[test]
    fn an_idle_sensor_stops_holding_its_group() {
        let mut g = GroupClock::new();
        for (s, t, now) in [("a", 1_000, 0), ("a", 1_100, 0), ("b", 5_000, 0)] {
            g.observe(&id(s), t, now, &S);
        }
        g.observe(&id("b"), 5_100, 4_000, &S);
        assert_eq!(g.advance(&S), Some(1_000), "a holds the group");
        assert_eq!(g.evict_idle(5_000, S.idle_ms), 1);
        assert_eq!(g.sensors(), 1);
        assert_eq!(g.advance(&S), Some(5_000));
        assert_eq!(g.evict_idle(9_000, S.idle_ms), 1);
        assert_eq!(g.sensors(), 0);
        assert_eq!(g.advance(&S), Some(5_000), "the group's watermark stays");
    }

    #[test]
    fn a_sensor_far_behind_stops_holding_its_group() {
        // The gateway's clock is set: no refusal, ingest bounds the future.
        const S: ClockSettings = ClockSettings {
            refuse_skew: false,
            ..super::tests::S
        };
        let mut g = GroupClock::new();
        for (s, t) in [("late", 1_000), ("late", 1_100), ("a", 1_000), ("a", 1_100)] {
            g.observe(&id(s), t, 0, &S);
        }
        assert_eq!(g.advance(&S), Some(1_000));
        // `a` moves on by small steps; `late` stays where it was.
        let mut t = 1_100;
        while t < 1_100 + 11 * MIN {
            t += 30_000;
            assert!(g.observe(&id("a"), t, 0, &S));
        }
        let w = g.advance(&S).unwrap();
        assert!(w > 1_100 + 9 * MIN, "{w}");
    }

    #[test]
    fn a_group_whose_sensors_all_jump_starts_afresh_once_they_idle() {
        let mut g = GroupClock::new();
        for (s, t) in [("a", 1_000), ("b", 1_000), ("a", 1_100), ("b", 1_100)] {
            g.observe(&id(s), t, 0, &S);
        }
        let hour = 60 * MIN;
        assert!(!g.observe(&id("a"), hour, 1_000, &S));
        assert!(!g.observe(&id("b"), hour, 1_000, &S));
        assert_eq!(
            g.evict_idle(5_000, S.idle_ms),
            2,
            "refusals are no activity"
        );
        assert!(g.observe(&id("a"), hour + 100, 5_000, &S));
        assert!(g.observe(&id("b"), hour + 100, 5_000, &S));
    }
}
