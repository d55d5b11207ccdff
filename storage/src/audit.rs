//! The audit log: an append-only, hash-chained, crash-safe record of events,
//! and its verifier. Each entry has a `kind` (a name chosen by the writer)
//! and any JSON `data`; the log itself writes one kind, [`kinds::RECOVERED`].
//! What the entries mean (the gateway's model loads, activations, published
//! aggregates ...) is the writer's business: the runtime's `audit` module
//! names its kinds and where the log lives under its state directory.
//!
//! # File format
//!
//! The log is JSON Lines, one entry per line, each line ending with `\n`:
//!
//! ```text
//! {"seq":1,"ts_ms":1700000000000,"kind":"model_loaded","data":{...},"prev":"000…000","hash":"9f2c…"}
//! ```
//!
//! - `seq` starts at 1 and grows by one per entry.
//! - `ts_ms` is the wall clock at append, ms since the Unix epoch.
//! - `kind` names the event, `data` is any JSON value.
//! - `prev` is the `hash` of the entry before (64 zeros, [`GENESIS`], for
//!   the first entry), which chains every entry to all those before it.
//! - `hash` is the lowercase hex SHA-256 of the entry serialized without its
//!   `hash` field: the bytes `serde_json::to_vec` gives for a struct with the
//!   fields `seq`, `ts_ms`, `kind`, `data`, `prev` in that order. The writer
//!   then inserts `,"hash":"<64 hex>"` before the closing brace, so the hashed
//!   bytes are exactly the line with its hash member (and newline) removed.
//!   Verification hashes those raw bytes rather than re-serializing the parsed
//!   entry, so it does not depend on JSON numbers surviving a parse (serde_json
//!   parses floats to within one ulp unless `float_roundtrip` is on) and any
//!   change to a line's bytes, even one that means the same JSON, is caught.
//!
//! Beside the log, `<log>.head` holds the last *committed* entry,
//! `{"seq":N,"hash":"…"}`, replaced atomically (written beside, synced,
//! renamed, directory synced) at each [`AuditLog::commit`].
//!
//! # Durability
//!
//! [`AuditLog::append`] writes the line at once (one `write`, so a process
//! crash never leaves half of it); [`AuditLog::commit`] syncs the log
//! (`fdatasync`) and only then replaces the head file, so the log always holds
//! at least what the head file says (group commit: append several entries,
//! commit once). Only committed entries count as written; complete entries
//! written after the last commit survive a process crash and are kept.
//! Opening writes the entries after the head file's again (a failed fsync,
//! in this process or one that died, leaves what it lost readable in clean
//! pages that no later fsync writes), so the next commit makes them
//! durable. A failed fsync fails the log closed until it is opened again.
//!
//! Opening reads only the tail of the log (64 KiB, more when one entry is
//! longer), never the whole file: it finds the last valid entry (it parses and
//! its hash recomputes; when the head file's entry is in the tail, the last
//! entry that chains from it) and treats the bytes after it as a torn write.
//! Those bytes are copied to `<log>.torn-<unix_ms>`, cut off (truncate,
//! fsync), and a `recovered` entry (`{"quarantined_bytes":n,"file":"…",
//! "offset":o}`) is appended and committed, so the recovery is itself in the
//! chain. Damage further back is evidence and is never repaired at open:
//! [`verify`] reports it. Opening refuses ([`AuditError::Corrupt`]) rather
//! than start a chain over data it cannot account for: a log longer than the
//! tail window without a valid entry in its tail, or a log that ends before
//! (or disagrees with) the entry its head file says was committed.
//!
//! # What [`verify`] catches
//!
//! [`verify`] reads the whole log and lists every problem with its line and
//! seq ([`ProblemKind`]): a line that is not an entry (malformed, or torn by a
//! crash not yet recovered by opening), an entry whose content does not match
//! its hash (edited), an entry edited with its hash recomputed (the next
//! entry's `prev` no longer matches), missing entries (deleted), entries that
//! do not belong to the chain (inserted, duplicated), entries out of order
//! (reordered), and a log that ends before, or disagrees with, its head file
//! (truncated). After a problem it resynchronizes and goes on.
//!
//! # Limits
//!
//! The chain proves the log is consistent with itself, not that it is the log
//! the gateway wrote. An attacker who rewrites the whole file from some entry
//! on, recomputing every hash, and rewrites the head file to match, leaves
//! nothing for [`verify`] to find. That is only caught by comparing with a
//! head recorded elsewhere: the runtime publishes the head ([`AuditLog::committed`])
//! in its health message, and a head seen there must still be in the log with
//! the same hash.
//!
//! One process writes a log at a time: [`AuditLog::open`] takes an exclusive
//! lock on the file ([`AuditError::Locked`]).

use std::collections::BTreeSet;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::fs::{Fs, FsFile, OpenMode, RealFs};

/// The `prev` of the first entry: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Largest entry (line, newline included) [`AuditLog::append`] writes.
pub const MAX_ENTRY: usize = 1 << 20;

/// How much of the log's end opening reads first.
const TAIL_WINDOW: u64 = 64 * 1024;
/// How far opening widens the window looking for a valid entry: room for
/// an entry of [`MAX_ENTRY`] followed by a torn one.
const MAX_TAIL: u64 = 4 * MAX_ENTRY as u64;
/// Longest line [`verify`] holds in memory; longer lines are malformed.
const MAX_VERIFY_LINE: usize = 16 * MAX_ENTRY;
/// `,"hash":"` + 64 hex + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;
const HASH_PREFIX: &[u8] = b",\"hash\":\"";

/// Entry kinds written by the log itself. Writers name their own kinds;
/// they should not reuse these.
pub mod kinds {
    /// A torn tail was quarantined at open ([`super::AuditLog::open`]):
    /// `{quarantined_bytes, file, offset}`.
    pub const RECOVERED: &str = "recovered";
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing a file failed.
    #[error("audit log {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The log or its head file is in a state opening must not build on.
    #[error("audit log {} is corrupt: {detail}", .path.display())]
    Corrupt {
        /// The log.
        path: PathBuf,
        /// What is wrong, and where.
        detail: String,
    },
    /// Another writer holds the log.
    #[error("audit log {} is locked by another writer", .path.display())]
    Locked {
        /// The log.
        path: PathBuf,
    },
    /// An entry is larger than [`MAX_ENTRY`].
    #[error("audit entry of kind {kind:?} is {len} bytes, over the limit of {MAX_ENTRY}")]
    TooLarge {
        /// The entry's kind.
        kind: String,
        /// Its length, bytes.
        len: usize,
    },
    /// An entry could not be serialized.
    #[error("cannot serialize audit entry: {0}")]
    Serialize(#[from] serde_json::Error),
    /// An earlier write or sync failed in a way that leaves the file's state
    /// unknown; the log refuses to go on until it is opened again (which
    /// recovers from whatever reached the disk).
    #[error("audit log {} failed earlier ({detail}); open it again to recover", .path.display())]
    Failed {
        /// The log.
        path: PathBuf,
        /// The earlier failure.
        detail: String,
    },
}

fn io(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The hashed part of an entry, in file order.
#[derive(Serialize)]
struct Unsigned<'a> {
    seq: u64,
    ts_ms: i64,
    kind: &'a str,
    data: &'a Value,
    prev: &'a str,
}

/// An entry as stored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    seq: u64,
    #[allow(dead_code)]
    ts_ms: i64,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    data: serde::de::IgnoredAny,
    prev: String,
    hash: String,
}

/// The head file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    seq: u64,
    hash: String,
}

/// A line that parses as an entry.
#[derive(Debug, Clone)]
struct Parsed {
    seq: u64,
    prev: String,
    /// The `hash` field.
    hash: String,
    /// SHA-256 of the line without its hash member.
    computed: String,
}

impl Parsed {
    fn hash_ok(&self) -> bool {
        self.hash == self.computed
    }
}

