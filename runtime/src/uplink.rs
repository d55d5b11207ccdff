//! Uplink: publishes outbox records to the cloud broker with QoS 1 and
//! removes a record from the outbox only after its PUBACK.
//!
//! - [`UplinkState`] is the protocol state without I/O (in-flight window,
//!   packet id ↔ outbox sequence, backoff), tested on its own.
//! - [`Session`]/[`Connector`] put the MQTT client behind a trait; the
//!   rumqttc implementation is [`RumqttConnector`].
//! - [`run`] drives them. Each connection gets a fresh rumqttc client and
//!   event loop: rumqttc clears its in-flight publishes on a reconnect without
//!   a broker session, so after any disconnect every unacknowledged record is
//!   re-sent from the outbox instead (at least once; consumers deduplicate by
//!   the aggregate's `id`).

mod config;
pub use config::UplinkConfig;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ClientError, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::mqtt::render_topic;
use crate::outbox::{OutboxRecord, SharedOutbox};

/// Errors of the uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The connection failed or dropped.
    #[error("connection: {0}")]
    Connection(String),
    /// The client refused a request.
    #[error("client: {0}")]
    Client(String),
}

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
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        let frac = 0.5 + 0.5 * (r as f64 / (1u64 << 53) as f64);
        exp.mul_f64(frac)
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
    /// How long the open breaker waits.
    pub breaker_open: Duration,
}

impl UplinkPolicy {
    /// In order, no caps, breaker after 10 failures for 5 minutes.
    pub fn simple(max_inflight: usize) -> Self {
        Self {
            max_inflight,
            live_first: false,
            backlog_rate: 0.0,
            max_publish_rate: 0.0,
            breaker_failures: 10,
            breaker_open: Duration::from_secs(300),
        }
    }
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
    connected: bool,
    backoff: Backoff,
    failures: u32,
    breaker_tripped: bool,
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
        Self {
            publish_limit: RateLimit::new(policy.max_publish_rate),
            backlog_limit: RateLimit::new(policy.backlog_rate),
            policy,
            live_from: 0,
            live_cursor: 0,
            backlog_cursor: 0,
            awaiting_pkid: VecDeque::new(),
            inflight: HashMap::new(),
            connected: false,
            backoff,
            failures: 0,
            breaker_tripped: false,
        }
    }

    /// The broker accepted the connection. `committed_end` is the outbox's
    /// [`crate::outbox::Outbox::committed_end`]: with live first, everything
    /// before it is backlog.
    pub fn on_connected(&mut self, committed_end: u64) {
        self.connected = true;
        self.backoff.reset();
        self.failures = 0;
        self.breaker_tripped = false;
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

    /// Whether the circuit breaker is open (the last delay was its wait).
    pub fn breaker_open(&self) -> bool {
        self.breaker_tripped
    }

    /// The connection is gone (or never came): everything unacknowledged
    /// will be re-sent from `oldest_unacked`. Returns the delay before
    /// reconnecting: the backoff, or the breaker's wait after too many
    /// failures in a row.
    pub fn on_disconnected(&mut self, oldest_unacked: Option<u64>) -> Duration {
        if !self.connected {
            self.failures = self.failures.saturating_add(1);
        }
        self.connected = false;
        self.awaiting_pkid.clear();
        self.inflight.clear();
        let restart = oldest_unacked.unwrap_or(self.live_cursor.max(self.backlog_cursor));
        self.backlog_cursor = restart;
        self.live_cursor = restart;
        self.live_from = restart;
        self.breaker_tripped = self.failures >= self.policy.breaker_failures;
        if self.breaker_tripped {
            self.failures = 0;
            self.backoff.reset();
            return self.policy.breaker_open;
        }
        self.backoff.next_delay()
    }

    /// How many more records the in-flight window allows.
    pub fn room(&self) -> usize {
        if !self.connected {
            return 0;
        }
        self.policy
            .max_inflight
            .saturating_sub(self.awaiting_pkid.len() + self.inflight.len())
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

    /// A PUBACK: the acknowledged records' sequences, if the message was ours.
    pub fn on_puback(&mut self, pkid: u16) -> Option<Vec<u64>> {
        self.inflight.remove(&pkid)
    }

    /// Messages handed to the client and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.awaiting_pkid.len() + self.inflight.len()
    }
}

