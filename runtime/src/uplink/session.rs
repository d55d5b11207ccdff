//! The MQTT I/O of the uplink: one connection is a [`Session`], made by a
//! [`Connector`]; the rumqttc implementation is [`RumqttConnector`].

use std::time::Duration;

use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS,
};
use tokio::sync::mpsc;

/// Errors of the uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The connection failed or dropped (boxed: rumqttc's errors are large).
    #[error("connection: {0}")]
    Connection(#[source] Box<ConnectionError>),
    /// The client's event loop ended without an error (its task is gone).
    #[error("connection: event loop ended")]
    EventLoopEnded,
    /// The client refused a request.
    #[error("client: {0}")]
    Client(#[source] Box<ClientError>),
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
    /// A message on a topic subscribed with [`Session::try_subscribe`]
    /// (the control channel, [`super::Control`]).
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
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
    /// Subscribe to `topics` with QoS 1 (the control channel);
    /// `Ok(false)` when the client's queue is full.
    fn try_subscribe(&mut self, topics: &[String]) -> Result<bool, UplinkError> {
        let _ = topics;
        Ok(true)
    }
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
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(SessionEvent::Message {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    }),
                    Ok(_) => continue,
                    Err(e) => Err(UplinkError::Connection(Box::new(e))),
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
            Err(e) => Err(UplinkError::Client(Box::new(e))),
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
            Err(e) => Err(UplinkError::Client(Box::new(e))),
        }
    }

    fn try_subscribe(&mut self, topics: &[String]) -> Result<bool, UplinkError> {
        if topics.is_empty() {
            return Ok(true);
        }
        let filters = topics
            .iter()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        match self.client.try_subscribe_many(filters) {
            Ok(()) => Ok(true),
            Err(ClientError::TryRequest(_)) => Ok(false),
            Err(e) => Err(UplinkError::Client(Box::new(e))),
        }
    }

    async fn next_event(&mut self) -> Result<SessionEvent, UplinkError> {
        match self.events.recv().await {
            Some(ev) => ev,
            None => Err(UplinkError::EventLoopEnded),
        }
    }

    async fn disconnect(&mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.events.recv()).await;
    }
}
