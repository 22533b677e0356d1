//! The interior nodes of a tree (block map or space tree), loaded on demand and verified
//! against their parent's MAC, and relocated copy-on-write at commit (docs/FORMAT.md §6, §10).
//! Leaves are kept by the tree's owner ([`crate::map`], [`crate::alloc`]).

use std::collections::{BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::{
    decode_interior_entry, encode_interior_entry, node_mac, node_pmac, verify_node, NodePtr,
    TreeKind,
};
use crate::storage::Storage;
use crate::subkeys::Subkeys;

/// A 4096-byte page.
pub(crate) type Page = Box<[u8; BS]>;

/// A new zeroed page.
pub(crate) fn zero_page() -> Page {
    Box::new([0u8; BS])
}

/// Writes node pages, coalescing runs of consecutive blocks into writes of up to 1 MiB
/// through one reused buffer.
pub(crate) struct PageWriter<'a> {
    st: &'a dyn Storage,
    buf: Vec<u8>,
    start: u64,
    count: u64,
}

impl<'a> PageWriter<'a> {
    const MAX_RUN: u64 = 256;

    pub(crate) fn new(st: &'a dyn Storage) -> Self {
        PageWriter {
            st,
            buf: Vec::with_capacity(Self::MAX_RUN as usize * BS),
            start: 0,
            count: 0,
        }
    }

    /// Queues `page` for block `pbn`.
    pub(crate) fn push(&mut self, pbn: u64, page: &[u8]) -> Result<()> {
        if self.count > 0 && (pbn != self.start + self.count || self.count == Self::MAX_RUN) {
            self.flush()?;
        }
        if self.count == 0 {
            self.start = pbn;
        }
        self.buf.extend_from_slice(page);
        self.count += 1;
        Ok(())
    }

    /// Writes what is queued.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.count > 0 {
            self.st
                .write_all_at(&self.buf, self.start * BLOCK_SIZE)
                .map_err(|e| {
                    Error::io(
                        format!(
                            "cannot write {} tree nodes at block {}",
                            self.count, self.start
                        ),
                        e,
                    )
                })?;
        }
        self.buf.clear();
        self.count = 0;
        Ok(())
    }
}

#[derive(Debug)]
struct Interior {
    page: Page,
    pbn: u64,
    birth: u32,
}

/// The on-disk copy of a node that a commit replaces: the caller decides whether to free it
/// (a snapshot may still hold it, FORMAT.md §7.1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct OldNode {
    /// Where it is (0: the node is new).
    pub(crate) pbn: u64,
    /// The snapshot epoch it was written in.
    pub(crate) birth: u32,
    /// Its level (0 = leaf).
    pub(crate) level: u8,
    /// Its index within the level.
    pub(crate) index: u64,
}

/// Frees (or keeps) the old copy of a node and returns the block of the new one.
pub(crate) type Realloc<'a> = dyn FnMut(OldNode) -> Result<u64> + 'a;

/// The cached interior nodes of one tree.
#[derive(Debug)]
pub(crate) struct TreeCache {
    kind: TreeKind,
    height: u8,
    root: NodePtr,
    nodes: HashMap<(u8, u64), Interior>,
    /// Nodes given a new block in the current commit.
    moved: BTreeSet<(u8, u64)>,
}

impl TreeCache {
    /// A tree of `height` (>= 1) whose root is `root`.
    pub(crate) fn new(kind: TreeKind, height: u8, root: NodePtr) -> Self {
        TreeCache {
            kind,
            height,
            root,
            nodes: HashMap::new(),
            moved: BTreeSet::new(),
        }
    }

    /// The tree's height.
    pub(crate) fn height(&self) -> u8 {
        self.height
    }

