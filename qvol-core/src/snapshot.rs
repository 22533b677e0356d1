//! Snapshots (docs/FORMAT.md §6.1, §7.1, §8.1): the snapshot table, births, and the space
//! accounting that keeps every block a snapshot holds and frees exactly what only a deleted
//! snapshot (or a discarded live state) held.
//!
//! A snapshot is a named, read-only map root. Blocks are shared between the live map and
//! the snapshots, always at the same position (a data block at its logical block, a node at
//! its level and index), so "does any other tree hold this block" is answered by looking at
//! that position in each other tree. Births make the common case free: a block born after
//! the newest snapshot was taken is held by no snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::alloc::AllocState;
use crate::error::{Error, ErrorKind, Result};
use crate::group::{first_reference, group_of};
use crate::layout::*;
use crate::node::{decode_interior_entry, node_mac, LeafEntry, NodePtr, TreeKind};
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::tree::{read_node, OldNode, Page, PageWriter, TreeCache};
use crate::volume::Volume;

/// `"QVOLSNP4"`: the magic of a snapshot table block.
const TABLE_MAGIC: [u8; 8] = *b"QVOLSNP4";
/// Entries per table block.
pub(crate) const PER_BLOCK: usize = 10;
/// Bytes of one entry.
const ENTRY_BYTES: usize = crate::send::ENTRY_LEN;
/// Where the entries start in a table block.
pub(crate) const ENTRIES_AT: usize = 64;
/// The most snapshots of one volume.
pub const MAX_SNAPSHOTS: usize = 1000;
/// The longest snapshot name in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// A snapshot: a read-only map root and what identifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Its name (1..=255 bytes of UTF-8, no control characters), unique in the volume.
    pub name: String,
    /// 16 random bytes drawn at creation: the same snapshot on every copy of the volume.
    pub guid: [u8; 16],
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The generation of the commit whose map it holds.
    pub generation: u64,
    /// Its snapshot epoch: every block it holds was born in this epoch or before.
    pub epoch: u32,
    /// The height of its map.
    pub map_height: u8,
    /// The root of its map.
    pub root: NodePtr,
}

/// A snapshot and the space only it holds (what deleting it would free).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Bytes of data and map nodes that no other snapshot and not the live disk hold.
    pub unique_bytes: u64,
}

/// A block the live map stopped using that a snapshot may hold: decided at the next commit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kill {
    pub(crate) pbn: u64,
    pub(crate) birth: u32,
    pub(crate) lbn: u64,
    pub(crate) punch: bool,
    /// The blocks of the compressed unit at `pbn` (its group starts at `lbn`), 0 for a
    /// plain block (FORMAT.md §18.3).
    pub(crate) blocks: u8,
}

impl Kill {
    /// The kill of the block `entry` of logical block `lbn` points to (`punch`: it held
    /// discarded data).
    pub(crate) fn of(entry: &LeafEntry, lbn: u64, punch: bool) -> Kill {
        Kill {
            pbn: entry.pbn,
            birth: entry.birth,
            lbn,
            punch,
            blocks: 0,
        }
    }

    /// The physical blocks it frees.
    pub(crate) fn pbns(&self) -> std::ops::Range<u64> {
        self.pbn..self.pbn + u64::from(self.blocks.max(1))
    }
}

/// Where a block sits in a map.
#[derive(Clone, Copy, Debug)]
enum Position {
    Data(u64),
    Node(u8, u64),
}

/// The snapshot state of an open volume.
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    /// The birth of blocks written now (the superblock's snapshot epoch).
    epoch: AtomicU32,
    /// One more than the newest snapshot's epoch; 0 when there is none. A block born at or
    /// after it is held by no snapshot.
    held_below: AtomicU64,
    pub(crate) inner: Mutex<SnapInner>,
}

#[derive(Debug, Default)]
pub(crate) struct SnapInner {
    pub(crate) list: Vec<Snapshot>,
    /// The table's first block as the last commit wrote it.
    pub(crate) table: NodePtr,
    /// Blocks of that table (freed when it is rewritten).
    table_blocks: Vec<u64>,
    /// The table must be rewritten by the next commit.
    dirty: bool,
    /// Kills of blocks a snapshot may hold, decided at the next commit.
    kills: Vec<Kill>,
    /// Cached nodes of snapshot maps, for those decisions (cleared after every commit).
    views: HashMap<usize, (TreeCache, HashMap<u64, Page>)>,
}

