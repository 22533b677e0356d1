//! The keystore (version 2): a directory holding a master seed (sealed under
//! argon2id(passphrase), or plain when asked), one record per VM key (random generation
//! seeds sealed under the storage key), one record per volume, and a MACed manifest listing
//! them all (docs/KEYS.md §4).
//!
//! ```text
//! DIR/                 0700
//!   keystore.json      0600  master seed (sealed or plain), argon2id parameters
//!   manifest.json      0600  MACed list of key records, volume bindings and floors
//!   .lock              0600  flock: exclusive for admin writes, shared for readers
//!   keys/              0700
//!     <key id>.json    0600  metadata and generations of one key
//!   volumes/           0700
//!     <volume id>.json 0600  binding and last committed state of one volume
//! ```

mod export;
mod files;
mod manifest;
mod records;
mod time;
mod upgrade;
mod volumes;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::aead;
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::{hkdf32, lp, KdfParams};
use crate::kem::{HybridSecretKey, RecipientPublicKey, KEM_NAME};
use crate::pubfile::PublicKeyFile;
use crate::secret::{fill_random, Secret32};
use manifest::{FileOp, Manifest};
use records::{
    hex_array, GenerationRecord, KeyRecord, KeystoreFile, Protection, Sealed, SeedOrigin,
    KEYSTORE_FORMAT, KEY_FORMAT, VERSION, VERSION_V1,
};

pub use export::EXPORT_FORMAT;
pub use manifest::{LOCK_FILE, MANIFEST_FILE};
pub use volumes::{VolumeBinding, VolumeGuard, VolumeState, VOLUMES_DIR};

/// File name of the keystore's main file.
pub const KEYSTORE_FILE: &str = "keystore.json";
/// Subdirectory of key records.
pub const KEYS_DIR: &str = "keys";
/// HKDF salt of every derivation from the master seed.
pub const MASTER_SALT: &[u8] = b"qvol-keystore-v1";
/// HKDF info prefix of a VM key generation seed.
pub const VM_KEY_INFO: &[u8] = b"qvol-keystore-v1 vm key seed";
/// HKDF info of the storage key (seals imported seeds).
pub const STORAGE_KEY_INFO: &[u8] = b"qvol-keystore-v1 storage key";
/// HKDF info of the key that seals the master seed (from the argon2id output).
pub const SEED_WRAP_INFO: &[u8] = b"qvol-keystore-v1 master seed wrap key";
/// Associated-data label of the sealed master seed.
pub const SEED_AD_LABEL: &[u8] = b"qvol-keystore-v1 master seed";
/// Associated-data label of the sealed master seed in keystore version 2 (followed by the
/// version, u32 LE).
pub const SEED_AD_LABEL_V2: &[u8] = b"qvol-keystore-v2 master seed";
/// Associated-data label of an imported generation seed (key records version 1).
pub const IMPORTED_AD_LABEL: &[u8] = b"qvol-keystore-v1 imported seed";
/// Associated-data label of a sealed generation seed (random or imported, version 2).
pub const GENERATION_AD_LABEL: &[u8] = b"qvol-keystore-v2 generation seed";
/// Check-value label of a plain master seed (version 1).
pub const SEED_CHECK_LABEL: &[u8] = b"qvol-keystore-v1 seed check";
/// Check-value label of a plain master seed (version 2).
pub const SEED_CHECK_LABEL_V2: &[u8] = b"qvol-keystore-v2 seed check";
/// Version of keystore.json this build writes and unlocks.
pub const KEYSTORE_VERSION: u32 = VERSION;
/// Longest VM name.
pub const MAX_VM_NAME_LEN: usize = 48;

const SALT_LEN: usize = 16;

/// A keystore directory, opened but locked. `Debug` never prints the seed of a
/// `--no-passphrase` keystore, and dropping it wipes the seed (hex) it read from
/// keystore.json (`KeystoreFile` zeroizes its seed strings on drop).
pub struct Keystore {
    dir: PathBuf,
    file: KeystoreFile,
    kdf_duration: Option<Duration>,
}

impl fmt::Debug for Keystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Keystore({}, version {}, {:?}, [REDACTED])",
            self.dir.display(),
            self.file.version,
            self.file.protection
        )
    }
}

/// An unlocked keystore: holds the master seed in locked, zeroize-on-drop memory, and the
/// per-entry damage found by the last scan of the directory (at unlock, `list` or an admin
/// write; docs/KEYS.md §4.5).
pub struct UnlockedKeystore {
    dir: PathBuf,
    master: Secret32,
    storage_key: Secret32,
    manifest_key: Secret32,
    damage: Mutex<manifest::Damage>,
}

impl fmt::Debug for UnlockedKeystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnlockedKeystore({}, [REDACTED])", self.dir.display())
    }
}

