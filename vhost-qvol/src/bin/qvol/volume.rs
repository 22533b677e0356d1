//! `qvol volume adopt|repair|forget`: the keystore's volume records. A record binds a volume
//! id to the key (and VM) that may open it and remembers the volume's last committed state;
//! a daemon refuses a volume without one. `qvol create` writes it; `adopt` writes it for an
//! image brought from another host (after `qvol key import`); `repair` rebuilds a deleted or
//! damaged one from the keystore's manifest (without lowering it); `forget` drops it once the
//! image is gone (keeping a tombstone: adopting an older copy later needs
//! `--accept-rollback`).

use std::path::PathBuf;

use anyhow::anyhow;
use qvol_keys::keyslot;
use vhost_qvol::lock::ImageLock;
use vhost_qvol::open::{open_unrecorded, parse_volume_id, read_image_header, state_of};
use vhost_qvol::unlock::Unlock;

use crate::keystore::KeystoreArgs;

/// `qvol volume ...`
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Record an existing image in this keystore (bound to the key that opens it), so that
    /// vhost-qvol serves it; for an image brought from another host.
    Adopt {
        /// The image.
        image: PathBuf,
        /// The key to bind it to [default: the first key of this keystore that opens it].
        #[arg(long, value_name = "KEY_ID")]
        key: Option<String>,
        /// Adopt it even if it is older than the state this keystore last knew of the volume
        /// (restoring an older backup on purpose).
        #[arg(long)]
        accept_rollback: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Rebuild a deleted or damaged volume record from the keystore's manifest (its binding
    /// and the last state the manifest vouches for); an older image stays refused.
    Repair {
        /// The volume id.
        volume_id: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Drop the keystore's record of a volume (by id, as `qvol info` prints it), e.g. after
    /// deleting its image; a daemon then refuses that volume.
    Forget {
        /// The volume id.
        volume_id: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// Runs `qvol volume ...`.
pub fn run(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Adopt {
            image,
            key,
            accept_rollback,
            keystore,
        } => adopt(&image, key.as_deref(), accept_rollback, &keystore),
        VolumeCommand::Repair {
            volume_id,
            keystore,
        } => {
            let id = volume_id_arg(&volume_id)?;
            let unlocked = keystore.unlock()?;
            let name = hex::encode(id);
            let damaged = unlocked
                .damaged_entries()
                .iter()
                .any(|sentence| sentence.contains(&name));
            let binding = unlocked.repair_volume(&id)?;
            let (key, vm) = (&binding.key_id, &binding.vm);
            if damaged {
                println!("Repaired the record of volume {name} (key {key} of VM {vm}).");
            } else {
                println!("The record of volume {name} (key {key} of VM {vm}) verifies; nothing to repair.");
            }
            Ok(())
        }
        VolumeCommand::Forget {
            volume_id,
            keystore,
        } => {
            let id = volume_id_arg(&volume_id)?;
            keystore.unlock()?.forget_volume(&id)?;
            println!("Forgot volume {}.", hex::encode(id));
            Ok(())
        }
    }
}

fn volume_id_arg(text: &str) -> anyhow::Result<[u8; 16]> {
    parse_volume_id(text).ok_or_else(|| {
        anyhow!("{text:?} is not a volume id (32 hex digits, as `qvol info` prints)")
    })
}

fn adopt(
    image: &std::path::Path,
    key: Option<&str>,
    accept_rollback: bool,
    args: &KeystoreArgs,
) -> anyhow::Result<()> {
    let _lock = ImageLock::acquire(image, false)?;
    let (_, header) = read_image_header(image)?;
    let keystore = args.unlock()?;
    let (slot, volume) = open_unrecorded(image, &header, Some(&keystore), &Unlock::Keystore, key)?;
    let key_id = keyslot::describe(&header.keyslots[slot])
        .ok()
        .and_then(|info| info.key_id)
        .ok_or_else(|| anyhow!("keyslot {slot} of {} names no key", image.display()))?;
    let point = volume.commit_point();
    let state = state_of(&point);
    let binding = if accept_rollback {
        keystore.adopt_volume_accepting_rollback(&header.volume_id, &key_id, &state)?
    } else {
        keystore.adopt_volume(&header.volume_id, &key_id, &state)?
    };
    println!(
        "Adopted volume {} ({}) for key {} of VM {} at generation {}.",
        hex::encode(header.volume_id),
        image.display(),
        binding.key_id,
        binding.vm,
        point.generation
    );
    Ok(())
}
