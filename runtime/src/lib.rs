//! Outpost: an edge inference runtime for on-prem gateways.
//!
//! The pipeline is a chain of stages, each a module with a typed input and
//! output and a bounded channel to the next (see [`pipeline`]):
//! [`ingest`] → [`privacy`] → [`window`] → [`inference`] → [`aggregate`] →
//! [`outbox`] → [`uplink`], with [`decisions`] to the site broker on the side.

pub mod aggregate;
pub mod audit;
pub mod check;
pub mod clock;
pub mod config;
pub mod control;
pub mod decisions;
pub mod fleet;
pub mod governance;
pub mod http;
pub mod inference;
pub mod ingest;
pub mod journal;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod pipeline;
pub mod privacy;
pub mod privacy_report;
pub mod sdnotify;
pub mod secret;
pub mod status;
pub mod supervisor;
pub mod uplink;
pub mod window;
