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
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::records::{self, hex_array, Protection};
use super::{files, time, volumes, UnlockedKeystore, KEYSTORE_FILE, KEYS_DIR, MASTER_SALT};
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::{hkdf32, lp};
use crate::secret::Secret32;
use zeroize::Zeroizing;

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
/// Label opening the `wraps` part of the manifest MAC input (docs/KEYS.md §4.2).
pub const MANIFEST_WRAPS_LABEL: &[u8] = b"qvol-keystore-v2 manifest wraps";
/// Most generations recorded for one volume in `wraps` (an image holds far fewer keyslots).
pub const MAX_WRAPS_PER_VOLUME: usize = 256;

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
    /// Set while a transaction rebinds the record (adopting a record upgraded from version
    /// 1): the entry before it. The file holds either binding; the next transaction keeps
    /// the entry whose binding the file carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousEntry>,
}

/// The entry of a volume before a rebinding transaction (see [`VolumeEntry::previous`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousEntry {
    /// The key the volume was bound to.
    pub key_id: String,
    /// The VM of that key.
    pub vm: String,
    /// The floor generation of that entry.
    pub floor_generation: u64,
    /// The floor root id of that entry, hex.
    pub floor_root_id: String,
}

impl VolumeEntry {
    /// The entry as `previous` of a transaction.
    pub fn as_previous(&self) -> PreviousEntry {
        PreviousEntry {
            key_id: self.key_id.clone(),
            vm: self.vm.clone(),
            floor_generation: self.floor_generation,
            floor_root_id: self.floor_root_id.clone(),
        }
    }

    /// The entry without the marks of a transaction.
    pub fn settled(&self) -> VolumeEntry {
        VolumeEntry {
            pending: false,
            previous: None,
            ..self.clone()
        }
    }

    /// The previous entry as a settled entry, if any.
    pub fn previous_entry(&self) -> Option<VolumeEntry> {
        self.previous.as_ref().map(|p| VolumeEntry {
            key_id: p.key_id.clone(),
            vm: p.vm.clone(),
            floor_generation: p.floor_generation,
            floor_root_id: p.floor_root_id.clone(),
            pending: false,
            previous: None,
        })
    }
}

