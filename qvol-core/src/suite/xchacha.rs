//! XChaCha20-Poly1305, draft-irtf-cfrg-xchacha-03.
//!
//! Two implementations that must give the same bytes:
//! - the reference: RustCrypto `chacha20poly1305::XChaCha20Poly1305`;
//! - the fast one, built as section 2.3 of the draft describes: derive a subkey with
//!   HChaCha20 (section 2.2) from the key and the first 16 nonce bytes, then run the IETF
//!   ChaCha20-Poly1305 AEAD (RFC 8439) of `ring`, which picks AVX2/SSSE3/NEON code itself,
//!   with the subkey and the 12-byte nonce `0x00000000 || nonce[16..24]`.

use chacha20::cipher::consts::U10;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::{Zeroize, Zeroizing};

use super::{AuthError, Tag};

/// XChaCha20 nonces are 192 bits.
pub(super) const NONCE_LEN: usize = 24;

/// Draft section 2.3 step 1 and 2: the per-nonce subkey and the 96-bit ChaCha20 nonce.
fn derive(key: &[u8; 32], nonce: &[u8]) -> (LessSafeKey, Nonce) {
    debug_assert_eq!(nonce.len(), NONCE_LEN);
    // HChaCha20 (section 2.2) with 10 double rounds over the key and nonce[0..16].
    let mut subkey = chacha20::hchacha::<U10>(key.into(), nonce[..16].into());
    let mut subkey_bytes = Zeroizing::new([0u8; 32]);
    subkey_bytes.copy_from_slice(&subkey);
    subkey.as_mut_slice().zeroize();
    // Section 2.3: "the first 4 bytes of the nonce are set to zero", then nonce[16..24].
    let mut chacha_nonce = [0u8; 12];
    chacha_nonce[4..].copy_from_slice(&nonce[16..24]);
    // ring only fails here for a key of the wrong length, which a [u8; 32] cannot be.
    let unbound = match UnboundKey::new(&CHACHA20_POLY1305, &subkey_bytes[..]) {
        Ok(k) => k,
        Err(_) => unreachable!("ChaCha20-Poly1305 takes a 32-byte key"),
    };
    (
        LessSafeKey::new(unbound),
        Nonce::assume_unique_for_key(chacha_nonce),
    )
}

pub(super) fn ring_seal(key: &[u8; 32], nonce: &[u8], ad: &[u8], buf: &mut [u8]) -> Tag {
    let (key, nonce) = derive(key, nonce);
    match key.seal_in_place_separate_tag(nonce, Aad::from(ad), buf) {
        Ok(tag) => {
            let mut out = [0u8; 16];
            out.copy_from_slice(tag.as_ref());
            out
        }
        // ring refuses only messages longer than 2^38 bytes, far beyond any block.
        Err(_) => panic!("ChaCha20-Poly1305 refused a {}-byte message", buf.len()),
    }
}

pub(super) fn ring_open(
    key: &[u8; 32],
    nonce: &[u8],
    ad: &[u8],
    buf: &mut [u8],
    tag: &Tag,
) -> Result<(), AuthError> {
    let (key, nonce) = derive(key, nonce);
    key.open_in_place_separate_tag(nonce, Aad::from(ad), ring::aead::Tag::from(*tag), buf, 0..)
        .map(|_| ())
        .map_err(|_| AuthError)
}

pub(super) fn rustcrypto_seal(key: &[u8; 32], nonce: &[u8], ad: &[u8], buf: &mut [u8]) -> Tag {
    let cipher = XChaCha20Poly1305::new(key.into());
    match cipher.encrypt_in_place_detached(nonce.into(), ad, buf) {
        Ok(tag) => tag.into(),
        Err(_) => panic!("XChaCha20-Poly1305 refused a {}-byte message", buf.len()),
    }
}

pub(super) fn rustcrypto_open(
    key: &[u8; 32],
    nonce: &[u8],
    ad: &[u8],
    buf: &mut [u8],
    tag: &Tag,
) -> Result<(), AuthError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt_in_place_detached(nonce.into(), ad, buf, tag.into())
        .map_err(|_| AuthError)
}
