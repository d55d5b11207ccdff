//! The ingest journal stage: between the sources and the privacy and
//! windowing stage, every accepted reading is written to the journal
//! ([`outpost_storage::journal`]) and synced, as a group, before it goes on
//! and before its source is acknowledged (MQTT QoS 1: the PUBACK). The
//! outbox writer records which readings each aggregate counts before it
//! commits the aggregate ([`Journaled::done`]), and the journal forgets
//! readings once their aggregate is committed.
//!
//! At start, the readings the journal still holds are replayed into the
//! windows first, with their sequence numbers, and aggregates whose outbox
//! commit a crash cut off are appended again (same id). So a reading a
//! source accepted is counted in exactly one committed aggregate, across a
//! SIGKILL or a power cut, as long as the journal is on (the default with
//! the disk outbox). Without it, the first aggregate of each group after an
//! unclean start carries `"gap": true`.
//!
//! The journal holds readings as the sources gave them (before
//! pseudonymization and redaction): its directory is 0700 and its files
//! 0600 inside the state directory, it is bounded by `journal.max_bytes`,
//! and nothing in it is ever forwarded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_storage::journal::{Journal, JournalError, JournalSettings, Recovered};
use serde::Deserialize;
use serde_json::Value;

use crate::check::Collector;
use crate::ingest::ack::RecentKeys;
use crate::ingest::reading::Reading;
use crate::metrics::Metrics;

/// `[journal]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// On by default with the disk outbox (and off with the memory
    /// outbox, which cannot keep what it held across a crash either).
    pub enabled: Option<bool>,
    /// Directory; absent: `<gateway.state_dir>/journal`.
    pub dir: Option<PathBuf>,
    /// Bytes on disk at most. When full, sources wait (the MQTT source
    /// stops reading: the site broker queues) until aggregates are
    /// committed and the journal shrinks.
    pub max_bytes: u64,
    /// Bytes per segment file.
    pub segment_bytes: u64,
    /// Most readings written and synced as one group.
    pub max_batch: usize,
    /// Free bytes to keep on the file system the journal lives on: below
    /// this the sources wait (nothing new is accepted) while the gateway
    /// goes on delivering and committing what it holds, whose writes (audit
    /// entries, outbox commits) need room too. Absent: a 32nd of the file
    /// system, between 256 KiB and 64 MiB.
    pub min_free_bytes: Option<u64>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            dir: None,
            max_bytes: 256 << 20,
            segment_bytes: 16 << 20,
            max_batch: 4096,
            min_free_bytes: None,
        }
    }
}

impl JournalConfig {
    /// Check `[journal]`.
    pub fn check(&self, c: &mut Collector) {
        if self.segment_bytes < 4096 {
            c.push("segment_bytes", "must be at least 4096");
        }
        if self.max_bytes < 2 * self.segment_bytes {
            c.push(
                "max_bytes",
                "must be at least two segments (2 × segment_bytes)",
            );
        }
        if self.max_batch == 0 {
            c.push("max_batch", "must be at least 1");
        }
    }

    /// The journal's directory.
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("journal"))
    }
}

