//! A small synchronous wrapper over libblkio's `virtio-blk-vhost-user` driver: the same
//! frontend code QEMU's `blkio` block driver uses, talking to a backend with no VM.
//!
//! The one libblkio client of the workspace: the end-to-end tests use it directly and the
//! comparison benchmark (`benches/src/compare/run.rs`) drives its queues with workloads.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

/// How long one wait for completions may take before the backend is called hung.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take, the vhost-user handshake included: libblkio has no
/// timeout of its own, so a backend that accepts and never answers would hang the caller.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Buffers are at least page-aligned, whatever the driver asks for (O_DIRECT backends).
const MIN_ALIGN: usize = 4096;

/// A connected, started libblkio instance with one memory region for I/O buffers, split
/// into one equal, aligned slice per queue.
pub struct BlkioClient {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    per_queue: usize,
    // Dropped last: the queues and the region belong to it.
    _blkio: Blkio,
}

impl std::fmt::Debug for BlkioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkioClient")
            .field("queues", &self.queues.len())
            .field("buffer", &self.region.len)
            .finish()
    }
}

/// A libblkio error with its message.
pub fn describe(err: &blkio::Error) -> String {
    format!("{} ({:?})", err.message(), err.errno())
}

/// A completed request's outcome.
pub fn completion_result(c: &Completion) -> Result<(), Errno> {
    if c.ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(-c.ret))
    }
}

impl BlkioClient {
    /// Connects to `socket` with `num_queues` queues and a buffer of at least `buffer_len`
    /// bytes (each queue's slice rounded up to the memory alignment), giving up after
    /// [`CONNECT_TIMEOUT`]. Fails if the backend does not start exactly `num_queues`.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
        buffer_len: usize,
    ) -> Result<Self, blkio::Error> {
        let (tx, rx) = mpsc::channel();
        let path = socket.to_path_buf();
        // The thread is left behind if the handshake never ends; the caller gets an error.
        std::thread::spawn(move || {
            let _ = tx.send(Self::connect_now(&path, num_queues, read_only, buffer_len));
        });
        rx.recv_timeout(CONNECT_TIMEOUT).unwrap_or_else(|_| {
            Err(blkio::Error::new(
                Errno::TIMEDOUT,
                format!(
                    "no answer from {} within {CONNECT_TIMEOUT:?}",
                    socket.display()
                ),
            ))
        })
    }

    fn connect_now(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
        buffer_len: usize,
    ) -> Result<Self, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", &socket.to_string_lossy())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        let nq = i32::try_from(num_queues)
            .map_err(|_| blkio::Error::new(Errno::INVAL, "too many queues"))?;
        b.set_i32("num-queues", nq)?;
        let outcome = b.start()?;
        if outcome.queues.len() != num_queues {
            return Err(blkio::Error::new(
                Errno::INVAL,
                format!(
                    "asked for {num_queues} queues, the backend gave {}",
                    outcome.queues.len()
                ),
            ));
        }
        let align = usize::try_from(b.get_u64("mem-region-alignment")?)
            .unwrap_or(MIN_ALIGN)
            .max(MIN_ALIGN);
        let per_queue = buffer_len
            .div_ceil(num_queues.max(1))
            .div_ceil(align)
            .max(1)
            * align;
        let region = b.alloc_mem_region(per_queue * num_queues)?;
        b.map_mem_region(&region)?;
        Ok(Self {
            queues: outcome.queues,
            region,
            per_queue,
            _blkio: b,
        })
    }

    /// The disk size in bytes, from the config space.
    pub fn capacity(&self) -> Result<u64, blkio::Error> {
        self._blkio.get_u64("capacity")
    }

    /// A libblkio property, for tests of what the backend advertises.
    pub fn property_u64(&self, name: &str) -> Result<u64, blkio::Error> {
        self._blkio.get_u64(name)
    }

    /// The I/O buffer.
    pub fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read-write for `len` bytes for as long as
        // `self._blkio` lives; `&mut self` makes this the only Rust reference, and the
        // backend only touches it while a request we submitted is in flight, which
        // never overlaps this borrow (every method waits for its completions).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Splits the client into per-queue handles, each with its own aligned slice of the
    /// buffer, for use from several threads at once.
    pub fn split(&mut self) -> Vec<QueueHandle<'_>> {
        let per = self.per_queue;
        let base = self.region.addr;
        self.queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| QueueHandle {
                queue: q,
                buf_addr: base + i * per,
                buf_len: per,
            })
            .collect()
    }

    /// A handle on queue `q` using the whole buffer.
    pub fn queue(&mut self, q: usize) -> QueueHandle<'_> {
        let (addr, len) = (self.region.addr, self.region.len);
        QueueHandle {
            queue: &mut self.queues[q],
            buf_addr: addr,
            buf_len: len,
        }
    }

    /// Reads `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.queue(0).read(offset, len)
    }

    /// Writes `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.queue(0).write(offset, data)
    }

    /// Flushes on queue 0.
    pub fn flush(&mut self) -> Result<(), Errno> {
        self.queue(0).flush()
    }

    /// Discards on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.queue(0).discard(offset, len)
    }

    /// Writes zeros on queue 0; `unmap` lets the backend deallocate.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Errno> {
        self.queue(0).write_zeroes(offset, len, unmap)
    }
}

/// One queue and the part of the buffer it may use.
pub struct QueueHandle<'a> {
    queue: &'a mut Blkioq,
    buf_addr: usize,
    buf_len: usize,
}

