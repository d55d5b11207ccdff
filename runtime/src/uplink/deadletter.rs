//! Where the uplink sets aside the aggregates the broker keeps refusing:
//! [`DeadLetterSink`] puts them in the dead-letter store
//! (`outpost_storage::deadletter`, under the state directory), audits and
//! counts them, and puts back in the outbox those an operator asked to be
//! sent again (`outpost deadletter resend`).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_storage::deadletter::{DeadLetterError, DeadLetterStore, NewDeadLetter};

use crate::aggregate::Aggregate;
use crate::governance::SharedAudit;
use crate::metrics::Metrics;
use crate::outbox::{OutboxRecord, SharedOutbox};

/// The uplink's dead-letter store with the audit log. Cheap to clone.
#[derive(Clone)]
pub struct DeadLetterSink {
    store: Arc<Mutex<DeadLetterStore>>,
    audit: Option<SharedAudit>,
    /// Entries put back in the outbox (entry number, outbox sequence),
    /// removed from the store once the outbox has committed them.
    resent: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl std::fmt::Debug for DeadLetterSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterSink")
            .field("dir", &self.lock().dir())
            .finish()
    }
}

impl DeadLetterSink {
    /// Open (or create) the store in `dir`, bounded to `max_bytes`.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        audit: Option<SharedAudit>,
    ) -> Result<Self, DeadLetterError> {
        Ok(Self {
            store: Arc::new(Mutex::new(DeadLetterStore::open(dir, max_bytes)?)),
            audit,
            resent: Arc::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, DeadLetterStore> {
        // The store's state is a cache of its directory: a panic while it
        // was held leaves it usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep the store's gauges current.
    pub fn observe(&self, metrics: &Metrics) {
        let s = self.lock();
        metrics.deadletter_records.set(s.len() as i64);
        metrics.deadletter_bytes.set(s.bytes() as i64);
    }

    /// Set `record` aside (durable, audited, counted). Returns whether it
    /// is in the store; when not (the write failed, or it is larger than
    /// the store's bound), the error is logged and counted and the record
    /// stays where it is.
    pub fn set_aside(
        &self,
        record: &OutboxRecord,
        attempts: u32,
        reason: &str,
        metrics: &Metrics,
    ) -> bool {
        let new = NewDeadLetter {
            seq: record.seq,
            stream: &record.group,
            record_id: &record.id,
            attempts,
            reason,
            now_ms: crate::clock::now_ms(),
        };
        let put = self.lock().put(&new, record.payload());
        let (letter, evicted) = match put {
            Ok(v) => v,
            Err(e) => {
                metrics.deadletter_errors.inc();
                tracing::error!(error = %e, seq = record.seq, id = %record.id, "cannot set an undeliverable aggregate aside; it stays in the outbox");
                return false;
            }
        };
        metrics.uplink_deadlettered.inc();
        metrics.deadletter_evicted.inc_by(evicted.len() as u64);
        tracing::error!(
            entry = letter.id,
            seq = record.seq,
            id = %record.id,
            group = %record.group,
            attempts,
            reason,
            "uplink: aggregate set aside in the dead-letter store; what follows it is delivered (outpost deadletter list / resend)"
        );
        let mut entries = vec![(
            crate::audit::kinds::DEADLETTER,
            serde_json::json!({
                "entry": letter.id,
                "id": &record.id,
                "group": &record.group,
                "seq": record.seq,
                "attempts": attempts,
                "reason": reason,
                "bytes": letter.bytes,
            }),
        )];
        for old in &evicted {
            tracing::warn!(entry = old.id, id = %old.record_id, "dead-letter store full: oldest entry removed");
            entries.push((
                crate::audit::kinds::DEADLETTER_EVICTED,
                serde_json::json!({ "entry": old.id, "id": &old.record_id, "group": &old.stream }),
            ));
        }
        crate::governance::audit(&self.audit, metrics, &entries);
        self.observe(metrics);
        true
    }

    /// Put the entries an operator asked to be sent again back in the
    /// outbox (audited first, so the entry is on disk before the outbox
    /// commit that lets the aggregate leave); each entry is removed once
    /// the outbox has committed its record. Returns how many went back.
    pub fn resend(&self, outbox: &SharedOutbox, metrics: &Metrics) -> usize {
        self.forget_committed(outbox, metrics);
        let (requests, bad) = match self.lock().resend_requests() {
            Ok(v) => v,
            Err(e) => {
                metrics.deadletter_errors.inc();
                tracing::warn!(error = %e, "cannot read the dead-letter store's resend requests");
                return 0;
            }
        };
        for e in bad {
            metrics.deadletter_errors.inc();
            tracing::error!(error = %e, "dead-letter entry unreadable; renamed *.bad, not sent");
        }
        let mut n = 0;
        for (letter, payload) in requests {
            if self.is_resent(letter.id) {
                continue;
            }
            let agg: Aggregate = match serde_json::from_slice(&payload) {
                Ok(a) => a,
                Err(e) => {
                    metrics.deadletter_errors.inc();
                    tracing::error!(error = %e, entry = letter.id, "dead-letter entry is not an aggregate; not sent");
                    continue;
                }
            };
            crate::governance::audit(
                &self.audit,
                metrics,
                &[(
                    crate::audit::kinds::DEADLETTER_RESENT,
                    serde_json::json!({ "entry": letter.id, "id": &agg.id, "group": &agg.group }),
                )],
            );
            match outbox.append(&agg) {
                Ok(seq) => {
                    tracing::info!(entry = letter.id, id = %agg.id, seq, "dead-letter entry put back in the outbox");
                    self.resent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((letter.id, seq));
                    metrics.deadletter_resent.inc();
                    n += 1;
                }
                Err(e) => {
                    metrics.outbox_append_failures.inc();
                    tracing::error!(error = %e, entry = letter.id, "cannot put a dead-letter entry back in the outbox; tried again later");
                }
            }
        }
        n
    }

    fn is_resent(&self, entry: u64) -> bool {
        self.resent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(e, _)| *e == entry)
    }

    /// Remove the entries whose records the outbox has committed (a crash
    /// before that leaves the entry, put back again at the next start:
    /// at least once, consumers deduplicate by id).
    fn forget_committed(&self, outbox: &SharedOutbox, metrics: &Metrics) {
        let end = outbox.committed_end();
        let done: Vec<u64> = {
            let mut r = self.resent.lock().unwrap_or_else(|e| e.into_inner());
            let (done, wait): (Vec<_>, Vec<_>) = r.drain(..).partition(|(_, seq)| *seq < end);
            *r = wait;
            done.into_iter().map(|(e, _)| e).collect()
        };
        let mut store = self.lock();
        for entry in done {
            if let Err(e) = store.remove(entry) {
                metrics.deadletter_errors.inc();
                tracing::warn!(error = %e, entry, "cannot remove a resent dead-letter entry");
            }
        }
        drop(store);
        self.observe(metrics);
    }
}
