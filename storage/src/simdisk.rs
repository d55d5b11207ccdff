//! A simulated disk for crash-recovery tests: an in-memory [`Fs`] that
//! keeps, besides what a running process sees, what would be left on the
//! disk after a power cut, and can cut the power at any operation.
//!
//! What survives [`SimDisk::power_loss`]:
//!
//! - Of each file, the data and length at its last [`FsFile::sync_data`] or
//!   [`FsFile::sync_all`]. Everything written, cut or extended since is
//!   dropped, except that the last write since that sync may be torn: with
//!   even odds a random prefix of it (from nothing to all of it) lands on
//!   the synced data, at its offset (leaving zeros before it when the file
//!   was shorter).
//! - Of the names (new files, renames, removals, new directories), those
//!   synced by a [`Fs::sync_dir`] of a directory they touch (with the
//!   earlier operations on the same names), and a random prefix, in order,
//!   of the rest (a journaling file system commits its metadata in order;
//!   it may or may not have committed lately). Only the directory's own
//!   names are synced: a new directory is durable once its parent is
//!   synced, and what is in a directory that is gone is gone, as POSIX
//!   promises (ext4 happens to commit every earlier name too; other file
//!   systems do not). A file whose name is gone is gone.
//! - A failed sync ([`SimDisk::fail_syncs`]) loses what it was to make
//!   durable, as Linux does: the pages stay readable (to this process and
//!   any other) until the power goes, but they are clean, so a later
//!   successful sync only makes durable what was written after the
//!   failure (the same bytes written again included).
//!
//! [`SimDisk::cut_power_after`] plans the cut: after that many more
//! mutating operations (a write, a cut, a sync, a create, a rename, a
//! removal, a directory made or synced) every operation fails with `EIO`, as
//! if the process had died there; [`SimDisk::power_loss`] then brings the
//! disk back as it would be found at the next boot. Handles opened before
//! fail from then on.
//!
//! Paths are plain keys (absolute paths such as `/state/outbox` by
//! convention); only `/` exists at first. Deterministic: every choice comes
//! from the seed given to [`SimDisk::new`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::fs::{Fs, FsFile, OpenMode};

/// `EIO` on Linux.
const EIO: i32 = 5;

/// A simulated disk; clones share it.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// What happened on a [`SimDisk`], for tests that check they exercised
/// what they meant to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Mutating operations done.
    pub ops: u64,
    /// File syncs that succeeded.
    pub syncs: u64,
    /// Directory syncs.
    pub dir_syncs: u64,
    /// Power cuts recovered from.
    pub power_losses: u64,
    /// Writes torn at a power cut (a prefix kept, possibly all of it).
    pub torn: u64,
    /// Name operations kept by a power cut without a directory sync.
    pub names_kept_unsynced: u64,
    /// Name operations dropped by a power cut.
    pub names_dropped: u64,
    /// Syncs failed on purpose ([`SimDisk::fail_syncs`]).
    pub failed_syncs: u64,
}

#[derive(Debug, Default)]
struct Inode {
    /// What a process reads.
    data: Vec<u8>,
    /// What a power cut leaves.
    durable: Vec<u8>,
    /// The last write since the last sync: (offset, bytes).
    last_write: Option<(u64, Vec<u8>)>,
    /// A sync failed since the last good one: only the ranges written
    /// since (`dirty`) reach the disk at the next.
    lost: bool,
    /// Ranges written since a failed sync.
    dirty: Vec<(usize, usize)>,
}

#[derive(Debug, Clone)]
enum NameOp {
    Link {
        path: PathBuf,
        ino: u64,
    },
    Unlink {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
        ino: u64,
    },
    MkDir {
        path: PathBuf,
    },
}

impl NameOp {
    /// The names it changes.
    fn names(&self) -> [Option<&PathBuf>; 2] {
        match self {
            NameOp::Link { path, .. } | NameOp::Unlink { path } | NameOp::MkDir { path } => {
                [Some(path), None]
            }
            NameOp::Rename { from, to, .. } => [Some(from), Some(to)],
        }
    }

    /// Whether it changes a name `other` changes too.
    fn overlaps(&self, other: &NameOp) -> bool {
        let theirs = other.names();
        self.names()
            .iter()
            .flatten()
            .any(|n| theirs.iter().flatten().any(|m| m == n))
    }

    fn touches(&self, dir: &Path) -> bool {
        let parent = |p: &PathBuf| p.parent() == Some(dir);
        match self {
            NameOp::Link { path, .. } | NameOp::Unlink { path } | NameOp::MkDir { path } => {
                parent(path)
            }
            NameOp::Rename { from, to, .. } => parent(from) || parent(to),
        }
    }
}

