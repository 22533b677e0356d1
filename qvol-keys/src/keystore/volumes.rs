//! Volume records (keystore version 2): one file per volume, `volumes/<volume id hex>.json`,
//! binding the volume to a key and a VM and holding the last committed state (generation and
//! root id) the keystore has seen, so that putting back an older copy of a whole image, or a
//! copy whose history forked, is detected. The record is MACed with a per-volume key
//! `K_vol = HKDF(MS, VOLUME_KEY_INFO || volume id)`, so that a daemon holding only K_vol (a
//! [`VolumeGuard`]) can advance its own record without the master seed. The manifest lists
//! every volume with its binding and a floor state that only holders of the master seed can
//! raise.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::manifest::{self, FileOp, Manifest, Tombstone, VolumeEntry};
use super::records::{self, hex_array};
use super::{files, time, UnlockedKeystore, MASTER_SALT};
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::{hkdf32, lp};
use crate::secret::Secret32;

/// Subdirectory of volume records.
pub const VOLUMES_DIR: &str = "volumes";
/// HKDF info prefix of the per-volume record key (followed by the 16-byte volume id).
pub const VOLUME_KEY_INFO: &[u8] = b"qvol-keystore-v2 volume record key";
/// MAC input label of a version 2 volume record.
pub const VOLUME_MAC_LABEL: &[u8] = b"qvol-keystore-v2 volume record";
/// HKDF info of the version 1 volume record MAC key (read by the upgrade only).
pub const VOLUME_MAC_INFO_V1: &[u8] = b"qvol-keystore-v1 volume record mac key";
/// MAC input label of a version 1 volume record (read by the upgrade only).
pub const VOLUME_MAC_LABEL_V1: &[u8] = b"qvol-keystore-v1 volume record";
const FORMAT: &str = "qvol-volume-record";
const RECORD_VERSION: u32 = 2;

/// Identity of a committed volume state (mirrors `qvol_core::CommitPoint`; qvol-keys stays
/// independent of qvol-core). A root id of all zeros means "unknown" (records upgraded from
/// keystore version 1): it matches any root id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeState {
    /// Commit generation.
    pub generation: u64,
    /// Root id: the superblock MAC of that commit.
    pub root_id: [u8; 32],
}

/// Which key and VM a volume belongs to. `key_id` and `vm` are empty when unknown (a record
/// upgraded from keystore version 1; `qvol volume adopt IMAGE` binds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBinding {
    /// Volume id.
    pub volume_id: [u8; 16],
    /// Key id the volume is wrapped for.
    pub key_id: String,
    /// VM name of that key.
    pub vm: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeRecord {
    format: String,
    version: u32,
    volume_id: String,
    key_id: String,
    vm: String,
    generation: u64,
    root_id: String,
    updated: String,
    /// HMAC-SHA-256(K_vol, label || volume id || lp(key id) || lp(vm) || generation u64 LE
    /// || root id), hex.
    mac: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VolumeRecordV1 {
    pub format: String,
    pub version: u32,
    pub volume_id: String,
    pub generation: u64,
    pub updated: String,
    pub mac: String,
}

/// Path of the record of `volume_id`.
pub(super) fn record_path(dir: &Path, volume_id: &[u8; 16]) -> PathBuf {
    record_path_by_name(dir, &hex::encode(volume_id))
}

/// Path of the record named `name` (volume id hex).
pub(super) fn record_path_by_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(VOLUMES_DIR).join(format!("{name}.json"))
}

/// K_vol = HKDF(salt = MASTER_SALT, ikm = MS, info = VOLUME_KEY_INFO || volume id).
pub(super) fn volume_key(master: &Secret32, volume_id: &[u8; 16]) -> Secret32 {
    hkdf32(MASTER_SALT, master.expose(), &[VOLUME_KEY_INFO, volume_id])
}

fn record_mac(key: &Secret32, b: &VolumeBinding, s: &VolumeState) -> Hmac<Sha256> {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key.expose()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    mac.update(VOLUME_MAC_LABEL);
    mac.update(&b.volume_id);
    mac.update(&lp(b.key_id.as_bytes()));
    mac.update(&lp(b.vm.as_bytes()));
    mac.update(&s.generation.to_le_bytes());
    mac.update(&s.root_id);
    mac
}

/// The bytes of a record file.
pub(super) fn record_bytes(key: &Secret32, b: &VolumeBinding, s: &VolumeState) -> Vec<u8> {
    let rec = VolumeRecord {
        format: FORMAT.into(),
        version: RECORD_VERSION,
        volume_id: hex::encode(b.volume_id),
        key_id: b.key_id.clone(),
        vm: b.vm.clone(),
        generation: s.generation,
        root_id: hex::encode(s.root_id),
        updated: time::now_rfc3339(),
        mac: hex::encode(record_mac(key, b, s).finalize().into_bytes()),
    };
    records::to_json(&rec)
}

/// Reads and verifies the record of `volume_id` (None when there is no file).
fn read_record(
    dir: &Path,
    key: &Secret32,
    volume_id: &[u8; 16],
) -> Result<Option<(VolumeBinding, VolumeState)>> {
    let path = record_path(dir, volume_id);
    if !path.exists() {
        return Ok(None);
    }
    let what = path.display().to_string();
    let integrity = |why: &str| Error::new(ErrorKind::Integrity, format!("{what} {why}"));
    let rec: VolumeRecord = records::parse(&files::read_bounded(&path)?, &what)
        .map_err(|_| integrity("is not a version 2 volume record"))?;
    if rec.format != FORMAT
        || rec.version != RECORD_VERSION
        || rec.volume_id != hex::encode(volume_id)
    {
        return Err(integrity("is not a version 2 volume record of this volume"));
    }
    let binding = VolumeBinding {
        volume_id: *volume_id,
        key_id: rec.key_id,
        vm: rec.vm,
    };
    let state = VolumeState {
        generation: rec.generation,
        root_id: hex_array::<32>(&rec.root_id, "a root id")
            .map_err(|_| integrity("has a malformed root id"))?,
    };
    let tag =
        hex_array::<32>(&rec.mac, "a volume record MAC").map_err(|_| integrity("has no MAC"))?;
    // Mac::verify_slice compares in constant time.
    record_mac(key, &binding, &state)
        .verify_slice(&tag)
        .map_err(|_| integrity("fails its MAC (edited, or from another keystore)"))?;
    Ok(Some((binding, state)))
}

