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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ClientError, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::render_topic;
use crate::metrics::Metrics;
use crate::outbox::SharedOutbox;

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

/// The uplink protocol state, free of I/O.
#[derive(Debug)]
pub struct UplinkState {
    max_inflight: usize,
    /// Next outbox sequence to send.
    cursor: u64,
    /// Handed to the client, packet id not yet known (in order).
    awaiting_pkid: VecDeque<u64>,
    /// Sent with a packet id, not yet acknowledged.
    inflight: HashMap<u16, u64>,
    connected: bool,
    backoff: Backoff,
}

impl UplinkState {
    /// A disconnected state.
    pub fn new(max_inflight: usize, backoff: Backoff) -> Self {
        Self {
            max_inflight: max_inflight.max(1),
            cursor: 0,
            awaiting_pkid: VecDeque::new(),
            inflight: HashMap::new(),
            connected: false,
            backoff,
        }
    }

    /// The broker accepted the connection.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.backoff.reset();
    }

    /// Whether the broker accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The connection is gone: everything unacknowledged will be re-sent
    /// from `oldest_unacked`. Returns the delay before reconnecting.
    pub fn on_disconnected(&mut self, oldest_unacked: Option<u64>) -> Duration {
        self.connected = false;
        self.awaiting_pkid.clear();
        self.inflight.clear();
        if let Some(o) = oldest_unacked {
            self.cursor = self.cursor.min(o);
        }
        self.backoff.next_delay()
    }

    /// How many more records may be sent now.
    pub fn room(&self) -> usize {
        if !self.connected {
            return 0;
        }
        self.max_inflight
            .saturating_sub(self.awaiting_pkid.len() + self.inflight.len())
    }

    /// The next outbox sequence to read.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Record `seq` was handed to the client.
    pub fn on_sent(&mut self, seq: u64) {
        self.awaiting_pkid.push_back(seq);
        self.cursor = seq + 1;
    }

    /// The client wrote a publish with this packet id (in hand-over order).
    pub fn on_outgoing(&mut self, pkid: u16) {
        if let Some(seq) = self.awaiting_pkid.pop_front() {
            self.inflight.insert(pkid, seq);
        }
    }

    /// A PUBACK: the acknowledged record's sequence, if it was ours.
    pub fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        self.inflight.remove(&pkid)
    }

    /// Records handed to the client and not yet acknowledged.
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
            // Send as much as the in-flight window allows.
            while state.room() > 0 {
                let records = match outbox.read_from(state.cursor(), state.room()) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "outbox read failed");
                        break;
                    }
                };
                if records.is_empty() {
                    break;
                }
                let mut full = false;
                for r in records {
                    let topic = render_topic(
                        &settings.topic,
                        &[("gateway", &settings.gateway), ("group", &r.group)],
                    );
                    match session.try_publish(topic, r.payload().to_vec()) {
                        Ok(true) => {
                            state.on_sent(r.seq);
                            metrics.uplink_sent.inc();
                        }
                        Ok(false) => {
                            full = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "publish refused");
                            full = true;
                            break;
                        }
                    }
                }
                if full {
                    break;
                }
            }
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
                        state.on_connected();
                    }
                    Ok(SessionEvent::Published(pkid)) => state.on_outgoing(pkid),
                    Ok(SessionEvent::Acked(pkid)) => {
                        if let Some(seq) = state.on_puback(pkid) {
                            if let Err(e) = outbox.ack(seq) {
                                tracing::error!(error = %e, seq, "outbox ack failed");
                            }
                            metrics.uplink_acked.inc();
                            metrics.uplink_inflight.set(state.unacked() as i64);
                            metrics.outbox_depth.set(outbox.stats().depth as i64);
                        }
                    }
                    Err(e) => break e,
                },
                _ = outbox.appended() => {}
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
        tracing::warn!(error = %err, delay_ms = delay.as_millis() as u64, "uplink disconnected; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.now.cancelled() => return outbox.stats().depth,
        }
    }
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
        s.on_connected();
        assert_eq!(s.room(), 2);
        s.on_sent(1);
        s.on_sent(2);
        assert_eq!(s.room(), 0);
        s.on_outgoing(7);
        s.on_outgoing(8);
        assert_eq!(s.on_puback(7), Some(1));
        assert_eq!(s.on_puback(99), None);
        assert_eq!(s.room(), 1);
        assert_eq!(s.cursor(), 3);
        // Record 2 never acknowledged: after a disconnect the cursor goes back to it.
        let _ = s.on_disconnected(Some(2));
        assert_eq!(s.cursor(), 2);
        assert_eq!(s.unacked(), 0);
        assert_eq!(s.room(), 0);
    }

    /// A scripted session: acknowledges every publish except those whose
    /// sequence is listed in `drop_before_ack` (then fails the connection).
    struct FakeConnector {
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        fail_on: Vec<usize>,
        sessions: usize,
    }

    struct FakeSession {
        queue: VecDeque<SessionEvent>,
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
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

    #[tokio::test]
    async fn unacked_record_is_resent_from_the_outbox() {
        use crate::aggregate::{AGGREGATE_SCHEMA, Aggregate, ModelRef};
        use crate::outbox::MemoryOutbox;
        let outbox = SharedOutbox::new(Box::new(MemoryOutbox::new(100)));
        for i in 0..5 {
            let mut a = Aggregate {
                schema: AGGREGATE_SCHEMA,
                id: String::new(),
                gateway: "g".into(),
                group: "x".into(),
                window_start: i,
                window_end: i + 1,
                partial: false,
                readings: 1,
                late_readings: 0,
                inferences: 0,
                sensors: 1,
                model: ModelRef {
                    name: "m".into(),
                    version: "1.0.0".into(),
                },
                classes: None,
                anomalies: None,
                anomaly_rate: None,
                score: None,
            };
            a.id = a.compute_id();
            outbox.append(&a).unwrap();
        }
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        // First session: the 3rd publish is never acknowledged and the connection drops.
        let connector = FakeConnector {
            published: published.clone(),
            fail_on: vec![3],
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
        let left = tokio::time::timeout(
            Duration::from_secs(10),
            run(
                connector,
                state,
                outbox.clone(),
                UplinkSettings {
                    topic: "t/{group}".into(),
                    gateway: "g".into(),
                },
                Arc::new(Metrics::new()),
                stop,
            ),
        )
        .await
        .expect("uplink drains");
        assert_eq!(left, 0);
        assert_eq!(outbox.stats().depth, 0);
        let ids: std::collections::BTreeSet<String> = published
            .lock()
            .unwrap()
            .iter()
            .map(|p| serde_json::from_slice::<Aggregate>(p).unwrap().id)
            .collect();
        assert_eq!(ids.len(), 5, "every aggregate delivered");
        assert!(
            published.lock().unwrap().len() > 5,
            "the unacknowledged ones were re-sent"
        );
    }
}