fn is_hex64(s: &[u8]) -> bool {
    s.len() == 64 && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Serialize one entry: the line (newline included) and its hash.
fn encode(
    seq: u64,
    ts_ms: i64,
    kind: &str,
    data: &Value,
    prev: &str,
) -> Result<(Vec<u8>, String), serde_json::Error> {
    let mut line = serde_json::to_vec(&Unsigned {
        seq,
        ts_ms,
        kind,
        data,
        prev,
    })?;
    let hash = sha256_hex(&line);
    // A struct serializes as a JSON object, so the last byte is its `}`.
    debug_assert_eq!(line.last(), Some(&b'}'));
    line.pop();
    line.extend_from_slice(HASH_PREFIX);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok((line, hash))
}

/// Parse one line (without its newline) as an entry. The hash is checked by
/// the caller ([`Parsed::hash_ok`]).
fn parse_line(line: &[u8]) -> Result<Parsed, String> {
    if line.is_empty() {
        return Err("empty line".into());
    }
    if line.len() < HASH_SUFFIX_LEN + 2 {
        return Err(format!("{} bytes, too short for an entry", line.len()));
    }
    let (body, suffix) = line.split_at(line.len() - HASH_SUFFIX_LEN);
    let stored_hash = &suffix[HASH_PREFIX.len()..HASH_PREFIX.len() + 64];
    if !suffix.starts_with(HASH_PREFIX) || !suffix.ends_with(b"\"}") || !is_hex64(stored_hash) {
        return Err("does not end with a \"hash\" member of 64 hex digits".into());
    }
    let entry: Stored =
        serde_json::from_slice(line).map_err(|e| format!("not an audit entry: {e}"))?;
    if entry.hash.as_bytes() != stored_hash {
        return Err("\"hash\" is not the last member".into());
    }
    if !is_hex64(entry.prev.as_bytes()) {
        return Err("\"prev\" is not 64 lowercase hex digits".into());
    }
    let mut hasher = Sha256::new();
    hasher.update(body);
    hasher.update(b"}");
    Ok(Parsed {
        seq: entry.seq,
        prev: entry.prev,
        hash: entry.hash,
        computed: hex::encode(hasher.finalize()),
    })
}

fn head_path_of(path: &Path) -> PathBuf {
    with_suffix(path, ".head")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(fs: &impl Fs, dir: &Path) -> Result<(), AuditError> {
    fs.sync_dir(dir).map_err(|e| io(dir, e))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn short(hash: &str) -> String {
    format!("{}…", &hash[..hash.len().min(12)])
}

enum HeadRead {
    Io(std::io::Error),
    Bad(String),
}

/// The head file: `None` when there is none.
fn read_head(fs: &impl Fs, head_path: &Path) -> Result<Option<(u64, String)>, HeadRead> {
    let text = match fs.read(head_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(HeadRead::Io(e)),
    };
    let head: Head = serde_json::from_slice(&text)
        .map_err(|e| HeadRead::Bad(format!("not {{\"seq\":N,\"hash\":\"…\"}}: {e}")))?;
    if !is_hex64(head.hash.as_bytes()) {
        return Err(HeadRead::Bad("hash is not 64 lowercase hex digits".into()));
    }
    Ok(Some((head.seq, head.hash)))
}

/// Replace the head file whole or not at all.
fn write_head(fs: &impl Fs, head_path: &Path, seq: u64, hash: &str) -> Result<(), AuditError> {
    let mut bytes = serde_json::to_vec(&Head {
        seq,
        hash: hash.to_string(),
    })?;
    bytes.push(b'\n');
    crate::fsutil::write_atomic_in(fs, head_path, &bytes).map_err(|e| io(head_path, e))
}

/// A complete line in the tail window.
struct TailLine {
    /// Offset of the line's first byte.
    start: u64,
    /// Offset just past its newline.
    end: u64,
    /// The entry, when it parses and its hash recomputes.
    entry: Option<Parsed>,
}

/// What opening keeps of the log.
enum Tail {
    /// Keep `..end`; the last entry kept. The entries from `uncommitted`
    /// on are not known to be on disk (none is named by the head file).
    Keep {
        end: u64,
        last: Option<(u64, String)>,
        uncommitted: u64,
    },
    /// Refuse to open.
    Corrupt(String),
}

/// The complete lines of `file[from..size]`, `from` being a line start.
fn tail_lines(buf: &[u8], from: u64) -> Vec<TailLine> {
    let mut lines = Vec::new();
    let mut start = 0usize;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let end = start + nl;
        let entry = parse_line(&buf[start..end]).ok().filter(Parsed::hash_ok);
        lines.push(TailLine {
            start: from + start as u64,
            end: from + end as u64 + 1,
            entry,
        });
        start = end + 1;
    }
    lines
}

/// Find where the valid log ends, reading only its tail.
fn scan_tail(file: &impl FsFile, size: u64, head: Option<&(u64, String)>) -> std::io::Result<Tail> {
    let committed = head.filter(|(seq, _)| *seq > 0);
    if size == 0 {
        return Ok(match committed {
            Some((seq, _)) => Tail::Corrupt(format!(
                "the log is empty but its head file says seq {seq} was committed"
            )),
            None => Tail::Keep {
                end: 0,
                last: None,
                uncommitted: 0,
            },
        });
    }
    let mut window = TAIL_WINDOW.min(size);
    let lines = loop {
        let start = size - window;
        // Read one byte before the window to know whether it starts a line.
        let read_from = start.saturating_sub(1);
        let mut buf = vec![0u8; (size - read_from) as usize];
        file.read_exact_at(&mut buf, read_from)?;
        let first = if start == 0 {
            Some(0)
        } else {
            buf.iter().position(|&b| b == b'\n').map(|i| i + 1)
        };
        let lines = first
            .map(|f| tail_lines(&buf[f..], read_from + f as u64))
            .unwrap_or_default();
        let found = lines.iter().any(|l| l.entry.is_some());
        if found || window == size || window >= MAX_TAIL {
            break lines;
        }
        window = (window * 2).min(size).min(MAX_TAIL);
    };
    // Where the lines read start: entries from there on are after the
    // head's when it is not among them.
    let window_start = lines.first().map_or(size, |l| l.start);
    let last_valid = lines
        .iter()
        .rev()
        .find_map(|l| l.entry.as_ref().map(|e| (l.end, e.seq, e.hash.clone())));
    if let Some((hseq, hhash)) = committed {
        let same_seq: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].entry.as_ref().is_some_and(|e| e.seq == *hseq))
            .collect();
        let anchor = same_seq
            .iter()
            .rev()
            .copied()
            .find(|&i| lines[i].entry.as_ref().is_some_and(|e| e.hash == *hhash));
        match (anchor, same_seq.last()) {
            (Some(mut i), _) => {
                let uncommitted = lines[i].end;
                // Keep what chains from the committed entry; the rest was
                // never committed and did not reach the disk whole.
                while let (Some(cur), Some(next)) = (
                    lines[i].entry.as_ref(),
                    lines.get(i + 1).and_then(|l| l.entry.as_ref()),
                ) {
                    if next.seq != cur.seq + 1 || next.prev != cur.hash {
                        break;
                    }
                    i += 1;
                }
                let last = lines[i].entry.as_ref().map(|e| (e.seq, e.hash.clone()));
                return Ok(Tail::Keep {
                    end: lines[i].end,
                    last,
                    uncommitted,
                });
            }
            (None, Some(&i)) => {
                let hash = lines[i].entry.as_ref().map(|e| e.hash.clone());
                return Ok(Tail::Corrupt(format!(
                    "the entry with seq {hseq} at byte {} has hash {} but the head file says {}: \
                     committed entries were changed; run `outpost audit verify`",
                    lines[i].start,
                    short(hash.as_deref().unwrap_or("")),
                    short(hhash),
                )));
            }
            (None, None) => {}
        }
        return Ok(match last_valid {
            None => Tail::Corrupt(format!(
                "no valid entry in the last {window} bytes, but the head file says seq {hseq} \
                 was committed; run `outpost audit verify`"
            )),
            Some((_, seq, _)) if seq < *hseq => Tail::Corrupt(format!(
                "the log ends at seq {seq} but its head file says seq {hseq} was committed: \
                 committed entries are missing; run `outpost audit verify`"
            )),
            Some((end, seq, hash)) => Tail::Keep {
                end,
                last: Some((seq, hash)),
                uncommitted: window_start,
            },
        });
    }
    Ok(match last_valid {
        Some((end, seq, hash)) => Tail::Keep {
            end,
            last: Some((seq, hash)),
            uncommitted: window_start,
        },
        None if size <= TAIL_WINDOW => Tail::Keep {
            end: 0,
            last: None,
            uncommitted: 0,
        },
        None => Tail::Corrupt(format!(
            "no valid entry in the last {window} bytes of {size}; not starting a new chain \
             over it (run `outpost audit verify`, then move the file aside)"
        )),
    })
}

