//! The gateway's clocks, in one place.
//!
//! - [`now_ms`]: the gateway's notion of wall-clock time, milliseconds since
//!   the Unix epoch. It is the system's wall clock, except that it never
//!   steps back while the gateway runs: between two reads it advances at
//!   least as far as the monotonic clock did ([`WallEstimate`]). A step
//!   forward (NTP setting a clock that was late, or one that booted at 1970)
//!   is taken at once; a step back (an operator or NTP setting the clock
//!   earlier) is not followed until the next start, so a reading stamped by
//!   the gateway is never earlier than the one before it, and a sensor whose
//!   clock is right is not refused as "in the future" because the gateway's
//!   clock went back.
//! - [`mono_ms`]: monotonic milliseconds since the process started. Every
//!   timer and timeout uses it (idle closes, evictions), never the wall clock.
//! - [`is_set`]: whether a wall-clock time is plausible at all. A gateway
//!   that booted without NTP or a real-time clock reads 1970; until its clock
//!   is set it cannot tell whether a reading is in the future.
//!
//! Reading timestamps and window ends are event times (they leave the
//! gateway in every aggregate); only [`now_ms`] relates them to the gateway.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// 2020-01-01T00:00:00Z: a wall clock earlier than this is not set.
pub const CLOCK_FLOOR_MS: i64 = 1_577_836_800_000;

/// Whether `wall_ms` is a wall-clock time a set clock can show (on or after
/// [`CLOCK_FLOOR_MS`]).
pub fn is_set(wall_ms: i64) -> bool {
    wall_ms >= CLOCK_FLOOR_MS
}

/// The gateway's notion of now, in milliseconds since the epoch: the wall
/// clock, never stepping back while the gateway runs (see the module
/// documentation).
pub fn now_ms() -> i64 {
    static ESTIMATE: Mutex<WallEstimate> = Mutex::new(WallEstimate::new());
    let wall = system_ms();
    let mono = mono_ms();
    ESTIMATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .observe(wall, mono)
}

/// Monotonic milliseconds since the first call in this process (the
/// process start, for any practical purpose). Unaffected by changes of the
/// wall clock.
pub fn mono_ms() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

/// The system's wall clock, as it is.
fn system_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A wall-clock estimate that never steps back: each observation of the
/// system clock (`wall`, with the monotonic clock `mono` at that moment)
/// gives the larger of the wall clock and the previous estimate advanced by
/// the monotonic time since. Pure, for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallEstimate {
    /// The last estimate and the monotonic time it was made at.
    last: Option<(i64, i64)>,
}

impl WallEstimate {
    /// No observation yet.
    pub const fn new() -> Self {
        Self { last: None }
    }

    /// The estimate for the wall clock reading `wall_ms` at monotonic
    /// `mono_ms`.
    pub fn observe(&mut self, wall_ms: i64, mono_ms: i64) -> i64 {
        let est = match self.last {
            Some((w, m)) => wall_ms.max(w.saturating_add(mono_ms.saturating_sub(m).max(0))),
            None => wall_ms,
        };
        self.last = Some((est, mono_ms));
        est
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_732_300_000_000;
    const HOUR: i64 = 3_600_000;

    #[test]
    fn follows_the_wall_clock_forward_and_never_back() {
        let mut e = WallEstimate::new();
        assert_eq!(e.observe(T, 0), T);
        assert_eq!(e.observe(T + 1_000, 1_000), T + 1_000);
        // Set back an hour: the estimate runs on with the monotonic clock.
        assert_eq!(e.observe(T + 2_000 - HOUR, 2_000), T + 2_000);
        assert_eq!(e.observe(T + 3_000 - HOUR, 3_000), T + 3_000);
        // Set forward an hour: taken at once.
        assert_eq!(e.observe(T + 4_000 + HOUR, 4_000), T + 4_000 + HOUR);
        assert_eq!(e.observe(T + 5_000 + HOUR, 5_000), T + 5_000 + HOUR);
    }

    #[test]
    fn a_clock_booted_at_1970_is_not_set_until_it_is() {
        let mut e = WallEstimate::new();
        let boot = 10_000;
        assert!(!is_set(e.observe(boot, 0)));
        assert!(!is_set(e.observe(boot + 500, 500)));
        // NTP sets it: the estimate follows.
        let set = e.observe(T, 1_000);
        assert_eq!(set, T);
        assert!(is_set(set));
    }

    #[test]
    fn the_process_clocks_move_forward() {
        let (a, b) = (now_ms(), mono_ms());
        assert!(now_ms() >= a);
        assert!(mono_ms() >= b);
    }
}