/// What a session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// CONNACK received.
    Connected,
    /// A publish was written with this packet id.
    Published(u16),
    /// PUBACK for this packet id.
    Acked(u16),
}

/// One connection to a broker.
pub trait Session: Send {
    /// Hand a QoS 1 publish to the client; `Ok(false)` when its queue is full.
    fn try_publish(&mut self, topic: String, payload: Vec<u8>) -> Result<bool, UplinkError>;
    /// Hand a QoS 0 publish (a health message) to the client: no packet id,
    /// no acknowledgement, so it never takes a place in the in-flight window.
    /// `Ok(false)` when the client's queue is full (the message is skipped).
    fn try_publish_health(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<bool, UplinkError>;
    /// The next event; an error ends the session.
    fn next_event(&mut self) -> impl Future<Output = Result<SessionEvent, UplinkError>> + Send;
    /// Disconnect cleanly (best effort).
    fn disconnect(&mut self) -> impl Future<Output = ()> + Send;
}

/// Makes sessions.
pub trait Connector: Send {
    /// The session type.
    type Session: Session;
    /// Start connecting.
    fn connect(&mut self) -> Self::Session;
}

/// rumqttc sessions: a fresh client and event loop per connection; the event
/// loop is polled in its own task (so no poll is ever cancelled half-way) and
/// stops at the first error instead of reconnecting by itself.
pub struct RumqttConnector {
    options: MqttOptions,
    cap: usize,
}

impl RumqttConnector {
    /// Connector for `options`, with a client queue of `cap` requests.
    pub fn new(mut options: MqttOptions, max_inflight: u16) -> Self {
        options.set_inflight(max_inflight.max(1));
        options.set_clean_session(true);
        Self {
            options,
            cap: max_inflight as usize + 8,
        }
    }
}

/// A live rumqttc connection.
pub struct RumqttSession {
    client: AsyncClient,
    events: mpsc::Receiver<Result<SessionEvent, UplinkError>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for RumqttSession {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl Connector for RumqttConnector {
    type Session = RumqttSession;

    fn connect(&mut self) -> RumqttSession {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), self.cap);
        let (tx, events) = mpsc::channel(1024);
        let poller = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(SessionEvent::Connected),
                    // Packet id 0: a QoS 0 publish (health), not in the window.
                    Ok(Event::Outgoing(Outgoing::Publish(0))) => continue,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        Ok(SessionEvent::Published(pkid))
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ok(SessionEvent::Acked(a.pkid)),
                    Ok(_) => continue,
                    Err(e) => Err(UplinkError::Connection(e.to_string())),
                };
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    return;
                }
            }
        });
        RumqttSession {
            client,
            events,
            poller,
        }
    }
}

impl Session for RumqttSession {
    fn try_publish(&mut self, topic: String, payload: Vec<u8>) -> Result<bool, UplinkError> {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => Ok(true),
            Err(ClientError::TryRequest(_)) => Ok(false),
            Err(e) => Err(UplinkError::Client(e.to_string())),
        }
    }

    fn try_publish_health(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<bool, UplinkError> {
        match self
            .client
            .try_publish(topic, QoS::AtMostOnce, retain, payload)
        {
            Ok(()) => Ok(true),
            Err(ClientError::TryRequest(_)) => Ok(false),
            Err(e) => Err(UplinkError::Client(e.to_string())),
        }
    }

    async fn next_event(&mut self) -> Result<SessionEvent, UplinkError> {
        match self.events.recv().await {
            Some(ev) => ev,
            None => Err(UplinkError::Connection("event loop ended".into())),
        }
    }

    async fn disconnect(&mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.events.recv()).await;
    }
}

/// Uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// Topic template with `{gateway}` and `{group}`.
    pub topic: String,
    /// Gateway id.
    pub gateway: String,
    /// Several aggregates per message, as a JSON array, up to this many
    /// bytes (before compression); 0: one aggregate per message, as an object.
    pub batch_max_bytes: usize,
    /// Payload compression.
    pub compression: Compression,
    /// Periodic health messages; `None`: none.
    pub health: Option<HealthSettings>,
}

