//! Reads, writes, discards and zero writes through the block map. Encryption and decryption
//! run outside every lock shared between threads. An operation claims the logical blocks it
//! changes (`claim.rs`) from taking its log slots until the map says what its records say,
//! so that replay, which applies records in slot order, ends where the live map does
//! (FORMAT.md §9, §13); operations on other blocks go on meanwhile.

use std::cell::RefCell;
use std::sync::RwLockReadGuard;

use crate::commit::MAX_DIRTY_LEAVES;
use crate::compress::GroupWrite;
use crate::datablock::{random_nonces, seal_block};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::snapshot::Kill;
use crate::volume::Volume;
use crate::wal::{LogOp, Slots, Wal};

/// Blocks handled under one hold of the commit gate and one log reservation.
const CHUNK_BLOCKS: u64 = 256;
/// Blocks discarded under one hold of the gate.
const ZERO_CHUNK_BLOCKS: u64 = 64 * FANOUT;

/// Blocks sealed and written together through the per-thread scratch buffer (a whole
/// chunk where each write is a round trip: `Storage::round_trips`).
const SEAL_BATCH: usize = 16;

thread_local! {
    /// Per-thread scratch buffer for sealing (no allocation per write).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Index ranges of `pbns` whose blocks are contiguous.
fn runs(pbns: &[u64]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= pbns.len() {
            return None;
        }
        let start = i;
        i += 1;
        while i < pbns.len() && pbns[i] == pbns[start] + (i - start) as u64 {
            i += 1;
        }
        Some(start..i)
    })
}

/// The first logical block a log record changes.
fn op_lbn(op: &LogOp) -> u64 {
    match *op {
        LogOp::Map { lbn, .. } | LogOp::Unmap { lbn, .. } | LogOp::MapUnit { lbn, .. } => lbn,
    }
}

/// Fails the volume if dropped while unwinding: a panic in the middle of an operation (a bug
/// below it, which vhost-qvol's request threads catch) may leave a log slot taken whose
/// record or data was never written, which no later commit may cover (FORMAT.md §10.1: a
/// pipelined commit covers every slot taken) and no flush may vouch for.
struct FailOnUnwind<'a>(&'a Volume);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail(Error::corrupt("internal: a write panicked half-way"));
        }
    }
}

/// Log slots reserved for one operation; unused ones are given back on drop.
struct Credit<'a> {
    wal: &'a Wal,
    left: u64,
}

impl Drop for Credit<'_> {
    fn drop(&mut self) {
        self.wal.release(self.left);
    }
}

