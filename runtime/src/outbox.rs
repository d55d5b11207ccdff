//! The outbox stage: every aggregate is written here before it is published,
//! and leaves only when the cloud has acknowledged it.
//!
//! Input: [`Aggregate`] (the only type [`OutboxRecord`]s are made from, so the
//! uplink, which publishes records, can only ever send aggregates).
//! Output: [`OutboxRecord`]s read in sequence order by the uplink.
//!
//! The stores are `outpost_storage::outbox`, generic over a
//! [`Record`]; this module implements [`Record`] for [`Aggregate`] and names
//! them with the aggregate as their record type: [`DiskOutbox`] (the durable
//! segment log, the default; its on-disk format is documented in
//! `storage/src/outbox/disk.rs`), [`MemoryOutbox`] (bounded by record count,
//! for the embedded demo and tests), [`SharedOutbox`] (shared by the
//! aggregation writer and the uplink reader). [`Outbox`] is the storage
//! trait for aggregates, so that `dyn Outbox` needs no type argument.
//!
//! The stage's task is [`write`], on a blocking thread: it appends the
//! aggregates as they come and commits them as a group; the uplink sees
//! committed records only. [`spawn_backlog_age`] keeps the backlog's age
//! metric current. `[outbox]` is [`OutboxConfig`].

use outpost_storage::outbox as store;

mod config;
pub use config::{OutboxConfig, OutboxKind};

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregate;
use crate::governance::SharedAudit;
use crate::journal::Journaled;
use crate::metrics::Metrics;

pub use outpost_storage::outbox::{
    DiskSettings, FullPolicy, MAX_RECORD, OutboxError, OutboxStats, Record, StreamCaps,
};

/// One stored aggregate, serialized ([`OutboxRecord::from_aggregate`] is the
/// only constructor).
pub type OutboxRecord = store::OutboxRecord<Aggregate>;
/// The durable segment log of aggregates.
pub type DiskOutbox = store::DiskOutbox<Aggregate>;
/// An in-memory outbox of aggregates, bounded by record count.
pub type MemoryOutbox = store::MemoryOutbox<Aggregate>;
/// An outbox of aggregates shared by the aggregation writer and the uplink
/// reader, with a notification for new records.
pub type SharedOutbox = store::SharedOutbox<Aggregate>;

impl Record for Aggregate {
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
        Aggregate::merge(self, later);
    }

    /// Reads `window_end` alone, without parsing the whole aggregate.
    fn window_end_of(payload: &[u8]) -> Option<i64> {
        #[derive(serde::Deserialize)]
        struct End {
            window_end: i64,
        }
        serde_json::from_slice::<End>(payload)
            .ok()
            .map(|e| e.window_end)
    }
}

/// Storage of aggregates awaiting delivery: `outpost_storage`'s `Outbox`
/// trait for [`Aggregate`], implemented by every store of aggregates. A
/// `Box<dyn Outbox>` is handed to [`SharedOutbox::new`] as it is (it
/// coerces to the storage trait object).
pub trait Outbox: store::Outbox<Aggregate> {
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
    fn stream_bytes(&self) -> Vec<(String, u64)>;
}

impl<T: store::Outbox<Aggregate>> Outbox for T {
    fn append(&mut self, agg: &Aggregate) -> Result<u64, OutboxError> {
        store::Outbox::append(self, agg)
    }

    fn commit(&mut self) -> Result<(), OutboxError> {
        store::Outbox::commit(self)
    }

    fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord>, OutboxError> {
        store::Outbox::read_from(self, from, max)
    }

    fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        store::Outbox::ack(self, seq)
    }

    fn oldest(&self) -> Option<u64> {
        store::Outbox::oldest(self)
    }

    fn committed_end(&self) -> u64 {
        store::Outbox::committed_end(self)
    }

    fn stats(&self) -> OutboxStats {
        store::Outbox::stats(self)
    }

    fn stream_bytes(&self) -> Vec<(String, u64)> {
        store::Outbox::stream_bytes(self)
    }
}

/// The outbox's figures as the metrics take them.
pub fn counts(s: &OutboxStats) -> crate::metrics::OutboxCounts {
    crate::metrics::OutboxCounts {
        depth: s.depth,
        bytes: s.bytes,
        dropped: s.dropped,
        rejected: s.rejected,
        quarantined: s.quarantined,
        lost: s.lost,
        coarsened: s.coarsened,
    }
}

