//! The vhost-user-blk backend served from inside the test process over an in-memory
//! disk: tests of the virtio side that need no volume engine, keys or child process.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use tempfile::TempDir;
use vhost_qvol::backend::Device;
use vhost_qvol::disk::MemDisk;
use vhost_qvol::serve::{listen, serve, SocketSource};

/// A backend thread serving a [`MemDisk`]. The thread runs until the test process ends.
#[derive(Debug)]
pub struct InProcessServer {
    /// The socket to connect to.
    pub socket: PathBuf,
    /// The disk, to inspect what the backend wrote.
    pub disk: Arc<MemDisk>,
    _dir: TempDir,
}

impl InProcessServer {
    /// Serves a zeroed disk of `size` bytes over `num_queues` queues.
    pub fn start(size: u64, num_queues: u16, read_only: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("mem.sock");
        let disk = Arc::new(MemDisk::new(size, read_only));
        let device = Arc::new(Device::new(
            disk.clone(),
            read_only,
            *b"qvol-memdisk\0\0\0\0\0\0\0\0",
            num_queues,
        ));
        let mut listener = listen(&SocketSource::Path(socket.clone())).expect("listen");
        thread::spawn(move || serve(&mut listener, &device));
        Self {
            socket,
            disk,
            _dir: dir,
        }
    }
}
