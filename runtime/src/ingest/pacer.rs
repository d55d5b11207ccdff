//! Fixed-rate sampling slots for polled sources (I2C, Modbus): when the next
//! read is due, and how many slots were missed because a read or the system
//! ran late. Pure (instants are passed in), so it is tested without clocks.

use std::time::{Duration, Instant};

/// Slots at `start`, `start + period`, `start + 2 period` ...
#[derive(Debug, Clone)]
pub struct Pacer {
    period: Duration,
    next: Instant,
}

impl Pacer {
    /// The first slot at `start`.
    pub fn new(period: Duration, start: Instant) -> Self {
        Self {
            period: period.max(Duration::from_micros(1)),
            next: start,
        }
    }

    /// The slot due now or next.
    pub fn due(&self) -> Instant {
        self.next
    }

    /// The read of the current slot finished at `now`: move to the next
    /// slot. Slots whose whole period has already passed are skipped and
    /// returned as missed (an overrun); a slot passed by less than a period
    /// is still read, late, so the rate holds on average.
    pub fn advance(&mut self, now: Instant) -> u64 {
        self.next += self.period;
        if now <= self.next {
            return 0;
        }
        let behind = now - self.next;
        let missed = (behind.as_nanos() / self.period.as_nanos()) as u64;
        self.next += self.period * missed.min(u32::MAX as u64) as u32;
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_time_reads_miss_nothing_and_late_ones_skip_whole_slots() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(10), t0);
        assert_eq!(p.due(), t0);
        assert_eq!(p.advance(t0 + ms(1)), 0);
        assert_eq!(p.due(), t0 + ms(10));
        // A read that ends 5 ms into the next slot: read it late, miss none.
        assert_eq!(p.advance(t0 + ms(25)), 0);
        assert_eq!(p.due(), t0 + ms(20));
        // The read of the slot at 20 ends at 56: slots 30 and 40 are gone,
        // 50 is still read (late).
        assert_eq!(p.advance(t0 + ms(56)), 2);
        assert_eq!(p.due(), t0 + ms(50));
        assert_eq!(p.advance(t0 + ms(51)), 0);
        assert_eq!(p.due(), t0 + ms(60));
    }
}
