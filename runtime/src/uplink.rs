//! Uplink: publishes outbox records to the cloud broker with QoS 1 and
//! removes a record from the outbox only after its PUBACK.
//!
//! - [`UplinkState`] is the protocol state without I/O (in-flight window,
//!   packet id ↔ outbox sequence, backoff), tested on its own
//!   (`uplink/state.rs`).
//! - [`Session`]/[`Connector`] put the MQTT client behind a trait; the
//!   rumqttc implementation is [`RumqttConnector`] (`uplink/session.rs`).
//! - [`UplinkSettings`] (batching, [`Compression`], [`HealthSettings`]) and
//!   the shutdown signals [`Stop`] (`uplink/settings.rs`); the `[uplink]`
//!   table is [`UplinkConfig`] (`uplink/config.rs`).
//! - [`run`] drives them (`uplink/task.rs`, with [`run_log_sink`] and
//!   [`spawn`]). Each connection gets a fresh rumqttc client and
//!   event loop: rumqttc clears its in-flight publishes on a reconnect without
//!   a broker session, so after any disconnect every unacknowledged record is
//!   re-sent from the outbox instead (at least once; consumers deduplicate by
//!   the aggregate's `id`).
//! - A message the broker refuses does not block the backlog: its records
//!   go one message at a time, split in halves, and one that still fails
//!   alone `max_attempts` times is set aside by the [`DeadLetterSink`]
//!   (`uplink/deadletter.rs`); the decisions are the state's
//!   ([`Verdict`]). Records handed to the client are held in the outbox
//!   (no `coarsen` merge or drop touches them) until acknowledged or the
//!   connection is gone.
//! - A control channel ([`Control`], fleet operations) may ride on the same
//!   connection: the uplink subscribes to its topics at each CONNACK, hands
//!   it the messages received and publishes its answers at QoS 0, outside
//!   the in-flight window of aggregates.

mod config;
mod deadletter;
mod session;
mod settings;
mod state;
mod task;

pub use config::{BrokerProfile, UplinkConfig};
pub use deadletter::DeadLetterSink;
pub use session::{Connector, RumqttConnector, RumqttSession, Session, SessionEvent, UplinkError};
pub use settings::{
    Compression, Control, ControlHandle, ControlPublish, HealthSettings, Stop, UplinkSettings,
    ZSTD_TOPIC_SUFFIX,
};
pub use state::{
    Backoff, DEFAULT_MAX_ATTEMPTS, Next, RateLimit, UplinkPolicy, UplinkState, Verdict,
};
pub use task::{run, run_log_sink, spawn};