/// Reads and verifies a v1 record (upgrade only): its generation.
pub(super) fn read_record_v1(
    dir: &Path,
    master: &Secret32,
    volume_id: &[u8; 16],
) -> Result<Option<u64>> {
    let path = record_path(dir, volume_id);
    let what = path.display().to_string();
    let Ok(rec) = records::parse::<VolumeRecordV1>(&files::read_bounded(&path)?, &what) else {
        return Ok(None);
    };
    if rec.format != FORMAT || rec.version != 1 || rec.volume_id != hex::encode(volume_id) {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("{what} is not a volume record of this volume"),
        ));
    }
    let key = hkdf32(MASTER_SALT, master.expose(), &[VOLUME_MAC_INFO_V1]);
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key.expose()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    mac.update(VOLUME_MAC_LABEL_V1);
    mac.update(volume_id);
    mac.update(&rec.generation.to_le_bytes());
    let tag = hex_array::<32>(&rec.mac, "a volume record MAC")?;
    mac.verify_slice(&tag).map_err(|_| {
        Error::new(
            ErrorKind::Integrity,
            format!("{what} fails its MAC (edited, or from another keystore)"),
        )
    })?;
    Ok(Some(rec.generation))
}

/// Reads and verifies a v2 record (upgrade: a record converted by an interrupted upgrade).
pub(super) fn read_record_v2(
    dir: &Path,
    master: &Secret32,
    volume_id: &[u8; 16],
) -> Result<Option<(VolumeBinding, VolumeState)>> {
    read_record(dir, &volume_key(master, volume_id), volume_id)
}

fn binds(b: &VolumeBinding, e: &VolumeEntry) -> bool {
    b.key_id == e.key_id && b.vm == e.vm
}

/// Checks a listed record file: MAC, and binding equal to the manifest's (or to the previous
/// one while a transaction rebinds it).
pub(super) fn verify_record_file(
    dir: &Path,
    master: &Secret32,
    volume_id: &[u8; 16],
    entry: &VolumeEntry,
) -> Result<()> {
    let Some((b, _)) = read_record(dir, &volume_key(master, volume_id), volume_id)? else {
        return Ok(());
    };
    if !binds(&b, entry) && !entry.previous_entry().is_some_and(|p| binds(&b, &p)) {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{} binds the volume to key {:?} but the keystore manifest binds it to {:?}",
                record_path(dir, volume_id).display(),
                b.key_id,
                entry.key_id
            ),
        ));
    }
    Ok(())
}

/// The settled entry of a listed volume, resolved against its record file: the entry itself,
/// or while a transaction rebinds it the entry (new or previous) whose binding the file
/// carries. None when the file is absent and the entry is pending (a record being created or
/// removed). Call only on an entry without [`record_problem`].
pub(super) fn resolve_entry(
    dir: &Path,
    master: &Secret32,
    name: &str,
    entry: &VolumeEntry,
) -> Result<Option<VolumeEntry>> {
    if !entry.pending && entry.previous.is_none() {
        return Ok(Some(entry.clone()));
    }
    let id = hex_array::<16>(name, "a volume id")
        .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?;
    let Some((b, _)) = read_record(dir, &volume_key(master, &id), &id)? else {
        return Ok((!entry.pending).then(|| entry.settled()));
    };
    if binds(&b, entry) {
        return Ok(Some(entry.settled()));
    }
    match entry.previous_entry() {
        Some(p) if binds(&b, &p) => Ok(Some(p)),
        _ => Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{} binds the volume to key {:?} but the keystore manifest binds it to {:?}",
                record_path(dir, &id).display(),
                b.key_id,
                entry.key_id
            ),
        )),
    }
}

/// The advice appended to a damaged volume record's sentence.
fn repair_hint(name: &str) -> String {
    format!("rebuild it from the keystore manifest with `qvol volume repair {name}`")
}

/// The problem of the volume record named `name` (volume id hex) against `m`, if any: a file
/// not listed in the manifest, a listed record missing (unless a transaction is creating or
/// removing it), or one that fails its MAC, is not a record of this volume, or names another
/// binding than the manifest. A record below the manifest floor is not a problem of the
/// record: a daemon that crashed between raising the floor and writing its record leaves
/// one, and `VolumeGuard::check` refuses any state below the floor anyway.
pub(super) fn record_problem(
    dir: &Path,
    master: &Secret32,
    m: &Manifest,
    name: &str,
) -> Option<Error> {
    let path = record_path_by_name(dir, name);
    let exists = path.exists();
    let Some(entry) = m.volumes.get(name) else {
        return exists.then(|| {
            Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is not listed in the keystore manifest (added by someone else, or \
                     put back after `qvol volume forget`; remove it with `qvol volume forget \
                     {name}`, then adopt the image with `qvol volume adopt IMAGE`)",
                    path.display()
                ),
            )
        });
    };
    if !exists {
        return (!entry.pending).then(|| {
            Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is listed in the keystore manifest but missing (deleted; {})",
                    path.display(),
                    repair_hint(name)
                ),
            )
        });
    }
    let id = match hex_array::<16>(name, "a volume id") {
        Ok(id) => id,
        Err(e) => return Some(Error::new(ErrorKind::Integrity, e.to_string())),
    };
    verify_record_file(dir, master, &id, entry).err().map(|e| {
        if e.kind() == ErrorKind::Integrity {
            Error::new(e.kind(), format!("{e}; {}", repair_hint(name)))
        } else {
            e
        }
    })
}