/// What the manifest keeps of a forgotten volume: the highest state the keystore knew, and
/// when it was forgotten. Adopting the volume again below that state needs
/// `--accept-rollback` (docs/KEYS.md §4.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    /// Generation of the highest state known when the volume was forgotten.
    pub floor_generation: u64,
    /// Root id of that state, hex (all zeros = unknown).
    pub floor_root_id: String,
    /// When the volume was forgotten (RFC 3339).
    pub forgotten: String,
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
    /// Volume id (hex) -> tombstone of a forgotten volume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forgotten: BTreeMap<String, Tombstone>,
    /// Volume id (hex) -> the generations of the bound key that the volume's recipient
    /// keyslots are wrapped for, as last recorded (ascending, no duplicates). Absent:
    /// unknown, so every generation of the key may be in use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wraps: BTreeMap<String, Vec<u32>>,
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
            forgotten: BTreeMap::new(),
            wraps: BTreeMap::new(),
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
            m.push(u8::from(v.pending) | (u8::from(v.previous.is_some()) << 1));
            if let Some(p) = &v.previous {
                m.extend_from_slice(&lp(p.key_id.as_bytes()));
                m.extend_from_slice(&lp(p.vm.as_bytes()));
                m.extend_from_slice(&p.floor_generation.to_le_bytes());
                m.extend_from_slice(&hex_array::<32>(&p.floor_root_id, "a root id")?);
            }
        }
        // Absent when empty, so that manifests written before tombstones keep their MAC; the
        // encoding above is self-delimiting, so this stays unambiguous. When wraps follow,
        // the tombstone count is always there (even 0), so a reader always knows where the
        // tombstones end and the wraps begin.
        if !self.forgotten.is_empty() || !self.wraps.is_empty() {
            m.extend_from_slice(&(self.forgotten.len() as u32).to_le_bytes());
            for (id, t) in &self.forgotten {
                m.extend_from_slice(&hex_array::<16>(id, "a volume id")?);
                m.extend_from_slice(&t.floor_generation.to_le_bytes());
                m.extend_from_slice(&hex_array::<32>(&t.floor_root_id, "a root id")?);
                m.extend_from_slice(&lp(t.forgotten.as_bytes()));
            }
        }
        // Absent when empty, so that manifests written before wraps keep their MAC.
        if !self.wraps.is_empty() {
            m.extend_from_slice(MANIFEST_WRAPS_LABEL);
            m.extend_from_slice(&(self.wraps.len() as u32).to_le_bytes());
            for (id, generations) in &self.wraps {
                m.extend_from_slice(&hex_array::<16>(id, "a volume id")?);
                m.extend_from_slice(&(generations.len() as u32).to_le_bytes());
                for g in generations {
                    m.extend_from_slice(&g.to_le_bytes());
                }
            }
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

/// How long [`lock`] waits for another process's lock before failing.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes the keystore lock, exclusive (writers) or shared (readers), waiting at most
/// [`LOCK_TIMEOUT`]: a process that holds the lock forever (a hung or compromised daemon)
/// makes the others fail with one sentence instead of hanging (a daemon's commit hook
/// included).
pub fn lock(dir: &Path, exclusive: bool) -> Result<DirLock> {
    lock_within(dir, exclusive, LOCK_TIMEOUT)
}

/// [`lock`] with another deadline: non-blocking `flock` retried with short sleeps.
pub(super) fn lock_within(dir: &Path, exclusive: bool, deadline: Duration) -> Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true);
    #[cfg(unix)]
    opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    let file = opts
        .open(&path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let taken = crate::mlock::try_flock(&file, exclusive)
            .map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
        if taken {
            return Ok(DirLock(file));
        }
        let waited = start.elapsed();
        if waited >= deadline {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the keystore {} is locked by another process for more than {}",
                    dir.display(),
                    seconds(deadline)
                ),
            ));
        }
        std::thread::sleep(pause.min(deadline - waited));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// "10 s", "0.2 s".
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
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

/// What [`list_json`] returns: the names, and (name, error) of the odd files.
type Listing = (Vec<String>, Vec<(String, Error)>);

/// Names of the `*.json` files of `sub` that are not temporary files, without the suffix;
/// and one error per file whose name is not UTF-8 (never written by qvol).
fn list_json(dir: &Path, sub: &str) -> Result<Listing> {
    let d = dir.join(sub);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(Error::io(format!("cannot list {}", d.display()), e)),
    };
    let mut out = Vec::new();
    let mut odd = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", d.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            odd.push((
                name.to_string_lossy().into_owned(),
                Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "{} holds the file {:?}, whose name is not UTF-8 (not written by qvol; \
                         remove it)",
                        d.display(),
                        entry.path()
                    ),
                ),
            ));
            continue;
        };
        if name.starts_with('.') {
            continue; // a temporary file of an interrupted write
        }
        if let Some(stem) = name.strip_suffix(".json") {
            out.push(stem.to_owned());
        }
    }
    out.sort();
    Ok((out, odd))
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

/// Per-entry problems found by a scan of the directory: key id (or file name) -> the error
/// of that key record, volume id hex (or file name) -> the error of that volume record. An
/// operation on a damaged entry fails with its error; every other entry keeps working.
#[derive(Debug, Default)]
pub struct Damage {
    /// Damaged key records.
    pub keys: BTreeMap<String, Error>,
    /// Damaged volume records.
    pub volumes: BTreeMap<String, Error>,
}

/// A copy of `e` (kind and message; the source is dropped).
pub fn copy_error(e: &Error) -> Error {
    Error::new(e.kind(), e.to_string())
}

/// Fails (Integrity) unless keystore.json's protection mode is the one `m` records. Fatal:
/// another mode means keystore.json was replaced.
pub fn check_protection(dir: &Path, m: &Manifest, protection: Protection) -> Result<()> {
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
    Ok(())
}