/// An aggregate on its way into the outbox: `stored` once appended (not yet
/// committed) while its audit entry is still to be written.
struct Entry {
    agg: Aggregate,
    stored: bool,
}

/// How far [`store`] got.
#[derive(PartialEq, Eq)]
enum Stored {
    /// Every aggregate is in the outbox with its audit entry.
    All,
    /// An append failed (the disk is full, or failing): the rest waits.
    Waiting,
    /// As `Waiting`, and an aggregate in the outbox lacks its audit entry:
    /// the outbox must not commit.
    Unaudited,
}

/// Aggregates kept in memory, without the ingest journal, while the disk
/// refuses them; past this the oldest are dropped and counted.
const MAX_WAITING: usize = 10_000;

/// Move aggregates from `waiting` into the outbox, each with its audit
/// entry, oldest first. One the outbox refuses by its policy (full) is
/// counted and dropped; one it cannot write (an I/O error: a full or
/// failing disk) stays, with everything after it, for the next try, and the
/// space of delivered records is reclaimed meanwhile.
fn store(
    waiting: &mut std::collections::VecDeque<Entry>,
    outbox: &SharedOutbox,
    audit: &Option<SharedAudit>,
    metrics: &Metrics,
) -> Stored {
    while let Some(e) = waiting.front_mut() {
        let a = &e.agg;
        if !e.stored {
            match outbox.append(a) {
                Ok(_) => {
                    e.stored = true;
                    audit_merges(outbox, audit, metrics);
                }
                Err(err @ (OutboxError::Full | OutboxError::StreamFull(_))) => {
                    // Refused by the outbox's policy: counted, gone.
                    metrics.outbox_append_failures.inc();
                    tracing::warn!(id = %a.id, group = %a.group, "{err}");
                    waiting.pop_front();
                    continue;
                }
                Err(err) => {
                    metrics.outbox_store_retries.inc();
                    tracing::error!(error = %err, id = %a.id, "outbox append failed: kept, tried again at the next commit");
                    reclaim(outbox);
                    return Stored::Waiting;
                }
            }
        }
        if let Some(log) = audit {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            let r = log.append(
                crate::audit::kinds::AGGREGATE,
                serde_json::json!({
                    "id": &a.id,
                    "group": &a.group,
                    "window_start": a.window_start,
                    "model": format!("{}@{}", a.model.name, a.model.version),
                    "policy": &a.policy,
                }),
            );
            match r {
                Ok(_) => {
                    metrics.audit_entries.inc();
                }
                Err(
                    err @ (crate::audit::AuditError::Io { .. }
                    | crate::audit::AuditError::Failed { .. }),
                ) => {
                    metrics.audit_errors.inc();
                    tracing::error!(error = %err, id = %a.id, "audit append failed: the aggregate waits for its entry");
                    reopen_if_failed(&mut log);
                    drop(log);
                    reclaim(outbox);
                    return Stored::Unaudited;
                }
                Err(err) => {
                    // An entry that can never be written (too large): the
                    // aggregate goes on without it, counted.
                    metrics.audit_errors.inc();
                    tracing::error!(error = %err, id = %a.id, "audit append failed");
                }
            }
        }
        waiting.pop_front();
    }
    Stored::All
}

/// Audit entries for the aggregates the outbox merged while making room
/// (policy `coarsen`): a merged aggregate leaves under a new id, and every
/// aggregate that leaves has its entry. Committed with the next commit.
fn audit_merges(outbox: &SharedOutbox, audit: &Option<SharedAudit>, metrics: &Metrics) {
    let merged = outbox.take_merged();
    let Some(log) = audit else {
        return;
    };
    if merged.is_empty() {
        return;
    }
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    for m in merged {
        let r = log.append(
            crate::audit::kinds::AGGREGATE_MERGED,
            serde_json::json!({ "id": m.id, "group": m.stream, "from": m.from }),
        );
        match r {
            Ok(_) => {
                metrics.audit_entries.inc();
            }
            Err(e) => {
                metrics.audit_errors.inc();
                tracing::error!(error = %e, id = %m.id, "audit append of a merged aggregate failed");
            }
        }
    }
}

