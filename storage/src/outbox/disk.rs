//! The durable outbox: a segment log with a CRC per record.
//!
//! # On-disk format (version 1)
//!
//! A directory holds:
//!
//! - `NNNNNNNNNNNNNNNNNNNN.seg` segments, named by the (20-digit, zero-padded)
//!   sequence of their first record. A segment starts with the 8-byte magic
//!   `OPOBSEG1`, then records back to back:
//!
//!   ```text
//!   u32 LE  body length (bytes)
//!   u32 LE  CRC-32 (IEEE) of the 4 length bytes followed by the body
//!   body:   u64 LE seq | u16 LE group length | group | u16 LE id length | id | JSON record
//!   ```
//!
//!   `group` is the record's stream ([`Record::stream`]), `id` its
//!   [`Record::id`], and the JSON the record serialized with `serde_json`.
//!
//!   `seq` 0 marks padding: a span the outbox found corrupt, copied to
//!   `quarantine/` and overwrote with a valid record that readers skip. A
//!   span too short for a padding record (under 20 bytes) is cut out
//!   instead: the segment is rewritten without it (beside, synced, renamed
//!   over).
//! - `acked`: `OPOBACK1`, u64 LE low watermark W (every seq below W is
//!   acknowledged or gone), u32 LE count, that many (u64 start, u64 end)
//!   acknowledged ranges above W, u32 LE CRC-32 of everything before it.
//!   Written to `acked.tmp`, synced and renamed over `acked`.
//! - `NNNNNNNNNNNNNNNNNNNN.sum` beside each sealed segment: the bytes each
//!   stream (record group) holds in it, so per-stream caps need no scan at
//!   start-up. `OPOBSUM1`, u64 LE size of the segment it describes, u32 LE
//!   count, that many (u16 LE length, group, u64 LE bytes), u32 LE CRC-32 of
//!   everything before it. Written at seal and rewrite; one that is missing,
//!   corrupt or describes another size is rebuilt by scanning its segment.
//! - `quarantine/`: corrupt bytes, one file per span, named after the segment
//!   and offset, never read again by Outpost.
//!
//! # Guarantees
//!
//! - Appends are written at once and synced by [`DiskOutbox::commit`] (group
//!   commit); only committed records are handed to the uplink, so anything
//!   published is on disk. The pipeline commits every `fsync_interval_ms`.
//! - A write that fails part-way (`ENOSPC`, `EIO`, `EFBIG`) is cut back, so
//!   the next record follows the last whole one; if the cut fails too, the
//!   segment is cut and its unsynced records written again from memory
//!   before anything else is written.
//! - A failed fsync is not retried alone (Linux reports a writeback error
//!   once and drops the pages; the next fsync would succeed without them):
//!   the records written since the last good fsync, kept in memory until
//!   one covers them, are cut off, written again and synced again, and
//!   only then is a commit reported. Opening writes the newest segment
//!   again and syncs it (pages a failed fsync of an earlier process lost
//!   are readable but clean: no fsync would write them); its records count
//!   as committed from then on.
//! - A segment is synced before the next one is created, so only the newest
//!   segment can have a torn tail after a power loss: opening scans it (and
//!   only it: start-up cost does not depend on the backlog), truncates a torn
//!   tail and quarantines it.
//! - A record whose CRC fails anywhere else is found when it is read: its span
//!   up to the next valid record is quarantined and replaced by padding, the
//!   sequences it held are counted as lost, and reading goes on. No corruption
//!   stops the outbox from opening.
//! - Memory holds one entry per segment and the acknowledged ranges above the
//!   watermark (a handful while live records overtake the backlog), never one
//!   entry per record.
//! - Acknowledgements are persisted at commit; a crash before that re-sends
//!   the records (at least once; consumers deduplicate by record id).
//! - When full, `drop_oldest` deletes the oldest segment, `reject_new`
//!   refuses the append, and `coarsen` rewrites the oldest sealed segment
//!   that still has something to merge (beside it, synced, renamed over: a
//!   crash leaves the old or the new file), each two successive records of
//!   a group merged with exact counts ([`Record::merge`]); every record
//!   dropped, refused or merged is counted.
//! - Per stream (record group), bytes on disk are capped too
//!   ([`StreamCaps`]): when a stream would exceed its cap, `reject_new`
//!   refuses its record, `drop_oldest` rewrites the oldest sealed segment
//!   holding it without that stream's records, and `coarsen` merges that
//!   stream's oldest records (dropping when nothing is left to merge).
//!   Other streams' pending records are never touched by a stream's cap; a
//!   rewrite also leaves out records already acknowledged.
//! - Records in flight ([`Outbox::hold`]: the reader took them for a
//!   delivery) are never merged, dropped or rewritten until acknowledged or
//!   released: a rewrite keeps them as they are and merges no window across
//!   them; `drop_oldest` rewrites a segment holding some without its other
//!   records, and refuses the new record when nothing else is left.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use super::{Merged, Outbox, OutboxError, OutboxRecord, OutboxStats, Record};
use crate::fs::{Fs, FsFile, OpenMode, RealFs};

const SEG_MAGIC: &[u8; 8] = b"OPOBSEG1";
const ACK_MAGIC: &[u8; 8] = b"OPOBACK1";
const SUM_MAGIC: &[u8; 8] = b"OPOBSUM1";
const HEADER: usize = 8;
/// Smallest body: seq + two empty length-prefixed strings.
const MIN_BODY: usize = 12;
/// Largest body accepted when reading; anything larger is corruption.
pub const MAX_RECORD: usize = 16 << 20;

/// What the outbox does when an append would exceed `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the oldest segment (its undelivered records are counted as dropped).
    DropOldest,
    /// Refuse the new record (counted as rejected).
    RejectNew,
    /// Merge the oldest records of each group pairwise into coarser
    /// windows, keeping the counts exact (counted as coarsened); when
    /// nothing is left to merge, drop the oldest segment.
    Coarsen,
}

/// Settings of a [`DiskOutbox`].
#[derive(Debug, Clone)]
pub struct DiskSettings {
    /// Directory of the log.
    pub dir: PathBuf,
    /// Bytes per segment before a new one is started.
    pub segment_bytes: u64,
    /// Bytes on disk at most (all segments).
    pub max_bytes: u64,
    /// Policy when full.
    pub policy: FullPolicy,
    /// `coarsen` leaves this many of the oldest pending records alone, on
    /// top of the records in flight ([`Outbox::hold`], which no rewrite
    /// touches).
    pub protect_oldest: usize,
    /// Bytes on disk at most per stream (record group).
    pub stream_caps: StreamCaps,
}

/// Per-stream byte caps. A stream is a record group (sensor, site,
/// line ...): one chatty stream cannot take the whole outbox from the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamCaps {
    /// Cap of every stream not named in `per_stream`; 0: none.
    pub default: u64,
    /// Caps of named streams (0: none for that stream).
    pub per_stream: BTreeMap<String, u64>,
}

impl StreamCaps {
    /// The cap of a stream, if any.
    pub fn cap(&self, stream: &str) -> Option<u64> {
        let c = self.per_stream.get(stream).copied().unwrap_or(self.default);
        (c > 0).then_some(c)
    }
}

/// Bytes per stream in one segment.
type Summary = HashMap<String, u64>;

