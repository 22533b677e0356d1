//! The block map in memory: leaves in sharded locks (so queue threads rarely meet), interior
//! nodes in one [`TreeCache`] touched only on a cache miss and at commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::fasthash::U64Map;
use crate::layout::*;
use crate::node::{node_mac, node_pmac, LeafEntry, NodePtr, TreeKind};
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::tree::{read_node, zero_page, OldNode, Page, PageWriter, Realloc, TreeCache};

const SHARDS: usize = 64;

/// One cached map leaf: 64 entries, where it is on disk, whether it changed since the commit.
#[derive(Debug)]
pub(crate) struct Leaf {
    page: Page,
    pbn: u64,
    /// The snapshot epoch its on-disk copy was written in.
    birth: u32,
    dirty: bool,
    /// The MACs of the page as it is now, computed ahead of the commit
    /// ([`BlockMap::premac_dirty`]); any change drops them.
    premac: Option<Premac>,
}

/// A leaf's MAC and portable MAC under the keys of key epoch `epoch`.
#[derive(Clone, Copy, Debug)]
struct Premac {
    epoch: u32,
    mac: [u8; 32],
    pmac: [u8; 16],
}

impl Leaf {
    /// Entry `i` (already validated when the leaf was loaded).
    pub(crate) fn get(&self, i: usize) -> LeafEntry {
        LeafEntry::decode(&self.page[..], i).unwrap_or_default()
    }

    /// Sets entry `i` and returns the previous one.
    pub(crate) fn set(&mut self, i: usize, entry: &LeafEntry) -> LeafEntry {
        let old = self.get(i);
        entry.encode(&mut self.page[..], i);
        self.dirty = true;
        self.premac = None;
        old
    }
}

/// The block map of a volume.
#[derive(Debug)]
pub(crate) struct BlockMap {
    shards: Vec<RwLock<U64Map<Leaf>>>,
    interior: Mutex<TreeCache>,
    /// Leaves changed since the last commit (they stay in memory until it).
    dirty_leaves: AtomicU64,
    /// `log2 N` of the volume's compression units (FORMAT.md §18); `None` without.
    units: Option<u8>,
}

type Shard = U64Map<Leaf>;

