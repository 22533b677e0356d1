//! Log replay at open (docs/FORMAT.md §9): valid records of the superblock's epoch are
//! applied in order; records never covered by a sync are kept only if their data block
//! verifies (a power loss may have lost or torn it). In format version 3 records are bound to
//! the chosen superblock and the durable mark of blocks 11 and 12 counts too.

use crate::datablock::open_block;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::snapshot::Kill;
use crate::volume::Volume;
use crate::wal::{read_log, read_mark, scan, LogOp};

impl Volume {
    /// Replays the log over the committed tree; returns the number of valid records found.
    pub(crate) fn replay(&self) -> Result<usize> {
        let st = &*self.storage;
        let keys_now = self.keys();
        let keys = &*keys_now;
        let (epoch, birth) = {
            let sb = self.superblock();
            (sb.log_epoch, sb.snap_epoch)
        };
        let regions = self.header.regions();
        let anchor = self.header.binds_log().then(|| self.commit_point().root_id);
        let mark = match &anchor {
            Some(a) => read_mark(st, keys, regions.log_slots(), epoch, a)?,
            None => 0,
        };
        let log = read_log(st, regions)?;
        let scanned = scan(&log, epoch, keys, anchor.as_ref(), mark)?;
        let capacity = self.alloc.lock().capacity();
        for rec in &scanned.records {
            match rec.op {
                LogOp::Map { lbn, mut entry } => {
                    entry.birth = birth;
                    if lbn >= self.blocks() || entry.pbn >= capacity {
                        return Err(Error::integrity(format!(
                            "log record {} maps logical block {lbn} to physical block {}, out of range",
                            rec.seq, entry.pbn
                        )));
                    }
                    if rec.seq >= scanned.durable && !self.data_verifies(lbn, &entry) {
                        continue;
                    }
                    let old = self.map.with_leaf(st, keys, lbn / FANOUT, |leaf| {
                        Ok(leaf.set((lbn % FANOUT) as usize, &entry))
                    })?;
                    self.alloc.lock().claim(st, keys, entry.pbn)?;
                    self.kill_blocks(&[Kill::of(&old, lbn, false)])?;
                }
                LogOp::Unmap { lbn, count } => {
                    if lbn.checked_add(count).is_none_or(|end| end > self.blocks()) {
                        return Err(Error::integrity(format!(
                            "log record {} unmaps blocks past the end",
                            rec.seq
                        )));
                    }
                    let olds = self.map.with_leaf(st, keys, lbn / FANOUT, |leaf| {
                        Ok((0..count)
                            .map(|k| {
                                let old =
                                    leaf.set(((lbn + k) % FANOUT) as usize, &LeafEntry::default());
                                Kill::of(&old, lbn + k, true)
                            })
                            .collect::<Vec<_>>())
                    })?;
                    self.kill_blocks(&olds)?;
                }
            }
        }
        Ok(scanned.records.len())
    }

    /// Whether the data block a record points to is there and opens.
    fn data_verifies(&self, lbn: u64, entry: &LeafEntry) -> bool {
        let mut block = vec![0u8; BS];
        self.storage
            .read_exact_at(&mut block, entry.pbn * BLOCK_SIZE)
            .is_ok()
            && open_block(&self.keys(), lbn, entry, &mut block).is_ok()
    }
}
