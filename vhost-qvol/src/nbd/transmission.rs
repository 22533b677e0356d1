//! The transmission phase (proto.md "Transmission", "Request types"): one request at a time,
//! each answered before the next is read, so replies come in request order.
//!
//! Reads and writes move through a buffer of at most [`PIECE`] bytes, whatever the request
//! length: a connection holds at most that much client data in memory.

use log::{debug, trace, warn};

use super::handshake::Session;
use super::proto::{self, Request};
use super::wire::{Wire, WireError};
use super::{ConnError, Export};
use crate::disk::{DiskError, DiskErrorKind};

/// The largest piece of a read or write held in memory at once.
pub const PIECE: usize = 1 << 20;

/// The most extents one `NBD_CMD_BLOCK_STATUS` reply describes ("SHOULD NOT send more than
/// 2^20 status descriptors in a single chunk"): the client asks again for the rest.
const MAX_STATUS_EXTENTS: usize = 16 << 10;

/// The most extents a read asks the disk for, to skip holes (the rest is read as data).
const MAX_READ_EXTENTS: usize = 1024;

/// A request that failed: an NBD error value ("Error values") and a sentence for the client.
#[derive(Debug)]
struct Failure {
    error: u32,
    message: String,
}

impl Failure {
    fn new(error: u32, message: impl Into<String>) -> Self {
        Self {
            error,
            message: message.into(),
        }
    }

    /// What a failed disk operation tells the client. `writing`: a range past the end is
    /// `NBD_ENOSPC` ("SHOULD return NBD_ENOSPC if it receives a write request including one
    /// or more sectors beyond the size of the device"), else `NBD_EINVAL`.
    fn disk(err: &DiskError, writing: bool) -> Self {
        let error = match err.kind() {
            DiskErrorKind::Integrity | DiskErrorKind::Io => proto::EIO,
            DiskErrorKind::OutOfRange if writing => proto::ENOSPC,
            DiskErrorKind::OutOfRange | DiskErrorKind::Unaligned => proto::EINVAL,
            DiskErrorKind::ReadOnly => proto::EPERM,
            DiskErrorKind::Unsupported => proto::EINVAL,
        };
        Self::new(error, err.to_string())
    }
}

/// How a request ended, for the loop to answer.
enum Reply {
    /// The handler sent the whole reply itself.
    Sent,
    /// Success without data.
    Done,
    /// Failure, nothing sent yet.
    Failed(Failure),
}

/// Serves requests until the client disconnects (`NBD_CMD_DISC` or a close) or the server
/// stops.
pub fn serve(wire: &mut Wire, export: &Export, session: &Session<'_>) -> Result<(), ConnError> {
    let mut buf = Vec::new();
    loop {
        if wire.stopping() {
            return Err(ConnError::Wire(WireError::Stopped));
        }
        let mut header = [0u8; proto::REQUEST_LEN];
        match wire.read(&mut header, true) {
            Err(WireError::Closed) => return Ok(()),
            other => other?,
        }
        let req = Request::decode(&header).map_err(|magic| {
            ConnError::Protocol(format!("request magic {magic:#x} is not NBD_REQUEST_MAGIC"))
        })?;
        trace!(
            "NBD request {} flags {:#x} at {} of {} bytes (cookie {:#x})",
            req.kind,
            req.flags,
            req.offset,
            req.len,
            req.cookie
        );
        let reply = match req.kind {
            // "There is no reply to an NBD_CMD_DISC."
            proto::CMD_DISC => return Ok(()),
            proto::CMD_READ => read(wire, export, session, &req, &mut buf)?,
            proto::CMD_WRITE => write(wire, export, &req, &mut buf)?,
            proto::CMD_BLOCK_STATUS => block_status(wire, export, session, &req)?,
            _ => outcome(other_command(export, &req)),
        };
        match reply {
            Reply::Sent => {}
            Reply::Done => wire.write(&[&proto::simple_reply(0, req.cookie)])?,
            Reply::Failed(f) => {
                debug!(
                    "NBD request {} at {} of {} bytes failed: {}",
                    req.kind, req.offset, req.len, f.message
                );
                send_error(wire, session, req.cookie, &f, None)?;
            }
        }
    }
}

fn outcome(result: Result<(), Failure>) -> Reply {
    match result {
        Ok(()) => Reply::Done,
        Err(f) => Reply::Failed(f),
    }
}

/// An error reply: a structured `NBD_REPLY_TYPE_ERROR` (or `_ERROR_OFFSET`) chunk with the
/// message when structured replies were negotiated ("The server SHOULD prefer sending
/// errors via a structured reply"), else a simple reply with the error value.
fn send_error(
    wire: &mut Wire,
    session: &Session<'_>,
    cookie: u64,
    failure: &Failure,
    offset: Option<u64>,
) -> Result<(), WireError> {
    if !session.structured {
        return wire.write(&[&proto::simple_reply(failure.error, cookie)]);
    }
    let payload = proto::error_payload(failure.error, &failure.message, offset);
    let kind = if offset.is_some() {
        proto::REPLY_TYPE_ERROR_OFFSET
    } else {
        proto::REPLY_TYPE_ERROR
    };
    wire.write(&[
        &proto::chunk_header(proto::REPLY_FLAG_DONE, kind, cookie, payload.len() as u32),
        &payload,
    ])
}

