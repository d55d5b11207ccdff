//! The ingest journal: every reading a source accepted, on disk before the
//! source acknowledges it, until the aggregate that counts it is in the
//! outbox. Replayed at start, so that a crash or a power cut loses no
//! accepted reading and counts none twice.
//!
//! # What is written
//!
//! A journal is a directory of segment files `<first seq, 20 digits>.seg`
//! (mode 0600). A segment is a sequence of records:
//!
//! ```text
//! len   u32 LE   bytes after the CRC (kind + seq + body)
//! crc   u32 LE   CRC-32 of kind, seq and body
//! kind  u8       1 reading, 2 done, 3 confirmed
//! seq   u64 LE   the record's sequence number, one counter for all kinds
//! body  len - 9 bytes
//! ```
//!
//! - **reading**: the key of the message the reading came in (u64 LE, 0:
//!   none), then the reading as the gateway encodes it (opaque here).
//! - **done**: the readings it names are counted in one aggregate, or were
//!   suppressed by the privacy stage: `n u32 LE`, `n` sequence numbers
//!   (u64 LE), then the aggregate as it goes to the outbox (empty when
//!   suppressed). Written and synced *before* the outbox commit that holds
//!   the aggregate: after a crash between the two, the aggregate is taken
//!   from here and appended again (the same id: a consumer deduplicates it).
//! - **confirmed**: every done record up to the body's sequence number
//!   (u64 LE) is in a committed outbox; its aggregate need not be appended
//!   again. Not synced by itself: losing one only repeats an aggregate.
//! - **keys**: the keys of the last messages written (u64 LE each), written
//!   and synced before segments are deleted, so that a message its broker
//!   sends again after a crash (its acknowledgement lost) is recognised even
//!   once its readings are gone from the journal.
//!
//! # Truncation
//!
//! A reading is *outstanding* until a confirmed done record names it. The
//! oldest segments are deleted, oldest first and the directory synced, once
//! no reading in them is outstanding. A done record names only readings
//! written before it, so deleting a prefix of segments never leaves a
//! reading whose done record is gone.
//!
//! # Recovery
//!
//! [`Journal::open`] reads every segment. A record that is torn or fails its
//! CRC ends its segment (the rest is counted as corrupt; the last segment is
//! cut back there). The readings no done record names are returned for
//! replay, in sequence order; the aggregates of done records after the last
//! confirmed mark are returned to be appended to the outbox again. New
//! records go to a new segment.
//!
//! # Faults
//!
//! Records are kept in memory until a commit writes and syncs them. A write
//! that fails part-way is cut back to the last committed length; a failed
//! sync is never followed by a commit reported on a retried sync alone: the
//! segment is cut back to what was committed and the unsynced records are
//! written again to a fresh segment (a sequence number seen twice at
//! recovery is replayed once).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use crate::fs::{Fs, FsFile, OpenMode, RealFs};

const HEADER: usize = 8;
const KIND_READING: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_CONFIRMED: u8 = 3;
const KIND_KEYS: u8 = 4;
/// Message keys remembered across truncation.
const RECENT_KEYS: usize = 4096;
/// A record's body is at most this long (a reading is far smaller; an
/// aggregate with its cover list can be large).
const MAX_RECORD: usize = 64 << 20;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `max_bytes` is reached: the reading is refused.
    #[error("journal full ({max_bytes} bytes)")]
    Full {
        /// The bound.
        max_bytes: u64,
    },
    /// A record is larger than the format allows.
    #[error("journal record of {0} bytes is too large")]
    TooLarge(usize),
}

/// Where the journal lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct JournalSettings {
    /// Directory of segments (created 0700).
    pub dir: PathBuf,
    /// A segment is closed and a new one begun past this size.
    pub segment_bytes: u64,
    /// Bound on all segments together; readings beyond it are refused.
    pub max_bytes: u64,
}

/// What [`Journal::open`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Readings no done record names, in sequence order: replay them.
    pub readings: Vec<(u64, Vec<u8>)>,
    /// Keys of the messages the journal saw (every reading's, counted or
    /// not, and the last ones before a truncation).
    pub keys: Vec<u64>,
    /// Aggregates of done records not confirmed: append them to the outbox again.
    pub reappend: Vec<Vec<u8>>,
    /// Records that were torn or failed their CRC (and what followed them in
    /// their segment).
    pub corrupt: u64,
    /// Segments found.
    pub segments: usize,
}

