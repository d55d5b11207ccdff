//! Outpost's durable stores: the state that must survive a crash or a power
//! cut, each written so that opening after one finds a consistent store.
//!
//! - [`outbox`]: records awaiting delivery. [`outbox::DiskOutbox`] is a
//!   segment log with a CRC per record, group commit, repair of torn and
//!   corrupt spans, per-stream byte caps and the `drop_oldest`, `reject_new`
//!   and `coarsen` policies when full; [`outbox::MemoryOutbox`] is bounded by
//!   record count; [`outbox::SharedOutbox`] shares one between a writer and a
//!   reader.
//! - [`audit`]: an append-only, hash-chained, crash-safe event log and its
//!   verifier.
//! - [`fsutil`]: replacing a file whole or not at all (written beside,
//!   synced, renamed over, directory synced), for every small state file
//!   rewritten in place.
//!
//! - [`journal`]: the ingest journal: each accepted reading on disk before
//!   it is acknowledged, until the aggregate counting it is in the outbox.
//!
//! The crate knows nothing of the gateway's types. The outbox is generic
//! over a [`Record`] (the gateway implements it for its aggregate): the
//! record's stream, id and window end, and how two successive windows of a
//! stream merge. The audit log takes any event kind and JSON data; the
//! gateway's kinds, and where its logs live under the state directory, stay
//! in the runtime's `audit` module, because they describe what the gateway
//! does rather than how the log is stored (only the kind the log writes
//! itself, [`audit::kinds::RECOVERED`], is defined here).
//!
//! Each store's disk format is documented at the top of its module
//! (`outbox/disk.rs` for the segment log, `audit.rs` for the audit log); a
//! change to one is a change of format version.

pub mod audit;
#[cfg(test)]
mod crash_runs;
pub mod deadletter;
pub mod fs;
pub mod fsutil;
pub mod journal;
pub mod outbox;
#[cfg(any(test, feature = "simdisk"))]
pub mod simdisk;

pub use outbox::Record;
