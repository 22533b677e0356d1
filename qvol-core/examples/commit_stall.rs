//! How long single writes wait while the log fills and commits (issue 15), at the engine's
//! own API, without a daemon or a client: `cargo run --release -p qvol-core --example
//! commit_stall -- [xchacha20-poly1305|aegis-256] DIR [SIZE_MIB] [SECONDS] [THREADS]`.
//! THREADS (8) threads write 1 MiB each, at consecutive offsets of the volume (wrapping), for
//! SECONDS (30); prints bandwidth and the p50, p99, p99.9 and longest write, and, with
//! `QVOL_COMMIT_LOG=1`, each commit's timings (qvol-core's debug log) as they happen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qvol_core::storage::FileStorage;
use qvol_core::{CipherSuite, CreateOptions, Volume, VolumeKey};

struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("qvol_core")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{:>8.3} s  {}", START.elapsed().as_secs_f64(), r.args());
        }
    }
    fn flush(&self) {}
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let suite = match args.get(1).map(String::as_str) {
        Some("aegis-256") => CipherSuite::Aegis256,
        _ => CipherSuite::XChaCha20Poly1305,
    };
    let dir = args.get(2).cloned().unwrap_or_else(|| ".".into());
    let size_mib: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let seconds: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(30);
    let threads: u64 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(8);
    if std::env::var("QVOL_COMMIT_LOG").as_deref() == Ok("1") {
        log::set_logger(&Stderr).expect("one logger");
        log::set_max_level(log::LevelFilter::Debug);
    }
    let path = format!("{dir}/qvol-commit-stall-{}.qvol", std::process::id());
    let storage = Arc::new(FileStorage::create_new(&path).expect("create the image file"));
    let opts = CreateOptions {
        key_epoch: 0,
        size: size_mib << 20,
        suite,
        name: "commit-stall".into(),
        volume_id: [7; 16],
        keyslots: vec![vec![1]],
        compression: None,
    };
    let vol =
        Arc::new(Volume::create(storage, opts, &VolumeKey::from_bytes([9; 32])).expect("create"));
    let chunk = 1u64 << 20;
    let chunks = (size_mib << 20) / chunk;
    let next = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let _ = *START;
    let end = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (vol, next, lat) = (vol.clone(), next.clone(), lat.clone());
            std::thread::spawn(move || {
                let data = vec![t as u8 ^ 0x5a; chunk as usize];
                let mut mine = Vec::new();
                while Instant::now() < end {
                    let i = next.fetch_add(1, Ordering::Relaxed) % chunks;
                    let t0 = Instant::now();
                    vol.write_at(i * chunk, &data).expect("write");
                    mine.push(t0.elapsed());
                }
                lat.lock().expect("lock").extend(mine);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a writer panicked");
    }
    let written = next.load(Ordering::Relaxed) * chunk;
    let mut lat = lat.lock().expect("lock").clone();
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{suite}: {:.2} GB/s over {seconds} s ({:.1} GB written, {} writes); write latency p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        written as f64 / seconds as f64 / 1e9,
        written as f64 / 1e9,
        lat.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        lat[lat.len() - 1]
    );
    drop(vol);
    let _ = std::fs::remove_file(&path);
}
