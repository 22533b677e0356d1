//! XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03, RFC 8439) for wrapping small secrets:
//! keyslots, the keystore's master seed, imported seeds and export files. The 192-bit nonce
//! is random for every wrap, so nonce reuse is negligible without any state.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};

use crate::error::{Error, ErrorKind, Result};
use crate::secret::{fill_random, Secret32};

/// Nonce length.
pub const NONCE_LEN: usize = 24;
/// Tag length.
pub const TAG_LEN: usize = 16;

/// A fresh random nonce.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n);
    n
}

/// Encrypts `buf` in place under `key`, returning the tag.
pub fn seal(key: &Secret32, nonce: &[u8; NONCE_LEN], ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.expose()));
    match cipher.encrypt_in_place_detached(XNonce::from_slice(nonce), ad, buf) {
        Ok(tag) => tag.into(),
        // Only fails for messages over 256 GiB; ours are a few hundred bytes.
        Err(_) => unreachable!("XChaCha20-Poly1305 cannot fail on a small message"),
    }
}

/// Decrypts `buf` in place; on failure `buf` is zeroized and an Integrity error returned
/// whose message is `what`.
pub fn open(
    key: &Secret32,
    nonce: &[u8],
    ad: &[u8],
    buf: &mut [u8],
    tag: &[u8],
    what: &str,
) -> Result<()> {
    if nonce.len() != NONCE_LEN || tag.len() != TAG_LEN {
        return Err(Error::corrupt(
            "an encrypted field has a malformed nonce or tag",
        ));
    }
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.expose()));
    let res =
        cipher.decrypt_in_place_detached(XNonce::from_slice(nonce), ad, buf, Tag::from_slice(tag));
    if res.is_err() {
        zeroize::Zeroize::zeroize(buf);
        return Err(Error::new(ErrorKind::Integrity, what));
    }
    Ok(())
}