fn is_unknown(root: &[u8; 32]) -> bool {
    root.iter().all(|&b| b == 0)
}

/// Fails with Rollback if `state` is older than `known`, or at the same generation with a
/// different root id (unless either root id is unknown).
fn check_against(volume_id: &[u8; 16], state: &VolumeState, known: &VolumeState) -> Result<()> {
    let id = hex::encode(volume_id);
    if state.generation < known.generation {
        return Err(Error::new(
            ErrorKind::Rollback,
            format!(
                "volume {id} is at generation {} but the keystore has seen generation {}: the \
                 image was replaced by an older copy",
                state.generation, known.generation
            ),
        ));
    }
    if state.generation == known.generation
        && !is_unknown(&known.root_id)
        && !is_unknown(&state.root_id)
        && state.root_id != known.root_id
    {
        return Err(Error::new(
            ErrorKind::Rollback,
            format!(
                "volume {id} is at generation {} with another root id than the keystore \
                 recorded: forked history (the image was replaced by a copy that diverged)",
                state.generation
            ),
        ));
    }
    Ok(())
}

fn entry_state(entry: &VolumeEntry) -> Result<VolumeState> {
    Ok(VolumeState {
        generation: entry.floor_generation,
        root_id: hex_array::<32>(&entry.floor_root_id, "a floor root id")
            .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?,
    })
}

fn not_recorded(volume_id: &[u8; 16], m: &Manifest) -> Error {
    let name = hex::encode(volume_id);
    let forgotten = match m.forgotten.get(&name) {
        Some(t) => format!(
            " (it was forgotten on {} at generation {})",
            t.forgotten, t.floor_generation
        ),
        None => String::new(),
    };
    Error::new(
        ErrorKind::NotFound,
        format!(
            "no volume record for {name}{forgotten}; run `qvol volume adopt IMAGE` to adopt an \
             image brought from another keystore"
        ),
    )
}

fn tombstone_state(t: &Tombstone) -> Result<VolumeState> {
    Ok(VolumeState {
        generation: t.floor_generation,
        root_id: hex_array::<32>(&t.floor_root_id, "a tombstone root id")
            .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?,
    })
}

/// The sentence every refused adopt ends with.
const ACCEPT_ROLLBACK_HINT: &str = "(pass --accept-rollback to adopt it anyway)";

/// Rollback unless `state` is at or above the state the volume was forgotten at.
fn check_against_tombstone(volume_id: &[u8; 16], state: &VolumeState, t: &Tombstone) -> Result<()> {
    let id = hex::encode(volume_id);
    let known = tombstone_state(t)?;
    if state.generation < known.generation {
        return Err(Error::new(
            ErrorKind::Rollback,
            format!(
                "volume {id} is at generation {} but this keystore saw it at generation {} \
                 before it was forgotten on {}: the image is an older copy \
                 {ACCEPT_ROLLBACK_HINT}",
                state.generation, known.generation, t.forgotten
            ),
        ));
    }
    if state.generation == known.generation
        && !is_unknown(&known.root_id)
        && !is_unknown(&state.root_id)
        && state.root_id != known.root_id
    {
        return Err(Error::new(
            ErrorKind::Rollback,
            format!(
                "volume {id} is at generation {} with another root id than this keystore saw \
                 before it was forgotten on {}: forked history (the image is a copy that \
                 diverged) {ACCEPT_ROLLBACK_HINT}",
                state.generation, t.forgotten
            ),
        ));
    }
    Ok(())
}

/// Why a new volume (register) may not take the id of a forgotten one.
fn forgotten_id(name: &str, t: &Tombstone) -> Error {
    Error::new(
        ErrorKind::Integrity,
        format!(
            "volume {name} was forgotten by this keystore on {} (at generation {}) and a new \
             volume never has the id of an old one: the image is a copy of the forgotten \
             volume or its id was forged (adopt an old image with `qvol volume adopt IMAGE`)",
            t.forgotten, t.floor_generation
        ),
    )
}

/// The higher of two states (at equal generations, the one whose root id is known).
fn higher(a: VolumeState, b: VolumeState) -> VolumeState {
    if b.generation > a.generation || (b.generation == a.generation && is_unknown(&a.root_id)) {
        b
    } else {
        a
    }
}

/// How [`UnlockedKeystore::bind`] treats an existing entry or tombstone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BindMode {
    /// A new volume: refuses any recorded or forgotten id.
    Register,
    /// An image from elsewhere: binds an unbound entry, checks tombstones.
    Adopt,
    /// Adopt, accepting a state below the recorded or forgotten one.
    AdoptAcceptingRollback,
}

/// The narrow handle a daemon keeps for one volume: the keystore directory, the binding, the
/// floor read from the verified manifest and K_vol (locked in RAM, zeroized on drop, printed
/// `[REDACTED]`). It holds no master seed: a daemon taken over by its guest can at most
/// advance its own volume's record.
pub struct VolumeGuard {
    dir: PathBuf,
    binding: VolumeBinding,
    key: Secret32,
    floor: VolumeState,
    /// Highest state this guard has checked or recorded (survives a put-back record file).
    high: Mutex<Option<VolumeState>>,
}