impl Volume {
    pub(crate) fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
            return Err(Error::new(
                ErrorKind::Unaligned,
                format!("a request of {len} bytes at offset {offset} is not aligned to 512 bytes"),
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "a request of {len} bytes at offset {offset} goes past the end of the {}-byte volume",
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the volume is open read-only",
            ));
        }
        Ok(())
    }

    /// Enters the gate with `n` log slots reserved, committing first if the log is full or
    /// too many map leaves wait for a commit.
    fn enter_with_log(&self, n: u64) -> Result<(RwLockReadGuard<'_, ()>, Credit<'_>)> {
        loop {
            self.check_usable()?;
            let gate = self.shared();
            if self.map.dirty_leaves() < MAX_DIRTY_LEAVES && self.wal.try_reserve(n) {
                if self.wal.take_prepare_turn() {
                    // The leaves MACed now need no MAC while I/O is stopped for the commit.
                    self.map.premac_dirty(&self.keys());
                }
                return Ok((
                    gate,
                    Credit {
                        wal: &self.wal,
                        left: n,
                    },
                ));
            }
            drop(gate);
            let _excl = self.exclusive();
            if self.wal.next() > 0 || self.map.dirty_leaves() >= MAX_DIRTY_LEAVES {
                self.commit_pipelined()?;
            }
        }
    }

    /// Takes log slots for `n` records from the operation's reservation (with the claim on
    /// the blocks they name held: FORMAT.md §13).
    fn take_slots(&self, credit: &mut Credit<'_>, n: usize) -> Result<Slots> {
        let slots = self.wal.take(n as u64).map_err(|e| self.fail(e))?;
        credit.left = credit.left.saturating_sub(n as u64);
        Ok(slots)
    }

    /// Writes the records of `slots`, and `data` (sealed blocks they name, not yet written:
    /// [`Volume::stage`]) with them.
    fn write_logged(&self, slots: Slots, ops: &[LogOp], data: Vec<(u64, Vec<u8>)>) -> Result<()> {
        self.wal
            .write(&*self.storage, &self.keys(), &self.gather, slots, ops, data)
            .map_err(|e| self.fail(e))
    }

    pub(crate) fn read_blocks(&self, pbn: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_exact_at(buf, pbn * BLOCK_SIZE)
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot read {} bytes of data at physical block {pbn}",
                        buf.len()
                    ),
                    e,
                )
            })
    }

    /// Writes `data` at `offset` (both multiples of 512). Returns once the write is in the
    /// page cache and the log (it survives a crash of this process; `flush` for power loss).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, data.len() as u64)?;
        self.chunked(offset, data.len() as u64, CHUNK_BLOCKS, |off, len| {
            let at = (off - offset) as usize;
            self.write_chunk(off, &data[at..at + len as usize])
        })
    }

    /// Splits `offset .. offset + len` at multiples of `chunk` blocks.
    fn chunked(
        &self,
        offset: u64,
        len: u64,
        chunk: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let boundary = (off / BLOCK_SIZE / chunk + 1) * chunk * BLOCK_SIZE;
            let stop = end.min(boundary);
            f(off, stop - off)?;
            off = stop;
        }
        Ok(())
    }

    fn write_chunk(&self, offset: u64, data: &[u8]) -> Result<()> {
        let first = offset / BLOCK_SIZE;
        let last = (offset + data.len() as u64 - 1) / BLOCK_SIZE;
        // A group rewritten plain (`rewrite_group`) takes a record a block: room for two.
        let spare = self.header.units().map_or(0, |l| 2 << l);
        let (_gate, mut credit) = self.enter_with_log(last - first + 1 + spare)?;
        // With compression on, a write to part of a group rewrites the group: the claim
        // covers every group it touches.
        let _claim = self.claims.claim(self.groups_around(first, last + 1));
        let _unwind = FailOnUnwind(self);
        let (offset, data) = self.rewrite_partial_groups(offset, data, &mut credit)?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / BLOCK_SIZE;
        let head = (offset % BLOCK_SIZE) as usize;
        let mut pos = 0usize;
        let mut lbn = first;
        if head != 0 || data.len() < BS {
            let len = (BS - head).min(data.len());
            self.write_partial(lbn, head, &data[..len], &mut credit)?;
            pos = len;
            lbn += 1;
        }
        let full = (data.len() - pos) / BS;
        if full > 0 {
            self.write_full(lbn, &data[pos..pos + full * BS], &mut credit)?;
            pos += full * BS;
            lbn += full as u64;
        }
        if pos < data.len() {
            self.write_partial(lbn, 0, &data[pos..], &mut credit)?;
        }
        Ok(())
    }

    /// With compression on (FORMAT.md §18.3 rule 3), the groups a write covers only in part,
    /// at its head and its tail, are read, overlaid with the write and stored as units
    /// when they compress; returns what is left to write as before (all of it when
    /// compression is off or those groups do not compress).
    fn rewrite_partial_groups<'d>(
        &self,
        mut offset: u64,
        mut data: &'d [u8],
        credit: &mut Credit<'_>,
    ) -> Result<(u64, &'d [u8])> {
        let Some(g) = self.compressing() else {
            return Ok((offset, data));
        };
        let group_bytes = g * BLOCK_SIZE;
        let fits = |start: u64| start / BLOCK_SIZE + g <= self.blocks();
        let end = offset + data.len() as u64;
        let head = offset - offset % group_bytes;
        if offset != head || end < head + group_bytes {
            let take = (end.min(head + group_bytes) - offset) as usize;
            if fits(head) && self.rewrite_group(head / BLOCK_SIZE, offset, &data[..take], credit)? {
                offset += take as u64;
                data = &data[take..];
            }
        }
        let end = offset + data.len() as u64;
        let tail = end - end % group_bytes;
        if !data.is_empty() && end != tail && tail >= offset && tail > head && fits(tail) {
            let keep = (tail - offset) as usize;
            if self.rewrite_group(tail / BLOCK_SIZE, tail, &data[keep..], credit)? {
                data = &data[..keep];
            }
        }
        Ok((offset, data))
    }

    /// Reads group `first`, overlays `piece` at byte `at` and stores the group as a unit (or
    /// unmaps it, all zeros). When it does not compress: false, having written nothing, so
    /// that the caller writes `piece` plain; but a group whose other entries reference a
    /// unit is written whole plain instead, which frees the unit (else it would stay, partly
    /// referenced, beside the plain blocks). A group all of whose blocks are plain stays so
    /// without a read (it did not compress when it was written: random data's small writes
    /// pay nothing for compression).
    fn rewrite_group(
        &self,
        first: u64,
        at: u64,
        piece: &[u8],
        credit: &mut Credit<'_>,
    ) -> Result<bool> {
        let mut entries = vec![LeafEntry::default(); self.unit_blocks() as usize];
        self.map
            .lookup(&*self.storage, &self.keys(), first, &mut entries)?;
        if entries.iter().all(|e| e.pbn != 0 && e.k == 0) {
            return Ok(false);
        }
        let mut group = self.read_group(first, &entries)?;
        let from = (at - first * BLOCK_SIZE) as usize;
        group[from..from + piece.len()].copy_from_slice(piece);
        match self.write_group(first, &group)? {
            GroupWrite::Plain if entries.iter().any(|e| e.k > 0) => {
                self.write_plain(first, &group, credit).map(|()| true)
            }
            GroupWrite::Plain => Ok(false),
            GroupWrite::Zeros(op) => self.log_ops(&[op], Vec::new(), credit).map(|()| true),
            GroupWrite::Unit(op, (pbn, sealed)) => {
                let staged = self.stage_run(pbn, sealed)?;
                self.log_ops(&[op], staged, credit).map(|()| true)
            }
        }
    }

    /// Writes `data` (whole blocks from `lbn`): the whole groups in it as compressed units
    /// when compression is on (FORMAT.md §18.3 rule 3), everything else plain.
    fn write_full(&self, lbn: u64, data: &[u8], credit: &mut Credit<'_>) -> Result<()> {
        let n = (data.len() / BS) as u64;
        let Some((first, groups)) = self.whole_groups(lbn, n) else {
            return self.write_plain(lbn, data, credit);
        };
        let size = self.unit_blocks();
        let bytes =
            |from: u64, to: u64| &data[((from - lbn) as usize) * BS..((to - lbn) as usize) * BS];
        // Plain blocks wait in `plain_from..` until a unit is logged after them; units wait
        // in `ops` for one record write a leaf's worth.
        let mut plain_from = lbn;
        let mut ops = Vec::new();
        let mut staged = Vec::new();
        let mut write = || -> Result<()> {
            for g in 0..groups {
                let at = first + g * size;
                match self.write_group(at, bytes(at, at + size))? {
                    GroupWrite::Plain => continue,
                    GroupWrite::Zeros(op) => ops.push(op),
                    GroupWrite::Unit(op, (pbn, sealed)) => {
                        ops.push(op);
                        staged.extend(self.stage_run(pbn, sealed)?);
                    }
                }
                if plain_from < at {
                    self.write_plain(plain_from, bytes(plain_from, at), credit)?;
                }
                plain_from = at + size;
                if ops.len() as u64 * size >= FANOUT {
                    let logged = std::mem::take(&mut ops);
                    self.log_ops(&logged, std::mem::take(&mut staged), credit)?;
                }
            }
            if !ops.is_empty() {
                let logged = std::mem::take(&mut ops);
                self.log_ops(&logged, std::mem::take(&mut staged), credit)?;
            }
            if plain_from < lbn + n {
                self.write_plain(plain_from, bytes(plain_from, lbn + n), credit)?;
            }
            Ok(())
        };
        let written = write();
        if written.is_err() {
            // Units allocated whose records were never logged: their blocks go back.
            self.free_unlogged(&ops)?;
        }
        written
    }

    /// Frees the blocks of the units `ops` would have mapped (never logged).
    fn free_unlogged(&self, ops: &[LogOp]) -> Result<()> {
        let keys = self.keys();
        let mut a = self.alloc.lock();
        for op in ops {
            if let LogOp::MapUnit { entry, .. } = op {
                for pbn in entry.pbn..entry.pbn + u64::from(entry.k) {
                    a.free_unused(&*self.storage, &keys, pbn)?;
                }
            }
        }
        Ok(())
    }

    /// Seals `data` (whole blocks from `lbn`) into new blocks, writes them and their log
    /// records, then maps them. On local storage blocks are copied, sealed and written
    /// [`SEAL_BATCH`] at a time through a per-thread buffer that stays in cache; where each
    /// write is a round trip the request's blocks go out together with their records.
    fn write_plain(&self, lbn: u64, data: &[u8], credit: &mut Credit<'_>) -> Result<()> {
        let n = data.len() / BS;
        let keys = self.keys();
        let suite = keys.data_suite();
        let nl = suite.nonce_len();
        let nonces = random_nonces(suite, n)?;
        let pbns = self.alloc.lock().alloc(&*self.storage, &keys, n)?;
        let mut entries = Vec::with_capacity(n);
        let mut seal = |start: usize, buf: &mut [u8]| -> Result<()> {
            for (k, block) in buf.chunks_exact_mut(BS).enumerate() {
                let i = start + k;
                let nonce = &nonces[i * nl..(i + 1) * nl];
                entries.push(seal_block(&keys, lbn + i as u64, nonce, block)?);
            }
            Ok(())
        };
        let staged = if self.storage.round_trips() {
            let mut buf = data.to_vec();
            seal(0, &mut buf)?;
            self.stage(&pbns, buf)?
        } else {
            SCRATCH.with(|cell| -> Result<()> {
                let mut scratch = cell.borrow_mut();
                let batch = SEAL_BATCH.min(n);
                scratch.resize(batch * BS, 0);
                for start in (0..n).step_by(batch) {
                    let m = batch.min(n - start);
                    let buf = &mut scratch[..m * BS];
                    buf.copy_from_slice(&data[start * BS..(start + m) * BS]);
                    seal(start, buf)?;
                    self.write_runs(&pbns[start..start + m], buf)?;
                }
                Ok(())
            })?;
            Vec::new()
        };
        let birth = self.snaps.epoch();
        for (e, &pbn) in entries.iter_mut().zip(&pbns) {
            e.pbn = pbn;
            e.birth = birth;
        }
        self.log_and_map(lbn, &entries, staged, credit)
    }

    /// A unit's sealed blocks `buf` from `pbn` on, as [`Volume::stage`] stages them.
    fn stage_run(&self, pbn: u64, buf: Vec<u8>) -> Result<Vec<(u64, Vec<u8>)>> {
        let pbns: Vec<u64> = (pbn..pbn + (buf.len() / BS) as u64).collect();
        self.stage(&pbns, buf)
    }

    /// Sealed blocks `buf` (one per entry of `pbns`): where each write is a round trip,
    /// returned as runs of contiguous blocks to go out with their log records; elsewhere
    /// written now (nothing returned).
    fn stage(&self, pbns: &[u64], buf: Vec<u8>) -> Result<Vec<(u64, Vec<u8>)>> {
        if !self.storage.round_trips() {
            self.write_runs(pbns, &buf)?;
            return Ok(Vec::new());
        }
        if runs(pbns).nth(1).is_none() {
            return Ok(pbns
                .first()
                .map(|&p| (p * BLOCK_SIZE, buf))
                .into_iter()
                .collect());
        }
        Ok(runs(pbns)
            .map(|r| {
                (
                    pbns[r.start] * BLOCK_SIZE,
                    buf[r.start * BS..r.end * BS].to_vec(),
                )
            })
            .collect())
    }

    /// Writes the log records of `entries` (new blocks for logical blocks `lbn..`) and the
    /// staged data with them, then points the map at the new blocks.
    fn log_and_map(
        &self,
        lbn: u64,
        entries: &[LeafEntry],
        staged: Vec<(u64, Vec<u8>)>,
        credit: &mut Credit<'_>,
    ) -> Result<()> {
        let ops: Vec<LogOp> = entries
            .iter()
            .enumerate()
            .map(|(k, e)| LogOp::Map {
                lbn: lbn + k as u64,
                entry: *e,
            })
            .collect();
        self.log_ops(&ops, staged, credit)
    }

    /// Writes the records `ops` (in order of logical block) and the staged data with them,
    /// then changes the map as they say, a leaf at a time: a reader meets a block only once
    /// it is written. The claim on the blocks keeps slot order and map order one.
    fn log_ops(
        &self,
        ops: &[LogOp],
        staged: Vec<(u64, Vec<u8>)>,
        credit: &mut Credit<'_>,
    ) -> Result<()> {
        let slots = self.take_slots(credit, ops.len())?;
        self.write_logged(slots, ops, staged)?;
        let units = self.map.units();
        let mut freed = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let leaf = op_lbn(&ops[i]) / FANOUT;
            let count = ops[i..]
                .iter()
                .take_while(|op| op_lbn(op) / FANOUT == leaf)
                .count();
            self.map
                .with_leaf(&*self.storage, &self.keys(), leaf, |l| {
                    for op in &ops[i..i + count] {
                        crate::group::apply(l, leaf, op, units, &mut freed);
                    }
                    Ok(())
                })
                .map_err(|e| self.fail(e))?;
            i += count;
        }
        self.kill(&freed)
    }

    /// Writes `buf` (one block per entry of `pbns`) in runs of contiguous blocks, now.
    fn write_runs(&self, pbns: &[u64], buf: &[u8]) -> Result<()> {
        for r in runs(pbns) {
            self.storage
                .write_all_at(&buf[r.start * BS..r.end * BS], pbns[r.start] * BLOCK_SIZE)
                .map_err(|e| {
                    self.fail(Error::io(
                        format!("cannot write data at physical block {}", pbns[r.start]),
                        e,
                    ))
                })?;
        }
        self.writeback.written(&self.storage, pbns);
        Ok(())
    }

    /// The live map stopped using these blocks (FORMAT.md §7.1).
    fn kill(&self, kills: &[Kill]) -> Result<()> {
        self.kill_blocks(kills).map_err(|e| self.fail(e))
    }

    /// Read-modify-write of part of block `lbn`: `data` at byte `at` (None: zeros). Retries
    /// if another thread changed the block in between.
    fn write_partial(
        &self,
        lbn: u64,
        at: usize,
        data: &[u8],
        credit: &mut Credit<'_>,
    ) -> Result<()> {
        self.rmw(lbn, at, data.len(), Some(data), credit)
    }

    fn rmw(
        &self,
        lbn: u64,
        at: usize,
        len: usize,
        data: Option<&[u8]>,
        credit: &mut Credit<'_>,
    ) -> Result<()> {
        let st = &*self.storage;
        let keys = self.keys();
        let suite = keys.data_suite();
        // The claim on `lbn` keeps it as read here until the map update below.
        let mut cur = [LeafEntry::default()];
        self.map.lookup(st, &keys, lbn, &mut cur)?;
        let cur = cur[0];
        if cur.pbn == 0 && data.is_none() {
            return Ok(());
        }
        let mut block = vec![0u8; BS];
        if cur.pbn != 0 {
            self.read_entry(lbn, &cur, &mut block)?;
        }
        match data {
            Some(d) => block[at..at + len].copy_from_slice(d),
            None => block[at..at + len].fill(0),
        }
        let nonce = random_nonces(suite, 1)?;
        let mut entry = seal_block(&keys, lbn, &nonce, &mut block)?;
        entry.pbn = self.alloc.lock().alloc(st, &keys, 1)?[0];
        entry.birth = self.snaps.epoch();
        let staged = self.stage(&[entry.pbn], block)?;
        self.log_and_map(lbn, &[entry], staged, credit)
    }

    /// Discards `len` bytes at `offset`: they read as zeros afterwards and whole blocks take
    /// no space (their blocks are punched out of the file after the next commit).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Writes zeros over `len` bytes at `offset`. Whole blocks are always unmapped (they
    /// read as zeros without taking space, whatever `unmap` says); partial blocks are
    /// rewritten.
    pub fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.chunked(offset, len, ZERO_CHUNK_BLOCKS, |off, len| {
            self.zero_chunk(off, len)
        })
    }

    fn zero_chunk(&self, offset: u64, len: u64) -> Result<()> {
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let leaves = last / FANOUT - first / FANOUT + 1;
        let (_gate, mut credit) = self.enter_with_log(leaves + 2)?;
        let _claim = self.claims.claim(first..last + 1);
        let _unwind = FailOnUnwind(self);
        let head = (offset % BLOCK_SIZE) as usize;
        let mut lbn = first;
        let mut left = len as usize;
        if head != 0 || left < BS {
            let n = (BS - head).min(left);
            self.rmw(lbn, head, n, None, &mut credit)?;
            left -= n;
            lbn += 1;
        }
        let full = (left / BS) as u64;
        self.unmap_blocks(lbn, full, &mut credit)?;
        left -= full as usize * BS;
        if left > 0 {
            self.rmw(lbn + full, 0, left, None, &mut credit)?;
        }
        Ok(())
    }

    /// Unmaps `count` whole blocks from `lbn`, skipping subtrees that hold nothing.
    fn unmap_blocks(&self, lbn: u64, count: u64, credit: &mut Credit<'_>) -> Result<()> {
        let st = &*self.storage;
        let end = lbn + count;
        let mut l = lbn;
        let mut freed = Vec::new();
        while l < end {
            let leaf = l / FANOUT;
            let skip = self.map.absent_leaves(st, &self.keys(), leaf)?;
            if skip > 0 {
                l = ((leaf + skip) * FANOUT).max(l + 1);
                continue;
            }
            let n = (FANOUT - l % FANOUT).min(end - l);
            let op = [LogOp::Unmap { lbn: l, count: n }];
            let units = self.map.units();
            let slots = self.map.with_leaf(st, &self.keys(), leaf, |lf| {
                if crate::group::apply(lf, leaf, &op[0], units, &mut freed) {
                    return self.take_slots(credit, 1).map(Some);
                }
                Ok(None)
            })?;
            if let Some(slots) = slots {
                self.write_logged(slots, &op, Vec::new())?;
            }
            l += n;
        }
        self.kill(&freed)
    }
}
