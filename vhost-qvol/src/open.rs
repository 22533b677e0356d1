//! From an image path to an open volume: lock the image, read its header, check that it is
//! the volume the caller is bound to, unlock the keystore, unwrap a keyslot of the bound
//! key, check freshness against the keystore's record, and only then open (replay, commit).
//! Shared by `vhost-qvol` and `qvol`.
//!
//! Each step that can fail says which file and what to do, in one sentence; the image is
//! only written by `Volume::open_with` itself, after every check has passed, and the
//! keystore is written only after the volume opened.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use log::warn;
use qvol_core::storage::Storage;
use qvol_core::{read_header, CommitPoint, HeaderInfo, OpenOptions, Volume, VolumeKey};
use qvol_keys::{
    ErrorKind as KeysErrorKind, Keystore, SecretBytes, UnlockedKeystore, VolumeBinding,
    VolumeGuard, VolumeState, KEYSTORE_FILE,
};

use crate::image;
use crate::lock::ImageLock;
use crate::paths;
use crate::recorder::Recorder;
use crate::unlock::Unlock;
use crate::volume_disk::error_chain;

/// Where the keystore is and how to unlock it (already resolved, see [`paths`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySource {
    /// The keystore directory.
    pub keystore: Option<PathBuf>,
    /// The passphrase file.
    pub passphrase_file: Option<PathBuf>,
    /// Whether the passphrase file was named (flag or `$QVOL_PASSPHRASE_FILE`) rather than
    /// guessed from `$CREDENTIALS_DIRECTORY`: a named file must be used.
    pub passphrase_named: bool,
}

impl KeySource {
    /// From the command-line flags, falling back on the environment and defaults.
    pub fn from_flags(keystore: Option<&Path>, passphrase_file: Option<&Path>) -> Self {
        Self {
            keystore: paths::keystore_dir(keystore),
            passphrase_file: paths::passphrase_file(passphrase_file),
            passphrase_named: paths::passphrase_file_named(passphrase_file),
        }
    }

    /// The keystore directory, or a sentence saying how to name one.
    pub fn keystore_dir(&self) -> anyhow::Result<&Path> {
        self.keystore.as_deref().ok_or_else(|| {
            anyhow!("no keystore directory: pass --keystore DIR or set QVOL_KEYSTORE")
        })
    }