impl fmt::Debug for VolumeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeGuard")
            .field("dir", &self.dir)
            .field("binding", &self.binding)
            .field("floor_generation", &self.floor.generation)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl VolumeGuard {
    /// The volume's binding (key id and VM; empty strings when unknown).
    pub fn binding(&self) -> &VolumeBinding {
        &self.binding
    }

    fn known_states(&self) -> Result<Vec<VolumeState>> {
        let id = &self.binding.volume_id;
        let path = record_path(&self.dir, id);
        let name = hex::encode(id);
        let Some((b, s)) = read_record(&self.dir, &self.key, id)? else {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is missing although the keystore lists the volume (deleted, or \
                     forgotten meanwhile; {})",
                    path.display(),
                    repair_hint(&name)
                ),
            ));
        };
        if b != self.binding {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} binds the volume to key {:?}, not to {:?} ({})",
                    path.display(),
                    b.key_id,
                    self.binding.key_id,
                    repair_hint(&name)
                ),
            ));
        }
        let mut out = vec![s, self.floor];
        if let Some(h) = *self.high.lock().unwrap_or_else(|e| e.into_inner()) {
            out.push(h);
        }
        Ok(out)
    }

    fn check_locked(&self, state: &VolumeState) -> Result<VolumeState> {
        let known = self.known_states()?;
        for k in &known {
            check_against(&self.binding.volume_id, state, k)?;
        }
        Ok(known[0])
    }

    fn note(&self, state: &VolumeState) {
        let mut high = self.high.lock().unwrap_or_else(|e| e.into_inner());
        if high.is_none_or(|h| state.generation > h.generation || is_unknown(&h.root_id)) {
            *high = Some(*state);
        }
    }

    /// Rollback if `state.generation` is below the recorded one (the highest of the record,
    /// the manifest floor and what this guard saw), or equal with another root id (forked
    /// history). Integrity if the record fails its MAC, names another binding, or is missing.
    pub fn check(&self, state: &VolumeState) -> Result<()> {
        let _lock = manifest::lock(&self.dir, false)?;
        self.check_locked(state)?;
        self.note(state);
        Ok(())
    }

    /// Writes the record (atomic, fsynced) after the same checks as [`VolumeGuard::check`];
    /// never lowers it.
    pub fn record(&self, state: &VolumeState) -> Result<()> {
        let _lock = manifest::lock(&self.dir, false)?;
        let recorded = self.check_locked(state)?;
        let same = recorded.generation == state.generation
            && (recorded.root_id == state.root_id || is_unknown(&state.root_id));
        if !same {
            files::write_atomic(
                &record_path(&self.dir, &self.binding.volume_id),
                &record_bytes(&self.key, &self.binding, state),
            )?;
        }
        self.note(state);
        Ok(())
    }
}

