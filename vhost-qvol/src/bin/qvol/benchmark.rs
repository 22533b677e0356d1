//! `qvol benchmark [--seconds S] [--suite SUITE] [--json]`: how fast this CPU runs the
//! cipher suites (the implementation in use beside the reference one), the hybrid KEM and
//! the keystore's argon2id, as `cryptsetup benchmark` does for LUKS.
//!
//! Memory only: no storage I/O. Every key, seed, passphrase and block is random and thrown
//! away; nothing secret is printed. MB are 10^6 bytes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qvol_core::suite::{self, CipherSuite, SuiteCipher, Tag, MAX_NONCE_LEN, TAG_LEN};
use qvol_keys::kem::{self, HybridSecretKey, KEM_NAME};
use qvol_keys::{KdfParams, Secret32};
use serde_json::{json, Value};
use vhost_qvol::size::format_size;

/// The unit every suite seals: one 4 KiB data block.
const BLOCK: usize = qvol_core::BLOCK_SIZE as usize;
/// Associated data per block, as long as a data block's (FORMAT.md §5).
const AD_LEN: usize = 40;
/// Blocks sealed, then opened, per timed batch (256 KiB: one `Instant` pair per batch
/// costs nothing beside the work).
const BATCH_BLOCKS: usize = 64;
/// The longest `--seconds` accepted.
const MAX_SECONDS: f64 = 60.0;

