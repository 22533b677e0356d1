//! What the commands that change a volume's keyslots share: the unlock flags (keystore,
//! passphrase slot, recovery shares), getting the current slots and the volume key (one
//! call: lock, header, unlock, freshness, open — or, when a daemon serves the image, its
//! control socket), writing the new slots, and telling the keystore which generations of
//! its key the volume's slots are wrapped for.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use qvol_core::{CipherSuite, HeaderInfo, VolumeKey};
use qvol_keys::{keyslot, UnlockedKeystore, VolumeBinding};
use serde_json::json;
use vhost_qvol::control::{connect_to_server, find_server, ControlClient};
use vhost_qvol::lock::LockError;
use vhost_qvol::open::{
    open_volume, read_image_header, state_of, Binding, KeySource, OpenRequest, OpenedVolume,
};
use vhost_qvol::text::escape_untrusted;
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

/// Where the change goes.
enum Target {
    /// This process opened the image (writable).
    Local(Box<OpenedVolume>),
    /// A daemon serves it: through its control socket.
    Served {
        client: ControlClient,
        /// The slots' hash as the daemon reported it (the change names it).
        hash: [u8; 32],
        /// The one-time nonce of that reply (the change's proof covers it).
        nonce: [u8; 16],
        suite: CipherSuite,
    },
}

/// A volume ready for a keyslot change.
pub struct Change {
    /// The image.
    pub image: PathBuf,
    /// Its 8 keyslots as the volume vouches for them (empty = free).
    pub slots: Vec<Vec<u8>>,
    /// The slot that unlocked.
    pub unlocked_slot: usize,
    /// The volume key.
    key: VolumeKey,
    /// The volume id.
    pub volume_id: [u8; 16],
    /// What the keystore binds the volume to (`None`: not recorded there).
    pub binding: Option<VolumeBinding>,
    /// The unlocked keystore (`None`: no keystore, with a passphrase or share unlock).
    pub keystore: Option<UnlockedKeystore>,
    /// How it was unlocked.
    pub unlock: Unlock,
    target: Target,
}

impl Change {
    /// A change of a volume this process opened writable (with its key kept).
    pub fn local(
        image: &Path,
        opened: OpenedVolume,
        keystore: Option<UnlockedKeystore>,
        unlock: Unlock,
    ) -> anyhow::Result<Change> {
        let key = opened
            .key
            .clone()
            .ok_or_else(|| anyhow!("internal: the volume was opened without keeping its key"))?;
        Ok(Change {
            image: image.to_path_buf(),
            slots: opened.volume.keyslots(),
            unlocked_slot: opened.slot,
            key,
            volume_id: opened.header.volume_id,
            binding: opened.binding.clone(),
            keystore,
            unlock,
            target: Target::Local(Box::new(opened)),
        })
    }

    /// The volume key.
    pub fn key(&self) -> &VolumeKey {
        &self.key
    }

    /// Replaces the keyslots (crash-safe, locally or by the serving daemon), then updates
    /// the keystore: the generations its bound key is wrapped for, or (`adopt_for`) a record
    /// binding the volume to that key when the keystore has none.
    pub fn commit_slots(self, slots: &[Vec<u8>], adopt_for: Option<&str>) -> anyhow::Result<()> {
        let image = &self.image;
        let id = self.volume_id;
        let point = match self.target {
            Target::Local(opened) => {
                opened.volume.set_keyslots(slots).map_err(|e| {
                    anyhow!(
                        "cannot change the keyslots of {}: {}",
                        image.display(),
                        error_chain(&e)
                    )
                })?;
                qvol_core::failpoint::hit("qvol:slots-written");
                let point = opened.volume.commit_point();
                opened.volume.close().map_err(|e| {
                    anyhow!("cannot close {}: {}", image.display(), error_chain(&e))
                })?;
                Some(point)
            }
            Target::Served {
                mut client,
                hash,
                nonce,
                suite,
            } => {
                let proof =
                    qvol_core::keyslot_change_proof(&self.key, suite, id, &nonce, &hash, slots)
                        .map_err(|e| anyhow!("{}", error_chain(&e)))?;
                client
                    .execute(
                        "keyslots-set",
                        json!({"keyslots": slots.iter().map(hex::encode).collect::<Vec<_>>(),
                               "expected": hex::encode(hash), "proof": hex::encode(proof)}),
                    )
                    .with_context(|| {
                        format!("cannot change the keyslots of {}", image.display())
                    })?;
                // The daemon wrote the area in place and synced it: the image must show it
                // (a daemon that only says so changed nothing).
                let (_, now) = read_image_header(image)?;
                let mut want = slots.to_vec();
                want.resize(qvol_core::MAX_KEYSLOTS, Vec::new());
                if now.keyslots != want {
                    anyhow::bail!(
                        "the daemon serving {} reported the keyslot change done, but the image \
                         does not show it; nothing was recorded",
                        image.display()
                    );
                }
                None
            }
        };
        let Some(ks) = &self.keystore else {
            return Ok(());
        };
        let binding = match (&self.binding, adopt_for, point) {
            (Some(b), _, _) => b.clone(),
            (None, Some(key), Some(point)) => ks
                .adopt_volume(&id, key, &state_of(&point))
                .with_context(|| {
                    format!("cannot record volume {} in the keystore", hex::encode(id))
                })?,
            _ => return Ok(()),
        };
        record_wraps(ks, &id, &binding.key_id, slots)
    }
}

