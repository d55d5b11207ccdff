//! Durable file replacement, shared by every file Outpost rewrites in place
//! (outbox bookkeeping, audit head, privacy budget, model registry,
//! manifests and signatures).

use std::path::{Path, PathBuf};

use crate::fs::{Fs, FsFile, OpenMode, RealFs};

/// Sync a directory, so that a rename or a new file in it survives a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    RealFs.sync_dir(dir)
}

/// Replace `path` with `bytes` whole or not at all: written beside it
/// (`<path>.tmp`), synced, renamed over it, and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_in(&RealFs, path, bytes)
}

fn statvfs(path: &Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
    // zeroed out-parameter that statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st)
}

/// The size in bytes of the file system holding `path` (its nearest
/// existing ancestor), if `statvfs` can tell.
// The statvfs fields are 32 bits wide on some 32-bit targets.
#[allow(clippy::unnecessary_cast)]
pub fn fs_size(path: &Path) -> Option<u64> {
    let st = statvfs(path)?;
    Some((st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}

/// The bytes an unprivileged writer can still use on the file system
/// holding `path` (its nearest existing ancestor), if `statvfs` can tell.
#[allow(clippy::unnecessary_cast)]
pub fn fs_free(path: &Path) -> Option<u64> {
    let st = statvfs(path)?;
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The segment size for a store in `dir`: `configured`, but at most a
/// sixteenth of the file system it lives on (never under `min`). A store
/// frees space by deleting whole sealed segments, which needs no write; on
/// a disk that a single segment could fill, the delivered records would sit
/// in the segment being written, and a full disk has no room left for the
/// writes that would seal it.
pub fn fit_segment(configured: u64, dir: &Path, min: u64) -> u64 {
    match fs_size(dir) {
        Some(size) if size > 0 => configured.min((size / 16).max(min)),
        _ => configured,
    }
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// [`write_atomic`] on the file system `fs`.
pub fn write_atomic_in<F: Fs>(fs: &F, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs.open(&tmp, OpenMode::Truncate)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs.rename(&tmp, path)?;
    fs.sync_dir(parent_of(path))
}

/// Create `dir` and its missing parents durably: each directory created is
/// synced into its parent, so a power cut cannot take away a directory that
/// files were then written and synced into.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    create_dir_all_in(&RealFs, dir)
}

/// [`create_dir_all`] on the file system `fs`.
pub fn create_dir_all_in<F: Fs>(fs: &F, dir: &Path) -> std::io::Result<()> {
    if fs.exists(dir) {
        return Ok(());
    }
    // The missing directories, outermost last.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !fs.exists(d))
        .collect();
    fs.create_dir_all(dir)?;
    for d in missing.iter().rev() {
        fs.sync_dir(parent_of(d))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_segment_fits_its_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let size = super::fs_size(&dir.path().join("not/yet")).expect("statvfs of /tmp");
        assert!(size > 0);
        assert_eq!(super::fit_segment(4096, dir.path(), 4096), 4096);
        assert_eq!(
            super::fit_segment(u64::MAX, dir.path(), 4096),
            (size / 16).max(4096)
        );
    }

    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        assert!(write_atomic(&dir.path().join("missing/x"), b"").is_err());
    }
}
