//! MQTT source: subscribes to the site broker. The sensor id comes from the
//! payload or from a topic level. With a persistent session the broker keeps
//! queueing while the gateway is away. When the pipeline is full, this source
//! stops reading the connection, so the broker holds the backlog.
//!
//! QoS 1 messages are acknowledged by the client as they are read (rumqttc's
//! automatic acks): acknowledging from here would queue requests into the same
//! event loop this task polls, which deadlocks once its queue is full.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::{IngestCtx, IngestError};
use crate::check::Collector;
use crate::clock::now_ms;
use crate::mqtt::{BrokerConfig, check_broker, check_filter};
use serde::Deserialize;

/// Where the sensor id of an MQTT reading comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SensorFrom {
    /// The `sensor` field of the payload.
    Payload,
    /// The topic level at this index (0-based), e.g. `sensors/+/data` → 1.
    TopicLevel(usize),
}

impl<'de> Deserialize<'de> for SensorFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "payload" {
            return Ok(SensorFrom::Payload);
        }
        match s.strip_prefix("topic:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(SensorFrom::TopicLevel(i)),
            _ => Err(serde::de::Error::custom(format!(
                "expected \"payload\" or \"topic:<level index>\", got {s:?}"
            ))),
        }
    }
}

/// `type = "mqtt"`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Source name.
    #[serde(default = "default_mqtt_name")]
    pub name: String,
    /// The site broker.
    pub broker: BrokerConfig,
    /// Topic filters (`+` and `#` allowed).
    pub topics: Vec<String>,
    /// Where the sensor id comes from.
    #[serde(default = "default_sensor_from")]
    pub sensor_from: SensorFrom,
    /// Subscription QoS (0 or 1).
    #[serde(default = "default_qos1")]
    pub qos: u8,
    /// Keep a persistent session so the broker queues readings while we are down.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
}

fn default_mqtt_name() -> String {
    "mqtt".into()
}

fn default_sensor_from() -> SensorFrom {
    SensorFrom::Payload
}

fn default_qos1() -> u8 {
    1
}

fn default_true() -> bool {
    true
}

impl MqttSourceConfig {
    /// Check this source's table.
    pub fn check(&self, c: &mut Collector) {
        check_broker(c, "broker", &self.broker);
        if self.topics.is_empty() {
            c.push("topics", "at least one topic filter is required");
        }
        for (j, t) in self.topics.iter().enumerate() {
            if let Err(e) = check_filter(t) {
                c.push(format!("topics[{j}]"), e);
            }
        }
        if self.qos > 1 {
            c.push("qos", "must be 0 or 1");
        }
    }
}

/// The sensor id for a message on `topic`, if it comes from the topic.
pub fn sensor_from_topic(from: &SensorFrom, topic: &str) -> Option<Option<String>> {
    match from {
        SensorFrom::Payload => Some(None),
        SensorFrom::TopicLevel(i) => topic
            .split('/')
            .nth(*i)
            .filter(|s| !s.is_empty())
            .map(|s| Some(s.to_string())),
    }
}