/// Refuses command flags not documented for the command ("The server SHOULD return
/// NBD_EINVAL if it receives an unknown command flag"). `NBD_CMD_FLAG_FUA` is "valid for all
/// commands".
fn check_flags(req: &Request, allowed: u16) -> Result<(), Failure> {
    let unknown = req.flags & !(allowed | proto::CMD_FLAG_FUA);
    if unknown != 0 {
        return Err(Failure::new(
            proto::EINVAL,
            format!("command flags {unknown:#x} are not valid for this command"),
        ));
    }
    Ok(())
}

/// Checks alignment to the advertised minimum block size and the export's end ("Size
/// constraints": "The server SHOULD report an NBD_EINVAL error if the client's request is
/// not aligned ..."); `beyond` is the error for a range past the end.
fn check_range(export: &Export, offset: u64, len: u32, beyond: u32) -> Result<(), Failure> {
    let block = u64::from(proto::MIN_BLOCK);
    if offset % block != 0 || u64::from(len) % block != 0 {
        return Err(Failure::new(
            proto::EINVAL,
            format!("{len} bytes at offset {offset} are not aligned to {block} bytes"),
        ));
    }
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > export.size)
    {
        return Err(Failure::new(
            beyond,
            format!(
                "{len} bytes at offset {offset} go past the end of the {}-byte export",
                export.size
            ),
        ));
    }
    Ok(())
}

fn check_writable(export: &Export) -> Result<(), Failure> {
    if export.opts.read_only {
        // "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only
        // export."
        return Err(Failure::new(proto::EPERM, "the export is read-only"));
    }
    Ok(())
}

/// Flushes after a write with `NBD_CMD_FLAG_FUA` ("MUST NOT send its reply ... until the
/// data ... is persisted").
fn fua(export: &Export, req: &Request) -> Result<(), Failure> {
    if req.flags & proto::CMD_FLAG_FUA != 0 {
        export
            .disk
            .flush()
            .map_err(|e| logged(Failure::disk(&e, true)))?;
    }
    Ok(())
}

/// A disk failure is worth a line in the log (a tampered block, a failing host disk).
fn logged(f: Failure) -> Failure {
    warn!("NBD request failed: {}", f.message);
    f
}

/// `NBD_CMD_FLUSH`, `NBD_CMD_TRIM`, `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_CACHE`, and unknown
/// commands ("SHOULD return NBD_EINVAL if it receives an unknown command").
fn other_command(export: &Export, req: &Request) -> Result<(), Failure> {
    let disk = &export.disk;
    match req.kind {
        proto::CMD_FLUSH => {
            check_flags(req, 0)?;
            disk.flush().map_err(|e| logged(Failure::disk(&e, true)))
        }
        proto::CMD_TRIM => {
            check_flags(req, 0)?;
            check_writable(export)?;
            check_range(export, req.offset, req.len, proto::EINVAL)?;
            if req.len > 0 {
                disk.discard(req.offset, u64::from(req.len))
                    .map_err(|e| logged(Failure::disk(&e, true)))?;
            }
            fua(export, req)
        }
        proto::CMD_WRITE_ZEROES => write_zeroes(export, req),
        proto::CMD_CACHE => {
            // A hint with nothing to do: data is decrypted when read.
            check_flags(req, 0)?;
            check_range(export, req.offset, req.len, proto::EINVAL)
        }
        other => Err(Failure::new(
            proto::EINVAL,
            format!("unknown command {other}"),
        )),
    }
}

/// `NBD_CMD_WRITE_ZEROES`. Without `NBD_CMD_FLAG_NO_HOLE` the disk may unmap; a fast zero
/// (`NBD_CMD_FLAG_FAST_ZERO`) is served only then, as unmapping is a metadata change
/// (faster than writing), and fails with `NBD_ENOTSUP` when the client wants no hole.
fn write_zeroes(export: &Export, req: &Request) -> Result<(), Failure> {
    check_flags(req, proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO)?;
    check_writable(export)?;
    check_range(export, req.offset, req.len, proto::ENOSPC)?;
    let no_hole = req.flags & proto::CMD_FLAG_NO_HOLE != 0;
    if no_hole && req.flags & proto::CMD_FLAG_FAST_ZERO != 0 {
        return Err(Failure::new(
            proto::ENOTSUP,
            "zeroing without holes is no faster than a write",
        ));
    }
    if req.len > 0 {
        export
            .disk
            .write_zeroes(req.offset, u64::from(req.len), !no_hole)
            .map_err(|e| logged(Failure::disk(&e, true)))?;
    }
    fua(export, req)
}

