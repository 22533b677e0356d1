//! A quick libblkio load generator for any vhost-user-blk socket (vhost-qvol,
//! qemu-storage-daemon, ...): sequential 1 MiB writes and reads at queue depth 8, then
//! random 4 KiB writes and reads at queue depth 32, each for a few seconds on one queue.
//! Prints one line per workload. Not a test: figures, for people and scripts.
//!
//! Usage: `blkio-bench SOCKET [SECONDS] [RANGE_MIB]`

use std::time::{Duration, Instant};

use integration::client::{describe, BlkioClient};

struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    write: bool,
    random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "seq write 1M QD8",
        block: 1 << 20,
        depth: 8,
        write: true,
        random: false,
    },
    Workload {
        name: "seq read 1M QD8",
        block: 1 << 20,
        depth: 8,
        write: false,
        random: false,
    },
    Workload {
        name: "rand write 4K QD32",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
    },
    Workload {
        name: "rand read 4K QD32",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
    },
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(socket) = args.get(1) else {
        eprintln!("usage: blkio-bench SOCKET [SECONDS] [RANGE_MIB]");
        std::process::exit(2);
    };
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let range_mib: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let mut client = BlkioClient::connect(socket.as_ref(), 1, false, 8 << 20).unwrap_or_else(|e| {
        eprintln!("blkio-bench: cannot connect: {}", describe(&e));
        std::process::exit(1);
    });
    let capacity = client.capacity().unwrap_or(0);
    let range = (range_mib << 20).min(capacity);
    for w in &WORKLOADS {
        let blocks = range / w.block as u64;
        if blocks == 0 {
            eprintln!("blkio-bench: the disk is too small for {}", w.name);
            continue;
        }
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next_seq = 0u64;
        // About 64 MiB per batch, so that the clock is checked often enough.
        let batch = ((64 << 20) / w.block).clamp(w.depth, 4096);
        let start = Instant::now();
        let (mut ops, mut errors) = (0u64, 0u64);
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            let offsets: Vec<u64> = (0..batch)
                .map(|_| {
                    let b = if w.random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % blocks
                    } else {
                        next_seq = (next_seq + 1) % blocks;
                        next_seq
                    };
                    b * w.block as u64
                })
                .collect();
            let result = client.queue(0).run_batch(
                &offsets,
                w.block,
                w.depth,
                w.write,
                |i, buf| buf[..8].copy_from_slice(&(i as u64).to_le_bytes()),
                |_, _, r| {
                    ops += 1;
                    errors += u64::from(r.is_err());
                    true
                },
            );
            if let Err(e) = result {
                eprintln!("blkio-bench: {}: {e}", w.name);
                std::process::exit(1);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let bytes = ops as f64 * w.block as f64;
        println!(
            "{:<20} {:>10.0} IOPS {:>9.1} MB/s  ({} ops, {} errors, {:.1} s)",
            w.name,
            ops as f64 / secs,
            bytes / secs / 1e6,
            ops,
            errors,
            secs
        );
    }
}
