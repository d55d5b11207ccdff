//! The file-system operations the stores perform, behind a trait: the seam
//! where tests put a simulated disk (`simdisk`, which loses what was not
//! synced at a simulated power cut) or a file that fails on cue.
//!
//! [`RealFs`] is the real file system: a zero-sized type whose methods call
//! `std::fs` and [`File`] directly. The stores are generic over an [`Fs`]
//! with [`RealFs`] as the default, so the real path costs nothing more than
//! the calls themselves.
//!
//! What a store may rely on (and what the simulated disk enforces):
//!
//! - Data written to a file is durable only after [`FsFile::sync_data`] or
//!   [`FsFile::sync_all`] on it (both make its data and length durable).
//! - A new file, a rename, a removal and a new directory are durable only
//!   after [`Fs::sync_dir`] of the directory holding the name (for a
//!   rename, of either directory). Until then a power cut may keep or undo
//!   each of them (in the order they were made).
//! - A file's data is durable independently of its name: a synced file whose
//!   name was not synced is gone after a power cut; a synced name whose file
//!   was not synced comes back with what was synced of it (possibly empty).

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How [`Fs::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read an existing file.
    Read,
    /// Read and write an existing file at offsets.
    ReadWrite,
    /// Append to an existing file: [`FsFile::write_all`] writes at its end.
    Append,
    /// Read, and append at its end; created (empty) when missing.
    AppendCreate,
    /// Write from the start, created when missing, emptied when present.
    Truncate,
    /// Write from the start a file that must not exist yet
    /// ([`io::ErrorKind::AlreadyExists`] otherwise).
    CreateNew,
}

/// An open file.
pub trait FsFile: Debug + Send {
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset` (not on an append handle).
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at the end (append handles) or after what this
    /// handle wrote before. On an error, part of it may have been written.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Make the data and length durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Make the data and all metadata durable (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
    /// Cut (or extend with zeros) the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Take an exclusive advisory lock without waiting: `Ok(false)` when
    /// another holder has it.
    fn try_lock(&self) -> io::Result<bool>;
}

/// A file system: names, directories, and files opened by name.
pub trait Fs: Debug + Clone + Send + Sync + 'static {
    /// Its open files.
    type File: FsFile;
    /// Open `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Self::File>;
    /// Create `dir` and its missing parents (not yet durable: see
    /// [`crate::fsutil::create_dir_all_in`]).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Whether `path` names a file or a directory.
    fn exists(&self, path: &Path) -> bool;
    /// The names in `dir` (files and directories, in no particular order)
    /// with each file's length (0 for a directory).
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>>;
    /// Rename `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Remove the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Make the names in `dir` durable (new, renamed, removed).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Set the permission bits of `path` (`0o600` for a private file);
    /// nothing on a file system without them.
    fn set_mode(&self, _path: &Path, _mode: u32) -> io::Result<()> {
        Ok(())
    }

    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let mut buf = vec![0u8; usize::try_from(f.len()?).map_err(io::Error::other)?];
        f.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Replace (or create) `path` with `bytes`, not synced.
    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.open(path, OpenMode::Truncate)?.write_all(bytes)
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RealFs;

impl FsFile for File {
    #[inline]
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    #[inline]
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }

    #[inline]
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    #[inline]
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }

    #[inline]
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    #[inline]
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    #[inline]
    fn try_lock(&self) -> io::Result<bool> {
        match File::try_lock(self) {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

impl Fs for RealFs {
    type File = File;

    #[inline]
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<File> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::Append => o.append(true),
            OpenMode::AppendCreate => o.read(true).append(true).create(true),
            OpenMode::Truncate => o.write(true).create(true).truncate(true),
            OpenMode::CreateNew => o.write(true).create_new(true),
        };
        o.open(path)
    }

    #[inline]
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    #[inline]
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let len = entry.metadata()?.len();
            out.push((entry.file_name().to_string_lossy().into_owned(), len));
        }
        Ok(out)
    }

    #[inline]
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    #[inline]
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    #[inline]
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn set_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    #[inline]
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    #[inline]
    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        std::fs::write(path, bytes)
    }
}
