//! Purpose-specific subkeys derived from the volume key (docs/FORMAT.md §4), with BLAKE3's
//! key-derivation mode and one fixed context string per purpose.

use std::fmt;

use zeroize::Zeroizing;

use crate::key::VolumeKey;
use crate::secret::Secret;
use crate::suite::{CipherSuite, SuiteCipher};

const CONTEXT_CHECK: &str = "qvol v1 2026-11 key check";
const CONTEXT_META: &str = "qvol v1 2026-11 metadata mac";
const CONTEXT_LOG: &str = "qvol v1 2026-11 log mac";
const CONTEXT_DATA: &str = "qvol v1 2026-11 data key";

/// The secret part of [`Subkeys`], on a locked page of its own.
struct Keys {
    meta: Zeroizing<[u8; 32]>,
    log: Zeroizing<[u8; 32]>,
    check: Zeroizing<[u8; 32]>,
    data: SuiteCipher,
}

/// The subkeys of one volume. Zeroized on drop, never printed; they live on a page of their
/// own, locked in RAM and left out of core dumps where the OS allows.
pub(crate) struct Subkeys {
    keys: Secret<Keys>,
    volume_id: [u8; 16],
    /// Node MACs leave out where things are (FORMAT.md §6.2): images created as version 4.
    portable_nodes: bool,
}

/// `BLAKE3-derive_key(context, material)` written straight into `out` (no copy left on the
/// stack; the hasher's state is zeroized).
fn derive_into(context: &str, material: &[u8], out: &mut [u8; 32]) {
    let mut h = Zeroizing::new(blake3::Hasher::new_derive_key(context));
    h.update(material);
    h.finalize_xof().fill(out);
}

impl Subkeys {
    /// Derives every subkey of `key` for the volume `volume_id` (key epoch 0).
    pub(crate) fn derive(key: &VolumeKey, suite: CipherSuite, volume_id: [u8; 16]) -> Self {
        let vk = key.expose();
        let data_key = data_key(vk, 0);
        let mut keys = Secret::new(Keys {
            meta: Zeroizing::new([0; 32]),
            log: Zeroizing::new([0; 32]),
            check: Zeroizing::new([0; 32]),
            data: suite.cipher(&data_key),
        });
        derive_into(CONTEXT_META, vk, &mut keys.meta);
        derive_into(CONTEXT_LOG, vk, &mut keys.log);
        derive_into(CONTEXT_CHECK, vk, &mut keys.check);
        Subkeys {
            keys,
            volume_id,
            portable_nodes: false,
        }
    }

    /// These subkeys, for an image whose node MACs are portable (FORMAT.md §6.2).
    pub(crate) fn with_portable_nodes(mut self, portable: bool) -> Self {
        self.portable_nodes = portable;
        self
    }

    /// Whether node MACs leave out block numbers and births.
    pub(crate) fn portable_nodes(&self) -> bool {
        self.portable_nodes
    }

    /// The key-check value written in the header.
    pub(crate) fn key_check(&self) -> [u8; 32] {
        let mut h = Zeroizing::new(blake3::Hasher::new_keyed(&self.keys.check));
        h.update(b"qvol key check v1");
        h.update(&self.volume_id);
        *h.finalize().as_bytes()
    }

    /// A hasher keyed for metadata MACs (superblocks, tree nodes); its state (which holds
    /// the key) is zeroized on drop.
    pub(crate) fn meta_mac(&self) -> Zeroizing<blake3::Hasher> {
        Zeroizing::new(blake3::Hasher::new_keyed(&self.keys.meta))
    }

    /// A hasher keyed for log-record and durable-mark MACs, zeroized on drop.
    pub(crate) fn log_mac(&self) -> Zeroizing<blake3::Hasher> {
        Zeroizing::new(blake3::Hasher::new_keyed(&self.keys.log))
    }

    /// The data cipher for key epoch `epoch`, if this version supports it (only epoch 0).
    pub(crate) fn data(&self, epoch: u32) -> Option<&SuiteCipher> {
        (epoch == 0).then_some(&self.keys.data)
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
    let mut key = Zeroizing::new([0u8; 32]);
    derive_into(CONTEXT_DATA, material.as_ref(), &mut key);
    key
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
        assert_ne!(*a.keys.meta, *a.keys.log);
        assert_ne!(*a.keys.meta, *a.keys.check);
        assert_eq!(
            *a.keys.meta,
            blake3::derive_key(CONTEXT_META, &[1; 32]),
            "FORMAT.md §4"
        );
        assert_eq!(format!("{a:?}"), "Subkeys([REDACTED])");
        assert_ne!(a.key_check(), b.key_check());
        assert_ne!(*data_key(&[1; 32], 0), *data_key(&[1; 32], 1));
        assert!(a.data(0).is_some() && a.data(1).is_none());
    }
}