/// Errors of the journal stage.
#[derive(Debug, thiserror::Error)]
pub enum JournalStageError {
    /// The journal could not be opened.
    #[error(transparent)]
    Storage(#[from] JournalError),
}

/// The journal shared by the stages that write to it.
#[derive(Debug, Clone)]
pub struct Journaled {
    journal: Arc<Mutex<Journal>>,
    metrics: Arc<Metrics>,
    /// The journal's directory, and the free bytes to keep on its file
    /// system ([`JournalConfig::min_free_bytes`]).
    dir: PathBuf,
    min_free: u64,
}

/// A reading's journal record: time, sensor, values, attributes.
fn encode(r: &Reading, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&r.ts_ms.to_le_bytes());
    let sensor = r.sensor.as_bytes();
    out.extend_from_slice(&(sensor.len() as u32).to_le_bytes());
    out.extend_from_slice(sensor);
    out.extend_from_slice(&(r.values.len() as u32).to_le_bytes());
    for v in &r.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if !r.attrs.is_empty() {
        // Plain JSON values with string keys: serialization cannot fail.
        let _ = serde_json::to_writer(&mut *out, &r.attrs);
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

/// The reading of a journal record; `None` when the record does not decode.
fn decode(mut b: &[u8]) -> Option<Reading> {
    let b = &mut b;
    let ts_ms = i64::from_le_bytes(take(b, 8)?.try_into().ok()?);
    let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
    let sensor = std::str::from_utf8(take(b, n)?).ok()?;
    let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
    let raw = take(b, n.checked_mul(4)?)?;
    let values = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let attrs: BTreeMap<String, Value> = if b.is_empty() {
        BTreeMap::new()
    } else {
        serde_json::from_slice(b).ok()?
    };
    Some(Reading {
        sensor: Arc::from(sensor),
        ts_ms,
        values,
        attrs,
        seq: 0,
        ack: None,
    })
}

/// The reading of a journal record body as replay decodes it; `None` when
/// it does not decode (the journal fuzz target's entry).
pub fn decode_reading(b: &[u8]) -> Option<Reading> {
    decode(b)
}

impl Journaled {
    /// Open the journal; what it holds is returned for replay.
    pub fn open(
        cfg: &JournalConfig,
        state_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Recovered), JournalStageError> {
        let dir = cfg.dir(state_dir);
        let (journal, recovered) = Journal::open(JournalSettings {
            segment_bytes: outpost_storage::fsutil::fit_segment(cfg.segment_bytes, &dir, 4096),
            dir,
            max_bytes: cfg.max_bytes,
        })?;
        metrics.journal.corrupt.inc_by(recovered.corrupt);
        let dir = cfg.dir(state_dir);
        let min_free = cfg.min_free_bytes.unwrap_or_else(|| {
            outpost_storage::fsutil::fs_size(&dir)
                .map_or(256 << 10, |size| (size / 32).clamp(256 << 10, 64 << 20))
        });
        let j = Self {
            journal: Arc::new(Mutex::new(journal)),
            metrics,
            dir,
            min_free,
        };
        j.observe();
        Ok((j, recovered))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock leaves the journal as consistent as
        // a crash would: keep going.
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self) {
        let s = self.lock().stats();
        self.metrics.journal.bytes.set(s.bytes as i64);
        self.metrics.journal.outstanding.set(s.outstanding as i64);
    }

    /// The aggregate `bytes` (as it goes to the outbox; `None`: suppressed
    /// or refused) counts the readings `covers`. Durable at [`Journaled::commit`].
    pub fn done(&self, covers: &[u64], bytes: Option<&[u8]>) {
        if covers.is_empty() {
            return;
        }
        if let Err(e) = self.lock().append_done(covers, bytes) {
            // Too large a record: the readings stay outstanding and are
            // counted again after a crash; say so.
            tracing::error!(error = %e, readings = covers.len(), "journal: done record not written");
        }
    }

    /// Sync what was appended; the mark for [`Journaled::confirm`].
    pub fn commit(&self) -> Result<u64, JournalError> {
        let r = self.lock().commit();
        if r.is_err() {
            self.metrics.journal.commit_failures.inc();
        }
        r
    }

    /// The outbox has committed every aggregate recorded up to `mark`.
    pub fn confirm(&self, mark: u64) {
        if let Err(e) = self.lock().confirm(mark) {
            tracing::error!(error = %e, "journal: truncation failed");
        }
        self.observe();
    }

    /// The aggregates returned at open for appending again are in the outbox.
    pub fn confirm_recovered(&self) -> Result<u64, JournalError> {
        self.lock().confirm_recovered()?;
        self.commit()
    }
}

/// Run the journal stage on its own thread: replay what `recovered` holds
/// into `output` first (and remember its message keys in `recent`), then take readings from `input` in groups of up to `max_batch`,
/// write and sync each group, acknowledge it to its sources and pass it on.
/// Ends when `input` closes (every source stopped) or `output` is gone.
pub fn spawn(
    journal: Journaled,
    recovered: Recovered,
    recent: Arc<RecentKeys>,
    input: flume::Receiver<Reading>,
    output: flume::Sender<Reading>,
    max_batch: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    for k in &recovered.keys {
        recent.insert(*k);
    }
    let replay = recovered.readings;
    std::thread::Builder::new()
        .name("journal".into())
        .spawn(move || run(journal, replay, recent, input, output, max_batch.max(1)))
}

fn run(
    journal: Journaled,
    replay: Vec<(u64, Vec<u8>)>,
    recent: Arc<RecentKeys>,
    input: flume::Receiver<Reading>,
    output: flume::Sender<Reading>,
    max_batch: usize,
) {
    let metrics = journal.metrics.clone();
    let mut undecodable = Vec::new();
    for (seq, body) in replay {
        match decode(&body) {
            Some(mut r) => {
                r.seq = seq;
                metrics.journal.replayed.inc();
                if output.send(r).is_err() {
                    return;
                }
            }
            None => {
                metrics.journal.corrupt.inc();
                undecodable.push(seq);
            }
        }
    }
    // Not readings any more: never to be replayed again.
    journal.done(&undecodable, None);

    let mut batch: Vec<(Reading, u64)> = Vec::with_capacity(max_batch);
    let mut buf = Vec::new();
    let mut backoff = Duration::from_millis(50);
    while let Ok(first) = input.recv() {
        if !wait_for_space(&journal, &input) {
            // Stopping: the readings were never acknowledged, and their
            // sources give them again.
            return;
        }
        batch.push((first, 0));
        batch.extend(input.try_iter().take(max_batch - 1).map(|r| (r, 0)));
        // Append the group, waiting while the journal is full.
        let mut next = 0;
        while next < batch.len() {
            let mut j = journal.lock();
            while next < batch.len() {
                let (r, key) = &mut batch[next];
                *key = r.ack.as_ref().map_or(0, |a| a.key());
                encode(r, &mut buf);
                match j.append_reading(*key, &buf) {
                    Ok(seq) => {
                        r.seq = seq;
                        next += 1;
                    }
                    Err(JournalError::Full { .. }) => break,
                    Err(e) => {
                        // A record too large to journal: go on without
                        // (not replayable after a crash; logged).
                        tracing::error!(error = %e, sensor = %r.sensor, "journal: reading not journaled");
                        next += 1;
                    }
                }
            }
            drop(j);
            if next < batch.len() {
                // Full: the aggregates of what it holds must commit first.
                // Sync what is appended so the pipeline can go on.
                metrics.journal.full_waits.inc();
                commit_until_done(&journal, &mut backoff);
                let ready: Vec<(Reading, u64)> = batch.drain(..next).collect();
                if !forward(ready, &recent, &output) {
                    return;
                }
                next = 0;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        commit_until_done(&journal, &mut backoff);
        if !forward(std::mem::take(&mut batch), &recent, &output) {
            return;
        }
        journal.observe();
    }
}

/// Wait while the journal's file system has less than `min_free` bytes
/// free: the sources wait (their readings unacknowledged) while the rest of
/// the gateway delivers what it holds and frees space. False when the
/// sources stopped meanwhile.
fn wait_for_space(journal: &Journaled, input: &flume::Receiver<Reading>) -> bool {
    let low = || {
        outpost_storage::fsutil::fs_free(&journal.dir).is_some_and(|free| free < journal.min_free)
    };
    if !low() {
        return true;
    }
    journal.metrics.journal.low_space_waits.inc();
    tracing::warn!(dir = %journal.dir.display(), min_free_bytes = journal.min_free, "disk nearly full: sources wait until there is room");
    let mut pause = Duration::from_millis(20);
    while low() {
        if input.is_disconnected() {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    tracing::info!(dir = %journal.dir.display(), "disk has room again: sources go on");
    true
}

/// Commit, retrying with a capped backoff until it succeeds: a reading goes
/// on, and is acknowledged, only once it is on disk.
fn commit_until_done(journal: &Journaled, backoff: &mut Duration) {
    loop {
        match journal.commit() {
            Ok(_) => {
                *backoff = Duration::from_millis(50);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, retry_ms = backoff.as_millis() as u64, "journal commit failed: sources wait");
                std::thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Acknowledge a committed group to its sources, then pass it on.
fn forward(
    batch: Vec<(Reading, u64)>,
    recent: &RecentKeys,
    output: &flume::Sender<Reading>,
) -> bool {
    let mut readings = Vec::with_capacity(batch.len());
    let mut acks = Vec::with_capacity(batch.len());
    for (mut r, key) in batch {
        recent.insert(key);
        acks.push(r.ack.take());
        readings.push(r);
    }
    // The acknowledgements go out now (the last clone of each drops here).
    drop(acks);
    for r in readings {
        if output.send(r).is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_survives_its_journal_record() {
        let r = Reading {
            sensor: Arc::from("pump-7"),
            ts_ms: 1_732_300_000_123,
            values: vec![0.5, -1.25, f32::MAX],
            attrs: [("line".to_string(), Value::from("A"))].into(),
            seq: 0,
            ack: None,
        };
        let mut b = Vec::new();
        encode(&r, &mut b);
        assert_eq!(decode(&b), Some(r.clone()));
        let plain = Reading {
            attrs: BTreeMap::new(),
            ..r
        };
        encode(&plain, &mut b);
        assert_eq!(decode(&b), Some(plain));
        for cut in 0..b.len() {
            let _ = decode(&b[..cut]);
        }
        assert_eq!(decode(&b[..5]), None);
    }
}
