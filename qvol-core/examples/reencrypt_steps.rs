//! Times re-encryption steps of a filled file-backed volume, with and without a concurrent
//! QD1 reader: `cargo run --release -p qvol-core --example reencrypt_steps -- [DIR] [MIB] [LEAVES]`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use qvol_core::storage::FileStorage;
use qvol_core::{CipherSuite, CreateOptions, Volume, VolumeKey};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or("/var/tmp", String::as_str);
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let leaves: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4);
    let path = format!("{dir}/qvol-reencrypt-steps-{}.qvol", std::process::id());
    let st = Arc::new(FileStorage::create_new(&path).expect("create the file"));
    let key = VolumeKey::from_bytes([1; 32]);
    let opts = CreateOptions {
        size: mib << 20,
        suite: CipherSuite::XChaCha20Poly1305,
        name: String::new(),
        volume_id: [3; 16],
        keyslots: vec![b"slot".to_vec()],
        key_epoch: 0,
        compression: None,
    };
    let vol = Arc::new(Volume::create(st, opts, &key).expect("create"));
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..mib {
        vol.write_at(i << 20, &chunk).expect("fill");
    }
    vol.commit().expect("commit");
    for reader in [false, true] {
        let slots = vol.keyslots();
        let t = Instant::now();
        vol.start_reencryption(
            &VolumeKey::generate(),
            CipherSuite::XChaCha20Poly1305,
            &slots,
            &vol.keyslots_hash(),
        )
        .expect("start");
        let start = t.elapsed();
        let stop = Arc::new(AtomicBool::new(false));
        let r = {
            let (vol, stop) = (vol.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut n = 0u64;
                let mut worst = 0f64;
                while reader && !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    vol.read_at((n * 7919 % (mib * 256)) * 4096, &mut buf)
                        .expect("read");
                    worst = worst.max(t.elapsed().as_secs_f64());
                    n += 1;
                }
                (n, worst)
            })
        };
        let (mut steps, mut longest) = (0, 0f64);
        let t = Instant::now();
        loop {
            let s = Instant::now();
            let more = vol.reencrypt_step(leaves).expect("step").is_some();
            longest = longest.max(s.elapsed().as_secs_f64());
            steps += 1;
            if !more {
                break;
            }
        }
        let total = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (reads, worst) = r.join().expect("reader");
        println!(
            "reader {reader}: start {:.1} ms; {steps} steps of {leaves} leaves in {total:.2} s \
             ({:.0} MB/s, {:.1} ms a step, longest {:.1} ms); {reads} reads, longest {:.1} ms",
            start.as_secs_f64() * 1e3,
            (mib << 20) as f64 / total / 1e6,
            total / steps as f64 * 1e3,
            longest * 1e3,
            worst * 1e3
        );
    }
    drop(vol);
    let _ = std::fs::remove_file(&path);
}
