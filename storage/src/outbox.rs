//! The outbox: every record is written here before it is published, and
//! leaves only when the receiver has acknowledged it.
//!
//! Input: records of any type implementing [`Record`] (the only thing
//! [`OutboxRecord`]s are made from, so a reader of an `Outbox<R>` can only
//! ever be handed `R`s). Output: [`OutboxRecord`]s read in sequence order.
//!
//! This module defines the interface, the durable segment log
//! ([`DiskOutbox`], the default; its on-disk format is documented in
//! `outbox/disk.rs`) and an in-memory implementation bounded by record count
//! ([`MemoryOutbox`], for the embedded demo and tests).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

mod disk;
#[cfg(test)]
mod segment_file;
pub use disk::{DiskOutbox, DiskSettings, FullPolicy, MAX_RECORD, StreamCaps};

/// What an outbox holds: a summary of one stream (a sensor, a site, a line
/// ...) over a time window, stored as JSON. The outbox needs its stream (for
/// per-stream caps and merges), its id (stored beside it, for readers that
/// deduplicate), its window end (how far behind the reader is) and, for the
/// `coarsen` policy, a way to fold the next window of the same stream into it.
pub trait Record: Serialize + DeserializeOwned {
    /// The stream the record belongs to (stored as the record's `group`).
    fn stream(&self) -> &str;
    /// The record's id (stored beside the payload).
    fn id(&self) -> &str;
    /// The end of the window the record covers, ms since the Unix epoch.
    fn window_end(&self) -> i64;
    /// Fold `later` (the same stream, a later window) into this record: one
    /// coarser window covering both, with counts kept exact and the id
    /// updated to the merged content. Used by [`FullPolicy::Coarsen`].
    fn merge(&mut self, later: &Self);
    /// The window end of a serialized record, `None` if the bytes do not
    /// parse. The default parses the whole record; an implementation may
    /// read only the field it needs.
    fn window_end_of(payload: &[u8]) -> Option<i64> {
        serde_json::from_slice::<Self>(payload)
            .ok()
            .map(|r| r.window_end())
    }
}

/// Errors of an outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A record could not be serialized.
    #[error("cannot serialize aggregate: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Reading or writing a file of the outbox failed.
    #[error("outbox storage: {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The outbox is full and its policy is `reject_new`.
    #[error("outbox full (policy reject_new): aggregate rejected")]
    Full,
    /// A stream is at its cap and its records cannot be dropped or merged
    /// (policy `reject_new`, or one record larger than the cap).
    #[error("outbox stream {0:?} at its byte cap: aggregate rejected")]
    StreamFull(String),
}

/// One stored record, serialized.
pub struct OutboxRecord<R> {
    /// Position in the outbox, increasing.
    pub seq: u64,
    /// The record's stream (for topics and per-stream order).
    pub group: String,
    /// The record's id.
    pub id: String,
    /// The record as JSON.
    payload: Vec<u8>,
    /// The type the payload is a serialized `R` of.
    record: PhantomData<fn() -> R>,
}

impl<R: Record> OutboxRecord<R> {
    /// Serialize a record (an aggregate: a summary of one stream over a
    /// window). This is the only constructor.
    pub fn from_aggregate(seq: u64, record: &R) -> Result<Self, OutboxError> {
        Ok(Self {
            seq,
            group: record.stream().to_string(),
            id: record.id().to_string(),
            payload: serde_json::to_vec(record)?,
            record: PhantomData,
        })
    }

    /// The record's window end, ms since the epoch (`None` if the payload
    /// does not parse, which a record written by this type cannot do).
    pub fn window_end(&self) -> Option<i64> {
        R::window_end_of(&self.payload)
    }
}

impl<R> OutboxRecord<R> {
    /// The serialized record.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

// By hand rather than derived: a derive would require `R` to implement
// these too, and a record's bytes do not depend on it.
impl<R> std::fmt::Debug for OutboxRecord<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRecord")
            .field("seq", &self.seq)
            .field("group", &self.group)
            .field("id", &self.id)
            .field("payload", &self.payload)
            .finish()
    }
}

impl<R> Clone for OutboxRecord<R> {
    fn clone(&self) -> Self {
        Self {
            seq: self.seq,
            group: self.group.clone(),
            id: self.id.clone(),
            payload: self.payload.clone(),
            record: PhantomData,
        }
    }
}

impl<R> PartialEq for OutboxRecord<R> {
    fn eq(&self, other: &Self) -> bool {
        (self.seq, &self.group, &self.id, &self.payload)
            == (other.seq, &other.group, &other.id, &other.payload)
    }
}

impl<R> Eq for OutboxRecord<R> {}

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
    /// Records refused because the outbox was full (`reject_new`).
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