/// Public facts about a key (what `qvol key show` prints). No secrets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    /// Key id (what `qvol create --key` takes).
    pub key_id: String,
    /// VM name.
    pub vm: String,
    /// "ML-KEM-1024+X25519".
    pub key_type: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Last rotation, RFC 3339.
    pub last_rotated: Option<String>,
    /// Number of rotations.
    pub rotation_count: u32,
    /// Current generation.
    pub generation: u32,
    /// Fingerprint of the current generation's public key (hex SHA3-256).
    pub fingerprint: String,
    /// All generations still usable.
    pub generations: Vec<GenerationInfo>,
}

/// One generation of a key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GenerationInfo {
    /// Generation number.
    pub generation: u32,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Public key fingerprint (hex).
    pub fingerprint: String,
    /// Whether the seed was imported rather than derived from this keystore's master seed.
    pub imported: bool,
}

impl Keystore {
    /// Creates a keystore in `dir` (created 0700 if missing; must not hold a keystore or
    /// other files). With `passphrase` the master seed is sealed under argon2id with `kdf`;
    /// with `None` it is stored in the clear.
    pub fn init(dir: &Path, passphrase: Option<&[u8]>, kdf: KdfParams) -> Result<Self> {
        if passphrase.is_some_and(<[u8]>::is_empty) {
            return Err(Error::invalid("the passphrase is empty"));
        }
        if dir.join(KEYSTORE_FILE).exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} already holds a keystore", dir.display()),
            ));
        }
        if let Ok(mut entries) = std::fs::read_dir(dir) {
            if entries.next().is_some() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not empty", dir.display()),
                ));
            }
        }
        kdf.validate()?;
        let master = Secret32::random();
        let created = time::now_rfc3339();
        let (file, kdf_duration) = keystore_file(&master, passphrase, kdf, created)?;
        files::create_private_dir(dir)?;
        files::create_private_dir(&dir.join(KEYS_DIR))?;
        files::create_private_dir(&dir.join(VOLUMES_DIR))?;
        let _lock = manifest::lock(dir, true)?;
        // The manifest first: a keystore.json without a manifest is not a keystore yet.
        let mut m = Manifest::new(file.protection);
        manifest::write(dir, &manifest::mac_key(&master), &mut m)?;
        files::write_atomic(&dir.join(KEYSTORE_FILE), &records::to_json_secret(&file))?;
        Ok(Keystore {
            dir: dir.to_path_buf(),
            file,
            kdf_duration,
        })
    }

    /// Opens the keystore in `dir` without unlocking it.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(KEYSTORE_FILE);
        if !path.exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "{} holds no keystore (run `qvol keystore init`)",
                    dir.display()
                ),
            ));
        }
        let what = path.display().to_string();
        let file: KeystoreFile = records::parse(&files::read_bounded(&path)?, &what)?;
        if file.format != KEYSTORE_FORMAT {
            return Err(Error::corrupt(format!("{what} is not a qvol keystore")));
        }
        if file.version != VERSION && file.version != VERSION_V1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{what} has keystore version {}, this build reads {VERSION}",
                    file.version
                ),
            ));
        }
        Ok(Keystore {
            dir: dir.to_path_buf(),
            file,
            kdf_duration: None,
        })
    }

    /// The keystore directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keystore version of keystore.json (1: must be upgraded with
    /// [`Keystore::upgrade`] before it unlocks).
    pub fn version(&self) -> u32 {
        self.file.version
    }

    /// Whether unlocking needs a passphrase.
    pub fn needs_passphrase(&self) -> bool {
        self.file.protection == Protection::Argon2id
    }

    /// The argon2id parameters protecting the seed, if any.
    pub fn kdf_params(&self) -> Option<KdfParams> {
        self.file.kdf
    }

    /// How long the argon2id derivation took in [`Keystore::init`] (the unlock cost).
    pub fn kdf_duration(&self) -> Option<Duration> {
        self.kdf_duration
    }

    /// Unlocks with `passphrase` (`None` for a keystore without one; a passphrase given to
    /// an unprotected keystore is refused), then verifies the manifest's MAC and that
    /// keystore.json's protection mode is the one it records: these failures are fatal.
    /// Every key and volume record is then checked against the manifest, but a damaged,
    /// missing or unlisted record only fails the operations that touch it
    /// ([`UnlockedKeystore::damaged_entries`] lists them; each is logged as a warning). A
    /// version 1 keystore is refused (run `qvol keystore upgrade`, [`Keystore::upgrade`]).
    pub fn unlock(&self, passphrase: Option<&[u8]>) -> Result<UnlockedKeystore> {
        if self.file.version != VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is a version {} keystore, which this build no longer unlocks: run \
                     `qvol keystore upgrade` to upgrade it to version {VERSION}",
                    self.dir.display(),
                    self.file.version
                ),
            ));
        }
        let master = unseal_master(&self.dir, &self.file, passphrase)?;
        let u = UnlockedKeystore::new(self.dir.clone(), master);
        let _lock = manifest::lock(&self.dir, false)?;
        let m = u.manifest()?;
        manifest::check_protection(&self.dir, &m, self.file.protection)?;
        let damage = manifest::scan(&self.dir, &u.master, &m)?;
        for e in damage.keys.values().chain(damage.volumes.values()) {
            log::debug!("keystore damage: {e}");
        }
        u.set_damage(damage);
        Ok(u)
    }
}

