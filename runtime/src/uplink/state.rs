//! The uplink's protocol state, free of I/O: in-flight window, packet id ↔
//! outbox sequence, live and backlog cursors, the policy, rate limits,
//! backoff and circuit breaker. No tokio, no MQTT client: time comes in as
//! milliseconds and events as method calls, so it is tested on its own.
//!
//! A message the broker refuses (it drops the connection, or the client
//! refuses to write it) must not block what comes behind it: when a
//! connection is lost with messages unacknowledged, their records become
//! suspects and go one message at a time; a suspect message that fails
//! again is split in halves, down to single records; a record that fails
//! alone `max_attempts` times is set aside ([`Verdict::SetAside`]: the
//! caller moves it to the dead-letter store). While the same records keep
//! failing, a CONNACK does not reset the backoff; a suspect's PUBACK does.
//!
//! The circuit breaker slows a gateway down and never keeps it off a
//! healthy cloud: after `breaker_failures` failed connections in a row it
//! opens, and then one probe connection goes every probe interval (at most
//! `backoff_max`, so a returned cloud is found within it). A probe that
//! connects is half-open: one message in flight, no bulk backlog, until its
//! PUBACK closes the breaker.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

/// Capped exponential backoff with jitter (half to full delay).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max`; `seed` drives the jitter.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        exp.mul_f64(0.5 + 0.5 * self.uniform())
    }

    /// The delay before a probe of the open circuit breaker: `interval`,
    /// never more than the largest backoff (a broker that is back is found
    /// within it), jittered between three quarters and all of it.
    pub fn probe_delay(&mut self, interval: Duration) -> Duration {
        interval.min(self.max).mul_f64(0.75 + 0.25 * self.uniform())
    }

    /// A number in [0, 1) from the jitter generator (xorshift64*).
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        r as f64 / (1u64 << 53) as f64
    }

    /// A connection succeeded.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A token bucket: `per_s` tokens a second, at most one second's worth
/// banked. Time comes in as milliseconds, so it is testable without a clock.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_s: f64,
    tokens: f64,
    last_ms: Option<u64>,
}

impl RateLimit {
    /// `per_s` tokens a second; 0 means no limit.
    pub fn new(per_s: f64) -> Self {
        Self {
            per_s,
            tokens: per_s.max(1.0),
            last_ms: None,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms {
            let dt = now_ms.saturating_sub(last) as f64 / 1000.0;
            self.tokens = (self.tokens + dt * self.per_s).min(self.per_s.max(1.0));
        }
        self.last_ms = Some(now_ms);
    }

    /// Whole tokens available now.
    pub fn available(&mut self, now_ms: u64) -> usize {
        if self.per_s <= 0.0 {
            return usize::MAX;
        }
        self.refill(now_ms);
        self.tokens.floor() as usize
    }

    /// Spend one token.
    pub fn take(&mut self) {
        if self.per_s > 0.0 {
            self.tokens -= 1.0;
        }
    }

    /// Milliseconds until a token is available (0 when one is).
    pub fn wait_ms(&mut self, now_ms: u64) -> u64 {
        if self.available(now_ms) > 0 {
            return 0;
        }
        (((1.0 - self.tokens) / self.per_s) * 1000.0)
            .ceil()
            .max(1.0) as u64
    }
}

/// Where the next records to publish come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read up to `max` records from `from` (all of them live or in order).
    Live {
        /// First sequence.
        from: u64,
        /// Most records.
        max: usize,
    },
    /// Read up to `max` backlog records from `from`, below `end`.
    Backlog {
        /// First sequence.
        from: u64,
        /// Backlog end (exclusive).
        end: u64,
        /// Most records.
        max: usize,
    },
    /// Nothing may be sent now; ask again after this many milliseconds
    /// (`None`: when something changes).
    Wait(Option<u64>),
}

