//! Where an image lives: a file, or an RBD image named `rbd:POOL/IMAGE` or
//! `rbd:POOL/NAMESPACE/IMAGE` (`qvol-rbd`).
//!
//! The one place an image name becomes storage. Every command and the daemon take image
//! names as paths; a path that starts with `rbd:` is an RBD image of the cluster that
//! [`set_rbd_settings`] names (`--ceph-conf`, `--ceph-id`, `--break-lock`: one cluster per
//! process, set once by `main` before anything is opened).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Context};
use qvol_core::storage::{FileStorage, Storage};
use qvol_rbd::{CephOptions, RbdImage, RbdName};

static SETTINGS: OnceLock<RbdSettings> = OnceLock::new();

/// How this process reaches `rbd:` images.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdSettings {
    /// The cluster and the client id.
    pub ceph: CephOptions,
    /// Break a dead holder's exclusive lock when opening for writing
    /// ([`crate::lock::ImageLock::acquire`]).
    pub break_lock: bool,
}

/// The flags that name the Ceph cluster, shared by `vhost-qvol` and every `qvol` command.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CephArgs {
    /// The Ceph configuration file of `rbd:` images [default: $CEPH_CONF, then
    /// /etc/ceph/ceph.conf].
    #[arg(long, value_name = "FILE", global = true)]
    pub ceph_conf: Option<std::path::PathBuf>,
    /// The Ceph client id (`client.NAME`) for `rbd:` images [default: admin].
    #[arg(long, value_name = "NAME", global = true)]
    pub ceph_id: Option<String>,
    /// For an `rbd:` image whose exclusive lock a dead client still holds (a daemon killed,
    /// a host lost): break that lock (Ceph blocklists the holder, so it can write no more)
    /// and take the image over.
    #[arg(long, global = true)]
    pub break_lock: bool,
}

impl From<CephArgs> for RbdSettings {
    fn from(args: CephArgs) -> Self {
        RbdSettings {
            ceph: CephOptions {
                conf: args.ceph_conf,
                id: args.ceph_id,
            },
            break_lock: args.break_lock,
        }
    }
}

/// Sets how `rbd:` images are reached (the first call wins; without one, Ceph's defaults
/// and no lock breaking).
pub fn set_rbd_settings(settings: RbdSettings) {
    let _ = SETTINGS.set(settings);
}

/// The Ceph options [`set_rbd_settings`] set, or Ceph's defaults.
pub fn ceph_options() -> CephOptions {
    SETTINGS.get().map(|s| s.ceph.clone()).unwrap_or_default()
}

/// Whether `--break-lock` was given.
pub fn break_lock() -> bool {
    SETTINGS.get().is_some_and(|s| s.break_lock)
}

/// The RBD image `path` names (`None`: a file path); a malformed `rbd:` name is an error.
pub fn rbd_name(path: &Path) -> anyhow::Result<Option<RbdName>> {
    RbdName::from_path(path).transpose().map_err(|e| anyhow!(e))
}

/// Whether `path` names an RBD image.
pub fn is_rbd(path: &Path) -> bool {
    RbdName::from_path(path).is_some()
}

/// The addresses (`IP:PORT/NONCE`) of the Ceph clients holding the lock of the RBD image
/// `path` names, found through a read-only open; empty when nobody holds it, or for a file.
pub fn rbd_lock_holders(path: &Path) -> anyhow::Result<Vec<String>> {
    let Some(name) = rbd_name(path)? else {
        return Ok(Vec::new());
    };
    let what = || format!("cannot list the lock holders of {name}");
    let image = RbdImage::open(&ceph_options(), &name, false).with_context(what)?;
    image.lock_holders().with_context(what)
}

/// Whether the image `path` names exists (an RBD image: asked of its cluster).
pub fn exists(path: &Path) -> anyhow::Result<bool> {
    let Some(name) = rbd_name(path)? else {
        return Ok(path.exists());
    };
    RbdImage::exists(&ceph_options(), &name).with_context(|| format!("cannot open {name}"))
}

/// Opens the image `path` names read-only: no lock (an RBD image is opened with
/// `rbd_open_read_only`, which neither takes nor breaks its exclusive lock), and every write
/// to the storage is refused.
pub fn open_read_only(path: &Path) -> anyhow::Result<Arc<dyn Storage>> {
    let what = || format!("cannot open the image {}", path.display());
    Ok(match rbd_name(path)? {
        Some(name) => Arc::new(RbdImage::open(&ceph_options(), &name, false).with_context(what)?),
        None => Arc::new(FileStorage::open(path, false).with_context(what)?),
    })
}

/// Creates the image `path` names, empty; fails if it exists. An RBD image is created thin
/// and opened writable with its exclusive lock (returned as the storage: the lock lasts as
/// long as it); a file is created and left for [`crate::lock::ImageLock`] to lock.
pub fn create_new(path: &Path) -> anyhow::Result<Arc<dyn Storage>> {
    let what = || format!("cannot create {}", path.display());
    Ok(match rbd_name(path)? {
        Some(name) => {
            let options = ceph_options();
            RbdImage::create(&options, &name).with_context(what)?;
            let image = RbdImage::open(&options, &name, true).with_context(what)?;
            image.lock_exclusive().with_context(what)?;
            Arc::new(image)
        }
        None => Arc::new(FileStorage::create_new(path).with_context(what)?),
    })
}

/// Removes the image `path` names (a creation that failed half-way); best effort.
pub fn remove(path: &Path) {
    let result = match rbd_name(path) {
        Ok(Some(name)) => RbdImage::remove(&ceph_options(), &name),
        Ok(None) => std::fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(e) = result {
        log::debug!("cannot remove {}: {e}", path.display());
    }
}