/// Health messages of the uplink.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Topic, `{gateway}` already replaced.
    pub topic: String,
    /// Time between two messages while connected (one goes at each CONNACK).
    pub interval: Duration,
    /// Publish them retained.
    pub retain: bool,
    /// Zero the data counts ([`crate::status::Status::withhold_counts`]).
    pub withhold_counts: bool,
}

/// Payload compression of the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Plain JSON.
    None,
    /// zstd (level 3); the topic gets [`ZSTD_TOPIC_SUFFIX`].
    Zstd,
}

/// Appended to the topic of a zstd-compressed message.
pub const ZSTD_TOPIC_SUFFIX: &str = "/zstd";

impl UplinkSettings {
    /// Plain settings: one aggregate per message, no compression.
    pub fn new(topic: impl Into<String>, gateway: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            gateway: gateway.into(),
            batch_max_bytes: 0,
            compression: Compression::None,
            health: None,
        }
    }

    /// Records to read for `messages` messages.
    fn records_for(&self, messages: usize) -> usize {
        if self.batch_max_bytes == 0 {
            messages
        } else {
            messages.saturating_mul(64).min(4096)
        }
    }

    /// Split records (in sequence order) into messages: runs of records that
    /// share a topic (the same group, when the template names it), each
    /// within `batch_max_bytes`. A record larger than the limit goes alone.
    pub fn batches<'a>(&self, records: &'a [OutboxRecord]) -> Vec<&'a [OutboxRecord]> {
        if self.batch_max_bytes == 0 {
            return records.chunks(1).collect();
        }
        let by_group = self.topic.contains("{group}");
        let mut out = Vec::new();
        let mut start = 0;
        let mut bytes = 2;
        for (i, r) in records.iter().enumerate() {
            let len = r.payload().len() + 1;
            let split = i > start
                && (bytes + len > self.batch_max_bytes
                    || (by_group && r.group != records[start].group));
            if split {
                out.push(&records[start..i]);
                start = i;
                bytes = 2;
            }
            bytes += len;
        }
        if start < records.len() {
            out.push(&records[start..]);
        }
        out
    }

    /// The payload of one message.
    pub fn encode(&self, batch: &[OutboxRecord]) -> std::io::Result<Vec<u8>> {
        let json = if self.batch_max_bytes == 0 && batch.len() == 1 {
            batch[0].payload().to_vec()
        } else {
            let mut v =
                Vec::with_capacity(batch.iter().map(|r| r.payload().len() + 1).sum::<usize>() + 2);
            v.push(b'[');
            for (i, r) in batch.iter().enumerate() {
                if i > 0 {
                    v.push(b',');
                }
                v.extend_from_slice(r.payload());
            }
            v.push(b']');
            v
        };
        match self.compression {
            Compression::None => Ok(json),
            Compression::Zstd => zstd::bulk::compress(&json, 3),
        }
    }
}

/// Shutdown signals of the uplink.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Upstream is done: exit once the outbox is empty.
    pub drain: CancellationToken,
    /// Exit now.
    pub now: CancellationToken,
}