impl Snapshots {
    /// The state of a superblock's table (loaded and verified by [`load_table`]).
    pub(crate) fn new(epoch: u32, table: NodePtr, list: Vec<Snapshot>, blocks: Vec<u64>) -> Self {
        let s = Snapshots {
            epoch: AtomicU32::new(epoch),
            held_below: AtomicU64::new(0),
            inner: Mutex::new(SnapInner {
                list,
                table,
                table_blocks: blocks,
                ..SnapInner::default()
            }),
        };
        s.refresh(&s.lock());
        s
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, SnapInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The birth of blocks written now.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether a block born in `birth` may be held by a snapshot.
    pub(crate) fn may_hold(&self, birth: u32) -> bool {
        u64::from(birth) < self.held_below.load(Ordering::Acquire)
    }

    fn refresh(&self, inner: &SnapInner) {
        let below = inner
            .list
            .iter()
            .map(|s| u64::from(s.epoch) + 1)
            .max()
            .unwrap_or(0);
        self.held_below.store(below, Ordering::Release);
    }
}

impl Volume {
    /// The volume's snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.snaps.lock().list.clone()
    }

    /// The snapshots with the space each alone holds (a walk of what differs between
    /// them and the live disk: proportional to the changes, not to the disk). A writable
    /// volume commits first, so that the live disk counts as it is now; I/O waits meanwhile.
    pub fn snapshot_usage(&self) -> Result<Vec<SnapshotUsage>> {
        self.check_usable()?;
        let _gate = self.exclusive();
        if !self.read_only {
            self.commit_locked(false)?;
        }
        let list = self.snapshots();
        let live = self.committed_live();
        let mut out = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let others = other_roots(&list, Some(i), Some(live));
            let mut blocks = 0u64;
            self.walk_exclusive((s.root, s.map_height), &others, &mut |_| {
                blocks += 1;
                Ok(())
            })?;
            out.push(SnapshotUsage {
                snapshot: s.clone(),
                unique_bytes: blocks * BLOCK_SIZE,
            });
        }
        Ok(out)
    }

    /// Takes a snapshot of the live disk named `name`: everything written before this call
    /// returned (a crash-consistent point in time). O(1): two commits, no data copied.
    pub fn create_snapshot(&self, name: &str) -> Result<Snapshot> {
        self.check_snapshot_change(Some(name))?;
        let _gate = self.exclusive();
        if self.snaps.lock().list.iter().any(|s| s.name == name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a snapshot named {name:?} already exists"),
            ));
        }
        self.commit_locked(true)?;
        let snap = self.push_live_snapshot(name)?;
        self.commit_locked(true)?;
        Ok(snap)
    }

    /// Deletes snapshot `name` and frees (and punches) the blocks only it held. Returns the
    /// bytes freed.
    pub fn delete_snapshot(&self, name: &str) -> Result<u64> {
        self.check_snapshot_change(None)?;
        let _gate = self.exclusive();
        let index = self.find_snapshot(name)?;
        self.commit_locked(true)?;
        let gone = {
            let mut inner = self.snaps.lock();
            let gone = inner.list.remove(index);
            inner.dirty = true;
            self.snaps.refresh(&inner);
            gone
        };
        let others = other_roots(&self.snapshots(), None, Some(self.committed_live()));
        let freed = self
            .free_exclusive((gone.root, gone.map_height), &others)
            .map_err(|e| self.fail(e))?;
        self.commit_locked(true)?;
        Ok(freed * BLOCK_SIZE)
    }

    /// Makes the live disk the content of snapshot `name`. The current state is discarded
    /// (its blocks no snapshot holds are freed), or kept as a new snapshot named
    /// `keep_current`. The caller makes sure nobody is using the disk.
    pub fn revert_to_snapshot(&self, name: &str, keep_current: Option<&str>) -> Result<()> {
        self.check_snapshot_change(keep_current)?;
        let _gate = self.exclusive();
        let index = self.find_snapshot(name)?;
        if let Some(keep) = keep_current {
            if self.snaps.lock().list.iter().any(|s| s.name == keep) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("a snapshot named {keep:?} already exists"),
                ));
            }
        }
        self.commit_locked(true)?;
        let target = self.snaps.lock().list[index].clone();
        if let Some(keep) = keep_current {
            self.push_live_snapshot(keep)?;
        }
        self.replace_live(target.root, target.map_height)
    }

    /// Makes the map `root` of height `height` the live disk's (gate held exclusively, right
    /// after a commit): frees what only the live map held, keeps the live map's height (a map
    /// of a smaller disk goes below new root nodes, FORMAT.md §16) and commits.
    fn replace_live(&self, root: NodePtr, height: u8) -> Result<()> {
        let live = self.committed_live();
        let others = other_roots(&self.snapshots(), None, None);
        // The live map keeps its height, or takes the taller one of a received snapshot.
        let to = live.1.max(height);
        self.free_exclusive(live, &others)
            .and_then(|_| self.wrap_map_root(root, height, to))
            .map(|root| self.map.reset(to, root))
            .map_err(|e| self.fail(e))?;
        self.commit_locked(true)
    }

    /// `receive`, last step (gate held exclusively): `snap` (its nodes written, its root
    /// local) becomes a snapshot and the live disk's content; what only the live disk held
    /// is freed, and everything is committed at once.
    pub(crate) fn install_received(&self, snap: Snapshot) -> Result<Snapshot> {
        let snap = self.append_snapshot(snap)?;
        self.replace_live(snap.root, snap.map_height)?;
        Ok(snap)
    }

    /// `root`, a map of height `from`, below new interior nodes up to height `to` (each with
    /// the one below as its first entry), written now and committed by the next commit.
    pub(crate) fn wrap_map_root(&self, root: NodePtr, from: u8, to: u8) -> Result<NodePtr> {
        let mut a = self.alloc.lock();
        self.wrap_root(&mut a, TreeKind::Map, root, from, to)
    }

    /// [`Volume::wrap_map_root`] for either tree, with the allocator locked.
    pub(crate) fn wrap_root(
        &self,
        a: &mut AllocState,
        kind: TreeKind,
        root: NodePtr,
        from: u8,
        to: u8,
    ) -> Result<NodePtr> {
        let st = &*self.storage;
        let mut ptr = root;
        if ptr.pbn == 0 {
            return Ok(ptr);
        }
        for level in from + 1..=to {
            let mut page = crate::tree::zero_page();
            crate::node::encode_interior_entry(&mut page[..], 0, &ptr);
            let pbn = a.alloc(st, &self.keys(), 1)?[0];
            st.write_all_at(&page[..], pbn * BLOCK_SIZE)
                .map_err(|e| Error::io("cannot write a new tree root", e))?;
            let map = kind == TreeKind::Map;
            ptr = NodePtr {
                pbn,
                mac: node_mac(&self.keys(), kind, level, 0, &page[..]),
                birth: if map { self.snaps.epoch() } else { 0 },
                pmac: if map {
                    crate::node::node_pmac(&self.keys(), kind, level, 0, &page[..])
                } else {
                    [0; 16]
                },
            };
        }
        Ok(ptr)
    }

    /// Appends a snapshot of the committed live map (gate held exclusively, nothing dirty).
    fn push_live_snapshot(&self, name: &str) -> Result<Snapshot> {
        let sb = self.superblock().clone();
        let mut guid = [0u8; 16];
        crate::datablock::fill_random(&mut guid)?;
        self.append_snapshot(Snapshot {
            name: name.to_owned(),
            guid,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            generation: sb.generation,
            epoch: 0,
            map_height: sb.map_height,
            root: sb.map_root,
        })
    }

    /// Adds `snap` to the table with the current snapshot epoch, and starts the next epoch
    /// (FORMAT.md §6.1).
    fn append_snapshot(&self, mut snap: Snapshot) -> Result<Snapshot> {
        snap.epoch = self.snaps.epoch();
        let next = snap.epoch.checked_add(1).ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                "the volume has used up its 2^32 snapshot epochs",
            )
        })?;
        let mut inner = self.snaps.lock();
        inner.list.push(snap.clone());
        inner.dirty = true;
        self.snaps.epoch.store(next, Ordering::Release);
        self.snaps.refresh(&inner);
        Ok(snap)
    }

    fn check_snapshot_change(&self, new_name: Option<&str>) -> Result<()> {
        self.check_usable()?;
        if !self.header.has_snapshots() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "snapshots need format version {SNAPSHOT_VERSION}; this image has version {}",
                    self.header.version
                ),
            ));
        }
        if self.read_only {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the volume is open read-only; its snapshots cannot change",
            ));
        }
        if let Some(name) = new_name {
            validate_name(name)?;
            if self.snaps.lock().list.len() >= MAX_SNAPSHOTS {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("a volume has at most {MAX_SNAPSHOTS} snapshots; delete one first"),
                ));
            }
        }
        Ok(())
    }

    fn find_snapshot(&self, name: &str) -> Result<usize> {
        self.snaps
            .lock()
            .list
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("the volume has no snapshot named {name:?}"),
                )
            })
    }

    /// The live map's root and height as last committed.
    pub(crate) fn committed_live(&self) -> (NodePtr, u8) {
        let sb = self.superblock();
        (sb.map_root, sb.map_height)
    }

    /// Whether two maps (root, height) hold the same content: a taller one must lead down
    /// its first entries, with nothing else, to a root equal (by portable MAC) to the other's.
    pub(crate) fn same_map(&self, a: (NodePtr, u8), b: (NodePtr, u8)) -> Result<bool> {
        let (mut hi, lo) = if a.1 >= b.1 { (a, b) } else { (b, a) };
        while hi.1 > lo.1 && hi.0.pbn != 0 {
            let page = read_node(&*self.storage, &self.keys(), TreeKind::Map, hi.1, 0, &hi.0)?;
            for i in 1..FANOUT as usize {
                if decode_interior_entry(&page[..], i)?.pbn != 0 {
                    return Ok(false);
                }
            }
            hi = (decode_interior_entry(&page[..], 0)?, hi.1 - 1);
        }
        Ok(match (hi.0.pbn, lo.0.pbn) {
            (0, 0) => true,
            (0, _) | (_, 0) => false,
            _ => hi.0.pmac == lo.0.pmac,
        })
    }

    /// Frees every block of `gone`'s map that no tree of `others` holds at the same place.
    fn free_exclusive(&self, gone: (NodePtr, u8), others: &[(NodePtr, u8)]) -> Result<u64> {
        let mut found = Vec::new();
        self.walk_exclusive(gone, others, &mut |pbn| {
            found.push(pbn);
            Ok(())
        })?;
        let mut a = self.alloc.lock();
        for &pbn in &found {
            a.free(&*self.storage, &self.keys(), pbn, true)?;
        }
        Ok(found.len() as u64)
    }

    /// Calls `f(pbn)` for every block of `tree` that no root of `others` (with
    /// their heights) holds at the same position; subtrees another root shares are skipped
    /// whole. Maps of different heights (a disk grown between them) are compared position
    /// by position: a taller map is followed down its first entries to the shorter map's
    /// root level.
    pub(crate) fn walk_exclusive(
        &self,
        tree: (NodePtr, u8),
        others: &[(NodePtr, u8)],
        f: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let (tree_root, top) = tree;
        let mut aligned = Vec::with_capacity(others.len());
        for &(root, height) in others {
            let mut ptr = root;
            let mut level = height;
            while level > top && ptr.pbn != 0 {
                let page = read_node(&*self.storage, &self.keys(), TreeKind::Map, level, 0, &ptr)?;
                ptr = decode_interior_entry(&page[..], 0)?;
                level -= 1;
            }
            aligned.push((ptr, level.min(top)));
        }
        self.walk_node(top, 0, tree_root, aligned, f)
    }

    /// `others`: for each other map, its pointer at this position and the level it points
    /// to (below `level` for a shorter map, whose root only the first entries lead to).
    fn walk_node(
        &self,
        level: u8,
        index: u64,
        node: NodePtr,
        others: Vec<(NodePtr, u8)>,
        f: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        if node.pbn == 0 || others.iter().any(|(o, l)| *l == level && o.pbn == node.pbn) {
            return Ok(());
        }
        f(node.pbn)?;
        let st = &*self.storage;
        let page = read_node(st, &self.keys(), TreeKind::Map, level, index, &node)?;
        let mut pages: Vec<Page> = Vec::new();
        let mut seen = Vec::new();
        let mut short = Vec::new();
        for &(o, l) in others.iter().filter(|(o, _)| o.pbn != 0) {
            if l < level {
                short.push((o, l));
            } else if !seen.contains(&o.pbn) {
                seen.push(o.pbn);
                pages.push(read_node(
                    st,
                    &self.keys(),
                    TreeKind::Map,
                    level,
                    index,
                    &o,
                )?);
            }
        }
        for i in 0..FANOUT as usize {
            if level == 0 {
                let e = LeafEntry::decode(&page[..], i)?;
                if e.pbn == 0 {
                    continue;
                }
                if e.k > 0 {
                    // A unit: once, for the first entry of its group that references it,
                    // held by another map if any entry of its group there references it
                    // (FORMAT.md §18.3 rule 2).
                    let group = group_of(self.header.units(), i);
                    if first_reference(&page[..], group.clone(), e.pbn)? != Some(i) {
                        continue;
                    }
                    let mut shared = false;
                    for p in &pages {
                        shared |= first_reference(&p[..], group.clone(), e.pbn)?.is_some();
                    }
                    if !shared {
                        for pbn in e.pbn..e.pbn + u64::from(e.k) {
                            f(pbn)?;
                        }
                    }
                    continue;
                }
                let mut shared = false;
                for p in &pages {
                    shared |= LeafEntry::decode(&p[..], i)?.pbn == e.pbn;
                }
                if !shared {
                    f(e.pbn)?;
                }
            } else {
                let child = decode_interior_entry(&page[..], i)?;
                if child.pbn == 0 {
                    continue;
                }
                let mut kids = pages
                    .iter()
                    .map(|p| decode_interior_entry(&p[..], i).map(|c| (c, level - 1)))
                    .collect::<Result<Vec<_>>>()?;
                if i == 0 {
                    kids.extend(&short);
                }
                self.walk_node(level - 1, index * FANOUT + i as u64, child, kids, f)?;
            }
        }
        Ok(())
    }

    /// The live map stopped using data blocks `kills`: free those no snapshot can hold now,
    /// keep the others for the next commit to decide.
    pub(crate) fn kill_blocks(&self, kills: &[Kill]) -> Result<()> {
        let mut later = Vec::new();
        {
            let mut a = self.alloc.lock();
            for k in kills.iter().filter(|k| k.pbn != 0) {
                if self.snaps.may_hold(k.birth) {
                    later.push(*k);
                } else {
                    for pbn in k.pbns() {
                        a.free(&*self.storage, &self.keys(), pbn, k.punch)?;
                    }
                }
            }
        }
        if !later.is_empty() {
            self.snaps.lock().kills.extend(later);
        }
        Ok(())
    }

    /// Commit: frees the deferred kills no snapshot holds (gate held exclusively).
    pub(crate) fn settle_kills(&self, a: &mut AllocState) -> Result<()> {
        let kills = std::mem::take(&mut self.snaps.lock().kills);
        for k in kills {
            // A unit is held by any entry of its group (FORMAT.md §18.3 rule 2).
            let group = k.lbn..k.lbn + if k.blocks > 0 { self.unit_blocks() } else { 1 };
            let mut held = false;
            for lbn in group {
                held = held || self.held(Position::Data(lbn), k.pbn, k.birth)?;
            }
            if !held {
                for pbn in k.pbns() {
                    a.free(&*self.storage, &self.keys(), pbn, k.punch)?;
                }
            }
        }
        Ok(())
    }

    /// Commit: disposes of the old copy of a map node (freed unless a snapshot holds it)
    /// and allocates the new copy.
    pub(crate) fn realloc_map_node(&self, a: &mut AllocState, old: OldNode) -> Result<u64> {
        if old.pbn != 0
            && !(self.snaps.may_hold(old.birth)
                && self.held(Position::Node(old.level, old.index), old.pbn, old.birth)?)
        {
            a.free(&*self.storage, &self.keys(), old.pbn, false)?;
        }
        Ok(a.alloc(&*self.storage, &self.keys(), 1)?[0])
    }

    /// Whether a snapshot taken after `birth` holds `pbn` at `pos`.
    fn held(&self, pos: Position, pbn: u64, birth: u32) -> Result<bool> {
        let st = &*self.storage;
        let keys_now = self.keys();
        let keys = &*keys_now;
        let mut inner = self.snaps.lock();
        let SnapInner { list, views, .. } = &mut *inner;
        for (i, s) in list.iter().enumerate().filter(|(_, s)| s.epoch >= birth) {
            let (tree, leaves) = views.entry(i).or_insert_with(|| {
                (
                    TreeCache::new(TreeKind::Map, s.map_height, s.root),
                    HashMap::new(),
                )
            });
            let found = match pos {
                Position::Node(level, index) => tree.node_ptr(st, keys, level, index)?.pbn,
                Position::Data(lbn) => {
                    let leaf = lbn / FANOUT;
                    if let std::collections::hash_map::Entry::Vacant(slot) = leaves.entry(leaf) {
                        let ptr = if tree.reaches(leaf) {
                            tree.leaf_ptr(st, keys, leaf)?
                        } else {
                            NodePtr::default()
                        };
                        let page = if ptr.pbn == 0 {
                            crate::tree::zero_page()
                        } else {
                            read_node(st, keys, TreeKind::Map, 0, leaf, &ptr)?
                        };
                        slot.insert(page);
                    }
                    LeafEntry::decode(&leaves[&leaf][..], (lbn % FANOUT) as usize)?.pbn
                }
            };
            if found == pbn {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Commit, after the map: rewrites the snapshot table if it changed. Returns the table
    /// pointer and the snapshot epoch for the new superblock.
    pub(crate) fn commit_table(
        &self,
        a: &mut AllocState,
        out: &mut PageWriter<'_>,
    ) -> Result<(NodePtr, u32)> {
        let st = &*self.storage;
        let mut inner = self.snaps.lock();
        let epoch = self.snaps.epoch();
        if !inner.dirty {
            return Ok((inner.table, epoch));
        }
        for pbn in std::mem::take(&mut inner.table_blocks) {
            a.free(st, &self.keys(), pbn, true)?;
        }
        let chunks: Vec<&[Snapshot]> = inner.list.chunks(PER_BLOCK).collect();
        let blocks = if chunks.is_empty() {
            Vec::new()
        } else {
            a.alloc(st, &self.keys(), chunks.len())?
        };
        let mut next = NodePtr::default();
        for (i, chunk) in chunks.iter().enumerate().rev() {
            let page = encode_table_block(&self.keys(), chunk, &next);
            next = NodePtr {
                pbn: blocks[i],
                mac: node_mac(&self.keys(), TreeKind::Snapshots, 0, i as u64, &page[..]),
                ..NodePtr::default()
            };
            out.push(blocks[i], &page[..])?;
        }
        inner.table = next;
        inner.table_blocks = blocks;
        inner.dirty = false;
        Ok((next, epoch))
    }

    /// Gives the snapshots new map roots (rewritten copies of the same content, in table
    /// order); the next commit rewrites the table.
    pub(crate) fn set_snapshot_roots(&self, roots: &[NodePtr]) {
        let mut inner = self.snaps.lock();
        for (s, root) in inner.list.iter_mut().zip(roots) {
            s.root = *root;
        }
        inner.dirty = true;
        inner.views.clear();
    }

    /// After a commit: the views of snapshot maps are dropped (they reload on demand).
    pub(crate) fn after_commit(&self) {
        self.snaps.lock().views.clear();
    }
}

/// The roots (with their heights) of every snapshot but `skip`, and `live`.
fn other_roots(
    list: &[Snapshot],
    skip: Option<usize>,
    live: Option<(NodePtr, u8)>,
) -> Vec<(NodePtr, u8)> {
    list.iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, s)| (s.root, s.map_height))
        .chain(live)
        .filter(|(r, _)| r.pbn != 0)
        .collect()
}

