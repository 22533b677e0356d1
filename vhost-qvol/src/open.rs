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
use qvol_core::storage::FileStorage;
use qvol_core::{read_header, CommitPoint, HeaderInfo, OpenOptions, Volume, VolumeKey};
use qvol_keys::{
    keyslot, Keystore, SecretBytes, UnlockedKeystore, VolumeBinding, VolumeGuard, VolumeState,
};

use crate::lock::ImageLock;
use crate::paths;
use crate::recorder::Recorder;
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

/// Reads the header of `image` without any key.
pub fn read_image_header(image: &Path) -> anyhow::Result<(FileStorage, HeaderInfo)> {
    let storage = FileStorage::open(image, false)
        .with_context(|| format!("cannot open the image {}", image.display()))?;
    let header = header_of(&storage, image)?;
    Ok((storage, header))
}

/// Decodes the header of an open image (`image` names it in messages).
fn header_of(storage: &FileStorage, image: &Path) -> anyhow::Result<HeaderInfo> {
    read_header(storage).map_err(|e| {
        anyhow!(
            "{} is not a usable qvol image: {}",
            image.display(),
            error_chain(&e)
        )
    })
}

/// The locked file as storage: one open file description for the lock, the header and
/// the volume.
fn locked_storage(lock: &ImageLock, image: &Path) -> anyhow::Result<FileStorage> {
    let file = lock
        .file()
        .try_clone()
        .with_context(|| format!("cannot open the image {}", image.display()))?;
    Ok(FileStorage::from_file(file, image))
}

/// Unwraps the volume key of `header` with a key of `keystore`; returns the slot index.
/// With `only_key`, recipient slots of any other key are not tried.
pub fn unwrap_volume_key(
    image: &Path,
    header: &HeaderInfo,
    keystore: &UnlockedKeystore,
    only_key: Option<&str>,
) -> anyhow::Result<(usize, VolumeKey)> {
    // Slots of other keys become empty blobs, so that indices stay the image's.
    let slots: Vec<Vec<u8>> = header
        .keyslots
        .iter()
        .map(|blob| match (only_key, keyslot::describe(blob)) {
            (None, _) => blob.clone(),
            (Some(want), Ok(info)) if info.key_id.as_deref() == Some(want) => blob.clone(),
            _ => Vec::new(),
        })
        .collect();
    let (slot, secret) = keyslot::unwrap_with_keystore(&slots, keystore, &header.volume_id)
        .map_err(|e| {
            let which = only_key.map_or(String::new(), |k| format!(" for key {k}"));
            anyhow!(
                "no keyslot{which} of {} opens with the keys in keystore {}: {}",
                image.display(),
                keystore.dir().display(),
                error_chain(&e)
            )
        })?;
    Ok((slot, VolumeKey::from_bytes(*secret.expose())))
}