/// `NBD_CMD_WRITE`: the payload is read in pieces and written as it comes. A payload over
/// the maximum ends the connection (it cannot be skipped without reading it: "either the
/// server or the client MAY initiate a hard disconnect if a payload length ... would be
/// large enough to be deemed a denial of service attack").
fn write(
    wire: &mut Wire,
    export: &Export,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<Reply, ConnError> {
    if req.len > proto::MAX_PAYLOAD {
        return Err(ConnError::Protocol(format!(
            "a write of {} bytes exceeds the maximum payload of {} bytes",
            req.len,
            proto::MAX_PAYLOAD
        )));
    }
    let len = req.len as usize;
    let refused = check_flags(req, 0)
        .and_then(|()| check_writable(export))
        .and_then(|()| check_range(export, req.offset, req.len, proto::ENOSPC));
    if let Err(f) = refused {
        wire.skip(u64::from(req.len))?;
        return Ok(Reply::Failed(f));
    }
    let mut failure = None;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PIECE);
        buf.clear();
        buf.resize(n, 0);
        wire.read(buf, false)?;
        if failure.is_none() {
            if let Err(e) = export.disk.write_at(req.offset + done as u64, buf) {
                failure = Some(logged(Failure::disk(&e, true)));
            }
        }
        done += n;
    }
    if let Some(f) = failure {
        return Ok(Reply::Failed(f));
    }
    Ok(outcome(fua(export, req)))
}

/// A stretch of a read: data to read from the disk (at most [`PIECE`] bytes), or a hole that
/// reads as zeros without touching the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    len: u32,
    data: bool,
}

/// Splits a read into holes and data pieces, by the disk's allocation. A disk that cannot
/// tell is read whole.
fn plan_read(export: &Export, offset: u64, len: u32) -> Vec<Segment> {
    let extents = export
        .disk
        .allocation(offset, u64::from(len), MAX_READ_EXTENTS)
        .unwrap_or_else(|e| {
            debug!("no allocation for a read at {offset}: {e}");
            Vec::new()
        });
    let mut plan = Vec::new();
    let mut pos = offset;
    let end = offset + u64::from(len);
    let push = |plan: &mut Vec<Segment>, from: u64, to: u64, data: bool| {
        let mut at = from;
        while at < to {
            let step = if data {
                (to - at).min(PIECE as u64)
            } else {
                to - at
            };
            // A read is at most MAX_PAYLOAD bytes: every step fits in u32.
            plan.push(Segment {
                offset: at,
                len: step as u32,
                data,
            });
            at += step;
        }
    };
    for extent in extents {
        let next = pos.saturating_add(extent.len).min(end);
        push(&mut plan, pos, next, extent.allocated);
        pos = next;
        if pos >= end {
            break;
        }
    }
    push(&mut plan, pos, end, true);
    plan
}

/// `NBD_CMD_READ`, answered with a simple reply, with structured chunks (holes as
/// `NBD_REPLY_TYPE_OFFSET_HOLE`), or with one unfragmented chunk (`NBD_CMD_FLAG_DF`).
fn read(
    wire: &mut Wire,
    export: &Export,
    session: &Session<'_>,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<Reply, ConnError> {
    let allowed = if session.structured {
        proto::CMD_FLAG_DF
    } else {
        0
    };
    if let Err(f) = check_flags(req, allowed) {
        return Ok(Reply::Failed(f));
    }
    if req.len > proto::MAX_PAYLOAD {
        return Ok(Reply::Failed(Failure::new(
            proto::EOVERFLOW,
            format!(
                "a read of {} bytes exceeds the maximum payload of {} bytes",
                req.len,
                proto::MAX_PAYLOAD
            ),
        )));
    }
    if let Err(f) = check_range(export, req.offset, req.len, proto::EINVAL) {
        return Ok(Reply::Failed(f));
    }
    let plan = plan_read(export, req.offset, req.len);
    if !session.structured {
        return read_simple(wire, export, req, &plan, buf);
    }
    if req.len == 0 {
        wire.write(&[&proto::chunk_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_NONE,
            req.cookie,
            0,
        )])?;
        return Ok(Reply::Sent);
    }
    if req.flags & proto::CMD_FLAG_DF != 0 {
        read_unfragmented(wire, export, session, req, &plan, buf)
    } else {
        read_chunks(wire, export, session, req, &plan, buf)
    }
}

/// Fills `buf` with a segment: read from the disk, or zeros for a hole.
fn fill(export: &Export, seg: &Segment, buf: &mut Vec<u8>) -> Result<(), Failure> {
    buf.clear();
    buf.resize(seg.len as usize, 0);
    if seg.data {
        export
            .disk
            .read_at(seg.offset, buf)
            .map_err(|e| logged(Failure::disk(&e, false)))?;
    }
    Ok(())
}

