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
