//! Reads through the block map: each read is planned into pieces of storage (physically
//! contiguous whole blocks read in place, partial blocks read whole on the side), the pieces
//! of every read of a batch go to storage in one call (in flight together where each is a
//! round trip: `Storage::read_many`), then each block is opened. Decryption runs outside
//! every lock shared between threads; a read only holds the commit gate shared.

use zeroize::Zeroizing;

use crate::datablock::open_block;
use crate::error::{Error, Result};
use crate::group::{group_buffer, open_entry_unit};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::subkeys::Subkeys;
use crate::volume::Volume;

/// One read's pieces: where its blocks go, and how to open them once read.
struct Planned<'e, 'b> {
    first_lbn: u64,
    entries: &'e [LeafEntry],
    /// Runs of whole blocks read in place: (first entry, destination).
    runs: Vec<(usize, &'b mut [u8])>,
    /// Partial blocks read whole into a block of their own.
    parts: Vec<Partial<'b>>,
    /// Blocks in compressed units: each unit read whole on the side, then opened.
    units: Vec<Partial<'b>>,
    /// `log2 N` of the volume's units.
    log2_n: u8,
}

/// A partial block of a read: (entry, byte in block, destination, the whole block; wiped
/// when dropped, it holds plaintext once opened). For a unit: (its first entry in the read,
/// byte in that block, destination, the unit's `k` blocks).
type Partial<'b> = (usize, usize, &'b mut [u8], Zeroizing<Vec<u8>>);

