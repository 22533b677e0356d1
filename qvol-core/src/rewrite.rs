//! Rewriting the maps of a volume (the live map and every snapshot's) copy-on-write, for a
//! re-encryption (FORMAT.md §17): every node under new metadata keys, or the data blocks of
//! a range of map leaves re-sealed under a new key epoch.
//!
//! Blocks shared between maps stay shared: a block is held at one position only (§7.1), so
//! the rewritten copy of a block is remembered by (position, old block) and every map that
//! held the old block gets the same new one. Every old block rewritten is freed afterwards:
//! no map holds it any more, since every map is rewritten.

use std::collections::HashMap;
use std::ops::Range;

use crate::alloc::AllocState;
use crate::datablock::{random_nonces, reseal_block};
use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::{
    decode_interior_entry, encode_interior_entry, node_mac, node_pmac, LeafEntry, NodePtr, TreeKind,
};
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::tree::{read_node, PageWriter};

/// Re-sealed copies of data blocks, by (logical block, old physical block); of compressed
/// units, by (their group's first logical block, old first block) (FORMAT.md §18.3 rule 4).
pub(crate) type Copies = HashMap<(u64, u64), LeafEntry>;

/// What a [`Rewrite`] changes.
pub(crate) enum Change {
    /// Every node, read under the old keys and written under the new ones (data untouched).
    AllNodes,
    /// The data blocks of key epoch `from` in map leaves `leaves` are re-sealed under the new
    /// keys' epoch; the nodes above them are rewritten, nothing else.
    Reseal { from: u32, leaves: Range<u64> },
}

/// One rewrite of every map of a volume. Nothing it writes is referenced until the caller
/// installs the roots it returns and commits.
pub(crate) struct Rewrite<'a> {
    st: &'a dyn Storage,
    /// Keys the maps are under now (the allocator's, too).
    old: &'a Subkeys,
    /// Keys of the copies.
    new: &'a Subkeys,
    change: Change,
    a: &'a mut AllocState,
    nodes: HashMap<(u8, u64, u64), NodePtr>,
    data: HashMap<(u64, u64), LeafEntry>,
    /// Copies sealed beforehand ([`Rewrite::with_copies`]).
    copies: Copies,
    /// Old blocks no map holds once the roots are installed.
    freed: Vec<u64>,
    node_out: PageWriter<'a>,
    data_out: PageWriter<'a>,
    /// Data blocks re-sealed.
    pub(crate) resealed: u64,
    /// `log2 N` of the volume's compression units (0 without).
    log2_n: u8,
}

impl<'a> Rewrite<'a> {
    pub(crate) fn new(
        st: &'a dyn Storage,
        old: &'a Subkeys,
        new: &'a Subkeys,
        change: Change,
        a: &'a mut AllocState,
    ) -> Self {
        Rewrite {
            st,
            old,
            new,
            change,
            a,
            nodes: HashMap::new(),
            data: HashMap::new(),
            copies: HashMap::new(),
            freed: Vec::new(),
            node_out: PageWriter::new(st),
            data_out: PageWriter::new(st),
            resealed: 0,
            log2_n: 0,
        }
    }

    /// For a volume with compression units of `2^log2_n` blocks.
    pub(crate) fn with_units(mut self, units: Option<u8>) -> Self {
        self.log2_n = units.unwrap_or(0);
        self
    }

    /// Uses `copies` (re-sealed copies already written, by logical block and old block)
    /// instead of sealing those blocks again.
    pub(crate) fn with_copies(mut self, copies: Copies) -> Self {
        self.copies = copies;
        self
    }

    /// The rewritten map of height `height` whose root is `root`.
    pub(crate) fn map(&mut self, height: u8, root: NodePtr) -> Result<NodePtr> {
        self.node(height, 0, root)
    }

    /// Writes what is queued and frees every old block rewritten (not punched: the end of
    /// the re-encryption erases every free block at once). The caller installs the new roots
    /// before anything else can read the maps.
    pub(crate) fn finish(mut self) -> Result<u64> {
        self.node_out.flush()?;
        self.data_out.flush()?;
        for &pbn in &self.freed {
            self.a.free(self.st, self.old, pbn, false)?;
        }
        // Copies no map needed (their block was dropped meanwhile) were never referenced.
        for e in self.copies.values() {
            for pbn in e.pbn..e.pbn + u64::from(e.k.max(1)) {
                self.a.free_unused(self.st, self.old, pbn)?;
            }
        }
        Ok(self.resealed)
    }

