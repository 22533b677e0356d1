//! Secret byte containers: zeroized on drop, locked in RAM where the OS allows, printed as
//! `[REDACTED]`, compared in constant time.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::mlock;

/// 32 secret bytes (a seed, a volume key, a wrapping key).
///
/// Boxed so that the bytes never move after they are locked in RAM; zeroized on drop.
pub struct Secret32(Box<[u8; 32]>);

impl Secret32 {
    /// Takes ownership of `bytes`; the caller should zeroize its own copy.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        let mut secret = Secret32::zero();
        secret.0.copy_from_slice(&bytes);
        bytes.zeroize();
        secret
    }

    /// Copies a 32-byte slice; `None` if `bytes` is not 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let mut secret = Secret32::zero();
        secret.0.copy_from_slice(bytes);
        Some(secret)
    }

    /// 32 fresh bytes from the OS CSPRNG.
    pub fn random() -> Self {
        let mut secret = Secret32::zero();
        fill_random(&mut secret.0[..]);
        secret
    }

    /// The secret bytes. Do not copy them into a type that is not zeroized.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Mutable access for filling the secret in place (KDF output, decryption).
    pub(crate) fn expose_mut(&mut self) -> &mut [u8; 32] {
        &mut self.0
    }

    pub(crate) fn zero() -> Self {
        let secret = Secret32(Box::new([0u8; 32]));
        mlock::lock(&secret.0[..]);
        secret
    }
}

impl Clone for Secret32 {
    fn clone(&self) -> Self {
        let mut copy = Secret32::zero();
        copy.0.copy_from_slice(&self.0[..]);
        copy
    }
}

impl Drop for Secret32 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for Secret32 {}

impl ConstantTimeEq for Secret32 {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0[..].ct_eq(&other.0[..])
    }
}

impl PartialEq for Secret32 {
    /// Constant time.
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for Secret32 {}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32([REDACTED])")
    }
}

/// A passphrase or other variable-length secret: zeroized on drop, redacted in Debug.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        let secret = SecretBytes(Zeroizing::new(bytes));
        mlock::lock(&secret.0);
        secret
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes([REDACTED])")
    }
}

/// Fills `buf` from the OS CSPRNG. Panics only if the OS has no randomness to give, in which
/// case no key can be made safely.
pub(crate) fn fill_random(buf: &mut [u8]) {
    #[allow(clippy::expect_used)]
    getrandom::getrandom(buf).expect("the operating system's random number generator failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret32::from_bytes([0x41; 32]);
        let text = format!("{s:?}");
        assert_eq!(text, "Secret32([REDACTED])");
        assert!(!format!("{:?}", SecretBytes::new(b"hunter2".to_vec())).contains("hunter2"));
    }

    #[test]
    fn random_differs_and_eq_is_by_value() {
        let a = Secret32::random();
        let b = Secret32::random();
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
        assert_eq!(
            Secret32::from_slice(&[7; 32]).unwrap(),
            Secret32::from_bytes([7; 32])
        );
        assert!(Secret32::from_slice(&[7; 31]).is_none());
    }
}