/// The largest packet MQTT 3.1.1 can carry (remaining length 268,435,455
/// bytes, plus the fixed header).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// How long a stopping source waits for its DISCONNECT to go out.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscribe and forward until shutdown. Connection errors are retried with a
/// capped backoff; they never end the source.
pub async fn run(
    cfg: MqttSourceConfig,
    ctx: IngestCtx,
    gateway: &str,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let mut options = crate::mqtt::options(&cfg.broker, gateway, &format!("src-{}", cfg.name))
        .map_err(|error| IngestError::Mqtt {
            source_name: ctx.name.clone(),
            error,
        })?;
    options.set_clean_session(!cfg.persistent_session);
    // Take any message the broker can send (MQTT's largest), so that one
    // over `ingest.max_payload_bytes` is received, acknowledged and refused
    // (`payload_too_large`, counted): a smaller client limit would drop the
    // connection before the acknowledgement, and the broker would deliver
    // the same message again at every reconnect of a persistent session.
    // It sends only SUBSCRIBE, PUBACK and PINGREQ.
    options.set_max_packet_size(MQTT_MAX_PACKET, 64 * 1024);
    // With the ingest journal, a QoS 1 message is acknowledged only once its
    // readings are journaled (crate::journal): a crash before that leaves it
    // with the broker, which sends it again.
    options.set_manual_acks(true);
    let (acks_tx, acks_rx) = flume::unbounded::<rumqttc::Publish>();
    let mut owed: std::collections::VecDeque<rumqttc::Publish> = Default::default();
    let qos = if cfg.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut delay = Duration::from_millis(200);
    // Set once a stop is asked for: the DISCONNECT is queued, and the event
    // loop is polled until the broker has closed the connection.
    // - A poll in progress is never dropped: rumqttc acknowledges a QoS 1
    //   message as it reads it, and a poll dropped between the two would
    //   lose the acknowledgement (the broker sends the message again after
    //   the next connect: counted twice).
    // - Every message read before the DISCONNECT went out was acknowledged
    //   before it, so it is delivered; one read after it is not (the broker
    //   ignores acknowledgements after a DISCONNECT and sends it again).
    // - The socket is closed only once the broker has closed its side:
    //   closing with unread data would reset the connection, and the broker
    //   could drop the acknowledgements and the DISCONNECT still in flight.
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut disconnected = false;
    loop {
        // Acknowledgements that are due go out (the client's request queue
        // may be full: what does not fit waits for the next turn).
        while let Some(p) = owed.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            owed.pop_front();
        }
        let event = {
            let mut poll = std::pin::pin!(eventloop.poll());
            loop {
                let deadline = stopping.unwrap_or_else(tokio::time::Instant::now);
                tokio::select! {
                    e = &mut poll => break e,
                    Ok(p) = acks_rx.recv_async() => {
                        if client.try_ack(&p).is_err() {
                            owed.push_back(p);
                        }
                    }
                    _ = shutdown.cancelled(), if stopping.is_none() => {
                        if client.try_disconnect().is_err() {
                            return Ok(());
                        }
                        stopping = Some(tokio::time::Instant::now() + STOP_TIMEOUT);
                    }
                    _ = tokio::time::sleep_until(deadline), if stopping.is_some() => {
                        tracing::warn!(source = %ctx.name, "the site broker did not take the disconnect in time");
                        return Ok(());
                    }
                }
            }
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Disconnect)) => disconnected = true,
            Ok(Event::Incoming(Packet::Publish(_))) if disconnected => {}
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_millis(200);
                tracing::info!(source = %ctx.name, "connected to site broker");
                for t in &cfg.topics {
                    if let Err(e) = client.try_subscribe(t.clone(), qos) {
                        tracing::error!(source = %ctx.name, error = %e, "subscribe failed");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let key = crate::ingest::ack::message_key(&ctx.name, p.pkid, &p.topic, &p.payload);
                if p.dup
                    && let Some(recent) = &ctx.recent
                    && recent.contains(key)
                {
                    // Sent again, and its readings are already journaled:
                    // acknowledge it, count nothing twice.
                    ctx.metrics.journal.duplicates.inc();
                    if client.try_ack(&p).is_err() {
                        owed.push_back(p);
                    }
                    continue;
                }
                // Without a journal the message is acknowledged on receipt,
                // as an automatic acknowledgement would be: nothing would
                // make it safer to wait.
                if ctx.recent.is_none() && p.qos != QoS::AtMostOnce && client.try_ack(&p).is_err() {
                    owed.push_back(p.clone());
                }
                let ack = (ctx.recent.is_some() && p.qos != QoS::AtMostOnce).then(|| {
                    let (tx, p) = (acks_tx.clone(), p.clone());
                    crate::ingest::ack::Ack::new(key, move || {
                        let _ = tx.send(p);
                    })
                });
                let results = match sensor_from_topic(&cfg.sensor_from, &p.topic) {
                    Some(sensor) => {
                        ctx.validator
                            .decode_json(&p.payload, sensor.as_deref(), now_ms())
                    }
                    None => vec![Err(crate::ingest::reading::Rejection {
                        reason: crate::ingest::reading::RejectReason::InvalidField,
                        detail: format!("topic {:?} has no level {:?}", p.topic, cfg.sensor_from),
                    })],
                };
                if !ctx.deliver_acked(results, ack).await {
                    return Ok(());
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                tracing::info!(source = %ctx.name, topics = ?cfg.topics, "subscribed to site topics");
            }
            Ok(_) => {}
            Err(_) if stopping.is_some() => return Ok(()),
            Err(e) => {
                tracing::warn!(source = %ctx.name, error = %e, delay_ms = delay.as_millis() as u64, "site broker connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels() {
        assert_eq!(
            sensor_from_topic(&SensorFrom::TopicLevel(1), "sensors/pump-7/data"),
            Some(Some("pump-7".into()))
        );
        assert_eq!(
            sensor_from_topic(&SensorFrom::TopicLevel(5), "sensors/pump-7/data"),
            None
        );
        assert_eq!(sensor_from_topic(&SensorFrom::Payload, "x"), Some(None));
    }
}