#[derive(Debug)]
struct State {
    rng: SmallRng,
    generation: u64,
    next_ino: u64,
    inodes: HashMap<u64, Inode>,
    files: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    durable_files: BTreeMap<PathBuf, u64>,
    durable_dirs: BTreeSet<PathBuf>,
    /// Name operations not yet made durable, in order.
    pending: Vec<NameOp>,
    /// Mutating operations left before the power goes.
    ops_left: Option<u64>,
    /// The power is off until [`SimDisk::power_loss`].
    dead: bool,
    /// Syncs still to fail.
    failing_syncs: u64,
    stats: SimStats,
}

fn eio(what: &str) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(EIO).kind(),
        format!("simulated disk: {what}"),
    )
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("simulated disk: {} not found", path.display()),
    )
}

impl State {
    fn alive(&self) -> io::Result<()> {
        if self.dead {
            return Err(eio("the power is off"));
        }
        Ok(())
    }

    /// Count a mutating operation; the one the power cut was planned at
    /// does not happen.
    fn tick(&mut self) -> io::Result<()> {
        self.alive()?;
        if let Some(n) = self.ops_left {
            if n == 0 {
                self.dead = true;
                return Err(eio("the power is off"));
            }
            self.ops_left = Some(n - 1);
        }
        self.stats.ops += 1;
        Ok(())
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(p) if self.dirs.contains(p) => Ok(()),
            _ => Err(not_found(path)),
        }
    }

    fn inode(&mut self, ino: u64) -> &mut Inode {
        self.inodes.entry(ino).or_default()
    }

    fn write_at(&mut self, ino: u64, off: u64, buf: &[u8]) {
        let inode = self.inode(ino);
        splice(&mut inode.data, off, buf);
        inode.last_write = Some((off, buf.to_vec()));
        if inode.lost {
            inode.dirty.push((off as usize, off as usize + buf.len()));
        }
    }

    fn sync(&mut self, ino: u64) -> io::Result<()> {
        self.tick()?;
        let failing = self.failing_syncs > 0;
        if failing {
            self.failing_syncs -= 1;
            self.stats.failed_syncs += 1;
        } else {
            self.stats.syncs += 1;
        }
        let inode = self.inodes.entry(ino).or_default();
        if failing {
            inode.lost = true;
            inode.dirty.clear();
            inode.last_write = None;
            return Err(eio("sync failed (planned)"));
        }
        if inode.lost {
            let mut durable = std::mem::take(&mut inode.durable);
            durable.resize(inode.data.len(), 0);
            for (from, to) in inode.dirty.drain(..) {
                let to = to.min(inode.data.len());
                if from < to {
                    durable[from..to].copy_from_slice(&inode.data[from..to]);
                }
            }
            inode.durable = durable;
            inode.lost = false;
        } else {
            inode.durable = inode.data.clone();
        }
        inode.last_write = None;
        Ok(())
    }

    fn apply(&mut self, op: &NameOp) {
        match op {
            NameOp::Link { path, ino } => {
                self.durable_files.insert(path.clone(), *ino);
            }
            NameOp::Unlink { path } => {
                self.durable_files.remove(path);
            }
            NameOp::Rename { from, to, ino } => {
                self.durable_files.remove(from);
                self.durable_files.insert(to.clone(), *ino);
            }
            NameOp::MkDir { path } => {
                self.durable_dirs.insert(path.clone());
            }
        }
    }
}

/// Write `buf` into `data` at `off`, zero-filling any gap.
fn splice(data: &mut Vec<u8>, off: u64, buf: &[u8]) {
    let off = off as usize;
    if data.len() < off + buf.len() {
        data.resize(off + buf.len(), 0);
    }
    data[off..off + buf.len()].copy_from_slice(buf);
}

