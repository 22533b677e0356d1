//! Growing and shrinking a volume (docs/FORMAT.md §16): the trees grow first (new roots
//! above the old ones, O(height)), then the header's size changes through the staged
//! header-area change of §3.1, so a crash leaves the old size or the new one.

use crate::alloc::{space_capacity, AllocState};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::node::TreeKind;
use crate::volume::Volume;

/// What a resize would do, judged without changing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResizePlan {
    /// The size now, in bytes.
    pub old_size: u64,
    /// The size asked for.
    pub new_size: u64,
    /// Bytes of data the live disk holds past the new end (dropped by a shrink).
    pub dropped_bytes: u64,
    /// Snapshots that hold data past the new end (a shrink is refused while they exist).
    pub snapshots_past_end: Vec<String>,
}

impl Volume {
    /// What resizing to `new_size` bytes would do.
    pub fn resize_plan(&self, new_size: u64) -> Result<ResizePlan> {
        self.check_usable()?;
        if new_size == 0 || new_size % BLOCK_SIZE != 0 || new_size > MAX_VOLUME_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a volume size must be a non-zero multiple of 4096 up to 256 TiB, not {new_size}"),
            ));
        }
        let old_size = self.size();
        let mut plan = ResizePlan {
            old_size,
            new_size,
            dropped_bytes: 0,
            snapshots_past_end: Vec::new(),
        };
        if new_size < old_size {
            plan.dropped_bytes = self
                .allocation(new_size, old_size - new_size, usize::MAX)?
                .iter()
                .filter(|e| e.allocated)
                .map(|e| e.len)
                .sum();
            let first = new_size / BLOCK_SIZE;
            for s in self.snapshots() {
                let view = crate::map::BlockMap::new(s.map_height, s.root, self.header.units());
                if self.map_has_data_from(&view, first, old_size / BLOCK_SIZE)? {
                    plan.snapshots_past_end.push(s.name);
                }
            }
        }
        Ok(plan)
    }

    /// Resizes the volume to `new_size` bytes: growing adds blocks that read as zeros and take
    /// no space; shrinking discards the tail first and is refused while a snapshot holds data
    /// there. Crash-safe: the old size or the new one, never anything else. Served volumes
    /// grow online (the caller then tells the guest).
    pub fn resize(&self, new_size: u64) -> Result<ResizePlan> {
        let plan = self.resize_plan(new_size)?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the volume is open read-only; it cannot be resized",
            ));
        }
        if !plan.snapshots_past_end.is_empty() {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "snapshot {} holds data past the new end; delete it first",
                    plan.snapshots_past_end.join(", ")
                ),
            ));
        }
        if new_size == plan.old_size {
            return Ok(plan);
        }
        if new_size < plan.old_size {
            self.discard(new_size, plan.old_size - new_size)?;
        }
        // The header and the hash of the area it is part of, read together: the change is
        // refused under the gate if anything changed the area since (a keyslot change, whose
        // slots must not be written back as they were read here, or another resize).
        let (mut header, expected) = {
            let s = self.slot_area();
            (s.header()?, s.area_hash())
        };
        if header.size != plan.old_size {
            return Err(Error::new(
                ErrorKind::Refused,
                "the volume was resized meanwhile; try again",
            ));
        }
        header.size = new_size;
        let blocks = new_size / BLOCK_SIZE;
        self.replace_header(&header, &expected, &mut || self.grow_trees(blocks))?;
        Ok(plan)
    }

    /// Gives the map and the space tree the heights `blocks` logical blocks need (gate held
    /// exclusively, right after a commit: nothing is dirty).
    fn grow_trees(&self, blocks: u64) -> Result<()> {
        let map_height = tree_height(blocks, FANOUT);
        let (root, height) = {
            let sb = self.superblock();
            (sb.map_root, sb.map_height)
        };
        if map_height > height {
            let root = self.wrap_map_root(root, height, map_height)?;
            self.map.reset(map_height, root);
        }
        let capacity = space_capacity(self.header.regions(), blocks);
        let space_height = AllocState::height_for(capacity);
        let mut a = self.alloc.lock();
        let (height, root) = (a.height(), a.root());
        // A shrink keeps every block allocated so far in range (open does the same with the
        // superblock's high-water mark), so that nothing logged after it is out of range.
        let capacity = capacity.max(a.high_water());
        if space_height > height {
            let root = self.wrap_root(&mut a, TreeKind::Space, root, height, space_height)?;
            a.resize(space_height, root, capacity);
        } else {
            a.resize(height, root, capacity);
        }
        Ok(())
    }

    /// Whether `map` holds data in logical blocks `from..to`.
    fn map_has_data_from(&self, map: &crate::map::BlockMap, from: u64, to: u64) -> Result<bool> {
        let st = &*self.storage;
        let mut lbn = from;
        let mut entries = [crate::node::LeafEntry::default(); FANOUT as usize];
        while lbn < to {
            let leaf = lbn / FANOUT;
            let skip = map.absent_leaves(st, &self.keys(), leaf)?;
            if skip > 0 {
                lbn = (leaf + skip) * FANOUT;
                continue;
            }
            let first = (lbn % FANOUT) as usize;
            let n = (FANOUT as usize - first).min((to - lbn) as usize);
            map.lookup(st, &self.keys(), lbn, &mut entries[..n])?;
            if entries[..n].iter().any(|e| e.pbn != 0) {
                return Ok(true);
            }
            lbn += n as u64;
        }
        Ok(false)
    }
}