/// The master seed of `file` (version 1 or 2), unsealed with `passphrase`.
fn unseal_master(dir: &Path, file: &KeystoreFile, passphrase: Option<&[u8]>) -> Result<Secret32> {
    let what = dir.join(KEYSTORE_FILE).display().to_string();
    let v2 = file.version == VERSION;
    match file.protection {
        Protection::None => {
            if passphrase.is_some() {
                return Err(Error::new(
                    ErrorKind::WrongPassphrase,
                    format!(
                        "the keystore is not protected by a passphrase but one was given; \
                         someone may have replaced {what}"
                    ),
                ));
            }
            let seed_hex = file
                .seed
                .as_deref()
                .ok_or_else(|| Error::corrupt(format!("{what} lacks its seed")))?;
            // Decoded straight into the locked, zeroizing buffer: no copy on the stack.
            let mut master = Secret32::zero();
            hex::decode_to_slice(seed_hex, master.expose_mut()).map_err(|_| {
                Error::corrupt(format!("{what}: the master seed is not 32 bytes of hex"))
            })?;
            let check = file.seed_check.as_deref().unwrap_or("");
            let expected = hex_array::<8>(check, "the seed check value")?;
            if !bool::from(seed_check(&master, file.version).ct_eq(&expected)) {
                return Err(Error::corrupt(format!(
                    "{what}: the master seed is damaged"
                )));
            }
            Ok(master)
        }
        Protection::Argon2id => {
            let pass = passphrase.ok_or_else(|| {
                Error::new(
                    ErrorKind::WrongPassphrase,
                    "the keystore is protected by a passphrase and none was given",
                )
            })?;
            let kdf = file
                .kdf
                .ok_or_else(|| Error::corrupt(format!("{what} lacks its argon2id parameters")))?;
            let salt = hex_array::<SALT_LEN>(file.salt.as_deref().unwrap_or(""), "the salt")?;
            let sealed = file
                .sealed_seed
                .as_ref()
                .ok_or_else(|| Error::corrupt(format!("{what} lacks its sealed seed")))?;
            let (hash, _) = kdf.derive(pass, &salt)?;
            let wrap = hkdf32(MASTER_SALT, hash.expose(), &[SEED_WRAP_INFO]);
            let ad = if v2 {
                seed_ad_v2(&kdf, &salt)
            } else {
                seed_ad(&kdf, &salt)
            };
            open_sealed(&wrap, sealed, &ad).map_err(|e| {
                if e.kind() == ErrorKind::Integrity {
                    Error::new(
                        ErrorKind::WrongPassphrase,
                        "the passphrase does not unlock the keystore",
                    )
                } else {
                    e
                }
            })
        }
    }
}

/// Reads and parses DIR/keystore.json.
fn read_keystore_file(dir: &Path) -> Result<KeystoreFile> {
    let path = dir.join(KEYSTORE_FILE);
    let what = path.display().to_string();
    records::parse(&files::read_bounded(&path)?, &what)
}

/// The keystore.json content for `master`: sealed under argon2id(`passphrase`) with `kdf`,
/// or plain when `passphrase` is `None`. Returns the argon2id time too.
fn keystore_file(
    master: &Secret32,
    passphrase: Option<&[u8]>,
    kdf: KdfParams,
    created: String,
) -> Result<(KeystoreFile, Option<Duration>)> {
    let Some(pass) = passphrase else {
        let file = KeystoreFile {
            format: KEYSTORE_FORMAT.into(),
            version: VERSION,
            created,
            protection: Protection::None,
            kdf: None,
            salt: None,
            sealed_seed: None,
            // Moved out of the zeroizing wrapper without a copy; KeystoreFile wipes it on drop.
            seed: Some(std::mem::take(&mut *records::secret_hex(master.expose()))),
            seed_check: Some(hex::encode(seed_check(master, VERSION))),
        };
        return Ok((file, None));
    };
    if pass.is_empty() {
        return Err(Error::invalid("the passphrase is empty"));
    }
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt);
    let (hash, took) = kdf.derive(pass, &salt)?;
    let wrap = hkdf32(MASTER_SALT, hash.expose(), &[SEED_WRAP_INFO]);
    let sealed = seal(&wrap, master, &seed_ad_v2(&kdf, &salt));
    let file = KeystoreFile {
        format: KEYSTORE_FORMAT.into(),
        version: VERSION,
        created,
        protection: Protection::Argon2id,
        kdf: Some(kdf),
        salt: Some(hex::encode(salt)),
        sealed_seed: Some(sealed),
        seed: None,
        seed_check: None,
    };
    Ok((file, Some(took)))
}

