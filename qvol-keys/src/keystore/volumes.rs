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

use super::manifest::{self, FileOp, Manifest, VolumeEntry};
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
/// keystore version 1, or the deprecated generation-only API): it matches any root id.
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

/// Checks a listed record file at unlock: MAC, and binding equal to the manifest's (unless
/// a transaction is changing it).
pub(super) fn verify_record_file(
    dir: &Path,
    master: &Secret32,
    volume_id: &[u8; 16],
    entry: &VolumeEntry,
) -> Result<()> {
    let Some((b, _)) = read_record(dir, &volume_key(master, volume_id), volume_id)? else {
        return Ok(());
    };
    if !entry.pending && (b.key_id != entry.key_id || b.vm != entry.vm) {
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
                    "{} is listed in the keystore manifest but missing (deleted; restore it \
                     from a backup, or forget the volume with `qvol volume forget {name}` and \
                     adopt its image again)",
                    path.display()
                ),
            )
        });
    }
    let id = match hex_array::<16>(name, "a volume id") {
        Ok(id) => id,
        Err(e) => return Some(Error::new(ErrorKind::Integrity, e.to_string())),
    };
    verify_record_file(dir, master, &id, entry).err()
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

fn not_recorded(volume_id: &[u8; 16]) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "no volume record for {}; run `qvol volume adopt IMAGE` to adopt an image brought \
             from another keystore",
            hex::encode(volume_id)
        ),
    )
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
        let Some((b, s)) = read_record(&self.dir, &self.key, id)? else {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} is missing although the keystore lists the volume (deleted, or \
                     forgotten meanwhile)",
                    path.display()
                ),
            ));
        };
        if b != self.binding {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{} binds the volume to key {:?}, not to {:?}",
                    path.display(),
                    b.key_id,
                    self.binding.key_id
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
        adopt: bool,
    ) -> Result<VolumeBinding> {
        let name = hex::encode(volume_id);
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
            let floor = *state;
            if let Some(e) = m.volumes.get(&name) {
                if !(adopt && e.key_id.is_empty()) {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "volume {name} is already recorded (bound to key {:?} of VM {:?})",
                            e.key_id, e.vm
                        ),
                    ));
                }
                // Binding a record upgraded from keystore version 1: never lower it.
                let key = volume_key(&self.master, volume_id);
                let mut known = vec![entry_state(e)?];
                if let Some((_, s)) = read_record(&self.dir, &key, volume_id)? {
                    known.push(s);
                }
                for k in &known {
                    check_against(volume_id, state, k)?;
                }
            }
            m.volumes.insert(
                name.clone(),
                VolumeEntry {
                    key_id: binding.key_id.clone(),
                    vm: binding.vm.clone(),
                    floor_generation: floor.generation,
                    floor_root_id: hex::encode(floor.root_id),
                    pending: false,
                },
            );
            let key = volume_key(&self.master, volume_id);
            let bytes = record_bytes(&key, &binding, state);
            Ok((vec![FileOp::WriteVolume(*volume_id, bytes)], binding))
        })
    }

    /// Registers a new volume (`qvol create`): binding to `key_id` (which must exist) and
    /// first state. AlreadyExists if the volume is recorded.
    pub fn register_volume(
        &self,
        volume_id: &[u8; 16],
        key_id: &str,
        state: &VolumeState,
    ) -> Result<VolumeBinding> {
        self.bind(volume_id, key_id, state, false)
    }

    /// Adopts an image brought from elsewhere (after `qvol key import`; CLI `qvol volume
    /// adopt IMAGE`): like [`UnlockedKeystore::register_volume`], and it also binds a record
    /// whose binding is unknown (upgraded from keystore version 1), refusing a state older
    /// than the recorded one.
    pub fn adopt_volume(
        &self,
        volume_id: &[u8; 16],
        key_id: &str,
        state: &VolumeState,
    ) -> Result<VolumeBinding> {
        self.bind(volume_id, key_id, state, true)
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
            .ok_or_else(|| not_recorded(volume_id))?;
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
            let e = m
                .volumes
                .get_mut(&name)
                .ok_or_else(|| not_recorded(volume_id))?;
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

    /// Forgets the record of `volume_id` (admin; e.g. after deleting an image): removes its
    /// manifest entry and its file. Nothing happens if there is neither. This is also the
    /// repair of a damaged, missing or unlisted record of that volume (adopt the image again
    /// afterwards).
    pub fn forget_volume(&self, volume_id: &[u8; 16]) -> Result<()> {
        let name = hex::encode(volume_id);
        self.transact(|m: &mut Manifest| {
            let listed = m.volumes.remove(&name).is_some();
            if !listed && !record_path(&self.dir, volume_id).exists() {
                return Ok((Vec::new(), ()));
            }
            Ok((vec![FileOp::RemoveVolume(*volume_id)], ()))
        })
    }

    /// The highest generation recorded for `volume_id` (record or manifest floor), if any.
    #[deprecated(note = "use volume_guard(volume_id) and VolumeGuard::check")]
    pub fn volume_generation(&self, volume_id: &[u8; 16]) -> Result<Option<u64>> {
        match self.volume_guard(volume_id) {
            Ok(g) => Ok(Some(
                g.known_states()?
                    .iter()
                    .map(|s| s.generation)
                    .max()
                    .unwrap_or(0),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that `volume_id` reached `generation` (root id unknown); creates an unbound
    /// record when there is none. Never lowers it (Rollback).
    #[deprecated(note = "use register_volume / volume_guard and VolumeGuard::record")]
    pub fn record_volume_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<()> {
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

    /// Fails with Rollback if `generation` is below the recorded one.
    #[deprecated(note = "use volume_guard(volume_id) and VolumeGuard::check")]
    pub fn check_volume_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<()> {
        match self.volume_guard(volume_id) {
            Ok(g) => g.check(&VolumeState {
                generation,
                root_id: [0; 32],
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}
