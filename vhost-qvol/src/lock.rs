//! One writer per image: an open-file-description lock on the image, as QEMU locks its
//! images. A writer holds a write lock, a read-only user a read lock, so readers share and
//! a writer excludes everyone else. OFD locks (Linux `F_OFD_SETLK`) belong to the open
//! file, not to the process, so two opens in the same process conflict too, and the lock
//! goes away when the file is closed or the process dies (kill -9 included).
//!
//! An RBD image (`rbd:POOL/IMAGE`) is locked with RBD's exclusive lock instead, which every
//! host sharing the cluster sees (`qvol_rbd::RbdImage::lock_exclusive`); a read-only user
//! takes no lock there (RBD has no shared lock that excludes a writer).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qvol_core::storage::{FileStorage, Storage};
use qvol_rbd::RbdImage;

use crate::image;

/// The byte locked. QEMU uses bytes 100+ and 200+ of raw images; we stay clear of them.
const LOCK_BYTE: i64 = 0;

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Someone else holds a conflicting lock.
    #[error("{} is in use by another process (another vhost-qvol or qvol has it open{})",
        path.display(), if *write { "" } else { " for writing" })]
    Busy {
        /// The image.
        path: PathBuf,
        /// Whether a write lock was asked for.
        write: bool,
    },
    /// The RBD image could not be opened or locked (the message names the holder of a
    /// lock held elsewhere).
    #[error(transparent)]
    Rbd(io::Error),
    /// The file could not be opened or locked.
    #[error("cannot lock {}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct ImageLock {
    held: Held,
}

#[derive(Debug)]
enum Held {
    File(File),
    Rbd(Arc<RbdImage>),
}

impl ImageLock {
    /// The locked image as storage. For a file: a duplicate of the locked descriptor (same
    /// open file description, same lock), so the file served is the file locked, whatever
    /// is renamed over the path meanwhile. For an RBD image: the handle holding the lock.
    pub fn storage(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        Ok(match &self.held {
            Held::File(file) => Arc::new(FileStorage::from_file(file.try_clone()?, path)),
            Held::Rbd(image) => Arc::clone(image) as Arc<dyn Storage>,
        })
    }

    /// Closes an RBD image before the process exits without dropping everything that
    /// holds it (nothing may use the image after): its exclusive lock and its watch go at
    /// once, instead of lingering until the cluster notices the holder is gone (about 30 s,
    /// during which every other client's lock request waits on it). A file's lock goes with
    /// the process anyway.
    pub fn close(&self) {
        if let Held::Rbd(image) = &self.held {
            if let Err(e) = image.close() {
                log::warn!("{e}");
            }
        }
    }

    /// Takes the write lock (`write`) or a shared read lock on `path`, without waiting.
    ///
    /// For an RBD image, with `--break-lock` ([`image::break_lock`]), another holder's
    /// exclusive lock is broken first: the holder is blocklisted, so one that is not dead
    /// after all can write no more. (A file's lock dies with its holder and needs no
    /// breaking.)
    pub fn acquire(path: &Path, write: bool) -> Result<Self, LockError> {
        match image::rbd_name(path) {
            Ok(None) => Self::acquire_file(path, write),
            Ok(Some(name)) => {
                let rbd = LockError::Rbd;
                let img = RbdImage::open(&image::ceph_options(), &name, write).map_err(rbd)?;
                if write {
                    if image::break_lock() {
                        for owner in img.break_lock().map_err(rbd)? {
                            log::warn!("broke {owner}'s exclusive lock of {name}");
                        }
                    }
                    img.lock_exclusive().map_err(rbd)?;
                }
                Ok(Self {
                    held: Held::Rbd(Arc::new(img)),
                })
            }
            Err(e) => Err(LockError::Rbd(io::Error::new(
                io::ErrorKind::InvalidInput,
                e.to_string(),
            ))),
        }
    }

    fn acquire_file(path: &Path, write: bool) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = LOCK_BYTE;
        fl.l_len = 1;
        // l_pid must be 0 for OFD locks (fcntl(2)); zeroed above.
        // SAFETY: the descriptor is open for the lifetime of `file`, and `fl` is a valid,
        // initialised flock that fcntl only reads for F_OFD_SETLK.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(Self {
                held: Held::File(file),
            });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::Busy {
                path: path.to_path_buf(),
                write,
            }),
            _ => Err(io_err(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let first = ImageLock::acquire(&path, true).unwrap();
        let err = ImageLock::acquire(&path, true).unwrap_err();
        assert!(matches!(err, LockError::Busy { write: true, .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"));
        assert!(ImageLock::acquire(&path, false).is_err());
        drop(first);
        let _again = ImageLock::acquire(&path, true).unwrap();
    }

    #[test]
    fn readers_share_and_exclude_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let _r1 = ImageLock::acquire(&path, false).unwrap();
        let _r2 = ImageLock::acquire(&path, false).unwrap();
        assert!(matches!(
            ImageLock::acquire(&path, true),
            Err(LockError::Busy { .. })
        ));
    }
}