/// The problem of key record `id` against `m`, if any: listed but missing, present but not
/// listed, or bytes another than the hash the manifest lists (or unreadable).
pub fn key_problem(dir: &Path, m: &Manifest, id: &str) -> Option<Error> {
    let path = key_path(dir, id);
    if !path.exists() {
        return match m.key_hashes(id) {
            Some(hashes) if !hashes.contains(&None) => Some(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is listed in the keystore manifest but missing (deleted)",
                    path.display()
                ),
            )),
            _ => None,
        };
    }
    match files::read_bounded(&path) {
        Ok(data) => check_key_bytes(dir, m, id, &data).err(),
        Err(e) => Some(e),
    }
}

/// Every damaged key record of `dir` (on disk or listed in `m`).
pub fn scan_keys(dir: &Path, m: &Manifest) -> Result<BTreeMap<String, Error>> {
    let (on_disk, odd) = list_json(dir, KEYS_DIR)?;
    let mut out: BTreeMap<String, Error> = odd.into_iter().collect();
    for id in on_disk.iter().chain(m.keys.keys()) {
        if out.contains_key(id) {
            continue;
        }
        if let Some(e) = key_problem(dir, m, id) {
            out.insert(id.clone(), e);
        }
    }
    Ok(out)
}

/// Every damaged key and volume record of `dir` against `m`. Fails only when a directory
/// cannot be listed.
pub fn scan(dir: &Path, master: &Secret32, m: &Manifest) -> Result<Damage> {
    let keys = scan_keys(dir, m)?;
    let (on_disk, odd) = list_json(dir, volumes::VOLUMES_DIR)?;
    let mut vols: BTreeMap<String, Error> = odd.into_iter().collect();
    for name in on_disk.iter().chain(m.volumes.keys()) {
        if vols.contains_key(name) {
            continue;
        }
        if let Some(e) = volumes::record_problem(dir, master, m, name) {
            vols.insert(name.clone(), e);
        }
    }
    Ok(Damage {
        keys,
        volumes: vols,
    })
}

/// Resolves the intermediate entries an interrupted transaction left, against the files.
/// Damaged entries are left as they are: resolving one against its file would legitimise
/// whatever someone else put there.
fn normalize(
    dir: &Path,
    master: &Secret32,
    m: &mut Manifest,
    protection: Protection,
    damage: &Damage,
) -> Result<()> {
    m.protection = protection;
    m.protection_pending = None;
    let ids: Vec<String> = m
        .keys
        .iter()
        .filter(|(id, h)| (h.len() != 1 || h[0].is_none()) && !damage.keys.contains_key(*id))
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
    let unsettled: Vec<String> = m
        .volumes
        .iter()
        .filter(|(id, v)| (v.pending || v.previous.is_some()) && !damage.volumes.contains_key(*id))
        .map(|(id, _)| id.clone())
        .collect();
    for name in unsettled {
        let Some(entry) = m.volumes.get(&name) else {
            continue;
        };
        // The entry whose binding the file carries (absent: the record was being created or
        // removed, and the transaction did not get that far, or did).
        match volumes::resolve_entry(dir, master, &name, entry)? {
            Some(e) => {
                m.volumes.insert(name, e);
            }
            None => {
                m.volumes.remove(&name);
            }
        }
    }
    // A tombstone next to a listed volume: an interrupted adopt that wrote the record (the
    // adopt happened) or an interrupted forget that did not remove it (the forget did not).
    // Either way the entry stands. Damaged entries keep their tombstone.
    m.forgotten
        .retain(|name, _| !m.volumes.contains_key(name) || damage.volumes.contains_key(name));
    // Wraps of a volume no longer listed (a record whose creation did not get through).
    retain_listed_wraps(m);
    Ok(())
}

/// Drops the `wraps` of volumes the manifest does not list.
fn retain_listed_wraps(m: &mut Manifest) {
    let volumes = &m.volumes;
    m.wraps.retain(|name, _| volumes.contains_key(name));
}