/// Uplink policy settings.
#[derive(Debug, Clone)]
pub struct UplinkPolicy {
    /// Unacknowledged publishes at most.
    pub max_inflight: usize,
    /// Fresh aggregates before the backlog after a reconnect.
    pub live_first: bool,
    /// Backlog records per second while live first (0: no cap).
    pub backlog_rate: f64,
    /// Publishes per second in all (0: no cap).
    pub max_publish_rate: f64,
    /// Failed connections in a row that open the circuit breaker.
    pub breaker_failures: u32,
    /// Time between two probes of the open breaker, capped at the largest
    /// backoff ([`Backoff::probe_delay`]).
    pub breaker_open: Duration,
    /// Failed deliveries of a record alone before it is set aside.
    pub max_attempts: u32,
}

/// What a lost connection or a refused message means for its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to set aside: the records are sent again.
    Retry,
    /// This record failed alone `attempts` times: set it aside (the
    /// caller stores it in the dead-letter store, removes it from the
    /// outbox and calls [`UplinkState::on_set_aside`]).
    SetAside {
        /// The record's sequence.
        seq: u64,
        /// Its failed deliveries alone.
        attempts: u32,
    },
}

/// Default of [`UplinkPolicy::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

impl UplinkPolicy {
    /// In order, no caps, breaker after 10 failures (then a probe every
    /// largest backoff).
    pub fn simple(max_inflight: usize) -> Self {
        Self {
            max_inflight,
            live_first: false,
            backlog_rate: 0.0,
            max_publish_rate: 0.0,
            breaker_failures: 10,
            breaker_open: Duration::from_secs(300),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
}

/// The circuit breaker of the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    /// Connections are tried with the backoff.
    Closed,
    /// Too many failed connections in a row: one probe connection every
    /// probe interval, no shorter backoff steps.
    Open,
    /// A probe connected: one message in flight until its PUBACK closes
    /// the breaker; a drop before that opens it again.
    HalfOpen,
}

/// The uplink protocol state, free of I/O: in-flight window, packet id ↔
/// outbox sequence, live and backlog cursors, rate limits, backoff and
/// circuit breaker.
#[derive(Debug)]
pub struct UplinkState {
    policy: UplinkPolicy,
    /// Records from here on are live (produced since the connection began).
    live_from: u64,
    /// Next live sequence to read.
    live_cursor: u64,
    /// Next backlog sequence to read (below `live_from`).
    backlog_cursor: u64,
    /// Messages handed to the client, packet id not yet known (in order),
    /// each with the records it carries.
    awaiting_pkid: VecDeque<Vec<u64>>,
    /// Messages sent with a packet id, not yet acknowledged.
    inflight: HashMap<u16, Vec<u64>>,
    /// Records of messages unacknowledged when a connection was lost, not
    /// yet acknowledged or set aside: while any is left, one message at a
    /// time (isolation).
    suspects: BTreeSet<u64>,
    /// Most records per message while isolating (halved at each failure
    /// of a message alone).
    split: usize,
    /// Failed deliveries alone, per suspect record.
    attempts: HashMap<u64, u32>,
    connected: bool,
    backoff: Backoff,
    failures: u32,
    breaker: Breaker,
    publish_limit: RateLimit,
    backlog_limit: RateLimit,
}

impl UplinkState {
    /// A disconnected state with a plain policy (in order, no caps).
    pub fn new(max_inflight: usize, backoff: Backoff) -> Self {
        Self::with_policy(UplinkPolicy::simple(max_inflight), backoff)
    }

    /// A disconnected state.
    pub fn with_policy(mut policy: UplinkPolicy, backoff: Backoff) -> Self {
        policy.max_inflight = policy.max_inflight.max(1);
        policy.breaker_failures = policy.breaker_failures.max(1);
        policy.max_attempts = policy.max_attempts.max(1);
        Self {
            publish_limit: RateLimit::new(policy.max_publish_rate),
            backlog_limit: RateLimit::new(policy.backlog_rate),
            policy,
            live_from: 0,
            live_cursor: 0,
            backlog_cursor: 0,
            awaiting_pkid: VecDeque::new(),
            inflight: HashMap::new(),
            suspects: BTreeSet::new(),
            split: usize::MAX,
            attempts: HashMap::new(),
            connected: false,
            backoff,
            failures: 0,
            breaker: Breaker::Closed,
        }
    }