impl UnlockedKeystore {
    fn bind(
        &self,
        volume_id: &[u8; 16],
        key_id: &str,
        state: &VolumeState,
        mode: BindMode,
    ) -> Result<VolumeBinding> {
        let name = hex::encode(volume_id);
        let accept = mode == BindMode::AdoptAcceptingRollback;
        self.transact(|m: &mut Manifest| {
            if let Some(e) = record_problem(&self.dir, &self.master, m, &name) {
                return Err(e);
            }
            let rec = self.load_in(m, key_id)?;
            let binding = VolumeBinding {
                volume_id: *volume_id,
                key_id: rec.key_id.clone(),
                vm: rec.vm.clone(),
            };
            if let Some(e) = m.volumes.get(&name) {
                if mode == BindMode::Register || !e.key_id.is_empty() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "volume {name} is already recorded (bound to key {:?} of VM {:?})",
                            e.key_id, e.vm
                        ),
                    ));
                }
                // Binding a record upgraded from keystore version 1: never lower it.
                if !accept {
                    let key = volume_key(&self.master, volume_id);
                    let mut known = vec![entry_state(e)?];
                    if let Some((_, s)) = read_record(&self.dir, &key, volume_id)? {
                        known.push(s);
                    }
                    for k in &known {
                        check_against(volume_id, state, k).map_err(|e| {
                            Error::new(e.kind(), format!("{e} {ACCEPT_ROLLBACK_HINT}"))
                        })?;
                    }
                }
            }
            if let Some(t) = m.forgotten.get(&name) {
                match mode {
                    BindMode::Register => return Err(forgotten_id(&name, t)),
                    BindMode::Adopt => check_against_tombstone(volume_id, state, t)?,
                    BindMode::AdoptAcceptingRollback => {}
                }
                // Only the final manifest drops it (the transaction keeps it meanwhile).
                m.forgotten.remove(&name);
            }
            m.volumes.insert(
                name.clone(),
                VolumeEntry {
                    key_id: binding.key_id.clone(),
                    vm: binding.vm.clone(),
                    floor_generation: state.generation,
                    floor_root_id: hex::encode(state.root_id),
                    pending: false,
                    previous: None,
                },
            );
            // `qvol create` wraps the new volume for the key's current generation; an
            // adopted image may hold slots of any generation: unknown until recorded.
            if mode == BindMode::Register {
                m.wraps.insert(name.clone(), vec![rec.current_generation]);
            } else {
                m.wraps.remove(&name);
            }
            let key = volume_key(&self.master, volume_id);
            let bytes = record_bytes(&key, &binding, state);
            Ok((vec![FileOp::WriteVolume(*volume_id, bytes)], binding))
        })
    }

    /// Registers a new volume (`qvol create`): binding to `key_id` (which must exist) and
    /// first state; records that its keyslots are wrapped for the key's current generation
    /// (see [`UnlockedKeystore::volume_wraps`]). AlreadyExists if the volume is recorded; Integrity if its id is the id of
    /// a forgotten volume (a random id never repeats: the image is a copy of the old volume,
    /// or a forged one).
    pub fn register_volume(
        &self,
        volume_id: &[u8; 16],
        key_id: &str,
        state: &VolumeState,
    ) -> Result<VolumeBinding> {
        self.bind(volume_id, key_id, state, BindMode::Register)
    }

    /// Adopts an image brought from elsewhere (after `qvol key import`; CLI `qvol volume
    /// adopt IMAGE`): like [`UnlockedKeystore::register_volume`], and it also binds a record
    /// whose binding is unknown (upgraded from keystore version 1). Refuses (Rollback, the
    /// sentence ending "(pass --accept-rollback to adopt it anyway)") a state older than the
    /// one recorded for that record, or than the one the volume was at when it was forgotten
    /// ([`UnlockedKeystore::forget_volume`] keeps it), or at the same generation with another
    /// root id. The generations its keyslots are wrapped for become unknown (record them
    /// with [`UnlockedKeystore::record_volume_wraps`]).
    pub fn adopt_volume(
        &self,
        volume_id: &[u8; 16],
        key_id: &str,
        state: &VolumeState,
    ) -> Result<VolumeBinding> {
        self.bind(volume_id, key_id, state, BindMode::Adopt)
    }

    /// [`UnlockedKeystore::adopt_volume`] that accepts a state below (or forking from) the
    /// recorded or forgotten one (`qvol volume adopt --accept-rollback IMAGE`, after the
    /// operator checked that the image is the one to keep): the volume's floor becomes
    /// `state`, and the tombstone of a forgotten volume is dropped. A volume recorded with a
    /// known binding is still refused (AlreadyExists; forget it first).
    pub fn adopt_volume_accepting_rollback(
        &self,
        volume_id: &[u8; 16],
        key_id: &str,
        state: &VolumeState,
    ) -> Result<VolumeBinding> {
        self.bind(volume_id, key_id, state, BindMode::AdoptAcceptingRollback)
    }

    /// Rebuilds the record file of a volume that the manifest lists (`qvol volume repair ID`)
    /// when it is missing, fails its MAC, is not a record of that volume, names another
    /// binding, or is not a regular file: a new record with the manifest's binding and the
    /// manifest floor (or the state of the damaged file, if it still verifies under K_vol
    /// and is higher), MACed with K_vol. Unlike forget and adopt, this keeps the volume's
    /// rollback protection. Nothing is written when the record is sound. NotFound when the
    /// manifest does not list the volume (a stray record file: `qvol volume forget ID`).
    /// The generations the manifest records for the volume's keyslots
    /// ([`UnlockedKeystore::volume_wraps`]) stay as they are: the record file holds none,
    /// and repairing it changes no keyslot.
    pub fn repair_volume(&self, volume_id: &[u8; 16]) -> Result<VolumeBinding> {
        let name = hex::encode(volume_id);
        self.transact(|m: &mut Manifest| {
            let Some(entry) = m.volumes.get(&name).cloned() else {
                let stray = if record_path(&self.dir, volume_id).exists() {
                    format!(
                        "; remove the stray record file with `qvol volume forget {name}`, then \
                         adopt the image with `qvol volume adopt IMAGE`"
                    )
                } else {
                    String::new()
                };
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "volume {name} is not listed in the keystore manifest, so there is no \
                         record to rebuild{stray}"
                    ),
                ));
            };
            let Some(problem) = record_problem(&self.dir, &self.master, m, &name) else {
                let e = resolve_entry(&self.dir, &self.master, &name, &entry)?
                    .ok_or_else(|| not_recorded(volume_id, m))?;
                return Ok((
                    Vec::new(),
                    VolumeBinding {
                        volume_id: *volume_id,
                        key_id: e.key_id,
                        vm: e.vm,
                    },
                ));
            };
            log::debug!("repairing volume record {name}: {problem}");
            let entry = entry.settled();
            let key = volume_key(&self.master, volume_id);
            let mut state = entry_state(&entry)?;
            if let Ok(Some((_, s))) = read_record(&self.dir, &key, volume_id) {
                state = higher(state, s);
            }
            let binding = VolumeBinding {
                volume_id: *volume_id,
                key_id: entry.key_id.clone(),
                vm: entry.vm.clone(),
            };
            let bytes = record_bytes(&key, &binding, &state);
            m.volumes.insert(name.clone(), entry);
            Ok((vec![FileOp::WriteVolume(*volume_id, bytes)], binding))
        })
    }

    /// The narrow handle a daemon keeps. NotFound when the volume has no record; Integrity
    /// (naming the file) when its record is damaged, missing or not listed in the manifest.
    /// Damage of other records does not matter.
    pub fn volume_guard(&self, volume_id: &[u8; 16]) -> Result<VolumeGuard> {
        let _lock = manifest::lock(&self.dir, false)?;
        let m = self.manifest()?;
        let name = hex::encode(volume_id);
        if let Some(e) = record_problem(&self.dir, &self.master, &m, &name) {
            return Err(e);
        }
        let entry = m
            .volumes
            .get(&name)
            .ok_or_else(|| not_recorded(volume_id, &m))?;
        // After an interrupted transaction: the entry whose binding the file carries.
        let entry = &resolve_entry(&self.dir, &self.master, &name, entry)?
            .ok_or_else(|| not_recorded(volume_id, &m))?;
        let key = volume_key(&self.master, volume_id);
        let binding = VolumeBinding {
            volume_id: *volume_id,
            key_id: entry.key_id.clone(),
            vm: entry.vm.clone(),
        };
        let guard = VolumeGuard {
            dir: self.dir.clone(),
            binding,
            key,
            floor: entry_state(entry)?,
            high: Mutex::new(None),
        };
        guard.known_states()?; // the record exists, verifies and matches the binding
        Ok(guard)
    }

    /// Raises the manifest floor of a volume to `state` (never lowers it; Rollback if
    /// `state` is below it or forks from it). Called by the daemon right after open.
    pub fn raise_volume_floor(&self, volume_id: &[u8; 16], state: &VolumeState) -> Result<()> {
        let name = hex::encode(volume_id);
        self.transact(|m: &mut Manifest| {
            if let Some(e) = record_problem(&self.dir, &self.master, m, &name) {
                return Err(e);
            }
            if !m.volumes.contains_key(&name) {
                return Err(not_recorded(volume_id, m));
            }
            let e = m
                .volumes
                .get_mut(&name)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no volume {name}")))?;
            let floor = entry_state(e)?;
            check_against(volume_id, state, &floor)?;
            if state.generation > floor.generation
                || (is_unknown(&floor.root_id) && !is_unknown(&state.root_id))
            {
                e.floor_generation = state.generation;
                e.floor_root_id = hex::encode(state.root_id);
            }
            Ok((Vec::new(), ()))
        })
    }

    /// Volumes recorded as bound to `key_id`, by volume id.
    pub fn volumes_of_key(&self, key_id: &str) -> Result<Vec<VolumeBinding>> {
        let _lock = manifest::lock(&self.dir, false)?;
        let m = self.manifest()?;
        let mut out = Vec::new();
        for (name, e) in &m.volumes {
            if e.key_id == key_id {
                out.push(VolumeBinding {
                    volume_id: hex_array::<16>(name, "a volume id")?,
                    key_id: e.key_id.clone(),
                    vm: e.vm.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Records which generations of its bound key the recipient keyslots of `volume_id` are
    /// wrapped for (sorted and deduplicated here; empty when no slot is wrapped for that
    /// key), after `qvol rekey`, `qvol key rotate --rewrap`, `qvol keyslot add` or an adopt.
    /// [`UnlockedKeystore::remove_generation_checked`] then no longer refuses to remove the
    /// other generations for this volume. A change of the manifest only, in a transaction.
    /// NotFound if the volume is not recorded; the error of its record if that is damaged
    /// (repair it first); InvalidInput for more than 256 generations.
    pub fn record_volume_wraps(&self, volume_id: &[u8; 16], generations: &[u32]) -> Result<()> {
        let mut wraps = generations.to_vec();
        wraps.sort_unstable();
        wraps.dedup();
        if wraps.len() > manifest::MAX_WRAPS_PER_VOLUME {
            return Err(Error::invalid(format!(
                "a volume's keyslots cannot be wrapped for {} generations (at most {})",
                wraps.len(),
                manifest::MAX_WRAPS_PER_VOLUME
            )));
        }
        let name = hex::encode(volume_id);
        self.transact(|m: &mut Manifest| {
            if let Some(e) = record_problem(&self.dir, &self.master, m, &name) {
                return Err(e);
            }
            if !m.volumes.contains_key(&name) {
                return Err(not_recorded(volume_id, m));
            }
            m.wraps.insert(name.clone(), wraps);
            Ok((Vec::new(), ()))
        })
    }

    /// The generations of its bound key that the recipient keyslots of `volume_id` are
    /// wrapped for, as last recorded ([`UnlockedKeystore::record_volume_wraps`], or
    /// `register_volume`); None when unknown (adopted, upgraded, or recorded before the
    /// keystore kept them). NotFound if the volume is not recorded.
    pub fn volume_wraps(&self, volume_id: &[u8; 16]) -> Result<Option<Vec<u32>>> {
        let _lock = manifest::lock(&self.dir, false)?;
        let m = self.manifest()?;
        let name = hex::encode(volume_id);
        if !m.volumes.contains_key(&name) {
            return Err(not_recorded(volume_id, &m));
        }
        Ok(m.wraps.get(&name).cloned())
    }

    /// Forgets the record of `volume_id` (admin; e.g. after deleting an image): removes its
    /// manifest entry and its file, whatever their state (damaged, missing, unlisted), and
    /// keeps a tombstone in the manifest: the highest state known (the manifest floor, the
    /// record if it verifies under K_vol, an earlier tombstone) and the time. Adopting the
    /// volume again below that state is refused unless
    /// [`UnlockedKeystore::adopt_volume_accepting_rollback`]; registering its id again is
    /// refused. Nothing happens if there is neither entry nor file. To repair a damaged
    /// record of a listed volume, use [`UnlockedKeystore::repair_volume`].
    pub fn forget_volume(&self, volume_id: &[u8; 16]) -> Result<()> {
        let name = hex::encode(volume_id);
        self.transact(|m: &mut Manifest| {
            let entry = m.volumes.remove(&name);
            if entry.is_none() && !record_path(&self.dir, volume_id).exists() {
                return Ok((Vec::new(), ()));
            }
            let mut known: Option<VolumeState> = None;
            let mut note = |s: VolumeState| known = Some(known.map_or(s, |k| higher(k, s)));
            if let Some(e) = &entry {
                note(entry_state(e)?);
            }
            let key = volume_key(&self.master, volume_id);
            if let Ok(Some((_, s))) = read_record(&self.dir, &key, volume_id) {
                note(s);
            }
            if let Some(t) = m.forgotten.get(&name) {
                note(tombstone_state(t)?);
            }
            m.wraps.remove(&name);
            if let Some(s) = known {
                m.forgotten.insert(
                    name.clone(),
                    Tombstone {
                        floor_generation: s.generation,
                        floor_root_id: hex::encode(s.root_id),
                        forgotten: time::now_rfc3339(),
                    },
                );
            }
            Ok((vec![FileOp::RemoveVolume(*volume_id)], ()))
        })
    }

    /// Test fixture: records that `volume_id` reached `generation` (root id unknown),
    /// creating an unbound record when there is none, as the upgrade of a keystore-v1
    /// record does. Never lowers it (Rollback).
    #[cfg(test)]
    pub(crate) fn record_unbound_for_tests(
        &self,
        volume_id: &[u8; 16],
        generation: u64,
    ) -> Result<()> {
        let state = VolumeState {
            generation,
            root_id: [0; 32],
        };
        match self.volume_guard(volume_id) {
            Ok(g) => g.record(&state),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let name = hex::encode(volume_id);
                self.transact(|m: &mut Manifest| {
                    if m.volumes.contains_key(&name) {
                        return Err(Error::new(
                            ErrorKind::AlreadyExists,
                            format!("volume {name} was recorded meanwhile"),
                        ));
                    }
                    if let Some(t) = m.forgotten.get(&name) {
                        return Err(forgotten_id(&name, t));
                    }
                    let binding = VolumeBinding {
                        volume_id: *volume_id,
                        key_id: String::new(),
                        vm: String::new(),
                    };
                    m.volumes.insert(
                        name.clone(),
                        VolumeEntry {
                            key_id: String::new(),
                            vm: String::new(),
                            floor_generation: generation,
                            floor_root_id: hex::encode([0u8; 32]),
                            pending: false,
                            previous: None,
                        },
                    );
                    let key = volume_key(&self.master, volume_id);
                    let bytes = record_bytes(&key, &binding, &state);
                    Ok((vec![FileOp::WriteVolume(*volume_id, bytes)], ()))
                })
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::test_hooks::{crash_next_transaction_at, CrashPoint};
    use super::super::{KdfParams, Keystore};
    use super::*;

    const VOL: [u8; 16] = [0x42; 16];

    fn st(generation: u64, root: u8) -> VolumeState {
        VolumeState {
            generation,
            root_id: [root; 32],
        }
    }

    fn reopen(d: &Path) -> UnlockedKeystore {
        Keystore::open(d).unwrap().unlock(None).unwrap()
    }

    fn entry(u: &UnlockedKeystore) -> Option<VolumeEntry> {
        u.manifest()
            .unwrap()
            .volumes
            .get(&hex::encode(VOL))
            .cloned()
    }

    fn tombstone(u: &UnlockedKeystore) -> Option<Tombstone> {
        u.manifest()
            .unwrap()
            .forgotten
            .get(&hex::encode(VOL))
            .cloned()
    }

    /// A keystore with a key and VOL recorded unbound at generation 7 (what the upgrade
    /// makes of a version 1 record).
    fn with_unbound_record(d: &Path) -> (UnlockedKeystore, String) {
        let u = Keystore::init(d, None, KdfParams::insecure_for_tests())
            .unwrap()
            .unlock(None)
            .unwrap();
        let key = u.new_key("web01").unwrap().key_id;
        u.record_unbound_for_tests(&VOL, 7).unwrap();
        assert_eq!(entry(&u).unwrap().key_id, "");
        (u, key)
    }

    /// Security review item 2: a crash after the intermediate manifest of the adopt of an
    /// unbound record, before the record is written, used to leave a permanent Integrity
    /// error (the next transaction settled the new binding while the file kept "").
    #[test]
    fn an_adopt_of_an_unbound_record_interrupted_before_the_record_keeps_it_unbound() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, key) = with_unbound_record(d);
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        u.adopt_volume(&VOL, &key, &st(8, 8)).unwrap_err();
        let mid = entry(&u).unwrap();
        assert_eq!(mid.key_id, key);
        assert_eq!(mid.previous.as_ref().unwrap().key_id, "");
        // Meanwhile: no damage, and the guard follows the binding the file carries.
        let fresh = reopen(d);
        assert!(
            fresh.damaged_entries().is_empty(),
            "{:?}",
            fresh.damaged_entries()
        );
        let g = fresh.volume_guard(&VOL).unwrap();
        assert_eq!(g.binding().key_id, "");
        g.check(&st(7, 7)).unwrap();
        // The next transaction settles the entry the file carries: the unbound one.
        fresh.new_key("db01").unwrap();
        let e = entry(&fresh).unwrap();
        assert_eq!((e.key_id.as_str(), e.floor_generation), ("", 7));
        assert!(e.previous.is_none() && !e.pending);
        let fresh = reopen(d);
        assert!(
            fresh.damaged_entries().is_empty(),
            "{:?}",
            fresh.damaged_entries()
        );
        // The adopt can be run again.
        fresh.adopt_volume(&VOL, &key, &st(8, 8)).unwrap();
        let g = reopen(d).volume_guard(&VOL).unwrap();
        assert_eq!(g.binding().key_id, key);
        g.check(&st(8, 8)).unwrap();
    }

    #[test]
    fn an_adopt_of_an_unbound_record_interrupted_after_the_record_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, key) = with_unbound_record(d);
        crash_next_transaction_at(CrashPoint::BeforeFinal);
        u.adopt_volume(&VOL, &key, &st(8, 8)).unwrap_err();
        let fresh = reopen(d);
        assert!(
            fresh.damaged_entries().is_empty(),
            "{:?}",
            fresh.damaged_entries()
        );
        assert_eq!(fresh.volume_guard(&VOL).unwrap().binding().key_id, key);
        fresh.new_key("db01").unwrap();
        let e = entry(&fresh).unwrap();
        assert_eq!((e.key_id.as_str(), e.floor_generation), (key.as_str(), 8));
        assert!(e.previous.is_none() && !e.pending);
        let g = reopen(d).volume_guard(&VOL).unwrap();
        assert_eq!(g.check(&st(7, 7)).unwrap_err().kind(), ErrorKind::Rollback);
        g.check(&st(8, 8)).unwrap();
    }

    fn registered(d: &Path) -> (UnlockedKeystore, String) {
        let u = Keystore::init(d, None, KdfParams::insecure_for_tests())
            .unwrap()
            .unlock(None)
            .unwrap();
        let key = u.new_key("web01").unwrap().key_id;
        u.register_volume(&VOL, &key, &st(5, 5)).unwrap();
        (u, key)
    }

    #[test]
    fn an_interrupted_forget_keeps_either_the_entry_or_the_tombstone() {
        // Before the record is removed: the forget did not happen.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, key) = registered(d);
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        u.forget_volume(&VOL).unwrap_err();
        assert!(entry(&u).unwrap().pending && tombstone(&u).is_some());
        let fresh = reopen(d);
        assert!(fresh.damaged_entries().is_empty());
        fresh.volume_guard(&VOL).unwrap().check(&st(5, 5)).unwrap();
        fresh.new_key("db01").unwrap();
        assert!(!entry(&fresh).unwrap().pending);
        assert!(tombstone(&fresh).is_none());
        assert!(reopen(d).damaged_entries().is_empty());

        // After the record is removed: the forget happened, the tombstone stays.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, key2) = registered(d);
        crash_next_transaction_at(CrashPoint::BeforeFinal);
        u.forget_volume(&VOL).unwrap_err();
        let fresh = reopen(d);
        assert!(fresh.damaged_entries().is_empty());
        assert_eq!(
            fresh.volume_guard(&VOL).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        fresh.new_key("db01").unwrap();
        assert!(entry(&fresh).is_none());
        assert_eq!(tombstone(&fresh).unwrap().floor_generation, 5);
        assert_eq!(
            fresh
                .adopt_volume(&VOL, &key2, &st(4, 4))
                .unwrap_err()
                .kind(),
            ErrorKind::Rollback
        );
        let _ = key;
    }

    #[test]
    fn an_interrupted_adopt_of_a_forgotten_volume_keeps_the_tombstone_until_done() {
        // Before the record is written: the tombstone still refuses older images.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, key) = registered(d);
        u.forget_volume(&VOL).unwrap();
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        u.adopt_volume(&VOL, &key, &st(6, 6)).unwrap_err();
        assert!(
            tombstone(&u).is_some(),
            "the intermediate manifest keeps it"
        );
        let fresh = reopen(d);
        assert!(fresh.damaged_entries().is_empty());
        fresh.new_key("db01").unwrap();
        assert!(entry(&fresh).is_none());
        assert!(tombstone(&fresh).is_some());
        assert_eq!(
            fresh
                .adopt_volume(&VOL, &key, &st(4, 4))
                .unwrap_err()
                .kind(),
            ErrorKind::Rollback
        );

        // After the record is written: adopted, the tombstone goes.
        crash_next_transaction_at(CrashPoint::BeforeFinal);
        fresh.adopt_volume(&VOL, &key, &st(6, 6)).unwrap_err();
        let fresh = reopen(d);
        assert!(fresh.damaged_entries().is_empty());
        fresh.new_key("app01").unwrap();
        assert_eq!(entry(&fresh).unwrap().floor_generation, 6);
        assert!(tombstone(&fresh).is_none());
        fresh.volume_guard(&VOL).unwrap().check(&st(6, 6)).unwrap();
    }

    fn wraps(u: &UnlockedKeystore) -> Option<Vec<u32>> {
        u.manifest().unwrap().wraps.get(&hex::encode(VOL)).cloned()
    }

    /// After a crash the volume settles as before or after the transaction; the wraps that
    /// remain must refuse a generation removal whenever either state would.
    #[test]
    fn interrupted_transactions_never_leave_wraps_more_permissive() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let u = Keystore::init(d, None, KdfParams::insecure_for_tests())
            .unwrap()
            .unlock(None)
            .unwrap();
        let key = u.new_key("web01").unwrap().key_id;
        // A register that did not write its record: entry and wraps go together.
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        u.register_volume(&VOL, &key, &st(5, 5)).unwrap_err();
        assert!(entry(&u).unwrap().pending);
        assert_eq!(wraps(&u), Some(vec![1]));
        let fresh = reopen(d);
        fresh.new_key("db01").unwrap();
        assert!(entry(&fresh).is_none());
        assert!(fresh.manifest().unwrap().wraps.is_empty());
        // One that did: the volume and its wraps stay.
        crash_next_transaction_at(CrashPoint::BeforeFinal);
        fresh.register_volume(&VOL, &key, &st(5, 5)).unwrap_err();
        let fresh = reopen(d);
        fresh.new_key("app01").unwrap();
        assert!(!entry(&fresh).unwrap().pending);
        assert_eq!(wraps(&fresh), Some(vec![1]));
        // A forget that did not remove the record keeps the wraps with the entry.
        fresh.rotate(&key).unwrap();
        fresh.record_volume_wraps(&VOL, &[2]).unwrap();
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        fresh.forget_volume(&VOL).unwrap_err();
        assert_eq!(wraps(&fresh), Some(vec![2]));
        let fresh = reopen(d);
        fresh.new_key("srv01").unwrap();
        assert!(entry(&fresh).is_some());
        assert_eq!(wraps(&fresh), Some(vec![2]));
        assert!(fresh.damaged_entries().is_empty());

        // An adopt rebinding a record: unknown from the intermediate manifest on.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, key) = with_unbound_record(d);
        u.record_volume_wraps(&VOL, &[1]).unwrap();
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        u.adopt_volume(&VOL, &key, &st(8, 8)).unwrap_err();
        assert_eq!(wraps(&u), None);
        let fresh = reopen(d);
        fresh.new_key("db01").unwrap();
        assert_eq!(entry(&fresh).unwrap().key_id, "");
        assert_eq!(wraps(&fresh), None);
    }

    #[test]
    fn an_interrupted_repair_leaves_the_entry_listed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (u, _) = registered(d);
        let rec = record_path(d, &VOL);
        std::fs::remove_file(&rec).unwrap();
        crash_next_transaction_at(CrashPoint::AfterIntermediate);
        u.repair_volume(&VOL).unwrap_err();
        // Still listed (never settled away as "being created"), still damaged.
        let fresh = reopen(d);
        assert_eq!(fresh.damaged_entries().len(), 1);
        fresh.new_key("db01").unwrap();
        assert_eq!(entry(&fresh).unwrap().floor_generation, 5);
        fresh.repair_volume(&VOL).unwrap();
        let g = reopen(d).volume_guard(&VOL).unwrap();
        assert_eq!(g.check(&st(4, 4)).unwrap_err().kind(), ErrorKind::Rollback);
        g.check(&st(5, 5)).unwrap();
    }
}
