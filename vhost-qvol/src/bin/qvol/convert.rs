//! `qvol import SRC DEST.qvol` and `qvol export IMAGE DEST`: copies between a qvol volume and
//! any format `qemu-img` knows (qcow2, vmdk, vdi, vhdx, raw, LUKS...). qemu-img does the
//! format work and reaches the volume through qvol's NBD server on a private socket, so
//! holes and zero ranges stay unallocated both ways, and the copy is compared byte for byte
//! at the end (`--no-verify` skips it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use qvol_core::CipherSuite;
use serde_json::json;
use vhost_qvol::disk::Disk;
use vhost_qvol::nbd::{NbdHandle, NbdOptions, NbdServer};
use vhost_qvol::open::{open_volume, volume_id_hex, Binding, OpenRequest};
use vhost_qvol::size::format_size;

use crate::access::UnlockArgs;
use crate::create::NewVolume;
use crate::keystore::KeystoreArgs;
use crate::qemu_img::{self, Source};

/// `qvol import`
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The image to read (any format qemu-img reads).
    pub source: PathBuf,
    /// The qvol image to create (must not exist).
    pub dest: PathBuf,
    /// The keystore key that gets the new volume's first keyslot.
    #[arg(long, value_name = "KEY_ID")]
    pub key: String,
    /// The source's format [default: probed by qemu-img; give it for raw files].
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,
    /// For a LUKS source (`--format luks`): the file holding its passphrase.
    #[arg(long, value_name = "FILE")]
    pub source_passphrase_file: Option<PathBuf>,
    /// Cipher suite of the data blocks.
    #[arg(long, value_name = "SUITE", default_value = "xchacha20-poly1305",
          value_parser = ["xchacha20-poly1305", "aegis-256"])]
    pub cipher: String,
    /// A name for the volume [default: DEST's file name without extension].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Skip the byte-for-byte comparison with the source at the end.
    #[arg(long)]
    pub no_verify: bool,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compress: crate::compress::CompressFlags,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// `qvol export`
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The qvol image to read.
    pub image: PathBuf,
    /// The file to write (must not exist).
    pub dest: PathBuf,
    /// Output format (any qemu-img writes: raw, qcow2, vmdk, vdi, vhdx...).
    #[arg(
        short = 'O',
        long = "output-format",
        value_name = "FMT",
        default_value = "raw"
    )]
    pub format: String,
    /// Skip the byte-for-byte comparison with the volume at the end.
    #[arg(long)]
    pub no_verify: bool,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// An NBD server on a private socket, for qemu-img; stopped on drop if not shut down.
struct Bridge {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    handle: Option<NbdHandle>,
}

impl Bridge {
    fn start(disk: Arc<dyn Disk>, read_only: bool) -> anyhow::Result<Bridge> {
        let dir = tempfile::Builder::new()
            .prefix("qvol-nbd-")
            .tempdir()
            .context("cannot make a private directory for the NBD socket")?;
        let socket = dir.path().join("nbd.sock");
        let opts = NbdOptions {
            read_only,
            export_name: String::new(),
            description: "qvol import/export".into(),
        };
        let handle = NbdServer::bind(&socket, disk, opts)
            .and_then(NbdServer::spawn)
            .context("cannot start the NBD server for qemu-img")?;
        Ok(Bridge {
            _dir: dir,
            socket,
            handle: Some(handle),
        })
    }

    fn uri(&self) -> anyhow::Result<String> {
        qemu_img::nbd_uri(&self.socket)
    }

