//! An NBD server over any [`Disk`], on a Unix socket: what lets every QEMU tool
//! (`qemu-img`, `qemu-io`), `nbdinfo` and `nbdcopy` work on a qvol disk. Nothing here knows
//! about keys or images; `qvol nbd` opens the volume and hands it over as a `Disk`.
//!
//! It follows the NBD protocol document (`doc/proto.md` of
//! <https://github.com/NetworkBlockDevice/nbd>; comments cite its sections): fixed newstyle
//! handshake (`handshake.rs`), simple and structured replies, block status for
//! `base:allocation` (`transmission.rs`), the byte layouts in one place (`proto.rs`). It is
//! synchronous: one thread accepts, one thread per client serves its requests in order.
//!
//! A writable export serves one client at a time (a second one is refused during option
//! haggling with `NBD_REP_ERR_POLICY` and [`BUSY`]); a read-only export serves many at once
//! (and says so with `NBD_FLAG_CAN_MULTI_CONN`). Whatever a client sends only ends its own
//! connection. docs/NBD.md describes what is supported.

mod handshake;
mod proto;
mod transmission;
mod wire;

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::disk::{Disk, DiskError};
use wire::{Wire, WireError};

/// What a second client of a writable export is told.
pub const BUSY: &str =
    "the export is in use by another client; qvol nbd serves one writer at a time";

/// How many clients may be connected at once; more are closed as they arrive.
const MAX_CONNECTIONS: usize = 64;

/// What is exported, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdOptions {
    /// Refuse writes (`NBD_FLAG_READ_ONLY`) and serve any number of clients at once.
    pub read_only: bool,
    /// The export's name (`NBD_OPT_LIST`, `NBD_INFO_NAME`). The empty name, the default
    /// export, always selects it too.
    pub export_name: String,
    /// A description for humans (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
}

/// A listening NBD server, not serving yet.
pub struct NbdServer {
    listener: UnixListener,
    path: PathBuf,
    socket_id: (u64, u64),
    export: Export,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("path", &self.path)
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Listens on `path` (a Unix socket, mode 0600; refuses to replace an existing non-socket
    /// file, or a socket another server listens on). The socket appears at `path` already
    /// listening and with its mode: it is bound in a private directory beside it and renamed
    /// into place.
    pub fn bind(path: &Path, disk: Arc<dyn Disk>, opts: NbdOptions) -> io::Result<NbdServer> {
        let listener = crate::socket_file::bind_private(path)?;
        info!("NBD server listening on {}", path.display());
        let meta =
            fs::symlink_metadata(path).map_err(|e| crate::socket_file::bind_error(path, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| crate::socket_file::bind_error(path, e))?;
        let size = disk.size();
        Ok(NbdServer {
            listener,
            path: path.to_path_buf(),
            socket_id: (meta.dev(), meta.ino()),
            export: Export {
                disk,
                opts,
                size,
                writer: WriterSlot::default(),
            },
        })
    }

    /// Serves clients on background threads; returns at once.
    pub fn spawn(self) -> io::Result<NbdHandle> {
        let shared = Arc::new(Shared {
            export: self.export,
            stop: Arc::new(AtomicBool::new(false)),
            served: AtomicU64::new(0),
        });
        let accepting = Arc::clone(&shared);
        let listener = self.listener;
        let accept = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&listener, &accepting))?;
        Ok(NbdHandle {
            shared,
            accept: Some(accept),
            path: self.path,
            socket_id: self.socket_id,
        })
    }
}

/// A running server. Dropping it stops it as [`NbdHandle::shutdown`] does, without the
/// error.
pub struct NbdHandle {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    path: PathBuf,
    socket_id: (u64, u64),
}

impl fmt::Debug for NbdHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdHandle")
            .field("path", &self.path)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl NbdHandle {
    /// Stops accepting, ends the connections (after their request in flight), flushes the
    /// disk (`Disk::commit`: what a clean shutdown does), removes the socket.
    pub fn shutdown(mut self) -> Result<(), DiskError> {
        self.stop()
    }

    /// Number of connections served so far (for tests/logs).
    pub fn connections(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    fn stop(&mut self) -> Result<(), DiskError> {
        let Some(accept) = self.accept.take() else {
            return Ok(());
        };
        self.shared.stop.store(true, Ordering::Release);
        // New clients find no socket; the accept thread notices the flag within one poll.
        self.remove_socket();
        if accept.join().is_err() {
            warn!("the NBD accept thread panicked");
        }
        self.shared.export.disk.commit()
    }

    /// Removes the socket if it is still the one bound (not one put there since).
    fn remove_socket(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.socket_id);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove the socket {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for NbdHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!("cannot flush the disk after serving NBD: {e}");
        }
    }
}

/// The disk and how it is exported, shared by every connection.
struct Export {
    disk: Arc<dyn Disk>,
    opts: NbdOptions,
    size: u64,
    writer: WriterSlot,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("opts", &self.opts)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Whether a client's export name selects this export: its own name, or the empty name
    /// ("reserved for a 'default' export").
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.opts.export_name.as_bytes()
    }

    /// The transmission flags ("Transmission flags"). A read-only export has no cache to
    /// share and allows many clients: `NBD_FLAG_CAN_MULTI_CONN`. `NBD_FLAG_SEND_DF` "MUST
    /// [be left] clear if structured replies have not been negotiated".
    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_CACHE;
        if self.opts.read_only {
            flags |= proto::FLAG_READ_ONLY | proto::FLAG_CAN_MULTI_CONN;
        } else {
            flags |= proto::FLAG_SEND_FUA
                | proto::FLAG_SEND_TRIM
                | proto::FLAG_SEND_WRITE_ZEROES
                | proto::FLAG_SEND_FAST_ZERO;
        }
        if structured {
            flags |= proto::FLAG_SEND_DF;
        }
        flags
    }
}

