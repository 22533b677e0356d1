//! `qvol keystore upgrade`: keystore version 1 -> 2 (docs/KEYS.md §4, "Upgrade").
//!
//! Steps, each crash-safe (temporary file, fsync, rename) and the whole rerunnable:
//! 1. unlock the version 1 keystore.json with the passphrase;
//! 2. convert every version 1 volume record into a version 2 record MACed under its K_vol,
//!    with an unknown binding (key id and VM "") and an unknown root id (all zeros), keeping
//!    the generation (a record already converted by an interrupted run is kept);
//! 3. write the manifest listing every key record (by SHA-256) and volume record (floor =
//!    its generation), counter = 1 + the counter of a manifest left by an interrupted run;
//! 4. re-seal keystore.json as version 2 (same passphrase, same KDF parameters, fresh salt
//!    and nonce, the version bound into the AD). Only this last rename flips the keystore.

use super::manifest::{self, Manifest, VolumeEntry};
use super::records::{self, hex_array};
use super::volumes::{self, VolumeBinding, VolumeState, VOLUMES_DIR};
use super::{files, keystore_file, Keystore, KEYSTORE_FILE, KEYS_DIR, VERSION};
use crate::error::{Error, ErrorKind, Result};

impl Keystore {
    /// Upgrades a version 1 keystore to version 2 in place (see the module documentation).
    /// A version 2 keystore is left as it is (after checking the passphrase).
    pub fn upgrade(&self, passphrase: Option<&[u8]>) -> Result<()> {
        let dir = self.dir();
        let _lock = manifest::lock(dir, true)?;
        let file = super::read_keystore_file(dir)?;
        if file.version == VERSION {
            drop(_lock);
            return Keystore::open(dir)?.unlock(passphrase).map(|_| ());
        }
        let master = super::unseal_master(dir, &file, passphrase)?;
        let mac_key = manifest::mac_key(&master);
        let old = manifest::read_verified(dir, &mac_key).ok();
        let mut m = Manifest::new(file.protection);
        if let Some(old) = &old {
            m.counter = old.counter;
        }
        // Volume records.
        let vol_dir = dir.join(VOLUMES_DIR);
        files::create_private_dir(&vol_dir)?;
        for name in list(dir, VOLUMES_DIR)? {
            let id = hex_array::<16>(&name, "a volume record name").map_err(|_| {
                Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "{} is not a volume record name; remove it and run `qvol keystore \
                         upgrade` again",
                        vol_dir.join(format!("{name}.json")).display()
                    ),
                )
            })?;
            let (binding, state) = match volumes::read_record_v1(dir, &master, &id)? {
                Some(generation) => (
                    VolumeBinding {
                        volume_id: id,
                        key_id: String::new(),
                        vm: String::new(),
                    },
                    VolumeState {
                        generation,
                        root_id: [0; 32],
                    },
                ),
                None => volumes::read_record_v2(dir, &master, &id)?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Integrity,
                        format!("volume record {name} vanished"),
                    )
                })?,
            };
            let mut floor = state;
            if let Some(e) = old.as_ref().and_then(|o| o.volumes.get(&name)) {
                if e.floor_generation > floor.generation {
                    floor.generation = e.floor_generation;
                    floor.root_id = hex_array::<32>(&e.floor_root_id, "a root id")?;
                }
            }
            let key = volumes::volume_key(&master, &id);
            files::write_atomic(
                &volumes::record_path(dir, &id),
                &volumes::record_bytes(&key, &binding, &state),
            )?;
            m.volumes.insert(
                name,
                VolumeEntry {
                    key_id: binding.key_id,
                    vm: binding.vm,
                    floor_generation: floor.generation,
                    floor_root_id: hex::encode(floor.root_id),
                    pending: false,
                },
            );
        }
        // Key records, as they are (version 1 records stay readable).
        for id in list(dir, KEYS_DIR)? {
            let data = files::read_bounded(&dir.join(KEYS_DIR).join(format!("{id}.json")))?;
            m.keys.insert(id, vec![Some(manifest::file_hash(&data))]);
        }
        manifest::write(dir, &mac_key, &mut m)?;
        // Flip keystore.json last.
        let (new_file, _) = match (file.protection, passphrase) {
            (records::Protection::Argon2id, Some(pass)) => {
                let kdf = file
                    .kdf
                    .ok_or_else(|| Error::corrupt("keystore.json lacks its KDF parameters"))?;
                keystore_file(&master, Some(pass), kdf, file.created.clone())?
            }
            _ => keystore_file(
                &master,
                None,
                crate::KdfParams::default(),
                file.created.clone(),
            )?,
        };
        files::write_atomic(
            &dir.join(KEYSTORE_FILE),
            &records::to_json_secret(&new_file),
        )
    }
}

/// `*.json` names (without suffix) of `DIR/sub`, temporary files excluded.
fn list(dir: &std::path::Path, sub: &str) -> Result<Vec<String>> {
    let d = dir.join(sub);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("cannot list {}", d.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", d.display()), e))?;
        if let Some(stem) = entry
            .file_name()
            .to_str()
            .filter(|n| !n.starts_with('.'))
            .and_then(|n| n.strip_suffix(".json"))
        {
            out.push(stem.to_owned());
        }
    }
    out.sort();
    Ok(out)
}