    fn node(&mut self, level: u8, index: u64, ptr: NodePtr) -> Result<NodePtr> {
        if ptr.pbn == 0 {
            return Ok(ptr);
        }
        if let Change::Reseal { leaves, .. } = &self.change {
            // Leaves `index * span .. (index + 1) * span` lie below this node.
            let span = FANOUT.saturating_pow(u32::from(level));
            let first = index.saturating_mul(span);
            if first >= leaves.end || first.saturating_add(span) <= leaves.start {
                return Ok(ptr);
            }
        }
        let key = (level, index, ptr.pbn);
        if let Some(done) = self.nodes.get(&key) {
            return Ok(*done);
        }
        let page = read_node(self.st, self.old, TreeKind::Map, level, index, &ptr)?;
        let mut copy = page.clone();
        let mut changed = matches!(self.change, Change::AllNodes);
        if level == 0 {
            if let Change::Reseal { from, .. } = self.change {
                for i in 0..FANOUT as usize {
                    let e = LeafEntry::decode(&page[..], i)?;
                    if e.pbn != 0 && e.key_epoch == from {
                        let lbn = index * FANOUT + i as u64;
                        self.reseal(lbn, &e)?.encode(&mut copy[..], i);
                        changed = true;
                    }
                }
            }
        } else {
            for i in 0..FANOUT as usize {
                let child = decode_interior_entry(&page[..], i)?;
                let moved = self.node(level - 1, index * FANOUT + i as u64, child)?;
                if moved != child {
                    encode_interior_entry(&mut copy[..], i, &moved);
                    changed = true;
                }
            }
        }
        if !changed {
            self.nodes.insert(key, ptr);
            return Ok(ptr);
        }
        let pbn = self.a.alloc(self.st, self.old, 1)?[0];
        self.node_out.push(pbn, &copy[..])?;
        let moved = NodePtr {
            pbn,
            mac: node_mac(self.new, TreeKind::Map, level, index, &copy[..]),
            birth: ptr.birth,
            pmac: node_pmac(self.new, TreeKind::Map, level, index, &copy[..]),
        };
        self.freed.push(ptr.pbn);
        self.nodes.insert(key, moved);
        Ok(moved)
    }

    /// The entry of a copy of the block `e` points to (logical block `lbn`), re-sealed under
    /// the new keys with a fresh nonce, born when the old one was (it is held by the same
    /// maps). A block that does not authenticate stops the rewrite: re-encryption never
    /// turns a damaged block into a valid one.
    fn reseal(&mut self, lbn: u64, e: &LeafEntry) -> Result<LeafEntry> {
        // A unit is copied once for its group, whichever entry meets it first.
        let lbn = if e.k > 0 {
            lbn - lbn % (1 << self.log2_n)
        } else {
            lbn
        };
        let blocks = u64::from(e.k.max(1));
        if let Some(done) = self.data.get(&(lbn, e.pbn)) {
            return Ok(*done);
        }
        if let Some(mut copy) = self.copies.remove(&(lbn, e.pbn)) {
            copy.birth = e.birth;
            self.freed.extend(e.pbn..e.pbn + blocks);
            self.data.insert((lbn, e.pbn), copy);
            self.resealed += blocks;
            return Ok(copy);
        }
        if e.k > 0 {
            let keys = (self.old, self.new);
            let (mut sealed, buf) = crate::group::reseal_unit(self.st, keys, self.log2_n, lbn, e)?;
            sealed.pbn = self.a.alloc_run_anywhere(self.st, self.old, blocks)?;
            for (i, block) in buf.chunks_exact(BS).enumerate() {
                self.data_out.push(sealed.pbn + i as u64, block)?;
            }
            self.freed.extend(e.pbn..e.pbn + blocks);
            self.data.insert((lbn, e.pbn), sealed);
            self.resealed += blocks;
            return Ok(sealed);
        }
        let mut block = vec![0u8; BS];
        self.st
            .read_exact_at(&mut block, e.pbn * BLOCK_SIZE)
            .map_err(|err| Error::io(format!("cannot read physical block {}", e.pbn), err))?;
        let nonce = random_nonces(self.new.data_suite(), 1)?;
        let mut sealed = reseal_block(self.old, self.new, lbn, e, &nonce, &mut block)?;
        sealed.pbn = self.a.alloc(self.st, self.old, 1)?[0];
        sealed.birth = e.birth;
        self.data_out.push(sealed.pbn, &block)?;
        self.freed.push(e.pbn);
        self.data.insert((lbn, e.pbn), sealed);
        self.resealed += 1;
        Ok(sealed)
    }
}