/// Records merged into one by the policy `coarsen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The merged record's id.
    pub id: String,
    /// Its stream.
    pub stream: String,
    /// The ids of the records it replaces, oldest first.
    pub from: Vec<String>,
}

/// Storage of records awaiting delivery.
pub trait Outbox<R: Record>: Send {
    /// Store a record; it is accepted (durable, visible to readers) at the
    /// next [`Outbox::commit`].
    fn append(&mut self, record: &R) -> Result<u64, OutboxError>;
    /// Make every append so far durable and readable (group commit), and
    /// persist acknowledgements.
    fn commit(&mut self) -> Result<(), OutboxError>;
    /// Up to `max` committed, unacknowledged records with `seq >= from`, oldest first.
    fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord<R>>, OutboxError>;
    /// The receiver acknowledged this record: remove it.
    fn ack(&mut self, seq: u64) -> Result<(), OutboxError>;
    /// The smallest sequence still held, if any.
    fn oldest(&self) -> Option<u64>;
    /// One past the newest committed record's sequence: records appended
    /// from now on have this sequence or more.
    fn committed_end(&self) -> u64;
    /// Counters.
    fn stats(&self) -> OutboxStats;
    /// Bytes held per stream, where the outbox keeps track.
    fn stream_bytes(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// The reader took these records for a delivery: they are in flight
    /// until acknowledged ([`Outbox::ack`]) or released. No rewrite (the
    /// `coarsen` merges, the drop policies) touches a record in flight: a
    /// merged record acknowledged by its old delivery would delete the
    /// readings merged into it, and one sent again after a merge would
    /// count them twice. An outbox without rewrites ignores this.
    fn hold(&mut self, _seqs: &[u64]) {}
    /// These records are no longer in flight (taken but not sent).
    fn release(&mut self, _seqs: &[u64]) {}
    /// No record is in flight any more (the connection is gone: whatever
    /// is unacknowledged is read again).
    fn release_all(&mut self) {}
    /// The merges made since the last call (policy `coarsen`), for the
    /// writer to record: each merged record replaces records that were
    /// committed under other ids.
    fn take_merged(&mut self) -> Vec<Merged> {
        Vec::new()
    }
    /// Give back the space of delivered records now, where the outbox
    /// keeps them until a segment is sealed (a disk is full, or filling:
    /// the caller saw a write fail). A no-op where there is nothing to give.
    fn reclaim(&mut self) -> Result<(), OutboxError> {
        Ok(())
    }
}

/// An in-memory outbox bounded by record count.
#[derive(Debug)]
pub struct MemoryOutbox<R> {
    records: BTreeMap<u64, OutboxRecord<R>>,
    next_seq: u64,
    max_records: usize,
    stats: OutboxStats,
}

impl<R> MemoryOutbox<R> {
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

impl<R: Record> Outbox<R> for MemoryOutbox<R> {
    fn append(&mut self, record: &R) -> Result<u64, OutboxError> {
        let seq = self.next_seq;
        let rec = OutboxRecord::from_aggregate(seq, record)?;
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

    fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord<R>>, OutboxError> {
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

/// An outbox shared by a writer and a reader, with a notification for new
/// records.
pub struct SharedOutbox<R> {
    inner: Arc<Mutex<Box<dyn Outbox<R>>>>,
    notify: Arc<Notify>,
}

impl<R> Clone for SharedOutbox<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            notify: self.notify.clone(),
        }
    }
}

impl<R: Record> std::fmt::Debug for SharedOutbox<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedOutbox")
            .field("stats", &self.stats())
            .finish()
    }
}