/// Publish the outbox until stopped. Returns the records still undelivered.
pub async fn run<C: Connector>(
    mut connector: C,
    mut state: UplinkState,
    outbox: SharedOutbox,
    settings: UplinkSettings,
    metrics: Arc<Metrics>,
    stop: Stop,
) -> u64 {
    let mut first = true;
    let health_every = settings
        .health
        .as_ref()
        .map_or(Duration::from_secs(3600), |h| {
            h.interval.max(Duration::from_secs(1))
        });
    let mut health_tick = tokio::time::interval(health_every);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if stop.drain.is_cancelled() && outbox.oldest().is_none() {
            return 0;
        }
        if !first {
            metrics.uplink_reconnects.inc();
        }
        first = false;
        let mut session = connector.connect();
        let err = loop {
            let wait = send_ready(&mut session, &mut state, &outbox, &settings, &metrics);
            let rate_wait = async {
                match wait {
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    None => std::future::pending().await,
                }
            };
            metrics.uplink_inflight.set(state.unacked() as i64);
            if stop.drain.is_cancelled() && state.unacked() == 0 && outbox.oldest().is_none() {
                session.disconnect().await;
                metrics.uplink_connected.set(0);
                return 0;
            }
            tokio::select! {
                ev = session.next_event() => match ev {
                    Ok(SessionEvent::Connected) => {
                        tracing::info!("uplink connected");
                        metrics.uplink_connected.set(1);
                        metrics.uplink_breaker_open.set(0);
                        state.on_connected(outbox.committed_end());
                        // The first health message at once: the cloud sees
                        // the gateway back (and replaces a retained will).
                        send_health(&mut session, &settings, &metrics);
                        health_tick.reset();
                    }
                    Ok(SessionEvent::Published(pkid)) => state.on_outgoing(pkid),
                    Ok(SessionEvent::Acked(pkid)) => {
                        if let Some(seqs) = state.on_puback(pkid) {
                            for &seq in &seqs {
                                if let Err(e) = outbox.ack(seq) {
                                    tracing::error!(error = %e, seq, "outbox ack failed");
                                }
                            }
                            metrics.uplink_acked.inc_by(seqs.len() as u64);
                            metrics.uplink_inflight.set(state.unacked() as i64);
                            metrics.outbox_depth.set(outbox.stats().depth as i64);
                        }
                    }
                    Err(e) => break e,
                },
                _ = outbox.appended() => {}
                _ = rate_wait => {}
                _ = health_tick.tick(), if settings.health.is_some() => {
                    if state.is_connected() {
                        send_health(&mut session, &settings, &metrics);
                    }
                }
                _ = stop.drain.cancelled(), if !stop.drain.is_cancelled() => {}
                _ = stop.now.cancelled() => {
                    return outbox.stats().depth;
                }
            }
        };
        drop(session);
        metrics.uplink_connected.set(0);
        metrics.uplink_inflight.set(0);
        let delay = state.on_disconnected(outbox.oldest());
        if state.breaker_open() {
            metrics.uplink_breaker_open.set(1);
            tracing::error!(error = %err, wait_ms = delay.as_millis() as u64, "uplink: too many failed connections in a row; circuit breaker open");
        } else {
            tracing::warn!(error = %err, delay_ms = delay.as_millis() as u64, "uplink disconnected; reconnecting");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.now.cancelled() => return outbox.stats().depth,
        }
    }
}

/// Publish a health message (QoS 0: lost with the connection, never
/// resent; the next one carries newer numbers anyway).
fn send_health<S: Session>(session: &mut S, settings: &UplinkSettings, metrics: &Metrics) {
    let Some(h) = &settings.health else {
        return;
    };
    let mut status =
        crate::status::Status::snapshot(metrics, &settings.gateway, crate::clock::now_ms());
    if h.withhold_counts {
        status = status.withhold_counts();
    }
    // Plain data with string keys: serializing cannot fail.
    let payload = serde_json::to_vec(&status).unwrap_or_default();
    match session.try_publish_health(h.topic.clone(), payload, h.retain) {
        Ok(true) => {
            metrics.health_sent.inc();
        }
        Ok(false) => tracing::debug!("health message skipped: client queue full"),
        Err(e) => tracing::warn!(error = %e, "health message refused"),
    }
}