/// Gets `image` ready for a keyslot change and keeps its volume key. With the keystore
/// unlock (or `need_keystore`) the keystore must unlock; with a passphrase or shares it is
/// used when it exists, and a volume it has no record of goes on with a warning (the
/// keystore was lost: see "Disaster recovery" in README.md). An image a daemon serves is
/// changed through the daemon's control socket.
///
/// `check` judges the request first on a read-only view, so that a refused request leaves
/// the image byte for byte as it was (a writable open commits); it runs again once the
/// image is open for writing, in case it changed in between. When it returns `false`
/// (nothing to change) this returns `None`.
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
    if held_elsewhere(image)? {
        let change = through_daemon(image, keystore, unlock)?;
        return Ok(check(&change)?.then_some(change));
    }
    let binding = Binding::default();
    let look = open_volume(&OpenRequest {
        read_only: true,
        allow_unrecorded: true,
        keep_key: true,
        keystore: keystore.as_ref(),
        ..OpenRequest::new(image, &source, &unlock, &binding)
    });
    let look = match look {
        Ok(look) => look,
        Err(e) if is_busy(&e) => {
            let change = through_daemon(image, keystore, unlock)?;
            return Ok(check(&change)?.then_some(change));
        }
        Err(e) => return Err(e),
    };
    warn_if_unrecorded(image, &look, &source, keystore.is_some());
    let change = Change::local(image, look, keystore, unlock)?;
    if !check(&change)? {
        return Ok(None);
    }
    let slot = change.unlocked_slot;
    let Change {
        key,
        keystore,
        unlock,
        target,
        ..
    } = change;
    // Release the shared lock and take the write lock.
    drop(target);
    let opened = open_volume(&OpenRequest {
        allow_unrecorded: true,
        keep_key: true,
        keystore: keystore.as_ref(),
        unwrapped: Some((slot, &key)),
        ..OpenRequest::new(image, &source, &unlock, &binding)
    })
    .map_err(|e| busy_sentence(image, e))?;
    let change = Change::local(image, opened, keystore, unlock)?;
    Ok(check(&change)?.then_some(change))
}

/// Whether another Ceph client holds the exclusive lock of an RBD image, which a
/// read-only open does not notice (it takes no lock): a change then goes to the daemon
/// serving it, as for a file whose lock a daemon holds. Not with `--break-lock`, which is
/// for taking over from a dead holder.
fn held_elsewhere(image: &Path) -> anyhow::Result<bool> {
    Ok(vhost_qvol::image::is_rbd(image)
        && !vhost_qvol::image::break_lock()
        && !vhost_qvol::image::rbd_lock_holders(image)?.is_empty())
}

fn warn_if_unrecorded(image: &Path, look: &OpenedVolume, source: &KeySource, has_keystore: bool) {
    if look.binding.is_some() {
        return;
    }
    log::warn!(
        "volume {} ({}) is not recorded in {}: whether it is its latest version (not rolled \
         back) cannot be checked",
        hex::encode(look.header.volume_id),
        image.display(),
        source.keystore.as_deref().filter(|_| has_keystore).map_or(
            "any keystore".to_string(),
            |d| format!("keystore {}", d.display())
        )
    );
}

