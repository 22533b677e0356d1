//! `qvol volume adopt|forget`: the keystore's volume records. A record binds a volume id to
//! the key (and VM) that may open it and remembers the volume's last committed state; a
//! daemon refuses a volume without one. `qvol create` writes it; `adopt` writes it for an
//! image brought from another host (after `qvol key import`); `forget` drops it once the
//! image is gone.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use qvol_core::storage::FileStorage;
use qvol_core::Volume;
use qvol_keys::keyslot;
use vhost_qvol::lock::ImageLock;
use vhost_qvol::open::{parse_volume_id, read_image_header, state_of, unwrap_volume_key};
use vhost_qvol::volume_disk::error_chain;

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
            keystore,
        } => adopt(&image, key.as_deref(), &keystore),
        VolumeCommand::Forget {
            volume_id,
            keystore,
        } => {
            let id = parse_volume_id(&volume_id).ok_or_else(|| {
                anyhow!("{volume_id:?} is not a volume id (32 hex digits, as `qvol info` prints)")
            })?;
            keystore.unlock()?.forget_volume(&id)?;
            println!("Forgot volume {}.", hex::encode(id));
            Ok(())
        }
    }
}

fn adopt(image: &std::path::Path, key: Option<&str>, args: &KeystoreArgs) -> anyhow::Result<()> {
    let _lock = ImageLock::acquire(image, false)?;
    let (_, header) = read_image_header(image)?;
    let keystore = args.unlock()?;
    let (slot, volume_key) = unwrap_volume_key(image, &header, &keystore, key)?;
    let key_id = keyslot::describe(&header.keyslots[slot])
        .ok()
        .and_then(|info| info.key_id)
        .ok_or_else(|| anyhow!("keyslot {slot} of {} names no key", image.display()))?;
    let storage = FileStorage::open(image, false)
        .with_context(|| format!("cannot open the image {}", image.display()))?;
    // Read-only: the state is read, nothing is written to the image.
    let volume = Volume::open(Arc::new(storage), &volume_key, true).map_err(|e| {
        anyhow!(
            "cannot open the volume {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    let point = volume.commit_point();
    let binding = keystore.adopt_volume(&header.volume_id, &key_id, &state_of(&point))?;
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