/// The `wraps` of the intermediate manifest of a transaction from `old` to `new`, for the
/// volumes `mid` lists. After a crash the volume settles as in `old` or as in `new` (an
/// absent entry constrains nothing), so the intermediate wraps must refuse whatever either
/// refuses: the union of the generations, or unknown when either is unknown.
fn intermediate_wraps(
    old: &Manifest,
    new: &Manifest,
    mid: &Manifest,
) -> BTreeMap<String, Vec<u32>> {
    let mut out = BTreeMap::new();
    for name in mid.volumes.keys() {
        let states: Vec<Option<&Vec<u32>>> = [old, new]
            .into_iter()
            .filter(|m| m.volumes.contains_key(name))
            .map(|m| m.wraps.get(name))
            .collect();
        if states.is_empty() || states.contains(&None) {
            continue;
        }
        let mut all: Vec<u32> = states.into_iter().flatten().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        out.insert(name.clone(), all);
    }
    out
}

/// What a transaction's body returns: the key ids it removed, the volume names whose record
/// it removed or rewrote, and the value of the caller's closure.
type Applied<T> = (Vec<String>, Vec<String>, T);

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
    /// Replace keystore.json (new protection mode); zeroized on drop (it may hold the seed).
    WriteKeystore(Zeroizing<Vec<u8>>, Protection),
}

impl UnlockedKeystore {
    /// Reads the verified manifest (the caller holds the lock, shared or exclusive).
    pub(super) fn manifest(&self) -> Result<Manifest> {
        read_verified(&self.dir, &self.manifest_key)
    }

    /// Runs an admin write: under the exclusive lock, verifies the manifest and the
    /// protection mode (fatal), scans every record for damage (kept for
    /// [`UnlockedKeystore::damaged_entries`]; not fatal: `f` refuses to touch a damaged
    /// entry, and damaged entries keep their manifest lines), lets `f` change the manifest and
    /// name the file changes, then applies them crash-safely.
    pub(super) fn transact<T>(
        &self,
        f: impl FnOnce(&mut Manifest) -> Result<(Vec<FileOp>, T)>,
    ) -> Result<T> {
        let _lock = lock(&self.dir, true)?;
        let protection = super::read_keystore_file(&self.dir)?.protection;
        let mut m = self.manifest()?;
        check_protection(&self.dir, &m, protection)?;
        let mut damage = scan(&self.dir, &self.master, &m)?;
        normalize(&self.dir, &self.master, &mut m, protection, &damage)?;
        let result = self.apply(m, f);
        if let Ok((removed_keys, touched_volumes, _)) = &result {
            for id in removed_keys {
                damage.keys.remove(id);
            }
            for name in touched_volumes {
                damage.volumes.remove(name);
            }
        }
        self.set_damage(damage);
        result.map(|(_, _, out)| out)
    }

