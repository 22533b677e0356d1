//! The commit protocol (docs/FORMAT.md §10): new nodes to free blocks, sync, the other
//! superblock, sync, then freed blocks become reusable and discarded ones are punched.

use crate::error::{Error, Result};
use crate::layout::*;
use crate::storage::Storage;
use crate::superblock::Superblock;
use crate::tree::PageWriter;
use crate::volume::{CommitPoint, Volume};

/// Map leaves kept cached across commits (64 Ki leaves = 256 MiB, mapping 16 GiB of data).
const MAX_CACHED_LEAVES: usize = 1 << 16;
/// Map leaves that may change before a commit (32 Ki leaves = 128 MiB held in memory, the
/// most a 4 MiB log could dirty): with a long log, scattered writes commit before it fills.
pub(crate) const MAX_DIRTY_LEAVES: u64 = 1 << 15;

impl Volume {
    /// Commits; the caller holds the gate exclusively. `force`: even with nothing to write.
    /// The commit hook (if any) is told the new commit point once it is durable, with the
    /// gate still held but no other lock.
    pub(crate) fn commit_locked(&self, force: bool) -> Result<()> {
        self.check_usable()?;
        let point = self.commit_inner(force).map_err(|e| self.fail(e))?;
        if let (Some(point), Some(hook)) = (point, &self.on_commit.0) {
            hook(&point);
        }
        Ok(())
    }

    /// Returns the new commit point, or `None` if there was nothing to commit.
    fn commit_inner(&self, force: bool) -> Result<Option<CommitPoint>> {
        let st: &dyn Storage = &*self.storage;
        let keys_now = self.keys();
        let keys = &*keys_now;
        if !force && self.wal.next() == 0 && !self.map.is_dirty() {
            return Ok(None);
        }
        let mut a = self.alloc.lock();
        let mut out = PageWriter::new(st);
        // Blocks the live map stopped using that a snapshot may hold (FORMAT.md §7.1).
        self.settle_kills(&mut a)?;
        let birth = self.snaps.epoch();
        let (map_root, moved) = self.map.prepare_commit(
            st,
            keys,
            &mut |old| self.realloc_map_node(&mut a, old),
            birth,
            &mut out,
        )?;
        let (snapshots, snap_epoch) = self.commit_table(&mut a, &mut out)?;
        let space_root = a.prepare_commit(st, keys, &mut out)?;
        out.flush()?;
        st.sync_data()
            .map_err(|e| Error::io("cannot sync the new map nodes during a commit", e))?;
        let mut sb = self.superblock();
        let generation = sb.generation + 1;
        // Version 3: a random id makes every commit's MAC unique, even when two sessions
        // commit the same content at the same generation (FORMAT.md §8).
        let mut commit_id = [0u8; 16];
        if self.header.binds_log() {
            crate::datablock::fill_random(&mut commit_id)?;
        }
        let slots = self.slot_area();
        if slots.staged_keyslots != 0 && a.high_water() > slots.staged_keyslots {
            return Err(Error::corrupt(
                "internal: a commit allocated over the staged keyslot area",
            ));
        }
        let next = Superblock {
            generation,
            log_epoch: generation,
            map_root,
            map_height: self.map.height(),
            space_height: a.height(),
            key_epoch: keys.epoch(),
            space_root,
            snapshots,
            snap_epoch,
            allocated_blocks: a.used(),
            high_water: a.high_water(),
            header_hash: slots.header_hash,
            commit_id,
            staged_keyslots: slots.staged_keyslots,
            staged_hash: slots.staged_hash,
            rekey: self.rekey.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        drop(slots);
        let offset = SUPERBLOCK_OFFSETS[(generation % 2) as usize];
        let encoded = next.encode(keys);
        let point = CommitPoint {
            generation,
            root_id: Superblock::mac_of(&encoded),
        };
        st.write_all_at(&encoded, offset).map_err(|e| {
            Error::io(
                format!("cannot write superblock generation {generation}"),
                e,
            )
        })?;
        st.sync_data()
            .map_err(|e| Error::io(format!("cannot sync superblock generation {generation}"), e))?;
        *sb = next;
        drop(sb);
        *self.point.lock().unwrap_or_else(|p| p.into_inner()) = point;
        self.map.finish_commit(&moved, birth);
        self.after_commit();
        self.map.trim(MAX_CACHED_LEAVES);
        let punch = a.finish_commit();
        drop(a);
        self.wal.reset(generation, point.root_id);
        punch_runs(st, &punch);
        Ok(Some(point))
    }
}

/// Punches freed blocks that held discarded data, in contiguous runs. Best effort: a
/// failure only means the host keeps the space (the blocks are reused all the same).
fn punch_runs(st: &dyn Storage, blocks: &[u64]) {
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[i] + (j - i) as u64 {
            j += 1;
        }
        let _ = st.punch_hole(blocks[i] * BLOCK_SIZE, (j - i) as u64 * BLOCK_SIZE);
        i = j;
    }
}
