//! The `Volume` API on a page-cache file (a `FileStorage` in a temporary directory), one and
//! two threads.
//!
//! Goals (issue 3): sequential 1 MiB reads and writes >= 80% of the suite's one-core
//! primitive speed (measured by `cargo bench --bench seal`: xchacha20-poly1305 ~2 GB/s
//! through ring, aegis-256 ~8 GB/s); random 4 KiB writes including the map update >= 100k/s; a commit after 10,000
//! random writes < 50 ms; two threads scale. Run:
//! `cargo bench -p benches --bench volume` (add a filter such as `seq` to run a subset).
//! The image files go to a temporary directory under `$QVOL_BENCH_DIR` if set (e.g.
//! `/dev/shm`, to keep a real disk's writeback out of syncs and commits), else under `$TMPDIR`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use qvol_core::storage::{FileStorage, Storage};
use qvol_core::{CipherSuite, CreateOptions, Volume, VolumeKey};

const MIB: u64 = 1 << 20;
/// The virtual disk: large enough that the sequential region and the random range fit.
const VOLUME_SIZE: u64 = 1 << 30;
/// Sequential I/O cycles through this many bytes.
const SEQ_SPAN: u64 = 256 * MIB;
/// Random writes land in this many bytes (64 Ki blocks).
const RAND_SPAN_BLOCKS: u64 = (256 * MIB) / 4096;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("QVOL_BENCH_DIR") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("a temporary directory")
}

fn new_volume(dir: &Path, name: &str, suite: CipherSuite) -> Volume {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::create_new(&path).expect("create the image file"));
    let opts = CreateOptions {
        key_epoch: 0,
        size: VOLUME_SIZE,
        suite,
        name: name.to_string(),
        volume_id: [7; 16],
        keyslots: Vec::new(),
        compression: None,
    };
    Volume::create(storage, opts, &VolumeKey::from_bytes([0x5a; 32])).expect("create the volume")
}

/// A xorshift stream of logical block numbers, the same for every run.
struct Lbns(u64);

impl Iterator for Lbns {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Some(self.0 % RAND_SPAN_BLOCKS)
    }
}

fn sequential(c: &mut Criterion) {
    let dir = bench_dir();
    let mut group = c.benchmark_group("volume sequential 1 MiB");
    group.throughput(Throughput::Bytes(MIB));
    group.measurement_time(Duration::from_secs(5));
    for suite in CipherSuite::ALL {
        let vol = new_volume(dir.path(), suite.name(), suite);
        let buf = vec![0xa5u8; MIB as usize];
        let mut pos = 0u64;
        group.bench_function(BenchmarkId::new("write", suite.name()), |b| {
            b.iter(|| {
                vol.write_at(pos, &buf).expect("write");
                pos = (pos + MIB) % SEQ_SPAN;
            })
        });
        // Make sure the whole span is written before reading it back.
        for off in (0..SEQ_SPAN).step_by(MIB as usize) {
            vol.write_at(off, &buf).expect("fill");
        }
        vol.commit().expect("commit");
        let mut out = vec![0u8; MIB as usize];
        let mut pos = 0u64;
        group.bench_function(BenchmarkId::new("read", suite.name()), |b| {
            b.iter(|| {
                vol.read_at(pos, &mut out).expect("read");
                pos = (pos + MIB) % SEQ_SPAN;
                black_box(&out);
            })
        });
        vol.close().expect("close");
    }
    group.finish();
}

fn random_writes(c: &mut Criterion) {
    let dir = bench_dir();
    let mut group = c.benchmark_group("volume random 4 KiB writes");
    group.throughput(Throughput::Elements(1));
    let vol = new_volume(dir.path(), "rand", CipherSuite::XChaCha20Poly1305);
    let block = vec![0x3cu8; 4096];
    let mut lbns = Lbns(0x9e37_79b9_7f4a_7c15);
    group.bench_function("1 thread", |b| {
        b.iter(|| {
            let lbn = lbns.next().unwrap_or(0);
            vol.write_at(lbn * 4096, &block).expect("write");
        })
    });
    group.finish();

    // Two threads, each writing its own stream; per iteration each thread does `PER` writes.
    const PER: u64 = 2000;
    let mut group = c.benchmark_group("volume random 4 KiB writes, threads");
    group.sample_size(20);
    for threads in [1u64, 2] {
        group.throughput(Throughput::Elements(threads * PER));
        group.bench_function(BenchmarkId::from_parameter(threads), |b| {
            b.iter(|| {
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let (vol, block) = (&vol, &block);
                        s.spawn(move || {
                            let mut lbns = Lbns(0x1234_5678 + t);
                            for _ in 0..PER {
                                let lbn = lbns.next().unwrap_or(0);
                                vol.write_at(lbn * 4096, block).expect("write");
                            }
                        });
                    }
                });
            })
        });
    }
    group.finish();
    vol.close().expect("close");
}

fn commit_after_10k(c: &mut Criterion) {
    let dir = bench_dir();
    let mut group = c.benchmark_group("volume commit");
    group.sample_size(10);
    let vol = new_volume(dir.path(), "commit", CipherSuite::XChaCha20Poly1305);
    let block = vec![0x77u8; 4096];
    let mut lbns = Lbns(0xdead_beef);
    vol.commit().expect("commit");
    group.bench_function("after 10,000 random 4 KiB writes and a flush", |b| {
        b.iter_batched(
            || {
                for _ in 0..10_000 {
                    let lbn = lbns.next().unwrap_or(0);
                    vol.write_at(lbn * 4096, &block).expect("write");
                }
                // The data's own fdatasync belongs to the flush, not to the commit.
                vol.flush().expect("flush");
            },
            |()| vol.commit().expect("commit"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    vol.close().expect("close");
}

criterion_group!(benches, sequential, random_writes, commit_after_10k);
criterion_main!(benches);
