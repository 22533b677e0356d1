//! The cipher suites: known-answer vectors from the specifications, and property tests that
//! the fast implementations give the same bytes as independent reference implementations.
//!
//! - xchacha20-poly1305: `CipherSuite::cipher` (ring ChaCha20-Poly1305 + HChaCha20) against
//!   `CipherSuite::reference_cipher` (RustCrypto `chacha20poly1305`).
//! - aegis-256: `CipherSuite::cipher` (libaegis) against `aegis_ref` below, a plain
//!   transcription of draft-irtf-cfrg-aegis-aead written for this test with its own
//!   software AES round, sharing no code with libaegis.

use proptest::prelude::*;
use qvol_core::suite::{random_nonce, AuthError, CipherSuite, SuiteCipher, Tag, MAX_NONCE_LEN};

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vectors are valid hex")
}

fn key32(s: &str) -> [u8; 32] {
    h(s).try_into().expect("32-byte key")
}

fn tag16(s: &str) -> Tag {
    h(s).try_into().expect("16-byte tag")
}

/// An independent AEGIS-256 (draft-irtf-cfrg-aegis-aead, section 3), slow and simple.
mod aegis_ref {
    type Block = [u8; 16];

    /// GF(2^8) multiplication modulo x^8 + x^4 + x^3 + x + 1 (FIPS 197 section 4.2).
    fn gmul(mut a: u8, mut b: u8) -> u8 {
        let mut p = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                p ^= a;
            }
            let hi = a & 0x80;
            a <<= 1;
            if hi != 0 {
                a ^= 0x1b;
            }
            b >>= 1;
        }
        p
    }

    /// The AES S-box computed from its definition (FIPS 197 section 5.1.1): the
    /// multiplicative inverse followed by the affine transformation.
    fn sbox_entry(x: u8) -> u8 {
        let inv = if x == 0 {
            0
        } else {
            (1..=255u8).find(|&y| gmul(x, y) == 1).unwrap_or(0)
        };
        inv ^ inv.rotate_left(1)
            ^ inv.rotate_left(2)
            ^ inv.rotate_left(3)
            ^ inv.rotate_left(4)
            ^ 0x63
    }

    fn sbox(x: u8) -> u8 {
        static TABLE: std::sync::OnceLock<[u8; 256]> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| std::array::from_fn(|i| sbox_entry(i as u8)))[usize::from(x)]
    }

    /// AESRound(in, rk) = MixColumns(ShiftRows(SubBytes(in))) ^ rk (draft section 2).
    pub fn aes_round(input: &Block, rk: &Block) -> Block {
        let mut s = [0u8; 16];
        // SubBytes and ShiftRows; byte i is row i % 4, column i / 4.
        for c in 0..4 {
            for r in 0..4 {
                s[r + 4 * c] = sbox(input[r + 4 * ((c + r) % 4)]);
            }
        }
        let mut out = [0u8; 16];
        for c in 0..4 {
            let a = &s[4 * c..4 * c + 4];
            out[4 * c] = gmul(a[0], 2) ^ gmul(a[1], 3) ^ a[2] ^ a[3];
            out[4 * c + 1] = a[0] ^ gmul(a[1], 2) ^ gmul(a[2], 3) ^ a[3];
            out[4 * c + 2] = a[0] ^ a[1] ^ gmul(a[2], 2) ^ gmul(a[3], 3);
            out[4 * c + 3] = gmul(a[0], 3) ^ a[1] ^ a[2] ^ gmul(a[3], 2);
        }
        for i in 0..16 {
            out[i] ^= rk[i];
        }
        out
    }

    fn xor(a: &Block, b: &Block) -> Block {
        std::array::from_fn(|i| a[i] ^ b[i])
    }

    fn and(a: &Block, b: &Block) -> Block {
        std::array::from_fn(|i| a[i] & b[i])
    }

    fn block(bytes: &[u8]) -> Block {
        let mut b = [0u8; 16];
        b[..bytes.len()].copy_from_slice(bytes);
        b
    }

    const C0: Block = [
        0x00, 0x01, 0x01, 0x02, 0x03, 0x05, 0x08, 0x0d, 0x15, 0x22, 0x37, 0x59, 0x90, 0xe9, 0x79,
        0x62,
    ];
    const C1: Block = [
        0xdb, 0x3d, 0x18, 0x55, 0x6d, 0xc2, 0x2f, 0xf1, 0x20, 0x11, 0x31, 0x42, 0x73, 0xb5, 0x28,
        0xdd,
    ];

    struct State([Block; 6]);

    impl State {
        /// Section 3.2.1 Update(M).
        fn update(&mut self, m: &Block) {
            let s = &self.0;
            self.0 = [
                aes_round(&s[5], &xor(&s[0], m)),
                aes_round(&s[0], &s[1]),
                aes_round(&s[1], &s[2]),
                aes_round(&s[2], &s[3]),
                aes_round(&s[3], &s[4]),
                aes_round(&s[4], &s[5]),
            ];
        }

        /// Section 3.2.2 Init(key, nonce).
        fn init(key: &[u8; 32], nonce: &[u8; 32]) -> State {
            let (k0, k1) = (block(&key[..16]), block(&key[16..]));
            let (n0, n1) = (block(&nonce[..16]), block(&nonce[16..]));
            let mut st = State([
                xor(&k0, &n0),
                xor(&k1, &n1),
                C1,
                C0,
                xor(&k0, &C0),
                xor(&k1, &C1),
            ]);
            for _ in 0..4 {
                st.update(&k0);
                st.update(&k1);
                st.update(&xor(&k0, &n0));
                st.update(&xor(&k1, &n1));
            }
            st
        }

        fn keystream(&self) -> Block {
            let s = &self.0;
            xor(&xor(&xor(&s[1], &s[4]), &s[5]), &and(&s[2], &s[3]))
        }

        /// Section 3.2.6 Finalize(ad_len_bits, msg_len_bits), 128-bit tag.
        fn finalize(mut self, ad_len: usize, msg_len: usize) -> [u8; 16] {
            let mut lens = [0u8; 16];
            lens[..8].copy_from_slice(&(ad_len as u64 * 8).to_le_bytes());
            lens[8..].copy_from_slice(&(msg_len as u64 * 8).to_le_bytes());
            let t = xor(&self.0[3], &lens);
            for _ in 0..7 {
                self.update(&t);
            }
            let s = &self.0;
            xor(
                &xor(&xor(&s[0], &s[1]), &xor(&s[2], &s[3])),
                &xor(&s[4], &s[5]),
            )
        }
    }

    /// Section 3.2.3 Encrypt: returns the tag, `buf` becomes the ciphertext.
    pub fn seal(key: &[u8; 32], nonce: &[u8; 32], ad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let mut st = State::init(key, nonce);
        for chunk in ad.chunks(16) {
            st.update(&block(chunk));
        }
        for chunk in buf.chunks_mut(16) {
            let xi = block(chunk);
            let ci = xor(&xi, &st.keystream());
            chunk.copy_from_slice(&ci[..chunk.len()]);
            st.update(&xi);
        }
        st.finalize(ad.len(), buf.len())
    }

    /// Section 3.2.4 Decrypt: `buf` becomes the plaintext; false if the tag is wrong.
    pub fn open(
        key: &[u8; 32],
        nonce: &[u8; 32],
        ad: &[u8],
        buf: &mut [u8],
        tag: &[u8; 16],
    ) -> bool {
        let mut st = State::init(key, nonce);
        for chunk in ad.chunks(16) {
            st.update(&block(chunk));
        }
        for chunk in buf.chunks_mut(16) {
            let xi = xor(&block(chunk), &st.keystream());
            chunk.copy_from_slice(&xi[..chunk.len()]);
            // Section 3.2.5 DecPartial: the state absorbs the zero-padded plaintext.
            st.update(&block(chunk));
        }
        st.finalize(ad.len(), buf.len()) == *tag
    }
}