impl BlockMap {
    /// Forgets every cached node and makes `root` the map's root (a revert to a snapshot,
    /// with the gate held exclusively and nothing dirty).
    pub(crate) fn reset(&self, height: u8, root: NodePtr) {
        for shard in &self.shards {
            shard.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
        *self.interior.lock().unwrap_or_else(|p| p.into_inner()) =
            TreeCache::new(TreeKind::Map, height, root);
        self.dirty_leaves.store(0, Ordering::Relaxed);
    }

    /// `log2 N` of the volume's compression units; `None` without.
    pub(crate) fn units(&self) -> Option<u8> {
        self.units
    }

    /// The map's height.
    pub(crate) fn height(&self) -> u8 {
        self.interior
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .height()
    }

    /// The map whose root is `root` (height from the superblock), of a volume with
    /// compression units of `2^units` blocks (`None`: without).
    pub(crate) fn new(height: u8, root: NodePtr, units: Option<u8>) -> Self {
        BlockMap {
            units,
            shards: (0..SHARDS)
                .map(|_| RwLock::new(U64Map::default()))
                .collect(),
            interior: Mutex::new(TreeCache::new(TreeKind::Map, height, root)),
            dirty_leaves: AtomicU64::new(0),
        }
    }

    fn shard(&self, leaf: u64) -> &RwLock<Shard> {
        &self.shards[(leaf % SHARDS as u64) as usize]
    }

    /// Loads leaf `leaf` from disk (or a zero leaf if absent), verified against its parent.
    fn load(&self, st: &dyn Storage, keys: &Subkeys, leaf: u64) -> Result<Leaf> {
        let ptr = {
            let mut t = self.interior.lock().unwrap_or_else(|p| p.into_inner());
            if t.reaches(leaf) {
                t.leaf_ptr(st, keys, leaf)?
            } else {
                // A map shorter than the disk (FORMAT.md §16): absent, reads as zeros.
                NodePtr::default()
            }
        };
        if ptr.pbn == 0 {
            return Ok(Leaf {
                page: zero_page(),
                pbn: 0,
                birth: 0,
                dirty: false,
                premac: None,
            });
        }
        let page = read_node(st, keys, TreeKind::Map, 0, leaf, &ptr)?;
        crate::group::check_groups(&page[..], self.units)?;
        Ok(Leaf {
            page,
            pbn: ptr.pbn,
            birth: ptr.birth,
            dirty: false,
            premac: None,
        })
    }

    /// Copies the entries of `lbn .. lbn + out.len()` (all within one leaf) into `out`.
    pub(crate) fn lookup(
        &self,
        st: &dyn Storage,
        keys: &Subkeys,
        lbn: u64,
        out: &mut [LeafEntry],
    ) -> Result<()> {
        let leaf = lbn / FANOUT;
        let first = (lbn % FANOUT) as usize;
        {
            let shard = self.shard(leaf).read().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = shard.get(&leaf) {
                for (i, e) in out.iter_mut().enumerate() {
                    *e = l.get(first + i);
                }
                return Ok(());
            }
        }
        self.with_leaf(st, keys, leaf, |l| {
            for (i, e) in out.iter_mut().enumerate() {
                *e = l.get(first + i);
            }
            Ok(())
        })
    }

    /// Runs `f` on leaf `leaf` under its shard's write lock (loading it if needed).
    pub(crate) fn with_leaf<R>(
        &self,
        st: &dyn Storage,
        keys: &Subkeys,
        leaf: u64,
        f: impl FnOnce(&mut Leaf) -> Result<R>,
    ) -> Result<R> {
        let loaded = {
            let shard = self.shard(leaf).read().unwrap_or_else(|p| p.into_inner());
            shard.contains_key(&leaf)
        };
        let fresh = if loaded {
            None
        } else {
            Some(self.load(st, keys, leaf)?)
        };
        let mut shard = self.shard(leaf).write().unwrap_or_else(|p| p.into_inner());
        let l = match fresh {
            Some(fresh) => shard.entry(leaf).or_insert(fresh),
            None => match shard.get_mut(&leaf) {
                Some(l) => l,
                None => return Err(Error::corrupt("internal: a map leaf left the cache")),
            },
        };
        let was_dirty = l.dirty;
        let r = f(l);
        if l.dirty && !was_dirty {
            self.dirty_leaves.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// How many leaves changed since the last commit.
    pub(crate) fn dirty_leaves(&self) -> u64 {
        self.dirty_leaves.load(Ordering::Relaxed)
    }

    /// Whether any leaf changed since the last commit.
    pub(crate) fn is_dirty(&self) -> bool {
        self.shards.iter().any(|shard| {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            shard.values().any(|l| l.dirty)
        })
    }

    /// Commit, step 1 (the caller holds the commit gate exclusively): gives every dirty leaf
    /// and its ancestors a new block, MACs them bottom-up (born in snapshot epoch `birth`)
    /// and hands them to `out`. Returns the new root and the leaves' new blocks. `realloc`
    /// disposes of an old copy and returns a new block.
    pub(crate) fn prepare_commit(
        &self,
        st: &dyn Storage,
        keys: &Subkeys,
        realloc: &mut Realloc<'_>,
        birth: u32,
        out: &mut PageWriter<'_>,
    ) -> Result<(NodePtr, Vec<(u64, u64)>)> {
        let mut dirty: Vec<u64> = Vec::new();
        for shard in &self.shards {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            dirty.extend(shard.iter().filter(|(_, l)| l.dirty).map(|(&i, _)| i));
        }
        dirty.sort_unstable();
        let t0 = std::time::Instant::now();
        let mut t = self.interior.lock().unwrap_or_else(|p| p.into_inner());
        let mut plan = Vec::with_capacity(dirty.len());
        for index in dirty {
            t.relocate_path(st, keys, index, realloc)?;
            let (pbn, old_birth) = self.leaf_pbn(index)?;
            let new = realloc(OldNode {
                pbn,
                birth: old_birth,
                level: 0,
                index,
            })?;
            plan.push((index, new));
        }
        let t1 = t0.elapsed();
        let macs = self.leaf_macs(keys, &plan)?;
        let t2 = t0.elapsed();
        let mut ptrs = Vec::with_capacity(plan.len());
        for (&(index, pbn), (mac, pmac)) in plan.iter().zip(macs) {
            let shard = self.shard(index).read().unwrap_or_else(|p| p.into_inner());
            let leaf = shard
                .get(&index)
                .ok_or_else(|| Error::corrupt("internal: a dirty map leaf left the cache"))?;
            out.push(pbn, &leaf.page[..])?;
            ptrs.push((
                index,
                NodePtr {
                    pbn,
                    mac,
                    birth,
                    pmac,
                },
            ));
        }
        let moved = plan;
        let t3 = t0.elapsed();
        for (pbn, page) in t.seal(keys, &ptrs, birth)? {
            out.push(pbn, &page[..])?;
        }
        log::debug!(
            "map commit: relocate {t1:?}, leaf MACs {:?}, leaves written {:?}, interior {:?}",
            t2 - t1,
            t3 - t2,
            t0.elapsed() - t3
        );
        Ok((t.root(), moved))
    }

    fn leaf_pbn(&self, index: u64) -> Result<(u64, u32)> {
        let shard = self.shard(index).read().unwrap_or_else(|p| p.into_inner());
        shard
            .get(&index)
            .map(|l| (l.pbn, l.birth))
            .ok_or_else(|| Error::corrupt("internal: a dirty map leaf left the cache"))
    }

    /// The MACs and portable MACs of the leaves in `plan`, computed on several threads when
    /// there are many (a commit after 10,000 random writes MACs about as many leaves).
    fn leaf_macs(&self, keys: &Subkeys, plan: &[(u64, u64)]) -> Result<Vec<([u8; 32], [u8; 16])>> {
        let mac_of = |index: u64| -> Result<([u8; 32], [u8; 16])> {
            let shard = self.shard(index).read().unwrap_or_else(|p| p.into_inner());
            let leaf = shard
                .get(&index)
                .ok_or_else(|| Error::corrupt("internal: a dirty map leaf left the cache"))?;
            if let Some(p) = leaf.premac.filter(|p| p.epoch == keys.epoch()) {
                return Ok((p.mac, p.pmac));
            }
            Ok((
                node_mac(keys, TreeKind::Map, 0, index, &leaf.page[..]),
                node_pmac(keys, TreeKind::Map, 0, index, &leaf.page[..]),
            ))
        };
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        if workers < 2 || plan.len() < 1024 {
            return plan.iter().map(|&(index, _)| mac_of(index)).collect();
        }
        let per = plan.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let handles: Vec<_> = plan
                .chunks(per)
                .map(|chunk| {
                    let mac_of = &mac_of;
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|&(index, _)| mac_of(index))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut macs = Vec::with_capacity(plan.len());
            for h in handles {
                let part = h
                    .join()
                    .map_err(|_| Error::corrupt("internal: a commit worker thread panicked"))??;
                macs.extend(part);
            }
            Ok(macs)
        })
    }

    /// Computes the MACs of every dirty leaf that has none yet, while I/O goes on, so that the
    /// commit that comes next (with I/O stopped) only MACs the leaves changed since
    /// (FORMAT.md §13). Each leaf is hashed under its shard's lock, one at a time.
    pub(crate) fn premac_dirty(&self, keys: &Subkeys) {
        for shard in &self.shards {
            let todo: Vec<u64> = {
                let shard = shard.read().unwrap_or_else(|p| p.into_inner());
                shard
                    .iter()
                    .filter(|(_, l)| l.dirty && l.premac.is_none())
                    .map(|(&i, _)| i)
                    .collect()
            };
            for index in todo {
                let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
                if let Some(l) = shard.get_mut(&index).filter(|l| l.premac.is_none()) {
                    l.premac = Some(Premac {
                        epoch: keys.epoch(),
                        mac: node_mac(keys, TreeKind::Map, 0, index, &l.page[..]),
                        pmac: node_pmac(keys, TreeKind::Map, 0, index, &l.page[..]),
                    });
                }
            }
        }
    }

    /// Drops every clean cached leaf once more than `limit` are cached (after a commit,
    /// with the gate held exclusively, every leaf is clean). They reload on demand.
    pub(crate) fn trim(&self, limit: usize) {
        let cached: usize = self
            .shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum();
        if cached <= limit {
            return;
        }
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, l| l.dirty);
        }
    }

