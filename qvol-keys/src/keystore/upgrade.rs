//! `qvol keystore upgrade`: keystore version 1 -> 2 (docs/KEYS.md §4, "Upgrade").
//!
//! First everything is checked (the passphrase, every version 1 volume record's MAC, every
//! key record's generations against their fingerprints), so that a refused upgrade changes no
//! file. Then the steps, each crash-safe (temporary file, fsync, rename) and the whole
//! rerunnable:
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
use super::{files, keystore_file, Keystore, UnlockedKeystore, KEYSTORE_FILE, KEYS_DIR, VERSION};
use crate::error::{Error, ErrorKind, Result};

/// One volume record as the upgrade will write it.
struct VolumePlan {
    name: String,
    id: [u8; 16],
    binding: VolumeBinding,
    state: VolumeState,
    floor: VolumeState,
    /// A version 1 record to rewrite (false: converted by an interrupted run already).
    rewrite: bool,
}

/// The end of every sentence refusing the upgrade because of one file.
fn nothing_changed(e: Error) -> Error {
    Error::new(
        e.kind(),
        format!(
            "{e} (nothing was changed: restore the file from a backup or remove it, then run \
             `qvol keystore upgrade` again)"
        ),
    )
}

impl Keystore {
    /// Upgrades a version 1 keystore to version 2 in place (see the module documentation).
    /// A version 2 keystore is left as it is (after checking the passphrase). Every volume
    /// record (its version 1 MAC) and every key record (format, and each generation's key
    /// pair against its recorded fingerprint, which ties it to this master seed) is checked
    /// before anything is written: a refused upgrade changes no file.
    pub fn upgrade(&self, passphrase: Option<&[u8]>) -> Result<()> {
        let dir = self.dir();
        let _lock = manifest::lock(dir, true)?;
        let file = super::read_keystore_file(dir)?;
        if file.version == VERSION {
            drop(_lock);
            return Keystore::open(dir)?.unlock(passphrase).map(|_| ());
        }
        let u = UnlockedKeystore::new(
            dir.to_path_buf(),
            super::unseal_master(dir, &file, passphrase)?,
        );
        let master = &u.master;
        let mac_key = manifest::mac_key(master);
        let old = manifest::read_verified(dir, &mac_key).ok();
        let mut m = Manifest::new(file.protection);
        if let Some(old) = &old {
            m.counter = old.counter;
            m.forgotten = old.forgotten.clone();
        }

        // 1. Check everything; nothing is written before all of it passed.
        let vol_dir = dir.join(VOLUMES_DIR);
        let mut plans = Vec::new();
        for name in list(dir, VOLUMES_DIR)? {
            let id = hex_array::<16>(&name, "a volume record name").map_err(|_| {
                Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "{} is not a volume record name; remove it and run `qvol keystore \
                         upgrade` again (nothing was changed)",
                        vol_dir.join(format!("{name}.json")).display()
                    ),
                )
            })?;
            let v1 = volumes::read_record_v1(dir, master, &id).map_err(nothing_changed)?;
            let (binding, state, rewrite) = match v1 {
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
                    true,
                ),
                None => {
                    let (b, s) = volumes::read_record_v2(dir, master, &id)
                        .map_err(nothing_changed)?
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Integrity,
                                format!("volume record {name} vanished"),
                            )
                        })?;
                    (b, s, false)
                }
            };
            let mut floor = state;
            if let Some(e) = old.as_ref().and_then(|o| o.volumes.get(&name)) {
                if e.floor_generation > floor.generation {
                    floor.generation = e.floor_generation;
                    floor.root_id = hex_array::<32>(&e.floor_root_id, "a root id")?;
                }
            }
            plans.push(VolumePlan {
                name,
                id,
                binding,
                state,
                floor,
                rewrite,
            });
        }
        // Key records, kept as they are (version 1 records stay readable), each checked.
        for id in list(dir, KEYS_DIR)? {
            let path = dir.join(KEYS_DIR).join(format!("{id}.json"));
            let data = files::read_bounded(&path).map_err(nothing_changed)?;
            let rec = super::parse_key_record(&path, &id, &data).map_err(nothing_changed)?;
            for g in &rec.generations {
                u.key_pair(&rec, g).map_err(|e| {
                    nothing_changed(Error::new(
                        ErrorKind::Integrity,
                        format!("{}: {e}", path.display()),
                    ))
                })?;
            }
            m.keys.insert(id, vec![Some(manifest::file_hash(&data))]);
        }
        let (new_file, _) = match (file.protection, passphrase) {
            (records::Protection::Argon2id, Some(pass)) => {
                let kdf = file
                    .kdf
                    .ok_or_else(|| Error::corrupt("keystore.json lacks its KDF parameters"))?;
                keystore_file(master, Some(pass), kdf, file.created.clone())?
            }
            _ => keystore_file(
                master,
                None,
                crate::KdfParams::default(),
                file.created.clone(),
            )?,
        };

        // 2. Write: the volume records, the manifest, and keystore.json last.
        files::create_private_dir(&vol_dir)?;
        for p in plans {
            if p.rewrite {
                let key = volumes::volume_key(master, &p.id);
                files::write_atomic(
                    &volumes::record_path(dir, &p.id),
                    &volumes::record_bytes(&key, &p.binding, &p.state),
                )?;
            }
            m.volumes.insert(
                p.name,
                VolumeEntry {
                    key_id: p.binding.key_id,
                    vm: p.binding.vm,
                    floor_generation: p.floor.generation,
                    floor_root_id: hex::encode(p.floor.root_id),
                    pending: false,
                    previous: None,
                },
            );
        }
        manifest::write(dir, &mac_key, &mut m)?;
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