    /// The passphrase, if one is configured: a named file must be readable; the systemd
    /// credential is used when it exists.
    fn passphrase(&self) -> anyhow::Result<Option<SecretBytes>> {
        match &self.passphrase_file {
            Some(file) if self.passphrase_named || file.exists() => read_passphrase(file).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether a keystore exists at the configured directory.
    pub fn keystore_exists(&self) -> bool {
        self.keystore
            .as_deref()
            .is_some_and(|d| d.join(KEYSTORE_FILE).exists())
    }

    /// Opens and unlocks the keystore. A passphrase configured for a keystore that has
    /// none is an error (the keystore may have been replaced by one without a passphrase),
    /// never silently ignored.
    pub fn unlock(&self) -> anyhow::Result<UnlockedKeystore> {
        let dir = self.keystore_dir()?;
        let keystore = Keystore::open(dir)
            .with_context(|| format!("cannot open the keystore {}", dir.display()))?;
        let pass = self.passphrase()?;
        if keystore.needs_passphrase() && pass.is_none() {
            bail!(
                "the keystore {} is protected by a passphrase: pass --passphrase-file FILE or \
                 set QVOL_PASSPHRASE_FILE",
                dir.display()
            );
        }
        keystore
            .unlock(pass.as_ref().map(SecretBytes::expose))
            .with_context(|| format!("cannot unlock the keystore {}", dir.display()))
    }
}

/// Reads a passphrase file: its bytes without one trailing "\n" or "\r\n"; empty is refused.
pub fn read_passphrase(path: &Path) -> anyhow::Result<SecretBytes> {
    let mut bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    let pass = SecretBytes::new(bytes);
    if pass.expose().is_empty() {
        bail!("the passphrase file {} is empty", path.display());
    }
    Ok(pass)
}

/// Reads the header of `image` (a file or `rbd:POOL/IMAGE`) without any key.
pub fn read_image_header(image: &Path) -> anyhow::Result<(Arc<dyn Storage>, HeaderInfo)> {
    let storage = image::open_read_only(image)?;
    let header = header_of(&*storage, image)?;
    Ok((storage, header))
}

/// Decodes the header of an open image (`image` names it in messages).
fn header_of(storage: &dyn Storage, image: &Path) -> anyhow::Result<HeaderInfo> {
    read_header(storage).map_err(|e| {
        anyhow!(
            "{} is not a usable qvol image: {}",
            image.display(),
            error_chain(&e)
        )
    })
}

/// The locked image as storage: one open file description (or RBD handle) for the lock,
/// the header and the volume.
fn locked_storage(lock: &ImageLock, image: &Path) -> anyhow::Result<Arc<dyn Storage>> {
    lock.storage(image)
        .with_context(|| format!("cannot open the image {}", image.display()))
}

/// Opens `image` read-only with the volume key `unlock` unwraps (for the keystore: a slot of
/// `only_key`, if given), without the keystore's volume record: for the commands that judge
/// freshness themselves (`qvol info`) or make the record (`qvol volume adopt`). Writes
/// nothing (the log is replayed in memory). Returns the keyslot that opened and the volume.
pub fn open_unrecorded(
    image: &Path,
    header: &HeaderInfo,
    keystore: Option<&UnlockedKeystore>,
    unlock: &Unlock,
    only_key: Option<&str>,
) -> anyhow::Result<(usize, Volume)> {
    let (slot, key) = unlock.unwrap(image, header, keystore, only_key)?;
    let storage = image::open_read_only(image)?;
    let volume = Volume::open(storage, &key, true).map_err(|e| {
        anyhow!(
            "cannot open the volume {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    check_unlocked_slot(image, header, &volume, slot)?;
    Ok((slot, volume))
}

/// The slot that unwrapped must be one the verified keyslot area holds: the keyless header
/// read may have offered a slot from a copy that the superblock does not vouch for.
fn check_unlocked_slot(
    image: &Path,
    header: &HeaderInfo,
    volume: &Volume,
    slot: usize,
) -> anyhow::Result<()> {
    if volume.keyslots().get(slot) != header.keyslots.get(slot) {
        bail!(
            "keyslot {slot} of {} unlocked the volume but is not in its committed keyslot \
             area; refusing it",
            image.display()
        );
    }
    Ok(())
}

/// Which volume a caller may open (an image copied over another one at the same path is
/// refused before anything is read with a key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The volume id the image must carry; `None` accepts any recorded volume.
    pub volume_id: Option<[u8; 16]>,
    /// The keystore key that may unwrap; `None` means the key the volume is recorded with.
    pub key_id: Option<String>,
}

/// Parses a volume id as `qvol info` prints it: 32 hex digits.
pub fn parse_volume_id(text: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

/// A volume id as `qvol info` prints it (and `--volume-id` takes it): 32 hex digits.
pub fn volume_id_hex(id: &[u8; 16]) -> String {
    hex::encode(id)
}

/// An open volume with its lock (released when this is dropped). Holds no keystore: only
/// the volume key (inside the volume) and its own volume's record key (inside the guard).
#[derive(Debug)]
pub struct OpenedVolume {
    /// The volume.
    pub volume: Volume,
    /// The header as read before opening.
    pub header: HeaderInfo,
    /// Which keyslot opened it.
    pub slot: usize,
    /// What the keystore binds this volume to (`None`: opened without a record, see
    /// [`OpenRequest::allow_unrecorded`]).
    pub binding: Option<VolumeBinding>,
    /// Records every commit of a writable, recorded volume in the keystore.
    pub recorder: Option<Arc<Recorder>>,
    /// The image lock; keep it as long as the volume is in use.
    pub lock: ImageLock,
    /// The volume key, if [`OpenRequest::keep_key`] asked for it.
    pub key: Option<VolumeKey>,
}

/// The keystore's view of a commit point.
pub fn state_of(point: &CommitPoint) -> VolumeState {
    VolumeState {
        generation: point.generation,
        root_id: point.root_id,
    }
}

/// What [`open_volume`] opens, and how.
#[derive(Clone, Copy, Debug)]
pub struct OpenRequest<'a> {
    /// The image.
    pub image: &'a Path,
    /// The keystore (for the volume record, and the keys with [`Unlock::Keystore`]).
    pub keys: &'a KeySource,
    /// Which keyslot kind unlocks.
    pub unlock: &'a Unlock,
    /// The volume (and key) the caller is bound to.
    pub binding: &'a Binding,
    /// Open read-only (a shared lock; nothing written).
    pub read_only: bool,
    /// With a passphrase or recovery unlock, open a volume the keystore has no record of (or
    /// with no keystore at all): its freshness is then not checked ([`OpenedVolume::binding`]
    /// is `None`; the caller says so). For commands run after the keystore was lost; the
    /// daemon never sets it.
    pub allow_unrecorded: bool,
    /// The keystore, already unlocked by the caller (else [`OpenRequest::keys`] unlocks it).
    pub keystore: Option<&'a UnlockedKeystore>,
    /// Return the volume key in [`OpenedVolume::key`] (to wrap it for a new keyslot).
    pub keep_key: bool,
    /// `qvol header restore`: unwrap only with these slots (a backup's), and accept an image
    /// whose keyslot area its superblock does not vouch for.
    pub restore_slots: Option<&'a [Vec<u8>]>,
    /// The slot and volume key an earlier open of the same image unwrapped: not unwrapped
    /// again (a passphrase slot costs a second of argon2id).
    pub unwrapped: Option<(usize, &'a VolumeKey)>,
    /// Open this snapshot instead of the live disk (only with [`OpenRequest::read_only`]).
    pub snapshot: Option<&'a str>,
}

impl<'a> OpenRequest<'a> {
    /// A request for `image` with the defaults of a daemon: the keystore unlocks, a record
    /// is required, no key kept.
    pub fn new(
        image: &'a Path,
        keys: &'a KeySource,
        unlock: &'a Unlock,
        binding: &'a Binding,
    ) -> Self {
        OpenRequest {
            image,
            keys,
            unlock,
            binding,
            read_only: false,
            allow_unrecorded: false,
            keystore: None,
            keep_key: false,
            restore_slots: None,
            unwrapped: None,
            snapshot: None,
        }
    }
}

/// Locks, checks the binding, unlocks and opens the image of `req`.
///
/// Before anything is written the committed state is compared with the keystore's record
/// for the volume: an older generation, or the same generation with another root (a fork
/// of history), is refused. A writable open records every commit from then on (through
/// the volume's own [`VolumeGuard`]) and raises the keystore's floor for the volume. The
/// unlocked keystore is dropped before this returns.
pub fn open_volume(req: &OpenRequest<'_>) -> anyhow::Result<OpenedVolume> {
    let image = req.image;
    let lock = ImageLock::acquire(image, !req.read_only)?;
    let storage = locked_storage(&lock, image)?;
    let header = header_of(&*storage, image)?;
    if let Some(want) = req.binding.volume_id {
        if want != header.volume_id {
            bail!(
                "{} holds volume {}, not volume {} (--volume-id); refusing to open it",
                image.display(),
                hex::encode(header.volume_id),
                hex::encode(want)
            );
        }
    }
    let unrecorded_ok = req.allow_unrecorded && !req.unlock.is_keystore();
    let own;
    let keystore = match req.keystore {
        Some(ks) => Some(ks),
        None if unrecorded_ok && !req.keys.keystore_exists() => None,
        None => {
            own = req.keys.unlock()?;
            Some(&own)
        }
    };
    let guard = match keystore {
        None => None,
        Some(ks) => match ks.volume_guard(&header.volume_id) {
            Ok(guard) => Some(guard),
            Err(e) if unrecorded_ok && e.kind() == KeysErrorKind::NotFound => None,
            Err(e) => bail!("refusing to open {}: {}", image.display(), error_chain(&e)),
        },
    };
    let bound = guard.as_ref().map(|g| g.binding().clone());
    if let Some(b) = &bound {
        check_bound_key(image, &header, b, req)?;
    }
    let only_key = bound.as_ref().map(|b| b.key_id.as_str());
    let (slot, key) = match req.unwrapped {
        Some((slot, key)) => (slot, key.clone()),
        None => unwrap_for(req, &header, keystore, only_key)?,
    };
    let guard = guard.map(Arc::new);
    let recorder = match (&guard, req.read_only) {
        (Some(g), false) => Some(Recorder::new(Arc::clone(g), image.to_path_buf())),
        _ => None,
    };
    // Checked inside the open, before anything is written (the restore's slot is the
    // backup's, not the image's).
    let unlocked = if req.restore_slots.is_none() {
        header.keyslots.get(slot).map(|blob| (slot, blob.clone()))
    } else {
        None
    };
    let volume = open_checked(
        req,
        storage,
        &key,
        guard.as_ref(),
        recorder.as_ref(),
        unlocked,
    )?;
    if let (Some(ks), Some(_), false) = (keystore, &guard, req.read_only) {
        let point = volume.commit_point();
        if let Err(e) = ks.raise_volume_floor(&header.volume_id, &state_of(&point)) {
            warn!(
                "cannot raise the keystore's floor for {} to generation {}: {}",
                image.display(),
                point.generation,
                error_chain(&e)
            );
        }
    }
    Ok(OpenedVolume {
        volume,
        header,
        slot,
        binding: bound,
        recorder,
        lock,
        key: req.keep_key.then_some(key),
    })
}

/// Unwraps with the request's unlock; a restore only through the backup's slots (the slot
/// number returned is then the backup's): what it puts back must open the volume.
fn unwrap_for(
    req: &OpenRequest<'_>,
    header: &HeaderInfo,
    keystore: Option<&UnlockedKeystore>,
    only_key: Option<&str>,
) -> anyhow::Result<(usize, VolumeKey)> {
    if let Some(slots) = req.restore_slots {
        let mut backup = header.clone();
        backup.keyslots = slots.to_vec();
        return req
            .unlock
            .unwrap(req.image, &backup, keystore, only_key)
            .context("none of the backup's keyslots opens with this unlock, so restoring them could lock everyone out");
    }
    req.unlock.unwrap(req.image, header, keystore, only_key)
}

/// The record must name a key, and the one `--key` asks for.
fn check_bound_key(
    image: &Path,
    header: &HeaderInfo,
    bound: &VolumeBinding,
    req: &OpenRequest<'_>,
) -> anyhow::Result<()> {
    if bound.key_id.is_empty() {
        bail!(
            "the keystore's record of volume {} (of {}) names no key (it predates keystore \
             version 2): run `qvol volume adopt {}` to bind it",
            hex::encode(header.volume_id),
            image.display(),
            image.display()
        );
    }
    if let Some(key) = &req.binding.key_id {
        if *key != bound.key_id {
            bail!(
                "volume {} of {} is recorded for key {}, not {key} (--key); refusing to open it",
                hex::encode(header.volume_id),
                image.display(),
                bound.key_id
            );
        }
    }
    Ok(())
}

/// `Volume::open_with`, checking freshness before anything is written and recording every
/// later commit with `recorder` (writable opens).
fn open_checked(
    req: &OpenRequest<'_>,
    storage: Arc<dyn Storage>,
    key: &VolumeKey,
    guard: Option<&Arc<VolumeGuard>>,
    recorder: Option<&Arc<Recorder>>,
    unlocked_slot: Option<(usize, Vec<u8>)>,
) -> anyhow::Result<Volume> {
    let image = req.image;
    let check = guard.map(|g| {
        let checker = Arc::clone(g);
        Box::new(move |point: &CommitPoint| {
            checker
                .check(&state_of(point))
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        }) as qvol_core::CommitCheck
    });
    let opts = OpenOptions {
        read_only: req.read_only,
        check,
        on_commit: recorder.map(Recorder::hook),
        accept_any_keyslot_area: req.restore_slots.is_some(),
        unlocked_slot,
        snapshot: req.snapshot.map(str::to_owned),
    };
    Volume::open_with(storage, key, opts).map_err(|e| {
        let what = if e.kind() == qvol_core::ErrorKind::Refused {
            "refusing to open"
        } else {
            "cannot open the volume"
        };
        anyhow!("{what} {}: {}", image.display(), error_chain(&e))
    })
}
