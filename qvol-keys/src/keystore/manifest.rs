//! The keystore manifest (keystore version 2): `manifest.json`, MACed with a key derived
//! from the master seed, lists the protection mode, every key record with the SHA-256 of its
//! bytes, every volume binding with its floor state, and a counter incremented on each
//! write. Every admin write runs as a [`UnlockedKeystore::transact`] under an exclusive
//! `flock` of `DIR/.lock`; readers take the lock shared.
//!
//! Crash safety: a transaction first writes an intermediate manifest that accepts both the
//! old and the new state of every file it touches (old or new hash, absent or present), then
//! changes the files, then writes the final manifest. A crash anywhere leaves a directory that
//! verifies; the next transaction resolves the intermediate entries against the files.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::records::{self, hex_array, Protection};
use super::{files, time, volumes, UnlockedKeystore, KEYSTORE_FILE, KEYS_DIR, MASTER_SALT};
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::{hkdf32, lp};
use crate::secret::Secret32;

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the lock file (flock).
pub const LOCK_FILE: &str = ".lock";
/// `format` of the manifest.
pub const MANIFEST_FORMAT: &str = "qvol-keystore-manifest";
/// Version of the manifest.
pub const MANIFEST_VERSION: u32 = 2;
/// HKDF info of the manifest MAC key.
pub const MANIFEST_MAC_INFO: &[u8] = b"qvol-keystore-v2 manifest mac key";
/// MAC input label of the manifest.
pub const MANIFEST_MAC_LABEL: &[u8] = b"qvol-keystore-v2 manifest";

/// One volume binding and its floor, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    /// The key the volume is bound to ("" = unknown, upgraded from version 1).
    pub key_id: String,
    /// The VM of that key ("" = unknown).
    pub vm: String,
    /// Lowest generation the volume may be at.
    pub floor_generation: u64,
    /// Root id at the floor generation, hex (all zeros = unknown).
    pub floor_root_id: String,
    /// Set while a transaction creates or removes the record: the file may be absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// manifest.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Always [`MANIFEST_VERSION`].
    pub version: u32,
    /// Incremented on every write.
    pub counter: u64,
    /// Time of the last write (RFC 3339).
    pub updated: String,
    /// Protection mode of keystore.json.
    pub protection: Protection,
    /// During a change of passphrase: the other accepted protection mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection_pending: Option<Protection>,
    /// Key id -> accepted SHA-256 of the record file (hex; `null` = the file may be absent).
    /// One entry, except inside a transaction.
    pub keys: BTreeMap<String, Vec<Option<String>>>,
    /// Volume id (hex) -> binding and floor.
    pub volumes: BTreeMap<String, VolumeEntry>,
    /// HMAC-SHA-256 of the fields above (docs/KEYS.md §4), hex.
    pub mac: String,
}

fn protection_code(p: Protection) -> u8 {
    match p {
        Protection::Argon2id => 1,
        Protection::None => 2,
    }
}

impl Manifest {
    /// An empty manifest (counter 0; [`write`] makes it 1).
    pub fn new(protection: Protection) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            counter: 0,
            updated: String::new(),
            protection,
            protection_pending: None,
            keys: BTreeMap::new(),
            volumes: BTreeMap::new(),
            mac: String::new(),
        }
    }

    /// The MAC input (docs/KEYS.md §4).
    fn mac_input(&self) -> Result<Vec<u8>> {
        let mut m = Vec::with_capacity(256);
        m.extend_from_slice(MANIFEST_MAC_LABEL);
        m.extend_from_slice(&self.version.to_le_bytes());
        m.extend_from_slice(&self.counter.to_le_bytes());
        m.extend_from_slice(&lp(self.updated.as_bytes()));
        m.push(protection_code(self.protection));
        m.push(self.protection_pending.map_or(0, protection_code));
        m.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        for (id, hashes) in &self.keys {
            m.extend_from_slice(&lp(id.as_bytes()));
            m.push(u8::try_from(hashes.len()).unwrap_or(u8::MAX));
            for h in hashes {
                match h {
                    None => m.push(0),
                    Some(h) => {
                        m.push(1);
                        m.extend_from_slice(&hex_array::<32>(h, "a key record hash")?);
                    }
                }
            }
        }
        m.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for (id, v) in &self.volumes {
            m.extend_from_slice(&hex_array::<16>(id, "a volume id")?);
            m.extend_from_slice(&lp(v.key_id.as_bytes()));
            m.extend_from_slice(&lp(v.vm.as_bytes()));
            m.extend_from_slice(&v.floor_generation.to_le_bytes());
            m.extend_from_slice(&hex_array::<32>(&v.floor_root_id, "a root id")?);
            m.push(u8::from(v.pending));
        }
        Ok(m)
    }

    fn mac(&self, key: &Secret32) -> Result<Hmac<Sha256>> {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key.expose()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(&self.mac_input()?);
        Ok(mac)
    }

    /// The accepted hashes of key record `id`, if listed.
    pub fn key_hashes(&self, id: &str) -> Option<&Vec<Option<String>>> {
        self.keys.get(id)
    }
}

