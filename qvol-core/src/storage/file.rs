//! [`FileStorage`]: a regular file (or block device) accessed with `pread`/`pwrite`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags, OFlag};

use super::Storage;

/// How to open a [`FileStorage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for writing as well as reading.
    pub writable: bool,
    /// Create the file, failing if it exists (implies `writable`).
    pub create_new: bool,
    /// Open with `O_DIRECT`, bypassing the page cache.
    ///
    /// With `O_DIRECT` every read and write must have its offset, its length and its buffer's
    /// address aligned to the device's logical block size (512 bytes on most devices, 4096 on
    /// some; `statx(STATX_DIOALIGN)` tells). Misaligned I/O fails with `EINVAL`; nothing here
    /// realigns it. The engine writes whole 4 KiB blocks at 4 KiB-aligned offsets, but its
    /// buffers and its smaller metadata writes must be aligned too before this is turned on.
    /// Some filesystems (tmpfs) refuse `O_DIRECT` at open time.
    ///
    /// Without page cache, the durability contract's "a completed write survives a process
    /// crash" holds trivially, and `sync_data` still flushes the device's write cache.
    pub direct: bool,
}

/// A storage backed by a file.
///
/// `sync_data` is `fdatasync(2)`; `punch_hole` is
/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`, falling back to writing zeros
/// where the filesystem does not support it.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
}

impl FileStorage {
    /// Opens an existing file, read-only unless `writable`.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        Self::open_with(
            path,
            FileOptions {
                writable,
                ..FileOptions::default()
            },
        )
    }

    /// Creates a new, empty file; fails with `AlreadyExists` if `path` exists.
    pub fn create_new(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_with(
            path,
            FileOptions {
                writable: true,
                create_new: true,
                direct: false,
            },
        )
    }

    /// The same as [`create_new`](Self::create_new): an existing file is never truncated.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::create_new(path)
    }

    /// Opens `path` as `options` say.
    pub fn open_with(path: impl AsRef<Path>, options: FileOptions) -> io::Result<Self> {
        let path = path.as_ref();
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(options.writable || options.create_new)
            .create_new(options.create_new);
        if options.direct {
            oo.custom_flags(OFlag::O_DIRECT.bits());
        }
        let file = oo.open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Wraps an already open file; `path` is only used in messages.
    pub fn from_file(file: File, path: impl Into<PathBuf>) -> Self {
        Self {
            file,
            path: path.into(),
        }
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn zero_fill(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 64 * 1024;
        let zeros = [0u8; CHUNK as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            // n <= CHUNK, so it fits in usize.
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

fn off_t(value: u64) -> io::Result<i64> {
    i64::try_from(value).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {value} does not fit in off_t"),
        )
    })
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // sync_file_range(2) with SYNC_FILE_RANGE_WRITE alone starts writeback of the range's
        // dirty pages and waits for none of it, and, unlike POSIX_FADV_DONTNEED (used before),
        // drops nothing from the page cache: with DONTNEED, clean pages of the range left the
        // cache and random reads of them went to the disk (0.2× qsd raw, benches/RESULTS.md).
        let fd = self.file.as_raw_fd();
        let (offset, len) = (off_t(offset)?, off_t(len)?);
        // SAFETY: sync_file_range takes a file descriptor we own, two integers and flags;
        // it touches no memory of this process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // The part past the end is ignored, as the trait says (KEEP_SIZE does that for
        // fallocate; the zero-fill fallback must not extend the file).
        let size = self.len()?;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(
            self.file.as_raw_fd(),
            flags,
            off_t(offset)?,
            off_t(end - offset)?,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOSYS) => {
                self.zero_fill(offset, end - offset)
            }
            Err(errno) => Err(io::Error::from(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create_new(dir.path().join("a")).unwrap();
        super::super::conformance::check_backend(&s);
    }

    #[test]
    fn create_new_refuses_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        FileStorage::create_new(&p).unwrap();
        let err = FileStorage::create(&p).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn read_only_open_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        FileStorage::create_new(&p)
            .unwrap()
            .write_all_at(b"x", 0)
            .unwrap();
        let s = FileStorage::open(&p, false).unwrap();
        assert!(s.write_all_at(b"y", 0).is_err());
        let mut b = [0u8];
        s.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"x");
        assert_eq!(s.path(), p.as_path());
    }

    #[test]
    fn punch_hole_releases_space() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create_new(dir.path().join("a")).unwrap();
        s.write_all_at(&vec![0xaau8; 1 << 20], 0).unwrap();
        s.sync_data().unwrap();
        let before = s.file().metadata().unwrap().blocks();
        s.punch_hole(0, 1 << 20).unwrap();
        let after = s.file().metadata().unwrap().blocks();
        assert_eq!(s.len().unwrap(), 1 << 20);
        // Filesystems without hole support fall back to zero-fill: only then may the
        // allocation stay the same.
        let mut buf = vec![1u8; 1 << 20];
        s.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(after <= before);
    }

    #[test]
    fn direct_io_aligned_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        FileStorage::create_new(&p).unwrap().set_len(8192).unwrap();
        let opts = FileOptions {
            writable: true,
            direct: true,
            ..FileOptions::default()
        };
        let s = match FileStorage::open_with(&p, opts) {
            Ok(s) => s,
            // tmpfs and some overlay setups refuse O_DIRECT: nothing to test there.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => return,
            Err(e) => panic!("open with O_DIRECT: {e}"),
        };
        // An aligned buffer: a 4 KiB window inside a larger Vec.
        let mut backing = vec![0u8; 3 * 4096];
        let start = backing.as_ptr().align_offset(4096);
        let block = &mut backing[start..start + 4096];
        block.fill(0x5a);
        s.write_all_at(block, 4096).unwrap();
        block.fill(0);
        s.read_exact_at(block, 4096).unwrap();
        assert!(block.iter().all(|&b| b == 0x5a));
    }
}