/// draft-irtf-cfrg-aegis-aead, appendix A.1 "AESRound" test vector.
#[test]
fn aegis_reference_aes_round_matches_the_draft() {
    let out = aegis_ref::aes_round(
        &h("000102030405060708090a0b0c0d0e0f").try_into().unwrap(),
        &h("101112131415161718191a1b1c1d1e1f").try_into().unwrap(),
    );
    assert_eq!(hex::encode(out), "7a7b4e5638782546a8c0477a3b813f43");
}

struct Kat {
    name: &'static str,
    key: &'static str,
    nonce: &'static str,
    ad: &'static str,
    msg: &'static str,
    ct: &'static str,
    tag: &'static str,
}

/// draft-irtf-cfrg-xchacha-03, appendix A.3.1 (AEAD_XChaCha20_Poly1305 test vector).
const XCHACHA_KATS: &[Kat] = &[Kat {
    name: "draft-irtf-cfrg-xchacha-03 A.3.1",
    key: "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
    nonce: "404142434445464748494a4b4c4d4e4f5051525354555657",
    ad: "50515253c0c1c2c3c4c5c6c7",
    msg: "4c616469657320616e642047656e746c656d656e206f662074686520636c6173\
          73206f66202739393a204966204920636f756c64206f6666657220796f75206f\
          6e6c79206f6e652074697020666f7220746865206675747572652c2073756e73\
          637265656e20776f756c642062652069742e",
    ct: "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb\
         731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452\
         2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9\
         21f9664c97637da9768812f615c68b13b52e",
    tag: "c0875924c1c7987947deafd8780acf49",
}];

