//! The outbox: every aggregate is written here before it is published, and
//! leaves only when the cloud has acknowledged it.
//!
//! Input: [`Aggregate`] (the only type [`OutboxRecord`]s are made from, so the
//! uplink, which publishes records, can only ever send aggregates).
//! Output: [`OutboxRecord`]s read in sequence order by the uplink.
//!
//! This module defines the interface, the durable segment log
//! ([`DiskOutbox`], the default; its on-disk format is documented in
//! `outbox/disk.rs`) and an in-memory implementation bounded by record count
//! ([`MemoryOutbox`], for the embedded demo and tests).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::aggregate::Aggregate;

mod disk;
pub use disk::{DiskOutbox, DiskSettings, FullPolicy, MAX_RECORD, StreamCaps};

/// Errors of an outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// An aggregate could not be serialized.
    #[error("cannot serialize aggregate: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The storage failed.
    #[error("outbox storage: {0}")]
    Storage(String),
    /// The outbox is full and its policy is `reject_new`.
    #[error("outbox full (policy reject_new): aggregate rejected")]
    Full,
    /// A stream is at its cap and its records cannot be dropped or merged
    /// (policy `reject_new`, or one aggregate larger than the cap).
    #[error("outbox stream {0:?} at its byte cap: aggregate rejected")]
    StreamFull(String),
}

/// One stored aggregate, serialized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Position in the outbox, increasing.
    pub seq: u64,
    /// The aggregate's group (for topics and per-group order).
    pub group: String,
    /// The aggregate's id.
    pub id: String,
    /// The aggregate as JSON.
    payload: Vec<u8>,
}

impl OutboxRecord {
    /// Serialize an aggregate into a record. This is the only constructor.
    pub fn from_aggregate(seq: u64, agg: &Aggregate) -> Result<Self, OutboxError> {
        Ok(Self {
            seq,
            group: agg.group.clone(),
            id: agg.id.clone(),
            payload: serde_json::to_vec(agg)?,
        })
    }

    /// The serialized aggregate.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The aggregate's window end, ms since the epoch (`None` if the payload
    /// does not parse, which a record written by this type cannot do).
    pub fn window_end(&self) -> Option<i64> {
        #[derive(serde::Deserialize)]
        struct End {
            window_end: i64,
        }
        serde_json::from_slice::<End>(&self.payload)
            .ok()
            .map(|e| e.window_end)
    }
}

/// Counters of an outbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records held.
    pub depth: u64,
    /// Bytes held (payloads).
    pub bytes: u64,
    /// Records dropped because the outbox was full.
    pub dropped: u64,
    /// Records appended since start.
    pub appended: u64,
    /// Records acknowledged since start.
    pub acked: u64,
    /// Aggregates refused because the outbox was full (`reject_new`).
    pub rejected: u64,
    /// Corrupt spans found and moved to quarantine.
    pub quarantined: u64,
    /// Bytes moved to quarantine.
    pub quarantined_bytes: u64,
    /// Records lost to corruption (their sequences were not readable).
    pub lost: u64,
    /// Records merged into others by the `coarsen` policy.
    pub coarsened: u64,
}

