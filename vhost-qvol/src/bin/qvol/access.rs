//! What the commands that change a volume share: the unlock flags (keystore, passphrase slot,
//! recovery shares), opening an image for a change (one call: lock, header, unlock,
//! freshness, open), closing it, and telling the keystore which generations of its key the
//! volume's keyslots are wrapped for.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use qvol_keys::{keyslot, UnlockedKeystore};
use vhost_qvol::lock::LockError;
use vhost_qvol::open::{open_volume, state_of, Binding, OpenRequest, OpenedVolume};
use vhost_qvol::unlock::Unlock;
use vhost_qvol::volume_disk::error_chain;

use crate::keystore::KeystoreArgs;

/// How to unlock the volume: the keystore by default, or another kind of keyslot.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UnlockArgs {
    /// Unlock through a passphrase keyslot, the passphrase read from FILE (one trailing
    /// newline ignored) instead of a keystore key.
    #[arg(long, value_name = "FILE")]
    pub unlock_passphrase_file: Option<PathBuf>,
    /// Unlock through a recovery keyslot: one share file per flag, as many as it needs.
    #[arg(long, value_name = "FILE")]
    pub recovery_share: Vec<PathBuf>,
}

impl UnlockArgs {
    /// The unlock these flags ask for.
    pub fn unlock(&self) -> anyhow::Result<Unlock> {
        Unlock::from_flags(
            self.unlock_passphrase_file.clone(),
            self.recovery_share.clone(),
        )
    }
}

/// An image opened for a change, with the keystore when there is one.
pub struct Change {
    /// The image.
    pub image: PathBuf,
    /// The open volume (writable), its lock and what opened it.
    pub opened: OpenedVolume,
    /// The unlocked keystore (`None`: no keystore, with a passphrase or share unlock).
    pub keystore: Option<UnlockedKeystore>,
    /// How it was unlocked.
    pub unlock: Unlock,
}

/// Opens `image` writable for a change and keeps its volume key. With the keystore unlock
/// (or `need_keystore`) the keystore must unlock; with a passphrase or shares it is used
/// when it exists, and a volume it has no record of opens with a warning (the keystore was
/// lost: see "Disaster recovery" in README.md).
///
/// `check` judges the request first on a read-only open, so that a refused request leaves
/// the image byte for byte as it was (a writable open commits); it runs again once the
/// image is open for writing, in case it changed in between. When it returns `false`
/// (nothing to change) the image is not opened for writing and this returns `None`.
pub fn open_for_change(
    image: &Path,
    keys: &KeystoreArgs,
    unlock: &UnlockArgs,
    need_keystore: bool,
    mut check: impl FnMut(&Change) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<Change>> {
    let unlock = unlock.unlock()?;
    let source = keys.source();
    let keystore = if need_keystore || unlock.is_keystore() || source.keystore_exists() {
        Some(source.unlock()?)
    } else {
        None
    };
    let binding = Binding::default();
    let look = open_volume(&OpenRequest {
        read_only: true,
        allow_unrecorded: true,
        keep_key: true,
        keystore: keystore.as_ref(),
        ..OpenRequest::new(image, &source, &unlock, &binding)
    })
    .map_err(|e| busy_sentence(image, e))?;
    if look.binding.is_none() {
        log::warn!(
            "volume {} ({}) is not recorded in {}: whether it is its latest version (not rolled \
             back) cannot be checked",
            hex::encode(look.header.volume_id),
            image.display(),
            source
                .keystore
                .as_deref()
                .filter(|_| keystore.is_some())
                .map_or("any keystore".to_string(), |d| format!(
                    "keystore {}",
                    d.display()
                ))
        );
    }
    let mut change = Change {
        image: image.to_path_buf(),
        opened: look,
        keystore,
        unlock,
    };
    if !check(&change)? {
        return Ok(None);
    }
    let slot = change.opened.slot;
    let key = change.key().clone();
    // Release the shared lock and take the write lock.
    let Change {
        opened,
        keystore,
        unlock,
        ..
    } = change;
    drop(opened);
    let opened = open_volume(&OpenRequest {
        allow_unrecorded: true,
        keep_key: true,
        keystore: keystore.as_ref(),
        unwrapped: Some((slot, &key)),
        ..OpenRequest::new(image, &source, &unlock, &binding)
    })
    .map_err(|e| busy_sentence(image, e))?;
    change = Change {
        image: image.to_path_buf(),
        opened,
        keystore,
        unlock,
    };
    if !check(&change)? {
        return Ok(None);
    }
    Ok(Some(change))
}

/// A lock held by someone else becomes the sentence of a command that changes keyslots.
pub fn busy_sentence(image: &Path, e: anyhow::Error) -> anyhow::Error {
    if matches!(e.downcast_ref::<LockError>(), Some(LockError::Busy { .. })) {
        anyhow!(
            "{} is in use by a vhost-qvol (or another qvol): its keyslots cannot change while \
             it is served; stop the daemon that serves it and run this again",
            image.display()
        )
    } else {
        e
    }
}

impl Change {
    /// The volume id.
    pub fn volume_id(&self) -> [u8; 16] {
        self.opened.header.volume_id
    }

    /// The volume key (kept by [`open_for_change`]).
    pub fn key(&self) -> &qvol_core::VolumeKey {
        match &self.opened.key {
            Some(key) => key,
            None => unreachable!("open_for_change keeps the key"),
        }
    }

    /// Replaces the keyslots (crash-safe), closes the volume, and updates the keystore:
    /// the generations its bound key is wrapped for, or (`adopt_for`) a record binding the
    /// volume to that key when the keystore has none.
    pub fn commit_slots(self, slots: &[Vec<u8>], adopt_for: Option<&str>) -> anyhow::Result<()> {
        let image = &self.image;
        let id = self.volume_id();
        self.opened.volume.set_keyslots(slots).map_err(|e| {
            anyhow!(
                "cannot change the keyslots of {}: {}",
                image.display(),
                error_chain(&e)
            )
        })?;
        qvol_core::failpoint::hit("qvol:slots-written");
        let point = self.opened.volume.commit_point();
        self.opened
            .volume
            .close()
            .map_err(|e| anyhow!("cannot close {}: {}", image.display(), error_chain(&e)))?;
        let Some(ks) = &self.keystore else {
            return Ok(());
        };
        let binding = match (&self.opened.binding, adopt_for) {
            (Some(b), _) => b.clone(),
            (None, Some(key)) => {
                ks.adopt_volume(&id, key, &state_of(&point))
                    .with_context(|| {
                        format!("cannot record volume {} in the keystore", hex::encode(id))
                    })?
            }
            (None, None) => return Ok(()),
        };
        record_wraps(ks, &id, &binding.key_id, slots)
    }
}

/// Tells `ks` which generations of `key_id` the recipient slots in `slots` are wrapped for.
pub fn record_wraps(
    ks: &UnlockedKeystore,
    volume_id: &[u8; 16],
    key_id: &str,
    slots: &[Vec<u8>],
) -> anyhow::Result<()> {
    let generations: Vec<u32> = slots
        .iter()
        .filter_map(|blob| keyslot::describe(blob).ok())
        .filter(|info| info.key_id.as_deref() == Some(key_id))
        .filter_map(|info| info.generation)
        .collect();
    ks.record_volume_wraps(volume_id, &generations)
        .with_context(|| {
            format!(
                "the keyslots changed, but the keystore could not record which generations of \
                 key {key_id} they use"
            )
        })
}