// SAFETY: a handle owns its queue exclusively (`&mut Blkioq`, and Blkioq is Send) and a
// buffer range no other handle covers (`BlkioClient::split` hands out disjoint ranges).
unsafe impl Send for QueueHandle<'_> {}

impl std::fmt::Debug for QueueHandle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHandle")
            .field("buf_len", &self.buf_len)
            .finish()
    }
}

impl QueueHandle<'_> {
    /// This handle's buffer.
    pub fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: see BlkioClient::buffer; the range is this handle's alone.
        unsafe { std::slice::from_raw_parts_mut(self.buf_addr as *mut u8, self.buf_len) }
    }

    /// The address of `[at, at + len)` in this handle's buffer, checked to lie inside it.
    fn buf_range(&self, at: usize, len: usize) -> usize {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.buf_len),
            "request larger than the buffer"
        );
        self.buf_addr + at
    }

    /// Queues, without waiting, a read of `len` bytes at `offset` into this handle's
    /// buffer at `at`; its completion carries `user_data`. The buffer range must not be
    /// touched until then.
    pub fn submit_read(&mut self, offset: u64, at: usize, len: usize, user_data: usize) {
        let addr = self.buf_range(at, len);
        self.queue
            .read(offset, addr as *mut u8, len, user_data, ReqFlags::empty());
    }

    /// Queues, without waiting, a write of this handle's buffer `[at, at + len)` at
    /// `offset`; its completion carries `user_data`.
    pub fn submit_write(&mut self, offset: u64, at: usize, len: usize, user_data: usize) {
        let addr = self.buf_range(at, len);
        self.queue
            .write(offset, addr as *const u8, len, user_data, ReqFlags::empty());
    }

    /// Submits what is queued and waits up to [`IO_TIMEOUT`] for at least one completion;
    /// returns those that arrived (at most `slots.len()`), or `Errno::TIMEDOUT` if none did.
    pub fn wait_for_completions<'c>(
        &mut self,
        slots: &'c mut [MaybeUninit<Completion>],
    ) -> Result<&'c [Completion], Errno> {
        let mut timeout = IO_TIMEOUT;
        let n = self
            .queue
            .do_io(slots, 1, Some(&mut timeout), None)
            .map_err(|e| e.errno())?;
        if n == 0 {
            return Err(Errno::TIMEDOUT);
        }
        // SAFETY: do_io initialised the first `n` entries of `slots`, and
        // `MaybeUninit<Completion>` has the layout of `Completion`.
        Ok(unsafe { std::slice::from_raw_parts(slots.as_ptr().cast::<Completion>(), n) })
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.submit_read(offset, 0, len, 0);
        self.wait_one()?;
        Ok(self.buffer()[..len].to_vec())
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        assert!(data.len() <= self.buf_len, "write larger than the buffer");
        self.buffer()[..data.len()].copy_from_slice(data);
        self.submit_write(offset, 0, data.len(), 0);
        self.wait_one()
    }

    /// Flushes the backend's write cache.
    pub fn flush(&mut self) -> Result<(), Errno> {
        self.queue.flush(0, ReqFlags::empty());
        self.wait_one()
    }

    /// Discards a range.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.queue.discard(offset, len, 0, ReqFlags::empty());
        self.wait_one()
    }

    /// Writes zeros; `unmap` lets the backend deallocate.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Errno> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queue.write_zeroes(offset, len, 0, flags);
        self.wait_one()
    }

    /// Runs one request per entry of `offsets`, each `block` bytes, keeping up to `depth`
    /// in flight. For writes, `fill(i, buf)` fills request `i`'s data first; as each
    /// request completes, `done(i, buf, result)` sees its buffer (the data, for reads) and
    /// returns whether to go on. Returns when all are done, when `done` says stop
    /// (abandoning what is in flight), or on the first transport error.
    pub fn run_batch(
        &mut self,
        offsets: &[u64],
        block: usize,
        depth: usize,
        write: bool,
        mut fill: impl FnMut(usize, &mut [u8]),
        mut done: impl FnMut(usize, &[u8], Result<(), Errno>) -> bool,
    ) -> Result<(), Errno> {
        assert!(
            depth * block <= self.buf_len,
            "batch larger than the buffer"
        );
        let mut next = 0;
        let mut in_flight = 0;
        let mut free_slots: Vec<usize> = (0..depth).rev().collect();
        let mut slot_of = vec![0usize; offsets.len()];
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        while next < offsets.len() || in_flight > 0 {
            while next < offsets.len() {
                let Some(slot) = free_slots.pop() else { break };
                if write {
                    fill(next, &mut self.buffer()[slot * block..(slot + 1) * block]);
                    self.submit_write(offsets[next], slot * block, block, next);
                } else {
                    self.submit_read(offsets[next], slot * block, block, next);
                }
                slot_of[next] = slot;
                next += 1;
                in_flight += 1;
            }
            for c in self.wait_for_completions(&mut completions)? {
                in_flight -= 1;
                let slot = slot_of[c.user_data];
                free_slots.push(slot);
                let go_on = done(
                    c.user_data,
                    &self.buffer()[slot * block..(slot + 1) * block],
                    completion_result(c),
                );
                if !go_on {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Waits for the one request in flight and returns its outcome.
    fn wait_one(&mut self) -> Result<(), Errno> {
        let mut slot = [MaybeUninit::<Completion>::uninit()];
        let done = self.wait_for_completions(&mut slot)?;
        completion_result(&done[0])
    }
}