/// A simple reply ("Simple replies"): the error is known only before the header is sent;
/// a failure after it leaves nothing but a hard disconnect ("the server MUST immediately
/// initiate a hard disconnect").
fn read_simple(
    wire: &mut Wire,
    export: &Export,
    req: &Request,
    plan: &[Segment],
    buf: &mut Vec<u8>,
) -> Result<Reply, ConnError> {
    let mut header_sent = false;
    for seg in plan {
        if let Err(f) = fill(export, seg, buf) {
            if !header_sent {
                return Ok(Reply::Failed(f));
            }
            return Err(ConnError::Server(format!(
                "a read failed after its reply began: {}",
                f.message
            )));
        }
        if !header_sent {
            wire.write(&[&proto::simple_reply(0, req.cookie)])?;
            header_sent = true;
        }
        wire.write(&[buf])?;
    }
    if !header_sent {
        wire.write(&[&proto::simple_reply(0, req.cookie)])?;
    }
    Ok(Reply::Sent)
}

/// Structured chunks: one per segment, the last flagged `NBD_REPLY_FLAG_DONE` (each is read
/// before it is sent, so no error can follow it). A failed piece ends the reply with an
/// `NBD_REPLY_TYPE_ERROR_OFFSET` chunk ("MAY omit further content chunks").
fn read_chunks(
    wire: &mut Wire,
    export: &Export,
    session: &Session<'_>,
    req: &Request,
    plan: &[Segment],
    buf: &mut Vec<u8>,
) -> Result<Reply, ConnError> {
    for (i, seg) in plan.iter().enumerate() {
        let flags = if i + 1 == plan.len() {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        if !seg.data {
            wire.write(&[
                &proto::chunk_header(flags, proto::REPLY_TYPE_OFFSET_HOLE, req.cookie, 12),
                &proto::hole_payload(seg.offset, seg.len),
            ])?;
            continue;
        }
        if let Err(f) = fill(export, seg, buf) {
            send_error(wire, session, req.cookie, &f, Some(seg.offset))?;
            return Ok(Reply::Sent);
        }
        wire.write(&[
            &proto::chunk_header(
                flags,
                proto::REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                seg.len + 8,
            ),
            &seg.offset.to_be_bytes(),
            buf,
        ])?;
    }
    Ok(Reply::Sent)
}

/// `NBD_CMD_FLAG_DF`: one `NBD_REPLY_TYPE_OFFSET_DATA` chunk for the whole range, holes as
/// explicit zeros ("the server MUST use NBD_REPLY_TYPE_OFFSET_DATA with the zeroes
/// explicitly present"). A failure is padded with zeros to the chunk's end, then reported
/// ("it MUST use padding bytes").
fn read_unfragmented(
    wire: &mut Wire,
    export: &Export,
    session: &Session<'_>,
    req: &Request,
    plan: &[Segment],
    buf: &mut Vec<u8>,
) -> Result<Reply, ConnError> {
    wire.write(&[
        &proto::chunk_header(0, proto::REPLY_TYPE_OFFSET_DATA, req.cookie, req.len + 8),
        &req.offset.to_be_bytes(),
    ])?;
    let mut failure: Option<(Failure, u64)> = None;
    for seg in plan {
        if failure.is_none() {
            if let Err(f) = fill(export, seg, buf) {
                failure = Some((f, seg.offset));
            }
        }
        if failure.is_some() {
            buf.clear();
            buf.resize(seg.len as usize, 0);
        }
        wire.write(&[buf])?;
    }
    match failure {
        Some((f, offset)) => send_error(wire, session, req.cookie, &f, Some(offset))?,
        None => wire.write(&[&proto::chunk_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_NONE,
            req.cookie,
            0,
        )])?,
    }
    Ok(Reply::Sent)
}

/// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: an unallocated extent is
/// `NBD_STATE_HOLE | NBD_STATE_ZERO` (it reads as zeros and takes no space), an allocated
/// one 0.
fn block_status(
    wire: &mut Wire,
    export: &Export,
    session: &Session<'_>,
    req: &Request,
) -> Result<Reply, ConnError> {
    let refused = check_flags(req, proto::CMD_FLAG_REQ_ONE).and_then(|()| {
        let Some(context) = session.base_allocation.filter(|_| session.structured) else {
            // "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
            // without selecting at least one metadata context."
            return Err(Failure::new(
                proto::EINVAL,
                "no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)",
            ));
        };
        if req.len == 0 {
            return Err(Failure::new(proto::EINVAL, "a block status of 0 bytes"));
        }
        // Any byte alignment is answered; only the end matters ("SHOULD return NBD_EINVAL
        // if it receives a NBD_CMD_BLOCK_STATUS request including one or more sectors
        // beyond the size of the device").
        if req
            .offset
            .checked_add(u64::from(req.len))
            .is_none_or(|end| end > export.size)
        {
            return Err(Failure::new(
                proto::EINVAL,
                format!(
                    "{} bytes at offset {} go past the end of the {}-byte export",
                    req.len, req.offset, export.size
                ),
            ));
        }
        Ok(context)
    });
    let context = match refused {
        Ok(context) => context,
        Err(f) => return Ok(Reply::Failed(f)),
    };
    let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let max = if one { 1 } else { MAX_STATUS_EXTENTS };
    let extents = match export.disk.allocation(req.offset, u64::from(req.len), max) {
        Ok(extents) => extents,
        Err(e) => return Ok(Reply::Failed(logged(Failure::disk(&e, false)))),
    };
    let descriptors = status_descriptors(&extents, req.len, max);
    let payload = proto::block_status_payload(context, &descriptors);
    wire.write(&[
        &proto::chunk_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            payload.len() as u32,
        ),
        &payload,
    ])?;
    Ok(Reply::Sent)
}