/// Hand the session everything the policy allows now. Returns how long to
/// wait for a rate limit, if one is what stops sending.
fn send_ready<S: Session>(
    session: &mut S,
    state: &mut UplinkState,
    outbox: &SharedOutbox,
    settings: &UplinkSettings,
    metrics: &Metrics,
) -> Option<u64> {
    let mut live_empty = false;
    loop {
        let budget;
        let (records, end) = match state.next(now_ms(), live_empty) {
            Next::Wait(w) => return w,
            Next::Live { from, max } => {
                budget = max;
                if live_empty {
                    // Live read came back empty and there is no backlog left.
                    return None;
                }
                match outbox.read_from(from, settings.records_for(max)) {
                    Ok(r) if r.is_empty() => {
                        live_empty = true;
                        continue;
                    }
                    Ok(r) => (r, u64::MAX),
                    Err(e) => {
                        tracing::error!(error = %e, "outbox read failed");
                        return None;
                    }
                }
            }
            Next::Backlog { from, end, max } => {
                match outbox.read_from(from, settings.records_for(max)) {
                    Ok(r) => {
                        budget = max;
                        let r: Vec<_> = r.into_iter().filter(|r| r.seq < end).collect();
                        if r.is_empty() {
                            state.backlog_done();
                            continue;
                        }
                        (r, end)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "outbox read failed");
                        return None;
                    }
                }
            }
        };
        debug_assert!(records.iter().all(|r| r.seq < end));
        for batch in settings.batches(&records).into_iter().take(budget) {
            let first = &batch[0];
            let mut topic = render_topic(
                &settings.topic,
                &[("gateway", &settings.gateway), ("group", &first.group)],
            );
            let payload = match settings.encode(batch) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot compress a batch");
                    return None;
                }
            };
            if settings.compression == Compression::Zstd {
                topic.push_str(ZSTD_TOPIC_SUFFIX);
            }
            let size = (topic.len() + payload.len()) as u64;
            match session.try_publish(topic, payload) {
                Ok(true) => {
                    state.on_sent_batch(batch.iter().map(|r| r.seq).collect());
                    metrics.uplink_sent.inc_by(batch.len() as u64);
                    metrics.uplink_messages.inc();
                    metrics.uplink_bytes.inc_by(size);
                }
                Ok(false) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "publish refused");
                    return None;
                }
            }
        }
        live_empty = false;
    }
}

fn now_ms() -> u64 {
    crate::clock::now_ms().max(0) as u64
}

/// No cloud configured: log each aggregate and acknowledge it.
pub async fn run_log_sink(outbox: SharedOutbox, metrics: Arc<Metrics>, stop: Stop) {
    let mut cursor = 0;
    loop {
        let records = outbox.read_from(cursor, 256).unwrap_or_default();
        for r in &records {
            tracing::info!(target: "outpost::aggregate", "{}", String::from_utf8_lossy(r.payload()));
            cursor = r.seq + 1;
            let _ = outbox.ack(r.seq);
            metrics.uplink_acked.inc();
        }
        metrics.outbox_depth.set(outbox.stats().depth as i64);
        if !records.is_empty() {
            continue;
        }
        if stop.drain.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = outbox.appended() => {}
            _ = stop.drain.cancelled() => {}
            _ = stop.now.cancelled() => return,
        }
    }
}