/// What a segment rewrite does with pending records.
#[derive(Debug, Clone, Copy)]
enum Rewrite<'a> {
    /// Merge each two successive records of a group (of every group, or
    /// of this one only).
    Merge(Option<&'a str>),
    /// Leave this stream's records out (counted as dropped).
    Drop(&'a str),
    /// Leave every pending record out (counted as dropped): `drop_oldest`
    /// on a segment holding records in flight, which stay.
    DropAll,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    first: u64,
    size: u64,
    /// `coarsen` found nothing left to merge in it (in memory only).
    coarse: bool,
}

/// Where the last read stopped, so sequential reads do not rescan.
#[derive(Debug, Clone, Copy)]
struct ReadPos {
    segment_first: u64,
    offset: u64,
    /// Every record before `offset` in that segment has seq < this.
    next_seq: u64,
}

/// The segment log outbox of records of type `R`, appending through `F`
/// (the real [`RealFs`]; tests put a simulated disk or a double injecting
/// faults there, see [`crate::fs`]). See the
/// module documentation.
#[derive(Debug)]
pub struct DiskOutbox<R, F: Fs = RealFs> {
    fs: F,
    settings: DiskSettings,
    segments: Vec<Segment>,
    active: F::File,
    /// Bytes of the active segment known to be on disk (at its last good
    /// fsync): what a reader may read of it.
    synced_size: u64,
    /// The records written to the active segment after `synced_size`, kept
    /// until an fsync covers them, to write them again if it fails.
    pending: Vec<u8>,
    /// The active segment's bytes after `synced_size` may not be `pending`
    /// (a failed fsync or a failed cut after a failed write): they are cut
    /// and written again before anything else is.
    in_doubt: bool,
    next_seq: u64,
    committed_next: u64,
    unsynced: bool,
    watermark: u64,
    acked: BTreeMap<u64, u64>,
    acks_dirty: bool,
    pos: Option<ReadPos>,
    /// Open handle of the segment being read.
    reader: Option<(u64, F::File)>,
    stats: OutboxStats,
    /// Bytes per stream in each segment, by the segment's first sequence.
    summaries: BTreeMap<u64, Summary>,
    /// Bytes per stream in all segments.
    stream_bytes: Summary,
    /// (segment, stream) pairs where `coarsen` found nothing to merge.
    stream_coarse: HashSet<(u64, String)>,
    /// Sequences the reader took for a delivery and that are not yet
    /// acknowledged or released ([`Outbox::hold`]): no rewrite or drop
    /// touches them.
    inflight: BTreeSet<u64>,
    /// Merges made by `coarsen` not yet taken ([`Outbox::take_merged`]).
    merged: Vec<Merged>,
    /// The type of the records (payloads are serialized `R`s).
    record: PhantomData<fn() -> R>,
}

fn io(path: &Path, source: std::io::Error) -> OutboxError {
    OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn sum_name(first: u64) -> String {
    format!("{first:020}.sum")
}

fn encode_summary(size: u64, sum: &Summary) -> Vec<u8> {
    let mut b = SUM_MAGIC.to_vec();
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&(sum.len() as u32).to_le_bytes());
    let mut entries: Vec<_> = sum.iter().collect();
    entries.sort();
    for (g, n) in entries {
        let g = &g.as_bytes()[..g.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(g.len() as u16).to_le_bytes());
        b.extend_from_slice(g);
        b.extend_from_slice(&n.to_le_bytes());
    }
    let c = crc32fast::hash(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

/// A summary file, if it is intact and describes a segment of `size` bytes.
fn decode_summary(b: &[u8], size: u64) -> Option<Summary> {
    if b.len() < 24 || &b[0..8] != SUM_MAGIC {
        return None;
    }
    let (data, c) = b.split_at(b.len() - 4);
    if crc32fast::hash(data) != u32::from_le_bytes(c.try_into().ok()?) {
        return None;
    }
    if u64::from_le_bytes(data[8..16].try_into().ok()?) != size {
        return None;
    }
    let n = u32::from_le_bytes(data[16..20].try_into().ok()?) as usize;
    let mut sum = Summary::with_capacity(n);
    let mut at = 20;
    for _ in 0..n {
        let gl = u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
        let g = std::str::from_utf8(data.get(at + 2..at + 2 + gl)?).ok()?;
        let v = u64::from_le_bytes(data.get(at + 2 + gl..at + 10 + gl)?.try_into().ok()?);
        sum.insert(g.to_string(), v);
        at += 10 + gl;
    }
    (at == data.len()).then_some(sum)
}

/// Bytes per stream of the valid records of a segment (corrupt spans are
/// skipped here; the reader quarantines them).
fn summarize(file: &impl FsFile, size: u64) -> Summary {
    let mut sum = Summary::new();
    let mut off = HEADER as u64;
    loop {
        match read_slot(file, off, size) {
            Slot::End => break,
            Slot::Record(b, len) => {
                if b.seq != 0 {
                    *sum.entry(b.group).or_default() += len;
                }
                off += len;
            }
            Slot::Bad => match resync(file, off, size) {
                Some(good) => off = good,
                None => break,
            },
        }
    }
    sum
}

fn sync_dir(fs: &impl Fs, dir: &Path) -> Result<(), OutboxError> {
    fs.sync_dir(dir).map_err(|e| io(dir, e))
}

/// Create segment `first` in `dir`: its magic, synced, and the directory
/// synced.
fn new_segment_file(fs: &impl Fs, dir: &Path, first: u64) -> Result<(), OutboxError> {
    let path = dir.join(seg_name(first));
    let mut f = fs
        .open(&path, OpenMode::Truncate)
        .map_err(|e| io(&path, e))?;
    f.write_all(SEG_MAGIC).map_err(|e| io(&path, e))?;
    f.sync_all().map_err(|e| io(&path, e))?;
    sync_dir(fs, dir)
}

/// Write `path` whole or not at all.
fn write_atomic(fs: &impl Fs, path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    crate::fsutil::write_atomic_in(fs, path, bytes).map_err(|e| io(path, e))
}

/// Encode one record.
fn encode(seq: u64, group: &str, id: &str, payload: &[u8]) -> Vec<u8> {
    let g = &group.as_bytes()[..group.len().min(u16::MAX as usize)];
    let i = &id.as_bytes()[..id.len().min(u16::MAX as usize)];
    let body_len = 8 + 2 + g.len() + 2 + i.len() + payload.len();
    let mut out = Vec::with_capacity(HEADER + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(g.len() as u16).to_le_bytes());
    out.extend_from_slice(g);
    out.extend_from_slice(&(i.len() as u16).to_le_bytes());
    out.extend_from_slice(i);
    out.extend_from_slice(payload);
    let crc = crc(&out[0..4], &out[HEADER..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

fn crc(len: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(body);
    h.finalize()
}

/// A decoded record body.
struct Body {
    seq: u64,
    group: String,
    id: String,
    payload: Vec<u8>,
}

fn decode_body(b: &[u8]) -> Option<Body> {
    let seq = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
    let gl = u16::from_le_bytes(b.get(8..10)?.try_into().ok()?) as usize;
    let group = std::str::from_utf8(b.get(10..10 + gl)?).ok()?.to_string();
    let at = 10 + gl;
    let il = u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize;
    let id = std::str::from_utf8(b.get(at + 2..at + 2 + il)?)
        .ok()?
        .to_string();
    let payload = b.get(at + 2 + il..)?.to_vec();
    Some(Body {
        seq,
        group,
        id,
        payload,
    })
}

/// What is at an offset of a segment.
enum Slot {
    /// A valid record of this total length.
    Record(Body, u64),
    /// Nothing more (clean end of the data).
    End,
    /// Bytes that do not form a valid record.
    Bad,
}

fn read_slot(file: &impl FsFile, offset: u64, size: u64) -> Slot {
    if offset >= size {
        return Slot::End;
    }
    if size - offset < HEADER as u64 {
        return Slot::Bad;
    }
    let mut h = [0u8; HEADER];
    if file.read_exact_at(&mut h, offset).is_err() {
        return Slot::Bad;
    }
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let want = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if !(MIN_BODY..=MAX_RECORD).contains(&len) || offset + (HEADER + len) as u64 > size {
        return Slot::Bad;
    }
    let mut body = vec![0u8; len];
    if file
        .read_exact_at(&mut body, offset + HEADER as u64)
        .is_err()
    {
        return Slot::Bad;
    }
    if crc(&h[0..4], &body) != want {
        return Slot::Bad;
    }
    match decode_body(&body) {
        Some(b) => Slot::Record(b, (HEADER + len) as u64),
        None => Slot::Bad,
    }
}

/// The next offset after `from` where a valid record starts, if any.
fn resync(file: &impl FsFile, from: u64, size: u64) -> Option<u64> {
    let mut off = from + 1;
    while off + (HEADER + MIN_BODY) as u64 <= size {
        if let Slot::Record(b, _) = read_slot(file, off, size)
            && b.seq != 0
        {
            return Some(off);
        }
        off += 1;
    }
    None
}

impl<R: Record, F: Fs> DiskOutbox<R, F> {
    /// Open (or create) the log in `settings.dir`. Corruption is repaired and
    /// reported in [`OutboxStats::quarantined`], never returned as an error;
    /// errors are only for a directory that cannot be used at all.
    pub fn open(settings: DiskSettings) -> Result<Self, OutboxError>
    where
        F: Default,
    {
        Self::open_in(F::default(), settings)
    }

    /// [`DiskOutbox::open`] on the file system `fs`.
    pub fn open_in(fs: F, settings: DiskSettings) -> Result<Self, OutboxError> {
        let dir = settings.dir.clone();
        crate::fsutil::create_dir_all_in(&fs, &dir.join("quarantine")).map_err(|e| io(&dir, e))?;
        let mut stats = OutboxStats::default();
        let mut segments = Vec::new();
        for (name, size) in fs.list(&dir).map_err(|e| io(&dir, e))? {
            if name.ends_with(".tmp") {
                let _ = fs.remove_file(&dir.join(&name));
                continue;
            }
            let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let path = dir.join(&name);
            let mut magic = [0u8; 8];
            let ok = fs
                .open(&path, OpenMode::Read)
                .and_then(|f| f.read_exact_at(&mut magic, 0))
                .is_ok()
                && &magic == SEG_MAGIC;
            if !ok {
                // A segment without its header (torn at creation or overwritten):
                // keep its bytes for inspection and go on without it.
                let dest = dir.join("quarantine").join(format!("{name}.whole"));
                fs.rename(&path, &dest).map_err(|e| io(&path, e))?;
                tracing::warn!(segment = %name, quarantined = %dest.display(), "outbox segment without a valid header quarantined");
                stats.quarantined += 1;
                continue;
            }
            segments.push(Segment {
                first,
                size,
                coarse: false,
            });
        }
        segments.sort_by_key(|s| s.first);
        let (watermark, acked) = read_acks(&fs, &dir, &mut stats);
        if segments.is_empty() {
            let first = watermark.max(1);
            new_segment_file(&fs, &dir, first)?;
            segments.push(Segment {
                first,
                size: HEADER as u64,
                coarse: false,
            });
        }
        let (active_first, active_size) = segments
            .last()
            .map(|s| (s.first, s.size))
            .ok_or_else(|| io(&dir, std::io::Error::other("no segment after creating one")))?;
        let active_path = dir.join(seg_name(active_first));

        let mut me = Self {
            active: fs
                .open(&active_path, OpenMode::Append)
                .map_err(|e| io(&active_path, e))?,
            fs: fs.clone(),
            synced_size: active_size,
            pending: Vec::new(),
            in_doubt: false,
            settings,
            segments,
            next_seq: 1,
            committed_next: 1,
            unsynced: false,
            watermark,
            acked,
            acks_dirty: false,
            pos: None,
            reader: None,
            stats,
            summaries: BTreeMap::new(),
            stream_bytes: Summary::new(),
            stream_coarse: HashSet::new(),
            inflight: BTreeSet::new(),
            merged: Vec::new(),
            record: PhantomData,
        };
        me.recover_tail()?;
        me.load_summaries()?;
        me.drop_acked_segments();
        let oldest = me.segments.first().map(|s| s.first).unwrap_or(me.next_seq);
        if me.watermark < oldest {
            me.watermark = oldest;
        }
        me.watermark = me.watermark.min(me.next_seq);
        me.advance_watermark();
        // An `acked` file acknowledging past the newest record (damaged):
        // new records start above it, never below the watermark.
        me.next_seq = me.next_seq.max(me.watermark);
        me.committed_next = me.next_seq;
        me.stats.bytes = me.disk_bytes();
        me.stats.depth = me.depth();
        Ok(me)
    }

    /// Scan the newest segment: find the next sequence, truncate a torn
    /// tail, repair corrupt spans, and sync it: what it holds counts as
    /// committed from now on.
    fn recover_tail(&mut self) -> Result<(), OutboxError> {
        let Some(last) = self.segments.last().copied() else {
            return Ok(());
        };
        let path = self.settings.dir.join(seg_name(last.first));
        let mut file = self
            .fs
            .open(&path, OpenMode::ReadWrite)
            .map_err(|e| io(&path, e))?;
        let mut size = last.size;
        let mut off = HEADER as u64;
        let mut next = last.first;
        let mut sum = Summary::new();
        loop {
            match read_slot(&file, off, size) {
                Slot::End => break,
                Slot::Record(b, len) => {
                    if b.seq != 0 {
                        // Never below the segment's name nor back: a
                        // segment whose records number lower than its name
                        // (damaged, or a hand edit) must not let the next
                        // record reuse a sequence an earlier segment holds.
                        next = next.max(b.seq.saturating_add(1));
                        *sum.entry(b.group).or_default() += len;
                    }
                    off += len;
                }
                Slot::Bad => match resync(&file, off, size) {
                    Some(good) => {
                        off = self.repair(&mut file, last.first, off, good, &mut size)?;
                    }
                    None => {
                        // Torn tail: keep the bytes, cut the file.
                        self.quarantine_bytes(&file, last.first, off, size)?;
                        file.set_len(off).map_err(|e| io(&path, e))?;
                        tracing::warn!(segment = %path.display(), offset = off, bytes = size - off, "outbox: torn tail truncated and quarantined");
                        size = off;
                        break;
                    }
                },
            }
        }
        // A failed fsync (in this process or one before it) leaves the
        // pages it lost readable but clean: no later fsync writes them.
        // Written again, the sync below covers everything read.
        let mut bytes = vec![0u8; size as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| io(&path, e))?;
        file.write_all_at(&bytes, 0).map_err(|e| io(&path, e))?;
        file.sync_all().map_err(|e| io(&path, e))?;
        if let Some(s) = self.segments.last_mut() {
            s.size = size;
        }
        self.synced_size = size;
        self.summaries.insert(last.first, sum);
        self.next_seq = next.max(self.watermark);
        Ok(())
    }

    fn create_segment(&mut self, first: u64) -> Result<(), OutboxError> {
        new_segment_file(&self.fs, &self.settings.dir, first)?;
        let path = self.settings.dir.join(seg_name(first));
        self.active = self
            .fs
            .open(&path, OpenMode::Append)
            .map_err(|e| io(&path, e))?;
        self.synced_size = HEADER as u64;
        self.pending.clear();
        self.in_doubt = false;
        self.unsynced = false;
        self.segments.push(Segment {
            first,
            size: HEADER as u64,
            coarse: false,
        });
        self.summaries.insert(first, Summary::new());
        Ok(())
    }

    /// Per-stream bytes of the sealed segments from their `.sum` files
    /// (rebuilt by a scan where one is missing or stale); orphaned `.sum`
    /// files removed. The active segment's summary comes from `recover_tail`.
    fn load_summaries(&mut self) -> Result<(), OutboxError> {
        let dir = self.settings.dir.clone();
        let sealed = self.segments.len().saturating_sub(1);
        for seg in self.segments[..sealed].iter().copied() {
            let sum_path = dir.join(sum_name(seg.first));
            let loaded = self
                .fs
                .read(&sum_path)
                .ok()
                .and_then(|b| decode_summary(&b, seg.size));
            let sum = match loaded {
                Some(sum) => sum,
                None => {
                    let path = dir.join(seg_name(seg.first));
                    let file = self
                        .fs
                        .open(&path, OpenMode::Read)
                        .map_err(|e| io(&path, e))?;
                    let sum = summarize(&file, seg.size);
                    write_atomic(&self.fs, &sum_path, &encode_summary(seg.size, &sum))?;
                    sum
                }
            };
            self.summaries.insert(seg.first, sum);
        }
        for (name, _) in self.fs.list(&dir).map_err(|e| io(&dir, e))? {
            if let Some(first) = name
                .strip_suffix(".sum")
                .and_then(|s| s.parse::<u64>().ok())
                && !self.summaries.contains_key(&first)
            {
                let _ = self.fs.remove_file(&dir.join(&name));
            }
        }
        self.stream_bytes = Summary::new();
        for sum in self.summaries.values() {
            for (g, n) in sum {
                *self.stream_bytes.entry(g.clone()).or_default() += n;
            }
        }
        Ok(())
    }

    /// Replace the summary of segment `first` (and its `.sum` file, when the
    /// segment is sealed), keeping the per-stream totals.
    fn set_summary(&mut self, first: u64, sum: Summary) -> Result<(), OutboxError> {
        let sealed = self.segments.last().is_some_and(|s| s.first != first);
        if sealed && let Some(seg) = self.segments.iter().find(|s| s.first == first) {
            let dir = self.settings.dir.clone();
            write_atomic(
                &self.fs,
                &dir.join(sum_name(first)),
                &encode_summary(seg.size, &sum),
            )?;
        }
        self.forget_summary(first);
        for (g, n) in &sum {
            *self.stream_bytes.entry(g.clone()).or_default() += n;
        }
        self.summaries.insert(first, sum);
        self.stream_coarse.retain(|(s, _)| *s != first);
        Ok(())
    }

    /// Take segment `first` out of the per-stream totals.
    fn forget_summary(&mut self, first: u64) {
        if let Some(old) = self.summaries.remove(&first) {
            for (g, n) in old {
                if let Some(t) = self.stream_bytes.get_mut(&g) {
                    *t = t.saturating_sub(n);
                    if *t == 0 {
                        self.stream_bytes.remove(&g);
                    }
                }
            }
        }
    }

    /// Rebuild the summary of segment `first` by scanning it (after a repair).
    fn resummarize(&mut self, first: u64) -> Result<(), OutboxError> {
        let Some(seg) = self.segments.iter().find(|s| s.first == first).copied() else {
            return Ok(());
        };
        let path = self.settings.dir.join(seg_name(first));
        let file = self
            .fs
            .open(&path, OpenMode::Read)
            .map_err(|e| io(&path, e))?;
        let sum = summarize(&file, seg.size);
        self.set_summary(first, sum)
    }

    fn quarantine_bytes(
        &mut self,
        file: &F::File,
        segment: u64,
        from: u64,
        to: u64,
    ) -> Result<(), OutboxError> {
        let mut bytes = vec![0u8; (to - from) as usize];
        let _ = file.read_exact_at(&mut bytes, from);
        if !bytes.iter().all(|&b| b == 0) {
            let dest = self
                .settings
                .dir
                .join("quarantine")
                .join(format!("{}-{from}.bad", seg_name(segment)));
            self.fs.write(&dest, &bytes).map_err(|e| io(&dest, e))?;
        }
        self.stats.quarantined += 1;
        self.stats.quarantined_bytes += to - from;
        Ok(())
    }

    /// Quarantine `[from, to)` of a segment, read through `file` up to
    /// `size`, and make it readable: overwritten with padding, or, when it
    /// is too short for a padding record, cut out (see
    /// [`DiskOutbox::cut_span`]; `file` and `size` then describe the new
    /// file). Any span within `size` is handled. Returns the offset where
    /// reading goes on.
    fn repair(
        &mut self,
        file: &mut F::File,
        segment: u64,
        from: u64,
        to: u64,
        size: &mut u64,
    ) -> Result<u64, OutboxError> {
        let to = to.min(*size);
        if from >= to {
            return Ok(from);
        }
        self.quarantine_bytes(file, segment, from, to)?;
        let path = self.settings.dir.join(seg_name(segment));
        let span = to - from;
        if span < (HEADER + MIN_BODY) as u64 {
            self.cut_span(file, segment, from..to, size)?;
            tracing::warn!(segment = %path.display(), offset = from, bytes = span, "outbox: corrupt bytes quarantined and cut out");
            return Ok(from);
        }
        // `span` is below the segment's size, itself far below 4 GiB: the
        // conversions cannot truncate.
        let body_len = span as usize - HEADER;
        let mut pad = vec![0u8; HEADER + body_len];
        pad[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
        // seq 0 (padding) and two empty strings: all zero bytes.
        let c = crc(&pad[0..4], &pad[HEADER..]);
        pad[4..8].copy_from_slice(&c.to_le_bytes());
        file.write_all_at(&pad, from).map_err(|e| io(&path, e))?;
        file.sync_data().map_err(|e| io(&path, e))?;
        tracing::warn!(segment = %path.display(), offset = from, bytes = span, "outbox: corrupt records quarantined");
        Ok(to)
    }

    /// Cut `span` out of segment `segment`, read through `file` up to
    /// `size`: the segment is rewritten without it (beside, synced, renamed
    /// over), the records after it move up. For the active segment the
    /// records not yet synced are written from memory after it, and the
    /// append handle is opened again. `file` and `size` then describe the
    /// new file.
    fn cut_span(
        &mut self,
        file: &mut F::File,
        segment: u64,
        span: std::ops::Range<u64>,
        size: &mut u64,
    ) -> Result<(), OutboxError> {
        let (from, to) = (span.start, span.end);
        let path = self.settings.dir.join(seg_name(segment));
        let active = self.segments.last().is_some_and(|s| s.first == segment);
        let mut bytes = vec![0u8; *size as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| io(&path, e))?;
        bytes.drain(from as usize..to as usize);
        if active {
            bytes.extend_from_slice(&self.pending);
        }
        write_atomic(&self.fs, &path, &bytes)?;
        *file = self
            .fs
            .open(&path, OpenMode::ReadWrite)
            .map_err(|e| io(&path, e))?;
        let cut = to - from;
        *size -= cut;
        if let Some(s) = self.segments.iter_mut().find(|s| s.first == segment) {
            s.size -= cut;
        }
        if active {
            // The new file is synced whole, the records not synced before included.
            self.active = self
                .fs
                .open(&path, OpenMode::Append)
                .map_err(|e| io(&path, e))?;
            self.synced_size = bytes.len() as u64;
            self.pending.clear();
            self.in_doubt = false;
            self.unsynced = false;
        }
        if self
            .pos
            .is_some_and(|p| p.segment_first == segment && p.offset > from)
        {
            self.pos = None;
        }
        // A kept handle would read the old file.
        if self.reader.as_ref().is_some_and(|(f, _)| *f == segment) {
            self.reader = None;
        }
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    fn acked_count(&self) -> u64 {
        self.acked.iter().map(|(s, e)| e - s).sum()
    }

    fn depth(&self) -> u64 {
        self.next_seq
            .saturating_sub(self.watermark)
            .saturating_sub(self.acked_count())
    }

    /// Mark `[start, end)` as acknowledged or gone.
    fn mark_done(&mut self, start: u64, end: u64) {
        let start = start.max(self.watermark);
        if start >= end {
            return;
        }
        let mut s = start;
        let mut e = end;
        // Merge with overlapping or adjacent ranges.
        let overlapping: Vec<(u64, u64)> = self
            .acked
            .range(..=e)
            .filter(|(_, re)| **re >= s)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in overlapping {
            self.acked.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        self.acked.insert(s, e);
        self.acks_dirty = true;
        self.advance_watermark();
    }

    fn advance_watermark(&mut self) {
        while let Some((&s, &e)) = self.acked.first_key_value() {
            if s > self.watermark {
                break;
            }
            self.acked.remove(&s);
            self.watermark = self.watermark.max(e);
            self.acks_dirty = true;
        }
        self.drop_acked_segments();
    }

    /// Every record is acknowledged and the segment being written holds
    /// some: seal it and start a fresh one, so that its space comes back
    /// (a segment is deleted only once sealed). Done when a drained active
    /// segment reaches a sixteenth of `segment_bytes`, or whenever asked
    /// ([`Outbox::reclaim`]: a write failed, the disk may be full, and on a
    /// disk smaller than one segment nothing would ever be freed).
    fn seal_drained(&mut self, always: bool) -> Result<(), OutboxError> {
        let Some(active) = self.segments.last().copied() else {
            return Ok(());
        };
        let drained = self.watermark >= self.next_seq
            && self.committed_next == self.next_seq
            && !self.unsynced
            && !self.in_doubt
            && self.inflight.is_empty();
        let used = active.size > HEADER as u64;
        if !(drained && used && (always || active.size >= self.settings.segment_bytes / 16)) {
            return Ok(());
        }
        self.roll()?;
        self.drop_acked_segments();
        self.stats.bytes = self.disk_bytes();
        Ok(())
    }

    /// Delete sealed segments whose every record is below the watermark.
    fn drop_acked_segments(&mut self) {
        while self.segments.len() > 1 && self.segments[1].first <= self.watermark {
            let s = self.segments.remove(0);
            let path = self.settings.dir.join(seg_name(s.first));
            if let Err(e) = self.fs.remove_file(&path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot delete acknowledged outbox segment");
            }
            let _ = self
                .fs
                .remove_file(&self.settings.dir.join(sum_name(s.first)));
            self.forget_summary(s.first);
            self.stream_coarse.retain(|(f, _)| *f != s.first);
            if self.pos.is_some_and(|p| p.segment_first == s.first) {
                self.pos = None;
            }
            if self.reader.as_ref().is_some_and(|(f, _)| *f == s.first) {
                self.reader = None;
            }
        }
    }

    /// Make room for `need` more bytes under the policy.
    fn make_room(&mut self, need: u64) -> Result<(), OutboxError> {
        while self.disk_bytes() + need > self.settings.max_bytes {
            match self.settings.policy {
                FullPolicy::RejectNew => {
                    self.stats.rejected += 1;
                    return Err(OutboxError::Full);
                }
                FullPolicy::DropOldest => self.drop_oldest_segment()?,
                FullPolicy::Coarsen => {
                    if !self.coarsen_oldest()? {
                        // Nothing left to merge in the oldest segment.
                        self.drop_oldest_segment()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Make sure a sealed segment exists besides the one being written.
    fn ensure_sealed(&mut self) -> Result<(), OutboxError> {
        if self.segments.len() < 2 {
            // Only the segment being written is left: start a new one so the
            // full one can be worked on.
            self.roll()?;
            if self.segments.len() < 2 {
                return Err(OutboxError::Full);
            }
        }
        Ok(())
    }

    /// Delete the oldest segment, counting its undelivered records as
    /// dropped. Records in flight stay: a segment holding some is rewritten
    /// without its other pending records instead (the oldest such segment
    /// that shrinks); when nothing but records in flight is left in the
    /// sealed segments, the new record is refused (counted as rejected).
    fn drop_oldest_segment(&mut self) -> Result<(), OutboxError> {
        self.ensure_sealed()?;
        let gone_to = self.segments[1].first;
        if gone_to <= self.watermark {
            // Done already (acknowledged while it was being written, then
            // sealed): only deleting it is left. Marking it done again would
            // change nothing, and the caller would loop forever.
            self.drop_acked_segments();
            return Ok(());
        }
        if self
            .inflight
            .range(self.segments[0].first..gone_to)
            .next()
            .is_some()
        {
            // Rewritten rather than marked done: a segment after the
            // oldest is only deleted once the watermark passes it.
            for idx in 0..self.segments.len() - 1 {
                if self.rewrite_segment(idx, 0, Rewrite::DropAll)?.0 {
                    return Ok(());
                }
            }
            self.stats.rejected += 1;
            return Err(OutboxError::Full);
        }
        let lost = self.pending_in(self.segments[0].first, gone_to);
        self.stats.dropped += lost;
        tracing::warn!(
            records = lost,
            policy = ?self.settings.policy,
            "outbox full: oldest segment dropped"
        );
        // The watermark passes it, so drop_acked_segments deletes it.
        self.mark_done(self.watermark, gone_to);
        Ok(())
    }

    /// Policy `coarsen`: rewrite the oldest sealed segment that still has
    /// something to merge, with each two successive records of a group in
    /// it merged into one coarser window (exact counts, see
    /// [`Record::merge`]). The oldest `protect_oldest` pending records and
    /// every record in flight are left alone: merging one in flight would
    /// lose or double count readings. Returns whether a segment shrank.
    fn coarsen_oldest(&mut self) -> Result<bool, OutboxError> {
        self.ensure_sealed()?;
        let mut protect_left = self.settings.protect_oldest;
        for idx in 0..self.segments.len() - 1 {
            let seg = self.segments[idx];
            if seg.coarse && protect_left == 0 {
                continue;
            }
            let (shrank, pending) =
                self.rewrite_segment(idx, protect_left, Rewrite::Merge(None))?;
            protect_left = protect_left.saturating_sub(pending);
            if shrank {
                return Ok(true);
            }
            self.segments[idx].coarse = true;
        }
        Ok(false)
    }

    /// Rewrite sealed segment `idx` under `action`, leaving its first
    /// `protect` pending records alone and done records out. Returns whether
    /// it shrank (for a one-stream action: whether that stream's bytes in it
    /// shrank) and how many pending records it held.
    fn rewrite_segment(
        &mut self,
        idx: usize,
        protect: usize,
        action: Rewrite<'_>,
    ) -> Result<(bool, usize), OutboxError> {
        let seg = self.segments[idx];
        let path = self.settings.dir.join(seg_name(seg.first));
        let file = self
            .fs
            .open(&path, OpenMode::Read)
            .map_err(|e| io(&path, e))?;
        let mut pending = Vec::new();
        let mut off = HEADER as u64;
        loop {
            match read_slot(&file, off, seg.size) {
                Slot::End => break,
                // Corruption is for the reader to quarantine; do not rewrite it.
                Slot::Bad => return Ok((false, 0)),
                Slot::Record(b, len) => {
                    off += len;
                    if b.seq != 0 && !self.is_done(b.seq) {
                        pending.push(b);
                    }
                }
            }
        }
        let held = pending.len();
        let rest = pending.split_off(protect.min(held));
        let mut out: Vec<(u64, String, Vec<u8>, Option<R>)> = pending
            .into_iter()
            .map(|b| (b.seq, b.group, b.payload, None))
            .collect();
        let mut open: HashMap<String, usize> = HashMap::new();
        let mut merged = Vec::new();
        // The ids each merged record (by its place in `out`) replaces.
        let mut sources: HashMap<usize, Vec<String>> = HashMap::new();
        let mut dropped = Vec::new();
        for b in rest {
            if self.inflight.contains(&b.seq) {
                // In flight: kept as it was sent, and no merge across it
                // (a merge is of successive windows of a group).
                open.remove(&b.group);
                out.push((b.seq, b.group, b.payload, None));
                continue;
            }
            let keep = match action {
                Rewrite::Drop(g) => {
                    if b.group == g {
                        dropped.push(b.seq);
                        continue;
                    }
                    true
                }
                Rewrite::Merge(Some(g)) => b.group != g,
                Rewrite::Merge(None) => false,
                Rewrite::DropAll => {
                    dropped.push(b.seq);
                    continue;
                }
            };
            let agg = if keep {
                None
            } else {
                serde_json::from_slice::<R>(&b.payload).ok()
            };
            let Some(agg) = agg else {
                out.push((b.seq, b.group, b.payload, None));
                continue;
            };
            match open.remove(&b.group) {
                Some(i) => {
                    if let Some(first) = out[i].3.as_mut() {
                        Record::merge(first, &agg);
                    }
                    sources.entry(i).or_default().push(agg.id().to_string());
                    merged.push(b.seq);
                }
                None => {
                    open.insert(b.group.clone(), out.len());
                    sources.insert(out.len(), vec![agg.id().to_string()]);
                    out.push((b.seq, b.group, Vec::new(), Some(agg)));
                }
            }
        }
        if merged.is_empty() && dropped.is_empty() {
            return Ok((false, held));
        }
        let mut bytes = SEG_MAGIC.to_vec();
        let mut sum = Summary::new();
        for (seq, group, payload, agg) in &out {
            let rec = match agg {
                Some(a) => encode(*seq, group, a.id(), &serde_json::to_vec(a)?),
                None => {
                    let id = serde_json::from_slice::<R>(payload)
                        .map(|a| a.id().to_string())
                        .unwrap_or_default();
                    encode(*seq, group, &id, payload)
                }
            };
            *sum.entry(group.clone()).or_default() += rec.len() as u64;
            bytes.extend(rec);
        }
        // Old summary out first: a crash before the new one is written
        // leaves none, and the segment is scanned at the next start.
        let sum_path = self.settings.dir.join(sum_name(seg.first));
        let _ = self.fs.remove_file(&sum_path);
        // A crash leaves the old or the new segment, never half of one
        // (`*.tmp` files are removed at open).
        write_atomic(&self.fs, &path, &bytes)?;
        let new_size = bytes.len() as u64;
        self.segments[idx].size = new_size;
        if self.pos.is_some_and(|p| p.segment_first == seg.first) {
            self.pos = None;
        }
        // The file was replaced: a kept handle would read the old one.
        if self.reader.as_ref().is_some_and(|(f, _)| *f == seg.first) {
            self.reader = None;
        }
        let stream = match action {
            Rewrite::Drop(g) | Rewrite::Merge(Some(g)) => Some(g.to_string()),
            Rewrite::Merge(None) | Rewrite::DropAll => None,
        };
        let stream_before = stream
            .as_ref()
            .and_then(|g| self.summaries.get(&seg.first)?.get(g).copied())
            .unwrap_or(0);
        let stream_after = stream
            .as_ref()
            .and_then(|g| sum.get(g).copied())
            .unwrap_or(0);
        let mut made: Vec<(usize, Vec<String>)> =
            sources.into_iter().filter(|(_, f)| f.len() > 1).collect();
        made.sort_by_key(|(i, _)| *i);
        for (i, from) in made {
            if let Some(a) = out[i].3.as_ref() {
                self.merged.push(Merged {
                    id: a.id().to_string(),
                    stream: out[i].1.clone(),
                    from,
                });
            }
        }
        self.set_summary(seg.first, sum)?;
        self.stats.coarsened += merged.len() as u64;
        self.stats.dropped += dropped.len() as u64;
        tracing::warn!(
            stream = stream.as_deref().unwrap_or("*"),
            merged = merged.len(),
            dropped = dropped.len(),
            bytes_before = seg.size,
            bytes_after = new_size,
            "outbox full: oldest aggregates {}",
            if dropped.is_empty() {
                "merged into coarser windows (policy coarsen)"
            } else {
                "dropped (policy drop_oldest)"
            }
        );
        for seq in merged.into_iter().chain(dropped) {
            self.mark_done(seq, seq + 1);
        }
        let shrank = match stream {
            Some(_) => stream_after < stream_before,
            None => new_size < seg.size,
        };
        Ok((shrank, held))
    }

    /// Bytes on disk of one stream.
    fn stream_size(&self, stream: &str) -> u64 {
        self.stream_bytes.get(stream).copied().unwrap_or(0)
    }

    /// Make room for `need` more bytes of `stream` under its cap.
    fn make_stream_room(&mut self, stream: &str, need: u64) -> Result<(), OutboxError> {
        let Some(cap) = self.settings.stream_caps.cap(stream) else {
            return Ok(());
        };
        while self.stream_size(stream) + need > cap {
            let freed = match self.settings.policy {
                FullPolicy::RejectNew => false,
                FullPolicy::DropOldest => self.shrink_stream(stream, Rewrite::Drop(stream))?,
                FullPolicy::Coarsen => {
                    self.shrink_stream(stream, Rewrite::Merge(Some(stream)))?
                        || self.shrink_stream(stream, Rewrite::Drop(stream))?
                }
            };
            if !freed {
                // `reject_new`, or a record larger than the stream's cap.
                self.stats.rejected += 1;
                return Err(OutboxError::StreamFull(stream.to_string()));
            }
        }
        Ok(())
    }

    /// Rewrite the oldest sealed segment where `action` frees bytes of
    /// `stream`. Returns whether one did.
    fn shrink_stream(&mut self, stream: &str, action: Rewrite<'_>) -> Result<bool, OutboxError> {
        let holds = |me: &Self, first: u64| {
            me.summaries
                .get(&first)
                .is_some_and(|sum| sum.get(stream).is_some_and(|n| *n > 0))
        };
        let sealed = self.segments.len().saturating_sub(1);
        if !self.segments[..sealed].iter().any(|s| holds(self, s.first)) {
            // Only the segment being written holds this stream: seal it so
            // that its records can be rewritten.
            self.roll()?;
        }
        let protect_all = match action {
            Rewrite::Merge(_) => self.settings.protect_oldest,
            Rewrite::Drop(_) | Rewrite::DropAll => 0,
        };
        let mut protect_left = protect_all;
        for idx in 0..self.segments.len().saturating_sub(1) {
            let seg = self.segments[idx];
            let key = (seg.first, stream.to_string());
            let skip = !holds(self, seg.first)
                || (matches!(action, Rewrite::Merge(_))
                    && protect_left == 0
                    && self.stream_coarse.contains(&key));
            if skip {
                continue;
            }
            let (shrank, pending) = self.rewrite_segment(idx, protect_left, action)?;
            protect_left = protect_left.saturating_sub(pending);
            if shrank {
                return Ok(true);
            }
            if matches!(action, Rewrite::Merge(_)) {
                self.stream_coarse.insert(key);
            }
        }
        Ok(false)
    }

    /// Seal the active segment and start a new one at `next_seq`.
    fn roll(&mut self) -> Result<(), OutboxError> {
        self.sync_active()?;
        if self
            .segments
            .last()
            .is_some_and(|s| s.first == self.next_seq)
        {
            // Empty active segment: nothing to seal.
            return Ok(());
        }
        if let Some(seg) = self.segments.last().copied() {
            let sum = self.summaries.get(&seg.first).cloned().unwrap_or_default();
            let dir = self.settings.dir.clone();
            write_atomic(
                &self.fs,
                &dir.join(sum_name(seg.first)),
                &encode_summary(seg.size, &sum),
            )?;
        }
        self.create_segment(self.next_seq)
    }

    /// The path of the active segment.
    fn active_path(&self) -> PathBuf {
        let first = self.segments.last().map(|s| s.first).unwrap_or(0);
        self.settings.dir.join(seg_name(first))
    }

    /// Make the active segment durable. A failed fsync does not leave what
    /// it was to sync in the page cache to be retried: Linux reports the
    /// error once and forgets the pages, and a later fsync succeeds without
    /// them. So the records since the last good fsync are cut off and
    /// written again from memory, and synced again; until that succeeds
    /// nothing more counts as synced.
    fn sync_active(&mut self) -> Result<(), OutboxError> {
        if self.in_doubt {
            self.restore()?;
        }
        if !self.unsynced {
            return Ok(());
        }
        if let Err(e) = self.active.sync_data() {
            self.in_doubt = true;
            let path = self.active_path();
            tracing::warn!(error = %e, segment = %path.display(), bytes = self.pending.len(), "outbox: fsync failed; writing the records since the last good one again");
            let again = self
                .restore()
                .and_then(|()| self.active.sync_data().map_err(|e2| io(&path, e2)));
            if let Err(e2) = again {
                self.in_doubt = true;
                tracing::error!(error = %e2, segment = %path.display(), "outbox: records not synced; tried again at the next commit");
                return Err(io(&path, e));
            }
        }
        self.synced_size += self.pending.len() as u64;
        self.pending.clear();
        self.unsynced = false;
        Ok(())
    }

    /// Make the active segment hold what was synced of it followed by the
    /// records written since (from memory): cut it back and append them
    /// again. They are synced at the next [`DiskOutbox::sync_active`].
    fn restore(&mut self) -> Result<(), OutboxError> {
        let path = self.active_path();
        self.in_doubt = true;
        self.unsynced = true;
        self.active
            .set_len(self.synced_size)
            .map_err(|e| io(&path, e))?;
        if let Err(e) = self.active.write_all(&self.pending) {
            // Left in doubt: cut and written again at the next try.
            let _ = self.active.set_len(self.synced_size);
            return Err(io(&path, e));
        }
        self.in_doubt = false;
        Ok(())
    }

    fn write_acks(&mut self) -> Result<(), OutboxError> {
        let mut b = Vec::with_capacity(24 + self.acked.len() * 16);
        b.extend_from_slice(ACK_MAGIC);
        b.extend_from_slice(&self.watermark.to_le_bytes());
        b.extend_from_slice(&(self.acked.len() as u32).to_le_bytes());
        for (s, e) in &self.acked {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
        }
        let c = crc32fast::hash(&b);
        b.extend_from_slice(&c.to_le_bytes());
        write_atomic(&self.fs, &self.settings.dir.join("acked"), &b)?;
        self.acks_dirty = false;
        Ok(())
    }

    /// Read records from the segment holding `from`, skipping padding and
    /// done records, repairing corruption.
    fn scan(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord<R>>, OutboxError> {
        let mut out = Vec::new();
        let mut from = from.max(self.watermark);
        while out.len() < max && from < self.committed_next && !self.segments.is_empty() {
            // The segment holding `from`: the last one starting at or before it.
            let Some(idx) = self.segments.iter().rposition(|s| s.first <= from) else {
                from = self.segments.first().map(|s| s.first).unwrap_or(from);
                continue;
            };
            let seg = self.segments[idx];
            let seg_end = self
                .segments
                .get(idx + 1)
                .map(|s| s.first)
                .unwrap_or(self.committed_next);
            // The segment's size is tracked as it is written (of the active
            // segment, only what an fsync covered is read: the rest is not
            // committed, and may be in doubt); the file handle is kept
            // while reading goes on in the same segment.
            let mut size = if idx + 1 == self.segments.len() {
                self.synced_size.min(seg.size)
            } else {
                seg.size
            };
            let mut file = match self.reader.take() {
                Some((first, f)) if first == seg.first => f,
                _ => {
                    let path = self.settings.dir.join(seg_name(seg.first));
                    self.fs
                        .open(&path, OpenMode::ReadWrite)
                        .map_err(|e| io(&path, e))?
                }
            };
            let (mut off, mut expect) = match self.pos {
                Some(p) if p.segment_first == seg.first && p.next_seq <= from => {
                    (p.offset, p.next_seq)
                }
                _ => (HEADER as u64, seg.first),
            };
            let mut done_segment = false;
            while out.len() < max {
                match read_slot(&file, off, size) {
                    Slot::End => {
                        done_segment = true;
                        break;
                    }
                    Slot::Bad => {
                        let good = resync(&file, off, size);
                        let to = good.unwrap_or(size);
                        off = self.repair(&mut file, seg.first, off, to, &mut size)?;
                        self.resummarize(seg.first)?;
                        if good.is_none() {
                            done_segment = true;
                            break;
                        }
                    }
                    Slot::Record(b, len) => {
                        if b.seq == 0 {
                            off += len;
                            continue;
                        }
                        if b.seq >= self.committed_next {
                            // Not committed yet: nothing further is readable.
                            self.keep_reader(seg.first, file);
                            return Ok(out);
                        }
                        if b.seq > expect {
                            // Sequences that are not there any more: quarantined,
                            // unless they were done (acknowledged, merged or
                            // dropped) and left out by a rewrite.
                            self.stats.lost += self.pending_in(expect, b.seq);
                            self.mark_done(expect, b.seq);
                        }
                        off += len;
                        expect = b.seq + 1;
                        self.pos = Some(ReadPos {
                            segment_first: seg.first,
                            offset: off,
                            next_seq: expect,
                        });
                        if b.seq < from || self.is_done(b.seq) {
                            continue;
                        }
                        out.push(OutboxRecord {
                            seq: b.seq,
                            group: b.group,
                            id: b.id,
                            payload: b.payload,
                            record: PhantomData,
                        });
                    }
                }
            }
            if done_segment {
                if expect < seg_end {
                    // The rest of this segment's sequences are gone.
                    self.stats.lost += self.pending_in(expect, seg_end);
                    self.mark_done(expect, seg_end);
                }
                from = from.max(seg_end);
            }
            self.keep_reader(seg.first, file);
            if done_segment && idx + 1 == self.segments.len() {
                break;
            }
        }
        Ok(out)
    }

    /// Keep the read handle of segment `first` for the next read, unless
    /// the segment is gone meanwhile.
    fn keep_reader(&mut self, first: u64, file: F::File) {
        if self.segments.iter().any(|s| s.first == first) {
            self.reader = Some((first, file));
        }
    }

    /// How many sequences of `[start, end)` are not done.
    fn pending_in(&self, start: u64, end: u64) -> u64 {
        let start = start.max(self.watermark);
        if start >= end {
            return 0;
        }
        let done: u64 = self
            .acked
            .range(..end)
            .map(|(s, e)| (*e).min(end).saturating_sub((*s).max(start)))
            .sum();
        (end - start).saturating_sub(done)
    }

    fn is_done(&self, seq: u64) -> bool {
        seq < self.watermark
            || self
                .acked
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, e)| seq < *e)
    }
}

fn read_acks(fs: &impl Fs, dir: &Path, stats: &mut OutboxStats) -> (u64, BTreeMap<u64, u64>) {
    let path = dir.join("acked");
    let Ok(b) = fs.read(&path) else {
        return (0, BTreeMap::new());
    };
    let parse = || -> Option<(u64, BTreeMap<u64, u64>)> {
        if b.len() < 24 || &b[0..8] != ACK_MAGIC {
            return None;
        }
        let (data, c) = b.split_at(b.len() - 4);
        if crc32fast::hash(data) != u32::from_le_bytes(c.try_into().ok()?) {
            return None;
        }
        let w = u64::from_le_bytes(data[8..16].try_into().ok()?);
        let n = u32::from_le_bytes(data[16..20].try_into().ok()?) as usize;
        if data.len() != 20 + n * 16 {
            return None;
        }
        let mut m = BTreeMap::new();
        for r in data[20..].chunks_exact(16) {
            m.insert(
                u64::from_le_bytes(r[0..8].try_into().ok()?),
                u64::from_le_bytes(r[8..16].try_into().ok()?),
            );
        }
        Some((w, m))
    };
    match parse() {
        Some(v) => v,
        None => {
            // Unreadable acknowledgements: everything held is sent again
            // (at least once; consumers deduplicate by id).
            let dest = dir.join("quarantine").join("acked.bad");
            let _ = fs.rename(&path, &dest);
            tracing::warn!(path = %path.display(), "outbox acknowledgements unreadable; quarantined, undelivered records will be re-sent");
            stats.quarantined += 1;
            (0, BTreeMap::new())
        }
    }
}

impl<R: Record, F: Fs> Outbox<R> for DiskOutbox<R, F> {
    fn append(&mut self, record: &R) -> Result<u64, OutboxError> {
        if self.next_seq == u64::MAX {
            // Only a damaged segment or `acked` file numbering near 2^64 gets here.
            return Err(io(
                &self.settings.dir,
                std::io::Error::other(
                    "no sequence number left (a damaged segment or acked file numbers near 2^64)",
                ),
            ));
        }
        let payload = serde_json::to_vec(record)?;
        let seq = self.next_seq;
        let group = record.stream();
        let rec = encode(seq, group, record.id(), &payload);
        self.make_stream_room(group, rec.len() as u64)?;
        self.make_room(rec.len() as u64)?;
        let active_size = self.segments.last().map(|s| s.size).unwrap_or(0);
        if active_size > HEADER as u64
            && active_size + rec.len() as u64 > self.settings.segment_bytes
        {
            self.roll()?;
        }
        if self.in_doubt {
            self.restore()?;
        }
        if let Err(e) = self.active.write_all(&rec) {
            // Part of the record may be in the file: cut it back to the
            // records it holds, or the next record would land after the
            // stray bytes. Where the cut fails too, the active segment is
            // cut and written again before anything else is.
            let path = self.active_path();
            let size = self.synced_size + self.pending.len() as u64;
            if let Err(e2) = self.active.set_len(size) {
                self.in_doubt = true;
                tracing::error!(error = %e2, segment = %path.display(), "outbox: cannot cut a failed write back");
            }
            return Err(io(&path, e));
        }
        self.pending.extend_from_slice(&rec);
        if let Some(s) = self.segments.last_mut() {
            s.size += rec.len() as u64;
            *self
                .summaries
                .entry(s.first)
                .or_default()
                .entry(group.to_string())
                .or_default() += rec.len() as u64;
            *self.stream_bytes.entry(group.to_string()).or_default() += rec.len() as u64;
        }
        self.unsynced = true;
        self.next_seq += 1;
        self.stats.appended += 1;
        self.stats.bytes = self.disk_bytes();
        self.stats.depth = self.depth();
        Ok(seq)
    }

    fn commit(&mut self) -> Result<(), OutboxError> {
        self.sync_active()?;
        self.committed_next = self.next_seq;
        if self.acks_dirty {
            self.write_acks()?;
        }
        Ok(())
    }

    fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<OutboxRecord<R>>, OutboxError> {
        let r = self.scan(from, max);
        self.stats.depth = self.depth();
        r
    }

    fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        self.inflight.remove(&seq);
        if seq == 0 || seq >= self.next_seq || self.is_done(seq) {
            return Ok(());
        }
        self.mark_done(seq, seq + 1);
        self.stats.acked += 1;
        if let Err(e) = self.seal_drained(false) {
            // Tried again at the next acknowledgement or reclaim.
            tracing::warn!(error = %e, "outbox: cannot seal the drained segment");
        }
        self.stats.bytes = self.disk_bytes();
        self.stats.depth = self.depth();
        Ok(())
    }

    fn oldest(&self) -> Option<u64> {
        (self.watermark < self.committed_next).then_some(self.watermark)
    }

    fn committed_end(&self) -> u64 {
        self.committed_next
    }

    fn stats(&self) -> OutboxStats {
        self.stats
    }

    fn stream_bytes(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .stream_bytes
            .iter()
            .map(|(g, n)| (g.clone(), *n))
            .collect();
        v.sort();
        v
    }

    fn hold(&mut self, seqs: &[u64]) {
        for &seq in seqs {
            if seq != 0 && seq < self.next_seq && !self.is_done(seq) {
                self.inflight.insert(seq);
            }
        }
    }

    fn release(&mut self, seqs: &[u64]) {
        for seq in seqs {
            self.inflight.remove(seq);
        }
    }

    fn reclaim(&mut self) -> Result<(), OutboxError> {
        self.seal_drained(true)
    }

    fn take_merged(&mut self) -> Vec<Merged> {
        std::mem::take(&mut self.merged)
    }

    fn release_all(&mut self) {
        self.inflight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::segment_file::faulty::{EFBIG, EIO, ENOSPC, Faulty};
    use crate::outbox::tests::{Agg, agg};
    use proptest::prelude::*;
    use std::fs::OpenOptions;

    type DiskOutbox = super::DiskOutbox<Agg>;

    fn settings(
        dir: &Path,
        segment_bytes: u64,
        max_bytes: u64,
        policy: FullPolicy,
    ) -> DiskSettings {
        DiskSettings {
            dir: dir.to_path_buf(),
            segment_bytes,
            max_bytes,
            policy,
            protect_oldest: 0,
            stream_caps: Default::default(),
        }
    }

    fn open(dir: &Path) -> DiskOutbox {
        DiskOutbox::open(settings(dir, 4096, 1 << 20, FullPolicy::DropOldest)).unwrap()
    }

    /// A closed outbox holding `n` committed records.
    fn written(n: i64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut o = open(dir.path());
        for i in 0..n {
            o.append(&agg(i)).unwrap();
        }
        o.commit().unwrap();
        dir
    }

    fn pending(o: &mut DiskOutbox) -> Vec<u64> {
        o.read_from(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    fn seg_bytes(dir: &Path) -> u64 {
        segments(dir)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }

    /// A disk smaller than one segment: delivered records give their
    /// space back when asked (a write failed), and by themselves once the
    /// drained segment reaches a sixteenth of `segment_bytes`; never while
    /// anything is undelivered.
    #[test]
    fn a_drained_segment_gives_its_space_back() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 1 MiB: bigger than anything written here.
        let reopen = || {
            DiskOutbox::open(settings(
                dir.path(),
                1 << 20,
                8 << 20,
                FullPolicy::DropOldest,
            ))
            .unwrap()
        };
        let mut o = reopen();
        for i in 0..20 {
            o.append(&agg(i)).unwrap();
        }
        o.commit().unwrap();
        let full = seg_bytes(dir.path());
        let seqs = pending(&mut o);
        for s in &seqs[..19] {
            o.ack(*s).unwrap();
        }
        o.reclaim().unwrap();
        assert_eq!(seg_bytes(dir.path()), full, "one record still undelivered");
        o.ack(seqs[19]).unwrap();
        assert_eq!(seg_bytes(dir.path()), full, "small: kept until asked");
        o.reclaim().unwrap();
        assert!(
            seg_bytes(dir.path()) < 64,
            "{} bytes left",
            seg_bytes(dir.path())
        );
        assert_eq!(o.append(&agg(20)).unwrap(), 21, "sequences continue");
        o.commit().unwrap();
        drop(o);
        let mut o = reopen();
        assert_eq!(pending(&mut o), vec![21]);
        // By itself past a sixteenth of the segment size (64 KiB).
        let mut i = 21;
        while seg_bytes(dir.path()) < 70_000 {
            o.append(&agg(i)).unwrap();
            i += 1;
        }
        o.commit().unwrap();
        for s in pending(&mut o) {
            o.ack(s).unwrap();
        }
        assert!(
            seg_bytes(dir.path()) < 64,
            "{} bytes left",
            seg_bytes(dir.path())
        );
    }

    #[test]
    fn committed_records_survive_reopen_with_their_acks() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = open(dir.path());
        for i in 0..50 {
            assert_eq!(o.append(&agg(i)).unwrap(), i as u64 + 1);
        }
        assert!(pending(&mut o).is_empty(), "nothing visible before commit");
        o.commit().unwrap();
        assert_eq!(pending(&mut o).len(), 50);
        assert!(segments(dir.path()).len() > 1, "4 KiB segments roll");
        for seq in [1, 2, 3, 10, 11] {
            o.ack(seq).unwrap();
        }
        o.commit().unwrap();
        drop(o);
        let mut o = open(dir.path());
        let p = pending(&mut o);
        assert_eq!(p.len(), 45);
        assert_eq!(p[0], 4);
        assert!(!p.contains(&10) && !p.contains(&11));
        let recs = o.read_from(4, 1).unwrap();
        let back: Agg = serde_json::from_slice(recs[0].payload()).unwrap();
        assert_eq!(back, agg(3));
        assert_eq!(recs[0].id, agg(3).id);
        assert_eq!(o.append(&agg(99)).unwrap(), 51, "sequences continue");
        // Acknowledging everything deletes every sealed segment.
        o.commit().unwrap();
        for s in pending(&mut o) {
            o.ack(s).unwrap();
        }
        o.commit().unwrap();
        assert_eq!(o.oldest(), None);
        assert_eq!(segments(dir.path()).len(), 1);
    }

    #[test]
    fn torn_tail_is_cut_and_quarantined() {
        let dir = written(5);
        let last = segments(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len();
        let f = OpenOptions::new().write(true).open(&last).unwrap();
        f.set_len(len - 7).unwrap(); // half of the last record
        drop(f);
        let mut o = open(dir.path());
        assert_eq!(pending(&mut o), vec![1, 2, 3, 4]);
        assert_eq!(o.stats().quarantined, 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .unwrap()
                .count(),
            1
        );
        // Appends go on after the cut.
        assert_eq!(o.append(&agg(7)).unwrap(), 5);
        o.commit().unwrap();
        drop(o);
        assert_eq!(pending(&mut open(dir.path())), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn flipped_bytes_in_a_middle_record_are_quarantined_and_skipped() {
        let dir = written(5);
        let seg = segments(dir.path()).remove(0);
        let mut bytes = std::fs::read(&seg).unwrap();
        // Find the third record and flip bytes in its payload.
        let mut off = HEADER;
        for _ in 0..2 {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            off += HEADER + len;
        }
        bytes[off + 40] ^= 0xFF;
        bytes[off + 41] ^= 0x55;
        std::fs::write(&seg, &bytes).unwrap();
        let mut o = open(dir.path());
        assert_eq!(pending(&mut o), vec![1, 2, 4, 5]);
        let s = o.stats();
        assert_eq!((s.quarantined, s.lost), (1, 1));
        // Repaired in place: a second open reads cleanly.
        drop(o);
        let mut o = open(dir.path());
        assert_eq!(pending(&mut o), vec![1, 2, 4, 5]);
        assert_eq!(o.stats().quarantined, 0);
        for s in [1, 2, 4, 5] {
            o.ack(s).unwrap();
        }
        assert_eq!(
            o.oldest(),
            None,
            "the lost sequence does not hold the watermark"
        );
    }

    #[test]
    fn garbage_files_never_stop_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = open(dir.path());
        o.append(&agg(1)).unwrap();
        o.append(&agg(2)).unwrap();
        o.commit().unwrap();
        // Not drained (2 is pending): the segment keeps record 1.
        o.ack(1).unwrap();
        o.commit().unwrap();
        drop(o);
        std::fs::write(dir.path().join("acked"), b"nonsense").unwrap();
        std::fs::write(dir.path().join("00000000000000000009.seg"), b"xx").unwrap();
        let mut o = open(dir.path());
        assert_eq!(o.stats().quarantined, 2);
        assert_eq!(pending(&mut o), vec![1, 2], "acks unreadable: re-sent");
    }

    type FaultyOutbox = super::DiskOutbox<Agg, Faulty>;

    fn open_faulty(dir: &Path) -> FaultyOutbox {
        super::DiskOutbox::open(settings(dir, 4096, 1 << 20, FullPolicy::DropOldest)).unwrap()
    }

    fn os_error(e: &OutboxError) -> Option<i32> {
        match e {
            OutboxError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The committed records, as (seq, id), and the outbox's lost and
    /// quarantined counts.
    fn held<F: Fs>(o: &mut super::DiskOutbox<Agg, F>) -> (Vec<(u64, String)>, u64, u64) {
        let recs = o.read_from(0, usize::MAX).unwrap();
        for r in &recs {
            let a: Agg = serde_json::from_slice(r.payload()).unwrap();
            assert_eq!(a.id, r.id, "seq {} intact", r.seq);
        }
        let s = o.stats();
        (
            recs.into_iter().map(|r| (r.seq, r.id)).collect(),
            s.lost,
            s.quarantined,
        )
    }

    /// (seq, id) of `aggs` stored from seq 1 on.
    fn expect(aggs: impl IntoIterator<Item = i64>) -> Vec<(u64, String)> {
        aggs.into_iter()
            .enumerate()
            .map(|(n, i)| (n as u64 + 1, agg(i).id))
            .collect()
    }

    #[test]
    fn a_write_that_fails_part_way_is_cut_back_and_the_next_record_follows() {
        let a = agg(3);
        let len = encode(4, "x", &a.id, &serde_json::to_vec(&a).unwrap()).len();
        // Any part of the record may have reached the file: a few bytes of
        // its header, less than a padding record, more, all but one byte.
        for (part, errno) in [
            (1, ENOSPC),
            (5, EIO),
            (8, EFBIG),
            (13, ENOSPC),
            (19, EIO),
            (20, ENOSPC),
            (40, EFBIG),
            (len - 1, ENOSPC),
        ] {
            // The cut back fails too: it is done before the next write.
            for failing_cut in [0, 1] {
                let what = format!("{part} bytes written, {failing_cut} failing cuts");
                let dir = tempfile::tempdir().unwrap();
                let mut o = open_faulty(dir.path());
                for i in 0..3 {
                    o.append(&agg(i)).unwrap();
                }
                o.commit().unwrap();
                o.active.plan.short_write = Some((part, errno));
                o.active.plan.failing_set_len = failing_cut;
                let e = o.append(&agg(3)).unwrap_err();
                assert_eq!(os_error(&e), Some(errno), "{what}: {e}");
                assert_eq!(o.append(&agg(4)).unwrap(), 4, "{what}");
                assert_eq!(o.append(&agg(5)).unwrap(), 5, "{what}");
                o.commit().unwrap();
                let want = (expect([0, 1, 2, 4, 5]), 0, 0);
                assert_eq!(held(&mut o), want, "{what}");
                drop(o);
                assert_eq!(held(&mut open(dir.path())), want, "{what}: reopened");
            }
        }
    }

    #[test]
    fn a_stray_span_of_any_length_is_repaired_without_panicking() {
        // As a short write left them before writes were cut back: stray
        // bytes after the first record of a sealed segment and of the
        // active one, the next records after them.
        for stray in 1..=24 {
            let dir = written(30);
            let segs = segments(dir.path());
            assert!(segs.len() >= 2);
            for seg in [&segs[0], &segs[segs.len() - 1]] {
                let mut bytes = std::fs::read(seg).unwrap();
                let len = u32::from_le_bytes(bytes[HEADER..HEADER + 4].try_into().unwrap());
                let at = 2 * HEADER + len as usize;
                let rest = bytes.split_off(at);
                bytes.extend(std::iter::repeat_n(0xA5, stray));
                bytes.extend(rest);
                std::fs::write(seg, &bytes).unwrap();
            }
            let mut o = open(dir.path());
            assert_eq!(held(&mut o), (expect(0..30), 0, 2), "{stray} stray bytes");
            drop(o);
            let mut o = open(dir.path());
            assert_eq!(
                held(&mut o),
                (expect(0..30), 0, 0),
                "{stray} stray bytes: repaired for good"
            );
            // Appends go on.
            assert_eq!(o.append(&agg(30)).unwrap(), 31);
        }
    }

    #[test]
    fn a_failed_fsync_is_not_retried_alone_the_records_are_written_again() {
        for failing in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let mut o = open_faulty(dir.path());
            for i in 0..3 {
                o.append(&agg(i)).unwrap();
            }
            o.commit().unwrap();
            for i in 3..6 {
                o.append(&agg(i)).unwrap();
            }
            // Each failure loses what was written since the last good fsync.
            o.active.plan.failing_syncs = failing;
            let mut failed = 0;
            while let Err(e) = o.commit() {
                failed += 1;
                assert!(failed <= failing, "{failing}: {e}");
                assert_eq!(os_error(&e), Some(EIO));
                assert_eq!(o.committed_end(), 4, "nothing committed on a failed fsync");
                assert_eq!(held(&mut o), (expect(0..3), 0, 0));
            }
            assert_eq!(o.committed_end(), 7);
            assert_eq!(held(&mut o), (expect(0..6), 0, 0), "{failing} failures");
            drop(o);
            assert_eq!(
                held(&mut open(dir.path())),
                (expect(0..6), 0, 0),
                "{failing} failures: reopened"
            );
        }
    }

    #[test]
    fn full_outbox_follows_its_policy() {
        let dir = tempfile::tempdir().unwrap();
        let mut o =
            DiskOutbox::open(settings(dir.path(), 4096, 16384, FullPolicy::DropOldest)).unwrap();
        for i in 0..500 {
            o.append(&agg(i)).unwrap();
            assert!(o.stats().bytes <= 16384);
        }
        o.commit().unwrap();
        let s = o.stats();
        let held = pending(&mut o);
        assert_eq!(
            s.dropped + held.len() as u64,
            500,
            "every record held or counted"
        );
        assert_eq!(*held.last().unwrap(), 500, "the newest kept");

        let dir = tempfile::tempdir().unwrap();
        let mut o =
            DiskOutbox::open(settings(dir.path(), 4096, 16384, FullPolicy::RejectNew)).unwrap();
        let mut accepted = 0;
        for i in 0..500 {
            match o.append(&agg(i)) {
                Ok(_) => accepted += 1,
                Err(OutboxError::Full) => {}
                Err(e) => panic!("{e}"),
            }
        }
        o.commit().unwrap();
        let held = pending(&mut o);
        assert_eq!(held.len(), accepted);
        assert_eq!(o.stats().rejected, 500 - accepted as u64);
        assert_eq!(held[0], 1, "the oldest kept");
        // Acknowledging frees room again.
        for s in &held {
            o.ack(*s).unwrap();
        }
        assert!(o.append(&agg(1000)).is_ok());
    }

    #[test]
    fn coarsen_merges_the_oldest_windows_and_keeps_counts_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 4096, 32768, FullPolicy::Coarsen);
        s.protect_oldest = 2;
        let mut o = DiskOutbox::open(s).unwrap();
        let n = 400;
        // Every id that exists: appended, or made by a merge of known ids.
        let mut known = BTreeSet::new();
        let mut merges = 0;
        for i in 0..n {
            let mut a = agg(i);
            a.group = if i % 2 == 0 { "even" } else { "odd" }.into();
            a.readings = 3;
            a.inferences = 1;
            a.classes = Some([("A".to_string(), 1u64)].into());
            a.id = a.compute_id();
            known.insert(a.id.clone());
            o.append(&a).unwrap();
            assert!(o.stats().bytes <= 32768);
            for m in o.take_merged() {
                assert!(m.from.len() >= 2, "{m:?}");
                assert!(m.from.iter().all(|f| known.contains(f)), "{m:?}");
                known.insert(m.id);
                merges += 1;
            }
        }
        assert!(merges > 0);
        o.commit().unwrap();
        let st = o.stats();
        assert!(st.coarsened > 0, "{st:?}");
        assert_eq!(st.dropped, 0, "merging made enough room: {st:?}");
        let held: Vec<Agg> = o
            .read_from(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice(r.payload()).unwrap())
            .collect();
        assert!(held.len() < n as usize);
        assert_eq!(held.len() as u64 + st.coarsened, n as u64);
        let readings: u64 = held.iter().map(|a| a.readings).sum();
        let classes: u64 = held.iter().map(|a| a.classes.as_ref().unwrap()["A"]).sum();
        assert_eq!(readings, 3 * n as u64, "reading counts exact");
        assert_eq!(classes, n as u64, "class counts exact");
        // The protected oldest records are untouched; merged windows are wider.
        assert_eq!((held[0].window_start, held[0].window_end), (0, 1));
        assert!(held.iter().any(|a| a.window_end - a.window_start > 2));
        for a in &held {
            assert_eq!(a.id, a.compute_id(), "ids match the merged content");
            assert!(known.contains(&a.id), "every merge is reported");
        }
        assert_eq!(
            o.stats().lost,
            0,
            "records left out by a rewrite are not lost"
        );
        // It survives a reopen.
        drop(o);
        let mut o = open(dir.path());
        assert_eq!(o.read_from(0, usize::MAX).unwrap().len(), held.len());
        assert_eq!(o.stats().lost, 0);
    }

    /// Issue 18 (4): the uplink protected `protect_oldest` records counted
    /// as messages, while a batch carries up to 64 records and, live first,
    /// the records in flight are the newest. Merging one in flight and then
    /// acknowledging it deleted the readings merged into it. Whatever the
    /// uplink holds ([`Outbox::hold`]) is never merged nor dropped, under
    /// every policy and every cap, until it is acknowledged or released.
    #[test]
    fn records_in_flight_are_never_merged_nor_dropped() {
        for (policy, stream_cap) in [
            (FullPolicy::Coarsen, 0),
            (FullPolicy::DropOldest, 0),
            (FullPolicy::Coarsen, 32768),
            (FullPolicy::DropOldest, 32768),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let max_bytes = if stream_cap == 0 { 32768 } else { 65536 };
            let mut s = settings(dir.path(), 4096, max_bytes, policy);
            s.protect_oldest = 2;
            s.stream_caps.default = stream_cap;
            let mut o = DiskOutbox::open(s).unwrap();
            for i in 0..100 {
                o.append(&agg_in("x", i)).unwrap();
            }
            o.commit().unwrap();
            // A backlog batch of 64 records from the oldest on, and, live
            // first, the newest 10: all in flight.
            let all = o.read_from(0, usize::MAX).unwrap();
            assert!(all.len() > 74, "{}", all.len());
            let mut held = all[..64].to_vec();
            held.extend_from_slice(&all[all.len() - 10..]);
            let newest = held[64].seq;
            let seqs: Vec<u64> = held.iter().map(|r| r.seq).collect();
            o.hold(&seqs);
            let mut refused = 0u64;
            for i in 100..400 {
                match o.append(&agg_in("x", i)) {
                    Ok(_) => {}
                    Err(OutboxError::Full | OutboxError::StreamFull(_)) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            o.commit().unwrap();
            let st = o.stats();
            assert!(
                st.coarsened + st.dropped > 0,
                "{policy:?} {stream_cap}: the outbox was full: {st:?}"
            );
            for r in &held {
                let now = o.read_from(r.seq, 1).unwrap();
                assert_eq!(
                    now.first(),
                    Some(r),
                    "{policy:?} {stream_cap}: record {} in flight was changed or dropped",
                    r.seq
                );
            }
            if policy == FullPolicy::Coarsen && st.dropped == 0 {
                // Counts stay exact around the records in flight.
                let readings: u64 = o
                    .read_from(0, usize::MAX)
                    .unwrap()
                    .iter()
                    .map(|r| serde_json::from_slice::<Agg>(r.payload()).unwrap().readings)
                    .sum();
                assert_eq!(readings + 3 * refused, 3 * 400, "{st:?}");
            }
            // Acknowledged or released, they are fair game again.
            for r in &held[..64] {
                o.ack(r.seq).unwrap();
            }
            o.release_all();
            for i in 400..600 {
                let _ = o.append(&agg_in("x", i));
            }
            o.commit().unwrap();
            let now = o.read_from(newest, 10).unwrap();
            assert!(
                now.iter().zip(&held[64..]).any(|(a, b)| a != b) || now.len() < 10,
                "{policy:?} {stream_cap}: released records are merged or dropped again"
            );
        }
    }

    /// Record `i` of a stream, 3 readings of class A.
    fn agg_in(stream: &str, i: i64) -> Agg {
        let mut a = agg(i);
        a.group = stream.into();
        a.readings = 3;
        a.classes = Some([("A".to_string(), 1u64)].into());
        a.id = a.compute_id();
        a
    }

    fn held_by_stream(o: &mut DiskOutbox) -> BTreeMap<String, Vec<Agg>> {
        let mut m: BTreeMap<String, Vec<Agg>> = BTreeMap::new();
        for r in o.read_from(0, usize::MAX).unwrap() {
            let a: Agg = serde_json::from_slice(r.payload()).unwrap();
            m.entry(a.group.clone()).or_default().push(a);
        }
        m
    }

    #[test]
    fn a_stream_at_its_cap_follows_the_policy_and_leaves_the_others_alone() {
        // Coarsen merges within a segment: 1000 records of one stream in
        // 4 KiB segments fit 48 KiB merged, not 8 KiB (then it drops too).
        for (policy, cap) in [
            (FullPolicy::DropOldest, 8192),
            (FullPolicy::RejectNew, 8192),
            (FullPolicy::Coarsen, 49152),
            (FullPolicy::Coarsen, 8192),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = settings(dir.path(), 4096, 1 << 20, policy);
            s.stream_caps.per_stream.insert("chatty".into(), cap);
            s.protect_oldest = 2;
            let mut o = DiskOutbox::open(s).unwrap();
            let (mut quiet, mut chatty, mut accepted, mut refused) = (0, 0, 0u64, 0u64);
            for i in 0..1100 {
                if i % 11 == 0 {
                    o.append(&agg_in("quiet", i)).unwrap();
                    quiet += 1;
                } else {
                    chatty += 1;
                    match o.append(&agg_in("chatty", i)) {
                        Ok(_) => accepted += 1,
                        Err(OutboxError::StreamFull(g)) => {
                            assert_eq!(g, "chatty");
                            refused += 1;
                        }
                        Err(e) => panic!("{policy:?}: {e}"),
                    }
                }
                assert!(o.stream_size("chatty") <= cap, "{policy:?} at {i}");
                if i % 50 == 0 {
                    o.commit().unwrap();
                }
            }
            o.commit().unwrap();
            let st = o.stats();
            let held = held_by_stream(&mut o);
            assert_eq!(st.lost, 0, "{policy:?}: {st:?}");
            // The quiet stream is whole and untouched.
            let q = &held["quiet"];
            assert_eq!(q.len(), quiet, "{policy:?}");
            assert!(q.iter().all(|a| a.window_end - a.window_start == 1));
            let c = &held["chatty"];
            let last = c.last().unwrap().window_start;
            match policy {
                FullPolicy::DropOldest => {
                    assert_eq!(c.len() as u64 + st.dropped, chatty, "{st:?}");
                    assert!(st.dropped > 0);
                    assert_eq!(last, 1099, "the newest kept");
                }
                FullPolicy::RejectNew => {
                    assert_eq!(c.len() as u64, accepted);
                    assert_eq!(st.rejected, refused);
                    assert_eq!(accepted + refused, chatty);
                    assert_eq!(c[0].window_start, 1, "the oldest kept");
                }
                FullPolicy::Coarsen => {
                    assert!(st.coarsened > 0, "{st:?}");
                    // Every record is held, merged into another, or at the
                    // head of a dropped one.
                    assert_eq!(c.len() as u64 + st.coarsened + st.dropped, chatty);
                    let readings: u64 = c.iter().map(|a| a.readings).sum();
                    if cap == 49152 {
                        assert_eq!(st.dropped, 0, "merging made enough room: {st:?}");
                        assert_eq!(readings, 3 * chatty, "reading counts exact");
                    } else {
                        assert!(st.dropped > 0, "nothing left to merge: dropped {st:?}");
                        assert!(readings < 3 * chatty);
                    }
                    assert_eq!(last, 1099, "the newest kept");
                }
            }
            // Per-stream bytes survive a reopen, from the .sum files or,
            // when one is missing or corrupt, from a scan.
            let before = o.stream_bytes.clone();
            drop(o);
            assert_eq!(open(dir.path()).stream_bytes, before, "{policy:?}");
            let sums: Vec<PathBuf> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "sum"))
                .collect();
            assert!(sums.len() >= 2, "{policy:?}: {sums:?}");
            std::fs::remove_file(&sums[0]).unwrap();
            let mut b = std::fs::read(&sums[1]).unwrap();
            b[20] ^= 0xff;
            std::fs::write(&sums[1], b).unwrap();
            let mut o = open(dir.path());
            assert_eq!(o.stream_bytes, before, "{policy:?}: rebuilt by a scan");
            assert!(sums[0].exists(), "the missing summary is written again");
            assert_eq!(held_by_stream(&mut o), held, "{policy:?}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Ack(usize),
        Commit,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..20).prop_map(Op::Append),
            3 => (0usize..64).prop_map(Op::Ack),
            2 => Just(Op::Commit),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Against a model (a map of pending records): after any sequence of
        /// appends, acks, commits and crashes (reopen without commit), the
        /// log holds exactly the model's committed records, less those acked,
        /// except that acks not yet committed may be forgotten (re-sent).
        #[test]
        fn log_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let mut o = open(dir.path());
            let mut model: BTreeMap<u64, String> = BTreeMap::new();
            let mut unpersisted_acks: BTreeMap<u64, String> = BTreeMap::new();
            let mut committed = 0u64; // highest committed seq
            let mut n = 0i64;
            for op in ops {
                match op {
                    Op::Append(k) => {
                        for _ in 0..k {
                            let a = agg(n);
                            n += 1;
                            let seq = o.append(&a).unwrap();
                            model.insert(seq, a.id);
                        }
                    }
                    Op::Ack(i) => {
                        let visible: Vec<u64> = model.range(..=committed).map(|(s, _)| *s).collect();
                        if !visible.is_empty() {
                            let seq = visible[i % visible.len()];
                            o.ack(seq).unwrap();
                            let id = model.remove(&seq).unwrap();
                            unpersisted_acks.insert(seq, id);
                        }
                    }
                    Op::Commit => {
                        o.commit().unwrap();
                        committed = model.keys().next_back().copied().unwrap_or(committed).max(committed);
                        unpersisted_acks.clear();
                    }
                    Op::Reopen => {
                        drop(o);
                        o = open(dir.path());
                        // The process died: written records survive (page cache),
                        // and whatever is on disk is committed after recovery.
                        committed = model.keys().next_back().copied().unwrap_or(committed).max(committed);
                        let back: BTreeMap<u64, String> = o
                            .read_from(0, usize::MAX)
                            .unwrap()
                            .into_iter()
                            .map(|r| (r.seq, r.id))
                            .collect();
                        for (s, id) in &back {
                            let known = model.get(s).or(unpersisted_acks.get(s));
                            prop_assert_eq!(known, Some(id), "seq {} is not a record the model has", s);
                        }
                        for (s, id) in &model {
                            prop_assert_eq!(back.get(s), Some(id), "seq {} lost", s);
                        }
                        // Forgotten acks come back as pending records.
                        for s in back.keys() {
                            if let Some(id) = unpersisted_acks.remove(s) {
                                model.insert(*s, id);
                            }
                        }
                        unpersisted_acks.clear();
                    }
                }
                let visible: Vec<u64> = model.range(..=committed).map(|(s, _)| *s).collect();
                let got: Vec<u64> = o.read_from(0, usize::MAX).unwrap().iter().map(|r| r.seq).collect();
                prop_assert_eq!(got, visible);
                prop_assert_eq!(o.stats().quarantined, 0);
            }
        }
    }
}