fn seed_ad(kdf: &KdfParams, salt: &[u8]) -> Vec<u8> {
    [
        SEED_AD_LABEL,
        &kdf.m_cost_kib.to_le_bytes(),
        &kdf.t_cost.to_le_bytes(),
        &kdf.p_cost.to_le_bytes(),
        salt,
    ]
    .concat()
}

/// The version 2 AD of the sealed master seed: the version is bound, so a version 2 file
/// cannot be relabelled as version 1.
fn seed_ad_v2(kdf: &KdfParams, salt: &[u8]) -> Vec<u8> {
    [
        SEED_AD_LABEL_V2,
        &VERSION.to_le_bytes(),
        &kdf.m_cost_kib.to_le_bytes(),
        &kdf.t_cost.to_le_bytes(),
        &kdf.p_cost.to_le_bytes(),
        salt,
    ]
    .concat()
}

fn seed_check(seed: &Secret32, version: u32) -> [u8; 8] {
    use sha3::{Digest, Sha3_256};
    let label = if version == VERSION_V1 {
        SEED_CHECK_LABEL
    } else {
        SEED_CHECK_LABEL_V2
    };
    let d = Sha3_256::new()
        .chain_update(label)
        .chain_update(seed.expose())
        .finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Opens a sealed 32-byte secret.
fn open_sealed(key: &Secret32, sealed: &Sealed, ad: &[u8]) -> Result<Secret32> {
    let nonce = hex_array::<{ aead::NONCE_LEN }>(&sealed.nonce, "a sealed value's nonce")?;
    let ct = hex_array::<{ 32 + aead::TAG_LEN }>(&sealed.ciphertext, "a sealed value")?;
    let mut out = Secret32::zero();
    out.expose_mut().copy_from_slice(&ct[..32]);
    aead::open(
        key,
        &nonce,
        ad,
        out.expose_mut(),
        &ct[32..],
        "a sealed secret failed authentication",
    )?;
    Ok(out)
}

fn seal(key: &Secret32, secret: &Secret32, ad: &[u8]) -> Sealed {
    let nonce = aead::random_nonce();
    let mut buf = Secret32::clone(secret);
    let tag = aead::seal(key, &nonce, ad, buf.expose_mut());
    let mut ct = buf.expose().to_vec();
    ct.extend_from_slice(&tag);
    Sealed {
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ct),
    }
}

/// Checks a VM name: 1..=48 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_vm_name(vm: &str) -> Result<()> {
    let ok = !vm.is_empty()
        && vm.len() <= MAX_VM_NAME_LEN
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !vm.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "VM name {vm:?} is invalid: use 1 to {MAX_VM_NAME_LEN} letters, digits, '.', '_' \
             or '-', not starting with '.' or '-'"
        )))
    }
}

/// Whether `id` can name a key record: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.`
/// or `-` (so it is also a safe file name).
pub(crate) fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= crate::keyslot::MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !id.starts_with(['.', '-'])
}

fn validate_key_id(id: &str) -> Result<()> {
    if is_valid_key_id(id) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::NotFound,
            format!("there is no key {id:?} (not a valid key id)"),
        ))
    }
}

impl UnlockedKeystore {
    fn new(dir: PathBuf, master: Secret32) -> Self {
        let storage_key = hkdf32(MASTER_SALT, master.expose(), &[STORAGE_KEY_INFO]);
        let manifest_key = manifest::mac_key(&master);
        UnlockedKeystore {
            dir,
            master,
            storage_key,
            manifest_key,
            damage: Mutex::new(manifest::Damage::default()),
        }
    }

    fn set_damage(&self, damage: manifest::Damage) {
        *self.damage.lock().unwrap_or_else(|e| e.into_inner()) = damage;
    }

    /// The damaged entries found by the last check of the whole directory (at unlock, by
    /// [`UnlockedKeystore::list`] for key records, and by every admin write): one sentence
    /// per damaged key or volume record, naming its file. Empty when nothing is damaged.
    /// Each one fails only the operations that touch it; repair with
    /// [`UnlockedKeystore::repair_volume`] (a listed volume, keeping its floor),
    /// [`UnlockedKeystore::forget_volume`] (keeping a tombstone) or
    /// [`UnlockedKeystore::delete_checked`] with
    /// force, or by restoring the file from a backup.
    pub fn damaged_entries(&self) -> Vec<String> {
        let d = self.damage.lock().unwrap_or_else(|e| e.into_inner());
        d.keys
            .values()
            .chain(d.volumes.values())
            .map(ToString::to_string)
            .collect()
    }