/// The manifest MAC key: HKDF(MASTER_SALT, MS, MANIFEST_MAC_INFO).
pub fn mac_key(master: &Secret32) -> Secret32 {
    hkdf32(MASTER_SALT, master.expose(), &[MANIFEST_MAC_INFO])
}

/// SHA-256 of a file's bytes, hex.
pub fn file_hash(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The held lock on `DIR/.lock`; released on drop.
pub struct DirLock(#[allow(dead_code)] File);

/// Takes the keystore lock, exclusive (writers) or shared (readers).
pub fn lock(dir: &Path, exclusive: bool) -> Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let file = opts
        .open(&path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    crate::mlock::flock(&file, exclusive)
        .map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
    Ok(DirLock(file))
}

/// Reads and verifies the manifest of `dir`.
pub fn read_verified(dir: &Path, key: &Secret32) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let what = path.display().to_string();
    if !path.exists() {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("{what} is missing: the keystore manifest was deleted"),
        ));
    }
    let m: Manifest = records::parse(&files::read_bounded(&path)?, &what)
        .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?;
    if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("{what} is not a version {MANIFEST_VERSION} keystore manifest"),
        ));
    }
    let tag = hex_array::<32>(&m.mac, "the manifest MAC")
        .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?;
    let bad = |_| {
        Error::new(
            ErrorKind::Integrity,
            format!(
                "{what} fails its MAC: it was edited, or keystore.json was replaced by one \
                 holding another master seed"
            ),
        )
    };
    m.mac(key)
        .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?
        .verify_slice(&tag)
        .map_err(bad)?;
    Ok(m)
}

/// Writes `m` with its counter incremented and a fresh MAC (atomic, fsynced).
pub fn write(dir: &Path, key: &Secret32, m: &mut Manifest) -> Result<()> {
    m.counter = m
        .counter
        .checked_add(1)
        .ok_or_else(|| Error::invalid("the manifest counter is exhausted"))?;
    m.updated = time::now_rfc3339();
    m.mac = hex::encode(m.mac(key)?.finalize().into_bytes());
    files::write_atomic(&dir.join(MANIFEST_FILE), &records::to_json(m))
}

fn key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(KEYS_DIR).join(format!("{id}.json"))
}

/// Names of the `*.json` files of `sub` that are not temporary files, without the suffix.
fn list_json(dir: &Path, sub: &str) -> Result<Vec<String>> {
    let d = dir.join(sub);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", d.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", d.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} holds a file whose name is not UTF-8 (not written by qvol)",
                    d.display()
                ),
            ));
        };
        if name.starts_with('.') {
            continue; // a temporary file of an interrupted write
        }
        if let Some(stem) = name.strip_suffix(".json") {
            out.push(stem.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that a key record's bytes are what the manifest lists for it.
pub fn check_key_bytes(dir: &Path, m: &Manifest, id: &str, data: &[u8]) -> Result<()> {
    let path = key_path(dir, id);
    match m.key_hashes(id) {
        None => Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{} is not listed in the keystore manifest (added or renamed by someone else)",
                path.display()
            ),
        )),
        Some(hashes) => {
            let h = file_hash(data);
            if hashes.iter().flatten().any(|x| *x == h) {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "{} does not match the hash the keystore manifest records for it (edited)",
                        path.display()
                    ),
                ))
            }
        }
    }
}

