//! [`MemStorage`]: a `Vec<u8>` behind a lock, for tests and tools.

use std::fmt;
use std::io;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{range_end, read_past_end, Storage};

/// An in-memory storage. `sync_data` does nothing (there is nothing to lose); clones of the
/// bytes are taken with [`to_vec`](MemStorage::to_vec).
#[derive(Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the current bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read().clone()
    }

    /// The bytes, consuming the storage.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    // A panic while holding the lock cannot leave the Vec inconsistent (every mutation is a
    // single copy or resize), so a poisoned lock is simply taken over.
    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage")
            .field("len", &self.read().len())
            .finish()
    }
}

/// Copies `bytes[offset..]` into `buf`, the read half shared with [`super::CrashStorage`].
pub(crate) fn read_vec(bytes: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let end = range_end(offset, buf.len())?;
    if end > bytes.len() {
        return Err(read_past_end(offset, buf.len(), bytes.len()));
    }
    let start = end - buf.len();
    buf.copy_from_slice(&bytes[start..end]);
    Ok(())
}

/// Writes `buf` at `offset`, growing `bytes` with zeros as needed.
pub(crate) fn write_vec(bytes: &mut Vec<u8>, buf: &[u8], offset: u64) -> io::Result<()> {
    let end = range_end(offset, buf.len())?;
    if end > bytes.len() {
        bytes.resize(end, 0);
    }
    let start = end - buf.len();
    bytes[start..end].copy_from_slice(buf);
    Ok(())
}

/// Zeros `offset..offset + len` clamped to the current length.
pub(crate) fn punch_vec(bytes: &mut [u8], offset: u64, len: u64) {
    let size = bytes.len() as u64;
    let start = offset.min(size);
    let end = offset.saturating_add(len).min(size);
    // Both bounds are <= bytes.len(), so they fit in usize.
    bytes[start as usize..end as usize].fill(0);
}

/// Resizes to `len` bytes, or fails if that does not fit in memory.
pub(crate) fn set_len_vec(bytes: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let len = range_end(len, 0)?;
    bytes.resize(len, 0);
    Ok(())
}

impl Storage for MemStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.read().len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_vec(&self.read(), buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_vec(&mut self.write(), buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        set_len_vec(&mut self.write(), len)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_vec(&mut self.write(), offset, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms() {
        super::super::conformance::check_backend(&MemStorage::new());
    }

    #[test]
    fn from_bytes_round_trips() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        s.write_all_at(&[9], 1).unwrap();
        assert_eq!(s.to_vec(), vec![1, 9, 3]);
        assert_eq!(s.into_bytes(), vec![1, 9, 3]);
    }

    #[test]
    fn huge_offsets_fail_cleanly() {
        let s = MemStorage::new();
        assert!(s.write_all_at(&[1], u64::MAX).is_err());
        assert!(s.read_exact_at(&mut [0], u64::MAX).is_err());
        s.punch_hole(u64::MAX - 1, u64::MAX).unwrap();
    }
}