/// An open audit log, the only writer of its file.
#[derive(Debug)]
pub struct AuditLog<F: Fs = RealFs> {
    fs: F,
    path: PathBuf,
    head_path: PathBuf,
    /// Opened for appending, and locked.
    file: F::File,
    /// Length of the complete entries written.
    len: u64,
    /// Last entry written.
    seq: u64,
    hash: String,
    /// Last entry in the head file.
    committed: (u64, String),
    /// Bytes written since the last sync.
    dirty: bool,
    /// Set when the file's state became unknown.
    failed: Option<String>,
}

impl AuditLog {
    /// Open (or create, with its directories) the log at `path`, recovering
    /// from a torn tail as the module documentation describes. Reads only
    /// the tail of the file.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        Self::open_in(RealFs, path)
    }
}

impl<F: Fs> AuditLog<F> {
    /// [`AuditLog::open`] on the file system `fs`.
    pub fn open_in(fs: F, path: &Path) -> Result<Self, AuditError> {
        let dir = dir_of(path);
        crate::fsutil::create_dir_all_in(&fs, dir).map_err(|e| io(dir, e))?;
        let existed = fs.exists(path);
        let file = fs
            .open(path, OpenMode::AppendCreate)
            .map_err(|e| io(path, e))?;
        if !file.try_lock().map_err(|e| io(path, e))? {
            return Err(AuditError::Locked {
                path: path.to_path_buf(),
            });
        }
        if !existed {
            sync_dir(&fs, dir)?;
        }
        let head_path = head_path_of(path);
        let head = match read_head(&fs, &head_path) {
            Ok(h) => h,
            Err(HeadRead::Io(e)) => return Err(io(&head_path, e)),
            Err(HeadRead::Bad(detail)) => {
                return Err(AuditError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("head file {}: {detail}", head_path.display()),
                });
            }
        };
        let size = file.len().map_err(|e| io(path, e))?;
        let (end, last, uncommitted) =
            match scan_tail(&file, size, head.as_ref()).map_err(|e| io(path, e))? {
                Tail::Keep {
                    end,
                    last,
                    uncommitted,
                } => (end, last, uncommitted),
                Tail::Corrupt(detail) => {
                    return Err(AuditError::Corrupt {
                        path: path.to_path_buf(),
                        detail,
                    });
                }
            };
        let (seq, hash) = last.unwrap_or_else(|| (0, GENESIS.to_string()));
        let mut log = AuditLog {
            fs,
            path: path.to_path_buf(),
            head_path,
            file,
            len: end,
            seq,
            hash,
            committed: head.unwrap_or_else(|| (0, GENESIS.to_string())),
            // Entries written after the last commit may not be on disk yet.
            dirty: true,
            failed: None,
        };
        if end < size {
            let name = log.quarantine(end, size)?;
            tracing::warn!(
                log = %log.path.display(),
                offset = end,
                bytes = size - end,
                quarantined = %name,
                "audit log: torn tail cut off and quarantined"
            );
            log.write_again(uncommitted.min(end), end)?;
            log.append(
                kinds::RECOVERED,
                json!({"quarantined_bytes": size - end, "file": name, "offset": end}),
            )?;
            log.commit()?;
        } else {
            log.write_again(uncommitted.min(end), end)?;
        }
        Ok(log)
    }

    /// Write `from..to` of the log again (cut, and appended from what was
    /// read): entries no head file names may sit in pages a failed fsync
    /// (in this process or one before it) left readable but clean, which no
    /// later fsync would write. Written again, the next commit syncs them.
    fn write_again(&mut self, from: u64, to: u64) -> Result<(), AuditError> {
        if from >= to {
            return Ok(());
        }
        let mut bytes = vec![0u8; (to - from) as usize];
        self.file
            .read_exact_at(&mut bytes, from)
            .map_err(|e| io(&self.path, e))?;
        self.file.set_len(from).map_err(|e| io(&self.path, e))?;
        self.file.write_all(&bytes).map_err(|e| io(&self.path, e))?;
        self.dirty = true;
        Ok(())
    }

    /// Copy `from..to` to `<path>.torn-<unix_ms>`, then cut the log at
    /// `from`. Returns the quarantine file's name.
    fn quarantine(&mut self, from: u64, to: u64) -> Result<String, AuditError> {
        let mut bytes = vec![0u8; (to - from) as usize];
        self.file
            .read_exact_at(&mut bytes, from)
            .map_err(|e| io(&self.path, e))?;
        let base = with_suffix(&self.path, &format!(".torn-{}", now_ms()));
        let mut n = 0u32;
        let (dest, mut out) = loop {
            let dest = if n == 0 {
                base.clone()
            } else {
                with_suffix(&base, &format!("-{n}"))
            };
            match self.fs.open(&dest, OpenMode::CreateNew) {
                Ok(f) => break (dest, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(io(&dest, e)),
            }
        };
        out.write_all(&bytes).map_err(|e| io(&dest, e))?;
        out.sync_all().map_err(|e| io(&dest, e))?;
        sync_dir(&self.fs, dir_of(&dest))?;
        self.file.set_len(from).map_err(|e| io(&self.path, e))?;
        self.file.sync_all().map_err(|e| io(&self.path, e))?;
        self.len = from;
        Ok(dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    }

    /// Append an entry stamped with the wall clock; it counts as written at
    /// the next [`AuditLog::commit`]. Returns its seq.
    pub fn append(&mut self, kind: &str, data: Value) -> Result<u64, AuditError> {
        self.append_at(kind, data, now_ms())
    }

    /// [`AuditLog::append`] with a given timestamp (ms since the epoch).
    pub fn append_at(&mut self, kind: &str, data: Value, ts_ms: i64) -> Result<u64, AuditError> {
        self.check_failed()?;
        let seq = self.seq + 1;
        let (line, hash) = encode(seq, ts_ms, kind, &data, &self.hash)?;
        if line.len() > MAX_ENTRY {
            return Err(AuditError::TooLarge {
                kind: kind.to_string(),
                len: line.len(),
            });
        }
        if let Err(e) = self.file.write_all(&line) {
            // A partial line would merge with the next one: cut it off, or
            // stop writing until the log is opened again.
            if let Err(e2) = self.file.set_len(self.len) {
                self.failed = Some(format!("write: {e}; truncating after it: {e2}"));
            }
            return Err(io(&self.path, e));
        }
        self.len += line.len() as u64;
        self.seq = seq;
        self.hash = hash;
        self.dirty = true;
        Ok(seq)
    }

    /// Make every entry appended so far durable: sync the log, then replace
    /// the head file.
    pub fn commit(&mut self) -> Result<(), AuditError> {
        self.check_failed()?;
        if self.dirty {
            if let Err(e) = self.file.sync_data() {
                // After a failed fsync the page cache may have dropped the
                // data: only a fresh open knows what is on disk.
                self.failed = Some(format!("fdatasync: {e}"));
                return Err(io(&self.path, e));
            }
            self.dirty = false;
        }
        if self.committed.0 != self.seq || self.committed.1 != self.hash {
            write_head(&self.fs, &self.head_path, self.seq, &self.hash)?;
            self.committed = (self.seq, self.hash.clone());
        }
        Ok(())
    }

    fn check_failed(&self) -> Result<(), AuditError> {
        match &self.failed {
            Some(detail) => Err(AuditError::Failed {
                path: self.path.clone(),
                detail: detail.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Seq and hash of the last entry appended ((0, [`GENESIS`]) when empty).
    pub fn head(&self) -> (u64, String) {
        (self.seq, self.hash.clone())
    }

    /// Seq and hash of the last entry committed (the head file's content;
    /// (0, [`GENESIS`]) before the first commit): what to publish.
    pub fn committed(&self) -> (u64, String) {
        self.committed.clone()
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log failed closed (a failed fsync, or a write it could not cut
    /// back): nothing is appended or committed until it is opened again.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }
}

/// What is wrong with a line of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The line is not an entry (or is torn: no trailing newline).
    Malformed,
    /// The entry's content does not match its hash, or it was changed and
    /// its hash recomputed (the next entry's `prev` no longer matches).
    Edited,
    /// Entries are missing: seq jumps forward.
    Deleted,
    /// An entry that does not belong to the chain (repeats a seq, or does not
    /// link) while the chain goes on without it.
    Inserted,
    /// Entries out of order.
    Reordered,
    /// The log ends before the head file's seq, or the entry with that seq
    /// is not the one the head file names.
    Truncated,
    /// `prev` does not match the previous entry's hash, and nothing more
    /// specific fits.
    BrokenLink,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Malformed => "malformed",
            ProblemKind::Edited => "edited",
            ProblemKind::Deleted => "deleted",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Truncated => "truncated",
            ProblemKind::BrokenLink => "broken link",
        })
    }
}

/// One problem [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditProblem {
    /// Line of the log, 1-based (0: the head file; one past the last line:
    /// entries missing at the end).
    pub line: usize,
    /// The seq concerned, when known.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: ProblemKind,
    /// Details, with the lines and seqs involved.
    pub detail: String,
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.seq) {
            (0, _) => write!(f, "head file: {}: {}", self.kind, self.detail),
            (line, Some(seq)) => {
                write!(f, "line {line} (seq {seq}): {}: {}", self.kind, self.detail)
            }
            (line, None) => write!(f, "line {line}: {}: {}", self.kind, self.detail),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines that parse as entries.
    pub entries: u64,
    /// Seq and hash of the last entry of the chain, if any.
    pub head: Option<(u64, String)>,
    /// The head file's seq and hash, if there is a readable one.
    pub committed: Option<(u64, String)>,
    /// Every problem found, by line.
    pub problems: Vec<AuditProblem>,
}

impl VerifyReport {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok() {
            return match &self.head {
                Some((seq, hash)) => write!(
                    f,
                    "ok: {} entries, head seq {seq} sha256 {}",
                    self.entries,
                    short(hash)
                ),
                None => write!(f, "ok: 0 entries"),
            };
        }
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// One line of the log, as [`verify`] reads it.
struct Item {
    line: usize,
    rec: Result<Parsed, String>,
}

/// Reads lines of bounded length.
struct Lines<R> {
    reader: R,
    line: usize,
    buf: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    fn next_item(&mut self) -> std::io::Result<Option<Item>> {
        self.buf.clear();
        let mut overlong = false;
        let mut newline = false;
        let mut any = false;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if self.buf.len() + take <= MAX_VERIFY_LINE {
                self.buf.extend_from_slice(&chunk[..take]);
            } else {
                overlong = true;
            }
            self.reader.consume(take + usize::from(done));
            if done {
                newline = true;
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.line += 1;
        let rec = if overlong {
            Err(format!("longer than {MAX_VERIFY_LINE} bytes"))
        } else if !newline {
            Err(format!(
                "no trailing newline: a torn write ({} bytes; opening the log quarantines it)",
                self.buf.len()
            ))
        } else {
            parse_line(&self.buf)
        };
        Ok(Some(Item {
            line: self.line,
            rec,
        }))
    }
}

/// The last entry accepted into the chain.
struct Tip {
    seq: u64,
    hash: String,
    /// The content's hash when it differs from the stored one (an edited
    /// entry): the next entry may link to either.
    alt: Option<String>,
    prev: String,
    line: usize,
    /// It linked properly to the entry before it.
    clean: bool,
}

impl Tip {
    fn genesis() -> Tip {
        Tip {
            seq: 0,
            hash: GENESIS.to_string(),
            alt: None,
            prev: GENESIS.to_string(),
            line: 0,
            clean: false,
        }
    }

    fn links(&self, r: &Parsed) -> bool {
        r.prev == self.hash || self.alt.as_ref() == Some(&r.prev)
    }

    fn fits(&self, r: &Parsed) -> bool {
        r.hash_ok() && r.seq == self.seq + 1 && self.links(r)
    }

    fn of(r: &Parsed, line: usize, clean: bool) -> Tip {
        Tip {
            seq: r.seq,
            hash: r.hash.clone(),
            alt: None,
            prev: r.prev.clone(),
            line,
            clean,
        }
    }
}

/// Seqs reported missing.
struct Gap {
    first: u64,
    last: u64,
    /// `prev` of the entry after the gap: the hash `last` must have.
    end_hash: String,
    /// The `Deleted` problem.
    problem: usize,
    found: BTreeSet<u64>,
}

/// An entry with a future seq that did not fit where it was.
struct Orphan {
    seq: u64,
    hash: String,
    problem: usize,
}

struct Verifier {
    problems: Vec<Option<AuditProblem>>,
    tip: Tip,
    /// Malformed lines since the tip.
    skipped: u64,
    gaps: Vec<Gap>,
    orphans: Vec<Orphan>,
    /// Line and hash of the accepted entry with the head file's seq.
    at_head: Option<(usize, String)>,
    head_seq: Option<u64>,
}

impl Verifier {
    fn report(
        &mut self,
        line: usize,
        seq: Option<u64>,
        kind: ProblemKind,
        detail: String,
    ) -> usize {
        self.problems.push(Some(AuditProblem {
            line,
            seq,
            kind,
            detail,
        }));
        self.problems.len() - 1
    }

    fn accept(&mut self, tip: Tip) {
        if Some(tip.seq) == self.head_seq {
            self.at_head = Some((tip.line, tip.hash.clone()));
        }
        self.tip = tip;
        self.skipped = 0;
    }

    /// Handle one entry; `next` is the line after it. Returns whether `next`
    /// was consumed too.
    fn entry(&mut self, line: usize, r: Parsed, next: Option<&Item>) -> bool {
        if self.tip.fits(&r) {
            self.accept(Tip::of(&r, line, true));
            return false;
        }
        let ts = self.tip.seq;
        // Missing seqs explained by the malformed lines just before.
        if r.hash_ok() && self.skipped > 0 && r.seq > ts + 1 && r.seq - ts - 1 <= self.skipped {
            self.accept(Tip::of(&r, line, false));
            return false;
        }
        let n = next.and_then(|i| i.rec.as_ref().ok().map(|p| (i.line, p)));
        let n_fits = n.is_some_and(|(_, p)| self.tip.fits(p));
        // Two entries swapped.
        if r.hash_ok()
            && r.seq > ts + 1
            && let Some((nline, np)) = n.filter(|_| n_fits)
            && r.seq == np.seq + 1
            && r.prev == np.hash
        {
            self.report(
                line,
                Some(r.seq),
                ProblemKind::Reordered,
                format!(
                    "seq {} comes before seq {} (line {nline}): the two lines are swapped",
                    r.seq, np.seq
                ),
            );
            self.accept(Tip::of(np, nline, true));
            self.accept(Tip::of(&r, line, true));
            return true;
        }
        // An entry that went missing earlier, found later: moved.
        if r.hash_ok() && r.seq <= ts {
            let gap = self.gaps.iter().position(|g| {
                (g.first..=g.last).contains(&r.seq) && (r.seq != g.last || r.hash == g.end_hash)
            });
            if let Some(g) = gap {
                let (before, after) = (self.gaps[g].first - 1, self.gaps[g].last + 1);
                self.report(
                    line,
                    Some(r.seq),
                    ProblemKind::Reordered,
                    format!(
                        "seq {} belongs between seq {before} and seq {after} but appears after seq {ts}",
                        r.seq
                    ),
                );
                self.gaps[g].found.insert(r.seq);
                self.close_gap_if_found(g);
                return false;
            }
        }
        if n_fits {
            let why = if !r.hash_ok() {
                format!(
                    "its content does not match its hash {} and the chain goes on without it \
                     (seq {} at line {} links to seq {ts})",
                    short(&r.hash),
                    ts + 1,
                    n.map_or(0, |(l, _)| l),
                )
            } else if r.seq == ts && r.hash == self.tip.hash {
                format!("duplicate of line {} (seq {ts})", self.tip.line)
            } else if r.seq <= ts {
                format!("repeats seq {} after seq {ts}", r.seq)
            } else {
                format!(
                    "does not link to seq {ts} (line {}), and the next line does",
                    self.tip.line
                )
            };
            let idx = self.report(line, Some(r.seq), ProblemKind::Inserted, why);
            if r.hash_ok() && r.seq > ts {
                self.orphans.push(Orphan {
                    seq: r.seq,
                    hash: r.hash.clone(),
                    problem: idx,
                });
            }
            return false;
        }
        if !r.hash_ok() {
            self.report(
                line,
                Some(r.seq),
                ProblemKind::Edited,
                format!(
                    "content hashes to {}, not to its stored hash {}",
                    short(&r.computed),
                    short(&r.hash)
                ),
            );
            let seq = if self.tip.links(&r) {
                // Maybe its seq was the field edited.
                Some(ts + 1)
            } else if r.seq > ts {
                Some(r.seq)
            } else {
                None
            };
            if let Some(seq) = seq {
                self.accept(Tip {
                    seq,
                    hash: r.hash.clone(),
                    alt: Some(r.computed.clone()),
                    prev: r.prev.clone(),
                    line,
                    clean: false,
                });
            }
            return false;
        }
        if r.seq == ts + 1 {
            // Linked to something else than the tip.
            if self.tip.clean && ts > 0 && self.skipped == 0 {
                self.report(
                    self.tip.line,
                    Some(ts),
                    ProblemKind::Edited,
                    format!(
                        "its hash {} is not the prev {} of seq {} (line {line}): \
                         it was changed and its hash recomputed",
                        short(&self.tip.hash),
                        short(&r.prev),
                        r.seq
                    ),
                );
            } else {
                let what = if ts == 0 {
                    "the first entry's prev is not zeros".to_string()
                } else {
                    format!(
                        "prev {} is not the hash {} of seq {ts} (line {})",
                        short(&r.prev),
                        short(&self.tip.hash),
                        self.tip.line
                    )
                };
                self.report(line, Some(r.seq), ProblemKind::BrokenLink, what);
            }
            self.accept(Tip::of(&r, line, false));
            return false;
        }
        if r.seq > ts + 1 {
            let (first, last) = (ts + 1, r.seq - 1);
            let count = last - first + 1;
            let range = if count == 1 {
                format!("seq {first} is missing")
            } else {
                format!("seqs {first}..={last} are missing ({count} entries)")
            };
            let after = match self.tip.line {
                0 => "at the start".to_string(),
                l => format!("after line {l}"),
            };
            let problem = self.report(
                line,
                Some(r.seq),
                ProblemKind::Deleted,
                format!("{range}, {after}"),
            );
            let mut gap = Gap {
                first,
                last,
                end_hash: r.prev.clone(),
                problem,
                found: BTreeSet::new(),
            };
            // Entries seen early that belong in the gap were moved, not
            // inserted.
            let mut i = 0;
            while i < self.orphans.len() {
                let o = &self.orphans[i];
                if (first..=last).contains(&o.seq) && (o.seq != last || o.hash == gap.end_hash) {
                    let o = self.orphans.swap_remove(i);
                    gap.found.insert(o.seq);
                    if let Some(Some(p)) = self.problems.get_mut(o.problem) {
                        p.kind = ProblemKind::Reordered;
                        p.detail = format!(
                            "seq {} appears early: it belongs after seq {ts} (line {})",
                            o.seq, self.tip.line
                        );
                    }
                } else {
                    i += 1;
                }
            }
            self.gaps.push(gap);
            self.close_gap_if_found(self.gaps.len() - 1);
            self.accept(Tip::of(&r, line, false));
            return false;
        }
        // r.seq <= ts: an old seq again.
        if let Some((nline, np)) = n
            && r.seq == ts
            && r.hash != self.tip.hash
            && r.prev == self.tip.prev
            && np.hash_ok()
            && np.seq == r.seq + 1
            && np.prev == r.hash
        {
            // Two candidates for one seq: the chain goes on from this one.
            self.report(
                self.tip.line,
                Some(ts),
                ProblemKind::Inserted,
                format!(
                    "not the entry the chain continues from: seq {} (line {nline}) links to \
                     the seq {ts} at line {line}",
                    np.seq
                ),
            );
            let clean = self.tip.clean;
            self.accept(Tip::of(&r, line, clean));
            return false;
        }
        let why = if r.seq == ts && r.hash == self.tip.hash {
            format!("duplicate of line {} (seq {ts})", self.tip.line)
        } else {
            format!("repeats seq {} after seq {ts}", r.seq)
        };
        self.report(line, Some(r.seq), ProblemKind::Inserted, why);
        false
    }

    /// Every seq of gap `g` turned up elsewhere: they were moved, not
    /// deleted, so drop its `Deleted` problem.
    fn close_gap_if_found(&mut self, g: usize) {
        let gap = &self.gaps[g];
        if gap.found.len() as u64 == gap.last - gap.first + 1
            && let Some(p) = self.problems.get_mut(gap.problem)
        {
            *p = None;
        }
    }
}

/// Check the whole log at `path` against itself and its head file, listing
/// every problem with its line and seq. `Err` only when a file cannot be
/// opened or read. Safe to run while a writer appends (the head file is read
/// first and the log always holds at least what it says).
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_in(&RealFs, path)
}

/// Reads a file from its start through [`FsFile::read_exact_at`].
struct FsReader<T> {
    file: T,
    pos: u64,
    len: u64,
}

impl<T: FsFile> Read for FsReader<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// [`verify`] on the file system `fs`.
pub fn verify_in(fs: &impl Fs, path: &Path) -> Result<VerifyReport, AuditError> {
    let head_path = head_path_of(path);
    let mut v = Verifier {
        problems: Vec::new(),
        tip: Tip::genesis(),
        skipped: 0,
        gaps: Vec::new(),
        orphans: Vec::new(),
        at_head: None,
        head_seq: None,
    };
    let committed = match read_head(fs, &head_path) {
        Ok(h) => h,
        Err(HeadRead::Io(e)) => return Err(io(&head_path, e)),
        Err(HeadRead::Bad(detail)) => {
            v.report(
                0,
                None,
                ProblemKind::Malformed,
                format!("{}: {detail}", head_path.display()),
            );
            None
        }
    };
    v.head_seq = committed.as_ref().map(|(s, _)| *s).filter(|&s| s > 0);
    let file = fs.open(path, OpenMode::Read).map_err(|e| io(path, e))?;
    let len = file.len().map_err(|e| io(path, e))?;
    let file = FsReader { file, pos: 0, len };
    let mut lines = Lines {
        reader: BufReader::with_capacity(64 * 1024, file),
        line: 0,
        buf: Vec::new(),
    };
    let mut entries = 0u64;
    let mut cur = lines.next_item().map_err(|e| io(path, e))?;
    while let Some(item) = cur.take() {
        let next = lines.next_item().map_err(|e| io(path, e))?;
        match item.rec {
            Err(detail) => {
                v.report(item.line, None, ProblemKind::Malformed, detail);
                v.skipped += 1;
                cur = next;
            }
            Ok(r) => {
                entries += 1;
                if v.entry(item.line, r, next.as_ref()) {
                    entries += 1;
                    cur = lines.next_item().map_err(|e| io(path, e))?;
                } else {
                    cur = next;
                }
            }
        }
    }
    if let Some((hseq, hhash)) = committed.as_ref().filter(|(s, _)| *s > 0) {
        let last = v.tip.seq;
        if *hseq > last {
            v.report(
                lines.line + 1,
                Some(*hseq),
                ProblemKind::Truncated,
                format!(
                    "the log ends at seq {last} (line {}) but the head file says seq {hseq} was \
                     committed: {} entries missing at the end",
                    lines.line,
                    hseq - last
                ),
            );
        } else if let Some((line, hash)) = v.at_head.clone()
            && hash != *hhash
        {
            v.report(
                line,
                Some(*hseq),
                ProblemKind::Truncated,
                format!(
                    "hash {} is not the head file's {}: the log was cut and rewritten from \
                     here or before, or this entry was changed and its hash recomputed",
                    short(&hash),
                    short(hhash)
                ),
            );
        }
    }
    let mut problems: Vec<AuditProblem> = v.problems.into_iter().flatten().collect();
    problems.sort_by_key(|p| p.line);
    Ok(VerifyReport {
        entries,
        head: (v.tip.seq > 0).then(|| (v.tip.seq, v.tip.hash.clone())),
        committed,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs::OpenOptions;

    const TS: i64 = 1_700_000_000_000;

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    /// A committed log of `n` entries.
    fn build(dir: &Path, n: u64) -> PathBuf {
        let path = dir.join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 1..=n {
            let seq = log
                .append_at(
                    "test",
                    json!({"i": i, "note": format!("entry {i}")}),
                    TS + i as i64,
                )
                .unwrap();
            assert_eq!(seq, i);
        }
        log.commit().unwrap();
        path
    }

    /// A copy of the log and its head file, to tamper with.
    fn copy(path: &Path, dir: &Path, name: &str) -> PathBuf {
        let dest = dir.join(name);
        std::fs::copy(path, &dest).unwrap();
        std::fs::copy(head_path_of(path), head_path_of(&dest)).unwrap();
        dest
    }

    fn value(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    /// Re-serialize an entry with its hash recomputed by the documented rule.
    fn reseal(v: Value) -> String {
        String::from_utf8(encode_value(&v)).unwrap()
    }

    /// The line (without newline) for an entry's fields, hash recomputed.
    fn encode_value(v: &Value) -> Vec<u8> {
        let (line, _) = encode(
            v["seq"].as_u64().unwrap(),
            v["ts_ms"].as_i64().unwrap(),
            v["kind"].as_str().unwrap(),
            &v["data"],
            v["prev"].as_str().unwrap(),
        )
        .unwrap();
        line[..line.len() - 1].to_vec()
    }

    /// A line with fields changed but its stored hash kept.
    fn forge_keep_hash(line: &str, f: impl FnOnce(&mut Value)) -> String {
        let old = value(line);
        let mut v = old.clone();
        f(&mut v);
        let fresh = String::from_utf8(encode_value(&v)).unwrap();
        let fresh_hash = value(&fresh)["hash"].as_str().unwrap().to_string();
        fresh.replace(&fresh_hash, old["hash"].as_str().unwrap())
    }

    fn only(report: &VerifyReport) -> &AuditProblem {
        assert_eq!(report.problems.len(), 1, "{report}");
        &report.problems[0]
    }

    #[test]
    fn entries_follow_the_documented_format_and_hash_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 3);
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 3);
        let mut prev = GENESIS.to_string();
        for (i, line) in lines.iter().enumerate() {
            assert!(
                line.starts_with(&format!("{{\"seq\":{},\"ts_ms\":", i + 1)),
                "{line}"
            );
            let v = value(line);
            assert_eq!(v["prev"], json!(prev));
            // The documented rule, computed independently.
            #[derive(Serialize)]
            struct U<'a> {
                seq: u64,
                ts_ms: i64,
                kind: &'a str,
                data: &'a Value,
                prev: &'a str,
            }
            let bytes = serde_json::to_vec(&U {
                seq: v["seq"].as_u64().unwrap(),
                ts_ms: v["ts_ms"].as_i64().unwrap(),
                kind: v["kind"].as_str().unwrap(),
                data: &v["data"],
                prev: v["prev"].as_str().unwrap(),
            })
            .unwrap();
            let hash = hex::encode(Sha256::digest(&bytes));
            assert_eq!(v["hash"], json!(hash));
            assert!(line.ends_with(&format!(",\"hash\":\"{hash}\"}}")));
            prev = hash;
        }
        let head: Value =
            serde_json::from_slice(&std::fs::read(head_path_of(&path)).unwrap()).unwrap();
        assert_eq!(head, json!({"seq": 3, "hash": prev}));
        let report = verify(&path).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(report.entries, 3);
        assert_eq!(report.head, Some((3, prev.clone())));
        assert_eq!(report.committed, Some((3, prev)));
    }

    #[test]
    fn empty_log_has_genesis_head_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        assert!(path.exists());
        assert_eq!(log.head(), (0, GENESIS.to_string()));
        assert_eq!(log.path(), path.as_path());
        let report = verify(&path).unwrap();
        assert!(report.ok());
        assert_eq!(report.entries, 0);
        assert_eq!(report.head, None);
        assert_eq!(report.to_string(), "ok: 0 entries");
    }

    #[test]
    fn commit_writes_the_head_file_and_only_commit_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        log.append_at("a", json!(1), TS).unwrap();
        log.append_at("b", json!(2), TS).unwrap();
        assert!(!head_path_of(&path).exists());
        assert_eq!(log.committed(), (0, GENESIS.to_string()));
        log.commit().unwrap();
        let (seq, hash) = log.head();
        assert_eq!(seq, 2);
        assert_eq!(log.committed(), (2, hash.clone()));
        assert_eq!(
            read_head(&RealFs, &head_path_of(&path)).ok().flatten(),
            Some((2, hash.clone()))
        );
        log.append_at("c", json!(3), TS).unwrap();
        assert_eq!(
            read_head(&RealFs, &head_path_of(&path)).ok().flatten(),
            Some((2, hash))
        );
        assert!(!with_suffix(&head_path_of(&path), ".tmp").exists());
    }

    #[test]
    fn reopen_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 5);
        let before = {
            let log = AuditLog::open(&path).unwrap();
            log.head()
        };
        assert_eq!(before.0, 5);
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), before);
        assert_eq!(log.append_at("x", json!({}), TS).unwrap(), 6);
        log.commit().unwrap();
        drop(log);
        let lines = read_lines(&path);
        assert_eq!(value(&lines[5])["prev"], json!(before.1));
        let report = verify(&path).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(report.entries, 6);
        // No quarantine file was made.
        let torn = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".torn-")
            })
            .count();
        assert_eq!(torn, 0);
    }

    fn quarantine_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".torn-"))
            .collect();
        v.sort();
        v
    }

    /// Append `torn` to a committed log of 4, reopen: the bytes are
    /// quarantined exactly, a `recovered` entry follows, verify is ok.
    fn check_torn_recovery(torn: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 4);
        let clean_len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(torn).unwrap();
        drop(f);
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 5);
        let q = quarantine_files(dir.path());
        assert_eq!(q.len(), 1);
        assert_eq!(std::fs::read(&q[0]).unwrap(), torn);
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 5);
        let rec = value(&lines[4]);
        assert_eq!(rec["kind"], json!("recovered"));
        assert_eq!(rec["data"]["quarantined_bytes"], json!(torn.len()));
        assert_eq!(rec["data"]["offset"], json!(clean_len));
        assert_eq!(
            rec["data"]["file"],
            json!(q[0].file_name().unwrap().to_string_lossy())
        );
        // Committed: the head file has the recovery.
        assert_eq!(
            read_head(&RealFs, &head_path_of(&path)).ok().flatten(),
            Some(log.head())
        );
        log.append_at("after", json!({}), TS).unwrap();
        log.commit().unwrap();
        drop(log);
        let report = verify(&path).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(report.entries, 6);
    }

    #[test]
    fn torn_partial_line_is_quarantined_and_the_chain_continues() {
        // The start of what would have been entry 5.
        let (line, _) = encode(5, TS, "model_loaded", &json!({"name": "m"}), GENESIS).unwrap();
        check_torn_recovery(&line[..line.len() / 2]);
    }

    #[test]
    fn torn_garbage_bytes_are_quarantined_and_the_chain_continues() {
        check_torn_recovery(b"\0\0\0\0\xff\xfe garbage\n{\"seq\":\n\0\0");
    }

    #[test]
    fn complete_entry_without_newline_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 2);
        let mut log = AuditLog::open(&path).unwrap();
        log.append_at("x", json!(1), TS).unwrap();
        drop(log);
        // Remove the last newline: the write never completed.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        let torn = bytes[bytes.iter().rposition(|&b| b == b'\n').unwrap() + 1..].to_vec();
        std::fs::write(&path, &bytes).unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 3);
        let q = quarantine_files(dir.path());
        assert_eq!(std::fs::read(&q[0]).unwrap(), torn);
        assert_eq!(value(&read_lines(&path)[2])["kind"], json!("recovered"));
        assert!(verify(&path).unwrap().ok());
    }

    #[test]
    fn verify_reports_an_unrecovered_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"ts").unwrap();
        drop(f);
        let report = verify(&path).unwrap();
        let p = only(&report);
        assert_eq!((p.kind, p.line), (ProblemKind::Malformed, 4));
        assert!(p.detail.contains("no trailing newline"), "{}", p.detail);
    }

    #[test]
    fn uncommitted_complete_entries_survive_reopen_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 3);
        let mut log = AuditLog::open(&path).unwrap();
        log.append_at("late", json!({"n": 4}), TS).unwrap();
        log.append_at("late", json!({"n": 5}), TS).unwrap();
        let head = log.head();
        // A crash: no commit.
        drop(log);
        assert_eq!(
            read_head(&RealFs, &head_path_of(&path))
                .ok()
                .flatten()
                .unwrap()
                .0,
            3
        );
        let report = verify(&path).unwrap();
        assert!(report.ok(), "{report}");
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), head);
        assert!(quarantine_files(dir.path()).is_empty());
        assert_eq!(log.append_at("x", json!(6), TS).unwrap(), 6);
        log.commit().unwrap();
        drop(log);
        let report = verify(&path).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(report.entries, 6);
    }

    #[test]
    fn uncommitted_entries_after_damage_are_cut_at_the_committed_chain() {
        // Entries 4 and 5 were written, never committed, and 4 did not
        // reach the disk whole (zeros): 5 cannot be kept either.
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 3);
        let clean = std::fs::read(&path).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        log.append_at("a", json!(4), TS).unwrap();
        log.append_at("b", json!(5), TS).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let lines = read_lines(&path);
        let l4 = lines[3].len();
        for b in &mut bytes[clean.len()..clean.len() + l4] {
            *b = 0;
        }
        std::fs::write(&path, &bytes).unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 4);
        let q = quarantine_files(dir.path());
        assert_eq!(std::fs::read(&q[0]).unwrap(), &bytes[clean.len()..]);
        drop(log);
        assert!(verify(&path).unwrap().ok());
    }

    #[test]
    fn uncommitted_entry_that_does_not_chain_is_cut() {
        // A complete, self-consistent entry after the committed one that
        // does not link to it is not kept, nor anything after it.
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 3);
        let clean = std::fs::read(&path).unwrap();
        let lines = read_lines(&path);
        let mut v = value(&lines[2]);
        v["seq"] = json!(4);
        v["prev"] = json!("e".repeat(64));
        let stray = reseal(v);
        let mut v = value(&stray);
        v["seq"] = json!(5);
        v["prev"] = value(&stray)["hash"].clone();
        let next = reseal(v);
        let tail = format!("{stray}\n{next}\n");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(tail.as_bytes()).unwrap();
        drop(f);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 4);
        let q = quarantine_files(dir.path());
        assert_eq!(std::fs::read(&q[0]).unwrap(), tail.as_bytes());
        assert_eq!(std::fs::read(&path).unwrap()[..clean.len()], clean[..]);
        drop(log);
        assert!(verify(&path).unwrap().ok());
    }

    #[test]
    fn small_all_torn_file_starts_a_fresh_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"\0\0\0\0partial{\"seq\":1").unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 1);
        let q = quarantine_files(dir.path());
        assert_eq!(std::fs::read(&q[0]).unwrap(), b"\0\0\0\0partial{\"seq\":1");
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        assert_eq!(value(&lines[0])["prev"], json!(GENESIS));
        drop(log);
        assert!(verify(&path).unwrap().ok());
    }

    #[test]
    fn large_file_without_a_valid_tail_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let garbage = "not an entry\n".repeat(10_000);
        std::fs::write(&path, &garbage).unwrap();
        match AuditLog::open(&path) {
            Err(AuditError::Corrupt { path: p, detail }) => {
                assert_eq!(p, path);
                assert!(detail.contains("no valid entry"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Nothing was changed.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), garbage);
        assert!(quarantine_files(dir.path()).is_empty());
        let msg = AuditLog::open(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn log_behind_its_head_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 6);
        let lines = read_lines(&path);
        write_lines(&path, &lines[..4]);
        match AuditLog::open(&path) {
            Err(AuditError::Corrupt { detail, .. }) => {
                assert!(detail.contains("ends at seq 4"), "{detail}");
                assert!(detail.contains("seq 6"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // The evidence is intact: verify still sees the truncation.
        let report = verify(&path).unwrap();
        assert_eq!(only(&report).kind, ProblemKind::Truncated);
        // An emptied log with a head file is refused too.
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { .. })
        ));
        // A head file that is not one is refused.
        write_lines(&path, &lines);
        std::fs::write(head_path_of(&path), b"{\"seq\":").unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { .. })
        ));
    }

    #[test]
    fn committed_entry_rewritten_in_the_tail_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 5);
        let mut lines = read_lines(&path);
        let mut v = value(&lines[4]);
        v["data"] = json!({"i": 99});
        lines[4] = reseal(v);
        write_lines(&path, &lines);
        match AuditLog::open(&path) {
            Err(AuditError::Corrupt { detail, .. }) => {
                assert!(detail.contains("seq 5"), "{detail}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn open_reads_only_the_tail_and_leaves_old_damage_to_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        let filler = "x".repeat(200);
        for i in 0..1000 {
            log.append_at("fill", json!({"i": i, "f": filler}), TS)
                .unwrap();
        }
        log.commit().unwrap();
        drop(log);
        // Damage line 10, far outside the tail window (> 64 KiB from the end).
        let mut lines = read_lines(&path);
        assert!(std::fs::metadata(&path).unwrap().len() > 3 * TAIL_WINDOW);
        lines[9] = "damaged beyond recognition".into();
        write_lines(&path, &lines);
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 1000);
        assert!(quarantine_files(dir.path()).is_empty());
        log.append_at("after", json!({}), TS).unwrap();
        log.commit().unwrap();
        drop(log);
        let report = verify(&path).unwrap();
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Malformed, 10, None));
        assert_eq!(read_lines(&path)[9], "damaged beyond recognition");
    }

    #[test]
    fn last_entry_longer_than_the_tail_window_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 2);
        let mut log = AuditLog::open(&path).unwrap();
        let big = "y".repeat(200 * 1024);
        log.append_at("big", json!({"blob": big}), TS).unwrap();
        log.commit().unwrap();
        let head = log.head();
        drop(log);
        // Plus a torn start of another big one.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(format!("{{\"seq\":4,\"data\":\"{}", "z".repeat(100 * 1024)).as_bytes())
            .unwrap();
        drop(f);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 4);
        assert_eq!(value(&read_lines(&path)[3])["prev"], json!(head.1));
        drop(log);
        assert!(verify(&path).unwrap().ok());
    }

    #[test]
    fn entry_over_the_limit_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 1);
        let mut log = AuditLog::open(&path).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let err = log
            .append_at("big", json!("x".repeat(MAX_ENTRY)), TS)
            .unwrap_err();
        assert!(matches!(err, AuditError::TooLarge { .. }), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(log.append_at("ok", json!(1), TS).unwrap(), 2);
    }

    #[test]
    fn a_second_writer_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Locked { .. })
        ));
        drop(log);
        assert!(AuditLog::open(&path).is_ok());
    }

    #[test]
    fn awkward_data_hashes_by_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        let data = json!({
            "floats": [0.1 + 0.2, 1e300, -0.0, 5e-324, 1.7976931348623157e308, 2.2250738585072014e-308],
            "ints": [u64::MAX, i64::MIN],
            "text": "line\nbreak \"quoted\" \u{1F600} \\ \u{0}",
            "nested": {"z": 1, "a": [null, true, {}]},
        });
        log.append_at("weird", data, TS).unwrap();
        log.append_at("next", json!(null), -1).unwrap();
        log.commit().unwrap();
        drop(log);
        assert_eq!(read_lines(&path).len(), 2);
        let report = verify(&path).unwrap();
        assert!(report.ok(), "{report}");
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 2);
        assert!(quarantine_files(dir.path()).is_empty());
    }

    // Tampering, each on a copy of a committed log of 20 entries.

    fn tamper(f: impl FnOnce(&mut Vec<String>)) -> (tempfile::TempDir, VerifyReport) {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 20);
        let copy = copy(&path, dir.path(), "tampered.log");
        let mut lines = read_lines(&copy);
        f(&mut lines);
        write_lines(&copy, &lines);
        let report = verify(&copy).unwrap();
        (dir, report)
    }

    #[test]
    fn verify_catches_an_edit_that_keeps_the_old_hash() {
        let (_d, report) = tamper(|l| {
            l[9] = forge_keep_hash(&l[9], |v| v["data"]["i"] = json!(1000));
        });
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Edited, 10, Some(10)));
        assert_eq!(report.to_string().lines().count(), 1);
        assert!(
            report.to_string().starts_with("line 10 (seq 10): edited: "),
            "{report}"
        );
    }

    #[test]
    fn verify_catches_an_edit_of_the_seq_field() {
        let (_d, report) = tamper(|l| {
            l[9] = forge_keep_hash(&l[9], |v| v["seq"] = json!(77));
        });
        let p = only(&report);
        assert_eq!((p.kind, p.line), (ProblemKind::Edited, 10));
    }

    #[test]
    fn verify_catches_an_edit_with_the_hash_recomputed() {
        let (_d, report) = tamper(|l| {
            let mut v = value(&l[9]);
            v["data"]["note"] = json!("nothing to see");
            l[9] = reseal(v);
        });
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Edited, 10, Some(10)));
        assert!(p.detail.contains("recomputed"), "{}", p.detail);
    }

    #[test]
    fn verify_catches_an_edit_of_the_first_entry_with_the_hash_recomputed() {
        let (_d, report) = tamper(|l| {
            let mut v = value(&l[0]);
            v["kind"] = json!("forged");
            l[0] = reseal(v);
        });
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Edited, 1, Some(1)));
    }

    #[test]
    fn verify_catches_an_edit_of_the_last_entry_by_the_head_file() {
        let (_d, report) = tamper(|l| {
            let mut v = value(&l[19]);
            v["data"] = json!("forged");
            l[19] = reseal(v);
        });
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Truncated, 20, Some(20))
        );
    }

    #[test]
    fn verify_catches_a_deleted_line() {
        let (_d, report) = tamper(|l| {
            l.remove(9);
        });
        let p = only(&report);
        // Line 10 now holds seq 11.
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Deleted, 10, Some(11))
        );
        assert!(p.detail.contains("seq 10 is missing"), "{}", p.detail);
    }

    #[test]
    fn verify_catches_deleted_lines_at_the_start() {
        let (_d, report) = tamper(|l| {
            l.drain(0..3);
        });
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Deleted, 1, Some(4)));
        assert!(p.detail.contains("1..=3"), "{}", p.detail);
    }

    #[test]
    fn verify_catches_an_inserted_forged_copy() {
        // A copy of entry 5 given seq 11 and other data, before the real 11.
        let (_d, report) = tamper(|l| {
            let forged = forge_keep_hash(&l[4], |v| {
                v["seq"] = json!(11);
                v["data"] = json!({"i": 11, "note": "forged"});
            });
            l.insert(10, forged);
        });
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Inserted, 11, Some(11))
        );
    }

    #[test]
    fn verify_catches_an_inserted_duplicate() {
        let (_d, report) = tamper(|l| {
            let dup = l[4].clone();
            l.insert(12, dup);
        });
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Inserted, 13, Some(5))
        );
    }

    #[test]
    fn verify_catches_a_duplicate_right_after_its_original() {
        let (_d, report) = tamper(|l| {
            let dup = l[6].clone();
            l.insert(7, dup);
        });
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Inserted, 8, Some(7)));
        assert!(p.detail.contains("duplicate of line 7"), "{}", p.detail);
    }

    #[test]
    fn verify_catches_a_well_forged_insertion() {
        // A forger who links to entry 10 and recomputes the hash, placed
        // before the real entry 11: the chain continues from the real one.
        let (_d, report) = tamper(|l| {
            let mut v = value(&l[10]);
            v["data"] = json!({"note": "forged"});
            let forged = reseal(v);
            l.insert(10, forged);
        });
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Inserted, 11, Some(11))
        );
    }

    #[test]
    fn verify_catches_swapped_lines() {
        let (_d, report) = tamper(|l| l.swap(9, 10));
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Reordered, 10, Some(11))
        );
        assert!(p.detail.contains("swapped"), "{}", p.detail);
    }

    #[test]
    fn verify_catches_an_edit_of_the_hash_field_alone() {
        let (_d, report) = tamper(|l| {
            let v = value(&l[9]);
            l[9] = l[9].replace(v["hash"].as_str().unwrap(), &"f".repeat(64));
        });
        // One problem: the next entry still links to the content's hash.
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Edited, 10, Some(10)));
    }

    #[test]
    fn verify_catches_swapped_first_lines() {
        let (_d, report) = tamper(|l| l.swap(0, 1));
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Reordered, 1, Some(2))
        );
    }

    #[test]
    fn verify_catches_a_line_moved_later() {
        // Seq 5 moved after seq 8.
        let (_d, report) = tamper(|l| {
            let moved = l.remove(4);
            l.insert(7, moved);
        });
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Reordered, 8, Some(5))
        );
    }

    #[test]
    fn verify_catches_a_line_moved_earlier() {
        // Seq 9 moved before seq 5.
        let (_d, report) = tamper(|l| {
            let moved = l.remove(8);
            l.insert(4, moved);
        });
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Reordered, 5, Some(9))
        );
    }

    #[test]
    fn verify_catches_truncation_by_the_head_file() {
        let (_d, report) = tamper(|l| l.truncate(17));
        let p = only(&report);
        assert_eq!(
            (p.kind, p.line, p.seq),
            (ProblemKind::Truncated, 18, Some(20))
        );
        assert!(p.detail.contains("3 entries missing"), "{}", p.detail);
    }

    #[test]
    fn verify_catches_a_broken_first_link() {
        let (_d, report) = tamper(|l| {
            let mut v = value(&l[0]);
            v["prev"] = json!("1".repeat(64));
            l[0] = reseal(v);
        });
        // Entry 1 fits nothing; entry 2 still links to its hash.
        assert!(!report.ok());
        let p = &report.problems[0];
        assert_eq!((p.kind, p.line), (ProblemKind::BrokenLink, 1));
    }

    #[test]
    fn verify_reports_a_malformed_line_once() {
        let (_d, report) = tamper(|l| l[6] = "{\"seq\":7,\"oops\"".into());
        let p = only(&report);
        assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Malformed, 7, None));
    }

    #[test]
    fn verify_lists_every_problem_and_resynchronizes() {
        let (_d, report) = tamper(|l| {
            l[2] = forge_keep_hash(&l[2], |v| v["data"] = json!("x")); // line 3 edited
            l.remove(7); // seq 8 deleted: line 8 holds seq 9
            l.swap(12, 13); // lines 13, 14 hold seqs 15, 14
            l.push("garbage".into()); // line 20
        });
        let got: Vec<(ProblemKind, usize)> =
            report.problems.iter().map(|p| (p.kind, p.line)).collect();
        assert_eq!(
            got,
            vec![
                (ProblemKind::Edited, 3),
                (ProblemKind::Deleted, 8),
                (ProblemKind::Reordered, 13),
                (ProblemKind::Malformed, 20),
            ],
            "{report}"
        );
        let text = report.to_string();
        assert_eq!(text.lines().count(), 4);
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .starts_with("line 8 (seq 9): deleted: "),
            "{text}"
        );
        assert!(
            text.lines()
                .nth(3)
                .unwrap()
                .starts_with("line 20: malformed: "),
            "{text}"
        );
    }

    #[test]
    fn report_display_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), 20);
        let report = verify(&path).unwrap();
        let (seq, hash) = report.head.clone().unwrap();
        assert_eq!(seq, 20);
        assert_eq!(
            report.to_string(),
            format!("ok: 20 entries, head seq 20 sha256 {}…", &hash[..12])
        );
    }

    #[test]
    fn verify_of_a_missing_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            verify(&dir.path().join("nope.log")),
            Err(AuditError::Io { .. })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Commit,
        Reopen,
        Tear(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..5).prop_map(Op::Append),
            2 => Just(Op::Commit),
            2 => Just(Op::Reopen),
            1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Op::Tear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// After any sequence of appends, commits, reopens and torn writes
        /// (each followed by a reopen), verify is ok and the seqs run 1..=N.
        #[test]
        fn any_history_verifies_with_contiguous_seqs(ops in proptest::collection::vec(op(), 1..25)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            let mut log = Some(AuditLog::open(&path).unwrap());
            let mut n = 0u64;
            for op in ops {
                match op {
                    Op::Append(k) => {
                        let l = log.as_mut().unwrap();
                        for j in 0..k {
                            n += 1;
                            prop_assert_eq!(l.append("p", json!({"j": j, "x": 0.1 * f64::from(j)})).unwrap(), n);
                        }
                    }
                    Op::Commit => log.as_mut().unwrap().commit().unwrap(),
                    Op::Reopen => {
                        drop(log.take());
                        log = Some(AuditLog::open(&path).unwrap());
                        prop_assert_eq!(log.as_ref().unwrap().head().0, n);
                    }
                    Op::Tear(bytes) => {
                        drop(log.take());
                        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                        f.write_all(&bytes).unwrap();
                        drop(f);
                        log = Some(AuditLog::open(&path).unwrap());
                        // The garbage is cut and a recovery entry appended,
                        // unless the bytes happened to end a valid line.
                        let head = log.as_ref().unwrap().head().0;
                        prop_assert!(head == n + 1, "head {} after {} entries", head, n);
                        n = head;
                    }
                }
                let report = verify(&path).unwrap();
                prop_assert!(report.ok(), "{}", report);
                let seqs: Vec<u64> = read_lines(&path)
                    .iter()
                    .map(|l| value(l)["seq"].as_u64().unwrap())
                    .collect();
                prop_assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
            }
        }
    }
}