    /// The body of [`UnlockedKeystore::transact`] once the manifest is verified and
    /// normalized: returns the key ids and volume names it removed, and `f`'s value.
    fn apply<T>(
        &self,
        mut m: Manifest,
        f: impl FnOnce(&mut Manifest) -> Result<(Vec<FileOp>, T)>,
    ) -> Result<Applied<T>> {
        let old = m.clone();
        let (ops, out) = f(&mut m)?;
        retain_listed_wraps(&mut m);
        if ops.is_empty() {
            if m.keys != old.keys
                || m.volumes != old.volumes
                || m.protection != old.protection
                || m.forgotten != old.forgotten
                || m.wraps != old.wraps
                || old.counter == 0
            {
                write(&self.dir, &self.manifest_key, &mut m)?;
            }
            return Ok((Vec::new(), Vec::new(), out));
        }
        let removed_keys: Vec<String> = ops
            .iter()
            .filter_map(|op| match op {
                FileOp::RemoveKey(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        let touched_volumes: Vec<String> = ops
            .iter()
            .filter_map(|op| match op {
                // Removed, or written whole: either way no longer damaged.
                FileOp::RemoveVolume(id) | FileOp::WriteVolume(id, _) => Some(hex::encode(id)),
                _ => None,
            })
            .collect();
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
                    let name = hex::encode(id);
                    let new = m.volumes.get(&name).map(VolumeEntry::settled);
                    let was = old.volumes.get(&name);
                    let entry = match (new.clone(), was) {
                        // Rewritten (rebound, or repaired): the file holds the old or the
                        // new binding, never none; the entry of the binding it holds wins.
                        (Some(mut n), Some(w)) => {
                            n.previous = if n.key_id == w.key_id && n.vm == w.vm {
                                w.previous.clone()
                            } else {
                                Some(w.as_previous())
                            };
                            Some(n)
                        }
                        // Created: the file may be absent.
                        (Some(mut n), None) => {
                            n.pending = true;
                            Some(n)
                        }
                        // Removed: the file may be absent.
                        (None, Some(w)) => {
                            let mut w = w.clone();
                            w.pending = true;
                            Some(w)
                        }
                        (None, None) => None,
                    };
                    if let Some(n) = new {
                        m.volumes.insert(name.clone(), n);
                    }
                    match entry {
                        Some(e) => {
                            mid.volumes.insert(name, e);
                        }
                        None => {
                            mid.volumes.remove(&name);
                        }
                    }
                }
                FileOp::WriteKeystore(_, p) => {
                    mid.protection = old.protection;
                    mid.protection_pending = Some(*p);
                }
            }
        }
        // A tombstone goes in the intermediate manifest and leaves only with the final one:
        // until the record is written, the adopt that removes it may not have happened.
        for (name, t) in &old.forgotten {
            mid.forgotten
                .entry(name.clone())
                .or_insert_with(|| t.clone());
        }
        mid.wraps = intermediate_wraps(&old, &m, &mid);
        write(&self.dir, &self.manifest_key, &mut mid)?;
        #[cfg(test)]
        if test_hooks::crash_at(test_hooks::CrashPoint::AfterIntermediate) {
            return Err(Error::invalid(
                "simulated crash after the intermediate manifest",
            ));
        }
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
        #[cfg(test)]
        if test_hooks::crash_at(test_hooks::CrashPoint::BeforeFinal) {
            return Err(Error::invalid("simulated crash before the final manifest"));
        }
        write(&self.dir, &self.manifest_key, &mut m)?;
        Ok((removed_keys, touched_volumes, out))
    }
}

/// Simulated crashes inside a transaction (unit tests only).
#[cfg(test)]
pub(super) mod test_hooks {
    use std::cell::Cell;