impl<R: Record> SharedOutbox<R> {
    /// Share an outbox.
    pub fn new(outbox: Box<dyn Outbox<R>>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(outbox)),
            notify: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Outbox<R>>> {
        // A panic while holding the lock leaves the data as consistent as the
        // last completed call, so recover the guard rather than poison everything.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append (accepted at the next [`SharedOutbox::commit`]).
    pub fn append(&self, record: &R) -> Result<u64, OutboxError> {
        self.lock().append(record)
    }

    /// Commit and wake the reader.
    pub fn commit(&self) -> Result<(), OutboxError> {
        self.lock().commit()?;
        self.notify.notify_one();
        Ok(())
    }

    /// See [`Outbox::read_from`].
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<OutboxRecord<R>>, OutboxError> {
        self.lock().read_from(from, max)
    }

    /// See [`Outbox::ack`].
    pub fn ack(&self, seq: u64) -> Result<(), OutboxError> {
        self.lock().ack(seq)
    }

    /// Read like [`SharedOutbox::read_from`] and hold every record read
    /// ([`Outbox::hold`]) under the same lock, so that no rewrite comes
    /// between the read and the hold. Records not sent after all are
    /// given back with [`SharedOutbox::release`].
    pub fn read_held(&self, from: u64, max: usize) -> Result<Vec<OutboxRecord<R>>, OutboxError> {
        let mut o = self.lock();
        let records = o.read_from(from, max)?;
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        o.hold(&seqs);
        Ok(records)
    }

    /// See [`Outbox::release`].
    pub fn release(&self, seqs: &[u64]) {
        if !seqs.is_empty() {
            self.lock().release(seqs);
        }
    }

    /// See [`Outbox::release_all`].
    pub fn release_all(&self) {
        self.lock().release_all();
    }

    /// See [`Outbox::take_merged`].
    pub fn take_merged(&self) -> Vec<Merged> {
        self.lock().take_merged()
    }

    /// See [`Outbox::reclaim`].
    pub fn reclaim(&self) -> Result<(), OutboxError> {
        self.lock().reclaim()
    }

    /// See [`Outbox::oldest`].
    pub fn oldest(&self) -> Option<u64> {
        self.lock().oldest()
    }

    /// The window end (ms since the epoch) of the oldest committed record
    /// held, if any: how far behind the reader is.
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
    use serde::Deserialize;
    use sha2::{Digest, Sha256};

    /// The model a test record was made by.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub(crate) struct ModelRef {
        pub(crate) name: String,
        pub(crate) version: String,
    }

    /// The policy a test record was released under.
    #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
    pub(crate) struct PolicyRef {
        pub(crate) version: String,
    }

    /// A test record: the gateway's aggregate reduced to what the outbox
    /// tests use, with the same JSON layout (so the same sizes on disk) and
    /// the same merge rules for the fields it has.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(crate) struct Agg {
        pub(crate) schema: u32,
        pub(crate) id: String,
        pub(crate) gateway: String,
        pub(crate) group: String,
        pub(crate) window_start: i64,
        pub(crate) window_end: i64,
        pub(crate) partial: bool,
        pub(crate) readings: u64,
        pub(crate) late_readings: u64,
        pub(crate) inferences: u64,
        pub(crate) sensors: u64,
        pub(crate) model: ModelRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub(crate) classes: Option<BTreeMap<String, u64>>,
        pub(crate) policy: PolicyRef,
    }

    impl Agg {
        /// The id for this content (computed with `id` empty).
        pub(crate) fn compute_id(&self) -> String {
            let mut copy = self.clone();
            copy.id = String::new();
            let bytes = serde_json::to_vec(&copy).unwrap();
            hex::encode(&Sha256::digest(&bytes)[..16])
        }
    }

    impl Record for Agg {
        fn stream(&self) -> &str {
            &self.group
        }

        fn id(&self) -> &str {
            &self.id
        }

        fn window_end(&self) -> i64 {
            self.window_end
        }

        fn merge(&mut self, later: &Self) {
            self.window_start = self.window_start.min(later.window_start);
            self.window_end = self.window_end.max(later.window_end);
            self.partial |= later.partial;
            self.readings += later.readings;
            self.late_readings += later.late_readings;
            self.sensors = self.sensors.max(later.sensors);
            self.inferences += later.inferences;
            if let Some(b) = &later.classes {
                let a = self.classes.get_or_insert_with(BTreeMap::new);
                for (k, v) in b {
                    *a.entry(k.clone()).or_insert(0) += v;
                }
            }
            self.model = later.model.clone();
            self.id = self.compute_id();
        }
    }

    /// A small record of group `x`, window `i`.
    pub(crate) fn agg(i: i64) -> Agg {
        let mut a = Agg {
            schema: 2,
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
            policy: PolicyRef::default(),
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
        let back: Agg = serde_json::from_slice(recs[0].payload()).unwrap();
        assert_eq!(back, agg(2));
    }

    #[test]
    fn a_record_carries_its_stream_id_and_window_end() {
        let mut a = agg(7);
        a.group = "line-3".into();
        a.id = a.compute_id();
        let r = OutboxRecord::from_aggregate(9, &a).unwrap();
        assert_eq!(
            (r.seq, r.group.as_str(), r.id.as_str()),
            (9, "line-3", a.id.as_str())
        );
        assert_eq!(r.window_end(), Some(8));
        assert_eq!(r.payload(), serde_json::to_vec(&a).unwrap());
    }

    #[test]
    fn a_shared_outbox_reports_the_oldest_window_end() {
        let o = SharedOutbox::new(Box::new(MemoryOutbox::<Agg>::new(10)));
        assert_eq!(o.oldest_window_end(), None);
        for i in [5, 6] {
            o.append(&agg(i)).unwrap();
        }
        o.commit().unwrap();
        assert_eq!(o.oldest_window_end(), Some(6));
        o.ack(1).unwrap();
        assert_eq!(o.oldest_window_end(), Some(7));
    }
}
