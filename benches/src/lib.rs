//! Benchmark support: the end-to-end comparison of vhost-qvol against qemu-storage-daemon
//! (raw and LUKS) through one libblkio client. The criterion micro-benchmarks live in
//! `benches/`; the comparison program is `src/bin/compare.rs`, run by `scripts/bench.sh`.

pub mod compare;