    /// Commit, last step: the leaves now live at their new blocks (born in snapshot epoch
    /// `birth`) and are clean.
    pub(crate) fn finish_commit(&self, moved: &[(u64, u64)], birth: u32) {
        for &(index, pbn) in moved {
            let mut shard = self.shard(index).write().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = shard.get_mut(&index) {
                l.pbn = pbn;
                l.birth = birth;
                l.dirty = false;
            }
        }
        self.dirty_leaves.store(0, Ordering::Relaxed);
    }
}

impl BlockMap {
    /// Copies the entries of leaf `leaf` into `out` (64 entries), from the cache or from
    /// disk without caching it: for walks of the whole map, which must not fill the cache.
    pub(crate) fn peek(
        &self,
        st: &dyn Storage,
        keys: &Subkeys,
        leaf: u64,
        out: &mut [LeafEntry],
    ) -> Result<()> {
        {
            let shard = self.shard(leaf).read().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = shard.get(&leaf) {
                for (i, e) in out.iter_mut().enumerate() {
                    *e = l.get(i);
                }
                return Ok(());
            }
        }
        let l = self.load(st, keys, leaf)?;
        for (i, e) in out.iter_mut().enumerate() {
            *e = l.get(i);
        }
        Ok(())
    }

    /// 0 if leaf `leaf` exists (cached or on disk); otherwise how many leaves from `leaf`
    /// on lie in an absent subtree (nothing to unmap there).
    pub(crate) fn absent_leaves(&self, st: &dyn Storage, keys: &Subkeys, leaf: u64) -> Result<u64> {
        {
            let shard = self.shard(leaf).read().unwrap_or_else(|p| p.into_inner());
            if shard.contains_key(&leaf) {
                return Ok(0);
            }
        }
        let mut t = self.interior.lock().unwrap_or_else(|p| p.into_inner());
        let (ptr, skip) = t.probe_leaf(st, keys, leaf)?;
        Ok(if ptr.pbn == 0 { skip } else { 0 })
    }
}