    /// The keystore directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(KEYS_DIR).join(format!("{id}.json"))
    }

    /// Loads key record `id`, checked against the current manifest.
    fn load(&self, id: &str) -> Result<KeyRecord> {
        validate_key_id(id)?;
        let _lock = manifest::lock(&self.dir, false)?;
        let m = self.manifest()?;
        self.load_in(&m, id)
    }

    /// Loads key record `id`, checked against `m` (the caller holds the lock): a record
    /// missing, not listed, or with another hash than the manifest lists fails (Integrity,
    /// naming the file), whatever the state of the other records.
    fn load_in(&self, m: &Manifest, id: &str) -> Result<KeyRecord> {
        validate_key_id(id)?;
        let path = self.record_path(id);
        if !path.exists() {
            if let Some(e) = manifest::key_problem(&self.dir, m, id) {
                return Err(e);
            }
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("there is no key {id:?}"),
            ));
        }
        let data = files::read_bounded(&path)?;
        manifest::check_key_bytes(&self.dir, m, id, &data)?;
        parse_key_record(&path, id, &data)
    }

    /// The file change that stores `rec`.
    fn store_op(rec: &KeyRecord) -> FileOp {
        FileOp::WriteKey(rec.key_id.clone(), records::to_json(rec))
    }

    /// The seed of generation `g` of `rec`: sealed under the storage key (version 2 random
    /// or imported seeds, version 1 imported seeds), or derived from the master seed along
    /// (VM name, key id, generation) for generations made by keystore version 1.
    fn generation_seed(&self, rec: &KeyRecord, g: &GenerationRecord) -> Result<Secret32> {
        let ad = match (g.origin, &g.sealed_seed) {
            (None, None) => return Ok(self.derive_seed(&rec.vm, &rec.key_id, g.generation)),
            (None, Some(_)) => imported_ad(&rec.key_id, g.generation),
            (Some(_), Some(_)) => generation_ad(&rec.key_id, g.generation),
            (Some(_), None) => {
                return Err(Error::corrupt(format!(
                    "key {} generation {} lacks its sealed seed",
                    rec.key_id, g.generation
                )))
            }
        };
        let sealed = g
            .sealed_seed
            .as_ref()
            .ok_or_else(|| Error::corrupt("no sealed seed"))?;
        open_sealed(&self.storage_key, sealed, &ad).map_err(|_| {
            Error::new(
                ErrorKind::Integrity,
                format!(
                    "the sealed seed of key {} generation {} does not open with this keystore",
                    rec.key_id, g.generation
                ),
            )
        })
    }

    fn derive_seed(&self, vm: &str, key_id: &str, generation: u32) -> Secret32 {
        derive_vm_key_seed(&self.master, vm, key_id, generation)
    }

    /// A generation with a fresh random seed, sealed under the storage key.
    fn random_generation(&self, key_id: &str, generation: u32, now: &str) -> GenerationRecord {
        let seed = Secret32::random();
        let pk = HybridSecretKey::from_seed(&seed).public_key().clone();
        GenerationRecord {
            generation,
            created: now.to_owned(),
            fingerprint: pk.fingerprint_hex(),
            origin: Some(SeedOrigin::Random),
            sealed_seed: Some(seal(
                &self.storage_key,
                &seed,
                &generation_ad(key_id, generation),
            )),
        }
    }

    /// The key pair of one generation, checked against its recorded fingerprint.
    fn key_pair(&self, rec: &KeyRecord, g: &GenerationRecord) -> Result<HybridSecretKey> {
        let sk = HybridSecretKey::from_seed(&self.generation_seed(rec, g)?);
        let expected = hex_array::<32>(&g.fingerprint, "a fingerprint")?;
        if !bool::from(sk.public_key().fingerprint().ct_eq(&expected)) {
            return Err(Error::corrupt(format!(
                "key {} generation {} does not match its recorded fingerprint (a key record \
                 from another keystore?)",
                rec.key_id, g.generation
            )));
        }
        Ok(sk)
    }

    /// Creates a key for `vm` (generation 1, a random seed) and returns its description.
    pub fn new_key(&self, vm: &str) -> Result<KeyInfo> {
        validate_vm_name(vm)?;
        let mut suffix = [0u8; 4];
        fill_random(&mut suffix);
        let key_id = format!("{vm}-{}", hex::encode(suffix));
        self.transact(|m| {
            if self.record_path(&key_id).exists() || m.keys.contains_key(&key_id) {
                return Err(
                    manifest::key_problem(&self.dir, m, &key_id).unwrap_or_else(|| {
                        Error::new(
                            ErrorKind::AlreadyExists,
                            format!("key {key_id} exists already"),
                        )
                    }),
                );
            }
            let now = time::now_rfc3339();
            let rec = KeyRecord {
                format: KEY_FORMAT.into(),
                version: VERSION,
                key_id: key_id.clone(),
                vm: vm.into(),
                key_type: KEM_NAME.into(),
                created: now.clone(),
                last_rotated: None,
                rotation_count: 0,
                current_generation: 1,
                generations: vec![self.random_generation(&key_id, 1, &now)],
            };
            Ok((vec![Self::store_op(&rec)], info(&rec)))
        })
    }

    /// Every key, sorted by key id. Fails (naming the file) if any key record is damaged,
    /// missing or not listed in the manifest, so that `qvol key list` shows the problem.
    pub fn list(&self) -> Result<Vec<KeyInfo>> {
        let _lock = manifest::lock(&self.dir, false)?;
        let m = self.manifest()?;
        let damaged = manifest::scan_keys(&self.dir, &m)?;
        let first = damaged.values().next().map(|e| {
            let others = damaged.len() - 1;
            if others == 0 {
                manifest::copy_error(e)
            } else {
                Error::new(
                    e.kind(),
                    format!("{e} (and {others} other damaged key record(s))"),
                )
            }
        });
        self.damage.lock().unwrap_or_else(|e| e.into_inner()).keys = damaged;
        if let Some(e) = first {
            return Err(e);
        }
        let mut out = Vec::new();
        for (id, hashes) in &m.keys {
            if hashes.contains(&None) && !self.record_path(id).exists() {
                continue; // being created or deleted by an interrupted write
            }
            out.push(info(&self.load_in(&m, id)?));
        }
        out.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        Ok(out)
    }

    /// One key.
    pub fn show(&self, id: &str) -> Result<KeyInfo> {
        Ok(info(&self.load(id)?))
    }

    /// The current generation's public key of `id` (labelled with its generation).
    pub fn public_key(&self, id: &str) -> Result<RecipientPublicKey> {
        let rec = self.load(id)?;
        let g = current(&rec)?;
        Ok(self
            .key_pair(&rec, g)?
            .public_key()
            .clone()
            .with_generation(g.generation))
    }

    /// The public key file of `id`'s current generation (`qvol key export-public`): what
    /// another keystore needs to wrap a recipient keyslot for this key.
    pub fn export_public(&self, id: &str) -> Result<PublicKeyFile> {
        let rec = self.load(id)?;
        let g = current(&rec)?;
        let public_key = self
            .key_pair(&rec, g)?
            .public_key()
            .clone()
            .with_generation(g.generation);
        Ok(PublicKeyFile {
            key_id: rec.key_id.clone(),
            vm: rec.vm.clone(),
            generation: g.generation,
            public_key,
        })
    }

    /// Rotates `id`: a new generation (random seed) becomes current; older ones stay usable
    /// for unwrapping until [`UnlockedKeystore::remove_generation_checked`].
    pub fn rotate(&self, id: &str) -> Result<KeyInfo> {
        validate_key_id(id)?;
        self.transact(|m| {
            let mut rec = self.load_in(m, id)?;
            let next = rec
                .generations
                .iter()
                .map(|g| g.generation)
                .max()
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| Error::invalid(format!("key {id} cannot be rotated any more")))?;
            let now = time::now_rfc3339();
            rec.generations
                .push(self.random_generation(&rec.key_id, next, &now));
            rec.current_generation = next;
            rec.rotation_count = rec.rotation_count.saturating_add(1);
            rec.last_rotated = Some(now);
            rec.version = VERSION;
            Ok((vec![Self::store_op(&rec)], info(&rec)))
        })
    }

    /// Refuses (InUse) when volumes are recorded as bound to `id`, unless `force`.
    fn refuse_if_bound(m: &Manifest, id: &str, what: &str, force: bool) -> Result<()> {
        if force {
            return Ok(());
        }
        let bound: Vec<&str> = m
            .volumes
            .iter()
            .filter(|(_, v)| v.key_id == id)
            .map(|(name, _)| name.as_str())
            .collect();
        if bound.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::InUse,
            format!(
                "refusing to {what}: volume(s) {} are recorded as bound to key {id} (forget \
                 them with `qvol volume forget ID`, or pass --force)",
                bound.join(", ")
            ),
        ))
    }

    /// Refuses (InUse) when volumes bound to `id` may have keyslots wrapped for generation
    /// `generation`: their recorded wraps contain it, or are unknown. Unless `force`.
    fn refuse_if_wrapped(m: &Manifest, id: &str, generation: u32, force: bool) -> Result<()> {
        if force {
            return Ok(());
        }
        let blocking: Vec<String> = m
            .volumes
            .iter()
            .filter(|(_, v)| v.key_id == id)
            .filter_map(|(name, _)| match m.wraps.get(name) {
                None => Some(format!("{name} (wrapped generations not recorded)")),
                Some(w) if w.contains(&generation) => Some(name.clone()),
                Some(_) => None,
            })
            .collect();
        if blocking.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::InUse,
            format!(
                "refusing to remove generation {generation} of key {id}: volume(s) {} are \
                 recorded as bound to the key and may have keyslots wrapped for that \
                 generation (rewrap them with `qvol rekey IMAGE` (or `qvol key rotate {id} \
                 --rewrap IMAGE`), or pass --force)",
                blocking.join(", ")
            ),
        ))
    }

    /// Forgets generation `generation` of `id` (not the current one), refusing while a
    /// recorded volume bound to the key may have keyslots wrapped for it.
    pub fn remove_generation(&self, id: &str, generation: u32) -> Result<KeyInfo> {
        self.remove_generation_checked(id, generation, false)
    }

    /// Forgets generation `generation` of `id` (not the current one): volumes wrapped only
    /// for it no longer open with this keystore, and since version 2 seeds are random and
    /// stored only in the record, it is a crypto-erase. Unless `force`, refuses with InUse
    /// while a recorded volume bound to the key has keyslots wrapped for that generation,
    /// or the generations its keyslots are wrapped for are unknown
    /// ([`UnlockedKeystore::volume_wraps`]); the sentence names those volumes.
    pub fn remove_generation_checked(
        &self,
        id: &str,
        generation: u32,
        force: bool,
    ) -> Result<KeyInfo> {
        validate_key_id(id)?;
        self.transact(|m| {
            let mut rec = self.load_in(m, id)?;
            if generation == rec.current_generation {
                return Err(Error::invalid(format!(
                    "generation {generation} is the current generation of key {id}; rotate first"
                )));
            }
            let before = rec.generations.len();
            rec.generations.retain(|g| g.generation != generation);
            if rec.generations.len() == before {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("key {id} has no generation {generation}"),
                ));
            }
            Self::refuse_if_wrapped(m, id, generation, force)?;
            Ok((vec![Self::store_op(&rec)], info(&rec)))
        })
    }

    /// Deletes key `id`, refusing while a recorded volume is bound to it.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.delete_checked(id, false)
    }

    /// Deletes key `id` and every generation (a crypto-erase of its version 2 generations).
    /// Unless `force`, refuses with InUse while a recorded volume is bound to it. With
    /// `force` it is also the repair of a damaged key entry: it removes a record that is
    /// edited, missing, or not listed in the manifest (e.g. a deleted key put back), and its
    /// manifest entry.
    pub fn delete_checked(&self, id: &str, force: bool) -> Result<()> {
        validate_key_id(id)?;
        self.transact(|m| {
            // With force, a listed entry or a file is removed even when it does not load.
            if !(force && (m.keys.contains_key(id) || self.record_path(id).exists())) {
                self.load_in(m, id)?;
            }
            Self::refuse_if_bound(m, id, &format!("delete key {id}"), force)?;
            m.keys.remove(id);
            Ok((vec![FileOp::RemoveKey(id.to_owned())], ()))
        })
    }

    /// Re-seals the master seed under a new passphrase (or none) and KDF parameters; keys,
    /// records and every volume stay as they are. Returns the new argon2id unlock time.
    pub fn change_passphrase(
        &self,
        passphrase: Option<&[u8]>,
        kdf: KdfParams,
    ) -> Result<Option<Duration>> {
        kdf.validate()?;
        self.transact(|m| {
            let created = read_keystore_file(&self.dir)?.created.clone();
            let (file, took) = keystore_file(&self.master, passphrase, kdf, created)?;
            m.protection = file.protection;
            m.protection_pending = None;
            Ok((
                vec![FileOp::WriteKeystore(
                    records::to_json_secret(&file),
                    file.protection,
                )],
                took,
            ))
        })
    }

    /// The secret key able to open a recipient slot naming (`key_id`, `generation`,
    /// `fingerprint`), if this keystore holds it. Never errors: a slot that names a key we
    /// do not hold (or a damaged record) is simply not ours.
    pub(crate) fn secret_key_for_slot(
        &self,
        key_id: &str,
        generation: u32,
        fingerprint: &[u8; 32],
    ) -> Option<HybridSecretKey> {
        let rec = self.load(key_id).ok()?;
        let want = hex::encode(fingerprint);
        // The named generation first, then any generation with that fingerprint.
        let mut candidates: Vec<&GenerationRecord> = rec
            .generations
            .iter()
            .filter(|g| g.generation == generation)
            .collect();
        candidates.extend(
            rec.generations
                .iter()
                .filter(|g| g.generation != generation),
        );
        candidates
            .into_iter()
            .filter(|g| g.fingerprint == want)
            .find_map(|g| self.key_pair(&rec, g).ok())
    }
}

