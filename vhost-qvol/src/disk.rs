//! What the virtio-blk backend needs from a disk, and nothing more.
//!
//! The backend is written against [`Disk`], not against `qvol_core::Volume`, so that the
//! request path can be tested with [`MemDisk`] (no crypto, no files) and so that the
//! virtio side stays ignorant of how blocks are stored. `Volume` implements it in
//! `volume_disk.rs`.

use std::fmt;
use std::sync::RwLock;

/// The logical sector size of the virtio-blk protocol (virtio 1.2, 5.2.6: "sector" is
/// always 512 bytes, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk operation failed, in the terms the backend acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiskErrorKind {
    /// Stored data failed authentication: the block was tampered with or is corrupt.
    Integrity,
    /// The range lies (partly) beyond the end of the disk.
    OutOfRange,
    /// The offset or length is not a multiple of the sector size.
    Unaligned,
    /// The disk is open read-only.
    ReadOnly,
    /// The disk cannot do this operation.
    Unsupported,
    /// Anything else: the host file, a previous failed sync, ...
    Io,
}

/// A failed disk operation: a kind the backend can match, and a sentence for the log.
#[derive(Debug)]
pub struct DiskError {
    kind: DiskErrorKind,
    message: String,
}

impl DiskError {
    /// A new error of `kind`, described by `message` (a sentence, no trailing period).
    pub fn new(kind: DiskErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong, for the backend to choose a virtio status.
    pub fn kind(&self) -> DiskErrorKind {
        self.kind
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DiskError {}

/// A block device as the vhost-user-blk backend sees it. Offsets and lengths are in bytes
/// and are multiples of [`SECTOR_SIZE`]; implementations check ranges themselves too.
/// Shared by all queue threads: every method takes `&self`.
pub trait Disk: Send + Sync {
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Fills each `(offset, buf)` as [`Disk::read_at`] does; one result a read, in order. A
    /// disk whose reads each wait on a network round trip puts them in flight together.
    /// Defaults to one after the other.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), DiskError>> {
        reads
            .iter_mut()
            .map(|(offset, buf)| self.read_at(*offset, buf))
            .collect()
    }
    /// Writes `data` at `offset`. Once this returns, the write survives a crash of this
    /// process (the durability contract of docs/SECURITY.md); a later [`Disk::flush`] makes it
    /// survive power loss.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DiskError>;
    /// Forgets the range; it may read back as zeros or as its old content.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// The range reads back as zeros afterwards; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError>;
    /// Writes back everything held in memory and makes it durable: what a clean
    /// shutdown or a frontend disconnect does. Defaults to [`Disk::flush`].
    fn commit(&self) -> Result<(), DiskError> {
        self.flush()
    }
    /// The allocation of `len` bytes at `offset` (any byte alignment) as runs of alternating
    /// kind covering the range, at most `max_extents` of them (then a shorter cover): what
    /// NBD block status and hole-skipping copies ask. Defaults to all allocated.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<qvol_core::Extent>, DiskError> {
        let _ = (offset, max_extents);
        Ok(vec![qvol_core::Extent {
            len,
            allocated: true,
        }])
    }
}

/// Checks that `offset..offset+len` is sector aligned and inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), DiskError> {
    if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
        return Err(DiskError::new(
            DiskErrorKind::Unaligned,
            format!("range at byte {offset} of {len} bytes is not sector aligned"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::new(
            DiskErrorKind::OutOfRange,
            format!("range at byte {offset} of {len} bytes ends beyond the disk size {size}"),
        )),
    }
}

/// An in-memory disk: for tests of the request path and for developing against libblkio
/// without a volume engine.
#[derive(Debug)]
pub struct MemDisk {
    bytes: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes (rounded down to whole sectors).
    pub fn new(size: u64, read_only: bool) -> Self {
        let size = usize::try_from(size - size % SECTOR_SIZE).unwrap_or(0);
        Self {
            bytes: RwLock::new(vec![0; size]),
            read_only,
        }
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.read_lock().clone()
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.bytes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        let (start, end) = (to_usize(offset)?, to_usize(offset + len)?);
        let mut bytes = self
            .bytes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bytes[start..end].fill(byte);
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::new(
                DiskErrorKind::ReadOnly,
                "the disk is read-only",
            ));
        }
        check_range(self.size(), offset, len)
    }
}

fn to_usize(value: u64) -> Result<usize, DiskError> {
    usize::try_from(value)
        .map_err(|_| DiskError::new(DiskErrorKind::OutOfRange, "offset does not fit in memory"))
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.read_lock().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let start = to_usize(offset)?;
        buf.copy_from_slice(&self.read_lock()[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_write(offset, data.len() as u64)?;
        let start = to_usize(offset)?;
        let mut bytes = self
            .bytes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.fill(offset, len, 0)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
        self.fill(offset, len, 0)
    }
}

/// Disks for the request path's tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// A memory disk that records the offsets of each `read_many` call, fails every read at
    /// `bad` (an integrity failure, the buffer left garbled), or panics there once `panics`
    /// is set.
    pub(crate) struct Batches {
        pub(crate) inner: MemDisk,
        bad: u64,
        pub(crate) panics: AtomicBool,
        pub(crate) calls: Mutex<Vec<Vec<u64>>>,
    }

    impl Batches {
        pub(crate) fn new(size: u64, bad: u64) -> Self {
            Batches {
                inner: MemDisk::new(size, false),
                bad,
                panics: AtomicBool::new(false),
                calls: Mutex::new(Vec::new()),
            }
        }
    }

    impl Disk for Batches {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            self.read_many(&mut [(offset, buf)]).pop().unwrap()
        }
        fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), DiskError>> {
            self.calls
                .lock()
                .unwrap()
                .push(reads.iter().map(|(at, _)| *at).collect());
            reads
                .iter_mut()
                .map(|(at, buf)| {
                    self.inner.read_at(*at, buf)?;
                    if *at == self.bad {
                        buf.fill(0x77);
                        assert!(!self.panics.load(Ordering::SeqCst), "a bug below the disk");
                        return Err(DiskError::new(DiskErrorKind::Integrity, "bad tag"));
                    }
                    Ok(())
                })
                .collect()
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.inner.write_at(offset, data)
        }
        fn flush(&self) -> Result<(), DiskError> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
            self.inner.write_zeroes(offset, len, unmap)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_range_rejects_overflow_unaligned_and_beyond_end() {
        assert!(check_range(4096, 0, 4096).is_ok());
        assert_eq!(
            check_range(4096, 512, 4096).unwrap_err().kind(),
            DiskErrorKind::OutOfRange
        );
        assert_eq!(
            check_range(4096, u64::MAX - 511, 1024).unwrap_err().kind(),
            DiskErrorKind::OutOfRange
        );
        assert_eq!(
            check_range(4096, 1, 512).unwrap_err().kind(),
            DiskErrorKind::Unaligned
        );
    }

    #[test]
    fn mem_disk_round_trips_and_zeroes() {
        let disk = MemDisk::new(8192, false);
        disk.write_at(512, &[7; 1024]).unwrap();
        let mut buf = [0; 1024];
        disk.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [7; 1024]);
        disk.write_zeroes(1024, 512, true).unwrap();
        disk.read_at(512, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[7; 512]);
        assert_eq!(&buf[512..], &[0; 512]);
    }

    #[test]
    fn read_only_mem_disk_refuses_writes() {
        let disk = MemDisk::new(4096, true);
        assert_eq!(
            disk.write_at(0, &[1; 512]).unwrap_err().kind(),
            DiskErrorKind::ReadOnly
        );
    }
}