/// What a repairing transaction may find damaged: its own target.
#[derive(Clone, Copy)]
pub enum Skip<'a> {
    /// Check everything.
    Nothing,
    /// Key record `id` (delete with force).
    Key(&'a str),
    /// The record of this volume id, hex (forget).
    Volume(&'a str),
}

/// Checks every key record and volume record of `dir` against `m`, and that keystore.json's
/// protection mode is the one `m` records.
pub fn check_files(
    dir: &Path,
    master: &Secret32,
    m: &Manifest,
    protection: Protection,
    skip: Skip<'_>,
) -> Result<()> {
    if protection != m.protection && Some(protection) != m.protection_pending {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{} has protection {:?} but the keystore manifest records {:?}: keystore.json \
                 was replaced",
                dir.join(KEYSTORE_FILE).display(),
                protection,
                m.protection
            ),
        ));
    }
    let on_disk = list_json(dir, KEYS_DIR)?;
    for id in &on_disk {
        if matches!(skip, Skip::Key(k) if k == id) {
            continue;
        }
        let data = files::read_bounded(&key_path(dir, id))?;
        check_key_bytes(dir, m, id, &data)?;
    }
    for (id, hashes) in &m.keys {
        if !on_disk.contains(id)
            && !hashes.contains(&None)
            && !matches!(skip, Skip::Key(k) if k == id)
        {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is listed in the keystore manifest but missing (deleted)",
                    key_path(dir, id).display()
                ),
            ));
        }
    }
    let vols = list_json(dir, volumes::VOLUMES_DIR)?;
    for name in &vols {
        if matches!(skip, Skip::Volume(v) if v == name) {
            continue;
        }
        let path = volumes::record_path_by_name(dir, name);
        let Some(entry) = m.volumes.get(name) else {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is not listed in the keystore manifest (added by someone else; adopt \
                     the image with `qvol volume adopt IMAGE` after removing the file)",
                    path.display()
                ),
            ));
        };
        let id = hex_array::<16>(name, "a volume id")?;
        volumes::verify_record_file(dir, master, &id, entry)?;
    }
    for (name, entry) in &m.volumes {
        if !vols.contains(name) && !entry.pending && !matches!(skip, Skip::Volume(v) if v == name) {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is listed in the keystore manifest but missing (deleted)",
                    volumes::record_path_by_name(dir, name).display()
                ),
            ));
        }
    }
    Ok(())
}

/// Resolves the intermediate entries an interrupted transaction left, against the files
/// (which [`check_files`] has verified).
fn normalize(dir: &Path, m: &mut Manifest, protection: Protection) -> Result<()> {
    m.protection = protection;
    m.protection_pending = None;
    let ids: Vec<String> = m
        .keys
        .iter()
        .filter(|(_, h)| h.len() != 1 || h[0].is_none())
        .map(|(id, _)| id.clone())
        .collect();
    for id in ids {
        let path = key_path(dir, &id);
        if path.exists() {
            let h = file_hash(&files::read_bounded(&path)?);
            m.keys.insert(id, vec![Some(h)]);
        } else {
            m.keys.remove(&id);
        }
    }
    let pending: Vec<String> = m
        .volumes
        .iter()
        .filter(|(_, v)| v.pending)
        .map(|(id, _)| id.clone())
        .collect();
    for name in pending {
        if volumes::record_path_by_name(dir, &name).exists() {
            if let Some(v) = m.volumes.get_mut(&name) {
                v.pending = false;
            }
        } else {
            m.volumes.remove(&name);
        }
    }
    Ok(())
}

/// A file change of a transaction.
pub enum FileOp {
    /// Write key record `id` with these bytes.
    WriteKey(String, Vec<u8>),
    /// Remove key record `id`.
    RemoveKey(String),
    /// Write the record of a volume (its manifest entry is set by the transaction's closure).
    WriteVolume([u8; 16], Vec<u8>),
    /// Remove the record of a volume.
    RemoveVolume([u8; 16]),
    /// Replace keystore.json (new protection mode).
    WriteKeystore(Vec<u8>, Protection),
}

