//! `qvol create IMAGE --size SIZE --key KEY_ID [--cipher SUITE] [--name NAME] [--compress
//! zstd[:LEVEL] [--compress-unit SIZE]]`: a new volume with a random volume key and volume
//! id, and one keyslot wrapping that key for the key's public key.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use qvol_core::{CipherSuite, CommitPoint, Compression, CreateOptions, Volume, VolumeKey};
use qvol_keys::{keyslot, Secret32, UnlockedKeystore};
use vhost_qvol::image;
use vhost_qvol::lock::ImageLock;
use vhost_qvol::open::{state_of, volume_id_hex};
use vhost_qvol::size::{format_size, parse_size};
use vhost_qvol::volume_disk::error_chain;

use crate::compress::CompressFlags;
use crate::keystore::KeystoreArgs;

/// `qvol create`
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The image to create (must not exist): a file, or `rbd:POOL/IMAGE` (the RBD image is
    /// created, thin).
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
    pub compress: CompressFlags,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// Removes the half-made image unless disarmed: a failed create leaves no file (or RBD
/// image) behind.
pub struct RemoveOnFailure<'a>(pub Option<&'a Path>);

impl Drop for RemoveOnFailure<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            image::remove(path);
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
    let compression = args.compress.compression()?;
    let image = &args.image;
    let name = match args.name {
        Some(name) => name,
        None => image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };

    let keystore = args.keys.unlock()?;
    let new = NewVolume::make(image, size, suite, &name, &args.key, &keystore, compression)?;
    let volume_id = new.volume_id;
    new.finish(&keystore)?;
    // "zstd level 3 in 16 KiB units, " (nothing for a volume without compression).
    let compressed = compression.map_or(String::new(), |c| {
        format!(
            "{} in {} units, ",
            vhost_qvol::compression::describe_level(c.level),
            format_size(4096 << c.unit_log2)
        )
    });
    println!(
        "Created {} ({name}): {}, {suite}, {compressed}volume id {}, keyslot 0 for key {}.",
        image.display(),
        format_size(size),
        volume_id_hex(&volume_id),
        args.key
    );
    Ok(())
}

/// A volume being made: the image is removed again unless [`NewVolume::finish`] runs.
pub struct NewVolume<'a> {
    /// The open volume (writable).
    pub volume: Arc<Volume>,
    /// Its random id.
    pub volume_id: [u8; 16],
    key_id: String,
    generation: u32,
    image: &'a Path,
    cleanup: RemoveOnFailure<'a>,
    _lock: Option<ImageLock>,
}

impl<'a> NewVolume<'a> {
    /// Creates `image` (which must not exist) with a random volume key and volume id and
    /// one keyslot for the current generation of `key_id`, and compression units when
    /// `compression` is given. Not yet recorded in the keystore.
    pub fn make(
        image: &'a Path,
        size: u64,
        suite: CipherSuite,
        name: &str,
        key_id: &str,
        keystore: &UnlockedKeystore,
        compression: Option<Compression>,
    ) -> anyhow::Result<Self> {
        // An RBD image's existence is for the cluster to say (its creation refuses one).
        if !image::is_rbd(image) && fs::symlink_metadata(image).is_ok() {
            bail!(
                "{} already exists; refusing to overwrite it",
                image.display()
            );
        }
        let public = keystore.public_key(key_id).with_context(|| {
            format!(
                "cannot use key {key_id} of keystore {}",
                keystore.dir().display()
            )
        })?;
        let mut volume_id = [0u8; 16];
        getrandom::getrandom(&mut volume_id)
            .map_err(|e| anyhow!("the operating system's random number generator failed: {e}"))?;
        let volume_key = VolumeKey::generate();
        let slot = keyslot::wrap_for_recipient(
            &public,
            key_id,
            &volume_id,
            &Secret32::from_bytes(*volume_key.expose()),
        )
        .context("cannot wrap the volume key")?;
        let storage = image::create_new(image)?;
        let cleanup = RemoveOnFailure(Some(image));
        // An RBD image is locked by its storage already.
        let lock = if image::is_rbd(image) {
            None
        } else {
            Some(ImageLock::acquire(image, true)?)
        };
        let opts = CreateOptions {
            key_epoch: 0,
            size,
            suite,
            name: name.to_string(),
            volume_id,
            keyslots: vec![slot],
            compression,
        };
        let volume = Volume::create(storage, opts, &volume_key).map_err(|e| {
            anyhow!(
                "cannot create the volume {}: {}",
                image.display(),
                error_chain(&e)
            )
        })?;
        Ok(NewVolume {
            volume: Arc::new(volume),
            volume_id,
            key_id: key_id.to_string(),
            generation: public.generation(),
            image,
            cleanup,
            _lock: lock,
        })
    }

    /// Commits the volume (durable on return), then records it in the keystore (bound to
    /// its key and VM, at that state), so that vhost-qvol serves it; the image stays. Every
    /// other holder of the volume must be done with it.
    pub fn finish(mut self, keystore: &UnlockedKeystore) -> anyhow::Result<CommitPoint> {
        let image = self.image;
        let closing = |e: qvol_core::Error| {
            anyhow!(
                "cannot close the new volume {}: {}",
                image.display(),
                error_chain(&e)
            )
        };
        self.volume.commit().map_err(closing)?;
        let point = self.volume.commit_point();
        // The keystore binds the volume to the key (and its VM) and remembers its state, so
        // that another image at a daemon's path, or an older copy put back, is refused.
        keystore
            .register_volume(&self.volume_id, &self.key_id, &state_of(&point))
            .with_context(|| {
                format!(
                    "cannot record the volume {} in keystore {}",
                    image.display(),
                    keystore.dir().display()
                )
            })?;
        // The generation the slot was wrapped for (the key may have rotated meanwhile).
        keystore
            .record_volume_wraps(&self.volume_id, &[self.generation])
            .with_context(|| format!("cannot record volume {} in the keystore", image.display()))?;
        self.cleanup.0 = None;
        Ok(point)
    }
}
