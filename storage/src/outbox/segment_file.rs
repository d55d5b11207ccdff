//! The test double of the segment log's file system: the real one, with
//! faults planned by the test (a write that fails part-way, a cut or an
//! fsync that fails). The seam itself is [`crate::fs::Fs`].

/// A test double: the real file, with faults planned by the test.
#[cfg(test)]
pub(crate) mod faulty {
    use crate::fs::{Fs, FsFile, OpenMode, RealFs};
    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

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

    /// The real file system, whose files' writes and fsyncs fail as their
    /// [`Plan`] says (empty when opened).
    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct Faulty;

    /// A file whose writes and fsyncs fail as its [`Plan`] says.
    #[derive(Debug)]
    pub(crate) struct FaultyFile {
        file: File,
        path: PathBuf,
        /// The file's length at the last good fsync.
        synced: u64,
        pub(crate) plan: Plan,
    }

    impl Fs for Faulty {
        type File = FaultyFile;

        fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<FaultyFile> {
            let file = RealFs.open(path, mode)?;
            let synced = file.metadata()?.len();
            Ok(FaultyFile {
                file,
                path: path.to_path_buf(),
                synced,
                plan: Plan::default(),
            })
        }

        fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
            RealFs.create_dir_all(dir)
        }

        fn exists(&self, path: &Path) -> bool {
            RealFs.exists(path)
        }

        fn list(&self, dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
            RealFs.list(dir)
        }

        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            RealFs.rename(from, to)
        }

        fn remove_file(&self, path: &Path) -> std::io::Result<()> {
            RealFs.remove_file(path)
        }

        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            RealFs.sync_dir(dir)
        }
    }

    impl FsFile for FaultyFile {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            FileExt::read_exact_at(&self.file, buf, offset)
        }

        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            FileExt::write_all_at(&self.file, buf, offset)
        }

        fn len(&self) -> std::io::Result<u64> {
            FsFile::len(&self.file)
        }

        fn try_lock(&self) -> std::io::Result<bool> {
            FsFile::try_lock(&self.file)
        }

        fn sync_all(&mut self) -> std::io::Result<()> {
            self.sync_data()
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
            File::sync_all(&self.file)?;
            self.synced = len;
            Ok(())
        }

        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            if self.plan.failing_set_len > 0 {
                self.plan.failing_set_len -= 1;
                return Err(std::io::Error::from_raw_os_error(EIO));
            }
            File::set_len(&self.file, len)?;
            self.synced = self.synced.min(len);
            Ok(())
        }
    }
}