    /// The broker accepted the connection. `committed_end` is the outbox's
    /// [`crate::outbox::Outbox::committed_end`]: with live first, everything
    /// before it is backlog. A probe of the open breaker makes it half-open.
    pub fn on_connected(&mut self, committed_end: u64) {
        self.connected = true;
        if self.breaker == Breaker::Closed {
            // While records keep failing, a CONNACK proves nothing about
            // them: the backoff goes on growing until one is acknowledged.
            if self.suspects.is_empty() {
                self.backoff.reset();
            }
            self.failures = 0;
        } else {
            self.breaker = Breaker::HalfOpen;
        }
        if self.policy.live_first {
            self.live_from = committed_end.max(self.backlog_cursor);
        } else {
            self.live_from = self.backlog_cursor;
        }
        self.live_cursor = self.live_from;
    }

    /// Whether the broker accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether the circuit breaker is open or half-open: the last delay was
    /// a probe's, or the connection is a probe whose first PUBACK is due.
    pub fn breaker_open(&self) -> bool {
        self.breaker != Breaker::Closed
    }

    /// Whether the connection is a probe of the open breaker, allowed one
    /// message in flight until its PUBACK.
    pub fn half_open(&self) -> bool {
        self.breaker == Breaker::HalfOpen
    }

    /// Whether messages go one at a time because records failed.
    pub fn isolating(&self) -> bool {
        !self.suspects.is_empty()
    }

    /// Most records per message now (`usize::MAX`: no limit beyond the
    /// batching settings).
    pub fn records_per_message(&self) -> usize {
        if self.isolating() {
            self.split
        } else {
            usize::MAX
        }
    }

    /// The connection was lost (call before [`UplinkState::on_disconnected`]):
    /// what it means for the messages unacknowledged. Outside isolation
    /// their records become suspects, sent one message at a time. A
    /// message sent alone that failed is split in halves; a record sent
    /// alone that failed `max_attempts` times is set aside.
    pub fn on_connection_lost(&mut self) -> Verdict {
        let unacked: Vec<&Vec<u64>> = self
            .awaiting_pkid
            .iter()
            .chain(self.inflight.values())
            .collect();
        if unacked.is_empty() {
            return Verdict::Retry;
        }
        if !self.isolating() {
            self.suspects = unacked.iter().flat_map(|m| m.iter().copied()).collect();
            self.split = usize::MAX;
            return Verdict::Retry;
        }
        // Isolating: one message in flight, so it is the one that failed.
        let failed = unacked[0].clone();
        self.suspects.extend(failed.iter().copied());
        if failed.len() > 1 {
            self.split = failed.len().div_ceil(2);
            return Verdict::Retry;
        }
        let seq = failed[0];
        let n = self.attempts.entry(seq).or_insert(0);
        *n += 1;
        if *n >= self.policy.max_attempts {
            return Verdict::SetAside { seq, attempts: *n };
        }
        Verdict::Retry
    }

    /// A record was refused before it reached the broker (larger than the
    /// broker takes): it can never be delivered, so it is set aside at once
    /// (a message of several records is split instead).
    pub fn on_refused(&mut self, seqs: &[u64]) -> Verdict {
        match seqs {
            [] => Verdict::Retry,
            [seq] => Verdict::SetAside {
                seq: *seq,
                attempts: self.attempts.get(seq).copied().unwrap_or(0),
            },
            _ => {
                self.suspects.extend(seqs.iter().copied());
                self.split = self.split.min(seqs.len().div_ceil(2));
                Verdict::Retry
            }
        }
    }