/// Start the uplink stage for `cfg` (`None`: aggregates are logged, the log
/// sink): it publishes the outbox's committed records to the cloud broker
/// and acknowledges them there; health messages (`withhold_counts`: without
/// data counts, under differential privacy) and the last will go with it.
/// The task returns the records left undelivered.
pub fn spawn(
    cfg: Option<&UplinkConfig>,
    gateway: &str,
    withhold_counts: bool,
    outbox: SharedOutbox,
    metrics: Arc<Metrics>,
    stop: Stop,
) -> Result<tokio::task::JoinHandle<u64>, crate::mqtt::MqttSetupError> {
    metrics
        .uplink_configured
        .store(cfg.is_some(), std::sync::atomic::Ordering::Relaxed);
    let Some(u) = cfg else {
        return Ok(tokio::spawn(async move {
            run_log_sink(outbox.clone(), metrics, stop).await;
            outbox.stats().depth
        }));
    };
    let mut options = crate::mqtt::options(&u.broker, gateway, "uplink")?;
    let health_topic = render_topic(&u.health_topic, &[("gateway", gateway)]);
    if u.health_interval_s > 0 {
        // The broker tells the cloud when the gateway vanishes.
        options.set_last_will(rumqttc::LastWill::new(
            health_topic.clone(),
            crate::status::offline_message(gateway),
            rumqttc::QoS::AtLeastOnce,
            u.health_retain,
        ));
    }
    let state = UplinkState::with_policy(
        UplinkPolicy {
            max_inflight: u.max_inflight as usize,
            live_first: u.live_first,
            backlog_rate: u.backlog_rate,
            max_publish_rate: u.max_publish_rate,
            breaker_failures: u.breaker_failures,
            breaker_open: Duration::from_millis(u.breaker_open_ms),
        },
        Backoff::new(
            Duration::from_millis(u.backoff_initial_ms),
            Duration::from_millis(u.backoff_max_ms),
            crate::clock::now_ms() as u64,
        ),
    );
    let settings = UplinkSettings {
        topic: u.topic.clone(),
        gateway: gateway.to_string(),
        batch_max_bytes: u.batch_max_bytes,
        compression: u.compression,
        health: (u.health_interval_s > 0).then(|| HealthSettings {
            topic: health_topic,
            interval: Duration::from_secs(u.health_interval_s),
            retain: u.health_retain,
            withhold_counts,
        }),
    };
    let connector = RumqttConnector::new(options, u.max_inflight);
    Ok(tokio::spawn(async move {
        run(connector, state, outbox, settings, metrics, stop).await
    }))
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

    #[test]
    fn breaker_opens_after_repeated_failures() {
        let mut s = UplinkState::with_policy(policy(false, 0.0, 0.0), backoff());
        assert!(s.on_disconnected(None) <= Duration::from_millis(100));
        assert!(s.on_disconnected(None) <= Duration::from_millis(100));
        assert!(!s.breaker_open());
        assert_eq!(s.on_disconnected(None), Duration::from_secs(60));
        assert!(s.breaker_open());
        // Then back to the backoff; a good connection closes it.
        assert!(s.on_disconnected(None) <= Duration::from_millis(100));
        s.on_connected(1);
        assert!(!s.breaker_open());
    }

    /// A scripted session: acknowledges every publish except those whose
    /// sequence is listed in `drop_before_ack` (then fails the connection).
    type Health = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

    struct FakeConnector {
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        health: Health,
        fail_on: Vec<usize>,
        sessions: usize,
    }

    struct FakeSession {
        queue: VecDeque<SessionEvent>,
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        health: Health,
        fail_at: Option<usize>,
        pkid: u16,
        count: usize,
    }

    impl Connector for FakeConnector {
        type Session = FakeSession;
        fn connect(&mut self) -> FakeSession {
            let fail_at = self.fail_on.get(self.sessions).copied();
            self.sessions += 1;
            FakeSession {
                queue: VecDeque::from([SessionEvent::Connected]),
                published: self.published.clone(),
                health: self.health.clone(),
                fail_at,
                pkid: 0,
                count: 0,
            }
        }
    }

    impl Session for FakeSession {
        fn try_publish(&mut self, _topic: String, payload: Vec<u8>) -> Result<bool, UplinkError> {
            self.count += 1;
            self.pkid += 1;
            self.published.lock().unwrap().push(payload);
            self.queue.push_back(SessionEvent::Published(self.pkid));
            if Some(self.count) != self.fail_at {
                self.queue.push_back(SessionEvent::Acked(self.pkid));
            }
            Ok(true)
        }
        fn try_publish_health(
            &mut self,
            topic: String,
            payload: Vec<u8>,
            _retain: bool,
        ) -> Result<bool, UplinkError> {
            self.health.lock().unwrap().push((topic, payload));
            Ok(true)
        }
        async fn next_event(&mut self) -> Result<SessionEvent, UplinkError> {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            if self.fail_at.is_some() {
                self.fail_at = None;
                return Err(UplinkError::Connection("scripted".into()));
            }
            std::future::pending().await
        }
        async fn disconnect(&mut self) {}
    }

    #[test]
    fn batches_follow_topic_and_size_and_compress() {
        use crate::aggregate::Aggregate;
        use crate::outbox::tests::agg;
        let records: Vec<OutboxRecord> = ["a", "a", "b", "b", "b"]
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let mut a = agg(i as i64);
                a.group = g.to_string();
                OutboxRecord::from_aggregate(i as u64 + 1, &a).unwrap()
            })
            .collect();
        let sizes = |s: &UplinkSettings| -> Vec<usize> {
            s.batches(&records).iter().map(|b| b.len()).collect()
        };
        let mut s = UplinkSettings::new("t/{gateway}/{group}", "g");
        assert_eq!(sizes(&s), vec![1, 1, 1, 1, 1]);
        assert_eq!(s.encode(&records[..1]).unwrap(), records[0].payload());
        s.batch_max_bytes = 64 * 1024;
        assert_eq!(sizes(&s), vec![2, 3], "one group per message");
        let mut all = UplinkSettings::new("t/{gateway}", "g");
        all.batch_max_bytes = 64 * 1024;
        assert_eq!(sizes(&all), vec![5]);
        all.batch_max_bytes = 2 * records[0].payload().len() + 4;
        assert_eq!(sizes(&all), vec![2, 2, 1], "byte limit");
        let plain = all.encode(&records[..2]).unwrap();
        let back: Vec<Aggregate> = serde_json::from_slice(&plain).unwrap();
        assert_eq!(back.len(), 2);
        all.compression = Compression::Zstd;
        let z = all.encode(&records[..2]).unwrap();
        assert_eq!(zstd::bulk::decompress(&z, 1 << 20).unwrap(), plain);
    }

    /// What a run over a scripted connector left behind.
    struct Drained {
        outbox: SharedOutbox,
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        health: Health,
        metrics: Arc<Metrics>,
    }

    /// `records` aggregates in a memory outbox, delivered through a fake
    /// session whose connections fail at the publishes in `fail_on`; runs
    /// until the outbox is empty (draining) and checks nothing is left.
    async fn drain_fake(records: i64, fail_on: Vec<usize>, settings: UplinkSettings) -> Drained {
        use crate::outbox::MemoryOutbox;
        let outbox = SharedOutbox::new(Box::new(MemoryOutbox::new(100)));
        for i in 0..records {
            outbox.append(&crate::outbox::tests::agg(i)).unwrap();
        }
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let health = Health::default();
        let connector = FakeConnector {
            published: published.clone(),
            health: health.clone(),
            fail_on,
            sessions: 0,
        };
        let state = UplinkState::new(
            4,
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2), 3),
        );
        let stop = Stop {
            drain: CancellationToken::new(),
            now: CancellationToken::new(),
        };
        stop.drain.cancel();
        let metrics = Arc::new(Metrics::new());
        let left = tokio::time::timeout(
            Duration::from_secs(10),
            run(
                connector,
                state,
                outbox.clone(),
                settings,
                metrics.clone(),
                stop,
            ),
        )
        .await
        .expect("uplink drains");
        assert_eq!(left, 0);
        assert_eq!(outbox.stats().depth, 0);
        Drained {
            outbox,
            published,
            health,
            metrics,
        }
    }

    #[tokio::test]
    async fn unacked_record_is_resent_from_the_outbox() {
        use crate::aggregate::Aggregate;
        // First session: the 3rd publish is never acknowledged and the connection drops.
        let d = drain_fake(5, vec![3], UplinkSettings::new("t/{group}", "g")).await;
        assert_eq!(d.outbox.stats().acked, 5);
        let ids: std::collections::BTreeSet<String> = d
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|p| serde_json::from_slice::<Aggregate>(p).unwrap().id)
            .collect();
        assert_eq!(ids.len(), 5, "every aggregate delivered");
        assert!(
            d.published.lock().unwrap().len() > 5,
            "the unacknowledged ones were re-sent"
        );
    }

    #[tokio::test]
    async fn health_goes_at_qos0_on_connect_and_bytes_are_counted() {
        let mut settings = UplinkSettings::new("t/{group}", "gw-9");
        settings.health = Some(HealthSettings {
            topic: "outpost/gw-9/health".into(),
            interval: Duration::from_secs(60),
            retain: true,
            withhold_counts: false,
        });
        // Two connections (the first fails at its 2nd publish): one health
        // message at each CONNACK, none taking a packet id from the window.
        let d = drain_fake(3, vec![2], settings).await;
        let health = d.health.lock().unwrap();
        assert_eq!(health.len(), 2, "{health:?}");
        assert_eq!(d.metrics.health_sent.get(), 2);
        let status: crate::status::Status = serde_json::from_slice(&health[0].1).unwrap();
        assert_eq!(health[0].0, "outpost/gw-9/health");
        assert_eq!(status.gateway, "gw-9");
        assert_eq!(status.kind, crate::status::HEALTH_KIND);
        // Bytes: topic and payload of every aggregate message sent.
        let sent: u64 = d
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.len() as u64 + "t/x".len() as u64)
            .sum();
        assert_eq!(d.metrics.uplink_bytes.get(), sent);
        assert_eq!(d.metrics.uplink_acked.get(), 3);
    }
}
