//! The keystore's files, as JSON (docs/KEYS.md, "Keystore files"):
//! `keystore.json` (the master seed, sealed or plain) and `keys/<key id>.json` (one per key:
//! metadata and generations).

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::kdf::KdfParams;

/// `format` of keystore.json.
pub const KEYSTORE_FORMAT: &str = "qvol-keystore";
/// `format` of a key record.
pub const KEY_FORMAT: &str = "qvol-key";
/// Version of keystore.json and of key records written by this build.
pub const VERSION: u32 = 2;
/// The previous version: keystore.json v1 is only read by `Keystore::upgrade`; key records
/// v1 stay readable (listed in the manifest after the upgrade).
pub const VERSION_V1: u32 = 1;

/// How the master seed is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// Sealed with XChaCha20-Poly1305 under argon2id(passphrase).
    Argon2id,
    /// Stored in the clear (`--no-passphrase`).
    None,
}

/// keystore.json. `Debug` is redacted: a `--no-passphrase` file holds the plain seed.
/// Dropping it wipes the seed, its check value and the sealed seed (see [`KeystoreFile::wipe`]).
/// serde_json builds each of these strings once, straight from the input bytes (hex needs no
/// unescaping), so together with the zeroizing buffer of `files::read_bounded` no copy of
/// the plain seed outlives the value.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoreFile {
    /// Always [`KEYSTORE_FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Creation time (RFC 3339).
    pub created: String,
    /// How the seed is protected.
    pub protection: Protection,
    /// argon2id parameters (protection = argon2id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// argon2id salt, hex (protection = argon2id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// The sealed seed (protection = argon2id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_seed: Option<Sealed>,
    /// The plain seed, hex (protection = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// SHA3-256(SEED_CHECK_LABEL || seed), first 8 bytes, hex (protection = none): catches a
    /// damaged plain seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_check: Option<String>,
}

impl KeystoreFile {
    /// Zeroizes the plain seed, its check value and the sealed seed, and drops them.
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        if let Some(s) = self.seed.as_mut() {
            s.zeroize();
        }
        if let Some(s) = self.seed_check.as_mut() {
            s.zeroize();
        }
        if let Some(s) = self.sealed_seed.as_mut() {
            s.nonce.zeroize();
            s.ciphertext.zeroize();
        }
        self.seed = None;
        self.seed_check = None;
        self.sealed_seed = None;
    }
}

impl Drop for KeystoreFile {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl std::fmt::Debug for KeystoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeystoreFile")
            .field("version", &self.version)
            .field("protection", &self.protection)
            .field("kdf", &self.kdf)
            .finish_non_exhaustive()
    }
}

/// An XChaCha20-Poly1305 sealed value: nonce and ciphertext || tag, hex.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// 24-byte nonce, hex.
    pub nonce: String,
    /// Ciphertext followed by the 16-byte tag, hex.
    pub ciphertext: String,
}

/// keys/<id>.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Always [`KEY_FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Key id.
    pub key_id: String,
    /// The VM it belongs to.
    pub vm: String,
    /// Always the KEM name.
    pub key_type: String,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Last rotation (RFC 3339), if any.
    pub last_rotated: Option<String>,
    /// Number of rotations.
    pub rotation_count: u32,
    /// The generation new volumes are wrapped for.
    pub current_generation: u32,
    /// Every generation still usable, ascending.
    pub generations: Vec<GenerationRecord>,
}

/// One generation of a key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRecord {
    /// Generation number (1 = first).
    pub generation: u32,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Public key fingerprint, hex.
    pub fingerprint: String,
    /// Where the seed comes from (version 2 records): "random" or "imported", sealed in
    /// `sealed_seed` with the version 2 associated data. Absent (version 1 records): the seed
    /// is derived from the master seed when `sealed_seed` is absent, or imported and sealed
    /// with the version 1 associated data when it is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<SeedOrigin>,
    /// The generation seed sealed under the keystore's storage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_seed: Option<Sealed>,
}

/// Where a version 2 generation seed comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeedOrigin {
    /// 32 random bytes drawn by `new_key` or `rotate`.
    Random,
    /// Imported from an export file.
    Imported,
}

/// Parses JSON of type `T`, naming `what` in the error.
pub fn parse<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| {
        Error::corrupt(format!("{what} is not a valid qvol keystore file")).with_source(e)
    })
}

/// Serializes pretty JSON with a final newline.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(value).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Serializes pretty JSON with a final newline into a buffer zeroized on drop, reserved up
/// front so that it never reallocates (which would leave partial copies in freed memory):
/// for keystore.json, which may hold the plain master seed.
pub fn to_json_secret<T: Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    const RESERVE: usize = 16 * 1024;
    let mut v = Zeroizing::new(Vec::with_capacity(RESERVE));
    if serde_json::to_writer_pretty(&mut *v, value).is_err() {
        v.clear();
    }
    v.push(b'\n');
    debug_assert!(v.capacity() == RESERVE, "keystore.json outgrew its buffer");
    v
}

/// Lowercase hex of secret bytes, in a string zeroized on drop (built in place, without the
/// reallocations of `hex::encode`).
pub fn secret_hex(bytes: &[u8]) -> Zeroizing<String> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Decodes hex of exactly `N` bytes.
pub fn hex_array<const N: usize>(text: &str, what: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| Error::corrupt(format!("{what} is not {N} bytes of hex")))?;
    Ok(out)
}