/// draft-irtf-cfrg-aegis-aead, appendix A.3 (AEGIS-256 test vectors 1 to 5, 128-bit tags).
const AEGIS_KATS: &[Kat] = &[
    Kat {
        name: "AEGIS-256 test vector 1",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "",
        msg: "00000000000000000000000000000000",
        ct: "754fc3d8c973246dcc6d741412a4b236",
        tag: "3fe91994768b332ed7f570a19ec5896e",
    },
    Kat {
        name: "AEGIS-256 test vector 2",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "",
        msg: "",
        ct: "",
        tag: "e3def978a0f054afd1e761d7553afba3",
    },
    Kat {
        name: "AEGIS-256 test vector 3",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "0001020304050607",
        msg: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        ct: "f373079ed84b2709faee373584585d60accd191db310ef5d8b11833df9dec711",
        tag: "8d86f91ee606e9ff26a01b64ccbdd91d",
    },
    Kat {
        name: "AEGIS-256 test vector 4",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "0001020304050607",
        msg: "000102030405060708090a0b0c0d",
        ct: "f373079ed84b2709faee37358458",
        tag: "c60b9c2d33ceb058f96e6dd03c215652",
    },
    Kat {
        name: "AEGIS-256 test vector 5",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829",
        msg: "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637",
        ct: "57754a7d09963e7c787583a2e7b859bb24fa1e04d49fd550b2511a358e3bca252a9b1b8b30cc4a67",
        tag: "ab8a7d53fd0e98d727accca94925e128",
    },
];

/// draft-irtf-cfrg-aegis-aead, appendix A.3 test vectors 6 to 9: each must fail to open
/// (6: key and nonce swapped, 7: ciphertext changed, 8: AD changed, 9: tag changed).
const AEGIS_BAD: &[Kat] = &[
    Kat {
        name: "AEGIS-256 test vector 6",
        key: "1000020000000000000000000000000000000000000000000000000000000000",
        nonce: "1001000000000000000000000000000000000000000000000000000000000000",
        ad: "0001020304050607",
        msg: "",
        ct: "f373079ed84b2709faee37358458",
        tag: "c60b9c2d33ceb058f96e6dd03c215652",
    },
    Kat {
        name: "AEGIS-256 test vector 7",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "0001020304050607",
        msg: "",
        ct: "f373079ed84b2709faee37358459",
        tag: "c60b9c2d33ceb058f96e6dd03c215652",
    },
    Kat {
        name: "AEGIS-256 test vector 8",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "0001020304050608",
        msg: "",
        ct: "f373079ed84b2709faee37358458",
        tag: "c60b9c2d33ceb058f96e6dd03c215652",
    },
    Kat {
        name: "AEGIS-256 test vector 9",
        key: "1001000000000000000000000000000000000000000000000000000000000000",
        nonce: "1000020000000000000000000000000000000000000000000000000000000000",
        ad: "0001020304050607",
        msg: "",
        ct: "f373079ed84b2709faee37358458",
        tag: "c60b9c2d33ceb058f96e6dd03c215653",
    },
];

