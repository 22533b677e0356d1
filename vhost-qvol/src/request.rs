//! One virtio-blk request: parse it from a descriptor chain, run it against a [`Disk`],
//! write the status byte (virtio 1.2, section 5.2.6 "Device Operation").
//!
//! ```text
//! struct virtio_blk_req {            // 5.2.6
//!     le32 type;                     // VIRTIO_BLK_T_*
//!     le32 reserved;
//!     le64 sector;                   // 512-byte units, whatever blk_size says
//!     u8 data[];                     // device-readable (OUT, DISCARD, WRITE_ZEROES)
//!                                    // or device-writable (IN, GET_ID)
//!     u8 status;                     // device-writable, last byte of the chain
//! };
//! ```
//! The device must not rely on how the driver splits this into descriptors (2.7.4,
//! message framing), so the chain is read through virtio-queue's `Reader` (all readable
//! bytes in order) and `Writer` (all writable bytes; the last one is the status).
//!
//! Guest memory is only touched by copying through a per-queue bounce buffer: the guest
//! may change its buffers while we work, and the engine must never see, nor decrypt into,
//! memory that changes under it.

use std::io::{Read, Write};
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use log::{debug, error, trace, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use zeroize::{Zeroize, Zeroizing};

use crate::blk_config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::direct::{read_all, GuestBuffers};
use crate::disk::{check_range, Disk, DiskError, DiskErrorKind, SECTOR_SIZE};

/// Largest IN/OUT request we serve; bigger ones fail with IOERR. Linux issues at most a
/// few MiB; this bounds the work one request can make a queue do.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Bounce buffer size: large requests are copied and processed in pieces this big.
const CHUNK_BYTES: usize = 1 << 20;
/// Size of `struct virtio_blk_req`'s header (type, reserved, sector).
const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes` (5.2.6: le64 sector, le32
/// num_sectors, le32 flags).
const SEGMENT_LEN: usize = 16;
/// Guest-error log lines allowed per queue per second; the rest are counted.
const LOG_BURST: u32 = 10;

/// The status byte (5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR.
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// Device-wide settings a request needs.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSettings<'a> {
    /// VIRTIO_BLK_F_RO was offered: every write fails.
    pub read_only: bool,
    /// Write-back cache mode (config `writeback`); when false each write is flushed.
    pub writeback: bool,
    /// The GET_ID answer, NUL padded.
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// Logs guest mistakes without letting a guest flood the log: `LOG_BURST` (10) lines per
/// second, then a count of what was suppressed.
#[derive(Debug)]
pub struct LogLimiter {
    window: Instant,
    count: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self {
            window: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }
}

impl LogLimiter {
    /// Whether one more line may be logged now.
    pub fn allow(&mut self, queue: usize) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!(
                    "queue {queue}: {} more request errors were not logged",
                    self.suppressed
                );
            }
            *self = Self::default();
        }
        self.count += 1;
        if self.count > LOG_BURST {
            self.suppressed += 1;
            false
        } else {
            true
        }
    }
}

/// The state one queue's worker thread keeps between requests. Each queue has its own,
/// so nothing here is shared between queues.
#[derive(Debug)]
pub struct QueueWorker {
    queue: usize,
    /// Plaintext of the request in flight; wiped after each use, on growth and on drop.
    bounce: Zeroizing<Vec<u8>>,
    limiter: LogLimiter,
}

/// A request that cannot be answered normally: the status to give and why.
struct Failure {
    status: Status,
    reason: String,
    /// An integrity failure or a host error, logged at `error!` rather than as a guest
    /// mistake.
    host_side: bool,
}

fn guest_error(status: Status, reason: impl Into<String>) -> Failure {
    Failure {
        status,
        reason: reason.into(),
        host_side: false,
    }
}

fn disk_failure(op: &str, offset: u64, err: &DiskError) -> Failure {
    let status = match err.kind() {
        DiskErrorKind::Unsupported => Status::Unsupp,
        _ => Status::IoErr,
    };
    let host_side = matches!(err.kind(), DiskErrorKind::Integrity | DiskErrorKind::Io);
    let reason = if err.kind() == DiskErrorKind::Integrity {
        format!(
            "{op} failed an integrity check near sector {} (block {}): {err}",
            offset / SECTOR_SIZE,
            offset / 4096
        )
    } else {
        format!("{op} at sector {} failed: {err}", offset / SECTOR_SIZE)
    };
    Failure {
        status,
        reason,
        host_side,
    }
}

impl QueueWorker {
    /// The worker for queue number `queue`.
    pub fn new(queue: usize) -> Self {
        Self {
            queue,
            bounce: Zeroizing::new(Vec::new()),
            limiter: LogLimiter::default(),
        }
    }

    /// Runs the request in `chain` and writes its status. Returns the number of bytes
    /// written into the chain (data and status), the `len` of the used-ring entry.
    /// Never fails: whatever the guest sent, the answer is a status (or, when the chain
    /// has no writable byte for one, a used entry of length 0).
    pub fn process<M>(
        &mut self,
        disk: &dyn Disk,
        settings: DeviceSettings<'_>,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
    ) -> u32
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let mut framed = match self.frame(mem, &chain) {
            Ok(framed) => framed,
            Err(()) => return fail_unreadable_chain(mem, chain),
        };
        let guest = Guest { mem, chain: &chain };
        let result = guarded(|| {
            let (kind, sector) = header(&mut framed.reader)?;
            self.execute(disk, settings, &guest, kind, sector, &mut framed)
        });
        self.finish(framed, result)
    }

    /// Runs the requests of `chains` as [`QueueWorker::process`] does, but reads whose data
    /// lies straight in guest memory all in one [`Disk::read_many`] call (in flight together
    /// where each read is a network round trip). Returns each chain's head and used length.
    pub fn process_many<M>(
        &mut self,
        disk: &dyn Disk,
        settings: DeviceSettings<'_>,
        mem: &GuestMemoryMmap,
        chains: Vec<DescriptorChain<M>>,
    ) -> Vec<(u16, u32)>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let mut done = Vec::with_capacity(chains.len());
        let mut reads = Vec::new();
        for chain in &chains {
            let head = chain.head_index();
            let mut framed = match self.frame(mem, chain) {
                Ok(framed) => framed,
                Err(()) => {
                    done.push((head, fail_unreadable_chain(mem, chain.clone())));
                    continue;
                }
            };
            let guest = Guest { mem, chain };
            let served = guarded(|| match header(&mut framed.reader)? {
                (VIRTIO_BLK_T_IN, sector) => {
                    match self.plan_read(disk, &guest, sector, &framed.writer)? {
                        ReadPlan::Direct(offset, buffers) => Ok(Served::Later(offset, buffers)),
                        ReadPlan::Bounce(offset, len) => self
                            .read(disk, offset, len, &mut framed.writer)
                            .map(|()| Served::Now(0)),
                    }
                }
                (kind, sector) => self
                    .execute(disk, settings, &guest, kind, sector, &mut framed)
                    .map(Served::Now),
            });
            match served {
                Ok(Served::Later(offset, buffers)) => reads.push((framed, offset, buffers)),
                Ok(Served::Now(direct)) => done.push((head, self.finish(framed, Ok(direct)))),
                Err(failure) => done.push((head, self.finish(framed, Err(failure)))),
            }
        }
        let outcomes = {
            let mut buffers: Vec<_> = reads.iter_mut().map(|(_, o, b)| (*o, b)).collect();
            read_all(disk, &mut buffers)
        };
        let results = outcomes
            .into_iter()
            .map(|o| o.map_err(|(at, e)| disk_failure("read", at, &e)));
        for ((framed, _, buffers), result) in reads.into_iter().zip(results) {
            let head = framed.head;
            let result = result.map(|()| buffers.len());
            done.push((head, self.finish(framed, result)));
        }
        done
    }

    /// Takes `chain` apart into its readable bytes, its writable data bytes and its status
    /// byte; `Err` (logged) when it has no status byte to answer in.
    fn frame<'a, M>(
        &mut self,
        mem: &'a GuestMemoryMmap,
        chain: &DescriptorChain<M>,
    ) -> Result<Framed<'a>, ()>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let head = chain.head_index();
        let reader = chain.clone().reader(mem);
        let writer = chain.clone().writer(mem);
        let (reader, mut writer) = match (reader, writer) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                self.log_failure(head, &guest_error(Status::IoErr, format!("bad chain: {e}")));
                return Err(());
            }
        };
        let writable = writer.available_bytes();
        let status = if writable == 0 {
            Err("chain has no writable status byte".to_owned())
        } else {
            writer
                .split_at(writable - 1)
                .map_err(|e| format!("bad chain: {e}"))
        };
        match status {
            Ok(status) => Ok(Framed {
                head,
                reader,
                writer,
                status,
            }),
            Err(reason) => {
                self.log_failure(head, &guest_error(Status::IoErr, reason));
                Err(())
            }
        }
    }

    /// Writes the status of a request run to `result` (bytes written straight into guest
    /// memory, or why it failed); returns the used length.
    fn finish(&mut self, mut framed: Framed<'_>, result: Result<usize, Failure>) -> u32 {
        let head = framed.head;
        let (status, direct) = match result {
            Ok(direct) => (Status::Ok, direct),
            Err(failure) => {
                self.log_failure(head, &failure);
                (failure.status, 0)
            }
        };
        if let Err(e) = framed.status.write_all(&[status.byte()]) {
            let failure = guest_error(Status::IoErr, format!("cannot write status: {e}"));
            self.log_failure(head, &failure);
            return 0;
        }
        trace!("queue {}: request {head} done: {status:?}", self.queue);
        u32::try_from(framed.writer.bytes_written() + direct + 1).unwrap_or(u32::MAX)
    }

    fn log_failure(&mut self, head: u16, failure: &Failure) {
        if !self.limiter.allow(self.queue) {
            return;
        }
        if failure.host_side {
            error!("queue {}: request {head}: {}", self.queue, failure.reason);
        } else {
            warn!("queue {}: request {head}: {}", self.queue, failure.reason);
        }
    }

    /// Runs the request of type `kind` at `sector` (its header read); returns the bytes
    /// written straight into guest memory (not through `framed.writer`).
    fn execute<M>(
        &mut self,
        disk: &dyn Disk,
        settings: DeviceSettings<'_>,
        guest: &Guest<'_, M>,
        kind: u32,
        sector: u64,
        framed: &mut Framed<'_>,
    ) -> Result<usize, Failure>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let (reader, writer) = (&mut framed.reader, &mut framed.writer);
        match kind {
            VIRTIO_BLK_T_IN => match self.plan_read(disk, guest, sector, writer)? {
                ReadPlan::Direct(offset, mut buffers) => {
                    read_all(disk, &mut [(offset, &mut buffers)])
                        .pop()
                        .unwrap_or(Ok(()))
                        .map(|()| buffers.len())
                        .map_err(|(at, e)| disk_failure("read", at, &e))
                }
                ReadPlan::Bounce(offset, len) => self.read(disk, offset, len, writer).map(|()| 0),
            },
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                debug!("queue {}: write sector {sector} len {len}", self.queue);
                refuse_if_read_only(settings, "write")?;
                let offset = data_range(disk, sector, len)?;
                match GuestBuffers::of(guest.mem, guest.chain, false, HEADER_LEN, len) {
                    Some(buffers) => buffers
                        .write_to(disk, offset)
                        .map_err(|(at, e)| disk_failure("write", at, &e))?,
                    None => self.write(disk, offset, len, reader)?,
                }
                if !settings.writeback {
                    disk.flush()
                        .map_err(|e| disk_failure("flush", offset, &e))?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                debug!("queue {}: flush", self.queue);
                disk.flush()
                    .map_err(|e| disk_failure("flush", 0, &e))
                    .map(|()| 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                // 5.2.6: the ID is at most 20 bytes, NUL padded.
                let n = writer.available_bytes().min(settings.serial.len());
                writer
                    .write_all(&settings.serial[..n])
                    .map_err(|e| guest_error(Status::IoErr, format!("cannot write ID: {e}")))
                    .map(|()| 0)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = kind == VIRTIO_BLK_T_DISCARD;
                let what = if discard { "discard" } else { "write-zeroes" };
                refuse_if_read_only(settings, what)?;
                let segments = read_segments(reader, discard)?;
                for segment in &segments {
                    range_in_disk(disk, segment.offset, segment.len)?;
                }
                for segment in segments.iter().filter(|s| s.len > 0) {
                    let (offset, len) = (segment.offset, segment.len);
                    debug!("queue {}: {what} at {offset} len {len}", self.queue);
                    let result = if discard {
                        disk.discard(offset, len)
                    } else {
                        disk.write_zeroes(offset, len, segment.unmap)
                    };
                    result.map_err(|e| disk_failure(what, offset, &e))?;
                }
                Ok(0)
            }
            other => Err(guest_error(
                Status::Unsupp,
                format!("unsupported request type {other}"),
            )),
        }
    }

    /// Checks a read of the writable bytes of `writer` at `sector` and says how it will be
    /// served: straight into guest memory, or through the bounce buffer.
    fn plan_read<'m, M>(
        &self,
        disk: &dyn Disk,
        guest: &Guest<'m, M>,
        sector: u64,
        writer: &Writer<'_>,
    ) -> Result<ReadPlan<'m>, Failure>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let len = writer.available_bytes();
        debug!("queue {}: read sector {sector} len {len}", self.queue);
        let offset = data_range(disk, sector, len)?;
        Ok(
            match GuestBuffers::of(guest.mem, guest.chain, true, 0, len) {
                Some(buffers) => ReadPlan::Direct(offset, buffers),
                None => ReadPlan::Bounce(offset, len),
            },
        )
    }

    fn read(
        &mut self,
        disk: &dyn Disk,
        offset: u64,
        len: usize,
        writer: &mut Writer<'_>,
    ) -> Result<(), Failure> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES);
            let buf = self.bounce(n);
            let at = offset + done as u64;
            let copied = disk
                .read_at(at, buf)
                .map_err(|e| disk_failure("read", at, &e))
                .and_then(|()| {
                    writer.write_all(buf).map_err(|e| {
                        guest_error(Status::IoErr, format!("cannot copy to guest: {e}"))
                    })
                });
            buf.zeroize();
            copied?;
            done += n;
        }
        Ok(())
    }

    fn write(
        &mut self,
        disk: &dyn Disk,
        offset: u64,
        len: usize,
        reader: &mut Reader<'_>,
    ) -> Result<(), Failure> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES);
            let buf = self.bounce(n);
            let at = offset + done as u64;
            let written = reader
                .read_exact(buf)
                .map_err(|e| guest_error(Status::IoErr, format!("cannot copy from guest: {e}")))
                .and_then(|()| {
                    disk.write_at(at, buf)
                        .map_err(|e| disk_failure("write", at, &e))
                });
            buf.zeroize();
            written?;
            done += n;
        }
        Ok(())
    }

    /// Lets go of (wipes and frees) a bounce buffer larger than `keep` bytes: a worker that
    /// lives on serves the next request with a smaller one, so a guest cannot pin the
    /// largest request's buffer in every request thread.
    pub(crate) fn shed(&mut self, keep: usize) {
        if self.bounce.len() > keep {
            self.bounce = Zeroizing::new(Vec::new());
        }
    }

    /// The bounce buffer's length (tests).
    #[cfg(test)]
    pub(crate) fn bounce_len(&self) -> usize {
        self.bounce.len()
    }

    /// Grows the bounce buffer to `n` bytes as a request of that size would (tests).
    #[cfg(test)]
    pub(crate) fn bounce_for_test(&mut self, n: usize) {
        self.bounce(n);
    }

    fn bounce(&mut self, n: usize) -> &mut [u8] {
        if self.bounce.len() < n {
            // A fresh buffer: growing in place could leave a copy in the freed one.
            self.bounce = Zeroizing::new(vec![0; n]);
        }
        &mut self.bounce[..n]
    }
}

/// A request's chain taken apart: the device-readable bytes (header, then data), the
/// device-writable data bytes, and the status byte.
struct Framed<'a> {
    head: u16,
    reader: Reader<'a>,
    writer: Writer<'a>,
    status: Writer<'a>,
}

/// A request of a batch: served (the bytes written straight into guest memory), or a read
/// straight into guest memory left for the batch's one storage call.
enum Served<'m> {
    Now(usize),
    Later(u64, GuestBuffers<'m>),
}

/// How a read is served.
enum ReadPlan<'m> {
    /// Straight into guest memory, from this byte offset of the disk.
    Direct(u64, GuestBuffers<'m>),
    /// Through the bounce buffer: byte offset and length.
    Bounce(u64, usize),
}

/// Whether `chain` is a read (`VIRTIO_BLK_T_IN`) as its header says now: a hint for
/// grouping requests only, since the guest may change the header before it is served.
pub fn is_read<M>(mem: &GuestMemoryMmap, chain: &DescriptorChain<M>) -> bool
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    chain
        .clone()
        .reader(mem)
        .ok()
        .and_then(|mut reader| header(&mut reader).ok())
        .is_some_and(|(kind, _)| kind == VIRTIO_BLK_T_IN)
}

/// Runs `f`; a panic in it (a bug below the request path) fails the request with an I/O
/// error status, as any host error does, rather than leaving the guest's status byte as the
/// guest left it.
fn guarded<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(panicked()))
}

/// The failure of a request whose serving panicked.
fn panicked() -> Failure {
    Failure {
        status: Status::IoErr,
        reason: "serving it panicked (a bug; the panic message is in the log)".into(),
        host_side: true,
    }
}

/// Reads the request header: its type and sector.
fn header(reader: &mut Reader<'_>) -> Result<(u32, u64), Failure> {
    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| guest_error(Status::IoErr, "request header is shorter than 16 bytes"))?;
    Ok((le32(&header[0..4]), le64(&header[8..16])))
}

/// The guest memory and the chain of the request being run (for [`GuestBuffers`]).
struct Guest<'a, M> {
    mem: &'a GuestMemoryMmap,
    chain: &'a DescriptorChain<M>,
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn refuse_if_read_only(settings: DeviceSettings<'_>, what: &str) -> Result<(), Failure> {
    // 5.2.6.2: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write
    // request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data."
    if settings.read_only {
        Err(guest_error(
            Status::IoErr,
            format!("{what} refused: the disk is read-only"),
        ))
    } else {
        Ok(())
    }
}

/// Validates an IN/OUT data range and returns its byte offset.
fn data_range(disk: &dyn Disk, sector: u64, len: usize) -> Result<u64, Failure> {
    if len > MAX_REQUEST_BYTES {
        return Err(guest_error(
            Status::IoErr,
            format!("request of {len} bytes is larger than the {MAX_REQUEST_BYTES} allowed"),
        ));
    }
    if len as u64 % SECTOR_SIZE != 0 {
        // 5.2.6.1: data length is a multiple of 512 for IN and OUT.
        return Err(guest_error(
            Status::IoErr,
            format!("data length {len} is not a multiple of 512"),
        ));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| guest_error(Status::IoErr, format!("sector {sector} is beyond the disk")))?;
    range_in_disk(disk, offset, len as u64)?;
    Ok(offset)
}

fn range_in_disk(disk: &dyn Disk, offset: u64, len: u64) -> Result<(), Failure> {
    check_range(disk.size(), offset, len).map_err(|e| guest_error(Status::IoErr, e.to_string()))
}

/// One `struct virtio_blk_discard_write_zeroes`, validated and in bytes.
#[derive(Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// Reads and checks the segments of a DISCARD or WRITE_ZEROES request (5.2.6).
fn read_segments(reader: &mut Reader<'_>, discard: bool) -> Result<Vec<Segment>, Failure> {
    let bytes = reader.available_bytes();
    if bytes == 0 || bytes % SEGMENT_LEN != 0 {
        return Err(guest_error(
            Status::IoErr,
            format!("segment list of {bytes} bytes is not a non-empty multiple of 16"),
        ));
    }
    let count = bytes / SEGMENT_LEN;
    if count > MAX_DISCARD_SEG as usize {
        return Err(guest_error(
            Status::IoErr,
            format!("{count} segments, more than the {MAX_DISCARD_SEG} advertised"),
        ));
    }
    let mut segments = Vec::with_capacity(count);
    for _ in 0..count {
        let mut raw = [0u8; SEGMENT_LEN];
        reader
            .read_exact(&mut raw)
            .map_err(|e| guest_error(Status::IoErr, format!("cannot read segment: {e}")))?;
        let sector = le64(&raw[0..8]);
        let num_sectors = le32(&raw[8..12]);
        let flags = le32(&raw[12..16]);
        // 5.2.6.2: UNSUPP if any unknown flag is set, and for a discard with unmap set.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
            return Err(guest_error(
                Status::Unsupp,
                format!("unsupported segment flags {flags:#x}"),
            ));
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(guest_error(
                Status::IoErr,
                format!("segment of {num_sectors} sectors exceeds the advertised maximum"),
            ));
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(|| {
            guest_error(Status::IoErr, format!("sector {sector} is beyond the disk"))
        })?;
        segments.push(Segment {
            offset,
            len: u64::from(num_sectors) * SECTOR_SIZE,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}

/// A chain that cannot be read as a request still gets an I/O error status where it can: in
/// the last byte of its last device-writable descriptor, if that byte is in guest memory. A
/// driver whose status byte happened to be 0 (`VIRTIO_BLK_S_OK`) would otherwise take the
/// unanswered request for a success. Returns the used length (1 if written, else 0).
fn fail_unreadable_chain<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> u32
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    use vm_memory::{Bytes, GuestAddress};
    let last = chain
        .take(usize::from(u16::MAX))
        .filter(|d| d.is_write_only() && d.len() > 0)
        .last();
    let Some(d) = last else { return 0 };
    let Some(at) = d.addr().0.checked_add(u64::from(d.len()) - 1) else {
        return 0;
    };
    match mem.write_obj(Status::IoErr.byte(), GuestAddress(at)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const SERIAL: Serial = *b"qvol-test-serial\0\0\0\0";

    type Serial = [u8; 20];

    struct Setup {
        mem: GuestMemoryMmap,
        disk: MemDisk,
        worker: QueueWorker,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
                disk: MemDisk::new(1 << 20, false),
                worker: QueueWorker::new(0),
            }
        }

        /// Runs one request: header (type, sector), readable `out` bytes, `writable`
        /// data bytes, then a status byte. Returns (status, used len, data read back).
        fn run(
            &mut self,
            kind: u32,
            sector: u64,
            out: &[u8],
            writable: u32,
            read_only: bool,
        ) -> (u8, u32, Vec<u8>) {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
            self.mem.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
            let mut descs = vec![RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0))];
            if !out.is_empty() {
                self.mem.write_slice(out, GuestAddress(DATA)).unwrap();
                descs.push(Descriptor::new(DATA, out.len() as u32, 0, 0).into());
            }
            if writable > 0 {
                let flags = VRING_DESC_F_WRITE as u16;
                descs.push(Descriptor::new(DATA, writable, flags, 0).into());
            }
            descs.push(Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0).into());
            let queue = MockSplitQueue::new(&self.mem, 16);
            let chain = queue.build_desc_chain(&descs).unwrap();
            let settings = DeviceSettings {
                read_only,
                writeback: true,
                serial: &SERIAL,
            };
            let len = self.worker.process(&self.disk, settings, &self.mem, chain);
            let mut status = [0u8];
            self.mem
                .read_slice(&mut status, GuestAddress(STATUS))
                .unwrap();
            let mut data = vec![0u8; writable as usize];
            self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
            (status[0], len, data)
        }
    }

    fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&num.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn write_then_read_round_trips_and_reports_used_length() {
        let mut s = Setup::new();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (status, len, _) = s.run(VIRTIO_BLK_T_OUT, 8, &pattern, 0, false);
        assert_eq!((status, len), (OK, 1));
        assert_eq!(&s.disk.contents()[4096..8192], &pattern[..]);
        let (status, len, data) = s.run(VIRTIO_BLK_T_IN, 8, &[], 4096, false);
        assert_eq!((status, len), (OK, 4097));
        assert_eq!(data, pattern);
    }

    /// A disk whose reads put bytes in the buffer and then fail, as a block failing its tag
    /// after part of the request was decrypted.
    struct TamperedDisk(MemDisk);

    impl Disk for TamperedDisk {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            buf.fill(0xaa);
            Err(DiskError::new(
                DiskErrorKind::Integrity,
                "a block fails its tag",
            ))
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.0.write_at(offset, data)
        }
        fn flush(&self) -> Result<(), DiskError> {
            self.0.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.0.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
            self.0.write_zeroes(offset, len, unmap)
        }
    }

    /// Runs a chain of `descs` (as `(address, len, writable)`) on `disk`; the used length.
    fn run_descs(s: &mut Setup, disk: &dyn Disk, descs: &[(u64, u32, bool)]) -> u32 {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, w)| {
                let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                Descriptor::new(addr, len, flags, 0).into()
            })
            .collect();
        let queue = MockSplitQueue::new(&s.mem, 16);
        let chain = queue.build_desc_chain(&raw).unwrap();
        let settings = DeviceSettings {
            read_only: false,
            writeback: true,
            serial: &SERIAL,
        };
        s.worker.process(disk, settings, &s.mem, chain)
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        hdr
    }

    #[test]
    fn data_in_several_descriptors_round_trips_straight_or_through_the_bounce_buffer() {
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        // Sector-sized parts (guest memory used in place), the header sharing a descriptor
        // with data, and parts that are not whole sectors (the bounce buffer).
        for split in [2048u32, 1536, 100, 4097] {
            let mut s = Setup::new();
            // Write: header and the first `split` bytes in one descriptor, the rest in another.
            let mut first = header(VIRTIO_BLK_T_OUT, 16).to_vec();
            first.extend_from_slice(&pattern[..split as usize]);
            s.mem.write_slice(&first, GuestAddress(HDR)).unwrap();
            s.mem
                .write_slice(&pattern[split as usize..], GuestAddress(DATA))
                .unwrap();
            let disk = MemDisk::new(1 << 20, false);
            let used = run_descs(
                &mut s,
                &disk,
                &[
                    (HDR, 16 + split, false),
                    (DATA, 8192 - split, false),
                    (STATUS, 1, true),
                ],
            );
            assert_eq!(used, 1, "split {split}");
            assert_eq!(&disk.contents()[8192..16384], &pattern[..], "split {split}");
            // Read back into two writable parts, the status byte in the second.
            s.mem
                .write_slice(&header(VIRTIO_BLK_T_IN, 16), GuestAddress(HDR))
                .unwrap();
            s.mem.write_slice(&[0u8; 8193], GuestAddress(DATA)).unwrap();
            let used = run_descs(
                &mut s,
                &disk,
                &[
                    (HDR, 16, false),
                    (DATA, split, true),
                    (DATA + u64::from(split), 8192 - split + 1, true),
                ],
            );
            assert_eq!(used, 8193, "split {split}");
            let mut back = vec![0u8; 8193];
            s.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
            assert_eq!(&back[..8192], &pattern[..], "split {split}");
            assert_eq!(back[8192], OK, "split {split}");
        }
    }

    #[test]
    fn a_read_that_fails_leaves_nothing_in_guest_memory() {
        for split in [4096u32, 1536, 100] {
            let mut s = Setup::new();
            let disk = TamperedDisk(MemDisk::new(1 << 20, false));
            s.mem
                .write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
                .unwrap();
            s.mem
                .write_slice(&[0x11u8; 4097], GuestAddress(DATA))
                .unwrap();
            let used = run_descs(
                &mut s,
                &disk,
                &[
                    (HDR, 16, false),
                    (DATA, split, true),
                    (DATA + u64::from(split), 4096 - split + 1, true),
                ],
            );
            let mut back = vec![0u8; 4097];
            s.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
            assert_eq!(back[4096], IOERR, "split {split}");
            assert_eq!(used, 1, "only the status byte is reported written");
            assert!(
                back[..4096].iter().all(|&b| b != 0xaa),
                "split {split}: what the failed read produced reached the guest"
            );
        }
    }

    #[test]
    fn out_of_range_unaligned_and_oversized_requests_fail_with_ioerr() {
        let mut s = Setup::new();
        let last = (1 << 20) / 512;
        assert_eq!(s.run(VIRTIO_BLK_T_IN, last, &[], 512, false).0, IOERR);
        assert_eq!(s.run(VIRTIO_BLK_T_IN, last - 1, &[], 1024, false).0, IOERR);
        assert_eq!(s.run(VIRTIO_BLK_T_IN, u64::MAX, &[], 512, false).0, IOERR);
        assert_eq!(s.run(VIRTIO_BLK_T_OUT, 0, &[1; 100], 0, false).0, IOERR);
        assert_eq!(s.run(VIRTIO_BLK_T_IN, last - 1, &[], 512, false).0, OK);
    }

    #[test]
    fn writes_to_a_read_only_disk_fail_and_change_nothing() {
        let mut s = Setup::new();
        assert_eq!(s.run(VIRTIO_BLK_T_OUT, 0, &[9; 512], 0, true).0, IOERR);
        let seg = segment(0, 8, 0);
        assert_eq!(s.run(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0, true).0, IOERR);
        assert_eq!(s.run(VIRTIO_BLK_T_DISCARD, 0, &seg, 0, true).0, IOERR);
        assert!(s.disk.contents().iter().all(|&b| b == 0));
        assert_eq!(s.run(VIRTIO_BLK_T_IN, 0, &[], 512, true).0, OK);
    }

    #[test]
    fn unknown_types_get_unsupp_and_get_id_returns_the_serial() {
        let mut s = Setup::new();
        assert_eq!(s.run(99, 0, &[], 0, false).0, UNSUPP);
        let (status, len, data) = s.run(VIRTIO_BLK_T_GET_ID, 0, &[], 20, false);
        assert_eq!((status, len), (OK, 21));
        assert_eq!(&data[..], &SERIAL[..]);
        assert_eq!(s.run(VIRTIO_BLK_T_FLUSH, 0, &[], 0, false).0, OK);
    }

    #[test]
    fn discard_and_write_zeroes_check_flags_and_ranges() {
        let mut s = Setup::new();
        s.run(VIRTIO_BLK_T_OUT, 0, &[5; 8192], 0, false);
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let wz = VIRTIO_BLK_T_WRITE_ZEROES;
        assert_eq!(s.run(wz, 0, &segment(0, 8, unmap), 0, false).0, OK);
        assert!(s.disk.contents()[..4096].iter().all(|&b| b == 0));
        assert_eq!(s.disk.contents()[4096], 5);
        // 5.2.6.2: unmap on a discard and unknown flags are UNSUPP.
        let discard = VIRTIO_BLK_T_DISCARD;
        assert_eq!(s.run(discard, 0, &segment(8, 8, unmap), 0, false).0, UNSUPP);
        assert_eq!(s.run(wz, 0, &segment(8, 8, 4), 0, false).0, UNSUPP);
        assert_eq!(s.disk.contents()[4096], 5);
        // A bad second segment fails the request before the first one runs.
        let mut two = segment(8, 8, 0);
        two.extend(segment(1 << 20, 8, 0));
        assert_eq!(s.run(discard, 0, &two, 0, false).0, IOERR);
        assert_eq!(s.disk.contents()[4096], 5);
        assert_eq!(s.run(discard, 0, &[0; 15], 0, false).0, IOERR);
        assert_eq!(s.run(discard, 0, &segment(8, 8, 0), 0, false).0, OK);
        assert!(s.disk.contents().iter().all(|&b| b == 0));
    }

    #[test]
    fn a_chain_without_a_status_byte_is_dropped_with_len_zero() {
        let mut s = Setup::new();
        let queue = MockSplitQueue::new(&s.mem, 16);
        let descs = [RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0))];
        let chain = queue.build_desc_chain(&descs).unwrap();
        let settings = DeviceSettings {
            read_only: false,
            writeback: true,
            serial: &SERIAL,
        };
        assert_eq!(s.worker.process(&s.disk, settings, &s.mem, chain), 0);
    }

    #[test]
    fn a_short_header_or_memory_outside_the_guest_is_an_error_not_a_panic() {
        let mut s = Setup::new();
        let queue = MockSplitQueue::new(&s.mem, 16);
        let w = VRING_DESC_F_WRITE as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 8, 0, 0)),
            Descriptor::new(STATUS, 1, w, 0).into(),
        ];
        let chain = queue.build_desc_chain(&descs).unwrap();
        let settings = DeviceSettings {
            read_only: false,
            writeback: true,
            serial: &SERIAL,
        };
        assert_eq!(s.worker.process(&s.disk, settings, &s.mem, chain), 1);
        let mut status = [0u8];
        s.mem.read_slice(&mut status, GuestAddress(STATUS)).unwrap();
        assert_eq!(status[0], IOERR);

        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
            Descriptor::new(0x1_0000_0000, 4096, w, 0).into(),
            Descriptor::new(STATUS, 1, w, 0).into(),
        ];
        // The chain cannot be read, but its status byte still says so: left as it was, a 0
        // there would read as success.
        s.mem.write_slice(&[0], GuestAddress(STATUS)).unwrap();
        let chain = queue.build_desc_chain(&descs).unwrap();
        assert_eq!(s.worker.process(&s.disk, settings, &s.mem, chain), 1);
        s.mem.read_slice(&mut status, GuestAddress(STATUS)).unwrap();
        assert_eq!(status[0], IOERR);
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::LogLimiter;

    #[test]
    fn allows_a_burst_then_counts() {
        let mut l = LogLimiter::default();
        let allowed = (0..100).filter(|_| l.allow(0)).count();
        assert_eq!(allowed, 10);
        assert_eq!(l.suppressed, 90);
    }
}
