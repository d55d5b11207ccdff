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

mod config;
mod session;
mod settings;
mod state;
mod task;

pub use config::UplinkConfig;
pub use session::{Connector, RumqttConnector, RumqttSession, Session, SessionEvent, UplinkError};
pub use settings::{Compression, HealthSettings, Stop, UplinkSettings, ZSTD_TOPIC_SUFFIX};
pub use state::{Backoff, Next, RateLimit, UplinkPolicy, UplinkState};
pub use task::{run, run_log_sink, spawn};