fn check_kat(cipher: &SuiteCipher, kat: &Kat) {
    let mut buf = h(kat.msg);
    let tag = cipher.seal(&h(kat.nonce), &h(kat.ad), &mut buf);
    assert_eq!(hex::encode(&buf), kat.ct, "{}: ciphertext", kat.name);
    assert_eq!(hex::encode(tag), kat.tag, "{}: tag", kat.name);
    cipher
        .open(&h(kat.nonce), &h(kat.ad), &mut buf, &tag)
        .unwrap_or_else(|_| panic!("{}: open failed", kat.name));
    assert_eq!(hex::encode(&buf), kat.msg, "{}: plaintext", kat.name);
}

#[test]
fn xchacha_known_answers() {
    for kat in XCHACHA_KATS {
        let key = key32(kat.key);
        check_kat(&CipherSuite::XChaCha20Poly1305.cipher(&key), kat);
        check_kat(&CipherSuite::XChaCha20Poly1305.reference_cipher(&key), kat);
    }
}

#[test]
fn aegis_known_answers() {
    for kat in AEGIS_KATS {
        let key = key32(kat.key);
        check_kat(&CipherSuite::Aegis256.cipher(&key), kat);
        // The independent transcription gives the same bytes.
        let nonce: [u8; 32] = h(kat.nonce).try_into().unwrap();
        let mut buf = h(kat.msg);
        let tag = aegis_ref::seal(&key, &nonce, &h(kat.ad), &mut buf);
        assert_eq!(
            hex::encode(&buf),
            kat.ct,
            "{}: reference ciphertext",
            kat.name
        );
        assert_eq!(hex::encode(tag), kat.tag, "{}: reference tag", kat.name);
    }
}

#[test]
fn aegis_known_forgeries_fail() {
    for kat in AEGIS_BAD {
        let key = key32(kat.key);
        let nonce = h(kat.nonce);
        let mut buf = h(kat.ct);
        let tag = tag16(kat.tag);
        assert_eq!(
            CipherSuite::Aegis256
                .cipher(&key)
                .open(&nonce, &h(kat.ad), &mut buf, &tag),
            Err(AuthError),
            "{} must not open",
            kat.name
        );
        let mut buf = h(kat.ct);
        let nonce: [u8; 32] = nonce.try_into().unwrap();
        assert!(
            !aegis_ref::open(&key, &nonce, &h(kat.ad), &mut buf, &tag),
            "{}",
            kat.name
        );
    }
}

#[test]
fn implementation_names_the_library() {
    assert!(CipherSuite::XChaCha20Poly1305
        .implementation()
        .starts_with("ring"));
    assert!(CipherSuite::Aegis256
        .implementation()
        .starts_with("libaegis"));
    for suite in CipherSuite::ALL {
        println!("{suite}: {}", suite.implementation());
    }
}

/// Message lengths: the edges named in the brief, plus anything up to a few blocks.
fn msg_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1usize),
        Just(4096usize),
        Just(65536usize),
        0usize..9000,
    ]
}

fn inputs() -> impl Strategy<Value = ([u8; 32], [u8; MAX_NONCE_LEN], Vec<u8>, Vec<u8>)> {
    (
        any::<[u8; 32]>(),
        any::<[u8; MAX_NONCE_LEN]>(),
        prop::collection::vec(any::<u8>(), 0..80),
        msg_len().prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
    )
}

/// The same (tag, ciphertext) from the fast path and the reference, for `suite`.
fn seal_both(
    suite: CipherSuite,
    key: &[u8; 32],
    nonce: &[u8],
    ad: &[u8],
    msg: &[u8],
) -> (Tag, Vec<u8>) {
    let mut fast = msg.to_vec();
    let fast_tag = suite.cipher(key).seal(nonce, ad, &mut fast);
    let mut reference = msg.to_vec();
    let ref_tag = match suite {
        CipherSuite::XChaCha20Poly1305 => {
            suite.reference_cipher(key).seal(nonce, ad, &mut reference)
        }
        CipherSuite::Aegis256 => {
            let n: [u8; 32] = nonce.try_into().expect("32-byte nonce");
            aegis_ref::seal(key, &n, ad, &mut reference)
        }
    };
    assert_eq!(
        fast_tag,
        ref_tag,
        "{suite}: tags differ for a {}-byte message",
        msg.len()
    );
    assert!(
        fast == reference,
        "{suite}: ciphertexts differ for a {}-byte message",
        msg.len()
    );
    (fast_tag, fast)
}