    /// How many interior nodes are cached.
    pub(crate) fn cached_nodes(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// The current root pointer.
    pub(crate) fn root(&self) -> NodePtr {
        self.root
    }

    /// Reads and verifies node (`level`, `index`) at `ptr`.
    fn load(
        &self,
        st: &dyn Storage,
        keys: &Subkeys,
        level: u8,
        index: u64,
        ptr: &NodePtr,
    ) -> Result<Page> {
        let page = read_node(st, keys, self.kind, level, index, ptr)?;
        for i in 0..FANOUT as usize {
            decode_interior_entry(&page[..], i)?;
        }
        Ok(page)
    }

    /// Makes sure interior node (`level`, `index`) is cached, loading its ancestors first.
    fn ensure(&mut self, st: &dyn Storage, keys: &Subkeys, level: u8, index: u64) -> Result<()> {
        if self.nodes.contains_key(&(level, index)) {
            return Ok(());
        }
        let ptr = if level == self.height {
            if index != 0 {
                return Err(Error::corrupt(format!(
                    "no {:?} tree node {index} at the root level",
                    self.kind
                )));
            }
            self.root
        } else {
            self.ensure(st, keys, level + 1, index / FANOUT)?;
            self.entry(level + 1, index / FANOUT, (index % FANOUT) as usize)?
        };
        let page = if ptr.pbn == 0 {
            zero_page()
        } else {
            self.load(st, keys, level, index, &ptr)?
        };
        self.nodes.insert(
            (level, index),
            Interior {
                page,
                pbn: ptr.pbn,
                birth: ptr.birth,
            },
        );
        Ok(())
    }

    fn entry(&self, level: u8, index: u64, i: usize) -> Result<NodePtr> {
        let node = self
            .nodes
            .get(&(level, index))
            .ok_or_else(|| Error::corrupt("internal: a tree node is missing from the cache"))?;
        decode_interior_entry(&node.page[..], i)
    }

    /// The pointer to node (`level`, `index`) (the root at the top level), loading the path
    /// to it.
    pub(crate) fn node_ptr(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        level: u8,
        index: u64,
    ) -> Result<NodePtr> {
        if level >= self.height {
            return Ok(if level == self.height && index == 0 {
                self.root
            } else {
                NodePtr::default()
            });
        }
        self.ensure(st, keys, level + 1, index / FANOUT)?;
        self.entry(level + 1, index / FANOUT, (index % FANOUT) as usize)
    }

    /// The pointer to leaf `leaf` (level 0), loading the path to it.
    pub(crate) fn leaf_ptr(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        leaf: u64,
    ) -> Result<NodePtr> {
        self.ensure(st, keys, 1, leaf / FANOUT)?;
        self.entry(1, leaf / FANOUT, (leaf % FANOUT) as usize)
    }

    /// Whether the tree reaches leaf `leaf`: a map shorter than the disk (a snapshot taken
    /// before the disk grew, FORMAT.md §16) holds nothing past its height's span.
    pub(crate) fn reaches(&self, leaf: u64) -> bool {
        FANOUT
            .checked_pow(u32::from(self.height))
            .is_none_or(|n| leaf < n)
    }

    /// The pointer to leaf `leaf` without caching absent nodes, and the number of leaves from
    /// `leaf` to the end of the absent subtree it lies in (1 if the leaf's parent exists).
    pub(crate) fn probe_leaf(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        leaf: u64,
    ) -> Result<(NodePtr, u64)> {
        if !self.reaches(leaf) {
            // Absent up to any disk's end (2^30 leaves at most).
            return Ok((NodePtr::default(), (1u64 << 40).saturating_sub(leaf).max(1)));
        }
        let mut ptr = self.root;
        for level in (1..=self.height).rev() {
            // `index` of the node at `level` on the path to `leaf`.
            let span = FANOUT.pow(u32::from(level) - 1);
            let index = leaf / span / FANOUT;
            if ptr.pbn == 0 && !self.nodes.contains_key(&(level, index)) {
                let subtree = span * FANOUT;
                return Ok((NodePtr::default(), subtree - leaf % subtree));
            }
            self.ensure(st, keys, level, index)?;
            ptr = self.entry(level, index, ((leaf / span) % FANOUT) as usize)?;
        }
        Ok((ptr, 1))
    }

    /// Gives every not-yet-moved ancestor of `leaf` a new block for this commit. `realloc`
    /// disposes of the old copy and returns a new block. Returns whether anything moved.
    pub(crate) fn relocate_path(
        &mut self,
        st: &dyn Storage,
        keys: &Subkeys,
        leaf: u64,
        realloc: &mut Realloc<'_>,
    ) -> Result<bool> {
        let mut moved_any = false;
        let mut index = leaf;
        for level in 1..=self.height {
            index /= FANOUT;
            if self.moved.contains(&(level, index)) {
                break;
            }
            self.ensure(st, keys, level, index)?;
            let (pbn, birth) = self
                .nodes
                .get(&(level, index))
                .map_or((0, 0), |n| (n.pbn, n.birth));
            let new = realloc(OldNode {
                pbn,
                birth,
                level,
                index,
            })?;
            if let Some(node) = self.nodes.get_mut(&(level, index)) {
                node.pbn = new;
            }
            self.moved.insert((level, index));
            moved_any = true;
        }
        Ok(moved_any)
    }

    /// Stores the new pointers of the moved leaves, then MACs every moved interior node
    /// bottom-up, born in snapshot epoch `birth`. Returns the pages to write; the root
    /// pointer is updated.
    pub(crate) fn seal(
        &mut self,
        keys: &Subkeys,
        leaves: &[(u64, NodePtr)],
        birth: u32,
    ) -> Result<Vec<(u64, Page)>> {
        for (leaf, ptr) in leaves {
            self.set_entry(1, leaf / FANOUT, (leaf % FANOUT) as usize, ptr)?;
        }
        let mut out = Vec::new();
        let moved: Vec<(u8, u64)> = std::mem::take(&mut self.moved).into_iter().collect();
        // BTreeSet order: by level, then index, so children come before parents.
        for (level, index) in moved {
            let (pbn, page) = {
                let node = self
                    .nodes
                    .get_mut(&(level, index))
                    .ok_or_else(|| Error::corrupt("internal: a moved tree node is not cached"))?;
                node.birth = birth;
                (node.pbn, node.page.clone())
            };
            let pmac = if self.kind == TreeKind::Map {
                node_pmac(keys, self.kind, level, index, &page[..])
            } else {
                [0; 16]
            };
            let ptr = NodePtr {
                pbn,
                mac: node_mac(keys, self.kind, level, index, &page[..]),
                birth,
                pmac,
            };
            if level == self.height {
                self.root = ptr;
            } else {
                self.set_entry(level + 1, index / FANOUT, (index % FANOUT) as usize, &ptr)?;
            }
            out.push((pbn, page));
        }
        Ok(out)
    }

    fn set_entry(&mut self, level: u8, index: u64, i: usize, ptr: &NodePtr) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&(level, index))
            .ok_or_else(|| Error::corrupt("internal: a parent tree node is not cached"))?;
        encode_interior_entry(&mut node.page[..], i, ptr);
        Ok(())
    }
}

