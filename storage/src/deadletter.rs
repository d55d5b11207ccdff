//! The dead-letter store: records the receiver keeps refusing (a payload
//! over the broker's limit, a topic it rejects), set aside so that what
//! comes behind them is delivered, kept until an operator sends them again.
//!
//! # On-disk format (version 1)
//!
//! A directory (mode 0700) of entries, one file each (mode 0600), each
//! written beside (`*.tmp`), synced, renamed over and the directory synced,
//! so a crash leaves a whole entry or none:
//!
//! - `NNNNNNNNNNNNNNNNNNNN.dl`: entry number N (20 digits, zero-padded),
//!   increasing; renamed to `NNNNNNNNNNNNNNNNNNNN.resend` when an operator
//!   asks for it to be sent again (`outpost deadletter resend`), which the
//!   running gateway (or the next one to start) picks up.
//! - The file holds one line of JSON, the [`DeadLetter`] header (its
//!   `resend` field is not stored: it is the file name's), a `\n`, then
//!   the record's payload as it was stored in the outbox. The header's
//!   `bytes` and `crc32` (CRC-32 IEEE) describe the payload; an entry that
//!   does not match them is renamed `*.bad` and never read again.
//!
//! The store is bounded in bytes (`max_bytes`, entry files together): an
//! entry that does not fit makes room by removing the oldest ones, which
//! [`DeadLetterStore::put`] returns so that the caller counts and audits
//! them; an entry larger than the whole bound is refused.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of the dead-letter store.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Reading or writing a file of the store failed.
    #[error("dead-letter store: {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// An entry does not parse or does not match its checksum.
    #[error("dead-letter entry {}: {detail}", .path.display())]
    Corrupt {
        /// The entry's file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No entry with this number.
    #[error("no dead-letter entry {0}")]
    NotFound(u64),
    /// The entry alone is larger than the store's bound.
    #[error("dead-letter entry of {bytes} bytes exceeds the store's bound of {max} bytes")]
    TooLarge {
        /// The entry's size.
        bytes: u64,
        /// The bound.
        max: u64,
    },
}

fn io(path: &Path, source: std::io::Error) -> DeadLetterError {
    DeadLetterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One entry's description (the header of its file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Entry number in the store (what `outpost deadletter resend` takes).
    pub id: u64,
    /// The record's outbox sequence when it was set aside.
    pub seq: u64,
    /// The record's stream (aggregate group).
    pub stream: String,
    /// The record's own id (the aggregate id consumers deduplicate by).
    pub record_id: String,
    /// Failed deliveries of the record alone before it was set aside.
    pub attempts: u32,
    /// Why it was set aside.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub set_aside_ms: i64,
    /// Payload bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the payload.
    pub crc32: u32,
    /// An operator asked for it to be sent again (the file's name says so;
    /// not stored in the header).
    #[serde(default)]
    pub resend: bool,
}

/// What the caller knows of a record it sets aside.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// The record's outbox sequence.
    pub seq: u64,
    /// Its stream.
    pub stream: &'a str,
    /// Its id.
    pub record_id: &'a str,
    /// Failed deliveries alone.
    pub attempts: u32,
    /// Why.
    pub reason: &'a str,
    /// Now, ms since the Unix epoch.
    pub now_ms: i64,
}

/// The entries asked to be sent again with their payloads, and the errors
/// of those that could not be read ([`DeadLetterStore::resend_requests`]).
pub type ResendRequests = (Vec<(DeadLetter, Vec<u8>)>, Vec<DeadLetterError>);

const HELD: &str = "dl";
const RESEND: &str = "resend";

fn entry_name(id: u64, ext: &str) -> String {
    format!("{id:020}.{ext}")
}

/// The entry number and state of a file name (`None`: not an entry).
fn parse_name(name: &str) -> Option<(u64, bool)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 {
        return None;
    }
    let id = stem.parse().ok()?;
    match ext {
        HELD => Some((id, false)),
        RESEND => Some((id, true)),
        _ => None,
    }
}

/// The store in one directory, used by one gateway; the `outpost
/// deadletter` commands read it and rename entries with the functions
/// that take a directory ([`list`], [`request_resend`]).
#[derive(Debug)]
pub struct DeadLetterStore {
    dir: PathBuf,
    max_bytes: u64,
    next_id: u64,
    /// File bytes by entry number.
    entries: BTreeMap<u64, u64>,
}

/// Create `dir` (0700) if it is missing.
fn ensure_dir(dir: &Path) -> Result<(), DeadLetterError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))
}

/// Write `path` whole or not at all, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DeadLetterError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::fsutil::sync_dir(dir).map_err(|e| io(dir, e))
}