    /// A read from `from` returned these records (in sequence order):
    /// suspects in that range that it skipped are gone from the outbox
    /// (merged or dropped by its policy, or delivered), so no PUBACK will
    /// ever clear them.
    pub fn on_read(&mut self, from: u64, seqs: &[u64]) {
        let Some(&last) = seqs.last() else {
            return;
        };
        if !self.isolating() || last < from {
            return;
        }
        let gone: Vec<u64> = self
            .suspects
            .range(from..=last)
            .filter(|s| seqs.binary_search(s).is_err())
            .copied()
            .collect();
        for seq in gone {
            self.suspects.remove(&seq);
            self.attempts.remove(&seq);
        }
        if !self.isolating() {
            self.split = usize::MAX;
        }
    }

    /// Record `seq` was set aside (in the dead-letter store, out of the
    /// outbox): it is no longer a suspect, and the next connection does not
    /// pay for its failures.
    pub fn on_set_aside(&mut self, seq: u64) {
        self.suspects.remove(&seq);
        self.attempts.remove(&seq);
        self.backoff.reset();
        if !self.isolating() {
            self.split = usize::MAX;
        }
    }

    /// The connection is gone (or never came): everything unacknowledged
    /// will be re-sent from `oldest_unacked`. Returns the delay before
    /// reconnecting: the backoff, or, once too many failed in a row or a
    /// probe failed, the breaker's probe delay.
    pub fn on_disconnected(&mut self, oldest_unacked: Option<u64>) -> Duration {
        if !self.connected {
            self.failures = self.failures.saturating_add(1);
        }
        self.connected = false;
        self.awaiting_pkid.clear();
        self.inflight.clear();
        let restart = oldest_unacked.unwrap_or(self.live_cursor.max(self.backlog_cursor));
        // Suspects below the oldest record held are gone (dropped by the
        // outbox's policy, or delivered).
        self.suspects = self.suspects.split_off(&restart);
        self.attempts.retain(|seq, _| *seq >= restart);
        if oldest_unacked.is_none() {
            self.suspects.clear();
            self.attempts.clear();
        }
        self.backlog_cursor = restart;
        self.live_cursor = restart;
        self.live_from = restart;
        if self.breaker == Breaker::Closed && self.failures < self.policy.breaker_failures {
            return self.backoff.next_delay();
        }
        // Too many failures in a row, or a failed probe: (still) open.
        self.breaker = Breaker::Open;
        self.failures = 0;
        self.backoff.probe_delay(self.policy.breaker_open)
    }

    /// How many more messages the in-flight window allows (one at a time
    /// while half-open).
    pub fn room(&self) -> usize {
        if !self.connected {
            return 0;
        }
        let window = match self.breaker {
            _ if self.isolating() => 1,
            Breaker::HalfOpen => 1,
            Breaker::Closed | Breaker::Open => self.policy.max_inflight,
        };
        window.saturating_sub(self.unacked())
    }

    /// What to read next at `now_ms`. `live_pending`: the caller's last
    /// live read came back empty (so the backlog may go).
    pub fn next(&mut self, now_ms: u64, live_empty: bool) -> Next {
        let room = self.room();
        if room == 0 {
            return Next::Wait(None);
        }
        let total = self.publish_limit.available(now_ms);
        if total == 0 {
            return Next::Wait(Some(self.publish_limit.wait_ms(now_ms)));
        }
        let max = room.min(total);
        let backlog = self.backlog_cursor < self.live_from;
        if !live_empty || !backlog {
            return Next::Live {
                from: self.live_cursor,
                max,
            };
        }
        let b = self.backlog_limit.available(now_ms);
        if b == 0 {
            return Next::Wait(Some(self.backlog_limit.wait_ms(now_ms)));
        }
        Next::Backlog {
            from: self.backlog_cursor,
            end: self.live_from,
            max: max.min(b),
        }
    }

