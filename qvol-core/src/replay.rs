//! Log replay at open (docs/FORMAT.md §9): valid records of the superblock's epoch are
//! applied in order; records never covered by a sync are kept only if their data block
//! verifies (a power loss may have lost or torn it). In format version 3 records are bound to
//! the chosen superblock and the durable mark of blocks 11 and 12 counts too. In version 6
//! the epoch after it follows when the head of its area says that a commit from the chosen
//! superblock started it (a pipelined commit whose superblock never became durable, §10.1).

use crate::datablock::open_block;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::volume::Volume;
use crate::wal::{
    read_log, read_mark, read_marks, scan, Area, LogHead, LogOp, LogRecord, ScannedLog,
};

impl Volume {
    /// Replays the log over the committed tree; returns the number of records applied.
    pub(crate) fn replay(&self) -> Result<usize> {
        let st = &*self.storage;
        let keys_now = self.keys();
        let keys = &*keys_now;
        let (epoch, birth) = {
            let sb = self.superblock();
            (sb.log_epoch, sb.snap_epoch)
        };
        let regions = self.header.regions();
        let two = self.wal.two_areas();
        let log = read_log(st, regions)?;
        let segment = |epoch: u64, anchor: Option<[u8; 32]>| -> Result<ScannedLog> {
            let area = Area::of(regions.log_slots(), two, epoch);
            let mark = match &anchor {
                Some(a) => read_mark(st, keys, area, epoch, a)?,
                None => 0,
            };
            scan(area.bytes(&log), epoch, keys, anchor.as_ref(), mark)
        };
        let root_id = self.commit_point().root_id;
        let anchor = self.header.binds_log().then_some(root_id);
        let mut this = segment(epoch, anchor)?;
        let mut next = None;
        if two {
            let area = Area::of(regions.log_slots(), two, epoch + 1);
            let head = LogHead::read(st, keys, epoch + 1)?.filter(|h| h.parent == root_id);
            // A synced epoch after this one whose head is gone (or another's) was removed.
            let synced_elsewhere = read_marks(st, keys, area)?.iter().any(|m| {
                m.epoch == epoch + 1 && m.durable > 0 && head.is_none_or(|h| h.anchor != m.anchor)
            });
            if synced_elsewhere {
                return Err(Error::integrity(format!(
                    "log epoch {} was synced, but the head that names its superblock is \
                     missing or altered",
                    epoch + 1
                )));
            }
            if let Some(head) = head {
                if head.prev_len > Area::of(regions.log_slots(), two, epoch).slots {
                    return Err(Error::integrity(
                        "a log head covers more slots than its log area has",
                    ));
                }
                let after = segment(epoch + 1, Some(head.anchor))?;
                // The commit covered slots 0..prev_len of this epoch; they are all there,
                // or the next epoch was never synced (else: tampering).
                let covered = this
                    .records
                    .iter()
                    .filter(|r| r.seq < head.prev_len)
                    .count() as u64;
                if covered == head.prev_len {
                    this.records.retain(|r| r.seq < head.prev_len);
                    if after.durable > 0 {
                        // That sync came after every record of this epoch was written.
                        this.durable = this.durable.max(head.prev_len);
                    }
                    next = Some(after);
                } else if after.durable > 0 {
                    return Err(Error::integrity(format!(
                        "log epoch {epoch} lost records that a later synced epoch says were \
                         written"
                    )));
                }
            }
        }
        let mut applied = self.apply(&this.records, this.durable, birth)?;
        if let Some(after) = next {
            applied += self.apply(&after.records, after.durable, birth)?;
        }
        Ok(applied)
    }

    /// Applies `records` of one epoch, of which those from slot `durable` on were never
    /// synced; returns how many were applied. Each changes its leaf as the live write did
    /// and frees what it freed (`group::apply`).
    fn apply(&self, records: &[LogRecord], durable: u64, birth: u32) -> Result<usize> {
        let st = &*self.storage;
        let keys_now = self.keys();
        let keys = &*keys_now;
        let capacity = self.alloc.lock().capacity();
        let units = self.map.units();
        let mut applied = 0;
        for rec in records {
            let out_of_range = |what: String| {
                Err(Error::integrity(format!(
                    "log record {} {what}, out of range",
                    rec.seq
                )))
            };
            let mut op = rec.op;
            // The blocks the record claims.
            let claimed = match &mut op {
                LogOp::Map { lbn, entry } => {
                    entry.birth = birth;
                    if *lbn >= self.blocks() || entry.pbn >= capacity {
                        return out_of_range(format!(
                            "maps logical block {lbn} to physical block {}",
                            entry.pbn
                        ));
                    }
                    if rec.seq >= durable && !self.data_verifies(*lbn, entry) {
                        continue;
                    }
                    entry.pbn..entry.pbn + 1
                }
                LogOp::MapUnit { lbn, log2_n, entry } => {
                    entry.birth = birth;
                    let end = entry.pbn.saturating_add(u64::from(entry.k));
                    let group_end = lbn.saturating_add(1u64 << (*log2_n).min(16));
                    // FORMAT.md §18.2: a kind-3 record of another unit size is invalid.
                    if units != Some(*log2_n) || group_end > self.blocks() || end > capacity {
                        return out_of_range(format!(
                            "maps the unit of logical block {lbn} to physical block {}",
                            entry.pbn
                        ));
                    }
                    if rec.seq >= durable && !self.unit_verifies(*lbn, entry) {
                        continue;
                    }
                    entry.pbn..end
                }
                LogOp::Unmap { lbn, count } => {
                    if lbn
                        .checked_add(*count)
                        .is_none_or(|end| end > self.blocks())
                    {
                        return out_of_range("unmaps blocks past the end".into());
                    }
                    0..0
                }
            };
            let lbn = match op {
                LogOp::Map { lbn, .. } | LogOp::MapUnit { lbn, .. } | LogOp::Unmap { lbn, .. } => {
                    lbn
                }
            };
            let mut kills = Vec::new();
            self.map.with_leaf(st, keys, lbn / FANOUT, |leaf| {
                Ok(crate::group::apply(
                    leaf,
                    lbn / FANOUT,
                    &op,
                    units,
                    &mut kills,
                ))
            })?;
            {
                let mut a = self.alloc.lock();
                for pbn in claimed {
                    a.claim(st, keys, pbn)?;
                }
            }
            self.kill_blocks(&kills)?;
            applied += 1;
        }
        Ok(applied)
    }

    /// Whether the unit a kind-3 record points to is there and opens (FORMAT.md §18.2).
    fn unit_verifies(&self, lbn: u64, entry: &LeafEntry) -> bool {
        let mut block = zeroize::Zeroizing::new(vec![0u8; BS]);
        self.read_entry(lbn, entry, &mut block).is_ok()
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
