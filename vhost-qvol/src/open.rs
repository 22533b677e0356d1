//! From an image path to an open volume: lock the image, read its header, unlock the
//! keystore, unwrap a keyslot, open the volume. Shared by `vhost-qvol` and `qvol`.
//!
//! Each step that can fail says which file and what to do, in one sentence; the image is
//! only written by `Volume::open` itself, after every check has passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use qvol_core::storage::FileStorage;
use qvol_core::{read_header, HeaderInfo, Volume, VolumeKey};
use qvol_keys::{keyslot, Keystore, SecretBytes, UnlockedKeystore};

use crate::lock::ImageLock;
use crate::paths;
use crate::volume_disk::error_chain;

/// Where the keystore is and how to unlock it (already resolved, see [`paths`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySource {
    /// The keystore directory.
    pub keystore: Option<PathBuf>,
    /// The passphrase file.
    pub passphrase_file: Option<PathBuf>,
}

impl KeySource {
    /// From the command-line flags, falling back on the environment and defaults.
    pub fn from_flags(keystore: Option<&Path>, passphrase_file: Option<&Path>) -> Self {
        Self {
            keystore: paths::keystore_dir(keystore),
            passphrase_file: paths::passphrase_file(passphrase_file),
        }
    }

    /// The keystore directory, or a sentence saying how to name one.
    pub fn keystore_dir(&self) -> anyhow::Result<&Path> {
        self.keystore.as_deref().ok_or_else(|| {
            anyhow!("no keystore directory: pass --keystore DIR or set QVOL_KEYSTORE")
        })
    }

    /// Opens and unlocks the keystore, reading the passphrase file only if one is needed.
    pub fn unlock(&self) -> anyhow::Result<UnlockedKeystore> {
        let dir = self.keystore_dir()?;
        let keystore = Keystore::open(dir)
            .with_context(|| format!("cannot open the keystore {}", dir.display()))?;
        if !keystore.needs_passphrase() {
            return keystore
                .unlock(None)
                .with_context(|| format!("cannot unlock the keystore {}", dir.display()));
        }
        let file = self.passphrase_file.as_deref().ok_or_else(|| {
            anyhow!(
                "the keystore {} is protected by a passphrase: pass --passphrase-file FILE or \
                 set QVOL_PASSPHRASE_FILE",
                dir.display()
            )
        })?;
        let pass = read_passphrase(file)?;
        keystore
            .unlock(Some(pass.expose()))
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
    let header = read_header(&storage).map_err(|e| {
        anyhow!(
            "{} is not a usable qvol image: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    Ok((storage, header))
}

/// Unwraps the volume key of `header` with a key of `keystore`; returns the slot index.
pub fn unwrap_volume_key(
    image: &Path,
    header: &HeaderInfo,
    keystore: &UnlockedKeystore,
) -> anyhow::Result<(usize, VolumeKey)> {
    let (slot, secret) =
        keyslot::unwrap_with_keystore(&header.keyslots, keystore, &header.volume_id).map_err(
            |e| {
                anyhow!(
                    "no keyslot of {} opens with the keys in keystore {}: {}",
                    image.display(),
                    keystore.dir().display(),
                    error_chain(&e)
                )
            },
        )?;
    Ok((slot, VolumeKey::from_bytes(*secret.expose())))
}

/// An open volume with its lock (released when this is dropped).
#[derive(Debug)]
pub struct OpenedVolume {
    /// The volume.
    pub volume: Volume,
    /// The unlocked keystore, to record the volume's generation as it advances.
    pub keystore: UnlockedKeystore,
    /// The header as read before opening.
    pub header: HeaderInfo,
    /// Which keyslot opened it.
    pub slot: usize,
    /// The image lock; keep it as long as the volume is in use.
    pub lock: ImageLock,
}

/// Locks, unlocks and opens `image` (read-only if `read_only`), and checks its generation
/// against the one the keystore last recorded (DESIGN.md, "Freshness": an older copy of
/// the whole image put back is refused). A writable open records the current generation.
pub fn open_volume(
    image: &Path,
    keys: &KeySource,
    read_only: bool,
) -> anyhow::Result<OpenedVolume> {
    let lock = ImageLock::acquire(image, !read_only)?;
    let (_, header) = read_image_header(image)?;
    let keystore = keys.unlock()?;
    let (slot, key) = unwrap_volume_key(image, &header, &keystore)?;
    let storage = FileStorage::open(image, !read_only)
        .with_context(|| format!("cannot open the image {}", image.display()))?;
    let volume = Volume::open(Arc::new(storage), &key, read_only).map_err(|e| {
        anyhow!(
            "cannot open the volume {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    let generation = volume.info().generation;
    keystore
        .check_volume_generation(&header.volume_id, generation)
        .map_err(|e| anyhow!("refusing to open {}: {}", image.display(), error_chain(&e)))?;
    if !read_only {
        record_generation(&keystore, image, &header.volume_id, generation)?;
    }
    Ok(OpenedVolume {
        volume,
        keystore,
        header,
        slot,
        lock,
    })
}

/// Records in the keystore that the volume reached `generation`.
pub fn record_generation(
    keystore: &UnlockedKeystore,
    image: &Path,
    volume_id: &[u8; 16],
    generation: u64,
) -> anyhow::Result<()> {
    keystore
        .record_volume_generation(volume_id, generation)
        .map_err(|e| {
            anyhow!(
                "cannot record generation {generation} of {} in the keystore: {}",
                image.display(),
                error_chain(&e)
            )
        })
}
