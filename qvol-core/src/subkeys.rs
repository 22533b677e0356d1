//! Purpose-specific subkeys derived from the volume key (docs/FORMAT.md §4), with BLAKE3's
//! key-derivation mode and one fixed context string per purpose.

use std::fmt;

use zeroize::Zeroizing;

use crate::key::VolumeKey;
use crate::suite::{CipherSuite, SuiteCipher};

const CONTEXT_CHECK: &str = "qvol v1 2026-11 key check";
const CONTEXT_META: &str = "qvol v1 2026-11 metadata mac";
const CONTEXT_LOG: &str = "qvol v1 2026-11 log mac";
const CONTEXT_DATA: &str = "qvol v1 2026-11 data key";

/// The subkeys of one volume. Zeroized on drop, never printed.
pub(crate) struct Subkeys {
    meta: Zeroizing<[u8; 32]>,
    log: Zeroizing<[u8; 32]>,
    check: Zeroizing<[u8; 32]>,
    data: SuiteCipher,
    volume_id: [u8; 16],
}

impl Subkeys {
    /// Derives every subkey of `key` for the volume `volume_id` (key epoch 0).
    pub(crate) fn derive(key: &VolumeKey, suite: CipherSuite, volume_id: [u8; 16]) -> Self {
        let vk = key.expose();
        let data_key = data_key(vk, 0);
        Subkeys {
            meta: Zeroizing::new(blake3::derive_key(CONTEXT_META, vk)),
            log: Zeroizing::new(blake3::derive_key(CONTEXT_LOG, vk)),
            check: Zeroizing::new(blake3::derive_key(CONTEXT_CHECK, vk)),
            data: suite.cipher(&data_key),
            volume_id,
        }
    }

    /// The key-check value written in the header.
    pub(crate) fn key_check(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.check);
        h.update(b"qvol key check v1");
        h.update(&self.volume_id);
        *h.finalize().as_bytes()
    }

    /// A hasher keyed for metadata MACs (superblocks, tree nodes).
    pub(crate) fn meta_mac(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.meta)
    }

    /// A hasher keyed for log-record MACs.
    pub(crate) fn log_mac(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.log)
    }

    /// The data cipher for key epoch `epoch`, if this version supports it (only epoch 0).
    pub(crate) fn data(&self, epoch: u32) -> Option<&SuiteCipher> {
        (epoch == 0).then_some(&self.data)
    }

    /// The volume id the keys belong to.
    pub(crate) fn volume_id(&self) -> &[u8; 16] {
        &self.volume_id
    }
}

/// `K_data[e] = BLAKE3-derive_key("qvol v1 2026-11 data key", VK || u32le(e))`.
fn data_key(vk: &[u8; 32], epoch: u32) -> Zeroizing<[u8; 32]> {
    let mut material = Zeroizing::new([0u8; 36]);
    material[..32].copy_from_slice(vk);
    material[32..].copy_from_slice(&epoch.to_le_bytes());
    Zeroizing::new(blake3::derive_key(CONTEXT_DATA, material.as_ref()))
}

impl fmt::Debug for Subkeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subkeys([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subkeys_differ_by_purpose_and_key() {
        let a = Subkeys::derive(
            &VolumeKey::from_bytes([1; 32]),
            CipherSuite::default(),
            [0; 16],
        );
        let b = Subkeys::derive(
            &VolumeKey::from_bytes([2; 32]),
            CipherSuite::default(),
            [0; 16],
        );
        assert_ne!(*a.meta, *a.log);
        assert_ne!(*a.meta, *a.check);
        assert_ne!(a.key_check(), b.key_check());
        assert_ne!(*data_key(&[1; 32], 0), *data_key(&[1; 32], 1));
        assert!(a.data(0).is_some() && a.data(1).is_none());
    }
}
