//! How much space zstd compression would save on a disk image, by compression unit size
//! (issue 16's design measurement, docs/FORMAT.md §18): every aligned unit of N 4 KiB blocks
//! holding data is packed with qvol-core's unit codec (`qvol_core::unit`) and stored in the
//! `k` blocks it needs, when that is fewer than the unit's non-zero blocks; all-zero blocks
//! are holes, as in a volume the guest never wrote them. Also the time to pack (compress) a
//! unit and to open it (authenticate, decrypt and decompress, xchacha20-poly1305), which a
//! read of one block of a compressed unit pays.
//!
//!     cargo run --release -p benches --bin compress_units -- IMAGE [--units 1,2,4,8,16] [--level 3]

use std::io::Read;
use std::time::{Duration, Instant};

use clap::Parser;
use qvol_core::unit;
use qvol_core::CipherSuite;

const BLOCK: usize = 4096;

#[derive(Parser)]
#[command(about = "Space saved by zstd compression units on a disk image")]
struct Args {
    /// A raw disk image (a filesystem of real files).
    image: std::path::PathBuf,
    /// Unit sizes to try, in 4 KiB blocks.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    units: Vec<usize>,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
}

/// Totals for one unit size.
#[derive(Default)]
struct Totals {
    units: u64,
    plain_blocks: u64,
    stored_blocks: u64,
    compressed_units: u64,
    compress: Duration,
    decompress: Duration,
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut file = std::fs::File::open(&args.image)
        .map_err(|e| format!("cannot open {}: {e}", args.image.display()))?;
    let mut image = Vec::new();
    file.read_to_end(&mut image)
        .map_err(|e| format!("cannot read {}: {e}", args.image.display()))?;
    println!(
        "{}: {} MiB, level {}",
        args.image.display(),
        image.len() >> 20,
        args.level
    );
    println!("| unit | units with data | plain blocks | stored blocks | saving | compressed units | pack MB/s | open µs/unit |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &args.units {
        let t = measure(&image, n, args.level)?;
        let bytes = (t.units as usize * n * BLOCK) as f64;
        if t.compressed_units == 0 {
            println!(
                "| {} KiB | {} | {} | {} | 1.00× | 0 | — | — |",
                n * 4,
                t.units,
                t.plain_blocks,
                t.stored_blocks
            );
            continue;
        }
        println!(
            "| {} KiB | {} | {} | {} | {:.2}× | {} | {:.0} | {:.1} |",
            n * 4,
            t.units,
            t.plain_blocks,
            t.stored_blocks,
            t.plain_blocks as f64 / t.stored_blocks.max(1) as f64,
            t.compressed_units,
            bytes / t.compress.as_secs_f64().max(1e-9) / 1e6,
            t.decompress.as_secs_f64() * 1e6 / t.compressed_units.max(1) as f64,
        );
    }
    Ok(())
}

fn measure(image: &[u8], n: usize, level: i32) -> Result<Totals, String> {
    let log2_n = n.trailing_zeros() as u8;
    let cipher = CipherSuite::XChaCha20Poly1305.cipher(&[1; 32]);
    let mut t = Totals::default();
    let mut out = vec![0u8; n * BLOCK];
    for (u, unit) in image.chunks(n * BLOCK).enumerate() {
        let nonzero = unit
            .chunks(BLOCK)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64;
        if nonzero == 0 {
            continue;
        }
        t.units += 1;
        t.plain_blocks += nonzero;
        if n == 1 || unit.len() != n * BLOCK {
            t.stored_blocks += nonzero;
            continue;
        }
        let started = Instant::now();
        let packed = unit::pack(unit, level).map_err(|e| e.to_string())?;
        t.compress += started.elapsed();
        let Some(mut packed) = packed.filter(|p| u64::from(p.k) < nonzero) else {
            t.stored_blocks += nonzero;
            continue;
        };
        t.stored_blocks += u64::from(packed.k);
        t.compressed_units += 1;
        let place = unit::UnitPlace {
            volume_id: &[2; 16],
            first_lbn: (u * n) as u64,
            epoch: 0,
            log2_n,
        };
        let nonce = [9u8; 24];
        let tag = unit::seal_unit(&cipher, &place, &nonce, &mut packed);
        let started = Instant::now();
        unit::open_unit(&cipher, &place, (&nonce, &tag), &mut packed.bytes, &mut out)
            .map_err(|e| e.to_string())?;
        t.decompress += started.elapsed();
        if out != unit {
            return Err("a unit did not open to itself".into());
        }
    }
    Ok(t)
}