/// The disk's extents as (length, flags) descriptors: nonzero lengths, no more than `max`,
/// not past the request's `len` (so `NBD_CMD_FLAG_REQ_ONE` holds), at least one.
fn status_descriptors(extents: &[qvol_core::Extent], len: u32, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for extent in extents {
        if left == 0 || out.len() == max {
            break;
        }
        let take = u32::try_from(extent.len).unwrap_or(u32::MAX).min(left);
        if take == 0 {
            continue;
        }
        let flags = if extent.allocated {
            0
        } else {
            proto::STATE_HOLE | proto::STATE_ZERO
        };
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += take,
            _ => out.push((take, flags)),
        }
        left -= take;
    }
    if out.is_empty() {
        // "a server MAY always safely report a status of 0 for any block".
        out.push((len, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::super::testing::{serve_pair, Client, SparseDisk, BLOCK};
    use super::super::NbdOptions;
    use super::*;
    use crate::disk::Disk;
    use qvol_core::Extent;

    fn extent(len: u64, allocated: bool) -> Extent {
        Extent { len, allocated }
    }

    #[test]
    fn descriptors_are_clipped_merged_and_never_empty() {
        let hole = proto::STATE_HOLE | proto::STATE_ZERO;
        assert_eq!(
            status_descriptors(&[extent(4096, false), extent(8192, true)], 8192, 100),
            vec![(4096, hole), (4096, 0)]
        );
        assert_eq!(
            status_descriptors(
                &[extent(0, true), extent(512, true), extent(512, true)],
                4096,
                9
            ),
            vec![(1024, 0)]
        );
        assert_eq!(status_descriptors(&[], 512, 1), vec![(512, 0)]);
        assert_eq!(
            status_descriptors(&[extent(u64::MAX, false)], 4096, 1),
            vec![(4096, hole)]
        );
        assert_eq!(
            status_descriptors(
                &[extent(512, false), extent(512, true), extent(512, false)],
                4096,
                2
            ),
            vec![(512, hole), (512, 0)]
        );
    }

    #[test]
    fn failures_map_disk_errors_to_nbd_error_values() {
        let e = |kind| DiskError::new(kind, "x");
        assert_eq!(
            Failure::disk(&e(DiskErrorKind::Integrity), false).error,
            proto::EIO
        );
        assert_eq!(Failure::disk(&e(DiskErrorKind::Io), true).error, proto::EIO);
        assert_eq!(
            Failure::disk(&e(DiskErrorKind::OutOfRange), true).error,
            proto::ENOSPC
        );
        assert_eq!(
            Failure::disk(&e(DiskErrorKind::OutOfRange), false).error,
            proto::EINVAL
        );
        assert_eq!(
            Failure::disk(&e(DiskErrorKind::Unaligned), true).error,
            proto::EINVAL
        );
        assert_eq!(
            Failure::disk(&e(DiskErrorKind::ReadOnly), true).error,
            proto::EPERM
        );
    }

    const MIB: u64 = 1 << 20;

    fn start(
        read_only: bool,
        structured: bool,
        meta: bool,
    ) -> (Arc<SparseDisk>, Client, std::thread::JoinHandle<()>) {
        let disk = SparseDisk::new(8 * MIB);
        let opts = NbdOptions {
            read_only,
            ..NbdOptions::default()
        };
        let (mut c, server) = serve_pair(Arc::clone(&disk) as Arc<dyn Disk>, opts);
        c.start(structured, meta);
        (disk, c, server)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn write(c: &mut Client, flags: u16, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        c.request(flags, proto::CMD_WRITE, cookie, offset, data.len() as u32);
        c.send(data);
        let (error, got) = c.simple();
        assert_eq!(got, cookie);
        error
    }

    fn simple_read(c: &mut Client, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        c.request(0, proto::CMD_READ, 9, offset, len);
        match c.simple() {
            (0, 9) => Ok(c.recv(len as usize)),
            (error, 9) => Err(error),
            (_, other) => panic!("reply for cookie {other}"),
        }
    }

    /// A request that needs no payload, answered with a simple reply or an error chunk.
    fn command(
        c: &mut Client,
        structured: bool,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
    ) -> u32 {
        c.request(flags, kind, 5, offset, len);
        answer(c, structured)
    }

    /// The error value of a reply with no data (0 for success).
    fn answer(c: &mut Client, structured: bool) -> u32 {
        if !structured {
            return c.simple().0;
        }
        let mut header = c.recv(4);
        header.extend(c.recv(12));
        let magic = u32::from_be_bytes(header[..4].try_into().unwrap());
        if magic == proto::SIMPLE_REPLY_MAGIC {
            return u32::from_be_bytes(header[4..8].try_into().unwrap());
        }
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC);
        let kind = u16::from_be_bytes(header[6..8].try_into().unwrap());
        let len = u32::from_be_bytes(c.recv(4).try_into().unwrap()) as usize;
        let payload = c.recv(len);
        assert_eq!(kind, proto::REPLY_TYPE_ERROR);
        let message_len = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
        assert!(message_len > 0, "error chunks carry a message");
        u32::from_be_bytes(payload[..4].try_into().unwrap())
    }

    #[test]
    fn simple_writes_and_reads_round_trip_across_pieces() {
        let (disk, mut c, _) = start(false, false, false);
        let data = pattern(3 * PIECE + 4096, 1);
        assert_eq!(write(&mut c, 0, 41, MIB, &data), 0);
        assert_eq!(simple_read(&mut c, MIB, data.len() as u32).unwrap(), data);
        assert_eq!(&disk.contents()[MIB as usize..][..data.len()], &data[..]);
        assert_eq!(simple_read(&mut c, 0, 0).unwrap(), b"");
    }

    #[test]
    fn structured_reads_send_holes_and_data() {
        let (_, mut c, _) = start(false, true, false);
        let data = pattern(4096, 2);
        assert_eq!(write(&mut c, 0, 1, 8192, &data), 0);
        c.request(0, proto::CMD_READ, 3, 4096, 3 * 4096);
        let chunks = c.chunks(3);
        let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            vec![
                proto::REPLY_TYPE_OFFSET_HOLE,
                proto::REPLY_TYPE_OFFSET_DATA,
                proto::REPLY_TYPE_OFFSET_HOLE
            ]
        );
        assert_eq!(chunks[1].payload[8..], data[..]);
        c.request(0, proto::CMD_READ, 4, 0, 4 * 4096);
        let read = c.structured_read(4, 0, 4 * 4096).unwrap();
        assert_eq!(&read[8192..12288], &data[..]);
        assert!(read[..8192].iter().chain(&read[12288..]).all(|b| *b == 0));
    }

    #[test]
    fn unfragmented_reads_are_one_data_chunk_with_zeros_for_holes() {
        let (_, mut c, _) = start(false, true, false);
        let data = pattern(4096, 3);
        assert_eq!(write(&mut c, 0, 1, 4096, &data), 0);
        let len = 2 * PIECE as u32;
        c.request(proto::CMD_FLAG_DF, proto::CMD_READ, 6, 0, len);
        let chunks = c.chunks(6);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].kind, proto::REPLY_TYPE_OFFSET_DATA);
        assert_eq!(chunks[0].payload.len(), len as usize + 8);
        assert_eq!(&chunks[0].payload[8 + 4096..8 + 8192], &data[..]);
        assert!(chunks[0].payload[8..8 + 4096].iter().all(|b| *b == 0));
        assert_eq!(chunks[1].kind, proto::REPLY_TYPE_NONE);
    }

    #[test]
    fn bad_reads_fail_with_the_documented_errors_and_the_connection_goes_on() {
        for structured in [false, true] {
            let (_, mut c, _) = start(false, structured, false);
            for (flags, offset, len, error) in [
                (0, 8 * MIB, 512, proto::EINVAL),
                (0, 8 * MIB - 512, 1024, proto::EINVAL),
                (0, u64::MAX - 511, 1024, proto::EINVAL),
                (0, 100, 512, proto::EINVAL),
                (0, 0, 100, proto::EINVAL),
                (0, 0, proto::MAX_PAYLOAD + 512, proto::EOVERFLOW),
                (proto::CMD_FLAG_NO_HOLE, 0, 512, proto::EINVAL),
            ] {
                c.request(flags, proto::CMD_READ, 8, offset, len);
                if structured {
                    assert_eq!(c.structured_read(8, offset, 0), Err(error));
                } else {
                    assert_eq!(c.simple(), (error, 8));
                }
            }
            if !structured {
                // NBD_CMD_FLAG_DF without structured replies.
                assert_eq!(
                    command(&mut c, false, proto::CMD_FLAG_DF, proto::CMD_READ, 0, 512),
                    proto::EINVAL
                );
            }
            assert_eq!(command(&mut c, structured, 0, proto::CMD_FLUSH, 0, 0), 0);
        }
    }

    #[test]
    fn failed_reads_report_eio_before_or_inside_the_reply() {
        let (disk, mut c, _) = start(false, false, false);
        assert_eq!(write(&mut c, 0, 1, 0, &pattern(8192, 4)), 0);
        *disk.fail_reads_at.lock().unwrap() = Some(4096);
        assert_eq!(simple_read(&mut c, 0, 8192), Err(proto::EIO));
        assert_eq!(simple_read(&mut c, 0, 4096).unwrap(), pattern(4096, 4));

        let (disk, mut c, _) = start(false, true, false);
        assert_eq!(write(&mut c, 0, 1, 0, &pattern(8192, 4)), 0);
        *disk.fail_reads_at.lock().unwrap() = Some(4096);
        c.request(0, proto::CMD_READ, 2, 0, 8192);
        let chunks = c.chunks(2);
        let last = chunks.last().unwrap();
        assert_eq!(last.kind, proto::REPLY_TYPE_ERROR_OFFSET);
        assert_eq!(&last.payload[..4], &proto::EIO.to_be_bytes());
        c.request(proto::CMD_FLAG_DF, proto::CMD_READ, 3, 0, 8192);
        assert_eq!(c.structured_read(3, 0, 8192), Err(proto::EIO));
        assert_eq!(command(&mut c, true, 0, proto::CMD_FLUSH, 0, 0), 0);
    }

    #[test]
    fn refused_writes_consume_their_payload() {
        let (disk, mut c, _) = start(false, false, false);
        assert_eq!(
            write(&mut c, 0, 1, 8 * MIB - 512, &[1; 1024]),
            proto::ENOSPC
        );
        assert_eq!(write(&mut c, 0, 2, 100, &[1; 512]), proto::EINVAL);
        assert_eq!(
            write(&mut c, proto::CMD_FLAG_DF, 3, 0, &[1; 512]),
            proto::EINVAL
        );
        assert!(disk.contents().iter().all(|b| *b == 0));
        assert_eq!(write(&mut c, 0, 4, 0, &[7; 512]), 0);
        assert_eq!(disk.contents()[..512], [7; 512]);

        // With structured replies the error comes as a chunk with a message.
        let (_, mut c, _) = start(false, true, false);
        c.request(0, proto::CMD_WRITE, 5, 8 * MIB, 512);
        c.send(&[1; 512]);
        assert_eq!(answer(&mut c, true), proto::ENOSPC);
        assert_eq!(command(&mut c, true, 0, proto::CMD_FLUSH, 0, 0), 0);
    }

    #[test]
    fn fua_flushes_before_the_reply() {
        let (disk, mut c, _) = start(false, false, false);
        assert_eq!(write(&mut c, 0, 1, 0, &[1; 4096]), 0);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 0);
        assert_eq!(write(&mut c, proto::CMD_FLAG_FUA, 2, 0, &[1; 4096]), 0);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
        assert_eq!(
            command(&mut c, false, proto::CMD_FLAG_FUA, proto::CMD_TRIM, 0, 4096),
            0
        );
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 2);
        assert_eq!(command(&mut c, false, 0, proto::CMD_FLUSH, 0, 0), 0);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn read_only_exports_refuse_every_write_with_eperm() {
        let (disk, mut c, _) = start(true, false, false);
        assert_eq!(write(&mut c, 0, 1, 0, &[9; 4096]), proto::EPERM);
        assert_eq!(
            command(&mut c, false, 0, proto::CMD_TRIM, 0, 4096),
            proto::EPERM
        );
        assert_eq!(
            command(&mut c, false, 0, proto::CMD_WRITE_ZEROES, 0, 4096),
            proto::EPERM
        );
        assert!(disk.contents().iter().all(|b| *b == 0));
        assert_eq!(simple_read(&mut c, 0, 4096).unwrap(), vec![0; 4096]);
    }

    #[test]
    fn trim_and_write_zeroes_read_back_as_zeros_and_become_holes() {
        let (_, mut c, _) = start(false, true, true);
        assert_eq!(write(&mut c, 0, 1, 0, &pattern(4 * 4096, 5)), 0);
        assert_eq!(command(&mut c, true, 0, proto::CMD_TRIM, 0, 4096), 0);
        assert_eq!(
            command(&mut c, true, 0, proto::CMD_WRITE_ZEROES, 4096, 4096),
            0
        );
        assert_eq!(
            command(
                &mut c,
                true,
                proto::CMD_FLAG_NO_HOLE,
                proto::CMD_WRITE_ZEROES,
                8192,
                512
            ),
            0
        );
        assert_eq!(
            command(
                &mut c,
                true,
                proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
                proto::CMD_WRITE_ZEROES,
                0,
                4096
            ),
            proto::ENOTSUP
        );
        assert_eq!(
            command(
                &mut c,
                true,
                proto::CMD_FLAG_FAST_ZERO,
                proto::CMD_WRITE_ZEROES,
                0,
                4096
            ),
            0
        );
        assert_eq!(
            command(&mut c, true, 0, proto::CMD_WRITE_ZEROES, 8 * MIB, 512),
            proto::ENOSPC
        );
        assert_eq!(
            command(&mut c, true, 0, proto::CMD_TRIM, 8 * MIB, 512),
            proto::EINVAL
        );
        c.request(0, proto::CMD_READ, 2, 0, 4 * 4096);
        let read = c.structured_read(2, 0, 4 * 4096).unwrap();
        let want = pattern(4 * 4096, 5);
        assert!(read[..8192 + 512].iter().all(|b| *b == 0));
        assert_eq!(&read[8192 + 512..], &want[8192 + 512..]);
        let hole = proto::STATE_HOLE | proto::STATE_ZERO;
        assert_eq!(
            block_status(&mut c, 0, 0, 4 * 4096),
            vec![(8192, hole), (8192, 0)]
        );
    }

    fn block_status(c: &mut Client, flags: u16, offset: u64, len: u32) -> Vec<(u32, u32)> {
        c.request(flags, proto::CMD_BLOCK_STATUS, 11, offset, len);
        let chunks = c.chunks(11);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].kind, proto::REPLY_TYPE_BLOCK_STATUS);
        let p = &chunks[0].payload;
        assert_eq!(&p[..4], &1u32.to_be_bytes(), "the context id given at SET");
        p[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn block_status_reports_holes_and_data() {
        let (_, mut c, _) = start(false, true, true);
        let hole = proto::STATE_HOLE | proto::STATE_ZERO;
        assert_eq!(
            block_status(&mut c, 0, 0, 8 * MIB as u32),
            vec![(8 * MIB as u32, hole)]
        );
        assert_eq!(write(&mut c, 0, 1, MIB, &[1; 2 * BLOCK as usize]), 0);
        assert_eq!(
            block_status(&mut c, 0, 0, 8 * MIB as u32),
            vec![
                (MIB as u32, hole),
                (8192, 0),
                ((7 * MIB - 8192) as u32, hole)
            ]
        );
        assert_eq!(
            block_status(&mut c, proto::CMD_FLAG_REQ_ONE, 0, 4096),
            vec![(4096, hole)]
        );
        assert_eq!(
            block_status(&mut c, proto::CMD_FLAG_REQ_ONE, MIB, 3 * 4096),
            vec![(8192, 0)]
        );
        // Unaligned queries are answered too.
        assert_eq!(block_status(&mut c, 0, MIB + 100, 200), vec![(200, 0)]);
        for (flags, offset, len) in [
            (0, 8 * MIB - 512, 1024),
            (0, 0, 0),
            (proto::CMD_FLAG_DF, 0, 512),
        ] {
            assert_eq!(
                command(&mut c, true, flags, proto::CMD_BLOCK_STATUS, offset, len),
                proto::EINVAL
            );
        }
    }

    #[test]
    fn block_status_needs_a_selected_context() {
        let (_, mut c, _) = start(false, true, false);
        assert_eq!(
            command(&mut c, true, 0, proto::CMD_BLOCK_STATUS, 0, 4096),
            proto::EINVAL
        );
        let (_, mut c, _) = start(false, false, false);
        assert_eq!(
            command(&mut c, false, 0, proto::CMD_BLOCK_STATUS, 0, 4096),
            proto::EINVAL
        );
    }

    #[test]
    fn cache_flush_and_unknown_commands() {
        let (_, mut c, _) = start(false, false, false);
        assert_eq!(command(&mut c, false, 0, proto::CMD_CACHE, 0, 4096), 0);
        assert_eq!(
            command(&mut c, false, 0, proto::CMD_CACHE, 8 * MIB, 4096),
            proto::EINVAL
        );
        assert_eq!(command(&mut c, false, 0, 99, 0, 0), proto::EINVAL);
        assert_eq!(
            command(&mut c, false, 1 << 9, proto::CMD_FLUSH, 0, 0),
            proto::EINVAL
        );
        assert_eq!(command(&mut c, false, 0, proto::CMD_FLUSH, 0, 0), 0);
    }

    #[test]
    fn disc_ends_the_connection_and_a_writable_disk_is_committed() {
        let (disk, mut c, server) = start(false, false, false);
        c.request(0, proto::CMD_DISC, 1, 0, 0);
        assert!(c.closed());
        server.join().unwrap();
        assert_eq!(disk.commits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn garbage_oversized_writes_and_truncated_requests_end_only_the_connection() {
        let (_, mut c, server) = start(false, false, false);
        c.send(&[0x55; 28]);
        assert!(c.closed());
        server.join().unwrap();

        let (disk, mut c, server) = start(false, false, false);
        c.request(0, proto::CMD_WRITE, 1, 0, proto::MAX_PAYLOAD + 512);
        assert!(c.closed());
        server.join().unwrap();
        assert!(disk.contents().iter().all(|b| *b == 0));

        let (_, mut c, server) = start(false, false, false);
        c.request(0, proto::CMD_WRITE, 1, 0, 8192);
        c.send(&[3; 100]);
        drop(c);
        server.join().unwrap();

        let (_, mut c, server) = start(false, true, false);
        c.send(&proto::REQUEST_MAGIC.to_be_bytes());
        drop(c);
        server.join().unwrap();
    }
}
