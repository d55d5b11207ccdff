//! The uplink task: [`run`] drives a [`Session`] with the [`UplinkState`]
//! over the outbox, sends health messages; [`run_log_sink`] when no cloud is
//! configured; [`spawn`] starts one of them from the `[uplink]` table.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::mqtt::render_topic;
use crate::outbox::SharedOutbox;

use super::config::UplinkConfig;
use super::deadletter::DeadLetterSink;
use super::session::{Connector, RumqttConnector, Session, SessionEvent};
use super::settings::{Compression, HealthSettings, Stop, UplinkSettings, ZSTD_TOPIC_SUFFIX};
use super::state::{Backoff, Next, UplinkPolicy, UplinkState, Verdict};

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
    // Resend requests of the dead-letter store (`outpost deadletter resend`).
    let mut resend_tick = tokio::time::interval(Duration::from_secs(1));
    resend_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Some(d) = &settings.deadletter {
        d.observe(&metrics);
    }
    // Nothing is in flight before the first connection.
    outbox.release_all();
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
                        state.on_connected(outbox.committed_end());
                        // A probe of the open breaker: one message until its PUBACK.
                        tracing::info!(probe = state.half_open(), "uplink connected");
                        metrics.uplink_connected.set(1);
                        // The first health message at once: the cloud sees
                        // the gateway back (and replaces a retained will).
                        send_health(&mut session, &settings, &metrics);
                        health_tick.reset();
                        if let Some(control) = &settings.control {
                            let (topics, out) =
                                control.with(|c| (c.subscriptions(), c.on_connected()));
                            match session.try_subscribe(&topics) {
                                Ok(true) => {}
                                Ok(false) => tracing::error!(
                                    "uplink: client queue full, the control channel is not subscribed on this connection"
                                ),
                                Err(e) => break e,
                            }
                            if let Err(e) = send_control(&mut session, out) {
                                break e;
                            }
                        }
                    }
                    Ok(SessionEvent::Message { topic, payload }) => {
                        if let Some(control) = &settings.control {
                            let out = control.with(|c| c.on_message(&topic, &payload));
                            if let Err(e) = send_control(&mut session, out) {
                                break e;
                            }
                        }
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
                            metrics.uplink_breaker_open.set(state.breaker_open().into());
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
                _ = resend_tick.tick(), if settings.deadletter.is_some() && !stop.drain.is_cancelled() => {
                    if let Some(d) = &settings.deadletter {
                        d.resend(&outbox, &metrics);
                    }
                }
                _ = stop.drain.cancelled(), if !stop.drain.is_cancelled() => {}
                _ = stop.now.cancelled() => {
                    outbox.release_all();
                    return outbox.stats().depth;
                }
            }
        };
        drop(session);
        metrics.uplink_connected.set(0);
        metrics.uplink_inflight.set(0);
        metrics
            .uplink_failed_messages
            .inc_by(state.unacked() as u64);
        if let Verdict::SetAside { seq, attempts } = state.on_connection_lost() {
            let reason = format!(
                "refused: sent alone {attempts} times, each time the connection was lost before its PUBACK (last: {err})"
            );
            set_aside(
                &mut state, &outbox, &settings, &metrics, seq, attempts, &reason,
            );
        }
        // Whatever was in flight is read again: the outbox may rewrite it
        // until it is taken again.
        outbox.release_all();
        let probing = state.breaker_open();
        let delay = state.on_disconnected(outbox.oldest());
        metrics.uplink_breaker_open.set(state.breaker_open().into());
        if probing {
            metrics.uplink_breaker_probes_failed.inc();
            tracing::warn!(error = %err, delay_ms = delay.as_millis() as u64, "uplink: probe of the open circuit breaker failed; probing on");
        } else if state.breaker_open() {
            tracing::error!(error = %err, delay_ms = delay.as_millis() as u64, "uplink: too many failed connections in a row; circuit breaker open, probing");
        } else {
            tracing::warn!(error = %err, delay_ms = delay.as_millis() as u64, "uplink disconnected; reconnecting");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.now.cancelled() => return outbox.stats().depth,
        }
    }
}