/// `qvol benchmark`
#[derive(Debug, clap::Args)]
pub struct BenchmarkArgs {
    /// Seconds of timed work behind each figure (seal and open of each implementation, each
    /// KEM operation); the argon2id unlock is always timed once.
    #[arg(long, value_name = "S", default_value_t = 0.25)]
    pub seconds: f64,
    /// Only this cipher suite (xchacha20-poly1305 or aegis-256) [default: both].
    #[arg(long, value_name = "SUITE")]
    pub suite: Option<CipherSuite>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The time per block of sealing and of opening, for one implementation.
#[derive(Clone, Copy, Debug)]
struct AeadSpeed {
    seal_ns: f64,
    open_ns: f64,
}

/// One suite: the implementation in use and the reference one, each named.
#[derive(Debug)]
struct SuiteResult {
    suite: CipherSuite,
    in_use: (&'static str, AeadSpeed),
    reference: (&'static str, AeadSpeed),
}

/// Mean time of each hybrid KEM operation, in nanoseconds.
#[derive(Debug)]
struct KemResult {
    keygen_ns: f64,
    encapsulate_ns: f64,
    decapsulate_ns: f64,
}

/// Runs `qvol benchmark`.
pub fn run(args: BenchmarkArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= MAX_SECONDS) {
        bail!(
            "--seconds must be more than 0 and at most {MAX_SECONDS}, not {}",
            args.seconds
        );
    }
    let budget = Duration::from_secs_f64(args.seconds);
    let suites: Vec<CipherSuite> = match args.suite {
        Some(suite) => vec![suite],
        None => CipherSuite::ALL.to_vec(),
    };
    let suites = suites
        .into_iter()
        .map(|suite| measure_suite(suite, budget))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kem = measure_kem(budget)?;
    let kdf = KdfParams::from_env();
    let unlock = measure_unlock(&kdf)?;
    if args.json {
        let doc = to_json(args.seconds, &suites, &kem, &kdf, unlock);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_human(args.seconds, &suites, &kem, &kdf, unlock);
    }
    Ok(())
}

/// Both implementations of `suite`; the reference is measured only when it is other code.
fn measure_suite(suite: CipherSuite, budget: Duration) -> anyhow::Result<SuiteResult> {
    let key = Secret32::random();
    let in_use = measure_aead(&suite.cipher(key.expose()), budget)?;
    let reference = if suite.reference_implementation() == suite.implementation() {
        in_use
    } else {
        measure_aead(&suite.reference_cipher(key.expose()), budget)?
    };
    Ok(SuiteResult {
        suite,
        in_use: (suite.implementation(), in_use),
        reference: (suite.reference_implementation(), reference),
    })
}

/// Seals a batch of random blocks in place, then opens them again, until sealing and
/// opening have each taken `budget` (after one untimed batch to warm up).
fn measure_aead(cipher: &SuiteCipher, budget: Duration) -> anyhow::Result<AeadSpeed> {
    let suite = cipher.suite();
    let nonce_len = suite.nonce_len();
    let mut blocks = vec![[0u8; BLOCK]; BATCH_BLOCKS];
    for block in &mut blocks {
        getrandom::getrandom(block).context("the system's random source failed")?;
    }
    let mut ad = [0u8; AD_LEN];
    getrandom::getrandom(&mut ad).context("the system's random source failed")?;
    let mut nonces: Vec<[u8; MAX_NONCE_LEN]> = (0..BATCH_BLOCKS)
        .map(|_| suite::random_nonce(suite))
        .collect();
    let mut tags: Vec<Tag> = vec![[0; TAG_LEN]; BATCH_BLOCKS];
    let (mut sealing, mut opening, mut batches) = (Duration::ZERO, Duration::ZERO, 0u32);
    let mut sequence = 0u64;
    for round in 0u32.. {
        // A nonce of its own for every seal: a random one with a counter in its first bytes.
        for nonce in &mut nonces {
            sequence += 1;
            nonce[..8].copy_from_slice(&sequence.to_le_bytes());
        }
        let start = Instant::now();
        for ((block, nonce), tag) in blocks.iter_mut().zip(&nonces).zip(&mut tags) {
            *tag = cipher.seal(&nonce[..nonce_len], &ad, block);
        }
        let sealed = start.elapsed();
        let start = Instant::now();
        for ((block, nonce), tag) in blocks.iter_mut().zip(&nonces).zip(&tags) {
            if cipher.open(&nonce[..nonce_len], &ad, block, tag).is_err() {
                bail!("{suite}: a block just sealed did not open");
            }
        }
        let opened = start.elapsed();
        if round == 0 {
            continue;
        }
        sealing += sealed;
        opening += opened;
        batches += 1;
        if sealing >= budget && opening >= budget {
            break;
        }
    }
    let blocks_done = f64::from(batches) * BATCH_BLOCKS as f64;
    Ok(AeadSpeed {
        seal_ns: sealing.as_nanos() as f64 / blocks_done,
        open_ns: opening.as_nanos() as f64 / blocks_done,
    })
}

/// Key generation from a fresh random seed, encapsulation to its public key and
/// decapsulation, in turn, until each has taken `budget`.
fn measure_kem(budget: Duration) -> anyhow::Result<KemResult> {
    let mut spent = [Duration::ZERO; 3];
    let mut rounds = 0u32;
    while spent.iter().any(|&t| t < budget) {
        let seed = Secret32::random();
        let start = Instant::now();
        let secret_key = HybridSecretKey::from_seed(&seed);
        spent[0] += start.elapsed();
        let start = Instant::now();
        let (ciphertext, shared) = kem::encapsulate(secret_key.public_key())?;
        spent[1] += start.elapsed();
        let start = Instant::now();
        let recovered = secret_key.decapsulate(&ciphertext[..])?;
        spent[2] += start.elapsed();
        if recovered != shared {
            bail!("{KEM_NAME}: decapsulation did not recover the encapsulated secret");
        }
        rounds += 1;
    }
    let mean = |t: Duration| t.as_nanos() as f64 / f64::from(rounds);
    Ok(KemResult {
        keygen_ns: mean(spent[0]),
        encapsulate_ns: mean(spent[1]),
        decapsulate_ns: mean(spent[2]),
    })
}

/// One argon2id derivation with `kdf`, from a random passphrase and salt: what unlocking a
/// keystore made with these parameters costs.
fn measure_unlock(kdf: &KdfParams) -> anyhow::Result<Duration> {
    let passphrase = Secret32::random();
    let mut salt = [0u8; 32];
    getrandom::getrandom(&mut salt).context("the system's random source failed")?;
    let (_, took) = kdf.derive(passphrase.expose(), &salt)?;
    Ok(took)
}

/// MB (10^6 bytes) per second at `ns` per block.
fn mb_per_s(ns: f64) -> f64 {
    BLOCK as f64 * 1e3 / ns
}

fn speed_json(name: &str, speed: AeadSpeed) -> Value {
    json!({
        "name": name,
        "seal_mb_per_s": mb_per_s(speed.seal_ns),
        "seal_ns_per_block": speed.seal_ns,
        "open_mb_per_s": mb_per_s(speed.open_ns),
        "open_ns_per_block": speed.open_ns,
    })
}

fn to_json(
    seconds: f64,
    suites: &[SuiteResult],
    kem: &KemResult,
    kdf: &KdfParams,
    unlock: Duration,
) -> Value {
    let features: serde_json::Map<String, Value> = suite::cpu_features()
        .into_iter()
        .map(|(name, present)| (name.to_string(), Value::Bool(present)))
        .collect();
    let suites: Vec<Value> = suites
        .iter()
        .map(|s| {
            json!({
                "suite": s.suite.name(),
                "implementation": speed_json(s.in_use.0, s.in_use.1),
                "reference": speed_json(s.reference.0, s.reference.1),
            })
        })
        .collect();
    json!({
        "seconds_per_measurement": seconds,
        "block_bytes": BLOCK,
        "cpu": {"arch": std::env::consts::ARCH, "features": features},
        "suites": suites,
        "kem": {
            "name": KEM_NAME,
            "keygen_us": kem.keygen_ns / 1e3,
            "encapsulate_us": kem.encapsulate_ns / 1e3,
            "decapsulate_us": kem.decapsulate_ns / 1e3,
        },
        "kdf": {
            "algorithm": "argon2id",
            "memory_kib": kdf.m_cost_kib,
            "iterations": kdf.t_cost,
            "lanes": kdf.p_cost,
            "unlock_ms": unlock.as_secs_f64() * 1e3,
        },
    })
}

fn print_human(
    seconds: f64,
    suites: &[SuiteResult],
    kem: &KemResult,
    kdf: &KdfParams,
    unlock: Duration,
) {
    println!("# In memory only (no storage I/O); {seconds} s of work behind each figure.");
    let features: Vec<String> = suite::cpu_features()
        .into_iter()
        .map(|(name, present)| format!("{name} {}", if present { "yes" } else { "no" }))
        .collect();
    println!("CPU ({}): {}", std::env::consts::ARCH, features.join(", "));
    println!();
    println!(
        "{:<20}{:<11}{:>10}{:>10}{:>11}{:>10}  implementation",
        "4 KiB blocks", "", "seal MB/s", "ns/block", "open MB/s", "ns/block"
    );
    for s in suites {
        print_speed_row(s.suite.name(), "in use", s.in_use);
        if s.reference.0 == s.in_use.0 {
            println!(
                "{:<20}{:<11}{:>51}  {}",
                s.suite.name(),
                "reference",
                "(same code as in use)",
                s.reference.0
            );
        } else {
            print_speed_row(s.suite.name(), "reference", s.reference);
        }
    }
    println!();
    println!("{KEM_NAME} hybrid KEM, per operation:");
    println!("  key generation {:>10.1} µs", kem.keygen_ns / 1e3);
    println!("  encapsulate    {:>10.1} µs", kem.encapsulate_ns / 1e3);
    println!("  decapsulate    {:>10.1} µs", kem.decapsulate_ns / 1e3);
    println!();
    println!(
        "Keystore unlock (argon2id, {} memory, {} iterations, {} lanes, as a new keystore \
         uses): {:.3} s",
        format_size(u64::from(kdf.m_cost_kib) * 1024),
        kdf.t_cost,
        kdf.p_cost,
        unlock.as_secs_f64()
    );
}

fn print_speed_row(suite: &str, role: &str, (name, speed): (&str, AeadSpeed)) {
    println!(
        "{suite:<20}{role:<11}{:>10.1}{:>10.0}{:>11.1}{:>10.0}  {name}",
        mb_per_s(speed.seal_ns),
        speed.seal_ns,
        mb_per_s(speed.open_ns),
        speed.open_ns
    );
}
