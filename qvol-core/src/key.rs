//! The volume key: 32 secret bytes, unique to a volume, wrapped in its keyslots by qvol-keys.

use std::fmt;

use zeroize::Zeroizing;

/// A volume's 32-byte secret key. Zeroized on drop; `Debug` prints `[REDACTED]`.
#[derive(Clone)]
pub struct VolumeKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl VolumeKey {
    /// Wraps 32 secret bytes (the caller should zeroize its own copy).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        VolumeKey {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// A fresh random key from the OS CSPRNG.
    ///
    /// # Panics
    /// If the operating system's random source fails.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        if let Err(e) = getrandom::getrandom(bytes.as_mut()) {
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