impl UnlockedKeystore {
    /// Reads the verified manifest (the caller holds the lock, shared or exclusive).
    pub(super) fn manifest(&self) -> Result<Manifest> {
        read_verified(&self.dir, &self.manifest_key)
    }

    /// Runs an admin write: under the exclusive lock, verifies the directory, lets `f`
    /// change the manifest and name the file changes, then applies them crash-safely.
    pub(super) fn transact<T>(
        &self,
        f: impl FnOnce(&mut Manifest) -> Result<(Vec<FileOp>, T)>,
    ) -> Result<T> {
        self.transact_skipping(Skip::Nothing, f)
    }

    /// [`UnlockedKeystore::transact`] tolerating damage to the one file named by `skip`.
    pub(super) fn transact_skipping<T>(
        &self,
        skip: Skip<'_>,
        f: impl FnOnce(&mut Manifest) -> Result<(Vec<FileOp>, T)>,
    ) -> Result<T> {
        let _lock = lock(&self.dir, true)?;
        let protection = super::read_keystore_file(&self.dir)?.protection;
        let mut m = self.manifest()?;
        check_files(&self.dir, &self.master, &m, protection, skip)?;
        normalize(&self.dir, &mut m, protection)?;
        let old = m.clone();
        let (ops, out) = f(&mut m)?;
        if ops.is_empty() {
            if m.keys != old.keys
                || m.volumes != old.volumes
                || m.protection != old.protection
                || old.counter == 0
            {
                write(&self.dir, &self.manifest_key, &mut m)?;
            }
            return Ok(out);
        }
        // The intermediate manifest accepts both states of every file touched.
        let mut mid = m.clone();
        for op in &ops {
            match op {
                FileOp::WriteKey(id, data) => {
                    let mut acc = old.keys.get(id).cloned().unwrap_or_else(|| vec![None]);
                    acc.push(Some(file_hash(data)));
                    mid.keys.insert(id.clone(), acc);
                    m.keys.insert(id.clone(), vec![Some(file_hash(data))]);
                }
                FileOp::RemoveKey(id) => {
                    let mut acc = old.keys.get(id).cloned().unwrap_or_default();
                    acc.push(None);
                    mid.keys.insert(id.clone(), acc);
                    m.keys.remove(id);
                }
                FileOp::WriteVolume(id, _) | FileOp::RemoveVolume(id) => {
                    m.volumes
                        .entry(hex::encode(id))
                        .and_modify(|e| e.pending = false);
                    let name = hex::encode(id);
                    let entry = m
                        .volumes
                        .get(&name)
                        .or_else(|| old.volumes.get(&name))
                        .cloned();
                    if let Some(mut e) = entry {
                        // A new record, a removed one, or a rebinding: meanwhile the file
                        // may be absent or hold either binding (checked by MAC only).
                        e.pending = true;
                        mid.volumes.insert(name, e);
                    }
                }
                FileOp::WriteKeystore(_, p) => {
                    mid.protection = old.protection;
                    mid.protection_pending = Some(*p);
                }
            }
        }
        write(&self.dir, &self.manifest_key, &mut mid)?;
        for op in ops {
            match op {
                FileOp::WriteKey(id, data) => {
                    files::write_atomic(&key_path(&self.dir, &id), &data)?;
                }
                FileOp::RemoveKey(id) => {
                    let p = key_path(&self.dir, &id);
                    if p.exists() {
                        files::remove(&p)?;
                    }
                }
                FileOp::WriteVolume(id, data) => {
                    let p = volumes::record_path(&self.dir, &id);
                    files::create_private_dir(&self.dir.join(volumes::VOLUMES_DIR))?;
                    files::write_atomic(&p, &data)?;
                }
                FileOp::RemoveVolume(id) => {
                    let p = volumes::record_path(&self.dir, &id);
                    if p.exists() {
                        files::remove(&p)?;
                    }
                }
                FileOp::WriteKeystore(data, _) => {
                    files::write_atomic(&self.dir.join(KEYSTORE_FILE), &data)?;
                }
            }
        }
        write(&self.dir, &self.manifest_key, &mut m)?;
        Ok(out)
    }
}