    /// The backlog has nothing left below its end.
    pub fn backlog_done(&mut self) {
        self.backlog_cursor = self.live_from;
    }

    /// Record `seq` was handed to the client in a message of its own.
    pub fn on_sent(&mut self, seq: u64) {
        self.on_sent_batch(vec![seq]);
    }

    /// One message carrying these records (in sequence order) was handed
    /// to the client.
    pub fn on_sent_batch(&mut self, seqs: Vec<u64>) {
        self.publish_limit.take();
        for &seq in &seqs {
            if seq >= self.live_from {
                self.live_cursor = self.live_cursor.max(seq + 1);
            } else {
                self.backlog_cursor = self.backlog_cursor.max(seq + 1);
                self.backlog_limit.take();
            }
        }
        self.awaiting_pkid.push_back(seqs);
    }

    /// The client wrote a publish with this packet id (in hand-over order).
    pub fn on_outgoing(&mut self, pkid: u16) {
        if let Some(seqs) = self.awaiting_pkid.pop_front() {
            self.inflight.insert(pkid, seqs);
        }
    }

    /// A PUBACK: the acknowledged records' sequences, if the message was
    /// ours. The first one of a probe closes the breaker.
    pub fn on_puback(&mut self, pkid: u16) -> Option<Vec<u64>> {
        let seqs = self.inflight.remove(&pkid)?;
        if self.breaker == Breaker::HalfOpen {
            self.breaker = Breaker::Closed;
            self.failures = 0;
            self.backoff.reset();
        }
        let mut cleared = false;
        for seq in &seqs {
            cleared |= self.suspects.remove(seq);
            self.attempts.remove(seq);
        }
        if cleared {
            // Delivery of what failed works again.
            self.backoff.reset();
            if !self.isolating() {
                self.split = usize::MAX;
            }
        }
        Some(seqs)
    }

    /// Messages handed to the client and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.awaiting_pkid.len() + self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_capped_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000), 9);
        let d: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert!((50..=100).contains(&d[0]), "{d:?}");
        assert!((100..=200).contains(&d[1]), "{d:?}");
        assert!(d[6] <= 1000 && d[6] >= 500, "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn window_pkids_acks_and_resend_after_disconnect() {
        let mut s = UplinkState::new(
            2,
            Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 1),
        );
        assert_eq!(s.room(), 0, "no sending before CONNACK");
        s.on_connected(1);
        assert_eq!(s.room(), 2);
        // In order: from the start of the outbox.
        assert_eq!(s.next(0, false), Next::Live { from: 0, max: 2 });
        s.on_sent(1);
        s.on_sent(2);
        assert_eq!(s.room(), 0);
        assert_eq!(s.next(0, false), Next::Wait(None));
        s.on_outgoing(7);
        s.on_outgoing(8);
        assert_eq!(s.on_puback(7), Some(vec![1]));
        assert_eq!(s.on_puback(99), None);
        assert_eq!(s.room(), 1);
        assert_eq!(s.next(0, false), Next::Live { from: 3, max: 1 });
        // Record 2 never acknowledged: after a disconnect it is read again.
        let _ = s.on_disconnected(Some(2));
        assert_eq!(s.unacked(), 0);
        assert_eq!(s.room(), 0);
        s.on_connected(3);
        assert_eq!(s.next(0, false), Next::Live { from: 2, max: 2 });
    }

    fn policy(live_first: bool, backlog_rate: f64, max_publish_rate: f64) -> UplinkPolicy {
        UplinkPolicy {
            max_inflight: 8,
            live_first,
            backlog_rate,
            max_publish_rate,
            breaker_failures: 3,
            breaker_open: Duration::from_secs(60),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 1)
    }

