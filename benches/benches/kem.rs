//! Hybrid ML-KEM-1024 + X25519 KEM (qvol-keys): key derivation from a seed, encapsulation,
//! decapsulation, and a whole recipient keyslot wrap/unwrap. Goal: encapsulate and
//! decapsulate each under 1 ms. Run: `cargo bench -p benches --bench kem`.

use criterion::{criterion_group, criterion_main, Criterion};
use qvol_keys::kem::{self, HybridSecretKey};
use qvol_keys::keyslot;
use qvol_keys::Secret32;

fn bench_kem(c: &mut Criterion) {
    let sk = HybridSecretKey::from_seed(&Secret32::from_bytes([7; 32]));
    let pk = sk.public_key().clone();
    let (ct, _) = kem::encapsulate(&pk).expect("encapsulation to a valid key");

    let mut g = c.benchmark_group("hybrid-kem ML-KEM-1024+X25519");
    g.bench_function("keygen from seed", |b| {
        let seed = Secret32::from_bytes([9; 32]);
        b.iter(|| HybridSecretKey::from_seed(&seed))
    });
    g.bench_function("encapsulate", |b| {
        b.iter(|| kem::encapsulate(&pk).expect("encapsulate"))
    });
    g.bench_function("decapsulate", |b| {
        b.iter(|| sk.decapsulate(&ct[..]).expect("decapsulate"))
    });
    g.finish();

    let vk = Secret32::random();
    let volume_id = [1u8; 16];
    let slot = keyslot::wrap_for_recipient(&pk, "bench-key", &volume_id, &vk).expect("wrap");
    let slots = vec![slot];
    let mut g = c.benchmark_group("recipient keyslot");
    g.bench_function("wrap", |b| {
        b.iter(|| keyslot::wrap_for_recipient(&pk, "bench-key", &volume_id, &vk).expect("wrap"))
    });
    g.bench_function("unwrap", |b| {
        b.iter(|| keyslot::unwrap_with_secret_key(&slots, &sk, &volume_id).expect("unwrap"))
    });
    g.finish();
}

criterion_group!(benches, bench_kem);
criterion_main!(benches);
