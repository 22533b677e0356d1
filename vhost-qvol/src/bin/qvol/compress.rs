//! `qvol compress IMAGE zstd[:LEVEL]|off [--json]`: sets the zstd level of a volume's new
//! writes, or turns compression of new writes off (docs/FORMAT.md §18). What was written
//! before stays as it is, readable either way. Only a volume created with compression units
//! (`qvol create --compress`) can compress: their size is fixed at create. The image must
//! not be served. Also the `--compress` and `--compress-unit` flags of `qvol create`.
//!
//! Every refusal (a bad setting, a volume without units) comes before the image is opened
//! for writing, so that it leaves the image byte for byte as it was.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use qvol_core::Compression;
use serde_json::json;
use vhost_qvol::compression::{describe_level, parse_setting, parse_unit};
use vhost_qvol::open::{open_volume, read_image_header, Binding, OpenRequest};
use vhost_qvol::size::format_size;
use vhost_qvol::volume_disk::error_chain;

use crate::access::{is_busy, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// `qvol compress`
#[derive(Debug, clap::Args)]
pub struct CompressArgs {
    /// The image (created with `qvol create --compress`).
    pub image: PathBuf,
    /// `zstd` (level 3), `zstd:LEVEL` (-7 to -1 for zstd's fast levels, 1 to 22), or `off`.
    #[arg(value_name = "zstd[:LEVEL]|off")]
    pub setting: String,
    /// Print one JSON object: `{"image": PATH, "compress_level": N|null, "previous_level":
    /// N|null, "compression_unit_bytes": N}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// The compression flags of `qvol create`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CompressFlags {
    /// Compress new writes with zstd: `zstd` (level 3) or `zstd:LEVEL` (-7 to -1 for zstd's
    /// fast levels, 1 to 22); `qvol compress` changes the level later. `off` (the default)
    /// makes a volume without compression units, which can never compress.
    #[arg(long, value_name = "zstd[:LEVEL]|off")]
    pub compress: Option<String>,
    /// With --compress: the compression unit, fixed at create: 8K, 16K, 32K or 64K
    /// [default: 16K]. Larger units compress better and cost more to rewrite in part.
    #[arg(long, value_name = "SIZE")]
    pub compress_unit: Option<String>,
}

impl CompressFlags {
    /// The compression to create the volume with (`None`: no compression units).
    pub fn compression(&self) -> anyhow::Result<Option<Compression>> {
        let level = match &self.compress {
            Some(text) => parse_setting(text).map_err(|e| anyhow!(e))?,
            None => None,
        };
        let Some(level) = level else {
            if let Some(unit) = &self.compress_unit {
                bail!(
                    "--compress-unit {unit} needs --compress zstd[:LEVEL] (a volume created \
                     without compression has no units)"
                );
            }
            return Ok(None);
        };
        let unit_log2 = match &self.compress_unit {
            Some(text) => parse_unit(text).map_err(|e| anyhow!(e))?,
            None => Compression::DEFAULT_UNIT_LOG2,
        };
        let compression = Compression {
            unit_log2,
            level: Some(level),
        }
        .check()
        .map_err(|e| anyhow!(error_chain(&e)))?;
        Ok(Some(compression))
    }
}

/// Runs `qvol compress`.
pub fn run(args: CompressArgs) -> anyhow::Result<()> {
    let image = &args.image;
    let level = parse_setting(&args.setting).map_err(|e| anyhow!("{e}; nothing was changed"))?;
    let (_, header) = read_image_header(image)?;
    if header.unit_bytes == 0 {
        bail!(
            "{} was created without compression units (they are made by `qvol create \
             --compress`), so its compression cannot be changed; nothing was changed",
            image.display()
        );
    }
    let unlock = args.unlock.unlock()?;
    let source = args.keystore.source();
    let binding = Binding::default();
    let opened = open_volume(&OpenRequest::new(image, &source, &unlock, &binding))
        .map_err(|e| in_use(image, e))?;
    let previous = opened.volume.compress_level();
    opened.volume.set_compression(level).map_err(|e| {
        anyhow!(
            "cannot set the compression of {}: {}",
            image.display(),
            error_chain(&e)
        )
    })?;
    let unit_bytes = opened.volume.info().unit_bytes;
    crate::snapshot::close(image, opened)?;
    if args.json {
        println!(
            "{}",
            json!({"image": image.display().to_string(), "compress_level": level,
                   "previous_level": previous, "compression_unit_bytes": unit_bytes})
        );
        return Ok(());
    }
    println!(
        "Compression of new writes to {}: {} (was {}), in {} units.",
        image.display(),
        describe_level(level),
        describe_level(previous),
        format_size(u64::from(unit_bytes))
    );
    Ok(())
}

/// The sentence for an image a daemon (or another qvol) holds: the daemon's control socket
/// takes no compression change, so it has to stop.
fn in_use(image: &Path, e: anyhow::Error) -> anyhow::Error {
    if is_busy(&e) {
        anyhow!(
            "{} is in use (served by a vhost-qvol, or open in another qvol): stop it, then run \
             this again; nothing was changed",
            image.display()
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(compress: Option<&str>, unit: Option<&str>) -> anyhow::Result<Option<Compression>> {
        CompressFlags {
            compress: compress.map(str::to_string),
            compress_unit: unit.map(str::to_string),
        }
        .compression()
    }

    #[test]
    fn create_flags_make_units_only_with_compression() {
        assert_eq!(flags(None, None).unwrap(), None);
        assert_eq!(flags(Some("off"), None).unwrap(), None);
        let c = flags(Some("zstd"), None).unwrap().unwrap();
        assert_eq!(c.unit_log2, Compression::DEFAULT_UNIT_LOG2);
        assert_eq!(c.level, Some(Compression::DEFAULT_LEVEL));
        let c = flags(Some("zstd:-3"), Some("64K")).unwrap().unwrap();
        assert_eq!((c.unit_log2, c.level), (4, Some(-3)));
        for (compress, unit, needle) in [
            (None, Some("16K"), "needs --compress"),
            (Some("off"), Some("8K"), "needs --compress"),
            (
                Some("zstd"),
                Some("4K"),
                "a compression unit is 8K, 16K, 32K or 64K",
            ),
            (Some("lz4"), None, "unknown compression \"lz4\""),
            (Some("zstd:0"), None, "zstd levels are"),
        ] {
            let e = flags(compress, unit).expect_err(needle).to_string();
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
    }
}