/// An audit log that failed closed (a failed fsync) is opened again: only a
/// fresh open knows what reached the disk, and until then nothing commits.
fn reopen_if_failed(log: &mut crate::audit::AuditLog) {
    if !log.is_failed() {
        return;
    }
    match crate::audit::AuditLog::open(log.path()) {
        Ok(fresh) => {
            tracing::warn!(path = %log.path().display(), "audit log opened again after a failure");
            *log = fresh;
        }
        Err(e) => {
            tracing::error!(error = %e, "audit log cannot be opened again; tried at the next commit")
        }
    }
}

/// Append aggregates as they come and commit them as a group every
/// `interval`; returns when the aggregation stage has ended, after a final
/// commit. Each aggregate gets an audit entry (id, model, policy), committed
/// before the outbox commit that lets the uplink see the aggregate: every
/// aggregate that can leave has its entry. With the ingest journal, each
/// aggregate's readings are recorded as done in the journal ([`Journaled::done`]),
/// synced before the outbox commit, and confirmed after it, so the journal
/// forgets them only once the aggregate is on disk. An aggregate the disk
/// cannot take (full, failing) is kept and tried again at each commit; with
/// the journal nothing is lost (its readings stay in the journal), without
/// it at most [`MAX_WAITING`] are kept.
pub fn write(
    aggregates: &flume::Receiver<Aggregate>,
    outbox: &SharedOutbox,
    audit: &Option<SharedAudit>,
    journal: &Option<Journaled>,
    metrics: &Metrics,
    interval: Duration,
) {
    // With the journal, aggregates wait here until their done records are
    // synced: an outbox append reaches the file at once, and a record found
    // in the file after a crash is delivered, so it must never be there
    // before the journal knows its readings are counted.
    let mut waiting: std::collections::VecDeque<Entry> = std::collections::VecDeque::new();
    let commit = |outbox: &SharedOutbox, waiting: &mut std::collections::VecDeque<Entry>| {
        // The journal's done records first: a crash after the outbox commit
        // must not replay readings the outbox already counts.
        let mark = match journal.as_ref().map(Journaled::commit) {
            None => Ok(None),
            Some(Ok(mark)) => Ok(Some(mark)),
            Some(Err(e)) => {
                tracing::error!(error = %e, "journal commit failed: new aggregates wait");
                // The disk may be full: give back what delivered records
                // still hold, so that the journal can commit again.
                reclaim(outbox);
                Err(())
            }
        };
        // Without their done records synced, new aggregates wait; those
        // already stored (by an earlier round) still commit, so that they
        // can be delivered and their space given back.
        let stored = match mark {
            Ok(_) => store(waiting, outbox, audit, metrics),
            Err(()) if waiting.front().is_some_and(|e| e.stored) => Stored::Unaudited,
            Err(()) => Stored::Waiting,
        };
        // An aggregate leaves only with its audit entry on disk: when the
        // audit log cannot commit, the outbox does not either (its records
        // wait, invisible to the uplink, for the next commit).
        let audited = stored != Stored::Unaudited
            && match audit {
                Some(a) => {
                    let mut log = a.lock().unwrap_or_else(|e| e.into_inner());
                    match log.commit() {
                        Ok(()) => {
                            metrics.set_audit_head(log.committed());
                            true
                        }
                        Err(e) => {
                            metrics.audit_errors.inc();
                            tracing::error!(error = %e, "audit log commit failed: the outbox commit waits");
                            reopen_if_failed(&mut log);
                            drop(log);
                            reclaim(outbox);
                            false
                        }
                    }
                }
                None => true,
            };
        if audited {
            match outbox.commit() {
                // Only a commit that succeeded feeds the watchdog.
                Ok(()) => {
                    metrics.outbox_commits.inc();
                    // The journal forgets the readings only once every
                    // aggregate of its done records is in the outbox.
                    if let (Some(j), Ok(Some(mark)), Stored::All) = (journal, mark, &stored) {
                        j.confirm(mark);
                    }
                }
                Err(e) => {
                    metrics.outbox_append_failures.inc();
                    tracing::error!(error = %e, "outbox commit failed");
                    reclaim(outbox);
                }
            }
        }
        metrics.observe_outbox(&counts(&outbox.stats()));
        metrics.observe_streams(&outbox.stream_bytes());
    };
    let mut last_commit = std::time::Instant::now();
    loop {
        let wait = interval.saturating_sub(last_commit.elapsed());
        match aggregates.recv_timeout(wait.max(Duration::from_millis(1))) {
            Ok(a) => match journal {
                Some(j) => {
                    // Plain data: serialization cannot fail.
                    let bytes = serde_json::to_vec(&a).unwrap_or_default();
                    j.done(&a.covers, Some(&bytes));
                    waiting.push_back(Entry {
                        agg: a,
                        stored: false,
                    });
                }
                None => {
                    waiting.push_back(Entry {
                        agg: a,
                        stored: false,
                    });
                    if waiting.len() > MAX_WAITING
                        && let Some(lost) = waiting.pop_front()
                    {
                        metrics.outbox_append_failures.inc();
                        tracing::error!(id = %lost.agg.id, "outbox: too many aggregates waiting for the disk; the oldest is lost");
                    }
                    // Without the journal an aggregate is appended at once.
                    if waiting.len() == 1 {
                        store(&mut waiting, outbox, audit, metrics);
                    }
                }
            },
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => break,
        }
        if interval.is_zero() || last_commit.elapsed() >= interval {
            commit(outbox, &mut waiting);
            last_commit = std::time::Instant::now();
        }
    }
    commit(outbox, &mut waiting);
    if !waiting.is_empty() {
        tracing::error!(
            waiting = waiting.len(),
            "outbox: aggregates not stored at exit (with the journal, appended again at the next start)"
        );
    }
    // The last confirmation on disk too: the next start has nothing to append again.
    if let Some(j) = journal
        && let Err(e) = j.commit()
    {
        tracing::error!(error = %e, "journal commit at exit failed");
    }
}

