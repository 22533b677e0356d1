//! Request statistics of a serving daemon: a [`Disk`] wrapper that counts every call, its
//! bytes, its failures and its latency (a histogram of powers of two of microseconds), with
//! relaxed atomics only, so the request path takes no lock for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::disk::{Disk, DiskError};

/// Latency buckets: bucket `i` holds calls that took less than 2^i µs (and, for i > 0, at
/// least 2^(i-1) µs).
const BUCKETS: usize = 32;

/// The kinds of call counted.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
}

const OPS: [(&str, Op); 5] = [
    ("read", Op::Read),
    ("write", Op::Write),
    ("flush", Op::Flush),
    ("discard", Op::Discard),
    ("write_zeroes", Op::WriteZeroes),
];

#[derive(Debug)]
struct OpStats {
    count: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    max_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn record(&self, bytes: u64, started: Instant, failed: bool) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.max_us.fetch_max(us, Ordering::Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound (µs) of the bucket holding the `q`-quantile call, or 0 without calls.
    fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1u64 << i;
            }
        }
        1u64 << (BUCKETS - 1)
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "latency_us": {
                "p50": self.quantile(0.50),
                "p99": self.quantile(0.99),
                "p999": self.quantile(0.999),
                "max": self.max_us.load(Ordering::Relaxed),
            },
        })
    }
}

/// Counters of every disk call since the daemon started.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    ops: [OpStats; 5],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            ops: std::array::from_fn(|_| OpStats::new()),
        }
    }
}

impl Stats {
    fn op(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    /// The counters as JSON: per kind of call, its count, bytes, errors and latency
    /// quantiles (upper bounds of power-of-two buckets, in µs; `max` exact).
    pub fn json(&self) -> Value {
        let mut requests = serde_json::Map::new();
        for (name, op) in OPS {
            requests.insert(name.into(), self.op(op).json());
        }
        json!({
            "uptime_s": self.started.elapsed().as_secs(),
            "requests": requests,
            "errors": self.ops.iter().map(|o| o.errors.load(Ordering::Relaxed)).sum::<u64>(),
        })
    }
}

/// A [`Disk`] that counts its calls into [`Stats`].
pub struct CountingDisk {
    inner: Arc<dyn Disk>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for CountingDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingDisk").finish_non_exhaustive()
    }
}

impl CountingDisk {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Disk>, stats: Arc<Stats>) -> Self {
        CountingDisk { inner, stats }
    }

    fn time<T>(
        &self,
        op: Op,
        bytes: u64,
        call: impl FnOnce() -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let started = Instant::now();
        let r = call();
        self.stats.op(op).record(bytes, started, r.is_err());
        r
    }
}

impl Disk for CountingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let n = buf.len() as u64;
        self.time(Op::Read, n, || self.inner.read_at(offset, buf))
    }

    /// Forwarded as one call (the reads stay in flight together); each read counts with
    /// the batch's latency, which is its own.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), DiskError>> {
        let started = Instant::now();
        let results = self.inner.read_many(reads);
        for ((_, buf), result) in reads.iter().zip(&results) {
            self.stats
                .op(Op::Read)
                .record(buf.len() as u64, started, result.is_err());
        }
        results
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.time(Op::Write, data.len() as u64, || {
            self.inner.write_at(offset, data)
        })
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.time(Op::Flush, 0, || self.inner.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.time(Op::Discard, len, || self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.time(Op::WriteZeroes, len, || {
            self.inner.write_zeroes(offset, len, unmap)
        })
    }

    fn commit(&self) -> Result<(), DiskError> {
        self.inner.commit()
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<qvol_core::Extent>, DiskError> {
        self.inner.allocation(offset, len, max_extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;

    #[test]
    fn calls_bytes_errors_and_latency_are_counted() {
        let stats = Arc::new(Stats::default());
        let disk = CountingDisk::new(Arc::new(MemDisk::new(1 << 20, false)), stats.clone());
        disk.write_at(0, &[1u8; 4096]).unwrap();
        let mut buf = [0u8; 8192];
        disk.read_at(0, &mut buf).unwrap();
        disk.read_at(0, &mut buf).unwrap();
        assert!(disk.read_at(1 << 20, &mut buf).is_err());
        disk.flush().unwrap();
        let j = stats.json();
        assert_eq!(j["requests"]["read"]["count"], 3);
        assert_eq!(j["requests"]["read"]["bytes"], 3 * 8192);
        assert_eq!(j["requests"]["read"]["errors"], 1);
        assert_eq!(j["requests"]["write"]["bytes"], 4096);
        assert_eq!(j["requests"]["flush"]["count"], 1);
        assert_eq!(j["errors"], 1);
        let p50 = j["requests"]["read"]["latency_us"]["p50"].as_u64().unwrap();
        let max = j["requests"]["read"]["latency_us"]["max"].as_u64().unwrap();
        assert!(p50 >= 1 && p50.is_power_of_two(), "{p50}");
        assert!(max < 1_000_000, "a memory read took {max} µs");
    }

    /// A disk that answers `read_many` itself, as the volume does: the counting wrapper must
    /// hand a batch on whole, not read it one after the other through `read_at`.
    struct ManyOnly(MemDisk);

    impl Disk for ManyOnly {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> Result<(), DiskError> {
            panic!("a batch was split into single reads")
        }
        fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), DiskError>> {
            reads
                .iter_mut()
                .map(|(at, b)| self.0.read_at(*at, b))
                .collect()
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.0.write_at(offset, data)
        }
        fn flush(&self) -> Result<(), DiskError> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.0.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
            self.0.write_zeroes(offset, len, unmap)
        }
    }

    #[test]
    fn a_batch_of_reads_is_handed_on_whole_and_each_read_counted() {
        let stats = Arc::new(Stats::default());
        let inner = ManyOnly(MemDisk::new(1 << 20, false));
        inner.write_at(4096, &[9; 4096]).unwrap();
        let disk = CountingDisk::new(Arc::new(inner), stats.clone());
        let (mut a, mut b) = ([0u8; 4096], [0u8; 512]);
        let results = disk.read_many(&mut [(4096, &mut a[..]), (1 << 20, &mut b[..])]);
        assert!(results[0].is_ok() && results[1].is_err());
        assert_eq!(a, [9; 4096]);
        let j = stats.json();
        assert_eq!(j["requests"]["read"]["count"], 2);
        assert_eq!(j["requests"]["read"]["bytes"], 4096 + 512);
        assert_eq!(j["requests"]["read"]["errors"], 1);
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let s = OpStats::new();
        // 99 calls in bucket 3 (4 to 7 µs), one in bucket 10.
        s.buckets[3].store(99, Ordering::Relaxed);
        s.buckets[10].store(1, Ordering::Relaxed);
        assert_eq!(s.quantile(0.5), 8);
        assert_eq!(s.quantile(0.99), 8);
        assert_eq!(s.quantile(0.999), 1024);
        assert_eq!(OpStats::new().quantile(0.5), 0);
    }
}
