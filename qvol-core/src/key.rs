//! The volume key: 32 secret bytes, unique to a volume, wrapped in its keyslots by qvol-keys.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use crate::secret::Secret;

/// A volume's 32-byte secret key. Zeroized on drop; `Debug` prints `[REDACTED]`. The bytes
/// live on a page of their own, locked in RAM and left out of core dumps where the OS allows.
pub struct VolumeKey {
    bytes: Secret<Zeroizing<[u8; 32]>>,
}

impl Clone for VolumeKey {
    fn clone(&self) -> Self {
        let mut bytes = Secret::new(Zeroizing::new([0u8; 32]));
        bytes.copy_from_slice(self.expose());
        VolumeKey { bytes }
    }
}

impl VolumeKey {
    /// Wraps 32 secret bytes (the caller should zeroize its own copy).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut bytes = bytes;
        let mut locked = Secret::new(Zeroizing::new([0u8; 32]));
        locked.copy_from_slice(&bytes);
        bytes.zeroize();
        VolumeKey { bytes: locked }
    }

    /// A fresh random key from the OS CSPRNG.
    ///
    /// # Panics
    /// If the operating system's random source fails.
    pub fn generate() -> Self {
        let mut bytes = Secret::new(Zeroizing::new([0u8; 32]));
        if let Err(e) = getrandom::getrandom(bytes.as_mut_slice()) {
            panic!("the operating system's random number generator failed: {e}");
        }
        VolumeKey { bytes }
    }

    /// The secret bytes, to wrap the key in a keyslot.
    pub fn expose(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let key = VolumeKey::from_bytes([0x41; 32]);
        assert_eq!(format!("{key:?}"), "VolumeKey([REDACTED])");
        assert_ne!(
            VolumeKey::generate().expose(),
            VolumeKey::generate().expose()
        );
    }
}
