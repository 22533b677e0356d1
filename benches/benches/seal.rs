//! Block seal/open for each cipher suite, next to the raw primitive it is built on.
//!
//! Goal (issue 3): `SuiteCipher::seal`/`open` of a 4 KiB block reach at least 90% of the raw
//! primitive's throughput. Run: `cargo bench -p benches --bench seal`.

use std::hint::black_box;
use std::time::Duration;

use aegis::aegis256::Aegis256;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qvol_core::suite::CipherSuite;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const SIZES: [usize; 2] = [4096, 65536];
const KEY: [u8; 32] = [0x42; 32];
const NONCE: [u8; 32] = [0x24; 32];
const AD: [u8; 32] = [0x11; 32];

fn suite_seal_open(c: &mut Criterion) {
    for suite in CipherSuite::ALL {
        let mut group = c.benchmark_group(suite.name());
        let n = suite.nonce_len();
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0xa5u8; size];

            let cipher = suite.cipher(&KEY);
            group.bench_with_input(BenchmarkId::new("suite seal", size), &size, |b, _| {
                b.iter(|| black_box(cipher.seal(&NONCE[..n], &AD, &mut buf)))
            });
            let tag = cipher.seal(&NONCE[..n], &AD, &mut buf);
            let sealed = buf.clone();
            group.bench_with_input(BenchmarkId::new("suite open", size), &size, |b, _| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    black_box(cipher.open(&NONCE[..n], &AD, &mut buf, &tag))
                })
            });
            group.bench_with_input(BenchmarkId::new("copy only", size), &size, |b, _| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    black_box(&mut buf);
                })
            });

            match suite {
                CipherSuite::XChaCha20Poly1305 => raw_chacha(&mut group, size, &mut buf),
                CipherSuite::Aegis256 => raw_aegis(&mut group, size, &mut buf),
            }
        }
        group.finish();
    }
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn raw_chacha(group: &mut Group<'_>, size: usize, buf: &mut [u8]) {
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).expect("32-byte key"));
    group.bench_with_input(
        BenchmarkId::new("raw ring chacha20-poly1305 seal", size),
        &size,
        |b, _| {
            b.iter(|| {
                let nonce = Nonce::assume_unique_for_key([7; 12]);
                black_box(key.seal_in_place_separate_tag(nonce, Aad::from(&AD), buf))
            })
        },
    );
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key([7; 12]), Aad::from(&AD), buf)
        .expect("a short message");
    let sealed = buf.to_vec();
    group.bench_with_input(
        BenchmarkId::new("raw ring chacha20-poly1305 open", size),
        &size,
        |b, _| {
            b.iter(|| {
                buf.copy_from_slice(&sealed);
                let nonce = Nonce::assume_unique_for_key([7; 12]);
                black_box(
                    key.open_in_place_separate_tag(nonce, Aad::from(&AD), tag, buf, 0..)
                        .is_ok(),
                )
            })
        },
    );
    group.bench_with_input(
        BenchmarkId::new("hchacha20 subkey only", size),
        &size,
        |b, _| {
            b.iter(|| {
                black_box(chacha20::hchacha::<chacha20::cipher::consts::U10>(
                    (&KEY).into(),
                    NONCE[..16].into(),
                ))
            })
        },
    );
    let rc = XChaCha20Poly1305::new(&KEY.into());
    group.bench_with_input(
        BenchmarkId::new("raw RustCrypto xchacha20-poly1305 seal", size),
        &size,
        |b, _| b.iter(|| black_box(rc.encrypt_in_place_detached(NONCE[..24].into(), &AD, buf))),
    );
}

fn raw_aegis(group: &mut Group<'_>, size: usize, buf: &mut [u8]) {
    group.bench_with_input(BenchmarkId::new("raw aegis seal", size), &size, |b, _| {
        b.iter(|| black_box(Aegis256::<16>::new(&KEY, &NONCE).encrypt_in_place(buf, &AD)))
    });
    let tag = Aegis256::<16>::new(&KEY, &NONCE).encrypt_in_place(buf, &AD);
    let sealed = buf.to_vec();
    group.bench_with_input(BenchmarkId::new("raw aegis open", size), &size, |b, _| {
        b.iter(|| {
            buf.copy_from_slice(&sealed);
            black_box(Aegis256::<16>::new(&KEY, &NONCE).decrypt_in_place(buf, &tag, &AD))
        })
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = suite_seal_open
}
criterion_main!(benches);
