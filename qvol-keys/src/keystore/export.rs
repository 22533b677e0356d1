//! Moving a key between machines: export to a passphrase-protected file, import into
//! another keystore. The file carries every generation's 32-byte seed, sealed with
//! XChaCha20-Poly1305 under argon2id(passphrase); the public part (ids, metadata,
//! fingerprints, KDF parameters) is authenticated as associated data.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::records::{
    self, hex_array, GenerationRecord, KeyRecord, SeedOrigin, KEY_FORMAT, VERSION,
};
use super::{generation_ad, seal, UnlockedKeystore, SALT_LEN};

/// Version of the export file format (independent of the keystore version).
const EXPORT_VERSION: u32 = 1;
use crate::aead;
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::{hkdf32, KdfParams};
use crate::kem::HybridSecretKey;
use crate::secret::{fill_random, Secret32};

/// `format` of an export file.
pub const EXPORT_FORMAT: &str = "qvol-key-export";
/// HKDF salt of the export wrapping key.
pub const EXPORT_SALT: &[u8] = b"qvol-key-export-v1";
/// HKDF info of the export wrapping key.
pub const EXPORT_WRAP_INFO: &[u8] = b"qvol-key-export-v1 wrap key";
/// Associated-data label of the export file.
pub const EXPORT_AD_LABEL: &[u8] = b"qvol-key-export-v1";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportFile {
    format: String,
    version: u32,
    key: PublicPart,
    kdf: KdfParams,
    salt: String,
    nonce: String,
    /// Seeds of `key.generations`, in order, 32 bytes each, then the tag; hex.
    ciphertext: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicPart {
    key_id: String,
    vm: String,
    key_type: String,
    created: String,
    last_rotated: Option<String>,
    rotation_count: u32,
    current_generation: u32,
    generations: Vec<PublicGeneration>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicGeneration {
    generation: u32,
    created: String,
    fingerprint: String,
}

fn export_ad(key: &PublicPart, kdf: &KdfParams, salt: &[u8]) -> Vec<u8> {
    let public = serde_json::to_vec(key).unwrap_or_default();
    [
        EXPORT_AD_LABEL,
        &public,
        &kdf.m_cost_kib.to_le_bytes(),
        &kdf.t_cost.to_le_bytes(),
        &kdf.p_cost.to_le_bytes(),
        salt,
    ]
    .concat()
}

impl UnlockedKeystore {
    /// Exports key `id` (every generation) sealed under `passphrase`; returns the file's
    /// bytes (JSON). Write them with mode 0600.
    pub fn export_key(&self, id: &str, passphrase: &[u8], kdf: KdfParams) -> Result<Vec<u8>> {
        if passphrase.is_empty() {
            return Err(Error::invalid("the export passphrase is empty"));
        }
        let rec = self.load(id)?;
        let mut seeds = Zeroizing::new(Vec::with_capacity(32 * rec.generations.len() + 16));
        for g in &rec.generations {
            self.key_pair(&rec, g)?; // refuse to export a key that does not match its record
            seeds.extend_from_slice(self.generation_seed(&rec, g)?.expose());
        }
        let key = PublicPart {
            key_id: rec.key_id.clone(),
            vm: rec.vm.clone(),
            key_type: rec.key_type.clone(),
            created: rec.created.clone(),
            last_rotated: rec.last_rotated.clone(),
            rotation_count: rec.rotation_count,
            current_generation: rec.current_generation,
            generations: rec
                .generations
                .iter()
                .map(|g| PublicGeneration {
                    generation: g.generation,
                    created: g.created.clone(),
                    fingerprint: g.fingerprint.clone(),
                })
                .collect(),
        };
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt);
        let (hash, _) = kdf.derive(passphrase, &salt)?;
        let wrap = hkdf32(EXPORT_SALT, hash.expose(), &[EXPORT_WRAP_INFO]);
        let nonce = aead::random_nonce();
        let tag = aead::seal(&wrap, &nonce, &export_ad(&key, &kdf, &salt), &mut seeds);
        seeds.extend_from_slice(&tag);
        let file = ExportFile {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
            key,
            kdf,
            salt: hex::encode(salt),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(&seeds[..]),
        };
        Ok(records::to_json(&file))
    }

    /// Imports an export file made by [`UnlockedKeystore::export_key`] on any keystore.
    /// The key keeps its id; its seeds are sealed under this keystore's storage key.
    pub fn import_key(&self, data: &[u8], passphrase: &[u8]) -> Result<super::KeyInfo> {
        let file: ExportFile = records::parse(data, "the export file")?;
        if file.format != EXPORT_FORMAT || file.version != EXPORT_VERSION {
            return Err(Error::corrupt(
                "the file is not a qvol key export (version 1)",
            ));
        }
        let key = &file.key;
        super::validate_vm_name(&key.vm)?;
        super::validate_key_id(&key.key_id)
            .map_err(|_| Error::corrupt("the export file names an invalid key id"))?;
        if self.record_path(&key.key_id).exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("key {} exists already in this keystore", key.key_id),
            ));
        }
        let n = key.generations.len();
        if n == 0
            || !key
                .generations
                .iter()
                .any(|g| g.generation == key.current_generation)
        {
            return Err(Error::corrupt(
                "the export file lacks the key's current generation",
            ));
        }
        let salt = hex_array::<SALT_LEN>(&file.salt, "the export salt")?;
        let nonce = hex_array::<{ aead::NONCE_LEN }>(&file.nonce, "the export nonce")?;
        let mut ct = Zeroizing::new(
            hex::decode(&file.ciphertext)
                .map_err(|_| Error::corrupt("the export ciphertext is not hex"))?,
        );
        if ct.len() != 32 * n + aead::TAG_LEN {
            return Err(Error::corrupt("the export ciphertext has the wrong length"));
        }
        let (hash, _) = file.kdf.derive(passphrase, &salt)?;
        let wrap = hkdf32(EXPORT_SALT, hash.expose(), &[EXPORT_WRAP_INFO]);
        let (body, tag) = ct.split_at_mut(32 * n);
        aead::open(
            &wrap,
            &nonce,
            &export_ad(key, &file.kdf, &salt),
            body,
            tag,
            "",
        )
        .map_err(|e| match e.kind() {
            ErrorKind::Integrity => Error::new(
                ErrorKind::WrongPassphrase,
                "the passphrase does not open the export file (or the file was altered)",
            ),
            _ => e,
        })?;
        let mut generations = Vec::with_capacity(n);
        for (g, seed) in key.generations.iter().zip(body.chunks_exact(32)) {
            let seed = Secret32::from_slice(seed)
                .ok_or_else(|| Error::corrupt("an exported seed has the wrong length"))?;
            let fp = HybridSecretKey::from_seed(&seed)
                .public_key()
                .fingerprint_hex();
            if fp != g.fingerprint {
                return Err(Error::corrupt(format!(
                    "generation {} of the exported key does not match its fingerprint",
                    g.generation
                )));
            }
            generations.push(GenerationRecord {
                generation: g.generation,
                created: g.created.clone(),
                fingerprint: fp,
                origin: Some(SeedOrigin::Imported),
                sealed_seed: Some(seal(
                    &self.storage_key,
                    &seed,
                    &generation_ad(&key.key_id, g.generation),
                )),
            });
        }
        let rec = KeyRecord {
            format: KEY_FORMAT.into(),
            version: VERSION,
            key_id: key.key_id.clone(),
            vm: key.vm.clone(),
            key_type: key.key_type.clone(),
            created: key.created.clone(),
            last_rotated: key.last_rotated.clone(),
            rotation_count: key.rotation_count,
            current_generation: key.current_generation,
            generations,
        };
        let id = rec.key_id.clone();
        self.transact(|m| {
            if self.record_path(&id).exists() || m.keys.contains_key(&id) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("key {id} exists already in this keystore"),
                ));
            }
            Ok((vec![Self::store_op(&rec)], super::info(&rec)))
        })
    }
}