/// A write failed and the disk may be full: give back the space of records
/// already delivered ([`store::Outbox::reclaim`]).
fn reclaim(outbox: &SharedOutbox) {
    if let Err(e) = outbox.reclaim() {
        tracing::debug!(error = %e, "outbox: nothing reclaimed");
    }
}

/// Keep `outpost_outbox_oldest_age_seconds` current: once a second, the
/// time since the window end of the oldest aggregate still waiting.
pub fn spawn_backlog_age(
    metrics: Arc<Metrics>,
    outbox: SharedOutbox,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = t.tick() => {}
            }
            // A disk read of one record: off the async workers.
            let o = outbox.clone();
            let end = tokio::task::spawn_blocking(move || o.oldest_window_end())
                .await
                .ok()
                .flatten();
            let age = end.map_or(0.0, |end| {
                (crate::clock::now_ms() - end).max(0) as f64 / 1000.0
            });
            metrics.outbox_oldest_age.set(age);
        }
    })
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
            gap: false,
            covers: Vec::new(),
        };
        a.id = a.compute_id();
        a
    }

    #[test]
    fn append_read_ack_and_bound() {
        let mut o = MemoryOutbox::new(3);
        for i in 0..5 {
            Outbox::append(&mut o, &agg(i)).unwrap();
        }
        let s = Outbox::stats(&o);
        assert_eq!((s.depth, s.dropped, s.appended), (3, 2, 5));
        let recs = Outbox::read_from(&mut o, 0, 10).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        Outbox::ack(&mut o, 4).unwrap();
        assert_eq!(Outbox::read_from(&mut o, 4, 10).unwrap()[0].seq, 5);
        assert_eq!(Outbox::oldest(&o), Some(3));
        let back: Aggregate = serde_json::from_slice(recs[0].payload()).unwrap();
        assert_eq!(back, agg(2));
    }

    #[test]
    fn a_record_is_an_aggregate_with_its_group_id_and_window_end() {
        let mut a = agg(41);
        a.group = "line-7".into();
        a.id = a.compute_id();
        let r = OutboxRecord::from_aggregate(3, &a).unwrap();
        assert_eq!(
            (r.seq, r.group.as_str(), r.id.as_str()),
            (3, "line-7", a.id.as_str())
        );
        assert_eq!(r.window_end(), Some(42));
        let back: Aggregate = serde_json::from_slice(r.payload()).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            <Aggregate as Record>::window_end_of(b"{\"window_end\":9,\"other\":1}"),
            Some(9),
            "the window end is read without parsing the whole aggregate"
        );
        assert_eq!(<Aggregate as Record>::window_end_of(b"nonsense"), None);
    }

    /// The `coarsen` policy over real aggregates: the storage crate tests it
    /// with its own record type, this checks that `Aggregate::merge` is what
    /// it calls (counts exact, ids of the merged content), across a reopen.
    #[test]
    fn a_disk_outbox_of_aggregates_coarsens_with_exact_counts() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DiskSettings {
            dir: dir.path().to_path_buf(),
            segment_bytes: 4096,
            max_bytes: 32768,
            policy: FullPolicy::Coarsen,
            protect_oldest: 2,
            stream_caps: Default::default(),
        };
        let mut o = DiskOutbox::open(settings.clone()).unwrap();
        let n = 400;
        for i in 0..n {
            let mut a = agg(i);
            a.group = if i % 2 == 0 { "even" } else { "odd" }.into();
            a.readings = 3;
            a.classes = Some([("A".to_string(), 1u64)].into());
            a.id = a.compute_id();
            Outbox::append(&mut o, &a).unwrap();
        }
        Outbox::commit(&mut o).unwrap();
        let st = Outbox::stats(&o);
        assert!(st.coarsened > 0, "{st:?}");
        assert_eq!(st.dropped, 0, "{st:?}");
        drop(o);
        let mut o = DiskOutbox::open(settings).unwrap();
        let held: Vec<Aggregate> = Outbox::read_from(&mut o, 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice(r.payload()).unwrap())
            .collect();
        assert_eq!(held.len() as u64 + st.coarsened, n as u64);
        assert_eq!(held.iter().map(|a| a.readings).sum::<u64>(), 3 * n as u64);
        assert!(held.iter().any(|a| a.window_end - a.window_start > 2));
        for a in &held {
            assert_eq!(a.id, a.compute_id(), "ids match the merged content");
        }
    }

    /// Issue 18 (12): an aggregate merged by `coarsen` leaves under a new
    /// id; the writer records every merge in the audit log, so every
    /// aggregate that can leave has its entry.
    #[test]
    fn every_aggregate_the_outbox_holds_has_its_audit_entry_merged_ones_too() {
        let dir = tempfile::tempdir().unwrap();
        let o = DiskOutbox::open(DiskSettings {
            dir: dir.path().join("outbox"),
            segment_bytes: 4096,
            max_bytes: 32768,
            policy: FullPolicy::Coarsen,
            protect_oldest: 2,
            stream_caps: Default::default(),
        })
        .unwrap();
        let outbox = SharedOutbox::new(Box::new(o));
        let log_path = dir.path().join("audit.log");
        let audit: SharedAudit = Arc::new(std::sync::Mutex::new(
            crate::audit::AuditLog::open(&log_path).unwrap(),
        ));
        let metrics = Metrics::new();
        let (tx, rx) = flume::unbounded();
        for i in 0..400 {
            let mut a = agg(i);
            a.group = if i % 2 == 0 { "even" } else { "odd" }.into();
            a.id = a.compute_id();
            tx.send(a).unwrap();
        }
        drop(tx);
        write(
            &rx,
            &outbox,
            &Some(audit),
            &None,
            &metrics,
            Duration::from_millis(5),
        );
        assert!(outbox.stats().coarsened > 0);
        let log = std::fs::read_to_string(&log_path).unwrap();
        let audited: std::collections::BTreeSet<String> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["kind"] == "aggregate" || e["kind"] == "aggregate_merged")
            .filter_map(|e| e["data"]["id"].as_str().map(String::from))
            .collect();
        let held = outbox.read_from(0, usize::MAX).unwrap();
        assert!(!held.is_empty());
        for r in &held {
            assert!(audited.contains(&r.id), "{} has no audit entry", r.id);
        }
    }

    /// Issue 18 (12): an aggregate leaves only with its audit entry on
    /// disk. While the audit log cannot commit, the outbox does not either;
    /// once it can, both go on.
    #[test]
    fn a_failed_audit_commit_holds_the_outbox_commit_back() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = SharedOutbox::new(Box::new(
            DiskOutbox::open(DiskSettings {
                dir: dir.path().join("outbox"),
                segment_bytes: 1 << 20,
                max_bytes: 8 << 20,
                policy: FullPolicy::DropOldest,
                protect_oldest: 0,
                stream_caps: Default::default(),
            })
            .unwrap(),
        ));
        let log_path = dir.path().join("audit.log");
        let audit: SharedAudit = Arc::new(std::sync::Mutex::new(
            crate::audit::AuditLog::open(&log_path).unwrap(),
        ));
        // The head file cannot be replaced: its temporary name is taken.
        let blocker = dir.path().join("audit.log.head.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let metrics = Metrics::new();
        let run = |n: i64| {
            let (tx, rx) = flume::unbounded();
            for i in 0..n {
                tx.send(agg(i)).unwrap();
            }
            drop(tx);
            write(
                &rx,
                &outbox,
                &Some(audit.clone()),
                &None,
                &metrics,
                Duration::from_millis(5),
            );
        };
        run(3);
        assert!(metrics.audit_errors.get() > 0);
        assert_eq!(metrics.outbox_commits.get(), 0);
        assert!(
            outbox.read_from(0, 10).unwrap().is_empty(),
            "nothing visible to the uplink without its audit entry on disk"
        );
        std::fs::remove_dir(&blocker).unwrap();
        run(0);
        assert_eq!(outbox.read_from(0, 10).unwrap().len(), 3);
        assert!(metrics.outbox_commits.get() > 0);
    }

    /// An outbox on a full disk: appends alternate between refused (full)
    /// and failed (`ENOSPC`), and commits fail.
    struct FullDisk(u64);

    fn enospc() -> OutboxError {
        OutboxError::Io {
            path: "outbox".into(),
            source: std::io::Error::from_raw_os_error(28),
        }
    }

    impl store::Outbox<Aggregate> for FullDisk {
        fn append(&mut self, _: &Aggregate) -> Result<u64, OutboxError> {
            self.0 += 1;
            Err(if self.0.is_multiple_of(2) {
                OutboxError::Full
            } else {
                enospc()
            })
        }

        fn commit(&mut self) -> Result<(), OutboxError> {
            Err(enospc())
        }

        fn read_from(&mut self, _: u64, _: usize) -> Result<Vec<OutboxRecord>, OutboxError> {
            Ok(Vec::new())
        }

        fn ack(&mut self, _: u64) -> Result<(), OutboxError> {
            Ok(())
        }

        fn oldest(&self) -> Option<u64> {
            None
        }

        fn committed_end(&self) -> u64 {
            1
        }

        fn stats(&self) -> OutboxStats {
            OutboxStats::default()
        }
    }

    #[test]
    fn a_failing_outbox_counts_what_it_refuses_and_keeps_what_it_could_not_write() {
        let metrics = Metrics::new();
        let (tx, rx) = flume::unbounded();
        for i in 0..3 {
            tx.send(agg(i)).unwrap();
        }
        drop(tx);
        let outbox = SharedOutbox::new(Box::new(FullDisk(0)));
        write(
            &rx,
            &outbox,
            &None,
            &None,
            &metrics,
            Duration::from_secs(3600),
        );
        // Aggregate 0: ENOSPC (kept); at the last commit it is refused
        // (full: counted, gone), aggregate 1 meets ENOSPC again (kept, with
        // aggregate 2 behind it), and the commit fails (counted).
        assert_eq!(metrics.outbox_store_retries.get(), 2);
        assert_eq!(
            metrics.outbox_append_failures.get(),
            2,
            "one aggregate refused by the policy and the final commit"
        );
    }

    #[test]
    fn a_boxed_outbox_is_shared_as_it_is() {
        let boxed: Box<dyn Outbox> = Box::new(MemoryOutbox::new(10));
        let shared = SharedOutbox::new(boxed);
        shared.append(&agg(5)).unwrap();
        shared.commit().unwrap();
        assert_eq!(shared.oldest_window_end(), Some(6));
        assert_eq!(shared.read_from(0, 10).unwrap()[0].id, agg(5).id);
    }
}
