//! `qvol create IMAGE --size SIZE --key KEY_ID [--cipher SUITE] [--name NAME]`: a new
//! volume with a random volume key and volume id, and one keyslot wrapping that key for
//! the key's public key.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use qvol_core::storage::FileStorage;
use qvol_core::{CipherSuite, CreateOptions, Volume, VolumeKey};
use qvol_keys::{keyslot, Secret32};
use vhost_qvol::lock::ImageLock;
use vhost_qvol::open::{state_of, volume_id_hex, KeySource};
use vhost_qvol::size::{format_size, parse_size};
use vhost_qvol::volume_disk::error_chain;

use crate::keystore::KeystoreArgs;

/// `qvol create`
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The image file to create (must not exist).
    pub image: PathBuf,
    /// Virtual disk size: bytes, or with a K, M, G or T suffix (powers of 1024).
    #[arg(long, value_name = "SIZE")]
    pub size: String,
    /// The keystore key whose public key gets the volume's first keyslot.
    #[arg(long, value_name = "KEY_ID")]
    pub key: String,
    /// Cipher suite of the data blocks.
    #[arg(long, value_name = "SUITE", default_value = "xchacha20-poly1305",
          value_parser = ["xchacha20-poly1305", "aegis-256"])]
    pub cipher: String,
    /// A name for the volume [default: the image's file name without extension].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// Removes the half-made image unless disarmed: a failed create leaves no file behind.
struct RemoveOnFailure<'a>(Option<&'a Path>);

impl Drop for RemoveOnFailure<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// Runs `qvol create`.
pub fn run(args: CreateArgs) -> anyhow::Result<()> {
    let size = parse_size(&args.size).map_err(|e| anyhow!(e))?;
    if size == 0 || size % 4096 != 0 {
        bail!("the size must be a non-zero multiple of 4 KiB, not {size} bytes");
    }
    let suite: CipherSuite = args
        .cipher
        .parse()
        .map_err(|e| anyhow!("unknown cipher suite {}: {e}", args.cipher))?;
    let image = &args.image;
    if fs::symlink_metadata(image).is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it",
            image.display()
        );
    }
    let name = match args.name {
        Some(name) => name,
        None => image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };

    let keys = KeySource::from_flags(
        args.keys.keystore.as_deref(),
        args.keys.passphrase_file.as_deref(),
    );
    let keystore = keys.unlock()?;
    let public = keystore.public_key(&args.key).with_context(|| {
        format!(
            "cannot use key {} of keystore {}",
            args.key,
            keystore.dir().display()
        )
    })?;
    let mut volume_id = [0u8; 16];
    getrandom::getrandom(&mut volume_id)
        .map_err(|e| anyhow!("the operating system's random number generator failed: {e}"))?;
    let volume_key = VolumeKey::generate();
    let slot = keyslot::wrap_for_recipient(
        &public,
        &args.key,
        &volume_id,
        &Secret32::from_bytes(*volume_key.expose()),
    )
    .context("cannot wrap the volume key")?;

    let storage = FileStorage::create_new(image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    let mut cleanup = RemoveOnFailure(Some(image));
    let _lock = ImageLock::acquire(image, true)?;
    let opts = CreateOptions {
        size,
        suite,
        name: name.clone(),
        volume_id,
        keyslots: vec![slot],
    };
    let volume = Volume::create(Arc::new(storage), opts, &volume_key).map_err(|e| {
        anyhow!(
            "cannot create the volume {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    // The keystore binds the volume to the key (and its VM) and remembers its state, so
    // that another image at a daemon's path, or an older copy put back, is refused.
    keystore
        .register_volume(&volume_id, &args.key, &state_of(&volume.commit_point()))
        .with_context(|| {
            format!(
                "cannot record the volume {} in keystore {}",
                image.display(),
                keystore.dir().display()
            )
        })?;
    // The generation the slot was wrapped for (the key may have rotated meanwhile).
    keystore
        .record_volume_wraps(&volume_id, &[public.generation()])
        .with_context(|| format!("cannot record volume {} in the keystore", image.display()))?;
    volume.close().map_err(|e| {
        anyhow!(
            "cannot close the new volume {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    cleanup.0 = None;
    println!(
        "Created {} ({name}): {}, {suite}, volume id {}, keyslot 0 for key {}.",
        image.display(),
        format_size(size),
        volume_id_hex(&volume_id),
        args.key
    );
    Ok(())
}
