//! [`FaultStorage`]: a wrapper that injects I/O errors after a number of operations.
//!
//! Modelled on redb's fault-injecting backend: operations of the kinds being counted are
//! numbered from 0; once `fail_after` of them have succeeded, every operation of a failing
//! kind returns an error. A failed `sync_data` leaves the storage failed for good, even if it
//! is re-armed (Linux reports a writeback error to `fsync` once and may drop the dirty pages:
//! nothing written since the last good sync can be trusted any more).

use std::fmt;
use std::io;
use std::ops::BitOr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::Storage;

/// A set of operation kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpKinds(u8);

impl OpKinds {
    /// `read_exact_at`.
    pub const READ: Self = Self(1);
    /// `write_all_at`.
    pub const WRITE: Self = Self(2);
    /// `sync_data`.
    pub const SYNC: Self = Self(4);
    /// `set_len`.
    pub const SET_LEN: Self = Self(8);
    /// `punch_hole`.
    pub const PUNCH_HOLE: Self = Self(16);
    /// `len`.
    pub const LEN: Self = Self(32);
    /// No operation.
    pub const NONE: Self = Self(0);
    /// Every operation.
    pub const ALL: Self = Self(63);
    /// Everything that changes the bytes or their durability.
    pub const MUTATIONS: Self = Self(2 | 4 | 8 | 16);

    /// Whether every kind in `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for OpKinds {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// When a [`FaultStorage`] starts failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultConfig {
    /// How many counted operations succeed before the first failure (`u64::MAX`: never fail).
    pub fail_after: u64,
    /// Which operation kinds are counted.
    pub count: OpKinds,
    /// Which operation kinds fail once the count is reached.
    pub fail: OpKinds,
    /// A failing write first writes a prefix of its 512-byte sectors, as a device that dies
    /// mid-request may.
    pub tear_failed_writes: bool,
}

impl FaultConfig {
    /// Fail every operation after `n` operations of any kind.
    pub const fn after(n: u64) -> Self {
        Self {
            fail_after: n,
            count: OpKinds::ALL,
            fail: OpKinds::ALL,
            tear_failed_writes: false,
        }
    }

    /// Never fail (until [`FaultStorage::set_config`] arms it).
    pub const fn never() -> Self {
        Self::after(u64::MAX)
    }
}

/// A storage that fails operations once a count is reached; see the module documentation.
pub struct FaultStorage<S> {
    inner: S,
    fail_after: AtomicU64,
    count: AtomicU64,
    kinds: std::sync::Mutex<FaultConfig>,
    sync_failed: AtomicBool,
    failures: AtomicU64,
    /// Failures returned to threads not named `qvol-commit` (the thread of a pipelined
    /// commit, whose failures may come after the operation that started it returned).
    foreground: AtomicU64,
}

impl<S: Storage> FaultStorage<S> {
    /// Wraps `inner` with `config`.
    pub fn new(inner: S, config: FaultConfig) -> Self {
        Self {
            inner,
            fail_after: AtomicU64::new(config.fail_after),
            count: AtomicU64::new(0),
            kinds: std::sync::Mutex::new(config),
            sync_failed: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            foreground: AtomicU64::new(0),
        }
    }

    /// Replaces the configuration and restarts the count from 0. A failed sync stays failed.
    pub fn set_config(&self, config: FaultConfig) {
        *self.kinds.lock().unwrap_or_else(|e| e.into_inner()) = config;
        self.fail_after.store(config.fail_after, Ordering::SeqCst);
        self.count.store(0, Ordering::SeqCst);
    }

    /// How many counted operations were attempted so far (failed ones included).
    pub fn ops(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// How many operations failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Failures returned outside the thread of a pipelined commit (`qvol-commit`, FORMAT.md
    /// §10.1), i.e. to the operations that called the storage themselves.
    pub fn foreground_failures(&self) -> u64 {
        self.foreground.load(Ordering::SeqCst)
    }

    /// Whether a `sync_data` failed (the storage then fails everything).
    pub fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::SeqCst)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped storage, consuming the wrapper.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn config(&self) -> FaultConfig {
        *self.kinds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one operation of `kind`; `Err` if it must fail.
    fn admit(&self, kind: OpKinds, what: &str) -> io::Result<()> {
        if self.sync_failed() {
            return Err(self.fail(what, "an earlier sync failed"));
        }
        let cfg = self.config();
        let tripped = if cfg.count.contains(kind) {
            self.count.fetch_add(1, Ordering::SeqCst) >= self.fail_after.load(Ordering::SeqCst)
        } else {
            self.count.load(Ordering::SeqCst) >= self.fail_after.load(Ordering::SeqCst)
        };
        if tripped && cfg.fail.contains(kind) {
            if kind == OpKinds::SYNC {
                self.sync_failed.store(true, Ordering::SeqCst);
            }
            return Err(self.fail(what, "injected fault"));
        }
        Ok(())
    }

    fn fail(&self, what: &str, why: &str) -> io::Error {
        self.failures.fetch_add(1, Ordering::SeqCst);
        if std::thread::current().name() != Some("qvol-commit") {
            self.foreground.fetch_add(1, Ordering::SeqCst);
        }
        io::Error::other(format!("{what} failed: {why}"))
    }
}

impl<S: Storage> fmt::Debug for FaultStorage<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultStorage")
            .field("inner", &self.inner)
            .field("config", &self.config())
            .field("ops", &self.ops())
            .field("sync_failed", &self.sync_failed())
            .finish()
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn len(&self) -> io::Result<u64> {
        self.admit(OpKinds::LEN, "len")?;
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.admit(OpKinds::READ, "read")?;
        self.inner.read_exact_at(buf, offset)
    }

