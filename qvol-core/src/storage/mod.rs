//! Where volume bytes live: the `Storage` trait and its backends.
//!
//! The engine talks to its image only through [`Storage`]: positioned reads and writes,
//! `set_len`, `sync_data` (the only durability point) and `punch_hole`. Four backends:
//!
//! - [`FileStorage`]: a file, with `pread`/`pwrite`, `fdatasync` and `fallocate`
//!   (optionally opened with `O_DIRECT`);
//! - [`MemStorage`]: a `Vec<u8>`, for tests and tools;
//! - [`CrashStorage`]: a power-loss model that keeps the live bytes and the writes made since
//!   the last sync, and can produce the image a crash could leave behind;
//! - [`FaultStorage`]: wraps any storage and fails operations after N of them.
//!
//! All methods take `&self` so that several threads can share one storage; backends are
//! `Send + Sync`. Errors are plain [`std::io::Error`]s; the engine adds context.

use std::fmt::Debug;
use std::io;
use std::sync::Arc;

mod chunked;
mod crash;
mod fault;
mod file;
pub(crate) mod gather;
mod mem;

pub use crash::{CrashPolicy, CrashStorage};
pub use fault::{FaultConfig, FaultStorage, OpKinds};
pub use file::{FileOptions, FileStorage};
pub use mem::MemStorage;

/// The size of a sector: the unit a device writes atomically, and the granularity at which
/// [`CrashStorage`] may tear a write.
pub const STORAGE_SECTOR: u64 = 512;

/// A byte-addressed store with explicit durability, the medium a volume lives on.
///
/// Semantics every backend follows (the same as a regular file on Linux):
/// - `read_exact_at` fails with [`io::ErrorKind::UnexpectedEof`] if the range extends past
///   [`len`](Storage::len);
/// - `write_all_at` past the end extends the storage (any gap reads as zeros);
/// - nothing is durable against power loss until `sync_data` returns `Ok`; what a crash keeps
///   of the writes made since the last sync is unspecified, and a write may be torn at
///   [`STORAGE_SECTOR`] granularity;
/// - `punch_hole` makes a range read as zeros and lets the backend release its space; it never
///   changes `len`, and the part of the range past `len` is ignored.
pub trait Storage: Send + Sync + Debug {
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the range ends past `len`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write (and length change) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset`: the range reads as zeros afterwards, `len()`
    /// is unchanged. Backends that cannot release space write zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Starts writing completed writes of `len` bytes at `offset` back to the media without
    /// waiting for it (a hint:
    /// the next [`Storage::sync_data`] then has less left to wait for). Nothing is promised
    /// about durability; the default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Whether each read and write waits for a network round trip (RBD; a hint, default
    /// false): writers then gather what they can into fewer, larger writes — a request's
    /// data into one, the log records of writers that append together into one.
    fn round_trips(&self) -> bool {
        false
    }

    /// Writes each `(offset, bytes)` of `writes` as [`Storage::write_all_at`] does, in no
    /// promised order and possibly at the same time (RBD puts them in flight together); the
    /// outcome of each, in order. Returns once every one has completed, failed or not. The
    /// default writes them one after another, in the order given.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        writes
            .iter()
            .map(|&(offset, buf)| self.write_all_at(buf, offset))
            .collect()
    }

    /// Fills each `(offset, buffer)` of `reads` as [`Storage::read_exact_at`] does, possibly
    /// at the same time (RBD puts them in flight together); the outcome of each, in order.
    /// Returns once every one has completed. The default reads them one after another.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<io::Result<()>> {
        reads
            .iter_mut()
            .map(|(offset, buf)| self.read_exact_at(buf, *offset))
            .collect()
    }
}

macro_rules! forward_storage {
    ($ty:ty) => {
        impl<S: Storage + ?Sized> Storage for $ty {
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_exact_at(buf, offset)
            }
            fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_all_at(buf, offset)
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn sync_data(&self) -> io::Result<()> {
                (**self).sync_data()
            }
            fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).punch_hole(offset, len)
            }
            fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).start_writeback(offset, len)
            }
            fn round_trips(&self) -> bool {
                (**self).round_trips()
            }
            fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
                (**self).write_many(writes)
            }
            fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<io::Result<()>> {
                (**self).read_many(reads)
            }
        }
    };
}

forward_storage!(Arc<S>);
forward_storage!(Box<S>);
forward_storage!(&S);

/// `offset + len` as an in-memory index range end, or an `InvalidInput` error on overflow.
pub(crate) fn range_end(offset: u64, len: usize) -> io::Result<usize> {
    let len = u64::try_from(len).map_err(|_| too_large(offset))?;
    let end = offset.checked_add(len).ok_or_else(|| too_large(offset))?;
    usize::try_from(end).map_err(|_| too_large(offset))
}

fn too_large(offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the range at offset {offset} does not fit in memory"),
    )
}

/// The `UnexpectedEof` error a read past the end gets.
pub(crate) fn read_past_end(offset: u64, len: usize, size: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("a read of {len} bytes at offset {offset} goes past the end ({size} bytes)"),
    )
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Checks every backend must pass; each backend's tests call [`check_backend`].
    use super::Storage;

    /// Exercises the trait's documented semantics on an empty storage.
    pub(crate) fn check_backend(s: &dyn Storage) {
        assert_eq!(s.len().unwrap(), 0);
        assert!(s.is_empty().unwrap());
        s.write_all_at(b"hello", 10).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        let mut buf = [0xffu8; 15];
        s.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0\0\0\0\0\0\0\0\0hello");
        let mut past = [0u8; 4];
        let err = s.read_exact_at(&mut past, 13).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        s.set_len(8192).unwrap();
        assert_eq!(s.len().unwrap(), 8192);
        s.write_all_at(&[7u8; 8192], 0).unwrap();
        s.punch_hole(4096, 8192).unwrap();
        assert_eq!(s.len().unwrap(), 8192, "punch_hole must keep the length");
        let mut all = vec![0u8; 8192];
        s.read_exact_at(&mut all, 0).unwrap();
        assert!(all[..4096].iter().all(|&b| b == 7));
        assert!(all[4096..].iter().all(|&b| b == 0));
        s.set_len(100).unwrap();
        assert_eq!(s.len().unwrap(), 100);
        s.set_len(200).unwrap();
        let mut tail = [1u8; 100];
        s.read_exact_at(&mut tail, 100).unwrap();
        assert!(tail.iter().all(|&b| b == 0), "extension must read as zeros");
        s.sync_data().unwrap();
        s.read_exact_at(&mut [], 200).unwrap();
    }
}