    /// Where the next transaction of this thread stops, as if the process died there.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum CrashPoint {
        /// After writing the intermediate manifest, before changing any file.
        AfterIntermediate,
        /// After changing the files, before writing the final manifest.
        BeforeFinal,
    }

    thread_local! {
        static CRASH: Cell<Option<CrashPoint>> = const { Cell::new(None) };
    }

    /// Makes the next transaction of this thread stop at `at`.
    pub fn crash_next_transaction_at(at: CrashPoint) {
        CRASH.with(|c| c.set(Some(at)));
    }

    /// Whether the transaction stops here (then the hook is cleared).
    pub(crate) fn crash_at(here: CrashPoint) -> bool {
        CRASH.with(|c| {
            if c.get() == Some(here) {
                c.set(None);
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{KdfParams, Keystore};
    use super::*;

    /// An interrupted transaction left key `id` as "old hash or absent" and someone then
    /// edited the file: the next admin write must not resolve the entry against the edited
    /// file (which would legitimise it).
    #[test]
    fn an_interrupted_entry_with_a_damaged_file_is_not_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let u = Keystore::init(d, None, KdfParams::insecure_for_tests())
            .unwrap()
            .unlock(None)
            .unwrap();
        let id = u.new_key("web01").unwrap().key_id;
        let path = key_path(d, &id);
        {
            let _lock = lock(d, true).unwrap();
            let mut m = u.manifest().unwrap();
            m.keys.get_mut(&id).unwrap().push(None);
            write(d, &u.manifest_key, &mut m).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("\"rotation_count\": 0", "\"rotation_count\": 9"),
        )
        .unwrap();
        let line = u.manifest().unwrap().keys[&id].clone();
        assert_eq!(line.len(), 2);
        u.new_key("db01").unwrap();
        assert_eq!(u.manifest().unwrap().keys[&id], line);
        let err = u.show(&id).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        // Put back as it was, the next write resolves it normally.
        std::fs::write(&path, text).unwrap();
        u.new_key("app01").unwrap();
        assert_eq!(u.manifest().unwrap().keys[&id].len(), 1);
        u.show(&id).unwrap();
    }

    /// The wraps part follows the tombstone count, present (even 0) whenever wraps are:
    /// a manifest without wraps keeps the MAC input it had before wraps existed.
    #[test]
    fn wraps_extend_the_mac_input_after_the_tombstones() {
        let mut m = Manifest::new(Protection::None);
        let vol = hex::encode([7u8; 16]);
        m.volumes.insert(
            vol.clone(),
            VolumeEntry {
                key_id: "web01-00000000".into(),
                vm: "web01".into(),
                floor_generation: 1,
                floor_root_id: hex::encode([0u8; 32]),
                pending: false,
                previous: None,
            },
        );
        let plain = m.mac_input().unwrap();
        m.wraps.insert(vol, vec![1, 3]);
        let with = m.mac_input().unwrap();
        let mut expected = plain.clone();
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(MANIFEST_WRAPS_LABEL);
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&[7u8; 16]);
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(with, expected);
        // Wraps that name something other than a volume id do not MAC (Integrity on read).
        m.wraps.insert("not hex".into(), vec![1]);
        assert!(m.mac_input().is_err());
    }

    #[test]
    fn intermediate_wraps_refuse_what_either_state_refuses() {
        let entry = VolumeEntry {
            key_id: "k".into(),
            vm: "v".into(),
            floor_generation: 1,
            floor_root_id: hex::encode([0u8; 32]),
            pending: false,
            previous: None,
        };
        let (a, b, c) = ("a".to_string(), "b".to_string(), "c".to_string());
        let mut old = Manifest::new(Protection::None);
        let mut new = Manifest::new(Protection::None);
        for n in [&a, &b] {
            old.volumes.insert(n.clone(), entry.clone());
        }
        for n in [&a, &b, &c] {
            new.volumes.insert(n.clone(), entry.clone());
        }
        old.wraps.insert(a.clone(), vec![1]);
        new.wraps.insert(a.clone(), vec![2]);
        new.wraps.insert(b.clone(), vec![2]); // b was unknown before
        new.wraps.insert(c.clone(), vec![3]); // c is new
        let mut mid = new.clone();
        mid.volumes.insert("d".into(), entry);
        let w = intermediate_wraps(&old, &new, &mid);
        assert_eq!(w.get(&a), Some(&vec![1, 2]));
        assert_eq!(w.get(&b), None);
        assert_eq!(w.get(&c), Some(&vec![3]));
        assert_eq!(w.get("d"), None);
    }

    /// Security review item 3: a process holding the lock forever makes the others fail
    /// after the deadline, with one sentence, instead of hanging.
    #[test]
    fn a_held_lock_times_out_with_one_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let short = Duration::from_millis(200);
        let held = lock(d, true).unwrap();
        for exclusive in [false, true] {
            let start = Instant::now();
            let err = match lock_within(d, exclusive, short) {
                Err(e) => e,
                Ok(_) => panic!("the lock was taken twice"),
            };
            let took = start.elapsed();
            assert!(took >= short && took < Duration::from_secs(5), "{took:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "the keystore {} is locked by another process for more than 0.2 s",
                    d.display()
                )
            );
        }
        drop(held);
        // Shared locks coexist; a shared lock keeps writers out.
        let r1 = lock(d, false).unwrap();
        let r2 = lock_within(d, false, short).unwrap();
        assert!(lock_within(d, true, short).is_err());
        drop((r1, r2));
        // A lock released while waiting is taken.
        let held = lock(d, true).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        lock_within(d, true, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert_eq!(seconds(LOCK_TIMEOUT), "10 s");
    }
}