/// Publish what the control channel answers, at QoS 0 (a full client
/// queue skips a message: the control channel publishes its state again
/// at the next change and at each connection).
fn send_control<S: Session>(
    session: &mut S,
    out: Vec<super::settings::ControlPublish>,
) -> Result<(), super::session::UplinkError> {
    for p in out {
        if !session.try_publish_health(p.topic, p.payload, p.retain)? {
            tracing::warn!("uplink: client queue full, a control message is skipped");
        }
    }
    Ok(())
}

/// Set record `seq` aside in the dead-letter store and take it out of the
/// outbox, as the state decided ([`Verdict::SetAside`]). Without a store,
/// or when the store cannot take it, the record stays (tried again).
fn set_aside(
    state: &mut UplinkState,
    outbox: &SharedOutbox,
    settings: &UplinkSettings,
    metrics: &Metrics,
    seq: u64,
    attempts: u32,
    reason: &str,
) -> bool {
    let Some(sink) = &settings.deadletter else {
        tracing::error!(
            seq,
            attempts,
            reason,
            "uplink: an aggregate keeps failing and there is no dead-letter store; tried again"
        );
        return false;
    };
    let record = match outbox.read_from(seq, 1) {
        Ok(r) => r.into_iter().next().filter(|r| r.seq == seq),
        Err(e) => {
            tracing::error!(error = %e, seq, "outbox read failed");
            return false;
        }
    };
    // Gone meanwhile (dropped by the outbox's policy): nothing to set aside.
    let stored = match &record {
        Some(r) => sink.set_aside(r, attempts, reason, metrics),
        None => true,
    };
    if !stored {
        return false;
    }
    if let Err(e) = outbox.ack(seq) {
        tracing::error!(error = %e, seq, "outbox ack failed");
    }
    state.on_set_aside(seq);
    metrics.outbox_depth.set(outbox.stats().depth as i64);
    true
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
                match outbox.read_held(from, settings.records_for(max)) {
                    Ok(r) if r.is_empty() => {
                        live_empty = true;
                        continue;
                    }
                    Ok(r) => {
                        state.on_read(from, &r.iter().map(|r| r.seq).collect::<Vec<_>>());
                        (r, u64::MAX)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "outbox read failed");
                        return None;
                    }
                }
            }
            Next::Backlog { from, end, max } => {
                match outbox.read_held(from, settings.records_for(max)) {
                    Ok(r) => {
                        budget = max;
                        state.on_read(from, &r.iter().map(|r| r.seq).collect::<Vec<_>>());
                        let (r, live): (Vec<_>, Vec<_>) = r.into_iter().partition(|r| r.seq < end);
                        outbox.release(&live.iter().map(|r| r.seq).collect::<Vec<_>>());
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
        // Records taken but not handed to the client are given back to the
        // outbox's policies when this pass ends.
        let mut unsent: std::collections::BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
        let give_back = |unsent: &std::collections::BTreeSet<u64>| {
            outbox.release(&unsent.iter().copied().collect::<Vec<_>>());
        };
        let per_message = state.records_per_message();
        let mut sent = 0;
        let mut reread = false;
        for batch in settings
            .batches(&records)
            .into_iter()
            .flat_map(|b| b.chunks(per_message))
        {
            if sent == budget {
                break;
            }
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
            let seqs: Vec<u64> = batch.iter().map(|r| r.seq).collect();
            if settings.max_message_bytes > 0 && payload.len() > settings.max_message_bytes {
                // The broker would refuse it: never sent.
                metrics.uplink_failed_messages.inc();
                match state.on_refused(&seqs) {
                    Verdict::SetAside { seq, attempts } => {
                        let reason = format!(
                            "too large: a {} byte message, the broker takes {} (uplink.max_message_bytes)",
                            payload.len(),
                            settings.max_message_bytes
                        );
                        if set_aside(state, outbox, settings, metrics, seq, attempts, &reason) {
                            unsent.remove(&seq);
                            continue;
                        }
                        give_back(&unsent);
                        return None;
                    }
                    // Split: read again, in smaller messages.
                    Verdict::Retry => {
                        reread = true;
                        break;
                    }
                }
            }
            let size = (topic.len() + payload.len()) as u64;
            match session.try_publish(topic, payload) {
                Ok(true) => {
                    for seq in &seqs {
                        unsent.remove(seq);
                    }
                    sent += 1;
                    state.on_sent_batch(seqs);
                    metrics.uplink_sent.inc_by(batch.len() as u64);
                    metrics.uplink_messages.inc();
                    metrics.uplink_bytes.inc_by(size);
                }
                Ok(false) => {
                    give_back(&unsent);
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publish refused");
                    give_back(&unsent);
                    return None;
                }
            }
        }
        give_back(&unsent);
        if !reread {
            live_empty = false;
        }
    }
}

/// The rate limits' clock: monotonic, so a wall-clock step neither stalls
/// nor floods the uplink.
fn now_ms() -> u64 {
    crate::clock::mono_ms().max(0) as u64
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
/// data counts, when k-anonymity or differential privacy can withhold
/// aggregates) and the last will go with it.
/// The task returns the records left undelivered. Aggregates the broker
/// keeps refusing are set aside in the dead-letter store under `state_dir`
/// (audited in `audit`); when the store cannot be opened they are retried
/// for ever instead (logged).
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: Option<&UplinkConfig>,
    gateway: &str,
    withhold_counts: bool,
    outbox: SharedOutbox,
    metrics: Arc<Metrics>,
    stop: Stop,
    state_dir: &std::path::Path,
    audit: Option<crate::governance::SharedAudit>,
    control: Option<Box<dyn super::settings::Control>>,
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
            max_attempts: u.max_attempts,
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
        max_message_bytes: u.max_message_bytes(),
        deadletter: match DeadLetterSink::open(
            &u.deadletter_dir(state_dir),
            u.deadletter_max_bytes,
            audit,
        ) {
            Ok(d) => Some(d),
            Err(e) => {
                metrics.deadletter_errors.inc();
                tracing::error!(error = %e, "cannot open the dead-letter store: aggregates the broker refuses are retried for ever");
                None
            }
        },
        control: control.map(super::settings::ControlHandle::new),
    };
    let connector = RumqttConnector::new(options, u.max_inflight);
    Ok(tokio::spawn(async move {
        run(connector, state, outbox, settings, metrics, stop).await
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio_util::sync::CancellationToken;

    use super::super::session::UplinkError;
    use super::*;

    /// A scripted session: acknowledges every publish except those whose
    /// sequence is listed in `drop_before_ack` (then fails the connection).
    type Health = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

    struct FakeConnector {
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        health: Health,
        fail_on: Vec<usize>,
        sessions: usize,
        /// The broker drops the connection on a payload over this size.
        refuse_over: usize,
    }

    struct FakeSession {
        queue: VecDeque<SessionEvent>,
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        health: Health,
        fail_at: Option<usize>,
        pkid: u16,
        count: usize,
        refuse_over: usize,
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
                refuse_over: self.refuse_over,
            }
        }
    }

    impl Session for FakeSession {
        fn try_publish(&mut self, _topic: String, payload: Vec<u8>) -> Result<bool, UplinkError> {
            self.count += 1;
            self.pkid += 1;
            if payload.len() > self.refuse_over && self.fail_at.is_none() {
                // Refused: no PUBACK, the connection drops.
                self.fail_at = Some(self.count);
            }
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
                return Err(UplinkError::Connection(Box::new(
                    rumqttc::ConnectionError::Io(std::io::Error::other("scripted")),
                )));
            }
            std::future::pending().await
        }
        async fn disconnect(&mut self) {}
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
        let aggs = (0..records).map(crate::outbox::tests::agg).collect();
        drain_aggs(aggs, fail_on, usize::MAX, settings).await
    }

    /// Like [`drain_fake`] with these aggregates, through a broker that
    /// drops the connection on a payload over `refuse_over` bytes.
    async fn drain_aggs(
        aggs: Vec<crate::aggregate::Aggregate>,
        fail_on: Vec<usize>,
        refuse_over: usize,
        settings: UplinkSettings,
    ) -> Drained {
        use crate::outbox::MemoryOutbox;
        let outbox = SharedOutbox::new(Box::new(MemoryOutbox::new(100)));
        for a in &aggs {
            outbox.append(a).unwrap();
        }
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let health = Health::default();
        let connector = FakeConnector {
            published: published.clone(),
            health: health.clone(),
            fail_on,
            sessions: 0,
            refuse_over,
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

    /// Aggregates 0..8 with number 3 large (200 classes).
    fn with_a_large_one() -> (Vec<crate::aggregate::Aggregate>, String) {
        let mut aggs: Vec<_> = (0..8).map(crate::outbox::tests::agg).collect();
        aggs[3].classes = Some((0..200).map(|c| (format!("class-{c:04}"), 1)).collect());
        aggs[3].id = aggs[3].compute_id();
        let big = aggs[3].id.clone();
        (aggs, big)
    }

    fn ids_published(d: &Drained) -> std::collections::BTreeSet<String> {
        d.published
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| serde_json::from_slice::<crate::aggregate::Aggregate>(p).ok())
            .map(|a| a.id)
            .collect()
    }

    /// Issue 18 (5), the task over the state: a broker that drops the
    /// connection on one aggregate no longer holds back the others; the
    /// aggregate is in the dead-letter store after its attempts alone.
    #[tokio::test]
    async fn an_aggregate_the_broker_refuses_goes_to_the_dead_letter_store() {
        let dir = tempfile::tempdir().unwrap();
        let (aggs, big) = with_a_large_one();
        let mut settings = UplinkSettings::new("t/{group}", "g");
        settings.deadletter = Some(DeadLetterSink::open(dir.path(), 1 << 20, None).unwrap());
        let d = drain_aggs(aggs, Vec::new(), 2000, settings).await;
        let ids = ids_published(&d);
        assert_eq!(ids.len(), 8, "all sent at least once");
        assert_eq!(
            d.metrics.uplink_acked.get(),
            7,
            "all but the refused one delivered"
        );
        assert_eq!(d.metrics.uplink_deadlettered.get(), 1);
        let held = outpost_storage::deadletter::list(dir.path()).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].record_id, big);
        assert_eq!(held[0].attempts, super::super::DEFAULT_MAX_ATTEMPTS);
    }

    /// An aggregate larger than the broker takes is never sent.
    #[tokio::test]
    async fn an_aggregate_over_the_broker_limit_is_set_aside_unsent() {
        let dir = tempfile::tempdir().unwrap();
        let (aggs, big) = with_a_large_one();
        let mut settings = UplinkSettings::new("t/{group}", "g");
        settings.max_message_bytes = 2000;
        settings.deadletter = Some(DeadLetterSink::open(dir.path(), 1 << 20, None).unwrap());
        let d = drain_aggs(aggs, Vec::new(), usize::MAX, settings).await;
        assert!(!ids_published(&d).contains(&big));
        assert_eq!(d.metrics.uplink_acked.get(), 7);
        let held = outpost_storage::deadletter::list(dir.path()).unwrap();
        assert_eq!(held.len(), 1);
        assert!(held[0].reason.contains("too large"), "{}", held[0].reason);
        assert_eq!(d.metrics.uplink_failed_messages.get(), 1);
    }

    /// A broker that acknowledges nothing until `release` is set.
    struct SlowAcks {
        release: Arc<std::sync::atomic::AtomicBool>,
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    }

    struct SlowAckSession {
        release: Arc<std::sync::atomic::AtomicBool>,
        published: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        queue: VecDeque<SessionEvent>,
        unacked: VecDeque<u16>,
        pkid: u16,
    }

    impl Connector for SlowAcks {
        type Session = SlowAckSession;
        fn connect(&mut self) -> SlowAckSession {
            SlowAckSession {
                release: self.release.clone(),
                published: self.published.clone(),
                queue: VecDeque::from([SessionEvent::Connected]),
                unacked: VecDeque::new(),
                pkid: 0,
            }
        }
    }

    impl Session for SlowAckSession {
        fn try_publish(&mut self, _topic: String, payload: Vec<u8>) -> Result<bool, UplinkError> {
            self.pkid += 1;
            self.published.lock().unwrap().push(payload);
            self.queue.push_back(SessionEvent::Published(self.pkid));
            self.unacked.push_back(self.pkid);
            Ok(true)
        }
        fn try_publish_health(
            &mut self,
            _: String,
            _: Vec<u8>,
            _: bool,
        ) -> Result<bool, UplinkError> {
            Ok(true)
        }
        async fn next_event(&mut self) -> Result<SessionEvent, UplinkError> {
            loop {
                if let Some(e) = self.queue.pop_front() {
                    return Ok(e);
                }
                if self.release.load(std::sync::atomic::Ordering::SeqCst)
                    && let Some(pkid) = self.unacked.pop_front()
                {
                    return Ok(SessionEvent::Acked(pkid));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        async fn disconnect(&mut self) {}
    }

    /// Issue 18 (4), the task over a disk outbox: `coarsen` merged a record
    /// in flight with one behind it; its PUBACK then deleted the readings
    /// merged into it. The uplink holds what it sends, so every reading
    /// arrives exactly once (after dedupe by id).
    #[tokio::test]
    async fn coarsen_under_records_in_flight_loses_no_reading() {
        use crate::outbox::{DiskOutbox, DiskSettings, FullPolicy};
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskOutbox::open(DiskSettings {
            dir: dir.path().to_path_buf(),
            segment_bytes: 4096,
            max_bytes: 32768,
            policy: FullPolicy::Coarsen,
            protect_oldest: 0,
            stream_caps: Default::default(),
        })
        .unwrap();
        let outbox = SharedOutbox::new(Box::new(disk));
        let append = |range: std::ops::Range<i64>| {
            for i in range {
                outbox.append(&crate::outbox::tests::agg(i)).unwrap();
            }
            outbox.commit().unwrap();
        };
        append(0..100);
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connector = SlowAcks {
            release: release.clone(),
            published: published.clone(),
        };
        let stop = Stop {
            drain: CancellationToken::new(),
            now: CancellationToken::new(),
        };
        let metrics = Arc::new(Metrics::new());
        // Three messages in flight: the merges pair the third with the
        // fourth, which is not.
        let state = UplinkState::new(
            3,
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2), 3),
        );
        let task = tokio::spawn(run(
            connector,
            state,
            outbox.clone(),
            UplinkSettings::new("t/{group}", "g"),
            metrics.clone(),
            stop.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.uplink_sent.get() < 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("three records in flight");
        // The outbox fills up under them: coarsen merges.
        append(100..400);
        assert!(outbox.stats().coarsened > 0);
        release.store(true, std::sync::atomic::Ordering::SeqCst);
        stop.drain.cancel();
        outbox.wake();
        let left = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the uplink drains")
            .unwrap();
        assert_eq!(left, 0);
        let mut seen = std::collections::BTreeSet::new();
        let mut readings = 0;
        for p in published.lock().unwrap().iter() {
            let a: crate::aggregate::Aggregate = serde_json::from_slice(p).unwrap();
            if seen.insert(a.id.clone()) {
                readings += a.readings;
            }
        }
        assert_eq!(readings, 400, "every reading delivered exactly once");
    }
}