impl<'e, 'b> Planned<'e, 'b> {
    /// Plans reading the blocks of `entries` (from the one of `offset`) into `buf`; holes
    /// are filled with zeros here.
    fn new(offset: u64, entries: &'e [LeafEntry], buf: &'b mut [u8], units: Option<u8>) -> Self {
        let log2_n = units.unwrap_or(0);
        let mut plan = Planned {
            first_lbn: offset / BLOCK_SIZE,
            entries,
            runs: Vec::new(),
            parts: Vec::new(),
            units: Vec::new(),
            log2_n,
        };
        let mut rest = buf;
        let mut i = 0;
        while i < entries.len() {
            let in_block = if i == 0 {
                (offset % BLOCK_SIZE) as usize
            } else {
                0
            };
            let len = (BS - in_block).min(rest.len());
            let e = entries[i];
            if e.k > 0 {
                // The blocks of this read in the same unit (FORMAT.md §18.2).
                let group = (plan.first_lbn + i as u64) >> log2_n;
                let mut j = i + 1;
                while j < entries.len()
                    && entries[j] == e
                    && (plan.first_lbn + j as u64) >> log2_n == group
                {
                    j += 1;
                }
                let take = ((j - i) * BS - in_block).min(rest.len());
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(take);
                rest = tail;
                let sealed = Zeroizing::new(vec![0u8; usize::from(e.k) * BS]);
                plan.units.push((i, in_block, piece, sealed));
                i = j;
                continue;
            }
            if e.pbn == 0 || len < BS {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                if e.pbn == 0 {
                    piece.fill(0);
                } else {
                    plan.parts
                        .push((i, in_block, piece, Zeroizing::new(vec![0u8; BS])));
                }
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < entries.len()
                && rest.len() >= (j - i + 1) * BS
                && entries[j].pbn == e.pbn + (j - i) as u64
                && entries[j].k == 0
            {
                j += 1;
            }
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut((j - i) * BS);
            rest = tail;
            plan.runs.push((i, piece));
            i = j;
        }
        plan
    }

    /// The storage reads the plan needs: (byte offset in the image, destination).
    fn pieces(&mut self) -> impl Iterator<Item = (u64, &mut [u8])> + use<'_, 'b> {
        let entries = self.entries;
        let runs = self
            .runs
            .iter_mut()
            .map(move |(i, piece)| (entries[*i].pbn * BLOCK_SIZE, &mut **piece));
        let parts = self
            .parts
            .iter_mut()
            .map(move |(i, _, _, block)| (entries[*i].pbn * BLOCK_SIZE, &mut block[..]));
        let units = self
            .units
            .iter_mut()
            .map(move |(i, _, _, sealed)| (entries[*i].pbn * BLOCK_SIZE, &mut sealed[..]));
        runs.chain(parts).chain(units)
    }

    /// Opens the blocks read (authenticates and decrypts them in place).
    fn open(self, keys: &Subkeys) -> Result<()> {
        let (first, entries) = (self.first_lbn, self.entries);
        for (i, piece) in self.runs {
            for (k, block) in piece.chunks_exact_mut(BS).enumerate() {
                open_block(keys, first + (i + k) as u64, &entries[i + k], block)?;
            }
        }
        for (i, in_block, piece, mut block) in self.parts {
            open_block(keys, first + i as u64, &entries[i], &mut block)?;
            let n = piece.len();
            piece.copy_from_slice(&block[in_block..in_block + n]);
        }
        for (i, in_block, piece, mut sealed) in self.units {
            let lbn = first + i as u64;
            let mut group = group_buffer(self.log2_n);
            open_entry_unit(keys, self.log2_n, lbn, &entries[i], &mut sealed, &mut group)?;
            let at = (lbn % (1 << self.log2_n)) as usize * BS + in_block;
            let n = piece.len();
            piece.copy_from_slice(&group[at..at + n]);
        }
        Ok(())
    }
}

impl Volume {
    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). Unwritten and discarded
    /// blocks read as zeros; a block that fails authentication is an `Integrity` error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() == BS && offset % BLOCK_SIZE == 0 {
            return self.read_block(offset, buf);
        }
        self.read_planned(&mut [(offset, buf)])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Reads each `(offset, buf)` as [`Volume::read_at`] does, their storage reads all in
    /// one storage call (in flight together where each read is a round trip); one result a
    /// read, in order. A read that fails leaves the others whole.
    pub fn read_many_at(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        match reads {
            [(offset, buf)] if buf.len() == BS && *offset % BLOCK_SIZE == 0 => {
                vec![self.read_block(*offset, buf)]
            }
            _ => self.read_planned(reads),
        }
    }

    /// One whole block (a 4 KiB read): no lists to build.
    fn read_block(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_request(offset, BLOCK_SIZE)?;
        self.check_usable()?;
        let _gate = self.shared();
        let lbn = offset / BLOCK_SIZE;
        let mut entry = [LeafEntry::default()];
        self.map
            .lookup(&*self.storage, &self.keys(), lbn, &mut entry)?;
        let [e] = entry;
        if e.pbn == 0 {
            buf.fill(0);
            return Ok(());
        }
        if e.k > 0 {
            return self.read_entry(lbn, &e, buf);
        }
        self.read_blocks(e.pbn, buf)?;
        open_block(&self.keys(), lbn, &e, buf)
    }

    /// [`Volume::read_many_at`] through plans.
    fn read_planned(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        let _gate = self.shared();
        let keys = self.keys();
        let mut results: Vec<Result<()>> = Vec::with_capacity(reads.len());
        let mut looked = Vec::with_capacity(reads.len());
        for (offset, buf) in reads.iter() {
            let (result, entries) = match self.look_up(*offset, buf.len() as u64) {
                Ok(entries) => (Ok(()), Some(entries)),
                Err(e) => (Err(e), None),
            };
            results.push(result);
            looked.push(entries);
        }
        let mut plans = Vec::with_capacity(reads.len());
        for (k, ((offset, buf), entries)) in reads.iter_mut().zip(&looked).enumerate() {
            if let Some(entries) = entries {
                plans.push((k, Planned::new(*offset, entries, buf, self.map.units())));
            }
        }
        // Every plan's pieces in one call; `counts[p]`: how many are plan p's.
        let mut counts = Vec::with_capacity(plans.len());
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
        for (_, plan) in &mut plans {
            let before = pieces.len();
            pieces.extend(plan.pieces());
            counts.push(pieces.len() - before);
        }
        let mut outcomes = self.storage.read_many(&mut pieces);
        if outcomes.len() != pieces.len() {
            outcomes = (0..pieces.len())
                .map(|_| {
                    Err(std::io::Error::other(
                        "internal: the storage answered for fewer reads than it was given",
                    ))
                })
                .collect();
        }
        let mut failed: Vec<Option<Error>> = counts.iter().map(|_| None).collect();
        let mut at = 0;
        let mut outcomes = outcomes.into_iter();
        for (p, &n) in counts.iter().enumerate() {
            for (piece, outcome) in pieces[at..at + n].iter().zip(outcomes.by_ref().take(n)) {
                if let (Err(e), None) = (outcome, &failed[p]) {
                    failed[p] = Some(Error::io(
                        format!(
                            "cannot read {} bytes of data at physical block {}",
                            piece.1.len(),
                            piece.0 / BLOCK_SIZE
                        ),
                        e,
                    ));
                }
            }
            at += n;
        }
        drop(pieces);
        for ((k, plan), failure) in plans.into_iter().zip(failed) {
            results[k] = match failure {
                Some(e) => Err(e),
                None => plan.open(&keys),
            };
        }
        results
    }

    /// The map entries of the blocks `len` bytes at `offset` touch, after checking the
    /// request.
    fn look_up(&self, offset: u64, len: u64) -> Result<Vec<LeafEntry>> {
        self.check_request(offset, len)?;
        self.check_usable()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE;
        let n = ((offset + len - 1) / BLOCK_SIZE - first + 1) as usize;
        let mut entries = vec![LeafEntry::default(); n];
        let mut i = 0;
        while i < n {
            let lbn = first + i as u64;
            let k = ((FANOUT - lbn % FANOUT) as usize).min(n - i);
            self.map
                .lookup(&*self.storage, &self.keys(), lbn, &mut entries[i..i + k])?;
            i += k;
        }
        Ok(entries)
    }
}
