//! A quick release-mode performance check of the engine (the criterion benches are in
//! `benches/`): `cargo run --release -p qvol-core --example perf -- [xchacha20-poly1305|aegis-256] [DIR]`.

use std::sync::Arc;
use std::time::Instant;

use qvol_core::storage::FileStorage;
use qvol_core::{CipherSuite, CreateOptions, Volume, VolumeKey};

/// CPU time of the calling thread in seconds (from /proc/thread-self/schedstat), so that
/// figures do not depend on what else runs on the machine.
fn cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
        })
        .map_or(0.0, |ns| ns / 1e9)
}

/// Wall and CPU seconds of `f`.
fn timed<R>(f: impl FnOnce() -> R) -> (R, f64, f64) {
    let (t, c) = (Instant::now(), cpu());
    let r = f();
    (r, t.elapsed().as_secs_f64(), cpu() - c)
}

/// What the page cache alone costs this thread, in MB per CPU-second: 1 GiB written in
/// 64 KiB `pwrite`s to a new file, written again over the same pages, then read back. A
/// copy-on-write volume writes to blocks that are new to the file at first and to reused
/// ones later, so its sequential writes are bounded by the seal and a write between these.
fn page_cache_floor(dir: &str) -> std::io::Result<(f64, f64, f64)> {
    use std::os::unix::fs::FileExt;
    let path = format!("{dir}/qvol-perf-floor-{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let chunk = vec![0x3cu8; 64 << 10];
    let write_all = || -> std::io::Result<f64> {
        let c = cpu();
        for i in 0..16384u64 {
            file.write_all_at(&chunk, i * (64 << 10))?;
        }
        Ok(1073.7 / (cpu() - c))
    };
    let fresh = write_all()?;
    let over = write_all()?;
    let mut rb = vec![0u8; 64 << 10];
    let c = cpu();
    for i in 0..16384u64 {
        file.read_exact_at(&mut rb, i * (64 << 10))?;
    }
    let read = 1073.7 / (cpu() - c);
    std::fs::remove_file(&path)?;
    Ok((fresh, over, read))
}

/// One xorshift64 step: the pseudo-random block positions of the workloads.
fn xorshift(r: &mut u64) -> u64 {
    *r ^= *r << 13;
    *r ^= *r >> 7;
    *r ^= *r << 17;
    *r
}

/// Runs `f(0)` and `f(1)` on two threads; returns the wall seconds and each thread's CPU
/// seconds.
fn on_two_threads(
    f: impl Fn(u64) -> qvol_core::Result<()> + Sync,
) -> Result<(f64, [f64; 2]), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let mut cpus = [0.0; 2];
    std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
        let f = &f;
        let handles: Vec<_> = (0..2u64)
            .map(|k| {
                s.spawn(move || -> qvol_core::Result<f64> {
                    let c = cpu();
                    f(k)?;
                    Ok(cpu() - c)
                })
            })
            .collect();
        for (c, h) in cpus.iter_mut().zip(handles) {
            *c = h.join().map_err(|_| "a workload thread panicked")??;
        }
        Ok(())
    })?;
    Ok((t.elapsed().as_secs_f64(), cpus))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let suite: CipherSuite = args
        .get(1)
        .map_or(Ok(CipherSuite::default()), |s| s.parse())?;
    let dir = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| std::env::temp_dir().display().to_string());
    let path = format!("{dir}/qvol-perf-{}.qvol", std::process::id());
    let size: u64 = 4 << 30;
    let key = VolumeKey::generate();
    let opts = CreateOptions {
        key_epoch: 0,
        size,
        suite,
        name: "perf".into(),
        volume_id: [1; 16],
        keyslots: vec![],
        compression: None,
    };
    let vol = Arc::new(Volume::create(
        Arc::new(FileStorage::create(&path)?),
        opts,
        &key,
    )?);
    println!("suite {suite} ({})", suite.implementation());

    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || xorshift(&mut rng);
    let block = vec![0x5au8; 4096];
    if args.get(3).map(String::as_str) == Some("rand") {
        for _ in 0..300_000 {
            vol.write_at((next() % (size / 4096)) * 4096, &block)?;
        }
        return Ok(());
    }
    if args.get(3).map(String::as_str) == Some("rand2") {
        on_two_threads(|k| {
            let mut r = 0x9e37_79b9_7f4a_7c15u64 ^ k;
            let block = vec![k as u8; 4096];
            for _ in 0..300_000 {
                vol.write_at((xorshift(&mut r) % (size / 4096)) * 4096, &block)?;
            }
            Ok(())
        })?;
        return Ok(());
    }
    if args.get(3).map(String::as_str) == Some("seqw") {
        if args.get(4).is_some() {
            for _ in 0..110_000 {
                vol.write_at((next() % (size / 4096)) * 4096, &block)?;
            }
            vol.commit()?;
        }
        let mib = vec![0xa5u8; 1 << 20];
        for _ in 0..4 {
            for i in 0..1024u64 {
                vol.write_at(i << 20, &mib)?;
            }
        }
        let c = cpu();
        let (r, wall, cpu_s) = timed(|| -> qvol_core::Result<()> {
            let cipher = suite.cipher(&[7; 32]);
            let mut buf = vec![0u8; 1 << 20];
            let nonce = qvol_core::suite::random_nonce(suite);
            for _ in 0..1024 {
                for b in buf.chunks_exact_mut(4096) {
                    std::hint::black_box(cipher.seal(&nonce[..suite.nonce_len()], &[0; 40], b));
                }
            }
            Ok(())
        });
        r?;
        println!(
            "primitive seal: {:.0} MB/s wall, {:.0} MB/s per CPU-second ({c})",
            1073.7 / wall,
            1073.7 / cpu_s
        );
        return Ok(());
    }
    if args.get(3).map(String::as_str) == Some("seq") {
        let mib = vec![0xa5u8; 1 << 20];
        let mut rb = vec![0u8; 1 << 20];
        for _ in 0..3 {
            for i in 0..1024u64 {
                vol.write_at(i << 20, &mib)?;
            }
            for i in 0..1024u64 {
                vol.read_at(i << 20, &mut rb)?;
            }
        }
        return Ok(());
    }
    let blocks = size / 4096;

    // The primitive alone, in the same conditions (4 KiB messages, 40-byte AD).
    let cipher = suite.cipher(&[7; 32]);
    let nonce = qvol_core::suite::random_nonce(suite);
    let mut buf = vec![0u8; 1 << 20];
    let (tags, wall, cpu_s) = timed(|| {
        let mut tags = Vec::new();
        for _ in 0..256 {
            for b in buf.chunks_exact_mut(4096) {
                tags.push(cipher.seal(&nonce[..suite.nonce_len()], &[0; 40], b));
            }
        }
        tags
    });
    let cpu_seal = cpu_s;
    println!(
        "primitive seal 4 KiB: {:.0} MB/s wall, {:.0} MB/s per CPU-second",
        268.4 / wall,
        268.4 / cpu_s
    );
    let (_, wall, cpu_s) = timed(|| {
        let mut t = tags.iter().rev();
        for _ in 0..256 {
            for b in buf.chunks_exact_mut(4096) {
                let tag = t.next().copied().unwrap_or_default();
                let _ = std::hint::black_box(cipher.open(
                    &nonce[..suite.nonce_len()],
                    &[0; 40],
                    b,
                    &tag,
                ));
            }
        }
    });
    println!(
        "primitive open 4 KiB: {:.0} MB/s wall, {:.0} MB/s per CPU-second",
        268.4 / wall,
        268.4 / cpu_s
    );

    let seal_mbs = 268.4 / cpu_seal;
    let open_mbs = 268.4 / cpu_s;
    let (fresh, over, read) = page_cache_floor(&dir)?;
    println!(
        "page cache alone (64 KiB): write to new blocks {fresh:.0}, overwrite {over:.0}, read {read:.0} MB/s per CPU-second"
    );

    // Random 4 KiB writes, commits included as the log fills.
    let n = 100_000;
    let (r, wall, cpu_s) = timed(|| -> qvol_core::Result<()> {
        for _ in 0..n {
            vol.write_at((next() % blocks) * 4096, &block)?;
        }
        Ok(())
    });
    r?;
    println!(
        "random 4 KiB writes: {:.0}/s wall, {:.0}/s per CPU-second",
        n as f64 / wall,
        n as f64 / cpu_s
    );
    vol.commit()?;

    // Commit after 10,000 random writes.
    for _ in 0..10_000 {
        vol.write_at((next() % blocks) * 4096, &block)?;
    }
    let (r, wall, cpu_s) = timed(|| vol.commit());
    r?;
    println!(
        "commit after 10,000 random writes: {:.1} ms wall, {:.1} ms CPU",
        wall * 1e3,
        cpu_s * 1e3
    );

    // Sequential 1 MiB writes and reads over 1 GiB.
    let mib = vec![0xa5u8; 1 << 20];
    let (r, wall, cpu_s) = timed(|| -> qvol_core::Result<()> {
        for i in 0..1024u64 {
            vol.write_at(i << 20, &mib)?;
        }
        Ok(())
    });
    r?;
    let w = 1073.7 / cpu_s;
    // Sealing and writing one byte costs 1/seal + 1/pwrite seconds per MB at best.
    let bound = |pw: f64| 1.0 / (1.0 / seal_mbs + 1.0 / pw);
    println!(
        "seq 1 MiB writes: {:.0} MB/s wall, {w:.0} MB/s per CPU-second = {:.0}% of the seal; \
         seal + page cache bound {:.0}..{:.0} MB/s",
        1073.7 / wall,
        100.0 * w / seal_mbs,
        bound(fresh),
        bound(over),
    );
    let mut rb = vec![0u8; 1 << 20];
    let (r, wall, cpu_s) = timed(|| -> qvol_core::Result<()> {
        for i in 0..1024u64 {
            vol.read_at(i << 20, &mut rb)?;
        }
        Ok(())
    });
    r?;
    let r = 1073.7 / cpu_s;
    println!(
        "seq 1 MiB reads: {:.0} MB/s wall, {r:.0} MB/s per CPU-second = {:.0}% of the open; \
         open + page cache bound {:.0} MB/s",
        1073.7 / wall,
        100.0 * r / open_mbs,
        1.0 / (1.0 / open_mbs + 1.0 / read),
    );

    // Random 4 KiB reads of the first GiB, which the sequential writes filled.
    let mut rbuf = vec![0u8; 4096];
    let (r, wall, cpu_s) = timed(|| -> qvol_core::Result<()> {
        for _ in 0..n {
            vol.read_at((next() % (1 << 18)) * 4096, &mut rbuf)?;
        }
        Ok(())
    });
    r?;
    println!(
        "random 4 KiB reads: {:.0}/s wall, {:.0}/s per CPU-second",
        n as f64 / wall,
        n as f64 / cpu_s
    );

    // Two threads of random 4 KiB writes, random reads, sequential 1 MiB writes.
    let (wall, cpus) = on_two_threads(|k| {
        let mut r = 0x9e37_79b9_7f4a_7c15u64 ^ k;
        let block = vec![k as u8; 4096];
        for _ in 0..n / 2 {
            vol.write_at((xorshift(&mut r) % blocks) * 4096, &block)?;
        }
        Ok(())
    })?;
    println!(
        "random 4 KiB writes, 2 threads: {:.0}/s wall, {:.0}/s per CPU-second of each thread (CPU {:.2} s + {:.2} s)",
        n as f64 / wall,
        n as f64 / (cpus[0] + cpus[1]),
        cpus[0],
        cpus[1]
    );
    let (wall, cpus) = on_two_threads(|k| {
        let mut r = 0x2545_f491_4f6c_dd1du64 ^ k;
        let mut buf = vec![0u8; 4096];
        for _ in 0..n {
            vol.read_at((xorshift(&mut r) % (1 << 18)) * 4096, &mut buf)?;
        }
        Ok(())
    })?;
    println!(
        "random 4 KiB reads, 2 threads: {:.0}/s wall, {:.0}/s per CPU-second",
        2.0 * n as f64 / wall,
        2.0 * n as f64 / (cpus[0] + cpus[1]),
    );
    let (wall, cpus) = on_two_threads(|k| {
        let mib = vec![k as u8; 1 << 20];
        for i in 0..512u64 {
            vol.write_at(((k * 512 + i) << 20) + (1 << 30), &mib)?;
        }
        Ok(())
    })?;
    println!(
        "seq 1 MiB writes, 2 threads: {:.0} MB/s wall, {:.0} MB/s per CPU-second",
        1073.7 / wall,
        1073.7 / (cpus[0] + cpus[1])
    );
    drop(vol);
    std::fs::remove_file(&path)?;
    Ok(())
}