/// Opens `image` read-only with the volume key a keyslot of `keystore` unwraps (of
/// `only_key`, if given), without the keystore's volume record: for the commands that judge
/// freshness themselves (`qvol info`) or make the record (`qvol volume adopt`). Writes
/// nothing (the log is replayed in memory). Returns the keyslot that opened and the volume.
pub fn open_unrecorded(
    image: &Path,
    header: &HeaderInfo,
    keystore: &UnlockedKeystore,
    only_key: Option<&str>,
) -> anyhow::Result<(usize, Volume)> {
    let (slot, key) = unwrap_volume_key(image, header, keystore, only_key)?;
    let storage = FileStorage::open(image, false)
        .with_context(|| format!("cannot open the image {}", image.display()))?;
    let volume = Volume::open(Arc::new(storage), &key, true).map_err(|e| {
        anyhow!(
            "cannot open the volume {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    Ok((slot, volume))
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
    /// What the keystore binds this volume to.
    pub binding: VolumeBinding,
    /// Records every commit of a writable volume in the keystore (`None` read-only).
    pub recorder: Option<Arc<Recorder>>,
    /// The image lock; keep it as long as the volume is in use.
    pub lock: ImageLock,
}

/// The keystore's view of a commit point.
pub fn state_of(point: &CommitPoint) -> VolumeState {
    VolumeState {
        generation: point.generation,
        root_id: point.root_id,
    }
}

/// Locks, checks the binding, unlocks and opens `image` (read-only if `read_only`).
///
/// Before anything is written the committed state is compared with the keystore's record
/// for the volume: an older generation, or the same generation with another root (a fork
/// of history), is refused. A writable open records every commit from then on (through
/// the volume's own [`VolumeGuard`]) and raises the keystore's floor for the volume. The
/// unlocked keystore is dropped before this returns.
pub fn open_volume(
    image: &Path,
    keys: &KeySource,
    binding: &Binding,
    read_only: bool,
) -> anyhow::Result<OpenedVolume> {
    let lock = ImageLock::acquire(image, !read_only)?;
    let storage = locked_storage(&lock, image)?;
    let header = header_of(&storage, image)?;
    if let Some(want) = binding.volume_id {
        if want != header.volume_id {
            bail!(
                "{} holds volume {}, not volume {} (--volume-id); refusing to open it",
                image.display(),
                hex::encode(header.volume_id),
                hex::encode(want)
            );
        }
    }
    let keystore = keys.unlock()?;
    let guard = keystore
        .volume_guard(&header.volume_id)
        .map_err(|e| anyhow!("refusing to open {}: {}", image.display(), error_chain(&e)))?;
    let bound = guard.binding().clone();
    if bound.key_id.is_empty() {
        bail!(
            "the keystore's record of volume {} (of {}) names no key (it predates keystore \
             version 2): run `qvol volume adopt {}` to bind it",
            hex::encode(header.volume_id),
            image.display(),
            image.display()
        );
    }
    if let Some(key) = &binding.key_id {
        if *key != bound.key_id {
            bail!(
                "volume {} of {} is recorded for key {}, not {key} (--key); refusing to open it",
                hex::encode(header.volume_id),
                image.display(),
                bound.key_id
            );
        }
    }
    let (slot, key) = unwrap_volume_key(image, &header, &keystore, Some(&bound.key_id))?;
    let guard = Arc::new(guard);
    let recorder = (!read_only).then(|| Recorder::new(Arc::clone(&guard), image.to_path_buf()));
    let volume = open_checked(image, storage, &key, &guard, recorder.as_ref())?;
    if !read_only {
        let point = volume.commit_point();
        if let Err(e) = keystore.raise_volume_floor(&header.volume_id, &state_of(&point)) {
            warn!(
                "cannot raise the keystore's floor for {} to generation {}: {}",
                image.display(),
                point.generation,
                error_chain(&e)
            );
        }
    }
    drop(keystore);
    Ok(OpenedVolume {
        volume,
        header,
        slot,
        binding: bound,
        recorder,
        lock,
    })
}

/// `Volume::open_with`, checking freshness before anything is written and recording every
/// later commit with `recorder` (writable opens).
fn open_checked(
    image: &Path,
    storage: FileStorage,
    key: &VolumeKey,
    guard: &Arc<VolumeGuard>,
    recorder: Option<&Arc<Recorder>>,
) -> anyhow::Result<Volume> {
    let checker = Arc::clone(guard);
    let opts = OpenOptions {
        read_only: recorder.is_none(),
        check: Some(Box::new(move |point: &CommitPoint| {
            checker
                .check(&state_of(point))
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })),
        on_commit: recorder.map(Recorder::hook),
    };
    Volume::open_with(Arc::new(storage), key, opts).map_err(|e| {
        let what = if e.kind() == qvol_core::ErrorKind::Refused {
            "refusing to open"
        } else {
            "cannot open the volume"
        };
        anyhow!("{what} {}: {}", image.display(), error_chain(&e))
    })
}