/// Decode an entry file.
fn decode(
    path: &Path,
    bytes: &[u8],
    resend: bool,
) -> Result<(DeadLetter, Vec<u8>), DeadLetterError> {
    let corrupt = |detail: String| DeadLetterError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let mut letter: DeadLetter =
        serde_json::from_slice(&bytes[..nl]).map_err(|e| corrupt(format!("header: {e}")))?;
    let payload = bytes[nl + 1..].to_vec();
    if payload.len() as u64 != letter.bytes || crc32fast::hash(&payload) != letter.crc32 {
        return Err(corrupt(
            "payload does not match its size and checksum".into(),
        ));
    }
    letter.resend = resend;
    Ok((letter, payload))
}

/// The entries of the store in `dir`, oldest first, without their
/// payloads (an empty list when the directory does not exist). Entries
/// that do not parse are skipped with a warning.
pub fn list(dir: &Path) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let mut out = Vec::new();
    for (id, resend) in scan(dir)? {
        let path = dir.join(entry_name(id, if resend { RESEND } else { HELD }));
        match read_entry(&path, resend) {
            Ok((letter, _)) => out.push(letter),
            Err(e) => tracing::warn!(error = %e, "dead-letter entry skipped"),
        }
    }
    Ok(out)
}

/// Entry `id` of the store in `dir` with its payload.
pub fn read(dir: &Path, id: u64) -> Result<(DeadLetter, Vec<u8>), DeadLetterError> {
    for resend in [false, true] {
        let path = dir.join(entry_name(id, if resend { RESEND } else { HELD }));
        if path.exists() {
            return read_entry(&path, resend);
        }
    }
    Err(DeadLetterError::NotFound(id))
}

fn read_entry(path: &Path, resend: bool) -> Result<(DeadLetter, Vec<u8>), DeadLetterError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    decode(path, &bytes, resend)
}

/// Ask for entry `id` of the store in `dir` to be sent again: the running
/// gateway (or the next one to start) puts it back in its outbox. Returns
/// `false` when it was asked for already.
pub fn request_resend(dir: &Path, id: u64) -> Result<bool, DeadLetterError> {
    let held = dir.join(entry_name(id, HELD));
    let resend = dir.join(entry_name(id, RESEND));
    match std::fs::rename(&held, &resend) {
        Ok(()) => {
            crate::fsutil::sync_dir(dir).map_err(|e| io(dir, e))?;
            Ok(true)
        }
        Err(_) if resend.exists() => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DeadLetterError::NotFound(id)),
        Err(e) => Err(io(&held, e)),
    }
}

/// Ask for every entry of the store in `dir` to be sent again; returns the
/// entries newly asked for.
pub fn request_resend_all(dir: &Path) -> Result<Vec<u64>, DeadLetterError> {
    let mut out = Vec::new();
    for (id, resend) in scan(dir)? {
        if !resend && request_resend(dir, id)? {
            out.push(id);
        }
    }
    Ok(out)
}

/// The entries of `dir` (number, resend asked), in number order.
fn scan(dir: &Path) -> Result<Vec<(u64, bool)>, DeadLetterError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, e)),
    };
    let mut out: Vec<(u64, bool)> = rd
        .flatten()
        .filter_map(|e| parse_name(&e.file_name().to_string_lossy()))
        .collect();
    out.sort();
    Ok(out)
}

