//! Free-space tracking (docs/FORMAT.md §7): the space tree's bitmap leaves, loaded on demand,
//! and the rules that keep a freed block from being reused before the commit that frees it
//! is durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::fasthash::{U64Map, U64Set};
use crate::layout::*;
use crate::node::{node_mac, NodePtr, TreeKind};
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::tree::{read_node, zero_page, Page, PageWriter, TreeCache};

#[derive(Debug)]
struct BitLeaf {
    bits: Page,
    pbn: u64,
    dirty: bool,
}

/// Requests of at least this many blocks look for a contiguous run first.
const RUN_MIN: usize = 16;
/// How far past the cursor such a run is looked for.
const RUN_SCAN: u64 = 8192;

/// The allocator's state; all of it behind one mutex, held for short scans only.
#[derive(Debug)]
pub(crate) struct AllocState {
    tree: TreeCache,
    leaves: U64Map<BitLeaf>,
    /// Blocks clear in the bitmap that are not allocatable yet.
    held: HeldBack,
    /// Freed blocks that held discarded data: punched after the next commit.
    punch: BTreeSet<u64>,
    /// Of the blocks freed in the epoch of the commit in flight, those to punch once it is
    /// durable.
    committing_punch: Vec<u64>,
    cursor: u64,
    /// The first block of the data region (every block below is fixed).
    data_start: u64,
    capacity: u64,
    used: u64,
    high_water: u64,
}

/// Freed blocks that a committed tree or a log record may still use.
#[derive(Debug, Default)]
struct HeldBack {
    /// Freed in this log epoch: allocatable once the next commit is durable.
    pending: U64Set,
    /// Freed in the log epoch a commit in flight covers (format version 6, FORMAT.md §10.1):
    /// clear in the bitmap that commit writes, allocatable once its superblock is durable.
    committing: U64Set,
}

impl HeldBack {
    fn contains(&self, pbn: u64) -> bool {
        self.pending.contains(&pbn) || self.committing.contains(&pbn)
    }
}

/// The allocator of a volume's physical blocks.
#[derive(Debug)]
pub(crate) struct Allocator {
    state: Mutex<AllocState>,
}

/// Physical blocks the space tree must cover for a volume of `blocks` logical blocks laid out
/// as `regions` says: every data block, the map nodes and the copies a commit needs, with
/// room to spare.
pub(crate) fn space_capacity(regions: Regions, blocks: u64) -> u64 {
    regions.data_start_block() + 2 * blocks + (1 << 20)
}

impl Allocator {
    /// The allocator of a committed space tree whose data region starts at `data_start`.
    pub(crate) fn new(
        height: u8,
        root: NodePtr,
        data_start: u64,
        capacity: u64,
        used: u64,
        high_water: u64,
    ) -> Self {
        Allocator {
            state: Mutex::new(AllocState {
                tree: TreeCache::new(TreeKind::Space, height, root),
                leaves: U64Map::default(),
                held: HeldBack::default(),
                punch: BTreeSet::new(),
                committing_punch: Vec::new(),
                cursor: data_start,
                data_start,
                capacity,
                used,
                high_water: high_water.max(data_start),
            }),
        }
    }

    /// Locks the state.
    pub(crate) fn lock(&self) -> MutexGuard<'_, AllocState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AllocState {
    /// The space-tree height for `capacity` blocks.
    pub(crate) fn height_for(capacity: u64) -> u8 {
        tree_height(capacity.div_ceil(BITS_PER_SPACE_LEAF), FANOUT)
    }