/// The change of a served image: its slots from the daemon (what its verified volume holds),
/// the key unwrapped here; the daemon checks that the change is made with that key.
fn through_daemon(
    image: &Path,
    keystore: Option<UnlockedKeystore>,
    unlock: Unlock,
) -> anyhow::Result<Change> {
    let mut client = connect_to_server(image).map_err(|e| {
        // An RBD image's sentence already says who holds it and where.
        if vhost_qvol::image::is_rbd(image) {
            return e;
        }
        e.context(format!(
            "{} is in use by a vhost-qvol (or another qvol), and can change only through a \
             serving daemon's control socket",
            image.display()
        ))
    })?;
    let (_, header) = read_image_header(image)?;
    check_served_volume(&client, image, &header)?;
    let reply = client.execute("keyslots", serde_json::Value::Null)?;
    let slots: Vec<Vec<u8>> = reply["keyslots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().and_then(|s| hex::decode(s).ok()))
                .collect()
        })
        .unwrap_or_default();
    let mut hash = [0u8; 32];
    hex::decode_to_slice(reply["hash"].as_str().unwrap_or_default(), &mut hash)
        .map_err(|_| anyhow!("the daemon's keyslots reply has no valid hash"))?;
    let mut nonce = [0u8; 16];
    hex::decode_to_slice(reply["nonce"].as_str().unwrap_or_default(), &mut nonce)
        .map_err(|_| anyhow!("the daemon's keyslots reply has no valid nonce"))?;
    if slots.len() != qvol_core::MAX_KEYSLOTS {
        anyhow::bail!("the daemon's keyslots reply does not list 8 slots");
    }
    let binding = match &keystore {
        Some(ks) => match ks.volume_guard(&header.volume_id) {
            Ok(g) => Some(g.binding().clone()),
            Err(e) if e.kind() == qvol_keys::ErrorKind::NotFound && !unlock.is_keystore() => None,
            Err(e) => anyhow::bail!(
                "refusing to change {}: {}",
                image.display(),
                error_chain(&e)
            ),
        },
        None => None,
    };
    let mut served_header = header.clone();
    served_header.keyslots = slots.clone();
    let only_key = binding
        .as_ref()
        .map(|b| b.key_id.as_str())
        .filter(|_| unlock.is_keystore());
    let (slot, key) = unlock.unwrap(image, &served_header, keystore.as_ref(), only_key)?;
    prove_key_holder(&mut client, image, &header, &key)?;
    Ok(Change {
        image: image.to_path_buf(),
        slots,
        unlocked_slot: slot,
        key,
        volume_id: header.volume_id,
        binding,
        keystore,
        unlock,
        target: Target::Served {
            client,
            hash,
            nonce,
            suite: header.suite,
        },
    })
}

/// The daemon must serve the image's volume.
fn check_served_volume(
    client: &ControlClient,
    image: &Path,
    header: &HeaderInfo,
) -> anyhow::Result<()> {
    let served = client.greeting["volume_id"].as_str().unwrap_or_default();
    if served != hex::encode(header.volume_id) {
        anyhow::bail!(
            "the daemon serving {} serves volume {}, not the image's {}",
            image.display(),
            escape_untrusted(served),
            hex::encode(header.volume_id)
        );
    }
    Ok(())
}

/// The daemon must hold this volume's key before it is told anything made with it (or
/// trusted with anything it answers).
fn prove_key_holder(
    client: &mut ControlClient,
    image: &Path,
    header: &HeaderInfo,
    key: &VolumeKey,
) -> anyhow::Result<()> {
    let mut challenge = [0u8; 32];
    getrandom::getrandom(&mut challenge)
        .map_err(|e| anyhow!("the operating system's random number generator failed: {e}"))?;
    let answer = client.execute("prove-key", json!({"challenge": hex::encode(challenge)}))?;
    let proven = answer["proof"]
        .as_str()
        .and_then(|p| hex::decode(p).ok())
        .is_some_and(|p| {
            qvol_core::key_holder_proof_matches(key, header.suite, header.volume_id, &challenge, &p)
        });
    if !proven {
        anyhow::bail!(
            "the process serving {} does not hold the volume's key; refusing to talk to it",
            image.display()
        );
    }
    Ok(())
}

