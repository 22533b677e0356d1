//! Test support: a raw NBD client that speaks the protocol byte by byte (so that tests can
//! also speak it wrongly), and a sparse in-memory disk that knows its holes, counts its
//! flushes and can be told to fail reads.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::{self, Fields, Request};
use super::{serve_client, Export, NbdOptions, Shared, WriterSlot};
use crate::disk::{Disk, DiskError, DiskErrorKind, MemDisk};

/// The block granularity of [`SparseDisk`]'s allocation.
pub const BLOCK: u64 = 4096;

/// A [`MemDisk`] that tracks which 4 KiB blocks were written (the rest are holes), counts
/// flushes and commits, and fails reads of one offset on demand.
#[derive(Debug)]
pub struct SparseDisk {
    mem: MemDisk,
    allocated: Mutex<BTreeSet<u64>>,
    pub flushes: AtomicUsize,
    pub commits: AtomicUsize,
    pub fail_reads_at: Mutex<Option<u64>>,
}

impl SparseDisk {
    pub fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            mem: MemDisk::new(size, false),
            allocated: Mutex::new(BTreeSet::new()),
            flushes: AtomicUsize::new(0),
            commits: AtomicUsize::new(0),
            fail_reads_at: Mutex::new(None),
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.mem.contents()
    }

    fn unmap(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        let mut set = self.allocated.lock().unwrap();
        for b in first..end {
            set.remove(&b);
        }
    }
}

