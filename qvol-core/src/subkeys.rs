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
const CONTEXT_WRAP: &str = "qvol v5 2026-11 key wrap";

/// Bytes of a sealed 32-byte key: a 24-byte nonce, the key, a 16-byte tag (FORMAT.md §17).
pub(crate) const SEALED_KEY_LEN: usize = 72;

/// The secret part of [`Subkeys`], on a locked page of its own.
struct Keys {
    meta: Zeroizing<[u8; 32]>,
    log: Zeroizing<[u8; 32]>,
    check: Zeroizing<[u8; 32]>,
    /// `K_wrap`: seals other keys for the re-encryption record (FORMAT.md §17).
    wrap: Zeroizing<[u8; 32]>,
    data: SuiteCipher,
    /// The data key of the previous key epoch, while a re-encryption moves away from it.
    prev: Option<SuiteCipher>,
}

/// The subkeys of one volume. Zeroized on drop, never printed; they live on a page of their
/// own, locked in RAM and left out of core dumps where the OS allows.
pub(crate) struct Subkeys {
    keys: Secret<Keys>,
    volume_id: [u8; 16],
    /// Node MACs leave out where things are (FORMAT.md §6.2): images created as version 4.
    portable_nodes: bool,
    /// The key epoch of these keys (new data is sealed under it).
    epoch: u32,
    /// The epoch of `keys.prev`.
    prev_epoch: Option<u32>,
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
        Subkeys::derive_epoch(key, suite, volume_id, 0)
    }

    /// Derives every subkey of `key`, the volume key of key epoch `epoch`.
    pub(crate) fn derive_epoch(
        key: &VolumeKey,
        suite: CipherSuite,
        volume_id: [u8; 16],
        epoch: u32,
    ) -> Self {
        let vk = key.expose();
        let data_key = data_key(vk, epoch);
        let mut keys = Secret::new(Keys {
            meta: Zeroizing::new([0; 32]),
            log: Zeroizing::new([0; 32]),
            check: Zeroizing::new([0; 32]),
            wrap: Zeroizing::new([0; 32]),
            data: suite.cipher(&data_key),
            prev: None,
        });
        derive_into(CONTEXT_META, vk, &mut keys.meta);
        derive_into(CONTEXT_LOG, vk, &mut keys.log);
        derive_into(CONTEXT_CHECK, vk, &mut keys.check);
        derive_into(CONTEXT_WRAP, vk, &mut keys.wrap);
        Subkeys {
            keys,
            volume_id,
            portable_nodes: false,
            epoch,
            prev_epoch: None,
        }
    }

    /// These keys, also opening the data of key epoch `epoch` (sealed with `suite` under
    /// `data_key`, its `K_data`): a re-encryption away from it is in progress.
    pub(crate) fn with_previous(
        mut self,
        epoch: u32,
        suite: CipherSuite,
        data_key: &[u8; 32],
    ) -> Self {
        self.keys.prev = Some(suite.cipher(data_key));
        self.prev_epoch = Some(epoch);
        self
    }

    /// These keys without the previous epoch's data key (a re-encryption's end).
    pub(crate) fn without_previous(&self) -> Subkeys {
        let k = &self.keys;
        let keys = Secret::new(Keys {
            meta: k.meta.clone(),
            log: k.log.clone(),
            check: k.check.clone(),
            wrap: k.wrap.clone(),
            data: k.data.suite().cipher(&k.data.key_bytes()),
            prev: None,
        });
        Subkeys {
            keys,
            volume_id: self.volume_id,
            portable_nodes: self.portable_nodes,
            epoch: self.epoch,
            prev_epoch: None,
        }
    }

    /// The key epoch new data is sealed under.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The suite new data is sealed with.
    pub(crate) fn data_suite(&self) -> CipherSuite {
        self.keys.data.suite()
    }

    /// The previous key epoch and its suite, while re-encrypting.
    pub(crate) fn previous(&self) -> Option<(u32, CipherSuite)> {
        Some((self.prev_epoch?, self.keys.prev.as_ref()?.suite()))
    }

    /// `K_data` of the current key epoch (sealed into the re-encryption record of the next
    /// key epoch, FORMAT.md §17).
    pub(crate) fn data_key(&self) -> Zeroizing<[u8; 32]> {
        self.keys.data.key_bytes()
    }

    /// `secret` sealed under `K_wrap` with associated data `ad` (FORMAT.md §17):
    /// XChaCha20-Poly1305, a random 24-byte nonce, laid out nonce || ciphertext || tag.
    pub(crate) fn seal_key(
        &self,
        ad: &[u8],
        secret: &[u8; 32],
    ) -> crate::error::Result<[u8; SEALED_KEY_LEN]> {
        let mut out = [0u8; SEALED_KEY_LEN];
        crate::datablock::fill_random(&mut out[..24])?;
        let cipher = CipherSuite::XChaCha20Poly1305.cipher(&self.keys.wrap);
        let mut body = Zeroizing::new(*secret);
        let nonce: [u8; 24] = out[..24].try_into().unwrap_or([0; 24]);
        let tag = cipher.seal(&nonce, ad, &mut body[..]);
        out[24..56].copy_from_slice(&body[..]);
        out[56..].copy_from_slice(&tag);
        Ok(out)
    }

    /// Opens what [`Subkeys::seal_key`] sealed with the same `ad`; `None` if it does not
    /// authenticate under these keys.
    pub(crate) fn open_key(
        &self,
        ad: &[u8],
        sealed: &[u8; SEALED_KEY_LEN],
    ) -> Option<Zeroizing<[u8; 32]>> {
        let cipher = CipherSuite::XChaCha20Poly1305.cipher(&self.keys.wrap);
        let mut body = Zeroizing::new([0u8; 32]);
        body.copy_from_slice(&sealed[24..56]);
        let tag: [u8; 16] = sealed[56..].try_into().ok()?;
        cipher.open(&sealed[..24], ad, &mut body[..], &tag).ok()?;
        Some(body)
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

    /// The data cipher of key epoch `epoch`: the current one, or the previous one while
    /// re-encrypting; `None` for any other epoch.
    pub(crate) fn data(&self, epoch: u32) -> Option<&SuiteCipher> {
        if epoch == self.epoch {
            Some(&self.keys.data)
        } else if Some(epoch) == self.prev_epoch {
            self.keys.prev.as_ref()
        } else {
            None
        }
    }

    /// The volume id the keys belong to.
    pub(crate) fn volume_id(&self) -> &[u8; 16] {
        &self.volume_id
    }
}

/// `K_data[e] = BLAKE3-derive_key("qvol v1 2026-11 data key", VK_e || u32le(e))`, where
/// `VK_e` is the volume key of key epoch `e`.
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