/// The one client a writable export serves.
#[derive(Debug, Default)]
struct WriterSlot {
    busy: Mutex<bool>,
    freed: Condvar,
}

/// A claimed [`WriterSlot`], freed when dropped.
#[derive(Debug)]
struct WriterGuard<'a>(&'a WriterSlot);

impl WriterSlot {
    /// Claims the slot, waiting up to `wait` for the current holder to leave.
    fn claim(&self, wait: Duration) -> Option<WriterGuard<'_>> {
        let mut busy = self.wait_free(wait)?;
        *busy = true;
        Some(WriterGuard(self))
    }

    /// Whether the slot is free, or becomes free within `wait`.
    fn free_within(&self, wait: Duration) -> bool {
        self.wait_free(wait).is_some()
    }

    fn wait_free(&self, wait: Duration) -> Option<std::sync::MutexGuard<'_, bool>> {
        let deadline = Instant::now() + wait;
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *busy {
            let left = deadline.checked_duration_since(Instant::now())?;
            busy = self
                .freed
                .wait_timeout(busy, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Some(busy)
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.0.freed.notify_all();
    }
}

/// What the accept thread and the connections share.
struct Shared {
    export: Export,
    stop: Arc<AtomicBool>,
    served: AtomicU64,
}

/// Why a connection ended early.
#[derive(Debug)]
enum ConnError {
    /// The socket closed, failed, or the server stopped.
    Wire(WireError),
    /// The client broke the protocol (or asked for what cannot be refused politely).
    Protocol(String),
    /// The server cannot go on with this client (a read that failed after its reply began).
    Server(String),
}

/// A client's thread, and a handle on its socket to cut it off at shutdown.
type Client = (JoinHandle<()>, Option<UnixStream>);

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    let mut clients: Vec<Client> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        match wait_readable(listener, wire::POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!("cannot wait for NBD clients: {e}");
                thread::sleep(wire::POLL);
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("cannot accept an NBD client: {e}");
                thread::sleep(wire::POLL);
                continue;
            }
        };
        clients.retain(|(thread, _)| !thread.is_finished());
        if clients.len() >= MAX_CONNECTIONS {
            warn!("refused an NBD client: {MAX_CONNECTIONS} are connected already");
            continue;
        }
        let id = shared.served.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::clone(shared);
        let cut = stream.try_clone().ok();
        match thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || serve_client(stream, &conn, id))
        {
            Ok(handle) => clients.push((handle, cut)),
            Err(e) => warn!("cannot start a thread for NBD client {id}: {e}"),
        }
    }
    end_clients(clients);
}

/// Lets every client finish its request in flight (each notices the stop within one poll,
/// or within the grace for a message it is receiving), then cuts off the sockets of those
/// still there (a client that does not read its replies), and joins them all.
fn end_clients(clients: Vec<Client>) {
    let deadline = Instant::now() + wire::GRACE + 2 * wire::POLL;
    while Instant::now() < deadline && clients.iter().any(|(t, _)| !t.is_finished()) {
        thread::sleep(Duration::from_millis(10));
    }
    for (thread, socket) in clients {
        if !thread.is_finished() {
            if let Some(socket) = socket {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
        if thread.join().is_err() {
            warn!("an NBD client thread panicked");
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid, writable pollfd for the whole call, and nfds is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// One client, from handshake to disconnect. A writable export is committed after its
/// client leaves (as the vhost-user daemon does after a frontend), before the next client
/// can claim it.
fn serve_client(stream: UnixStream, shared: &Shared, id: u64) {
    debug!("NBD client {id} connected");
    let export = &shared.export;
    let result = match Wire::new(stream, Arc::clone(&shared.stop)) {
        Ok(mut wire) => {
            let result = serve_session(&mut wire, export, id);
            // The accept thread holds a duplicate of the socket: end the connection itself,
            // not just this descriptor.
            wire.close();
            result
        }
        Err(e) => Err(ConnError::Wire(WireError::Io(e))),
    };
    match result {
        Ok(()) | Err(ConnError::Wire(WireError::Closed)) => debug!("NBD client {id} left"),
        Err(ConnError::Wire(WireError::Stopped)) => {
            debug!("NBD client {id} disconnected: the server is stopping")
        }
        Err(ConnError::Wire(e)) => debug!("NBD client {id} dropped: {e}"),
        Err(ConnError::Protocol(why)) => warn!("NBD client {id} dropped: {why}"),
        Err(ConnError::Server(why)) => warn!("NBD client {id} disconnected: {why}"),
    }
}

fn serve_session(wire: &mut Wire, export: &Export, id: u64) -> Result<(), ConnError> {
    let Some(session) = handshake::negotiate(wire, export)? else {
        return Ok(());
    };
    debug!(
        "NBD client {id} entered transmission (flags {:#x}, structured replies: {})",
        session.flags, session.structured
    );
    let served = transmission::serve(wire, export, &session);
    if !export.opts.read_only {
        if let Err(e) = export.disk.commit() {
            warn!("cannot commit the disk after NBD client {id} left: {e}");
        }
    }
    // Only now may the next writer in.
    drop(session);
    served
}

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