/// An image opened to act on: by this process, or through the daemon serving it.
pub enum Handle {
    /// This process opened the image.
    Local(Box<OpenedVolume>),
    /// A daemon serves it: its control socket, the daemon proven to hold the volume key.
    Served(ControlClient),
}

impl Change {
    /// The volume, when this process opened it.
    pub fn volume(&self) -> Option<&qvol_core::Volume> {
        match &self.target {
            Target::Local(opened) => Some(&opened.volume),
            Target::Served { .. } => None,
        }
    }

    /// For a served image: the slots' hash as the daemon reported it and the one-time
    /// nonce of that reply (what a change made through the daemon names).
    pub fn served_nonce(&self) -> Option<([u8; 32], [u8; 16])> {
        match &self.target {
            Target::Local(_) => None,
            Target::Served { hash, nonce, .. } => Some((*hash, *nonce)),
        }
    }

    /// What the change is made through.
    pub fn into_handle(self) -> Handle {
        match self.target {
            Target::Local(opened) => Handle::Local(opened),
            Target::Served { client, .. } => Handle::Served(client),
        }
    }
}

/// Opens `image` read-only (freshness checked against the keystore's record when it has
/// one), or, when a daemon serves it, connects to that daemon's control socket once it has
/// shown it holds the volume key (unwrapped here with the same unlock).
pub fn open_to_read(
    image: &Path,
    keys: &KeystoreArgs,
    unlock: &UnlockArgs,
) -> anyhow::Result<Handle> {
    let unlock = unlock.unlock()?;
    let source = keys.source();
    let keystore = if unlock.is_keystore() || source.keystore_exists() {
        Some(source.unlock()?)
    } else {
        None
    };
    // An RBD image a daemon of this host serves is read through it, as a file's is (a
    // read-only open of RBD takes no lock, so it would not notice the daemon).
    if vhost_qvol::image::is_rbd(image) && find_server(image)?.is_some_and(|(_, s)| s.is_some()) {
        return read_through_daemon(image, keystore, unlock);
    }
    let binding = Binding::default();
    let opened = open_volume(&OpenRequest {
        read_only: true,
        allow_unrecorded: true,
        keystore: keystore.as_ref(),
        ..OpenRequest::new(image, &source, &unlock, &binding)
    });
    match opened {
        Ok(opened) => {
            warn_if_unrecorded(image, &opened, &source, keystore.is_some());
            Ok(Handle::Local(Box::new(opened)))
        }
        Err(e) if is_busy(&e) => read_through_daemon(image, keystore, unlock),
        Err(e) => Err(e),
    }
}

/// Connects to the daemon serving `image` once it has shown it holds the volume key
/// (unwrapped here with `unlock`).
fn read_through_daemon(
    image: &Path,
    keystore: Option<UnlockedKeystore>,
    unlock: Unlock,
) -> anyhow::Result<Handle> {
    let mut client = connect_to_server(image)?;
    let (_, header) = read_image_header(image)?;
    check_served_volume(&client, image, &header)?;
    let only_key = match (&keystore, unlock.is_keystore()) {
        (Some(ks), true) => ks
            .volume_guard(&header.volume_id)
            .ok()
            .map(|g| g.binding().key_id.clone()),
        _ => None,
    };
    let (_, key) = unlock.unwrap(image, &header, keystore.as_ref(), only_key.as_deref())?;
    prove_key_holder(&mut client, image, &header, &key)?;
    Ok(Handle::Served(client))
}

/// Whether `e` says that someone else holds the image's lock.
pub fn is_busy(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<LockError>(), Some(LockError::Busy { .. }))
}

/// A lock held by someone else becomes the sentence of a command that changes keyslots.
pub fn busy_sentence(image: &Path, e: anyhow::Error) -> anyhow::Error {
    if is_busy(&e) {
        anyhow!(
            "{} is in use by a vhost-qvol that takes no changes through a control socket (or \
             by another qvol): stop it and run this again",
            image.display()
        )
    } else {
        e
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
