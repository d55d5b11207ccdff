//! The file operations the segment log performs on the segment it appends
//! to, behind a trait: the seam where tests inject faults (a write that
//! fails part-way, an fsync that fails). [`File`] is the real one; the
//! outbox is generic over it with [`File`] as the default, so the real path
//! costs nothing more than the calls themselves.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// A segment opened for appending.
pub trait SegmentFile: std::fmt::Debug + Send + Sized {
    /// Open the existing file `path` for appending.
    fn open_append(path: &Path) -> std::io::Result<Self>;
    /// Append all of `buf`. On an error, part of it may have been written.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()>;
    /// Make the data written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> std::io::Result<()>;
    /// Cut the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
}

impl SegmentFile for File {
    #[inline]
    fn open_append(path: &Path) -> std::io::Result<Self> {
        OpenOptions::new().append(true).open(path)
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        Write::write_all(self, buf)
    }

    #[inline]
    fn sync_data(&mut self) -> std::io::Result<()> {
        File::sync_data(self)
    }

    #[inline]
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }
}

/// A test double: the real file, with faults planned by the test.
#[cfg(test)]
pub(crate) mod faulty {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    /// `ENOSPC`, `EIO` and `EFBIG` on Linux.
    pub(crate) const ENOSPC: i32 = 28;
    pub(crate) const EIO: i32 = 5;
    pub(crate) const EFBIG: i32 = 27;

    /// The faults still to happen.
    #[derive(Debug, Default)]
    pub(crate) struct Plan {
        /// The next write stops after this many bytes with this OS error.
        pub(crate) short_write: Option<(usize, i32)>,
        /// This many of the next `set_len` calls fail with `EIO`.
        pub(crate) failing_set_len: usize,
        /// This many of the next fsyncs fail with `EIO`. Like Linux, a
        /// failed fsync loses the bytes written since the last good one
        /// (the disk never got them, and the page cache no longer holds
        /// them dirty): they read as zeros.
        pub(crate) failing_syncs: usize,
    }

    /// A segment whose writes and fsyncs fail as its [`Plan`] says.
    #[derive(Debug)]
    pub(crate) struct Faulty {
        file: File,
        path: PathBuf,
        /// The file's length at the last good fsync.
        synced: u64,
        pub(crate) plan: Plan,
    }

    impl SegmentFile for Faulty {
        fn open_append(path: &Path) -> std::io::Result<Self> {
            let file = File::open_append(path)?;
            let synced = file.metadata()?.len();
            Ok(Self {
                file,
                path: path.to_path_buf(),
                synced,
                plan: Plan::default(),
            })
        }

        fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
            match self.plan.short_write.take() {
                Some((n, errno)) => {
                    Write::write_all(&mut self.file, &buf[..n.min(buf.len())])?;
                    Err(std::io::Error::from_raw_os_error(errno))
                }
                None => Write::write_all(&mut self.file, buf),
            }
        }

        fn sync_data(&mut self) -> std::io::Result<()> {
            let len = self.file.metadata()?.len();
            if self.plan.failing_syncs > 0 {
                self.plan.failing_syncs -= 1;
                if len > self.synced {
                    // Positioned writes on an append handle append: zero
                    // through a handle of its own.
                    let lost = vec![0u8; (len - self.synced) as usize];
                    OpenOptions::new()
                        .write(true)
                        .open(&self.path)?
                        .write_all_at(&lost, self.synced)?;
                }
                return Err(std::io::Error::from_raw_os_error(EIO));
            }
            self.file.sync_data()?;
            self.synced = len;
            Ok(())
        }

        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            if self.plan.failing_set_len > 0 {
                self.plan.failing_set_len -= 1;
                return Err(std::io::Error::from_raw_os_error(EIO));
            }
            self.file.set_len(len)?;
            self.synced = self.synced.min(len);
            Ok(())
        }
    }
}
