//! Compression on the volume (docs/FORMAT.md §18): the setting, writing whole groups as
//! compressed units, reading a block of a unit, and what the map says compression saves.
//! The codec and the rules for opening a unit are in `unit.rs`; what a change of a leaf
//! frees is in `group.rs`.

use std::sync::atomic::Ordering;

use crate::datablock::{open_block, random_nonces};
use crate::error::{Error, ErrorKind, Result};
use crate::group::{group_buffer, open_entry_unit};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::suite::MAX_NONCE_LEN;
use crate::unit::{pack, seal_unit, UnitPlace};
use crate::volume::{Volume, NO_COMPRESSION};
use crate::wal::LogOp;

/// What the live map says compression saves (a walk of the map; no data is read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompressionUsage {
    /// Logical blocks stored in compressed units.
    pub unit_lbns: u64,
    /// Physical blocks those units take.
    pub unit_blocks: u64,
    /// Logical blocks stored plain, one physical block each.
    pub plain_blocks: u64,
}

impl CompressionUsage {
    /// Logical data blocks per physical data block (1.0 with nothing compressed).
    pub fn ratio(&self) -> f64 {
        let physical = self.unit_blocks + self.plain_blocks;
        if physical == 0 {
            return 1.0;
        }
        (self.unit_lbns + self.plain_blocks) as f64 / physical as f64
    }
}

/// How one whole group of a write is stored.
pub(crate) enum GroupWrite {
    /// Compressed: the log record and the sealed blocks to write with it.
    Unit(LogOp, (u64, Vec<u8>)),
    /// All zeros: unmapped.
    Zeros(LogOp),
    /// Stored plain (it does not compress, or no run of free blocks is at hand).
    Plain,
}

impl Volume {
    /// The zstd level new whole-unit writes are compressed at; `None` when off.
    pub fn compress_level(&self) -> Option<i8> {
        match self.compress.load(Ordering::Relaxed) {
            NO_COMPRESSION => None,
            level => i8::try_from(level).ok(),
        }
    }

    /// Blocks in a compression unit (1 without units).
    pub(crate) fn unit_blocks(&self) -> u64 {
        1 << self.header.units().unwrap_or(0)
    }