    #[test]
    fn live_first_then_backlog_at_its_rate() {
        let mut s = UplinkState::with_policy(policy(true, 2.0, 0.0), backoff());
        // 100 records were waiting (1..=100) when the connection came up.
        s.on_disconnected(Some(1));
        s.on_connected(101);
        // Live first: from 101.
        assert_eq!(s.next(0, false), Next::Live { from: 101, max: 8 });
        s.on_sent(101);
        // The live read came back empty: now the backlog, 2 per second.
        assert_eq!(
            s.next(0, true),
            Next::Backlog {
                from: 1,
                end: 101,
                max: 2
            }
        );
        s.on_sent(1);
        s.on_sent(2);
        match s.next(0, true) {
            Next::Wait(Some(ms)) => assert!((1..=500).contains(&ms), "{ms}"),
            other => panic!("{other:?}"),
        }
        // Fresh data still goes at once while the backlog waits.
        assert_eq!(s.next(0, false), Next::Live { from: 102, max: 5 });
        assert_eq!(
            s.next(1000, true),
            Next::Backlog {
                from: 3,
                end: 101,
                max: 2
            }
        );
        s.backlog_done();
        assert_eq!(s.next(1000, true), Next::Live { from: 102, max: 5 });
    }

    #[test]
    fn in_order_without_live_first() {
        let mut s = UplinkState::with_policy(policy(false, 2.0, 0.0), backoff());
        s.on_disconnected(Some(1));
        s.on_connected(101);
        assert_eq!(s.next(0, false), Next::Live { from: 1, max: 8 });
    }

    #[test]
    fn publish_rate_caps_everything() {
        let mut s = UplinkState::with_policy(policy(false, 0.0, 3.0), backoff());
        s.on_connected(1);
        assert_eq!(s.next(0, false), Next::Live { from: 0, max: 3 });
        for q in 1..=3 {
            s.on_sent(q);
            s.on_outgoing(q as u16);
            s.on_puback(q as u16);
        }
        assert!(matches!(s.next(0, false), Next::Wait(Some(_))));
        assert_eq!(s.next(1000, false), Next::Live { from: 4, max: 3 });
    }

    /// Issue 18 (6): with `breaker_open` far above the largest backoff
    /// (5 minutes against 100 ms here), the open breaker kept the gateway
    /// off a cloud that was back. It must keep probing within the largest
    /// backoff, hold the window to one message until a probe's PUBACK, and
    /// never fall back to the backoff's short first steps while open.
    #[test]
    fn open_breaker_keeps_probing_within_the_largest_backoff() {
        let mut p = policy(false, 0.0, 0.0);
        p.breaker_open = Duration::from_secs(300);
        let mut s = UplinkState::with_policy(p, backoff());
        assert!(s.on_disconnected(None) <= Duration::from_millis(100));
        assert!(s.on_disconnected(None) <= Duration::from_millis(100));
        assert!(!s.breaker_open());
        // The third failure in a row opens it; the cloud may be back any time.
        for _ in 0..20 {
            let d = s.on_disconnected(None);
            // Three quarters to all of it (74: float rounding).
            assert!(
                (Duration::from_millis(74)..=Duration::from_millis(100)).contains(&d),
                "a probe every 75 to 100 ms while open, not {d:?}"
            );
            assert!(s.breaker_open());
        }
        // A probe connects: half-open, one message at a time.
        s.on_connected(1);
        assert!(s.breaker_open());
        assert_eq!(s.room(), 1);
        assert_eq!(s.next(0, false), Next::Live { from: 0, max: 1 });
        s.on_sent(1);
        assert_eq!(s.room(), 0);
        s.on_outgoing(1);
        // The probe drops before its PUBACK: open again, probing on.
        let d = s.on_disconnected(Some(1));
        assert!((Duration::from_millis(74)..=Duration::from_millis(100)).contains(&d));
        assert!(s.breaker_open());
        // The next probe gets its PUBACK: closed, the full window, and the
        // backoff from its first step again.
        s.on_connected(2);
        assert_eq!(s.next(0, false), Next::Live { from: 1, max: 1 });
        s.on_sent(1);
        s.on_outgoing(2);
        assert_eq!(s.on_puback(2), Some(vec![1]));
        assert!(!s.breaker_open());
        assert_eq!(s.room(), 8);
        assert!(s.on_disconnected(None) <= Duration::from_millis(10));
        assert!(!s.breaker_open());
    }