impl SimDisk {
    /// An empty disk (only `/`), its choices drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        let root = PathBuf::from("/");
        Self {
            state: Arc::new(Mutex::new(State {
                rng: SmallRng::seed_from_u64(seed),
                generation: 0,
                next_ino: 1,
                inodes: HashMap::new(),
                files: BTreeMap::new(),
                dirs: [root.clone()].into(),
                durable_files: BTreeMap::new(),
                durable_dirs: [root].into(),
                pending: Vec::new(),
                ops_left: None,
                dead: false,
                failing_syncs: 0,
                stats: SimStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding it has failed already.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cut the power after `ops` more mutating operations (0: at the next).
    pub fn cut_power_after(&self, ops: u64) {
        self.lock().ops_left = Some(ops);
    }

    /// Cancel a planned cut that has not happened yet.
    pub fn keep_power(&self) {
        self.lock().ops_left = None;
    }

    /// Whether the power is off (a planned cut happened).
    pub fn is_off(&self) -> bool {
        self.lock().dead
    }

    /// Make the next `n` file syncs fail with `EIO`, losing what they were
    /// to make durable.
    pub fn fail_syncs(&self, n: u64) {
        self.lock().failing_syncs = n;
    }

    /// What happened so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Lose the power now (if a planned cut has not already) and bring the
    /// disk back as the next boot finds it (see the module documentation).
    /// Every handle open before fails from now on.
    pub fn power_loss(&self) {
        let mut s = self.lock();
        let s = &mut *s;
        let keep = s.rng.random_range(0..=s.pending.len());
        let pending = std::mem::take(&mut s.pending);
        for op in &pending[..keep] {
            s.apply(op);
        }
        s.stats.names_kept_unsynced += keep as u64;
        s.stats.names_dropped += (pending.len() - keep) as u64;
        // What is in a directory that is gone is gone.
        let dirs = s.durable_dirs.clone();
        let reachable = |p: &Path| p.ancestors().skip(1).all(|a| dirs.contains(a));
        s.durable_dirs
            .retain(|d| d.parent().is_none() || reachable(d));
        let dirs = s.durable_dirs.clone();
        s.durable_files
            .retain(|p, _| p.ancestors().skip(1).all(|a| dirs.contains(a)));
        s.files = s.durable_files.clone();
        s.dirs = s.durable_dirs.clone();
        let live: BTreeSet<u64> = s.files.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        let mut inos: Vec<u64> = s.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let tear = s.rng.random_bool(0.5);
            let cut = s.rng.random::<u64>();
            let inode = s.inodes.entry(ino).or_default();
            let mut data = std::mem::take(&mut inode.durable);
            if let Some((off, w)) = inode.last_write.take()
                && tear
            {
                let n = (cut % (w.len() as u64 + 1)) as usize;
                splice(&mut data, off, &w[..n]);
                s.stats.torn += 1;
            }
            inode.data = data.clone();
            inode.durable = data;
            inode.lost = false;
            inode.dirty.clear();
        }
        s.generation += 1;
        s.dead = false;
        s.ops_left = None;
        s.failing_syncs = 0;
        s.stats.power_losses += 1;
    }

    /// The paths of the files under `dir` (at any depth), sorted.
    pub fn files_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.lock()
            .files
            .keys()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect()
    }
}

/// An open file of a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    disk: SimDisk,
    ino: u64,
    generation: u64,
    append: bool,
    write: bool,
    pos: u64,
}

impl SimFile {
    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.disk.lock();
        s.alive()?;
        if s.generation != self.generation {
            return Err(eio("handle opened before a power cut"));
        }
        Ok(s)
    }

    fn writable(&self) -> io::Result<()> {
        if self.write {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "simulated disk: not opened for writing",
            ))
        }
    }
}

impl FsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.state()?;
        let data = &s.inode(self.ino).data;
        let from = usize::try_from(offset).map_err(io::Error::other)?;
        match data.get(from..from + buf.len()) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "simulated disk: read past the end",
            )),
        }
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        if self.append {
            return Err(io::Error::other(
                "simulated disk: positioned write on an append handle",
            ));
        }
        let mut s = self.state()?;
        s.tick()?;
        s.write_at(self.ino, offset, buf);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writable()?;
        let append = self.append;
        let ino = self.ino;
        let mut s = self.state()?;
        s.tick()?;
        let off = if append {
            s.inode(ino).data.len() as u64
        } else {
            self.pos
        };
        s.write_at(ino, off, buf);
        drop(s);
        self.pos = off + buf.len() as u64;
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.state()?.sync(self.ino)
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.state()?.sync(self.ino)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.writable()?;
        let mut s = self.state()?;
        s.tick()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        s.inode(self.ino).data.resize(len, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut s = self.state()?;
        Ok(s.inode(self.ino).data.len() as u64)
    }

    fn try_lock(&self) -> io::Result<bool> {
        self.state().map(|_| true)
    }
}

