//! One writer per image: an open-file-description lock on the image, as QEMU locks its
//! images. A writer holds a write lock, a read-only user a read lock, so readers share and
//! a writer excludes everyone else. OFD locks (Linux `F_OFD_SETLK`) belong to the open
//! file, not to the process, so two opens in the same process conflict too, and the lock
//! goes away when the file is closed or the process dies (kill -9 included).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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
    file: File,
}

impl ImageLock {
    /// The locked file, opened for reading (and writing, for a write lock). Serving through
    /// a duplicate of this descriptor (same open file description, same lock) guarantees that
    /// the file served is the file locked, whatever is renamed over the path meanwhile.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Takes the write lock (`write`) or a shared read lock on `path`, without waiting.
    pub fn acquire(path: &Path, write: bool) -> Result<Self, LockError> {
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
            return Ok(Self { file });
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