/// Parses the key record `id` read from `path` (version 1 or 2) and checks its format, id
/// and current generation.
fn parse_key_record(path: &Path, id: &str, data: &[u8]) -> Result<KeyRecord> {
    let what = path.display().to_string();
    let rec: KeyRecord = records::parse(data, &what)?;
    if rec.format != KEY_FORMAT
        || (rec.version != VERSION && rec.version != VERSION_V1)
        || rec.key_id != id
    {
        return Err(Error::corrupt(format!(
            "{what} is not a qvol key record for {id}"
        )));
    }
    if !rec
        .generations
        .iter()
        .any(|g| g.generation == rec.current_generation)
    {
        return Err(Error::corrupt(format!(
            "{what} lacks its current generation"
        )));
    }
    Ok(rec)
}

/// The seed of one generation of a VM key (docs/KEYS.md, "Hierarchy"):
/// HKDF-SHA-256(salt = MASTER_SALT, ikm = master seed,
/// info = VM_KEY_INFO || lp(vm) || lp(key id) || generation as u32 LE), where lp(x) is x
/// prefixed by its length as u16 big-endian. Public for the golden-vector tests.
pub fn derive_vm_key_seed(master: &Secret32, vm: &str, key_id: &str, generation: u32) -> Secret32 {
    hkdf32(
        MASTER_SALT,
        master.expose(),
        &[
            VM_KEY_INFO,
            &lp(vm.as_bytes()),
            &lp(key_id.as_bytes()),
            &generation.to_le_bytes(),
        ],
    )
}

