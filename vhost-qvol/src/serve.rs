//! Accepting frontends: one listening socket for the life of the process, and for each
//! connection a fresh `VhostUserDaemon` (the daemon object serves one connection). When
//! the frontend goes away (QEMU stops, restarts, or reconnects with `reconnect=`), commit
//! what was written and wait for the next one.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, Device};

/// Where frontends connect: a path we bind, or a listening socket we inherit (the
/// vhost-user backend conventions: `--socket-path` xor `--fd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Bind a Unix socket at this path (an existing socket file there is replaced).
    Path(PathBuf),
    /// An already listening Unix socket passed by the parent.
    Fd(RawFd),
}

/// Errors that end serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The socket could not be created.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: VhostUserError,
    },
    /// `--fd` is not a listening Unix socket.
    #[error("file descriptor {fd} is not a listening Unix socket")]
    NotASocket {
        /// The descriptor.
        fd: RawFd,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A path exists and is not a socket: refuse to delete it.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    PathTaken(PathBuf),
    /// The vhost-user daemon failed outside a connection.
    // vhost_user_backend::Error is neither std::error::Error nor Sync: keep its text.
    #[error("the vhost-user daemon failed: {0}")]
    Daemon(String),
}

/// Opens the listening socket.
pub fn listen(source: &SocketSource) -> Result<Listener, ServeError> {
    match source {
        SocketSource::Path(path) => {
            refuse_non_socket(path)?;
            listen_atomically(path)
        }
        SocketSource::Fd(fd) => listener_from_fd(*fd),
    }
}

/// Binds and listens under a temporary name in the same directory, then renames the
/// socket into place: a client that sees the path can connect at once (binding in place
/// leaves a moment between bind and listen where a connect is refused).
fn listen_atomically(path: &Path) -> Result<Listener, ServeError> {
    let bind_error = |source: io::Error| ServeError::Bind {
        path: path.to_path_buf(),
        source: VhostUserError::SocketError(source),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_error)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(bind_error(e));
    }
    Ok(Listener::from(listener))
}

fn refuse_non_socket(path: &Path) -> Result<(), ServeError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(ServeError::PathTaken(path.into())),
        _ => Ok(()),
    }
}

fn listener_from_fd(fd: RawFd) -> Result<Listener, ServeError> {
    let not_socket = |source| ServeError::NotASocket { fd, source };
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt only writes `len` bytes into `accepting`, a valid c_int; a bad
    // or non-socket fd makes it fail with EBADF/ENOTSOCK, nothing else.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(not_socket(io::Error::last_os_error()));
    }
    if accepting == 0 {
        return Err(not_socket(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket is not listening",
        )));
    }
    // SAFETY: the fd was handed to us by the parent for this purpose (--fd), is a
    // listening socket (checked above), and nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Listener::from(UnixListener::from(owned)))
}

/// Serves `device` to one frontend after another, forever (shutdown is by signal, see
/// `signals.rs`). Returns only if accepting connections fails.
pub fn serve(listener: &mut Listener, device: &Arc<Device>) -> Result<(), ServeError> {
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(Arc::clone(device), mem.clone()));
        let mut daemon = VhostUserDaemon::new("vhost-qvol".to_string(), backend, mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!("connection ended: {e}"),
        }
        // Dropping the daemon stops and joins this connection's queue threads.
        drop(daemon);
        if let Err(e) = device.disk().commit() {
            error!("cannot commit after the frontend left: {e}");
        }
    }
}