/// Counters, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JournalStats {
    /// Bytes on disk and pending.
    pub bytes: u64,
    /// Readings written and not yet counted in a committed aggregate.
    pub outstanding: u64,
    /// Segments deleted since open.
    pub truncated_segments: u64,
    /// Commits that failed (the records stay pending and are written again).
    pub commit_failures: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Committed bytes.
    bytes: u64,
    outstanding: u64,
}

/// The journal, on the real file system or (tests) a simulated disk. Not
/// shared by itself: the gateway wraps it in a mutex.
#[derive(Debug)]
pub struct Journal<F: Fs = RealFs> {
    fs: F,
    settings: JournalSettings,
    segments: BTreeMap<u64, Segment>,
    /// First sequence number of the segment being written.
    active: u64,
    file: Option<F::File>,
    next_seq: u64,
    /// Records appended and not yet committed (encoded), and their first seq.
    pending: Vec<u8>,
    pending_first: Option<u64>,
    /// Readings in `pending`, for the active segment's count.
    pending_readings: u64,
    /// Done records committed or pending, not yet confirmed: (seq, covers).
    unconfirmed: VecDeque<(u64, Vec<u64>)>,
    /// Keys of the last messages written.
    keys: VecDeque<u64>,
    stats: JournalStats,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn encode(kind: u8, seq: u64, body: &[&[u8]], out: &mut Vec<u8>) -> Result<(), JournalError> {
    let body_len: usize = body.iter().map(|b| b.len()).sum();
    if body_len > MAX_RECORD {
        return Err(JournalError::TooLarge(body_len));
    }
    let len = (9 + body_len) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    for b in body {
        out.extend_from_slice(b);
    }
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One record read back: kind, seq, body.
type Parsed<'a> = (u8, u64, &'a [u8]);

/// The records of a segment's bytes, and the length of the valid prefix.
fn parse(bytes: &[u8]) -> (Vec<Parsed<'_>>, usize) {
    let mut out = Vec::new();
    let mut off = 0;
    while bytes.len() - off >= HEADER {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
        if !(9..=MAX_RECORD + 9).contains(&len) || bytes.len() - off - HEADER < len {
            break;
        }
        let rec = &bytes[off + HEADER..off + HEADER + len];
        if crc32fast::hash(rec) != crc {
            break;
        }
        let seq = u64::from_le_bytes(rec[1..9].try_into().expect("8 bytes"));
        out.push((rec[0], seq, &rec[9..]));
        off += HEADER + len;
    }
    (out, off)
}

/// A done record's body: its covers and its aggregate (`None` when empty).
fn parse_done(body: &[u8]) -> Option<(Vec<u64>, &[u8])> {
    let n = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(n.checked_mul(8)?)?;
    let list = body.get(4..end)?;
    let covers = list
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Some((covers, &body[end..]))
}

impl Journal<RealFs> {
    /// Open (or create) the journal and recover what it holds.
    pub fn open(settings: JournalSettings) -> Result<(Self, Recovered), JournalError> {
        Self::open_in(RealFs, settings)
    }
}

impl<F: Fs> Journal<F> {
    /// [`Journal::open`] on the file system `fs`.
    pub fn open_in(fs: F, settings: JournalSettings) -> Result<(Self, Recovered), JournalError> {
        let dir = settings.dir.clone();
        crate::fsutil::create_dir_all_in(&fs, &dir).map_err(io(&dir))?;
        fs.set_mode(&dir, 0o700).map_err(io(&dir))?;
        let mut firsts = Vec::new();
        for (name, _) in fs.list(&dir).map_err(io(&dir))? {
            if let Some(n) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        let mut rec = Recovered {
            segments: firsts.len(),
            ..Recovered::default()
        };
        let mut readings: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
        let mut dones: Vec<(u64, Vec<u64>, Vec<u8>)> = Vec::new();
        let mut confirmed = 0u64;
        let mut max_seq = 0u64;
        let mut segments = BTreeMap::new();
        let last = firsts.last().copied();
        for first in firsts {
            let path = dir.join(segment_name(first));
            let bytes = fs.read(&path).map_err(io(&path))?;
            let (records, valid) = parse(&bytes);
            if valid < bytes.len() {
                rec.corrupt += 1;
                tracing::warn!(segment = %path.display(), valid, len = bytes.len(), "journal: torn or corrupt records skipped");
                if Some(first) == last {
                    // The tail of the last segment: a write the power cut tore.
                    let mut f = fs.open(&path, OpenMode::ReadWrite).map_err(io(&path))?;
                    f.set_len(valid as u64).map_err(io(&path))?;
                    f.sync_data().map_err(io(&path))?;
                }
            }
            for (kind, seq, body) in records {
                max_seq = max_seq.max(seq);
                match kind {
                    KIND_READING if body.len() >= 8 => {
                        let key = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                        if key != 0 {
                            rec.keys.push(key);
                        }
                        readings
                            .entry(seq)
                            .or_insert_with(|| (first, body[8..].to_vec()));
                    }
                    KIND_KEYS => rec.keys.extend(
                        body.chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    ),
                    KIND_DONE => match parse_done(body) {
                        Some((covers, agg)) => dones.push((seq, covers, agg.to_vec())),
                        None => rec.corrupt += 1,
                    },
                    KIND_CONFIRMED if body.len() == 8 => {
                        confirmed =
                            confirmed.max(u64::from_le_bytes(body.try_into().expect("8 bytes")));
                    }
                    _ => rec.corrupt += 1,
                }
            }
            segments.insert(
                first,
                Segment {
                    path,
                    bytes: valid as u64,
                    outstanding: 0,
                },
            );
        }
        let mut done_seqs = HashSet::new();
        let mut seen_dones = BTreeSet::new();
        for (seq, covers, agg) in dones {
            if !seen_dones.insert(seq) {
                continue;
            }
            done_seqs.extend(covers);
            if seq > confirmed && !agg.is_empty() {
                rec.reappend.push(agg);
            }
        }
        for (seq, (first, body)) in readings {
            if done_seqs.contains(&seq) {
                continue;
            }
            if let Some(s) = segments.get_mut(&first) {
                s.outstanding += 1;
            }
            rec.readings.push((seq, body));
        }
        let mut j = Journal {
            fs,
            settings,
            segments,
            active: 0,
            file: None,
            next_seq: max_seq + 1,
            pending: Vec::new(),
            pending_first: None,
            pending_readings: 0,
            unconfirmed: VecDeque::new(),
            keys: VecDeque::new(),
            stats: JournalStats::default(),
        };
        let from = rec.keys.len().saturating_sub(RECENT_KEYS);
        j.keys.extend(&rec.keys[from..]);
        j.stats.outstanding = rec.readings.len() as u64;
        j.stats.bytes = j.segments.values().map(|s| s.bytes).sum();
        // Segments whose readings are all counted go now.
        j.truncate()?;
        Ok((j, rec))
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        JournalStats {
            bytes: self.stats.bytes + self.pending.len() as u64,
            ..self.stats
        }
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn push(&mut self, kind: u8, body: &[&[u8]]) -> Result<u64, JournalError> {
        let seq = self.next_seq;
        encode(kind, seq, body, &mut self.pending)?;
        self.pending_first.get_or_insert(seq);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Append a reading that came in message `key` (0: none); not durable
    /// until [`Journal::commit`]. Its sequence number.
    pub fn append_reading(&mut self, key: u64, body: &[u8]) -> Result<u64, JournalError> {
        let size = (HEADER + 17 + body.len()) as u64;
        if self.stats.bytes + self.pending.len() as u64 + size > self.settings.max_bytes {
            return Err(JournalError::Full {
                max_bytes: self.settings.max_bytes,
            });
        }
        let seq = self.push(KIND_READING, &[&key.to_le_bytes(), body])?;
        if key != 0 && self.keys.back() != Some(&key) {
            self.keys.push_back(key);
            if self.keys.len() > RECENT_KEYS {
                self.keys.pop_front();
            }
        }
        self.pending_readings += 1;
        self.stats.outstanding += 1;
        Ok(seq)
    }

    /// Record that the readings `covers` are counted in `aggregate` (as it
    /// goes to the outbox), or suppressed (`None`). Durable at the next
    /// commit; the readings stay outstanding until [`Journal::confirm`].
    /// Nothing is written for an empty `covers`.
    pub fn append_done(
        &mut self,
        covers: &[u64],
        aggregate: Option<&[u8]>,
    ) -> Result<(), JournalError> {
        if covers.is_empty() {
            return Ok(());
        }
        let mut list = Vec::with_capacity(4 + covers.len() * 8);
        list.extend_from_slice(&(covers.len() as u32).to_le_bytes());
        for s in covers {
            list.extend_from_slice(&s.to_le_bytes());
        }
        let seq = self.push(KIND_DONE, &[&list, aggregate.unwrap_or_default()])?;
        self.unconfirmed.push_back((seq, covers.to_vec()));
        Ok(())
    }

    fn open_segment(&mut self, first: u64) -> Result<(), JournalError> {
        let path = self.settings.dir.join(segment_name(first));
        let f = self.fs.open(&path, OpenMode::Truncate).map_err(io(&path))?;
        self.fs.set_mode(&path, 0o600).map_err(io(&path))?;
        self.fs
            .sync_dir(&self.settings.dir)
            .map_err(io(&self.settings.dir))?;
        self.segments.insert(
            first,
            Segment {
                path,
                bytes: 0,
                outstanding: 0,
            },
        );
        self.active = first;
        self.file = Some(f);
        Ok(())
    }

    /// Write and sync what was appended; returns the mark to pass to
    /// [`Journal::confirm`] once the outbox has committed the aggregates
    /// appended so far. On an error nothing appended is lost: it is written
    /// again by the next commit (to a fresh segment after a failed sync).
    pub fn commit(&mut self) -> Result<u64, JournalError> {
        let mark = self.next_seq.saturating_sub(1);
        let Some(first) = self.pending_first else {
            return Ok(mark);
        };
        let roll = match self.segments.get(&self.active) {
            Some(s) => self.file.is_none() || s.bytes >= self.settings.segment_bytes,
            None => true,
        };
        if roll {
            self.open_segment(first)?;
        }
        let seg = self
            .segments
            .get_mut(&self.active)
            .expect("the active segment is tracked");
        let f = self
            .file
            .as_mut()
            .expect("a segment is open after the roll above");
        let written = f.write_all(&self.pending).and_then(|()| f.sync_data());
        if let Err(e) = written {
            self.stats.commit_failures += 1;
            // Cut back to what was committed; the next commit begins a
            // fresh segment: a sync that failed proves nothing about the
            // pages it covered, and a later one that succeeds would not either.
            let _ = f.set_len(seg.bytes);
            self.file = None;
            return Err(JournalError::Io {
                path: seg.path.clone(),
                source: e,
            });
        }
        seg.bytes += self.pending.len() as u64;
        seg.outstanding += self.pending_readings;
        self.stats.bytes += self.pending.len() as u64;
        self.pending.clear();
        self.pending_first = None;
        self.pending_readings = 0;
        Ok(mark)
    }

    /// The aggregates of every done record up to `mark` are committed in the
    /// outbox: their readings are no longer outstanding, and segments that
    /// hold nothing outstanding are deleted.
    pub fn confirm(&mut self, mark: u64) -> Result<(), JournalError> {
        let mut any = false;
        while let Some((seq, _)) = self.unconfirmed.front() {
            if *seq > mark {
                break;
            }
            let (_, covers) = self.unconfirmed.pop_front().expect("front exists");
            for s in covers {
                if let Some((_, seg)) = self.segments.range_mut(..=s).next_back() {
                    seg.outstanding = seg.outstanding.saturating_sub(1);
                }
                self.stats.outstanding = self.stats.outstanding.saturating_sub(1);
            }
            any = true;
        }
        if any {
            self.push(KIND_CONFIRMED, &[&mark.to_le_bytes()])?;
            self.truncate()?;
        }
        Ok(())
    }

    /// Aggregates returned by [`Journal::open`] for appending again are in
    /// the outbox: record it, so the next start does not append them again.
    pub fn confirm_recovered(&mut self) -> Result<(), JournalError> {
        let mark = self.next_seq.saturating_sub(1);
        self.push(KIND_CONFIRMED, &[&mark.to_le_bytes()])?;
        Ok(())
    }

    /// Delete the oldest segments that hold nothing outstanding (never the
    /// one being written).
    fn truncate(&mut self) -> Result<(), JournalError> {
        let deletable = self
            .segments
            .first_key_value()
            .is_some_and(|(&first, seg)| {
                !(self.file.is_some() && first == self.active) && seg.outstanding == 0
            });
        if !deletable {
            return Ok(());
        }
        // The keys of the last messages outlive the segments that held them.
        let keys: Vec<u8> = self.keys.iter().flat_map(|k| k.to_le_bytes()).collect();
        self.push(KIND_KEYS, &[&keys])?;
        self.commit()?;
        let mut deleted = false;
        while let Some((&first, seg)) = self.segments.first_key_value() {
            let active = self.file.is_some() && first == self.active;
            if active || seg.outstanding > 0 {
                break;
            }
            self.fs
                .remove_file(&seg.path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
                .map_err(io(&seg.path))?;
            self.stats.bytes = self.stats.bytes.saturating_sub(seg.bytes);
            self.stats.truncated_segments += 1;
            self.segments.remove(&first);
            deleted = true;
        }
        if deleted {
            self.fs
                .sync_dir(&self.settings.dir)
                .map_err(io(&self.settings.dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> JournalSettings {
        JournalSettings {
            dir: dir.join("journal"),
            segment_bytes: 256,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn readings_not_counted_are_replayed_and_counted_ones_are_not() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, rec) = Journal::open(settings(d.path())).unwrap();
        assert!(rec.readings.is_empty());
        let seqs: Vec<u64> = (0..10)
            .map(|i| j.append_reading(i + 1, format!("r{i}").as_bytes()).unwrap())
            .collect();
        j.commit().unwrap();
        // Readings 0..4 are in an aggregate the outbox committed; 4..6 in
        // one whose outbox commit did not happen (crash).
        j.append_done(&seqs[0..4], Some(b"agg-a")).unwrap();
        let mark = j.commit().unwrap();
        j.confirm(mark).unwrap();
        j.append_done(&seqs[4..6], Some(b"agg-b")).unwrap();
        j.commit().unwrap();
        drop(j);
        let (j, rec) = Journal::open(settings(d.path())).unwrap();
        let replayed: Vec<&[u8]> = rec.readings.iter().map(|(_, b)| b.as_slice()).collect();
        assert_eq!(replayed, vec![&b"r6"[..], b"r7", b"r8", b"r9"]);
        assert_eq!(rec.reappend, vec![b"agg-b".to_vec()]);
        assert_eq!(j.stats().outstanding, 4);
    }

    #[test]
    fn segments_go_once_everything_in_them_is_counted() {
        let d = tempfile::tempdir().unwrap();
        let s = settings(d.path());
        let (mut j, _) = Journal::open(s.clone()).unwrap();
        let mut seqs = Vec::new();
        for i in 0..100 {
            seqs.push(
                j.append_reading(0, format!("reading {i:03}").as_bytes())
                    .unwrap(),
            );
            if i % 10 == 9 {
                j.commit().unwrap();
            }
        }
        let segs = || std::fs::read_dir(&s.dir).unwrap().count();
        assert!(segs() > 3, "{}", segs());
        j.append_done(&seqs, None).unwrap();
        let mark = j.commit().unwrap();
        j.confirm(mark).unwrap();
        assert_eq!(j.stats().outstanding, 0);
        assert_eq!(segs(), 1, "only the segment being written stays");
        drop(j);
        let (_, rec) = Journal::open(s).unwrap();
        assert!(rec.readings.is_empty());
        assert!(rec.reappend.is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_and_what_was_committed_stays() {
        let d = tempfile::tempdir().unwrap();
        let s = settings(d.path());
        let (mut j, _) = Journal::open(s.clone()).unwrap();
        j.append_reading(0, b"kept").unwrap();
        j.commit().unwrap();
        drop(j);
        let seg = std::fs::read_dir(&s.dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let (_, rec) = Journal::open(s.clone()).unwrap();
        assert_eq!(rec.corrupt, 1);
        assert_eq!(rec.readings.len(), 1);
        let (_, rec) = Journal::open(s).unwrap();
        assert_eq!(rec.corrupt, 0, "cut back at the first open");
        assert_eq!(rec.readings[0].1, b"kept");
    }

    #[test]
    fn a_full_journal_refuses_readings() {
        let d = tempfile::tempdir().unwrap();
        let mut s = settings(d.path());
        s.max_bytes = 100;
        let (mut j, _) = Journal::open(s).unwrap();
        j.append_reading(0, &[0; 40]).unwrap();
        assert!(matches!(
            j.append_reading(0, &[0; 40]),
            Err(JournalError::Full { .. })
        ));
    }

    /// Randomized runs of the journal as the gateway uses it, with crashes
    /// (the process gone, the files as they are) at random points: after
    /// each reopen, every accepted reading is either replayed or counted in
    /// exactly one aggregate that is durable (confirmed, or returned to be
    /// appended again), never both, never neither.
    #[test]
    fn randomized_crashes_count_every_reading_once() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for run in 0..200 {
            let d = tempfile::tempdir().unwrap();
            let mut s = settings(d.path());
            s.segment_bytes = 64 + next() % 512;
            // seq -> times counted by a durable aggregate.
            let mut counted: BTreeMap<u64, u32> = BTreeMap::new();
            let mut accepted: BTreeSet<u64> = BTreeSet::new();
            let (mut j, _) = Journal::open(s.clone()).unwrap();
            // Readings the pipeline holds (accepted, not in an aggregate yet).
            let mut held: Vec<u64> = Vec::new();
            // Done records appended, by journal seq: (covers, durable).
            let mut dones: Vec<(Vec<u64>, bool)> = Vec::new();
            let mut unsynced_dones: Vec<usize> = Vec::new();
            for _step in 0..60 {
                match next() % 6 {
                    0 | 1 => {
                        let n = 1 + next() % 5;
                        let mut new = Vec::new();
                        for _ in 0..n {
                            new.push(j.append_reading(next() | 1, b"reading").unwrap());
                        }
                        j.commit().unwrap();
                        for n in new {
                            accepted.insert(n);
                            held.push(n);
                        }
                        // The commit synced the done records appended too.
                        for i in unsynced_dones.drain(..) {
                            dones[i].1 = true;
                            for c in &dones[i].0 {
                                *counted.entry(*c).or_default() += 1;
                            }
                        }
                    }
                    2 | 3 if !held.is_empty() => {
                        let take = 1 + (next() as usize) % held.len();
                        let covers: Vec<u64> = held.drain(..take).collect();
                        let agg = format!("agg-{}", dones.len());
                        j.append_done(&covers, Some(agg.as_bytes())).unwrap();
                        dones.push((covers, false));
                        unsynced_dones.push(dones.len() - 1);
                    }
                    4 => {
                        // The outbox writer's commit: journal, outbox, confirm.
                        let mark = j.commit().unwrap();
                        for i in unsynced_dones.drain(..) {
                            dones[i].1 = true;
                            for c in &dones[i].0 {
                                *counted.entry(*c).or_default() += 1;
                            }
                        }
                        if next() % 2 == 0 {
                            j.confirm(mark).unwrap();
                        }
                    }
                    _ => {
                        // Crash: whatever was not committed is gone.
                        for i in unsynced_dones.drain(..) {
                            dones[i].1 = false;
                        }
                        drop(j);
                        let (j2, rec) = Journal::open(s.clone()).unwrap();
                        j = j2;
                        let replayed: BTreeSet<u64> = rec.readings.iter().map(|r| r.0).collect();
                        for a in &accepted {
                            let c = counted.get(a).copied().unwrap_or(0);
                            let r = replayed.contains(a) as u32;
                            assert_eq!(
                                c + r,
                                1,
                                "run {run}: reading {a} counted {c}, replayed {r}"
                            );
                        }
                        held = replayed.into_iter().collect();
                    }
                }
            }
        }
    }

    /// The journal on the simulated disk: power cuts at random operations
    /// (unsynced writes lost or torn, unsynced names kept or undone) and
    /// failed syncs, thousands of operations over many seeds. After each
    /// cut, every reading whose commit succeeded is either replayed or
    /// counted by exactly one aggregate that survives (confirmed in the
    /// outbox, or returned to be appended again), never both, never neither;
    /// a reading whose commit did not succeed is at most one of the two.
    #[test]
    fn power_cuts_and_failed_syncs_lose_and_double_no_reading() {
        use crate::simdisk::SimDisk;
        let mut cuts = 0;
        for seed in 0..300u64 {
            let disk = SimDisk::new(seed);
            let s = JournalSettings {
                dir: PathBuf::from("/state/journal"),
                segment_bytes: 64 + seed % 400,
                max_bytes: 1 << 20,
            };
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut accepted: BTreeSet<u64> = BTreeSet::new();
            let mut pending: Vec<u64> = Vec::new();
            let mut held: Vec<u64> = Vec::new();
            let mut covers: Vec<Vec<u64>> = Vec::new();
            let mut waiting: Vec<usize> = Vec::new();
            let mut in_outbox: BTreeSet<usize> = BTreeSet::new();
            let (mut j, _) = Journal::open_in(disk.clone(), s.clone()).unwrap();
            for _ in 0..80 {
                match next() % 12 {
                    0 => disk.cut_power_after(next() % 8),
                    1 => disk.fail_syncs(1),
                    _ => {}
                }
                match next() % 5 {
                    0 | 1 => {
                        for _ in 0..1 + next() % 4 {
                            if let Ok(n) = j.append_reading(next() | 1, b"reading") {
                                pending.push(n);
                            }
                        }
                        if j.commit().is_ok() {
                            accepted.extend(pending.iter().copied());
                            held.append(&mut pending);
                        }
                    }
                    2 if !held.is_empty() => {
                        let take = 1 + (next() as usize) % held.len();
                        let c: Vec<u64> = held.drain(..take).collect();
                        let agg = format!("agg-{}", covers.len());
                        if j.append_done(&c, Some(agg.as_bytes())).is_ok() {
                            covers.push(c);
                            waiting.push(covers.len() - 1);
                        } else {
                            held.extend(c);
                        }
                    }
                    3 => {
                        // The outbox writer: journal commit, outbox commit, confirm.
                        if let Ok(mark) = j.commit() {
                            accepted.extend(pending.iter().copied());
                            held.append(&mut pending);
                            in_outbox.extend(waiting.drain(..));
                            let _ = j.confirm(mark);
                        }
                    }
                    _ => {}
                }
                if !disk.is_off() && next() % 25 != 0 {
                    continue;
                }
                // The power goes; the next boot recovers.
                cuts += 1;
                disk.power_loss();
                drop(j);
                let (j2, rec) = Journal::open_in(disk.clone(), s.clone())
                    .unwrap_or_else(|e| panic!("seed {seed}: reopen: {e}"));
                j = j2;
                let replayed: BTreeSet<u64> = rec.readings.iter().map(|r| r.0).collect();
                let again: BTreeSet<usize> = rec
                    .reappend
                    .iter()
                    .map(|a| {
                        let a = std::str::from_utf8(a).unwrap();
                        a.strip_prefix("agg-").unwrap().parse().unwrap()
                    })
                    .collect();
                let counted = |r: u64| {
                    in_outbox
                        .union(&again)
                        .filter(|i| covers[**i].contains(&r))
                        .count()
                };
                for &r in &accepted {
                    let n = counted(r) + replayed.contains(&r) as usize;
                    assert_eq!(n, 1, "seed {seed}: accepted reading {r} counted {n} times");
                }
                for &r in &pending {
                    let n = counted(r) + replayed.contains(&r) as usize;
                    assert!(n <= 1, "seed {seed}: reading {r} counted {n} times");
                }
                for r in &replayed {
                    assert!(
                        accepted.contains(r) || pending.contains(r),
                        "seed {seed}: {r}"
                    );
                }
                in_outbox.extend(again);
                let _ = j.confirm_recovered();
                accepted.extend(replayed.iter().copied());
                pending.clear();
                waiting.clear();
                held = replayed.into_iter().collect();
            }
        }
        assert!(cuts > 300, "{cuts} power cuts");
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = settings(d.path());
        let (mut j, _) = Journal::open(s.clone()).unwrap();
        j.append_reading(0, b"x").unwrap();
        j.commit().unwrap();
        let dir_mode = std::fs::metadata(&s.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        for e in std::fs::read_dir(&s.dir).unwrap() {
            let m = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600);
        }
    }
}