    fn leaf(&mut self, st: &dyn Storage, keys: &Subkeys, index: u64) -> Result<&mut BitLeaf> {
        if !self.leaves.contains_key(&index) {
            let ptr = self.tree.leaf_ptr(st, keys, index)?;
            let leaf = if ptr.pbn == 0 {
                BitLeaf {
                    bits: zero_page(),
                    pbn: 0,
                    dirty: false,
                }
            } else {
                BitLeaf {
                    bits: read_node(st, keys, TreeKind::Space, 0, index, &ptr)?,
                    pbn: ptr.pbn,
                    dirty: false,
                }
            };
            self.leaves.insert(index, leaf);
        }
        self.leaves
            .get_mut(&index)
            .ok_or_else(|| Error::corrupt("internal: a space leaf left the cache"))
    }

    fn bit(&mut self, st: &dyn Storage, keys: &Subkeys, pbn: u64) -> Result<bool> {
        let leaf = self.leaf(st, keys, pbn / BITS_PER_SPACE_LEAF)?;
        let j = (pbn % BITS_PER_SPACE_LEAF) as usize;
        Ok(leaf.bits[j / 8] & (1 << (j % 8)) != 0)
    }

    fn set_bit(&mut self, st: &dyn Storage, keys: &Subkeys, pbn: u64, value: bool) -> Result<()> {
        let leaf = self.leaf(st, keys, pbn / BITS_PER_SPACE_LEAF)?;
        let j = (pbn % BITS_PER_SPACE_LEAF) as usize;
        if value {
            leaf.bits[j / 8] |= 1 << (j % 8);
        } else {
            leaf.bits[j / 8] &= !(1 << (j % 8));
        }
        leaf.dirty = true;
        Ok(())
    }

    /// Marks the fixed regions (header .. log) in use: at create.
    pub(crate) fn mark_fixed_regions(&mut self, st: &dyn Storage, keys: &Subkeys) -> Result<()> {
        for pbn in 0..self.data_start {
            self.set_bit(st, keys, pbn, true)?;
        }
        Ok(())
    }

    /// Allocates `n` blocks, as contiguous as the free space allows. Requests of
    /// [`RUN_MIN`] blocks or more first look for one contiguous run near the cursor, so that
    /// big writes and reads stay one system call each.
    pub(crate) fn alloc(&mut self, st: &dyn Storage, keys: &Subkeys, n: usize) -> Result<Vec<u64>> {
        if n >= RUN_MIN {
            if let Some(start) = self.alloc_run(st, keys, n as u64)? {
                return Ok((start..start + n as u64).collect());
            }
        }
        self.alloc_scattered(st, keys, n)
    }

    /// Allocates `n` contiguous blocks near the cursor for a compressed unit (FORMAT.md
    /// §18.3 rule 6); `None` when no such run is at hand.
    pub(crate) fn alloc_run(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        n: u64,
    ) -> Result<Option<u64>> {
        let Some(start) = self.find_run(st, keys, n)? else {
            return Ok(None);
        };
        self.take_run(st, keys, start, n)?;
        Ok(Some(start))
    }