impl DeadLetterStore {
    /// Open (or create) the store in `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, DeadLetterError> {
        ensure_dir(dir)?;
        let mut entries = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let Some((id, _)) = parse_name(&name) {
                let len = entry.metadata().map_err(|e| io(&entry.path(), e))?.len();
                entries.insert(id, len);
            }
        }
        let next_id = entries.keys().next_back().map_or(1, |id| id + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            next_id,
            entries,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the entry files together.
    pub fn bytes(&self) -> u64 {
        self.entries.values().sum()
    }

    /// Set a record aside (durable when this returns). Returns its entry
    /// and the oldest entries removed to make room for it.
    pub fn put(
        &mut self,
        new: &NewDeadLetter<'_>,
        payload: &[u8],
    ) -> Result<(DeadLetter, Vec<DeadLetter>), DeadLetterError> {
        let letter = DeadLetter {
            id: self.next_id,
            seq: new.seq,
            stream: new.stream.to_string(),
            record_id: new.record_id.to_string(),
            attempts: new.attempts,
            reason: new.reason.to_string(),
            set_aside_ms: new.now_ms,
            bytes: payload.len() as u64,
            crc32: crc32fast::hash(payload),
            resend: false,
        };
        // Plain data with string keys: serializing cannot fail.
        let mut bytes = serde_json::to_vec(&letter).unwrap_or_default();
        bytes.push(b'\n');
        bytes.extend_from_slice(payload);
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            return Err(DeadLetterError::TooLarge {
                bytes: size,
                max: self.max_bytes,
            });
        }
        let mut evicted = Vec::new();
        while self.bytes() + size > self.max_bytes {
            let Some((&id, _)) = self.entries.first_key_value() else {
                break;
            };
            match read(&self.dir, id) {
                Ok((old, _)) => evicted.push(old),
                Err(e) => tracing::warn!(error = %e, id, "dead-letter entry evicted unread"),
            }
            self.remove(id)?;
        }
        ensure_dir(&self.dir)?;
        write_private(&self.dir.join(entry_name(letter.id, HELD)), &bytes)?;
        self.entries.insert(letter.id, size);
        self.next_id += 1;
        Ok((letter, evicted))
    }

    /// The entries an operator asked to be sent again, with their payloads.
    /// One that does not parse is renamed `*.bad` and reported in the
    /// second list.
    pub fn resend_requests(&mut self) -> Result<ResendRequests, DeadLetterError> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (id, resend) in scan(&self.dir)? {
            if !resend {
                continue;
            }
            let path = self.dir.join(entry_name(id, RESEND));
            match read_entry(&path, true) {
                Ok(e) => ok.push(e),
                Err(e) => {
                    let mut dest = path.as_os_str().to_owned();
                    dest.push(".bad");
                    let _ = std::fs::rename(&path, PathBuf::from(dest));
                    self.entries.remove(&id);
                    bad.push(e);
                }
            }
        }
        Ok((ok, bad))
    }

    /// Remove entry `id` (sent again, or evicted).
    pub fn remove(&mut self, id: u64) -> Result<(), DeadLetterError> {
        for ext in [HELD, RESEND] {
            let path = self.dir.join(entry_name(id, ext));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path, e)),
            }
        }
        self.entries.remove(&id);
        crate::fsutil::sync_dir(&self.dir).map_err(|e| io(&self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn new<'a>(seq: u64, reason: &'a str) -> NewDeadLetter<'a> {
        NewDeadLetter {
            seq,
            stream: "line-1",
            record_id: "abc",
            attempts: 5,
            reason,
            now_ms: 1000,
        }
    }

    #[test]
    fn entries_are_private_durable_listed_and_resent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("deadletter");
        let mut s = DeadLetterStore::open(&dir, 1 << 20).unwrap();
        let (a, evicted) = s.put(&new(7, "refused"), b"{\"x\":1}").unwrap();
        assert!(evicted.is_empty());
        assert_eq!((a.id, a.seq, a.bytes), (1, 7, 7));
        let (b, _) = s.put(&new(9, "refused"), b"{\"x\":2}").unwrap();
        assert_eq!(b.id, 2);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(entry_name(1, HELD))), 0o600);
        // Reopened: the same entries, numbers go on.
        drop(s);
        let mut s = DeadLetterStore::open(&dir, 1 << 20).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(list(&dir).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(read(&dir, 2).unwrap().1, b"{\"x\":2}");
        // Resend asked for one (twice: the second is a no-op), then for all.
        assert!(request_resend(&dir, 1).unwrap());
        assert!(!request_resend(&dir, 1).unwrap());
        assert!(matches!(
            request_resend(&dir, 5),
            Err(DeadLetterError::NotFound(5))
        ));
        let (req, bad) = s.resend_requests().unwrap();
        assert!(bad.is_empty());
        assert_eq!(req.len(), 1);
        assert_eq!(req[0].0.id, 1);
        assert!(req[0].0.resend);
        assert_eq!(request_resend_all(&dir).unwrap(), vec![2]);
        s.remove(1).unwrap();
        assert_eq!(list(&dir).unwrap().len(), 1);
        assert!(list(&dir).unwrap()[0].resend);
        let (c, _) = s.put(&new(10, "refused"), b"{}").unwrap();
        assert_eq!(c.id, 3);
    }

    #[test]
    fn the_store_is_bounded_and_a_corrupt_entry_is_set_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dl");
        let payload = vec![b'7'; 300];
        let mut s = DeadLetterStore::open(&dir, 1000).unwrap();
        let mut evicted = Vec::new();
        for seq in 0..6 {
            evicted.extend(s.put(&new(seq, "refused"), &payload).unwrap().1);
            assert!(s.bytes() <= 1000, "{}", s.bytes());
        }
        assert!(!evicted.is_empty());
        assert_eq!(evicted[0].seq, 0, "the oldest goes first");
        assert_eq!(s.len() + evicted.len(), 6);
        assert!(matches!(
            s.put(&new(9, "refused"), &[0u8; 2000]),
            Err(DeadLetterError::TooLarge { .. })
        ));
        // A flipped byte in a payload: set apart, never handed out.
        let last = *s.entries.keys().next_back().unwrap();
        let path = dir.join(entry_name(last, HELD));
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        request_resend(&dir, last).unwrap();
        let (ok, bad) = s.resend_requests().unwrap();
        assert!(ok.is_empty());
        assert_eq!(bad.len(), 1);
        assert!(!dir.join(entry_name(last, RESEND)).exists());
    }
}