    fn round_trips(&self) -> bool {
        self.inner.round_trips()
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Err(e) = self.admit(OpKinds::WRITE, "write") {
            if self.config().tear_failed_writes && !self.sync_failed() {
                // Land the first half of the sectors (rounded down): a prefix, as a device
                // that dies mid-request leaves.
                let sectors = buf.len().div_ceil(512);
                let keep = (sectors / 2 * 512).min(buf.len());
                if keep > 0 {
                    let _ = self.inner.write_all_at(&buf[..keep], offset);
                }
            }
            return Err(e);
        }
        self.inner.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.admit(OpKinds::SET_LEN, "set_len")?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.admit(OpKinds::SYNC, "sync")?;
        let result = self.inner.sync_data();
        if result.is_err() {
            self.sync_failed.store(true, Ordering::SeqCst);
        }
        result
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.admit(OpKinds::PUNCH_HOLE, "punch_hole")?;
        self.inner.punch_hole(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn conforms_when_never_failing() {
        let s = FaultStorage::new(MemStorage::new(), FaultConfig::never());
        super::super::conformance::check_backend(&s);
        assert_eq!(s.failures(), 0);
    }

    #[test]
    fn fails_every_operation_after_n() {
        let s = FaultStorage::new(MemStorage::new(), FaultConfig::after(3));
        s.write_all_at(b"a", 0).unwrap();
        s.write_all_at(b"b", 1).unwrap();
        let mut buf = [0u8; 2];
        s.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(s.ops(), 3);
        assert!(s.write_all_at(b"c", 2).is_err());
        assert!(s.read_exact_at(&mut buf, 0).is_err());
        assert!(s.len().is_err());
        assert!(s.set_len(0).is_err());
        assert!(s.punch_hole(0, 1).is_err());
        assert_eq!(s.failures(), 5);
        assert_eq!(
            s.inner().to_vec(),
            b"ab",
            "failed operations must not reach the inner storage"
        );
        assert!(!s.sync_failed());
        s.set_config(FaultConfig::never());
        s.write_all_at(b"c", 2).unwrap();
    }

    #[test]
    fn counts_only_the_configured_kinds() {
        let cfg = FaultConfig {
            fail_after: 1,
            count: OpKinds::SYNC,
            fail: OpKinds::WRITE | OpKinds::SYNC,
            tear_failed_writes: false,
        };
        let s = FaultStorage::new(MemStorage::new(), cfg);
        for i in 0..10 {
            s.write_all_at(b"x", i).unwrap();
        }
        s.sync_data().unwrap();
        // The count is reached: writes fail, reads (not a failing kind) still work.
        assert!(s.write_all_at(b"y", 0).is_err());
        let mut b = [0u8];
        s.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn a_failed_sync_stays_failed() {
        let cfg = FaultConfig {
            fail_after: 0,
            count: OpKinds::SYNC,
            fail: OpKinds::SYNC,
            tear_failed_writes: false,
        };
        let s = FaultStorage::new(MemStorage::new(), cfg);
        s.write_all_at(b"x", 0).unwrap();
        assert!(s.sync_data().is_err());
        assert!(s.sync_failed());
        s.set_config(FaultConfig::never());
        assert!(s.write_all_at(b"y", 0).is_err());
        assert!(s.sync_data().is_err());
        assert!(s.read_exact_at(&mut [0u8], 0).is_err());
        // The underlying storage is untouched and usable: that is what a reopen gets.
        assert_eq!(s.into_inner().to_vec(), b"x");
    }

    #[test]
    fn failed_writes_can_tear() {
        let mut cfg = FaultConfig::after(0);
        cfg.tear_failed_writes = true;
        let s = FaultStorage::new(MemStorage::new(), cfg);
        assert!(s.write_all_at(&[7u8; 4096], 0).is_err());
        let landed = s.inner().to_vec();
        assert_eq!(landed, vec![7u8; 2048]);
    }

    #[test]
    fn wraps_shared_storage() {
        let shared = std::sync::Arc::new(MemStorage::new());
        let s = FaultStorage::new(shared.clone(), FaultConfig::never());
        s.write_all_at(b"z", 0).unwrap();
        assert_eq!(shared.to_vec(), b"z");
    }
}