/// Every way of opening (fast and reference) must accept the genuine ciphertext and give
/// back `msg`.
fn assert_opens(
    suite: CipherSuite,
    key: &[u8; 32],
    nonce: &[u8],
    ad: &[u8],
    ct: &[u8],
    tag: &Tag,
    msg: &[u8],
) {
    for cipher in [suite.cipher(key), suite.reference_cipher(key)] {
        let mut buf = ct.to_vec();
        assert_eq!(
            cipher.open(nonce, ad, &mut buf, tag),
            Ok(()),
            "{suite}: genuine message refused"
        );
        assert!(buf == msg, "{suite}: open(seal(x)) != x");
    }
}

/// Every way of opening must refuse.
fn assert_refused(
    suite: CipherSuite,
    key: &[u8; 32],
    nonce: &[u8],
    ad: &[u8],
    ct: &[u8],
    tag: &Tag,
    what: &str,
) {
    for cipher in [suite.cipher(key), suite.reference_cipher(key)] {
        let mut buf = ct.to_vec();
        assert_eq!(
            cipher.open(nonce, ad, &mut buf, tag),
            Err(AuthError),
            "{suite}: {what} accepted"
        );
    }
    if suite == CipherSuite::Aegis256 {
        let n: [u8; 32] = nonce.try_into().expect("32-byte nonce");
        let mut buf = ct.to_vec();
        assert!(
            !aegis_ref::open(key, &n, ad, &mut buf, tag),
            "reference AEGIS: {what} accepted"
        );
    }
}

fn flip(bytes: &mut [u8], bit: usize) {
    let bit = bit % (bytes.len() * 8);
    bytes[bit / 8] ^= 1 << (bit % 8);
}

fn check_suite(
    suite: CipherSuite,
    key: [u8; 32],
    nonce: [u8; 32],
    ad: Vec<u8>,
    msg: Vec<u8>,
    bit: usize,
) {
    let nonce = &nonce[..suite.nonce_len()];
    let (tag, ct) = seal_both(suite, &key, nonce, &ad, &msg);
    assert_opens(suite, &key, nonce, &ad, &ct, &tag, &msg);

    if !ct.is_empty() {
        let mut bad = ct.clone();
        flip(&mut bad, bit);
        assert_refused(
            suite,
            &key,
            nonce,
            &ad,
            &bad,
            &tag,
            "a flipped ciphertext bit",
        );
    }
    let mut bad_tag = tag;
    flip(&mut bad_tag, bit);
    assert_refused(suite, &key, nonce, &ad, &ct, &bad_tag, "a flipped tag bit");
    if !ad.is_empty() {
        let mut bad_ad = ad.clone();
        flip(&mut bad_ad, bit);
        assert_refused(suite, &key, nonce, &bad_ad, &ct, &tag, "a flipped AD bit");
    }
    let mut bad_nonce = nonce.to_vec();
    flip(&mut bad_nonce, bit);
    assert_refused(
        suite,
        &key,
        &bad_nonce,
        &ad,
        &ct,
        &tag,
        "a flipped nonce bit",
    );
    let mut bad_key = key;
    flip(&mut bad_key, bit);
    assert_refused(suite, &bad_key, nonce, &ad, &ct, &tag, "a flipped key bit");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn xchacha_fast_equals_reference((key, nonce, ad, msg) in inputs(), bit in any::<usize>()) {
        check_suite(CipherSuite::XChaCha20Poly1305, key, nonce, ad, msg, bit);
    }

    #[test]
    fn aegis_fast_equals_reference((key, nonce, ad, msg) in inputs(), bit in any::<usize>()) {
        check_suite(CipherSuite::Aegis256, key, nonce, ad, msg, bit);
    }
}

/// The lengths the brief names, each checked once more explicitly with a fresh random nonce.
#[test]
fn edge_lengths_round_trip() {
    for suite in CipherSuite::ALL {
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 4095, 4096, 4097, 65536] {
            let key = [len as u8; 32];
            let nonce = random_nonce(suite);
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            check_suite(suite, key, nonce, b"qvol block".to_vec(), msg, len * 13 + 5);
        }
    }
}