fn current(rec: &KeyRecord) -> Result<&GenerationRecord> {
    rec.generations
        .iter()
        .find(|g| g.generation == rec.current_generation)
        .ok_or_else(|| Error::corrupt(format!("key {} lacks its current generation", rec.key_id)))
}

fn generation_ad(key_id: &str, generation: u32) -> Vec<u8> {
    [
        GENERATION_AD_LABEL,
        &lp(key_id.as_bytes()),
        &generation.to_le_bytes(),
    ]
    .concat()
}

fn imported_ad(key_id: &str, generation: u32) -> Vec<u8> {
    [
        IMPORTED_AD_LABEL,
        &lp(key_id.as_bytes()),
        &generation.to_le_bytes(),
    ]
    .concat()
}

fn info(rec: &KeyRecord) -> KeyInfo {
    let fingerprint = current(rec)
        .map(|g| g.fingerprint.clone())
        .unwrap_or_default();
    KeyInfo {
        key_id: rec.key_id.clone(),
        vm: rec.vm.clone(),
        key_type: rec.key_type.clone(),
        created: rec.created.clone(),
        last_rotated: rec.last_rotated.clone(),
        rotation_count: rec.rotation_count,
        generation: rec.current_generation,
        fingerprint,
        generations: rec
            .generations
            .iter()
            .map(|g| GenerationInfo {
                generation: g.generation,
                created: g.created.clone(),
                fingerprint: g.fingerprint.clone(),
                imported: match g.origin {
                    Some(o) => o == SeedOrigin::Imported,
                    None => g.sealed_seed.is_some(),
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_hex_of(dir: &Path) -> String {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(KEYSTORE_FILE)).unwrap()).unwrap();
        v["seed"].as_str().unwrap().to_owned()
    }

    #[test]
    fn debug_of_an_unprotected_keystore_shows_no_seed() {
        let dir = tempfile::tempdir().unwrap();
        let made = Keystore::init(dir.path(), None, KdfParams::insecure_for_tests()).unwrap();
        let opened = Keystore::open(dir.path()).unwrap();
        let seed = seed_hex_of(dir.path());
        assert_eq!(opened.file.seed.as_deref(), Some(seed.as_str()));
        for dbg in [
            format!("{made:?}"),
            format!("{opened:?}"),
            format!("{:?}", opened.file),
            format!("{:?}", opened.unlock(None).unwrap()),
        ] {
            assert!(!dbg.contains(&seed) && !dbg.contains(&seed[..16]), "{dbg}");
            assert!(dbg.contains("REDACTED") || dbg.contains(".."), "{dbg}");
        }
    }

    #[test]
    fn keystore_file_wipes_its_seed() {
        let dir = tempfile::tempdir().unwrap();
        Keystore::init(dir.path(), None, KdfParams::insecure_for_tests()).unwrap();
        let mut file = read_keystore_file(dir.path()).unwrap();
        assert!(file.seed.is_some() && file.seed_check.is_some());
        file.wipe();
        assert!(file.seed.is_none() && file.seed_check.is_none() && file.sealed_seed.is_none());
        // The version, protection and KDF parameters stay (unlock reads them).
        assert_eq!(file.protection, Protection::None);
    }

    #[test]
    fn keystore_json_is_written_from_zeroizing_buffers() {
        let master = Secret32::random();
        assert_eq!(
            *records::secret_hex(master.expose()),
            hex::encode(master.expose())
        );
        let (file, _) = keystore_file(
            &master,
            None,
            KdfParams::insecure_for_tests(),
            "2026-01-01T00:00:00Z".into(),
        )
        .unwrap();
        assert_eq!(
            &records::to_json_secret(&file)[..],
            &records::to_json(&file)[..]
        );
        assert_eq!(file.seed.as_deref(), Some(&*hex::encode(master.expose())));
        // Changing the passphrase rewrites keystore.json and keeps the seed.
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::init(dir.path(), None, KdfParams::insecure_for_tests()).unwrap();
        let seed = seed_hex_of(dir.path());
        let u = ks.unlock(None).unwrap();
        u.change_passphrase(Some(b"pw"), KdfParams::insecure_for_tests())
            .unwrap();
        u.change_passphrase(None, KdfParams::insecure_for_tests())
            .unwrap();
        assert_eq!(seed_hex_of(dir.path()), seed);
    }
}