/// Storage of aggregates awaiting delivery.
pub trait Outbox: Send {
    /// Store an aggregate; it is accepted (durable, visible to readers) at
    /// the next [`Outbox::commit`].
    fn append(&mut self, agg: &Aggregate) -> Result<u64, OutboxError>;
    /// Make every append so far durable and readable (group commit), and
    /// persist acknowledgements.
    fn commit(&mut self) -> Result<(), OutboxError>;
    /// Up to `max` committed, unacknowledged records with `seq >= from`, oldest first.
    fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord>, OutboxError>;
    /// The cloud acknowledged this record: remove it.
    fn ack(&mut self, seq: u64) -> Result<(), OutboxError>;
    /// The smallest sequence still held, if any.
    fn oldest(&self) -> Option<u64>;
    /// One past the newest committed record's sequence: records appended
    /// from now on have this sequence or more.
    fn committed_end(&self) -> u64;
    /// Counters.
    fn stats(&self) -> OutboxStats;
    /// Bytes held per stream (aggregate group), where the outbox keeps track.
    fn stream_bytes(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// An in-memory outbox bounded by record count.
#[derive(Debug)]
pub struct MemoryOutbox {
    records: BTreeMap<u64, OutboxRecord>,
    next_seq: u64,
    max_records: usize,
    stats: OutboxStats,
}

impl MemoryOutbox {
    /// An empty outbox holding at most `max_records`.
    pub fn new(max_records: usize) -> Self {
        Self {
            records: BTreeMap::new(),
            next_seq: 1,
            max_records: max_records.max(1),
            stats: OutboxStats::default(),
        }
    }
}

impl Outbox for MemoryOutbox {
    fn append(&mut self, agg: &Aggregate) -> Result<u64, OutboxError> {
        let seq = self.next_seq;
        let rec = OutboxRecord::from_aggregate(seq, agg)?;
        self.next_seq += 1;
        self.stats.bytes += rec.payload.len() as u64;
        self.records.insert(seq, rec);
        self.stats.appended += 1;
        while self.records.len() > self.max_records {
            if let Some((_, r)) = self.records.pop_first() {
                self.stats.bytes -= r.payload.len() as u64;
                self.stats.dropped += 1;
            }
        }
        Ok(seq)
    }

    fn commit(&mut self) -> Result<(), OutboxError> {
        Ok(())
    }

    fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord>, OutboxError> {
        Ok(self
            .records
            .range(from..)
            .take(max)
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        if let Some(r) = self.records.remove(&seq) {
            self.stats.bytes -= r.payload.len() as u64;
            self.stats.acked += 1;
        }
        Ok(())
    }

    fn oldest(&self) -> Option<u64> {
        self.records.keys().next().copied()
    }

    fn committed_end(&self) -> u64 {
        self.next_seq
    }

    fn stats(&self) -> OutboxStats {
        OutboxStats {
            depth: self.records.len() as u64,
            ..self.stats
        }
    }
}

/// An outbox shared by the aggregation writer and the uplink reader, with a
/// notification for new records.
#[derive(Clone)]
pub struct SharedOutbox {
    inner: Arc<Mutex<Box<dyn Outbox>>>,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for SharedOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedOutbox")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SharedOutbox {
    /// Share an outbox.
    pub fn new(outbox: Box<dyn Outbox>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(outbox)),
            notify: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Outbox>> {
        // A panic while holding the lock leaves the data as consistent as the
        // last completed call, so recover the guard rather than poison everything.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append (accepted at the next [`SharedOutbox::commit`]).
    pub fn append(&self, agg: &Aggregate) -> Result<u64, OutboxError> {
        self.lock().append(agg)
    }

    /// Commit and wake the uplink.
    pub fn commit(&self) -> Result<(), OutboxError> {
        self.lock().commit()?;
        self.notify.notify_one();
        Ok(())
    }

    /// See [`Outbox::read_from`].
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<OutboxRecord>, OutboxError> {
        self.lock().read_from(from, max)
    }

    /// See [`Outbox::ack`].
    pub fn ack(&self, seq: u64) -> Result<(), OutboxError> {
        self.lock().ack(seq)
    }

    /// See [`Outbox::oldest`].
    pub fn oldest(&self) -> Option<u64> {
        self.lock().oldest()
    }

    /// The window end (ms since the epoch) of the oldest committed record
    /// held, if any: how far behind the cloud is.
    pub fn oldest_window_end(&self) -> Option<i64> {
        let mut o = self.lock();
        let seq = o.oldest()?;
        let record = o.read_from(seq, 1).ok()?.into_iter().next()?;
        record.window_end()
    }

    /// See [`Outbox::committed_end`].
    pub fn committed_end(&self) -> u64 {
        self.lock().committed_end()
    }

    /// See [`Outbox::stats`].
    pub fn stats(&self) -> OutboxStats {
        self.lock().stats()
    }

    /// Bytes held per stream.
    pub fn stream_bytes(&self) -> Vec<(String, u64)> {
        self.lock().stream_bytes()
    }

    /// Wait until something is appended (or a wake-up is pending).
    pub async fn appended(&self) {
        self.notify.notified().await;
    }

    /// Wake the reader (e.g. at shutdown).
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::aggregate::{AGGREGATE_SCHEMA, ModelRef, PolicyRef};

    /// A small aggregate of group `x`, window `i`.
    pub(crate) fn agg(i: i64) -> Aggregate {
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
            inferences: 1,
            sensors: 1,
            model: ModelRef {
                name: "m".into(),
                version: "1.0.0".into(),
            },
            classes: None,
            anomalies: None,
            anomaly_rate: None,
            score: None,
            policy: PolicyRef::default(),
            models: None,
            shadow: None,
            drift: None,
        };
        a.id = a.compute_id();
        a
    }

    #[test]
    fn append_read_ack_and_bound() {
        let mut o = MemoryOutbox::new(3);
        for i in 0..5 {
            o.append(&agg(i)).unwrap();
        }
        let s = o.stats();
        assert_eq!((s.depth, s.dropped, s.appended), (3, 2, 5));
        let recs = o.read_from(0, 10).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        o.ack(4).unwrap();
        assert_eq!(o.read_from(4, 10).unwrap()[0].seq, 5);
        assert_eq!(o.oldest(), Some(3));
        let back: Aggregate = serde_json::from_slice(recs[0].payload()).unwrap();
        assert_eq!(back, agg(2));
    }
}
