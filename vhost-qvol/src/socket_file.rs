//! Unix sockets that appear at their path already listening, mode 0600, never over a file
//! that is not a stale socket: for the NBD server and the daemon's control socket.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Listens on `path` (mode 0600), refusing a path held by anything but a stale socket.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    refuse_taken(path)?;
    listen_private(path)
}

/// A bind failure, naming the socket: "cannot listen on PATH", with the cause as source.
#[derive(Debug)]
struct BindError {
    path: PathBuf,
    source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}", self.path.display())
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

pub fn bind_error(path: &Path, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        BindError {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// Refuses a path held by something that is not a stale socket.
fn refuse_taken(path: &Path) -> io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is a socket another server is listening on; refusing to replace it",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Binds under a private directory (0700) beside `path`, sets the socket's mode to 0600,
/// and renames it into place: nobody can connect while it still has the umask's mode, and
/// a client that sees the path can connect at once.
fn listen_private(path: &Path) -> io::Result<UnixListener> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut salt = [0u8; 8];
    getrandom::getrandom(&mut salt).map_err(|e| bind_error(path, io::Error::other(e)))?;
    let dir = parent.join(format!(
        ".qvol-sock.{}.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        hex::encode(salt)
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| bind_error(path, e))?;
    let tmp = dir.join("s");
    let result = UnixListener::bind(&tmp).and_then(|listener| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp, path)?;
        Ok(listener)
    });
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_dir(&dir);
    result.map_err(|e| bind_error(path, e))
}