    /// Sets the compression of new writes (`None`: off) and commits it. Units written
    /// before stay as they are and readable either way. `Unsupported` for a volume created
    /// without compression units (their size is fixed at create, FORMAT.md §18.2).
    pub fn set_compression(&self, level: Option<i8>) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the volume is open read-only",
            ));
        }
        if self.header.units().is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the volume was created without compression units (qvol create --compress); \
                 its compression cannot be turned on",
            ));
        }
        if let Some(level) = level {
            crate::info::check_level(level)?;
        }
        let _gate = self.exclusive();
        self.compress
            .store(level.map_or(NO_COMPRESSION, i32::from), Ordering::Relaxed);
        self.commit_locked(true)
    }

    /// Counts the live map's data blocks by how they are stored. A leaf at a time, each
    /// under the commit gate alone (commits go on between), read without filling the
    /// cache: a statistic of a disk that may change meanwhile.
    pub fn compression_usage(&self) -> Result<CompressionUsage> {
        self.check_usable()?;
        let st = &*self.storage;
        let mut usage = CompressionUsage::default();
        let leaves = self.blocks().div_ceil(FANOUT);
        let mut entries = [LeafEntry::default(); FANOUT as usize];
        let mut leaf = 0;
        while leaf < leaves {
            let _gate = self.shared();
            let keys = self.keys();
            let skip = self.map.absent_leaves(st, &keys, leaf)?;
            if skip > 0 {
                leaf += skip;
                continue;
            }
            let first = leaf * FANOUT;
            let n = FANOUT.min(self.blocks() - first) as usize;
            self.map.peek(st, &keys, leaf, &mut entries)?;
            let group = self.unit_blocks() as usize;
            let mut last_group = usize::MAX;
            for (i, e) in entries[..n].iter().enumerate().filter(|(_, e)| e.pbn != 0) {
                if e.k == 0 {
                    usage.plain_blocks += 1;
                    continue;
                }
                usage.unit_lbns += 1;
                // A group's referencing entries are one unit (FORMAT.md §18.2).
                if i / group != last_group {
                    usage.unit_blocks += u64::from(e.k);
                    last_group = i / group;
                }
            }
            leaf += 1;
        }
        Ok(usage)
    }

    /// `N` when new writes are compressed.
    pub(crate) fn compressing(&self) -> Option<u64> {
        let log2 = self.header.units()?;
        self.compress_level()?;
        Some(1 << log2)
    }

    /// The logical blocks a write of `first .. end` claims: with compression on, every
    /// group it touches whole (it may rewrite them), within the disk.
    pub(crate) fn groups_around(&self, first: u64, end: u64) -> std::ops::Range<u64> {
        match self.compressing() {
            Some(g) => first - first % g..end.div_ceil(g).saturating_mul(g).min(self.blocks()),
            None => first..end,
        }
    }

    /// The content of group `first`, whose map entries are `entries`, as it reads now (its
    /// claim held): plain blocks, the unit its entries reference (opened once) and holes,
    /// into a buffer wiped when dropped.
    pub(crate) fn read_group(
        &self,
        first: u64,
        entries: &[LeafEntry],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let log2_n = self.header.units().unwrap_or(0);
        let mut group = group_buffer(log2_n);
        let mut unit: Option<(u64, zeroize::Zeroizing<Vec<u8>>)> = None;
        for (i, e) in entries.iter().enumerate() {
            let block = &mut group[i * BS..(i + 1) * BS];
            if e.pbn == 0 {
                continue;
            }
            if e.k == 0 {
                self.read_entry(first + i as u64, e, block)?;
                continue;
            }
            if unit.as_ref().is_none_or(|(pbn, _)| *pbn != e.pbn) {
                unit = Some((e.pbn, self.open_unit_of(first, e)?));
            }
            if let Some((_, opened)) = &unit {
                block.copy_from_slice(&opened[i * BS..(i + 1) * BS]);
            }
        }
        Ok(group)
    }

    /// The groups whole inside `lbn .. lbn + n` a write compresses now: (first group's
    /// first block, number of groups); `None` when compression is off or none fits.
    pub(crate) fn whole_groups(&self, lbn: u64, n: u64) -> Option<(u64, u64)> {
        let size = self.compressing()?;
        let first = lbn.div_ceil(size) * size;
        // A group reaching past the disk's end is never compressed (§18.3 rule 5).
        let end = ((lbn + n).min(self.blocks()) / size) * size;
        (end > first).then(|| (first, (end - first) / size))
    }

    /// Compresses and seals one whole group (`data`, from logical block `lbn`), in the
    /// blocks it allocates.
    pub(crate) fn write_group(&self, lbn: u64, data: &[u8]) -> Result<GroupWrite> {
        let Some(log2_n) = self.header.units() else {
            return Ok(GroupWrite::Plain);
        };
        let Some(level) = self.compress_level() else {
            return Ok(GroupWrite::Plain);
        };
        if data.iter().all(|&b| b == 0) {
            let count = 1u64 << log2_n;
            return Ok(GroupWrite::Zeros(LogOp::Unmap { lbn, count }));
        }
        let Some(mut packed) = pack(data, i32::from(level))? else {
            return Ok(GroupWrite::Plain);
        };
        let keys = self.keys();
        let st = &*self.storage;
        let epoch = keys.epoch();
        let cipher = crate::datablock::data_key(&keys, epoch)?;
        let nonce = random_nonces(cipher.suite(), 1)?;
        // Nothing fails from here on but the allocation: the caller frees the blocks if
        // the record is never logged.
        let Some(pbn) = self
            .alloc
            .lock()
            .alloc_run(st, &keys, u64::from(packed.k))?
        else {
            return Ok(GroupWrite::Plain);
        };
        let place = UnitPlace {
            volume_id: keys.volume_id(),
            first_lbn: lbn,
            epoch,
            log2_n,
        };
        let tag = seal_unit(cipher, &place, &nonce, &mut packed);
        let mut padded = [0u8; MAX_NONCE_LEN];
        padded[..nonce.len()].copy_from_slice(&nonce);
        let entry = LeafEntry {
            pbn,
            key_epoch: epoch,
            k: packed.k,
            nonce: padded,
            tag,
            birth: self.snaps.epoch(),
        };
        // Sealed: the bytes are ciphertext now, nothing to wipe.
        let sealed = std::mem::take(&mut *packed.bytes);
        Ok(GroupWrite::Unit(
            LogOp::MapUnit { lbn, log2_n, entry },
            (pbn, sealed),
        ))
    }

    /// Reads and opens logical block `lbn`, which `e` maps (plain or in a unit), into `buf`
    /// (one block).
    pub(crate) fn read_entry(&self, lbn: u64, e: &LeafEntry, buf: &mut [u8]) -> Result<()> {
        let keys = self.keys();
        if e.k == 0 {
            self.read_blocks(e.pbn, buf)?;
            return open_block(&keys, lbn, e, buf);
        }
        let group = self.open_unit_of(lbn, e).inspect_err(|_| buf.fill(0))?;
        let at = (lbn % self.unit_blocks()) as usize * BS;
        buf.copy_from_slice(&group[at..at + BS]);
        Ok(())
    }

    /// Reads and opens the unit `e` (an entry of logical block `lbn`'s group) references:
    /// the group's `N` blocks as the unit holds them, wiped when dropped.
    fn open_unit_of(&self, lbn: u64, e: &LeafEntry) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let log2_n = self.header.units().unwrap_or(0);
        let mut sealed = zeroize::Zeroizing::new(vec![0u8; usize::from(e.k) * BS]);
        let mut group = group_buffer(log2_n);
        self.read_blocks(e.pbn, &mut sealed)?;
        open_entry_unit(&self.keys(), log2_n, lbn, e, &mut sealed, &mut group)?;
        Ok(group)
    }
}