impl Disk for SparseDisk {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if let Some(bad) = *self.fail_reads_at.lock().unwrap() {
            if (offset..offset + buf.len() as u64).contains(&bad) {
                return Err(DiskError::new(
                    DiskErrorKind::Integrity,
                    format!("block at byte {bad} failed authentication"),
                ));
            }
        }
        self.mem.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.mem.write_at(offset, data)?;
        let mut set = self.allocated.lock().unwrap();
        for b in offset / BLOCK..(offset + data.len() as u64).div_ceil(BLOCK) {
            set.insert(b);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn commit(&self) -> Result<(), DiskError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.mem.discard(offset, len)?;
        self.unmap(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.mem.write_zeroes(offset, len, unmap)?;
        self.unmap(offset, len);
        Ok(())
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<qvol_core::Extent>, DiskError> {
        let set = self.allocated.lock().unwrap();
        let mut out: Vec<qvol_core::Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / BLOCK;
            let next = ((block + 1) * BLOCK).min(end);
            let allocated = set.contains(&block);
            let full = out.len() == max_extents;
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.len += next - pos,
                _ if full => break,
                _ => out.push(qvol_core::Extent {
                    len: next - pos,
                    allocated,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

/// Serves one connection over a socket pair, as the accept thread would.
pub fn serve_pair(disk: Arc<dyn Disk>, opts: NbdOptions) -> (Client, JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let shared = Arc::new(shared(disk, opts));
    let handle = std::thread::spawn(move || serve_client(theirs, &shared, 1));
    (Client::over(ours), handle)
}

/// The shared state of a server (for tests that run several connections by hand).
pub fn shared(disk: Arc<dyn Disk>, opts: NbdOptions) -> Shared {
    let size = disk.size();
    Shared {
        export: Export {
            disk,
            opts,
            size,
            writer: WriterSlot::default(),
        },
        stop: Arc::new(AtomicBool::new(false)),
        served: AtomicU64::new(0),
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// A structured reply chunk as received.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// A raw NBD client.
#[derive(Debug)]
pub struct Client {
    s: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Self {
        Self::over(UnixStream::connect(path).unwrap())
    }

    pub fn over(s: UnixStream) -> Self {
        // A server that stops answering fails the test instead of hanging it.
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self { s }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.s.read_exact(&mut buf).unwrap();
        buf
    }

    /// Whether the server closed the connection (reads end of file, or a reset) rather than
    /// sending something. A server that does neither within the read timeout fails the test.
    pub fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.s.read(&mut byte) {
            Ok(n) => n == 0,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server neither answered nor closed the connection")
            }
            Err(_) => true,
        }
    }

    /// Reads the greeting and returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.recv(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        u16::from_be_bytes([g[16], g[17]])
    }

    /// Greeting, then client flags.
    pub fn hello(&mut self, client_flags: u32) {
        self.greeting();
        self.send(&client_flags.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out);
    }

    /// One option reply: (option, reply type, data).
    pub fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.recv(20);
        let mut f = Fields::new(&h);
        assert_eq!(f.u64(), Some(proto::OPTION_REPLY_MAGIC));
        let option = f.u32().unwrap();
        let kind = f.u32().unwrap();
        let len = f.u32().unwrap() as usize;
        (option, kind, self.recv(len))
    }

    /// Option replies up to the final one (an ack or an error): (reply type, data) each.
    pub fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (opt, kind, data) = self.reply();
            assert_eq!(opt, option);
            let last = kind == proto::REP_ACK || kind & (1 << 31) != 0;
            out.push((kind, data));
            if last {
                return out;
            }
        }
    }

    /// Handshake up to transmission with `NBD_OPT_GO` on the default export; returns the
    /// size and transmission flags.
    pub fn start(&mut self, structured: bool, base_allocation: bool) -> (u64, u16) {
        self.hello(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        if structured {
            self.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(
                self.replies(proto::OPT_STRUCTURED_REPLY)[0].0,
                proto::REP_ACK
            );
        }
        if base_allocation {
            self.option(
                proto::OPT_SET_META_CONTEXT,
                &meta_data("", &[proto::BASE_ALLOCATION]),
            );
            let r = self.replies(proto::OPT_SET_META_CONTEXT);
            assert_eq!(r.len(), 2, "{r:?}");
        }
        self.option(proto::OPT_GO, &go_data("", &[proto::INFO_BLOCK_SIZE]));
        let replies = self.replies(proto::OPT_GO);
        assert_eq!(replies.last().unwrap().0, proto::REP_ACK, "{replies:?}");
        let export = replies
            .iter()
            .find(|(k, d)| *k == proto::REP_INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let mut f = Fields::new(&export.1[2..]);
        (f.u64().unwrap(), f.u16().unwrap())
    }

    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        self.send(
            &Request {
                flags,
                kind,
                cookie,
                offset,
                len,
            }
            .encode(),
        );
    }

    /// A simple reply's (error, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        let h = self.recv(16);
        let mut f = Fields::new(&h);
        assert_eq!(f.u32(), Some(proto::SIMPLE_REPLY_MAGIC));
        (f.u32().unwrap(), f.u64().unwrap())
    }

    pub fn chunk(&mut self) -> Chunk {
        let h = self.recv(20);
        let mut f = Fields::new(&h);
        assert_eq!(f.u32(), Some(proto::STRUCTURED_REPLY_MAGIC));
        let flags = f.u16().unwrap();
        let kind = f.u16().unwrap();
        let cookie = f.u64().unwrap();
        let len = f.u32().unwrap() as usize;
        Chunk {
            flags,
            kind,
            cookie,
            payload: self.recv(len),
        }
    }

    /// The chunks of one structured reply, up to the one flagged done.
    pub fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!(c.cookie, cookie);
            let done = c.flags & proto::REPLY_FLAG_DONE != 0;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// A structured read reply reassembled: the data, or the first error value.
    pub fn structured_read(
        &mut self,
        cookie: u64,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, u32> {
        let mut data = vec![0xEE; len];
        let mut error = None;
        for c in self.chunks(cookie) {
            let mut f = Fields::new(&c.payload);
            match c.kind {
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let at = (f.u64().unwrap() - offset) as usize;
                    let bytes = &c.payload[8..];
                    data[at..at + bytes.len()].copy_from_slice(bytes);
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let at = (f.u64().unwrap() - offset) as usize;
                    let n = f.u32().unwrap() as usize;
                    data[at..at + n].fill(0);
                }
                proto::REPLY_TYPE_NONE => {}
                kind if kind & (1 << 15) != 0 => {
                    error.get_or_insert(f.u32().unwrap());
                }
                other => panic!("unexpected chunk type {other}"),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(data),
        }
    }
}