    /// Ends the connections and flushes the volume.
    fn stop(mut self) -> anyhow::Result<()> {
        match self.handle.take() {
            Some(h) => h
                .shutdown()
                .map_err(|e| anyhow!("the NBD server did not stop cleanly: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.shutdown();
        }
    }
}

/// The image [`import_image`] makes: where, its cipher suite and its compression.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The qvol image to create (must not exist).
    pub path: &'a Path,
    /// Its data blocks' cipher suite.
    pub suite: CipherSuite,
    /// Its compression units (`None`: none).
    pub compression: Option<qvol_core::Compression>,
}

/// What [`import_image`] made.
#[derive(Debug)]
pub struct Imported {
    /// What qemu-img said about the source.
    pub source: qemu_img::ImageInfo,
    /// The new volume's id.
    pub volume_id: [u8; 16],
    /// Its size (the source's, rounded up to 4 KiB).
    pub size: u64,
    /// Bytes of data blocks and nodes it holds.
    pub allocated: u64,
}

/// Creates `dest` for `key_id` and copies `source` into it through qemu-img, skipping holes
/// and zeros; compares it byte for byte unless `!verify`; then records it in `keystore`.
/// On any failure `dest` is removed and the keystore is left as it was.
pub fn import_image(
    source: &Source,
    dest: &Target<'_>,
    key_id: &str,
    name: &str,
    keystore: &qvol_keys::UnlockedKeystore,
    verify: bool,
) -> anyhow::Result<Imported> {
    let Target {
        path: dest,
        suite,
        compression,
    } = *dest;
    let info = qemu_img::info(source)?;
    if info.virtual_size == 0 {
        bail!("{} is empty (virtual size 0)", source.path.display());
    }
    // A volume is whole 4 KiB blocks: a tail rounds up (and reads as zeros).
    let size = info.virtual_size.div_ceil(4096) * 4096;
    let new = NewVolume::make(dest, size, suite, name, key_id, keystore, compression)?;
    let bridge = Bridge::start(new.volume.clone(), false)?;
    qemu_img::convert_into(source, &bridge.uri()?)?;
    qvol_core::failpoint::hit("qvol:imported");
    if verify {
        qemu_img::compare(source, &bridge.socket)?;
    }
    bridge.stop()?;
    let allocated = new.volume.info().allocated_bytes;
    let volume_id = new.volume_id;
    new.finish(keystore)?;
    Ok(Imported {
        source: info,
        volume_id,
        size,
        allocated,
    })
}

/// Compares the recorded volume `image` (opened read-only with `keystore`) with `source`
/// byte for byte; returns what the keystore binds the volume to.
pub fn compare_volume(
    image: &Path,
    source: &Source,
    keystore: &qvol_keys::UnlockedKeystore,
) -> anyhow::Result<qvol_keys::VolumeBinding> {
    let keys = vhost_qvol::open::KeySource {
        keystore: Some(keystore.dir().to_path_buf()),
        ..Default::default()
    };
    let binding = Binding::default();
    let unlock = vhost_qvol::unlock::Unlock::Keystore;
    let opened = open_volume(&OpenRequest {
        read_only: true,
        keystore: Some(keystore),
        ..OpenRequest::new(image, &keys, &unlock, &binding)
    })?;
    let bound = opened
        .binding
        .clone()
        .ok_or_else(|| anyhow!("{} is not recorded in the keystore", image.display()))?;
    let volume: Arc<dyn Disk> = Arc::new(opened.volume);
    let bridge = Bridge::start(volume, true)?;
    qemu_img::compare(source, &bridge.socket)?;
    bridge.stop()?;
    Ok(bound)
}

/// Runs `qvol import`.
pub fn import(args: ImportArgs) -> anyhow::Result<()> {
    let suite: CipherSuite = args
        .cipher
        .parse()
        .map_err(|e| anyhow!("unknown cipher suite {}: {e}", args.cipher))?;
    let source = Source::new(
        args.source.clone(),
        args.format.clone(),
        args.source_passphrase_file.as_deref(),
    )?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.dest
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let compression = args.compress.compression()?;
    let keystore = args.keys.unlock()?;
    let target = Target {
        path: &args.dest,
        suite,
        compression,
    };
    let done = import_image(
        &source,
        &target,
        &args.key,
        &name,
        &keystore,
        !args.no_verify,
    )?;
    let verified = if args.no_verify {
        ", not verified (--no-verify)"
    } else {
        ", verified identical"
    };
    if args.json {
        println!(
            "{}",
            json!({"source": args.source.display().to_string(), "format": done.source.format,
                   "image": args.dest.display().to_string(), "volume_id": volume_id_hex(&done.volume_id),
                   "size": done.size, "allocated_bytes": done.allocated,
                   "source_actual_bytes": done.source.actual_size,
                   "key_id": args.key, "cipher": suite.name(), "verified": !args.no_verify})
        );
    } else {
        println!(
            "Imported {} ({}, {}) into {}: volume {}, {suite}, key {}; {} allocated{verified}.",
            args.source.display(),
            done.source.format,
            format_size(done.source.virtual_size),
            args.dest.display(),
            volume_id_hex(&done.volume_id),
            args.key,
            format_size(done.allocated),
        );
    }
    Ok(())
}

/// Runs `qvol export`.
pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(&args.dest).is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it",
            args.dest.display()
        );
    }
    let unlock = args.unlock.unlock()?;
    let source = args.keys.source();
    let binding = Binding::default();
    let opened = open_volume(&OpenRequest {
        read_only: true,
        allow_unrecorded: !unlock.is_keystore(),
        ..OpenRequest::new(&args.image, &source, &unlock, &binding)
    })?;
    let size = opened.volume.size();
    let id = opened.header.volume_id;
    let volume: Arc<dyn Disk> = Arc::new(opened.volume);
    let bridge = Bridge::start(volume, true)?;
    // The plaintext is written 0600 in a private directory beside DEST, then linked to DEST
    // (which fails rather than replace anything that appeared there meanwhile).
    let parent = args
        .dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = tempfile::Builder::new()
        .prefix(".qvol-export-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    let staging = private.path().join("export");
    qemu_img::convert_out(&bridge.uri()?, &staging, &args.format)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", staging.display()))?;
    let written = Source::new(staging.clone(), Some(args.format.clone()), None)?;
    if !args.no_verify {
        qemu_img::compare(&written, &bridge.socket)?;
    }
    bridge.stop()?;
    std::fs::hard_link(&staging, &args.dest)
        .with_context(|| format!("cannot create {} (it must not exist)", args.dest.display()))?;
    let on_disk = qemu_img::info(&written).map(|i| i.actual_size).unwrap_or(0);
    if args.json {
        println!(
            "{}",
            json!({"image": args.image.display().to_string(), "volume_id": volume_id_hex(&id),
                   "dest": args.dest.display().to_string(), "format": args.format, "size": size,
                   "dest_actual_bytes": on_disk, "verified": !args.no_verify})
        );
    } else {
        println!(
            "Exported {} (volume {}, {}) to {} ({}, {} on disk){}.",
            args.image.display(),
            volume_id_hex(&id),
            format_size(size),
            args.dest.display(),
            args.format,
            format_size(on_disk),
            if args.no_verify {
                ", not verified (--no-verify)"
            } else {
                ", verified identical"
            }
        );
    }
    Ok(())
}