impl Fs for SimDisk {
    type File = SimFile;

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<SimFile> {
        let mut s = self.lock();
        s.alive()?;
        let existing = s.files.get(path).copied();
        let ino = match (mode, existing) {
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("simulated disk: {} exists", path.display()),
                ));
            }
            (OpenMode::Truncate, Some(ino)) => {
                s.tick()?;
                s.inode(ino).data.clear();
                ino
            }
            (_, Some(ino)) => ino,
            (OpenMode::Read | OpenMode::ReadWrite | OpenMode::Append, None) => {
                return Err(not_found(path));
            }
            (OpenMode::AppendCreate | OpenMode::Truncate | OpenMode::CreateNew, None) => {
                s.parent_exists(path)?;
                if s.dirs.contains(path) {
                    return Err(io::Error::other("simulated disk: a directory"));
                }
                s.tick()?;
                let ino = s.next_ino;
                s.next_ino += 1;
                s.inodes.insert(ino, Inode::default());
                s.files.insert(path.to_path_buf(), ino);
                s.pending.push(NameOp::Link {
                    path: path.to_path_buf(),
                    ino,
                });
                ino
            }
        };
        let generation = s.generation;
        Ok(SimFile {
            disk: self.clone(),
            ino,
            generation,
            append: matches!(mode, OpenMode::Append | OpenMode::AppendCreate),
            write: mode != OpenMode::Read,
            pos: 0,
        })
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive()?;
        let mut missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !s.dirs.contains(*d))
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        for d in missing {
            if s.files.contains_key(&d) {
                return Err(io::Error::other(format!(
                    "simulated disk: {} is a file",
                    d.display()
                )));
            }
            s.tick()?;
            s.dirs.insert(d.clone());
            s.pending.push(NameOp::MkDir { path: d });
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let s = self.lock();
        s.files.contains_key(path) || s.dirs.contains(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>> {
        let s = self.lock();
        s.alive()?;
        if !s.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut out: Vec<(String, u64)> = s
            .files
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, ino)| {
                let len = s.inodes.get(ino).map(|i| i.data.len()).unwrap_or(0);
                (name(p), len as u64)
            })
            .collect();
        out.extend(
            s.dirs
                .iter()
                .filter(|p| p.parent() == Some(dir))
                .map(|p| (name(p), 0)),
        );
        Ok(out)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive()?;
        let ino = s.files.get(from).copied().ok_or_else(|| not_found(from))?;
        s.parent_exists(to)?;
        s.tick()?;
        s.files.remove(from);
        s.files.insert(to.to_path_buf(), ino);
        s.pending.push(NameOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            ino,
        });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive()?;
        if !s.files.contains_key(path) {
            return Err(not_found(path));
        }
        s.tick()?;
        s.files.remove(path);
        s.pending.push(NameOp::Unlink {
            path: path.to_path_buf(),
        });
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive()?;
        if !s.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        s.tick()?;
        // The operations on this directory's names become durable, with
        // the earlier operations on the same names (a rename needs the
        // name it renames); the others stay pending, in order.
        let ops = std::mem::take(&mut s.pending);
        let mut synced: Vec<bool> = ops.iter().map(|op| op.touches(dir)).collect();
        for i in (0..ops.len()).rev() {
            if synced[i] {
                for j in 0..i {
                    if ops[j].overlaps(&ops[i]) {
                        synced[j] = true;
                    }
                }
            }
        }
        for (op, synced) in ops.into_iter().zip(synced) {
            if synced {
                s.apply(&op);
            } else {
                s.pending.push(op);
            }
        }
        s.stats.dir_syncs += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn disk() -> SimDisk {
        let d = SimDisk::new(7);
        d.create_dir_all(&p("/d")).unwrap();
        d.sync_dir(&p("/")).unwrap();
        d
    }

    #[test]
    fn unsynced_data_and_names_are_lost_synced_ones_kept() {
        for seed in 0..200 {
            let d = SimDisk::new(seed);
            d.create_dir_all(&p("/d")).unwrap();
            d.sync_dir(&p("/")).unwrap();
            let mut f = d.open(&p("/d/a"), OpenMode::Truncate).unwrap();
            f.write_all(b"synced").unwrap();
            f.sync_data().unwrap();
            d.sync_dir(&p("/d")).unwrap();
            f.write_all(b"+lost").unwrap();
            let mut g = d.open(&p("/d/b"), OpenMode::Truncate).unwrap();
            g.write_all(b"file synced, name not").unwrap();
            g.sync_all().unwrap();
            d.power_loss();
            let a = d.read(&p("/d/a")).unwrap();
            assert!(a.starts_with(b"synced"), "{seed}");
            assert!(
                b"synced+lost".starts_with(&a),
                "{seed}: a torn prefix at most"
            );
            if let Ok(b) = d.read(&p("/d/b")) {
                assert_eq!(b, b"file synced, name not", "{seed}");
            }
            assert!(f.len().is_err(), "old handles are dead");
        }
    }

    #[test]
    fn every_outcome_happens_and_the_same_seed_repeats_it() {
        let run = |seed| {
            let d = SimDisk::new(seed);
            d.create_dir_all(&p("/d")).unwrap();
            d.sync_dir(&p("/")).unwrap();
            let mut f = d.open(&p("/d/a"), OpenMode::Truncate).unwrap();
            f.write_all(b"xxxx").unwrap();
            d.power_loss();
            (d.exists(&p("/d/a")), d.read(&p("/d/a")).unwrap_or_default())
        };
        let outcomes: BTreeSet<_> = (0..100).map(run).collect();
        assert!(outcomes.contains(&(false, vec![])));
        assert!(outcomes.contains(&(true, vec![])));
        assert!(outcomes.contains(&(true, b"xxxx".to_vec())));
        assert!(outcomes.iter().any(|(_, d)| d.len() == 2));
        for seed in 0..20 {
            assert_eq!(run(seed), run(seed));
        }
    }

    #[test]
    fn a_planned_cut_stops_every_operation_until_power_loss() {
        let d = disk();
        d.cut_power_after(1);
        let mut f = d.open(&p("/d/a"), OpenMode::Truncate).unwrap();
        assert!(f.write_all(b"x").is_err());
        assert!(d.is_off());
        assert!(d.sync_dir(&p("/d")).is_err());
        d.power_loss();
        assert!(!d.is_off());
        assert!(!d.exists(&p("/d/a")) || d.read(&p("/d/a")).unwrap().is_empty());
        d.open(&p("/d/a"), OpenMode::Truncate).unwrap();
    }

    #[test]
    fn a_failed_sync_loses_its_data_even_after_a_good_one() {
        let d = disk();
        let mut f = d.open(&p("/d/a"), OpenMode::Truncate).unwrap();
        f.write_all(b"aaaa").unwrap();
        f.sync_all().unwrap();
        d.sync_dir(&p("/d")).unwrap();
        f.write_all(b"bbbb").unwrap();
        d.fail_syncs(1);
        assert!(f.sync_data().is_err());
        f.write_all(b"cc").unwrap();
        f.sync_data().unwrap();
        assert_eq!(d.read(&p("/d/a")).unwrap(), b"aaaabbbbcc", "still readable");
        d.power_loss();
        assert_eq!(d.read(&p("/d/a")).unwrap(), b"aaaa\0\0\0\0cc");
        // Written again after the failure, the same bytes reach the disk.
        let mut f = d.open(&p("/d/a"), OpenMode::ReadWrite).unwrap();
        f.write_all(b"bbbb").unwrap();
        d.fail_syncs(1);
        assert!(f.sync_data().is_err());
        f.write_all_at(b"bbbb", 0).unwrap();
        f.sync_data().unwrap();
        d.power_loss();
        assert_eq!(d.read(&p("/d/a")).unwrap(), b"bbbb\0\0\0\0cc");
    }

    #[test]
    fn a_directory_sync_makes_its_names_durable_and_a_new_directory_needs_its_parent_synced() {
        // The file is synced into /d/q, but /d and /d/q were never synced
        // into their parents: it survives only where the power cut kept
        // both directories.
        let mut outcomes = BTreeSet::new();
        for seed in 0..50 {
            let d = SimDisk::new(seed);
            d.create_dir_all(&p("/d/q")).unwrap();
            let mut f = d.open(&p("/d/q/x"), OpenMode::Truncate).unwrap();
            f.sync_all().unwrap();
            d.sync_dir(&p("/d/q")).unwrap();
            d.power_loss();
            let kept = d.exists(&p("/d/q/x"));
            assert_eq!(kept, d.exists(&p("/d/q")), "{seed}");
            assert!(!kept || d.exists(&p("/d")), "{seed}");
            outcomes.insert(kept);
        }
        assert_eq!(outcomes.len(), 2);
        let d = disk();
        d.create_dir_all(&p("/d/q")).unwrap();
        d.sync_dir(&p("/d")).unwrap();
        let mut f = d.open(&p("/d/q/x"), OpenMode::Truncate).unwrap();
        f.sync_all().unwrap();
        d.rename(&p("/d/q/x"), &p("/d/y")).unwrap();
        d.sync_dir(&p("/d")).unwrap();
        d.power_loss();
        assert!(d.exists(&p("/d/y")));
        assert!(!d.exists(&p("/d/q/x")));
        assert_eq!(d.files_under(&p("/d")), vec![p("/d/y")]);
    }
}