/// Reads node (`level`, `index`) of `tree` at `ptr` and checks its MAC.
pub(crate) fn read_node(
    st: &dyn Storage,
    keys: &Subkeys,
    tree: TreeKind,
    level: u8,
    index: u64,
    ptr: &NodePtr,
) -> Result<Page> {
    let mut page = zero_page();
    st.read_exact_at(&mut page[..], ptr.pbn * BLOCK_SIZE)
        .map_err(|e| {
            Error::io(
                format!(
                    "cannot read {tree:?} tree node {index} (level {level}) at block {}",
                    ptr.pbn
                ),
                e,
            )
        })?;
    if !verify_node(keys, tree, level, index, &page[..], &ptr.mac) {
        return Err(Error::integrity(format!(
            "{tree:?} tree node {index} (level {level}) at block {} fails its MAC: changed or replaced",
            ptr.pbn
        )));
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::storage::MemStorage;
    use crate::suite::CipherSuite;

    #[test]
    fn commit_then_reload_verifies_the_path() {
        let keys = Subkeys::derive(
            &VolumeKey::from_bytes([1; 32]),
            CipherSuite::default(),
            [0; 16],
        );
        let st = MemStorage::new();
        let mut t = TreeCache::new(TreeKind::Map, 2, NodePtr::default());
        let mut next = MIN_DATA_START_BLOCK;
        let mut realloc = |_old: OldNode| {
            next += 1;
            Ok(next)
        };
        let leaf = 64 * 3 + 5;
        assert!(t.relocate_path(&st, &keys, leaf, &mut realloc).unwrap());
        assert!(!t.relocate_path(&st, &keys, leaf + 1, &mut realloc).unwrap());
        let leaf_ptr = NodePtr {
            pbn: 9999,
            mac: [7; 32],
            ..NodePtr::default()
        };
        let pages = t.seal(&keys, &[(leaf, leaf_ptr)], 0).unwrap();
        assert_eq!(pages.len(), 2);
        for (pbn, page) in &pages {
            st.write_all_at(&page[..], pbn * BLOCK_SIZE).unwrap();
        }
        let mut fresh = TreeCache::new(TreeKind::Map, 2, t.root());
        assert_eq!(fresh.leaf_ptr(&st, &keys, leaf).unwrap(), leaf_ptr);
        assert_eq!(
            fresh.leaf_ptr(&st, &keys, leaf + 1).unwrap(),
            NodePtr::default()
        );
        // Tampering with the level-1 node is caught on load.
        let (pbn, _) = pages[0];
        st.write_all_at(&[1], pbn * BLOCK_SIZE + 3000).unwrap();
        let mut again = TreeCache::new(TreeKind::Map, 2, t.root());
        let err = again.leaf_ptr(&st, &keys, leaf).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Integrity);
    }
}