    #[test]
    fn breaker_probe_interval_and_what_closes_it() {
        // A probe interval below the largest backoff is kept.
        let mut p = policy(false, 0.0, 0.0);
        p.breaker_failures = 1;
        p.breaker_open = Duration::from_millis(40);
        let mut s = UplinkState::with_policy(p, backoff());
        let d = s.on_disconnected(None);
        assert!(s.breaker_open());
        assert!((Duration::from_millis(29)..=Duration::from_millis(40)).contains(&d));
        // Only a PUBACK of a message of the probe's closes it.
        s.on_connected(1);
        assert!(s.half_open());
        let _ = s.on_puback(1);
        assert!(s.half_open(), "a PUBACK of no message of ours is no proof");
    }

    /// Send one message of `seqs` on a fresh connection and lose it before
    /// its PUBACK: the verdict, and the delay before the next connection.
    fn fail_alone(s: &mut UplinkState, seqs: Vec<u64>) -> (Verdict, Duration) {
        s.on_connected(100);
        assert_eq!(s.room(), 1, "one message at a time while isolating");
        s.on_sent_batch(seqs);
        s.on_outgoing(1);
        let v = s.on_connection_lost();
        (v, s.on_disconnected(Some(1)))
    }

    /// Issue 18 (5): a message the broker refuses (it drops the
    /// connection) was sent again after every reconnect and blocked all
    /// behind it. Its records go one message at a time, the message is
    /// split in halves down to single records, and a record that fails
    /// alone `max_attempts` times is set aside; the rest is delivered.
    #[test]
    fn a_refused_message_is_isolated_split_and_its_record_set_aside() {
        let mut p = policy(false, 0.0, 0.0);
        p.max_attempts = 3;
        let mut s = UplinkState::with_policy(p, backoff());
        s.on_connected(100);
        // A batch of 8 records and a message of 2 in flight; the broker
        // drops the connection (record 7 is the one it refuses).
        s.on_sent_batch((1..=8).collect());
        s.on_sent_batch(vec![9, 10]);
        s.on_outgoing(1);
        s.on_outgoing(2);
        assert_eq!(
            s.on_connection_lost(),
            Verdict::Retry,
            "no attempt counted yet: a network fault looks the same"
        );
        let _ = s.on_disconnected(Some(1));
        assert!(s.isolating());
        assert_eq!(s.records_per_message(), usize::MAX);
        // Alone, the batch of 8 fails: halves from now on.
        assert_eq!(fail_alone(&mut s, (1..=8).collect()).0, Verdict::Retry);
        assert_eq!(s.records_per_message(), 4);
        // The first half goes through; the second fails: quarters.
        s.on_connected(100);
        s.on_sent_batch(vec![1, 2, 3, 4]);
        s.on_outgoing(1);
        assert_eq!(s.on_puback(1), Some(vec![1, 2, 3, 4]));
        assert!(s.isolating());
        s.on_sent_batch(vec![5, 6, 7, 8]);
        s.on_outgoing(2);
        assert_eq!(s.on_connection_lost(), Verdict::Retry);
        let _ = s.on_disconnected(Some(5));
        assert_eq!(s.records_per_message(), 2);
        assert_eq!(fail_alone(&mut s, vec![7, 8]).0, Verdict::Retry);
        assert_eq!(s.records_per_message(), 1);
        // Record 7 alone: three attempts, then it is set aside.
        assert_eq!(fail_alone(&mut s, vec![7]).0, Verdict::Retry);
        assert_eq!(fail_alone(&mut s, vec![7]).0, Verdict::Retry);
        assert_eq!(
            fail_alone(&mut s, vec![7]).0,
            Verdict::SetAside {
                seq: 7,
                attempts: 3
            }
        );
        s.on_set_aside(7);
        // What was behind it goes, one at a time until the last suspect is
        // acknowledged; then the full window again.
        s.on_connected(100);
        for (pkid, seq) in [(1, 5), (2, 6), (3, 8), (4, 9)] {
            assert_eq!(s.room(), 1);
            s.on_sent(seq);
            s.on_outgoing(pkid);
            assert_eq!(s.on_puback(pkid), Some(vec![seq]));
        }
        assert!(s.isolating());
        s.on_sent(10);
        s.on_outgoing(5);
        s.on_puback(5);
        assert!(!s.isolating());
        assert_eq!(s.room(), 8);
        assert_eq!(s.records_per_message(), usize::MAX);
    }

