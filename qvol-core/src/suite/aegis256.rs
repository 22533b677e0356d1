//! AEGIS-256, draft-irtf-cfrg-aegis-aead (section 3 of the draft: 256-bit key, 256-bit
//! nonce; we use the 128-bit tag variant).
//!
//! The `aegis` crate (libaegis) dispatches at run time between AES-NI (x86_64), the ARMv8
//! crypto extensions (aarch64) and a constant-time software AES.

use aegis::aegis256::Aegis256;

use super::{AuthError, Tag, TAG_LEN};

/// AEGIS-256 nonces are 256 bits.
pub(super) const NONCE_LEN: usize = 32;

fn nonce_array(nonce: &[u8]) -> &[u8; NONCE_LEN] {
    match nonce.try_into() {
        Ok(n) => n,
        Err(_) => unreachable!("callers check the nonce length"),
    }
}

pub(super) fn seal(key: &[u8; 32], nonce: &[u8], ad: &[u8], buf: &mut [u8]) -> Tag {
    Aegis256::<TAG_LEN>::new(key, nonce_array(nonce)).encrypt_in_place(buf, ad)
}

pub(super) fn open(
    key: &[u8; 32],
    nonce: &[u8],
    ad: &[u8],
    buf: &mut [u8],
    tag: &Tag,
) -> Result<(), AuthError> {
    Aegis256::<TAG_LEN>::new(key, nonce_array(nonce))
        .decrypt_in_place(buf, tag, ad)
        .map_err(|_| AuthError)
}