    /// [`AllocState::alloc_run`] for a copy that cannot be stored otherwise (a unit
    /// re-encrypted or received): the whole space is searched, from its start, before it is
    /// `NoSpace`.
    pub(crate) fn alloc_run_anywhere(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        n: u64,
    ) -> Result<u64> {
        if let Some(start) = self.alloc_run(st, keys, n)? {
            return Ok(start);
        }
        let cursor = self.cursor;
        self.cursor = self.data_start;
        let mut found = None;
        while found.is_none() && self.cursor + n <= self.capacity {
            found = self.find_run(st, keys, n)?;
            // Windows overlap by `n`, so that no run across their border is missed.
            self.cursor = (self.cursor + RUN_SCAN.saturating_sub(n).max(1)).min(self.capacity);
        }
        self.cursor = cursor;
        let start = found.ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::NoSpace,
                format!("no run of {n} free blocks is left for a compressed unit"),
            )
        })?;
        self.take_run(st, keys, start, n)?;
        Ok(start)
    }

    /// Marks `start .. start + n`, found free, in use.
    fn take_run(&mut self, st: &dyn Storage, keys: &Subkeys, start: u64, n: u64) -> Result<()> {
        for pbn in start..start + n {
            self.set_bit(st, keys, pbn, true)?;
        }
        self.cursor = start + n;
        self.used += n;
        self.high_water = self.high_water.max(start + n);
        Ok(())
    }

    /// The start of `n` contiguous free blocks within [`RUN_SCAN`] blocks of the cursor.
    fn find_run(&mut self, st: &dyn Storage, keys: &Subkeys, n: u64) -> Result<Option<u64>> {
        let mut pbn = self.cursor.max(self.data_start);
        let limit = (pbn + RUN_SCAN).min(self.capacity);
        let mut run_start = pbn;
        let mut run = 0u64;
        while pbn < limit {
            let index = pbn / BITS_PER_SPACE_LEAF;
            self.leaf(st, keys, index)?;
            let Some(leaf) = self.leaves.get(&index) else {
                return Err(Error::corrupt("internal: a space leaf left the cache"));
            };
            let base = index * BITS_PER_SPACE_LEAF;
            let end = (base + BITS_PER_SPACE_LEAF).min(limit);
            while pbn < end {
                let j = (pbn - base) as usize;
                if j % 8 == 0 && leaf.bits[j / 8] == 0xff && pbn + 8 <= end {
                    run = 0;
                    pbn += 8;
                    continue;
                }
                let free = leaf.bits[j / 8] & (1 << (j % 8)) == 0 && !self.held.contains(pbn);
                if free {
                    if run == 0 {
                        run_start = pbn;
                    }
                    run += 1;
                    if run == n {
                        return Ok(Some(run_start));
                    }
                } else {
                    run = 0;
                }
                pbn += 1;
            }
        }
        Ok(None)
    }

    fn alloc_scattered(&mut self, st: &dyn Storage, keys: &Subkeys, n: usize) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(n);
        let mut scanned = 0u64;
        let span = self.capacity - self.data_start;
        while out.len() < n {
            if scanned > span {
                for &pbn in &out {
                    self.set_bit(st, keys, pbn, false)?;
                }
                self.used -= out.len() as u64;
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "no free block is left among the volume's {} physical blocks",
                        self.capacity
                    ),
                ));
            }
            if self.cursor >= self.capacity {
                self.cursor = self.data_start;
            }
            let index = self.cursor / BITS_PER_SPACE_LEAF;
            self.leaf(st, keys, index)?;
            let Some(leaf) = self.leaves.get_mut(&index) else {
                return Err(Error::corrupt("internal: a space leaf left the cache"));
            };
            let base = index * BITS_PER_SPACE_LEAF;
            let end = (base + BITS_PER_SPACE_LEAF).min(self.capacity);
            let mut pbn = self.cursor;
            while pbn < end && out.len() < n {
                let j = (pbn - base) as usize;
                if j % 8 == 0 && leaf.bits[j / 8] == 0xff {
                    pbn += 8;
                    continue;
                }
                if leaf.bits[j / 8] & (1 << (j % 8)) == 0 && !self.held.contains(pbn) {
                    leaf.bits[j / 8] |= 1 << (j % 8);
                    leaf.dirty = true;
                    out.push(pbn);
                }
                pbn += 1;
            }
            scanned += pbn - self.cursor;
            self.cursor = pbn;
        }
        self.used += out.len() as u64;
        if let Some(&top) = out.iter().max() {
            self.high_water = self.high_water.max(top + 1);
        }
        Ok(out)
    }

    /// Frees `pbn`, which a committed tree or a log record may still reference: allocatable
    /// only after the next commit. `punch`: it held discarded data.
    pub(crate) fn free(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        pbn: u64,
        punch: bool,
    ) -> Result<()> {
        if pbn == 0 {
            return Ok(());
        }
        self.check_range(pbn)?;
        if !self.bit(st, keys, pbn)? {
            return Err(Error::integrity(format!(
                "block {pbn} is freed twice: the block map is inconsistent"
            )));
        }
        self.set_bit(st, keys, pbn, false)?;
        self.used -= 1;
        self.held.pending.insert(pbn);
        if punch {
            self.punch.insert(pbn);
        }
        Ok(())
    }

    /// Frees a block that nothing durable references (allocated, never published).
    pub(crate) fn free_unused(&mut self, st: &dyn Storage, keys: &Subkeys, pbn: u64) -> Result<()> {
        self.set_bit(st, keys, pbn, false)?;
        self.used -= 1;
        Ok(())
    }

    /// Takes `pbn` back if it is free and allocatable now; says whether it did.
    pub(crate) fn try_claim(&mut self, st: &dyn Storage, keys: &Subkeys, pbn: u64) -> Result<bool> {
        self.check_range(pbn)?;
        if self.bit(st, keys, pbn)? || self.held.contains(pbn) {
            return Ok(false);
        }
        self.set_bit(st, keys, pbn, true)?;
        self.used += 1;
        Ok(true)
    }

    /// Marks `pbn` in use while replaying the log; it must be free in the committed bitmap.
    pub(crate) fn claim(&mut self, st: &dyn Storage, keys: &Subkeys, pbn: u64) -> Result<()> {
        self.check_range(pbn)?;
        if self.bit(st, keys, pbn)? {
            return Err(Error::integrity(format!(
                "the log maps block {pbn}, which the committed space map says is in use"
            )));
        }
        self.set_bit(st, keys, pbn, true)?;
        self.used += 1;
        self.high_water = self.high_water.max(pbn + 1);
        Ok(())
    }

    fn check_range(&self, pbn: u64) -> Result<()> {
        if pbn < self.data_start || pbn >= self.capacity {
            return Err(Error::corrupt(format!(
                "block {pbn} is outside the data region"
            )));
        }
        Ok(())
    }

    /// Frees the old copy (if any) and allocates one block: the relocation step of a commit.
    pub(crate) fn realloc(&mut self, st: &dyn Storage, keys: &Subkeys, old: u64) -> Result<u64> {
        self.free(st, keys, old, false)?;
        Ok(self.alloc(st, keys, 1)?[0])
    }

    /// Commit, step 2: relocates every dirty bitmap leaf and its ancestors until allocating
    /// their blocks dirties no further leaf, then MACs them. Returns the new root and pages.
    pub(crate) fn prepare_commit(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        out: &mut PageWriter<'_>,
    ) -> Result<NodePtr> {
        let mut moved: BTreeMap<u64, u64> = BTreeMap::new();
        loop {
            let todo: Vec<u64> = self
                .leaves
                .iter()
                .filter(|(i, l)| l.dirty && !moved.contains_key(i))
                .map(|(&i, _)| i)
                .collect();
            if todo.is_empty() {
                break;
            }
            for index in todo {
                let mut tree = std::mem::replace(
                    &mut self.tree,
                    TreeCache::new(TreeKind::Space, 1, NodePtr::default()),
                );
                let r =
                    tree.relocate_path(st, keys, index, &mut |old| self.realloc(st, keys, old.pbn));
                self.tree = tree;
                r?;
                let old = self.leaves.get(&index).map_or(0, |l| l.pbn);
                let new = self.realloc(st, keys, old)?;
                moved.insert(index, new);
            }
        }
        let mut ptrs = Vec::with_capacity(moved.len());
        for (&index, &pbn) in &moved {
            let leaf = self
                .leaves
                .get_mut(&index)
                .ok_or_else(|| Error::corrupt("internal: a moved space leaf is not cached"))?;
            leaf.pbn = pbn;
            leaf.dirty = false;
            ptrs.push((
                index,
                NodePtr {
                    pbn,
                    mac: node_mac(keys, TreeKind::Space, 0, index, &leaf.bits[..]),
                    ..NodePtr::default()
                },
            ));
            out.push(pbn, &leaf.bits[..])?;
        }
        for (pbn, page) in self.tree.seal(keys, &ptrs, 0)? {
            out.push(pbn, &page[..])?;
        }
        Ok(self.tree.root())
    }

    /// Commit, once its space tree is written (FORMAT.md §10): the blocks freed so far wait
    /// for its superblock to be durable; blocks freed from now on wait for the next commit.
    pub(crate) fn begin_commit(&mut self) {
        let pending = std::mem::take(&mut self.held.pending);
        self.held.committing.extend(pending);
        self.committing_punch
            .extend(std::mem::take(&mut self.punch));
    }

    /// Commit, once its superblock is durable: the blocks to punch of those it freed (still
    /// held back, so that nothing is written to them before they are punched).
    pub(crate) fn committed_punches(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.committing_punch)
    }

    /// Commit, last step: the blocks it freed become allocatable.
    pub(crate) fn release_committed(&mut self) {
        self.held.committing.clear();
        self.cursor = self.data_start;
    }

    /// Marks every bitmap leaf the tree has dirty (loading it, verified under `keys`), so that
    /// the next commit rewrites the whole space tree under the keys in force then (a
    /// re-encryption's start, FORMAT.md §17). Returns the most blocks that commit allocates
    /// for the space tree.
    pub(crate) fn dirty_all(&mut self, st: &dyn Storage, keys: &Subkeys) -> Result<u64> {
        let leaves = self.capacity.div_ceil(BITS_PER_SPACE_LEAF);
        let mut i = 0;
        while i < leaves {
            let (ptr, skip) = self.tree.probe_leaf(st, keys, i)?;
            if ptr.pbn != 0 {
                self.leaf(st, keys, i)?.dirty = true;
            }
            i += skip.max(1);
        }
        Ok(self.leaves.len() as u64 + self.tree.cached_nodes() + u64::from(self.tree.height()))
    }

    /// Runs (first block, count) of free blocks of the data region in `range` (below the
    /// high-water mark), leaving out blocks freed since the last commit (the committed maps
    /// may still hold them).
    pub(crate) fn free_runs(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut pbn = range.start.max(self.data_start);
        let stop = range.end.min(self.high_water);
        while pbn < stop {
            let leaf = pbn / BITS_PER_SPACE_LEAF;
            let end = ((leaf + 1) * BITS_PER_SPACE_LEAF).min(stop);
            self.leaf(st, keys, leaf)?;
            let bits = &self.leaves[&leaf].bits;
            for p in pbn..end {
                let j = (p % BITS_PER_SPACE_LEAF) as usize;
                if bits[j / 8] & (1 << (j % 8)) == 0 && !self.held.contains(p) {
                    match runs.last_mut() {
                        Some((start, n)) if *start + *n == p => *n += 1,
                        _ => runs.push((p, 1)),
                    }
                }
            }
            pbn = end;
        }
        Ok(runs)
    }

    /// The first block of the data region.
    pub(crate) fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Blocks in use in the data region (data and metadata).
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// One past the highest block ever allocated.
    pub(crate) fn high_water(&self) -> u64 {
        self.high_water
    }

    /// The space tree's height.
    pub(crate) fn height(&self) -> u8 {
        self.tree.height()
    }

    /// How many physical blocks the space tree may hand out.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Test hook: the next allocation looks from `pbn` on.
    #[cfg(test)]
    pub(crate) fn set_cursor(&mut self, pbn: u64) {
        self.cursor = pbn;
    }

    /// The space tree's root as last committed (nothing dirty: right after a commit).
    pub(crate) fn root(&self) -> NodePtr {
        self.tree.root()
    }

    /// The volume grew (or shrank): the tree now has `height` and root `root` (written by
    /// the caller), and the allocator may hand out blocks below `capacity`.
    pub(crate) fn resize(&mut self, height: u8, root: NodePtr, capacity: u64) {
        if height != self.tree.height() {
            self.tree = TreeCache::new(TreeKind::Space, height, root);
        }
        self.capacity = capacity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::storage::MemStorage;
    use crate::suite::CipherSuite;

    fn setup() -> (MemStorage, Subkeys, Allocator) {
        let keys = Subkeys::derive(
            &VolumeKey::from_bytes([1; 32]),
            CipherSuite::default(),
            [0; 16],
        );
        let cap = space_capacity(Regions::V1, 1000);
        let a = Allocator::new(
            AllocState::height_for(cap),
            NodePtr::default(),
            Regions::V1.data_start_block(),
            cap,
            0,
            0,
        );
        (MemStorage::new(), keys, a)
    }

    #[test]
    fn big_requests_get_one_run() {
        let (st, keys, a) = setup();
        let mut s = a.lock();
        s.mark_fixed_regions(&st, &keys).unwrap();
        let small = s.alloc(&st, &keys, 20).unwrap();
        for pbn in small.iter().step_by(2) {
            s.free(&st, &keys, *pbn, false).unwrap();
        }
        s.begin_commit();
        s.release_committed();
        let run = s.alloc(&st, &keys, 16).unwrap();
        assert!(run.windows(2).all(|w| w[1] == w[0] + 1), "{run:?}");
        assert!(
            run[0] >= 1060,
            "the holes of one block are skipped: {run:?}"
        );
        let scattered = s.alloc(&st, &keys, 3).unwrap();
        assert_eq!(
            scattered[0], 1076,
            "small requests take what follows the cursor"
        );
    }

    #[test]
    fn freed_blocks_wait_for_the_commit() {
        let (st, keys, a) = setup();
        let mut s = a.lock();
        s.mark_fixed_regions(&st, &keys).unwrap();
        let got = s.alloc(&st, &keys, 4).unwrap();
        assert_eq!(got, vec![1040, 1041, 1042, 1043]);
        s.free(&st, &keys, 1041, true).unwrap();
        assert_eq!(
            s.alloc(&st, &keys, 1).unwrap(),
            vec![1044],
            "pending blocks are not reused"
        );
        assert!(
            s.free(&st, &keys, 1041, false).is_err(),
            "double free is caught"
        );
        let mut w = PageWriter::new(&st);
        let root = s.prepare_commit(&st, &keys, &mut w).unwrap();
        w.flush().unwrap();
        assert!(root.pbn >= Regions::V1.data_start_block());
        s.begin_commit();
        s.free(&st, &keys, 1040, false).unwrap();
        assert_eq!(s.committed_punches(), vec![1041]);
        assert!(
            !s.try_claim(&st, &keys, 1041).unwrap(),
            "blocks of a commit in flight are not reused"
        );
        s.release_committed();
        assert_eq!(s.alloc(&st, &keys, 1).unwrap(), vec![1041]);
        assert!(
            !s.try_claim(&st, &keys, 1040).unwrap(),
            "blocks freed after the commit began wait for the next one"
        );
        s.begin_commit();
        s.release_committed();
        assert!(s.try_claim(&st, &keys, 1040).unwrap());
        // The committed bitmap reloads and agrees.
        let used = s.used();
        drop(s);
        let b = Allocator::new(
            AllocState::height_for(space_capacity(Regions::V1, 1000)),
            root,
            Regions::V1.data_start_block(),
            space_capacity(Regions::V1, 1000),
            used,
            0,
        );
        let mut t = b.lock();
        assert!(t.bit(&st, &keys, 1040).unwrap());
        assert!(
            !t.bit(&st, &keys, 1041).unwrap(),
            "1041 was allocated after the commit"
        );
        assert!(t.claim(&st, &keys, 1040).is_err());
        t.claim(&st, &keys, 1041).unwrap();
    }
}