    /// Issue 18 (5): every CONNACK reset the backoff, so a record the
    /// broker refuses was sent again at the shortest delay for ever. While
    /// the same record keeps failing the delay grows; a suspect's PUBACK
    /// resets it.
    #[test]
    fn the_backoff_grows_while_the_same_record_keeps_failing() {
        let mut p = policy(false, 0.0, 0.0);
        p.max_attempts = 100;
        let mut s = UplinkState::with_policy(
            p,
            Backoff::new(Duration::from_millis(10), Duration::from_secs(10), 7),
        );
        s.on_connected(100);
        s.on_sent(1);
        s.on_outgoing(1);
        let _ = s.on_connection_lost();
        let _ = s.on_disconnected(Some(1));
        let delays: Vec<Duration> = (0..7).map(|_| fail_alone(&mut s, vec![1]).1).collect();
        // Half to all of 10 ms << attempt: the 7th is at least 320 ms.
        assert!(delays[6] >= Duration::from_millis(320), "{delays:?}");
        s.on_connected(100);
        s.on_sent(1);
        s.on_outgoing(9);
        assert_eq!(s.on_puback(9), Some(vec![1]));
        assert!(!s.isolating());
        assert!(s.on_disconnected(Some(2)) <= Duration::from_millis(10));
    }

    #[test]
    fn a_record_larger_than_the_broker_takes_is_set_aside_at_once() {
        let mut s = UplinkState::with_policy(policy(false, 0.0, 0.0), backoff());
        s.on_connected(100);
        assert_eq!(s.on_refused(&[4, 5, 6]), Verdict::Retry);
        assert_eq!(s.records_per_message(), 2, "a message of several is split");
        assert_eq!(
            s.on_refused(&[5]),
            Verdict::SetAside {
                seq: 5,
                attempts: 0
            }
        );
        s.on_set_aside(5);
        assert!(s.isolating(), "4 and 6 still to be delivered one at a time");
    }

    /// Suspects the outbox no longer holds (merged or dropped by its
    /// policy) would keep the window at one message for ever.
    #[test]
    fn suspects_the_outbox_dropped_end_the_isolation() {
        let mut s = UplinkState::with_policy(policy(false, 0.0, 0.0), backoff());
        s.on_connected(100);
        s.on_sent_batch(vec![3, 5, 7]);
        s.on_outgoing(1);
        let _ = s.on_connection_lost();
        let _ = s.on_disconnected(Some(3));
        s.on_connected(100);
        assert!(s.isolating());
        // Read from 3: 5 and 7 were merged away, 4 and 6 are not suspects.
        s.on_read(3, &[3, 4, 6, 8]);
        assert!(s.isolating(), "3 is still to be delivered");
        s.on_sent(3);
        s.on_outgoing(2);
        assert_eq!(s.on_puback(2), Some(vec![3]));
        assert!(!s.isolating());
        assert_eq!(s.room(), 8);
    }
}