/// Checks a new snapshot name: 1..=255 bytes of UTF-8 without control characters.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("a snapshot name {why}"),
        ))
    };
    if name.is_empty() {
        return bad("cannot be empty");
    }
    if name.len() > MAX_SNAPSHOT_NAME {
        return bad(&format!(
            "is at most {MAX_SNAPSHOT_NAME} bytes long, not {}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return bad("cannot contain control characters");
    }
    Ok(())
}

/// Offsets within a table entry (FORMAT.md §8.1).
const E_PMAC: usize = 88;
pub(crate) const E_MAC: usize = 104;
const E_NAME: usize = 136;

/// The MAC of a snapshot entry over what is the same on every copy of the volume (not its
/// epoch or where its root is): `BLAKE3-keyed(K_meta, "qvol-snap-v4" || volume id || guid ||
/// u64le(created) || u64le(generation) || u8(height) || root pmac || name)`. It lets `recv`
/// check a snapshot it is sent (FORMAT.md §8.1).
pub(crate) fn entry_mac(keys: &Subkeys, s: &Snapshot) -> [u8; 32] {
    let mut h = keys.meta_mac();
    h.update(b"qvol-snap-v4");
    h.update(keys.volume_id());
    h.update(&s.guid);
    h.update(&s.created.to_le_bytes());
    h.update(&s.generation.to_le_bytes());
    h.update(&[s.map_height]);
    h.update(&s.root.pmac);
    h.update(s.name.as_bytes());
    *h.finalize().as_bytes()
}

/// Encodes one table block of up to [`PER_BLOCK`] entries, linked to `next`.
fn encode_table_block(keys: &Subkeys, entries: &[Snapshot], next: &NodePtr) -> Page {
    let mut b = crate::tree::zero_page();
    b[..8].copy_from_slice(&TABLE_MAGIC);
    put_u32(&mut b[..], 8, entries.len() as u32);
    put_u64(&mut b[..], 16, next.pbn);
    b[24..56].copy_from_slice(&next.mac);
    for (k, s) in entries.iter().enumerate() {
        let e = &mut b[ENTRIES_AT + k * ENTRY_BYTES..ENTRIES_AT + (k + 1) * ENTRY_BYTES];
        e[..16].copy_from_slice(&s.guid);
        put_u64(e, 16, s.created);
        put_u64(e, 24, s.generation);
        put_u32(e, 32, s.epoch);
        e[36] = s.map_height;
        e[37] = s.name.len() as u8;
        put_u64(e, 40, s.root.pbn);
        put_u32(e, 48, s.root.birth);
        e[56..88].copy_from_slice(&s.root.mac);
        e[E_PMAC..E_PMAC + 16].copy_from_slice(&s.root.pmac);
        e[E_MAC..E_MAC + 32].copy_from_slice(&entry_mac(keys, s));
        e[E_NAME..E_NAME + s.name.len()].copy_from_slice(s.name.as_bytes());
    }
    b
}

/// Decodes a table block: its entries and the link to the next block.
pub(crate) fn decode_table_block(b: &[u8]) -> Result<(Vec<Snapshot>, NodePtr)> {
    let bad = |why: &str| Error::corrupt(format!("a snapshot table block {why}"));
    if b.len() != BS || b[..8] != TABLE_MAGIC {
        return Err(bad("has the wrong magic"));
    }
    let count = get_u32(b, 8) as usize;
    if count == 0 || count > PER_BLOCK || b[12..16] != [0; 4] || b[56..64] != [0; 8] {
        return Err(bad("has an invalid count or reserved bytes"));
    }
    let next = NodePtr {
        pbn: get_u64(b, 16),
        mac: get_array(b, 24),
        ..NodePtr::default()
    };
    if next.pbn != 0 && !(MIN_DATA_START_BLOCK..MAX_PBN).contains(&next.pbn) {
        return Err(bad("links outside the data region"));
    }
    let mut list = Vec::with_capacity(count);
    for k in 0..count {
        list.push(decode_table_entry(
            &b[ENTRIES_AT + k * ENTRY_BYTES..ENTRIES_AT + (k + 1) * ENTRY_BYTES],
        )?);
    }
    if b[ENTRIES_AT + count * ENTRY_BYTES..]
        .iter()
        .any(|&x| x != 0)
    {
        return Err(bad("has bytes after its last entry"));
    }
    Ok((list, next))
}

/// Checks the structure of a snapshot table block (FORMAT.md §8.1) without any key: its
/// entries and the pbn of the next block (0 = last). For fuzzing and corpus tests; an
/// image's table is read only through its MACs.
pub fn decode_snapshot_table_block(b: &[u8]) -> Result<(Vec<Snapshot>, u64)> {
    decode_table_block(b).map(|(list, next)| (list, next.pbn))
}

/// Decodes one snapshot entry (FORMAT.md §8.1; [`ENTRY_BYTES`] bytes).
pub(crate) fn decode_table_entry(e: &[u8]) -> Result<Snapshot> {
    let bad = |why: &str| Error::corrupt(format!("a snapshot entry {why}"));
    if e.len() != ENTRY_BYTES {
        return Err(bad("has the wrong length"));
    }
    let name_len = usize::from(e[37]);
    let name = std::str::from_utf8(&e[E_NAME..E_NAME + name_len])
        .map_err(|_| bad("has a name that is not UTF-8"))?
        .to_owned();
    validate_name(&name).map_err(|_| bad("has an invalid name"))?;
    let root = NodePtr {
        pbn: get_u64(e, 40),
        mac: get_array(e, 56),
        birth: get_u32(e, 48),
        pmac: get_array(e, E_PMAC),
    };
    if root.pbn != 0 && !(MIN_DATA_START_BLOCK..MAX_PBN).contains(&root.pbn) {
        return Err(bad("points outside the data region"));
    }
    let reserved = e[38..40]
        .iter()
        .chain(&e[52..56])
        .chain(&e[E_NAME + name_len..]);
    if reserved.into_iter().any(|&x| x != 0) || e[36] == 0 || e[36] > 8 {
        return Err(bad("has invalid fields"));
    }
    Ok(Snapshot {
        name,
        guid: get_array(e, 0),
        created: get_u64(e, 16),
        generation: get_u64(e, 24),
        epoch: get_u32(e, 32),
        map_height: e[36],
        root,
    })
}

/// Reads and verifies the snapshot table starting at `first` (FORMAT.md §8.1): the entries
/// in order and the blocks holding them.
pub(crate) fn load_table(
    st: &dyn Storage,
    keys: &Subkeys,
    first: &NodePtr,
    snap_epoch: u32,
) -> Result<(Vec<Snapshot>, Vec<u64>)> {
    let mut list: Vec<Snapshot> = Vec::new();
    let mut blocks = Vec::new();
    let mut ptr = *first;
    while ptr.pbn != 0 {
        if blocks.len() * PER_BLOCK >= MAX_SNAPSHOTS {
            return Err(Error::corrupt("the snapshot table is too long"));
        }
        let index = blocks.len() as u64;
        let page = read_node(st, keys, TreeKind::Snapshots, 0, index, &ptr)?;
        let (entries, next) = decode_table_block(&page[..])?;
        for s in entries {
            if s.epoch >= snap_epoch || list.iter().any(|o| o.name == s.name) {
                return Err(Error::corrupt(
                    "the snapshot table has a duplicate name or an epoch from the future",
                ));
            }
            list.push(s);
        }
        blocks.push(ptr.pbn);
        ptr = next;
    }
    Ok((list, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::suite::CipherSuite;

    fn keys() -> Subkeys {
        Subkeys::derive(
            &VolumeKey::from_bytes([2; 32]),
            CipherSuite::default(),
            [4; 16],
        )
    }

    fn sample(name: &str, epoch: u32) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid: [epoch as u8; 16],
            created: 1_700_000_000,
            generation: 40 + u64::from(epoch),
            epoch,
            map_height: 2,
            root: NodePtr {
                pbn: 5000 + u64::from(epoch),
                mac: [9; 32],
                birth: epoch,
                pmac: [epoch as u8; 16],
            },
        }
    }

    #[test]
    fn table_blocks_round_trip() {
        let list: Vec<_> = (0..PER_BLOCK as u32)
            .map(|i| sample(&"é".repeat(i as usize * 12 + 1), i))
            .collect();
        let next = NodePtr {
            pbn: 7000,
            mac: [3; 32],
            ..NodePtr::default()
        };
        let b = encode_table_block(&keys(), &list, &next);
        assert_eq!(decode_table_block(&b[..]).unwrap(), (list, next));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(validate_name("daily-2026-11-30").is_ok());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        for bad in ["", "a\nb", "tab\there", "\u{7f}"] {
            assert_eq!(
                validate_name(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
        assert!(validate_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn damaged_table_blocks_are_corrupt_not_panics() {
        let b = encode_table_block(&keys(), &[sample("a", 1)], &NodePtr::default());
        for i in 0..BS {
            for bit in [1u8, 0x80] {
                let mut c = b.clone();
                c[i] ^= bit;
                let _ = decode_table_block(&c[..]);
            }
        }
        let mut c = b.clone();
        c[ENTRIES_AT + 37] = 200;
        assert!(decode_table_block(&c[..]).is_err());
    }
}
