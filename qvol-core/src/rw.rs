//! Reads, writes, discards and zero writes through the block map. Encryption and decryption
//! run outside every lock shared between threads. An operation claims the logical blocks it
//! changes (`claim.rs`) from taking its log slots until the map says what its records say,
//! so that replay, which applies records in slot order, ends where the live map does
//! (FORMAT.md §9, §13); operations on other blocks go on meanwhile.

use std::cell::RefCell;
use std::sync::RwLockReadGuard;

use crate::commit::MAX_DIRTY_LEAVES;
use crate::datablock::{open_block, random_nonces, seal_block};
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
        let (_gate, mut credit) = self.enter_with_log(last - first + 1)?;
        let _claim = self.claims.claim(first..last + 1);
        let _unwind = FailOnUnwind(self);
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

    /// Seals `data` (whole blocks from `lbn`) into new blocks, writes them and their log
    /// records, then maps them. On local storage blocks are copied, sealed and written
    /// [`SEAL_BATCH`] at a time through a per-thread buffer that stays in cache; where each
    /// write is a round trip the request's blocks go out together with their records.
    fn write_full(&self, lbn: u64, data: &[u8], credit: &mut Credit<'_>) -> Result<()> {
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
    /// staged data with them, then points the map at the new blocks: a reader meets a block
    /// only once it is written. The claim on the blocks keeps slot order and map order one.
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
        let slots = self.take_slots(credit, ops.len())?;
        self.write_logged(slots, &ops, staged)?;
        let n = entries.len();
        let mut freed = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let l = lbn + i as u64;
            let count = ((FANOUT - l % FANOUT) as usize).min(n - i);
            self.map
                .with_leaf(&*self.storage, &self.keys(), l / FANOUT, |leaf| {
                    for (k, e) in entries[i..i + count].iter().enumerate() {
                        let old = leaf.set(((l + k as u64) % FANOUT) as usize, e);
                        freed.push(Kill::of(&old, l + k as u64, false));
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
            self.read_blocks(cur.pbn, &mut block)?;
            open_block(&keys, lbn, &cur, &mut block)?;
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
            let slots = self.map.with_leaf(st, &self.keys(), leaf, |lf| {
                let mut changed = false;
                for k in 0..n {
                    let i = ((l + k) % FANOUT) as usize;
                    let old = lf.get(i);
                    if old.pbn != 0 {
                        lf.set(i, &LeafEntry::default());
                        freed.push(Kill::of(&old, l + k, true));
                        changed = true;
                    }
                }
                if changed {
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
