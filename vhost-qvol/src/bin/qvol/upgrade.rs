//! `qvol upgrade IMAGE`: converts a format-1 or format-2 image to format 3 in place,
//! crash-safely (FORMAT.md §3.1: only the header's version changes, through a staged
//! change), so that it gets version 3's guarantees (log records bound to their commit,
//! durable marks: docs/SECURITY.md). The image must not be served.

use std::path::PathBuf;

use anyhow::anyhow;
use vhost_qvol::open::{open_volume, read_image_header, Binding, OpenRequest};
use vhost_qvol::volume_disk::error_chain;

use crate::access::{busy_sentence, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// `qvol upgrade`
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The image.
    pub image: PathBuf,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// Runs `qvol upgrade`.
pub fn run(args: UpgradeArgs) -> anyhow::Result<()> {
    let image = &args.image;
    let (_, header) = read_image_header(image)?;
    let from = header.format_version;
    if from >= qvol_core::FORMAT_VERSION {
        println!(
            "{} already has format version {from}; nothing to do.",
            image.display()
        );
        return Ok(());
    }
    let unlock = args.unlock.unlock()?;
    let source = args.keystore.source();
    let binding = Binding::default();
    let opened = open_volume(&OpenRequest::new(image, &source, &unlock, &binding))
        .map_err(|e| busy_sentence(image, e))?;
    opened
        .volume
        .upgrade_format()
        .map_err(|e| anyhow!("cannot upgrade {}: {}", image.display(), error_chain(&e)))?;
    opened
        .volume
        .close()
        .map_err(|e| anyhow!("cannot close {}: {}", image.display(), error_chain(&e)))?;
    if let Some(recorder) = &opened.recorder {
        recorder.flush(std::time::Duration::from_secs(15));
    }
    let (_, after) = read_image_header(image)?;
    println!(
        "Upgraded {} from format version {from} to {}.",
        image.display(),
        after.format_version
    );
    Ok(())
}
