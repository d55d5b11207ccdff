//! The wall clock, in one place: milliseconds since the Unix epoch.
//!
//! Reading timestamps and window ends are wall-clock times (they leave the
//! gateway in every aggregate); timers and timeouts use tokio's or std's
//! monotonic clock instead.

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
