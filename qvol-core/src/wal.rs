//! The write-ahead log (docs/FORMAT.md §9): 128-byte MAC'd records of map updates, written
//! before a write is acknowledged, replayed at open; and (format version 3) the durable mark
//! written to blocks 11 and 12 after every flush.
//!
//! An *anchor* is the MAC of the superblock a log epoch extends: `None` for versions 1 and 2
//! (records are not bound to it, there is no mark), `Some` for version 3.
//!
//! From format version 6 on the log region has two areas, log epoch `e` writing area `e % 2`
//! (FORMAT.md §9.1): a commit starts the next epoch in the other area and writers go on
//! while its nodes and superblock are synced. The head of an area names the superblock its
//! epoch extends before that superblock is durable.

use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::storage::gather::Gather;
use crate::storage::Storage;
use crate::subkeys::Subkeys;

const KIND_MAP: u8 = 1;
const KIND_UNMAP: u8 = 2;
const KIND_MAP_UNIT: u8 = 3;
const OFF_MAC: usize = 96;

/// What a record does to the block map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// Logical block `lbn` now has `entry` (kind 1).
    Map {
        /// Logical block.
        lbn: u64,
        /// Its new leaf entry (pbn != 0).
        entry: LeafEntry,
    },
    /// Logical blocks `lbn .. lbn + count` are unallocated (kind 2; within one leaf).
    Unmap {
        /// First logical block.
        lbn: u64,
        /// Number of blocks, 1..=64.
        count: u64,
    },
    /// Every block of the group from `lbn` now references the compressed unit `entry`
    /// (kind 3, format version 7; FORMAT.md §18.2).
    MapUnit {
        /// The group's first logical block (a multiple of `N`).
        lbn: u64,
        /// `log2 N`.
        log2_n: u8,
        /// The unit: its first block, key epoch, `k` (1..N), nonce and tag.
        entry: LeafEntry,
    },
}

/// A decoded log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// The log epoch (the generation of the superblock it extends).
    pub epoch: u64,
    /// Sequence number = slot index.
    pub seq: u64,
    /// Every slot below this was synced when the record was written.
    pub durable: u64,
    /// The map update.
    pub op: LogOp,
}

impl LogRecord {
    /// Encodes and MACs the record (bound to `anchor` in format version 3).
    pub(crate) fn encode(&self, keys: &Subkeys, anchor: Option<&[u8; 32]>, out: &mut [u8]) {
        let b = &mut out[..LOG_RECORD_LEN];
        b.fill(0);
        put_u64(b, 8, self.epoch);
        put_u64(b, 16, self.seq);
        put_u64(b, 24, self.durable);
        match self.op {
            LogOp::Map { lbn, entry } => {
                b[0] = KIND_MAP;
                put_u32(b, 4, entry.key_epoch);
                put_u64(b, 32, lbn);
                put_u64(b, 40, entry.pbn);
                b[48..80].copy_from_slice(&entry.nonce);
                b[80..96].copy_from_slice(&entry.tag);
            }
            LogOp::Unmap { lbn, count } => {
                b[0] = KIND_UNMAP;
                put_u64(b, 32, lbn);
                put_u64(b, 40, count);
            }
            LogOp::MapUnit { lbn, log2_n, entry } => {
                b[0] = KIND_MAP_UNIT;
                b[1] = entry.k;
                b[2] = log2_n;
                put_u32(b, 4, entry.key_epoch);
                put_u64(b, 32, lbn);
                put_u64(b, 40, entry.pbn);
                b[48..80].copy_from_slice(&entry.nonce);
                b[80..96].copy_from_slice(&entry.tag);
            }
        }
        let mac = mac(keys, anchor, &b[..OFF_MAC]);
        b[OFF_MAC..].copy_from_slice(&mac);
    }

    /// Parses a record's fields without checking its MAC (for fuzzing and diagnostics).
    pub fn decode(b: &[u8]) -> Result<LogRecord> {
        if b.len() < LOG_RECORD_LEN {
            return Err(Error::corrupt("a log record is 128 bytes"));
        }
        // Bytes 1..4 are reserved but in kind 3; so are bits 24..31 of the key epoch.
        if (b[0] != KIND_MAP_UNIT && b[1..3] != [0, 0]) || b[3] != 0 || b[7] != 0 {
            return Err(Error::corrupt(
                "the log record's reserved bytes are not zero",
            ));
        }
        let lbn = get_u64(b, 32);
        let op = match b[0] {
            KIND_MAP_UNIT => {
                let (k, log2_n) = (b[1], b[2]);
                let n = 1u64 << log2_n.min(16);
                let entry = LeafEntry {
                    pbn: get_u64(b, 40),
                    key_epoch: get_u32(b, 4),
                    k,
                    nonce: get_array(b, 48),
                    tag: get_array(b, 80),
                    birth: 0,
                };
                let valid = crate::unit::LOG2_N_RANGE.contains(&log2_n)
                    && (1..n).contains(&u64::from(k))
                    && lbn % n == 0
                    && entry.pbn >= MIN_DATA_START_BLOCK
                    && entry
                        .pbn
                        .checked_add(u64::from(k))
                        .is_some_and(|end| end <= MAX_PBN);
                if !valid {
                    return Err(Error::corrupt("a unit log record has invalid fields"));
                }
                LogOp::MapUnit { lbn, log2_n, entry }
            }
            KIND_MAP => {
                let entry = LeafEntry {
                    pbn: get_u64(b, 40),
                    key_epoch: get_u32(b, 4),
                    k: 0,
                    nonce: get_array(b, 48),
                    tag: get_array(b, 80),
                    // Set by replay: the snapshot epoch of the superblock the record extends.
                    birth: 0,
                };
                if !(MIN_DATA_START_BLOCK..MAX_PBN).contains(&entry.pbn) {
                    return Err(Error::corrupt(
                        "a log record maps a block outside the data region",
                    ));
                }
                LogOp::Map { lbn, entry }
            }
            KIND_UNMAP => {
                let count = get_u64(b, 40);
                let in_one_leaf = count >= 1 && count <= FANOUT - lbn % FANOUT;
                if !in_one_leaf || b[4..8] != [0; 4] || b[48..96].iter().any(|&x| x != 0) {
                    return Err(Error::corrupt("an unmap log record has an invalid range"));
                }
                LogOp::Unmap { lbn, count }
            }
            kind => return Err(Error::corrupt(format!("unknown log record kind {kind}"))),
        };
        let rec = LogRecord {
            epoch: get_u64(b, 8),
            seq: get_u64(b, 16),
            durable: get_u64(b, 24),
            op,
        };
        if rec.durable > rec.seq || rec.seq >= MAX_LOG_SLOTS {
            return Err(Error::corrupt(
                "a log record has an invalid sequence number",
            ));
        }
        Ok(rec)
    }

    /// Parses and verifies a record; `None` for anything that is not a valid record.
    pub(crate) fn decode_verified(
        b: &[u8],
        keys: &Subkeys,
        anchor: Option<&[u8; 32]>,
    ) -> Option<LogRecord> {
        let expected = blake3::Hash::from(mac(keys, anchor, &b[..OFF_MAC]));
        if expected != blake3::Hash::from(get_array::<32>(b, OFF_MAC)) {
            return None;
        }
        LogRecord::decode(b).ok()
    }
}

fn mac(keys: &Subkeys, anchor: Option<&[u8; 32]>, body: &[u8]) -> [u8; 32] {
    let mut h = keys.log_mac();
    match anchor {
        None => {
            h.update(b"qvol-log-v1");
            h.update(keys.volume_id());
        }
        Some(sb_mac) => {
            h.update(b"qvol-log-v3");
            h.update(keys.volume_id());
            h.update(sb_mac);
        }
    }
    h.update(body);
    *h.finalize().as_bytes()
}

/// `"QVOLMRK3"`.
const MARK_MAGIC: [u8; 8] = *b"QVOLMRK3";
/// Bytes of a durable mark that carry meaning, then zeros up to [`MARK_LEN`].
const MARK_BODY: usize = 64;
/// Bytes written for one copy of the mark (one sector).
pub(crate) const MARK_LEN: usize = 512;

/// The durable mark of format version 3 (FORMAT.md §9): every slot below `durable` of log
/// epoch `epoch`, which extends the superblock whose MAC is `anchor`, was synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DurableMark {
    pub(crate) epoch: u64,
    pub(crate) durable: u64,
    pub(crate) anchor: [u8; 32],
}

impl DurableMark {
    pub(crate) fn encode(&self, keys: &Subkeys) -> [u8; MARK_LEN] {
        let mut b = [0u8; MARK_LEN];
        put_u64(&mut b, 8, self.epoch);
        put_u64(&mut b, 16, self.durable);
        b[32..64].copy_from_slice(&self.anchor);
        seal_sector(keys, &MARK_KIND, b)
    }

    /// Parses and verifies a mark; `None` for anything that is not a valid mark.
    pub(crate) fn decode_verified(b: &[u8], keys: &Subkeys) -> Option<DurableMark> {
        let b = open_sector(keys, &MARK_KIND, b)?;
        Some(DurableMark {
            epoch: get_u64(b, 8),
            durable: get_u64(b, 16),
            anchor: get_array(b, 32),
        })
    }
}

/// A kind of MAC'd sector of the log's own (durable marks, log heads): its magic, the label
/// of its MAC, and how many bytes the MAC covers (it follows them).
struct SectorKind {
    magic: [u8; 8],
    label: &'static [u8],
    body: usize,
}

const MARK_KIND: SectorKind = SectorKind {
    magic: MARK_MAGIC,
    label: b"qvol-mark-v3",
    body: MARK_BODY,
};

/// Writes the magic and the MAC into `b`, whose fields (offsets 8..body, bytes 24..32
/// reserved) are filled: `BLAKE3-keyed(K_log, label || volume id || bytes 0..body)`.
fn seal_sector(keys: &Subkeys, kind: &SectorKind, mut b: [u8; MARK_LEN]) -> [u8; MARK_LEN] {
    b[..8].copy_from_slice(&kind.magic);
    let mac = sector_mac(keys, kind, &b[..kind.body]);
    b[kind.body..kind.body + 32].copy_from_slice(&mac);
    b
}

/// `b`'s first bytes if they are a valid sector of `kind`: magic, MAC, reserved bytes 24..32
/// and everything after the MAC zero.
fn open_sector<'a>(keys: &Subkeys, kind: &SectorKind, b: &'a [u8]) -> Option<&'a [u8]> {
    if b.len() < MARK_LEN || b[..8] != kind.magic {
        return None;
    }
    let expected = blake3::Hash::from(sector_mac(keys, kind, &b[..kind.body]));
    if expected != blake3::Hash::from(get_array::<32>(b, kind.body)) {
        return None;
    }
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|&x| x == 0);
    (zeros(24..32) && zeros(kind.body + 32..MARK_LEN)).then_some(&b[..kind.body])
}

fn sector_mac(keys: &Subkeys, kind: &SectorKind, body: &[u8]) -> [u8; 32] {
    let mut h = keys.log_mac();
    h.update(kind.label);
    h.update(keys.volume_id());
    h.update(body);
    *h.finalize().as_bytes()
}

/// Where one log epoch's records go (FORMAT.md §9.1): the whole region before version 6;
/// from version 6 on, area `epoch % 2`, half the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Area {
    /// 0 or 1 (always 0 with one area).
    pub(crate) index: usize,
    /// The first slot of the region in the area.
    first: u64,
    /// Slots in the area.
    pub(crate) slots: u64,
}

impl Area {
    /// The area of log epoch `epoch` in a region of `total` slots (`two`: version 6).
    pub(crate) fn of(total: u64, two: bool, epoch: u64) -> Area {
        if two {
            let half = total / 2;
            let index = (epoch % 2) as usize;
            Area {
                index,
                first: index as u64 * half,
                slots: half,
            }
        } else {
            Area {
                index: 0,
                first: 0,
                slots: total,
            }
        }
    }

    /// Byte offset of slot `slot` of the area.
    fn slot_offset(&self, slot: u64) -> u64 {
        LOG_OFFSET + (self.first + slot) * LOG_RECORD_LEN as u64
    }

    /// Byte offset of copy `copy` of the area's durable mark: sector `index` of block 11 or 12.
    fn mark_offset(&self, copy: usize) -> u64 {
        MARK_OFFSETS[copy] + (self.index * MARK_LEN) as u64
    }

    /// The area's bytes in the whole log region `log`.
    pub(crate) fn bytes<'a>(&self, log: &'a [u8]) -> &'a [u8] {
        let start = self.first as usize * LOG_RECORD_LEN;
        &log[start..start + self.slots as usize * LOG_RECORD_LEN]
    }
}

/// The valid durable marks of `area` (both copies; any epoch and anchor).
pub(crate) fn read_marks(
    storage: &dyn Storage,
    keys: &Subkeys,
    area: Area,
) -> Result<Vec<DurableMark>> {
    let mut marks = Vec::new();
    for copy in 0..2 {
        let mut b = [0u8; MARK_LEN];
        storage
            .read_exact_at(&mut b, area.mark_offset(copy))
            .map_err(|e| Error::io("cannot read the durable mark", e))?;
        marks.extend(DurableMark::decode_verified(&b, keys));
    }
    Ok(marks)
}

/// The highest D of the valid marks of `epoch` extending `anchor` in `area` (0 if none). A
/// valid mark with D beyond the area is `Integrity` (only a holder of the key writes one).
pub(crate) fn read_mark(
    storage: &dyn Storage,
    keys: &Subkeys,
    area: Area,
    epoch: u64,
    anchor: &[u8; 32],
) -> Result<u64> {
    let mut durable = 0;
    for m in read_marks(storage, keys, area)? {
        if m.epoch == epoch && m.anchor == *anchor {
            if m.durable > area.slots {
                return Err(Error::integrity(format!(
                    "the durable mark covers {} log slots, the log area has {}",
                    m.durable, area.slots
                )));
            }
            durable = durable.max(m.durable);
        }
    }
    Ok(durable)
}

/// `"QVOLLOG6"`.
const HEAD_MAGIC: [u8; 8] = *b"QVOLLOG6";
/// Bytes of a log head that carry meaning (the MAC follows), then zeros up to [`MARK_LEN`].
const HEAD_BODY: usize = 96;

/// The head of a log area (format version 6, FORMAT.md §9.1): log epoch `epoch` extends the
/// superblock whose MAC is `anchor`, built by a commit from the superblock whose MAC is
/// `parent` and the first `prev_len` slots of the epoch before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogHead {
    pub(crate) epoch: u64,
    pub(crate) prev_len: u64,
    pub(crate) parent: [u8; 32],
    pub(crate) anchor: [u8; 32],
}

impl LogHead {
    pub(crate) fn encode(&self, keys: &Subkeys) -> [u8; MARK_LEN] {
        let mut b = [0u8; MARK_LEN];
        put_u64(&mut b, 8, self.epoch);
        put_u64(&mut b, 16, self.prev_len);
        b[32..64].copy_from_slice(&self.parent);
        b[64..96].copy_from_slice(&self.anchor);
        seal_sector(keys, &HEAD_KIND, b)
    }

    /// Parses and verifies a head; `None` for anything that is not a valid head.
    pub(crate) fn decode_verified(b: &[u8], keys: &Subkeys) -> Option<LogHead> {
        let b = open_sector(keys, &HEAD_KIND, b)?;
        Some(LogHead {
            epoch: get_u64(b, 8),
            prev_len: get_u64(b, 16),
            parent: get_array(b, 32),
            anchor: get_array(b, 64),
        })
    }

    /// Writes the head of area `epoch % 2` (not synced: FORMAT.md §10.1 says why that is
    /// enough).
    pub(crate) fn write(&self, storage: &dyn Storage, keys: &Subkeys) -> Result<()> {
        storage
            .write_all_at(
                &self.encode(keys),
                LOG_HEAD_OFFSETS[(self.epoch % 2) as usize],
            )
            .map_err(|e| {
                Error::io(
                    format!("cannot write the head of log epoch {}", self.epoch),
                    e,
                )
            })
    }

    /// The valid head of area `epoch % 2` if it is that of `epoch`, else `None`.
    pub(crate) fn read(
        storage: &dyn Storage,
        keys: &Subkeys,
        epoch: u64,
    ) -> Result<Option<LogHead>> {
        let mut b = [0u8; MARK_LEN];
        storage
            .read_exact_at(&mut b, LOG_HEAD_OFFSETS[(epoch % 2) as usize])
            .map_err(|e| Error::io("cannot read the head of a log area", e))?;
        Ok(LogHead::decode_verified(&b, keys).filter(|h| h.epoch == epoch))
    }
}

const HEAD_KIND: SectorKind = SectorKind {
    magic: HEAD_MAGIC,
    label: b"qvol-loghead-v6",
    body: HEAD_BODY,
};

/// The valid records of one epoch and the durable mark, after the tamper check of §9.
#[derive(Debug)]
pub(crate) struct ScannedLog {
    pub(crate) records: Vec<LogRecord>,
    pub(crate) durable: u64,
}

/// Scans the whole log region (`log`, all its slots) for `epoch` (records bound to `anchor` in
/// version 3). `mark`: the D of the durable mark (0 if none). Fails with `Integrity` if a slot
/// below the durable mark is invalid (a synced record was removed or altered).
pub(crate) fn scan(
    log: &[u8],
    epoch: u64,
    keys: &Subkeys,
    anchor: Option<&[u8; 32]>,
    mark: u64,
) -> Result<ScannedLog> {
    let mut records = Vec::new();
    let mut valid = vec![false; log.len() / LOG_RECORD_LEN];
    if mark > valid.len() as u64 {
        return Err(Error::integrity(
            "the durable mark covers more slots than the log has",
        ));
    }
    let mut durable = mark;
    for (slot, chunk) in log.chunks_exact(LOG_RECORD_LEN).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        if let Some(rec) = LogRecord::decode_verified(chunk, keys, anchor) {
            if rec.epoch == epoch && rec.seq == slot as u64 {
                valid[slot] = true;
                durable = durable.max(rec.durable);
                records.push(rec);
            }
        }
    }
    if let Some(hole) = valid[..durable as usize].iter().position(|v| !v) {
        return Err(Error::integrity(format!(
            "log slot {hole} is missing or altered although a later record says it was synced"
        )));
    }
    Ok(ScannedLog { records, durable })
}

/// Reads the whole log region of an image with `regions`.
pub(crate) fn read_log(storage: &dyn Storage, regions: Regions) -> Result<Vec<u8>> {
    let mut log = vec![0u8; regions.log_len as usize];
    storage
        .read_exact_at(&mut log, LOG_OFFSET)
        .map_err(|e| Error::io("cannot read the write-ahead log", e))?;
    Ok(log)
}

/// Log slots taken for an operation's records and not written yet ([`Wal::take`]).
#[must_use = "taken slots must be written"]
#[derive(Debug)]
pub(crate) struct Slots {
    epoch: u64,
    first: u64,
    n: u64,
    durable: u64,
    anchor: Option<[u8; 32]>,
    area: Area,
}

/// The log's tail, reservations and durable mark.
#[derive(Debug)]
pub(crate) struct Wal {
    state: Mutex<WalState>,
    /// Slots in the log region (both areas).
    total: u64,
    /// The copy the next durable mark goes to and the last D written (version 3); taken
    /// around the mark's `pwrite` so that marks reach the file in the order of their D.
    mark: Mutex<MarkState>,
}

#[derive(Debug, Default)]
struct MarkState {
    copy: [usize; 2],
    /// The previous epoch whose mark (covering all its slots) was written after a sync of
    /// this epoch (format version 6, a commit in flight).
    prev_done: Option<u64>,
    /// (epoch, D) of the last mark written: an unchanged mark is not written again.
    last: Option<(u64, u64)>,
}

#[derive(Debug)]
struct WalState {
    /// The MAC of the superblock this epoch extends (version 3), `None` in versions 1 and 2.
    anchor: Option<[u8; 32]>,
    epoch: u64,
    /// Where this epoch's records go.
    area: Area,
    /// Whether the log has two areas (format version 6).
    two: bool,
    /// Whether someone took this epoch's turn to prepare the commit ahead of it.
    prepared: bool,
    next: u64,
    reserved: u64,
    durable: u64,
    /// First slots of appends whose slots are assigned but whose `pwrite` has not returned.
    writing: Vec<u64>,
    /// The epoch before, its anchor, area and length, while the pipelined commit that
    /// covers it may not be durable yet.
    prev: Option<(u64, [u8; 32], Area, u64)>,
}

impl Wal {
    /// An empty log of `total` slots and `epoch` whose next record goes to slot `next` of its
    /// area; `anchor`: the MAC of the superblock it extends (format version 3), or `None`;
    /// `two`: two log areas (format version 6).
    pub(crate) fn new(
        total: u64,
        epoch: u64,
        next: u64,
        anchor: Option<[u8; 32]>,
        two: bool,
    ) -> Self {
        Wal {
            total,
            mark: Mutex::new(MarkState::default()),
            state: Mutex::new(WalState {
                anchor,
                epoch,
                area: Area::of(total, two, epoch),
                two,
                prepared: false,
                next,
                reserved: 0,
                durable: 0,
                writing: Vec::new(),
                prev: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves room for `n` records; false if the log is too full (commit first).
    pub(crate) fn try_reserve(&self, n: u64) -> bool {
        let mut s = self.lock();
        if s.next + s.reserved + n > s.area.slots {
            return false;
        }
        s.reserved += n;
        true
    }

    /// True once per epoch, to the first caller after 7/8 of its area is taken: time to
    /// prepare what the commit that comes when it is full can do ahead of it.
    pub(crate) fn take_prepare_turn(&self) -> bool {
        let mut s = self.lock();
        if s.prepared || (s.next + s.reserved) * 8 < s.area.slots * 7 {
            return false;
        }
        s.prepared = true;
        true
    }

    /// Gives back `n` reserved records that were not used.
    pub(crate) fn release(&self, n: u64) {
        let mut s = self.lock();
        s.reserved = s.reserved.saturating_sub(n);
    }

    /// Appends `ops` (taken from an earlier reservation) and writes them to the log region:
    /// [`Wal::take`] then [`Wal::write`].
    #[cfg(test)]
    pub(crate) fn append(
        &self,
        storage: &dyn Storage,
        keys: &Subkeys,
        ops: &[LogOp],
    ) -> Result<()> {
        let slots = self.take(ops.len() as u64)?;
        self.write(storage, keys, &Gather::default(), slots, ops, Vec::new())
    }

    /// Takes the next `n` slots (from an earlier reservation). Call with the claim on the
    /// logical blocks the records name held (`claim.rs`), so that records of one block take
    /// slots in the order of its map updates (replay applies them in slot order); then
    /// [`Wal::write`] them before the operation returns. Until then a sync covers none of
    /// the slots from these on ([`Wal::written`]), and never if that write fails.
    pub(crate) fn take(&self, n: u64) -> Result<Slots> {
        let mut s = self.lock();
        if s.next + n > s.area.slots {
            return Err(Error::new(
                crate::error::ErrorKind::NoSpace,
                "the write-ahead log is full (a reservation was not honoured)",
            ));
        }
        let first = s.next;
        s.next += n;
        s.reserved = s.reserved.saturating_sub(n);
        if n > 0 {
            s.writing.push(first);
        }
        Ok(Slots {
            epoch: s.epoch,
            first,
            n,
            durable: s.durable,
            anchor: s.anchor,
            area: s.area,
        })
    }

    /// Writes `ops` (as many as were taken) into `slots`, and `data` with them: the sealed
    /// blocks the records name, as `(offset, bytes)`. The records are MACed and written
    /// outside every lock, so that appends of different operations overlap. Where each write
    /// is a round trip (`Storage::round_trips`) the records and the data are in flight
    /// together, gathered with other writers' through `gather`; elsewhere the data goes
    /// first. Either way a slot counts as written ([`Wal::written`]) only once both its
    /// record and the data are: a sync never covers a record whose data was not written
    /// before it started (FORMAT.md §9).
    pub(crate) fn write(
        &self,
        storage: &dyn Storage,
        keys: &Subkeys,
        gather: &Gather,
        slots: Slots,
        ops: &[LogOp],
        data: Vec<(u64, Vec<u8>)>,
    ) -> Result<()> {
        if slots.n == 0 && data.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; ops.len() * LOG_RECORD_LEN];
        for (i, op) in ops.iter().enumerate() {
            let rec = LogRecord {
                epoch: slots.epoch,
                seq: slots.first + i as u64,
                durable: slots.durable,
                op: *op,
            };
            rec.encode(keys, slots.anchor.as_ref(), &mut buf[i * LOG_RECORD_LEN..]);
        }
        let offset = slots.area.slot_offset(slots.first);
        let written = if ops.len() as u64 != slots.n {
            Err(std::io::Error::other(
                "internal: records do not fill their slots",
            ))
        } else if storage.round_trips() {
            let mut all = data;
            if slots.n > 0 {
                all.push((offset, buf));
            }
            gather.write_all(storage, all)
        } else {
            data.iter()
                .try_for_each(|(at, bytes)| storage.write_all_at(bytes, *at))
                .and_then(|()| match slots.n {
                    0 => Ok(()),
                    _ => storage.write_all_at(&buf, offset),
                })
        };
        // A failed write stays unwritten for good: no sync may vouch for its slots (the
        // volume refuses further work anyway).
        if slots.n > 0 && written.is_ok() {
            let mut s = self.lock();
            if let Some(k) = s.writing.iter().position(|&w| w == slots.first) {
                s.writing.swap_remove(k);
            }
        }
        written.map_err(|e| {
            Error::io(
                format!(
                    "cannot write {} records to the write-ahead log with the data they name",
                    slots.n
                ),
                e,
            )
        })
    }

    /// Every slot below this is written (its `pwrite` returned): what a sync makes durable.
    pub(crate) fn written(&self) -> u64 {
        let s = self.lock();
        s.writing.iter().copied().min().unwrap_or(s.next)
    }

    /// The slot the next record goes to.
    pub(crate) fn next(&self) -> u64 {
        self.lock().next
    }

    /// Whether the log has two areas (format version 6): commits can be pipelined.
    pub(crate) fn two_areas(&self) -> bool {
        self.lock().two
    }

    /// The area of the current epoch.
    #[cfg(test)]
    pub(crate) fn area(&self) -> Area {
        self.lock().area
    }

    /// Records that every slot below `upto` is durable (after a completed sync).
    pub(crate) fn set_durable(&self, upto: u64) {
        let mut s = self.lock();
        s.durable = s.durable.max(upto.min(s.next));
    }

    /// Writes the durable mark (format version 3; nothing in versions 1 and 2) after a
    /// completed sync raised it: the two copies in turn, never a lower D after a higher one,
    /// and not again if it did not change. Not synced (FORMAT.md §9 says why).
    pub(crate) fn write_mark(&self, storage: &dyn Storage, keys: &Subkeys) -> Result<()> {
        let mut m = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        let (epoch, durable, anchor, area, prev) = {
            let s = self.lock();
            (s.epoch, s.durable, s.anchor, s.area, s.prev)
        };
        let Some(anchor) = anchor else {
            return Ok(());
        };
        // The sync before this call covered every slot of the epoch before (written before
        // this epoch began): say so in its own area.
        if let Some((pe, pa, parea, plen)) = prev {
            if plen > 0 && m.prev_done != Some(pe) {
                let mark = DurableMark {
                    epoch: pe,
                    durable: plen,
                    anchor: pa,
                };
                storage
                    .write_all_at(&mark.encode(keys), parea.mark_offset(m.copy[parea.index]))
                    .map_err(|e| Error::io("cannot write the durable mark", e))?;
                m.copy[parea.index] ^= 1;
                m.prev_done = Some(pe);
            }
        }
        if durable == 0 || m.last == Some((epoch, durable)) {
            return Ok(());
        }
        let mark = DurableMark {
            epoch,
            durable,
            anchor,
        };
        storage
            .write_all_at(&mark.encode(keys), area.mark_offset(m.copy[area.index]))
            .map_err(|e| Error::io(format!("cannot write the durable mark ({durable})"), e))?;
        m.copy[area.index] ^= 1;
        m.last = Some((epoch, durable));
        Ok(())
    }

    /// Starts the empty log of a new epoch (after a commit) extending the superblock whose
    /// MAC is `anchor` (kept `None` in versions 1 and 2), in area `epoch % 2` if `two` (the
    /// header that commit made current has format version 6).
    pub(crate) fn reset(
        &self,
        epoch: u64,
        anchor: [u8; 32],
        two: bool,
        binds: bool,
        pipelined: bool,
    ) {
        let mut s = self.lock();
        s.prev = match (pipelined, s.anchor) {
            (true, Some(a)) => Some((s.epoch, a, s.area, s.next)),
            _ => None,
        };
        s.epoch = epoch;
        s.two = two;
        s.area = Area::of(self.total, two, epoch);
        s.prepared = false;
        s.next = 0;
        s.durable = 0;
        s.anchor = binds.then_some(anchor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::storage::MemStorage;
    use crate::suite::CipherSuite;

    fn keys() -> Subkeys {
        Subkeys::derive(
            &VolumeKey::from_bytes([3; 32]),
            CipherSuite::default(),
            [2; 16],
        )
    }

    fn map_op(lbn: u64) -> LogOp {
        LogOp::Map {
            lbn,
            entry: LeafEntry {
                pbn: 2000 + lbn,
                key_epoch: 0,
                k: 0,
                nonce: [1; 32],
                tag: [2; 16],
                birth: 0,
            },
        }
    }

    #[test]
    fn records_round_trip() {
        let k = keys();
        for op in [map_op(9), LogOp::Unmap { lbn: 64, count: 64 }] {
            let rec = LogRecord {
                epoch: 3,
                seq: 10,
                durable: 4,
                op,
            };
            let mut b = [0u8; LOG_RECORD_LEN];
            rec.encode(&k, None, &mut b);
            assert_eq!(LogRecord::decode_verified(&b, &k, None), Some(rec));
            for i in 0..LOG_RECORD_LEN {
                let mut c = b;
                c[i] ^= 4;
                assert_eq!(LogRecord::decode_verified(&c, &k, None), None, "byte {i}");
            }
        }
        let bad = LogRecord {
            epoch: 1,
            seq: 1,
            durable: 0,
            op: LogOp::Unmap { lbn: 60, count: 5 },
        };
        let mut b = [0u8; LOG_RECORD_LEN];
        bad.encode(&k, None, &mut b);
        assert!(
            LogRecord::decode(&b).is_err(),
            "an unmap may not cross a leaf"
        );
    }

    fn log_with(k: &Subkeys, epoch: u64, n: u64, durable_after: u64) -> (MemStorage, Wal) {
        let st = MemStorage::new();
        st.set_len(Regions::V1.data_offset()).unwrap();
        let wal = Wal::new(Regions::V1.log_slots(), epoch, 0, None, false);
        for i in 0..n {
            assert!(wal.try_reserve(1));
            if i == durable_after {
                wal.set_durable(i);
            }
            wal.append(&st, k, &[map_op(i)]).unwrap();
        }
        (st, wal)
    }

    #[test]
    fn replay_scan_finds_records_of_the_epoch() {
        let k = keys();
        let (st, wal) = log_with(&k, 5, 10, 6);
        assert_eq!(wal.next(), 10);
        let log = read_log(&st, Regions::V1).unwrap();
        let scanned = scan(&log, 5, &k, None, 0).unwrap();
        assert_eq!(scanned.records.len(), 10);
        assert_eq!(scanned.durable, 6);
        assert_eq!(
            scan(&log, 6, &k, None, 0).unwrap().records.len(),
            0,
            "other epochs are stale"
        );
    }

    #[test]
    fn holes_above_the_durable_mark_are_a_crash_below_it_tampering() {
        let k = keys();
        let (st, _) = log_with(&k, 5, 10, 6);
        let zero = [0u8; LOG_RECORD_LEN];
        st.write_all_at(&zero, LOG_OFFSET + 8 * LOG_RECORD_LEN as u64)
            .unwrap();
        let scanned = scan(&read_log(&st, Regions::V1).unwrap(), 5, &k, None, 0).unwrap();
        assert_eq!(scanned.records.len(), 9);
        st.write_all_at(&zero, LOG_OFFSET + 2 * LOG_RECORD_LEN as u64)
            .unwrap();
        let err = scan(&read_log(&st, Regions::V1).unwrap(), 5, &k, None, 0).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Integrity);
    }

    /// A storage whose log writes wait until the test lets them go.
    #[derive(Debug)]
    struct Gated {
        inner: MemStorage,
        entered: std::sync::mpsc::SyncSender<()>,
        go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Storage for Gated {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.entered.send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.punch_hole(offset, len)
        }
    }

    #[test]
    fn a_sync_covers_only_appends_whose_write_returned() {
        let k = keys();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(0);
        let (go, go_rx) = std::sync::mpsc::sync_channel(0);
        let st = Gated {
            inner: MemStorage::new(),
            entered: entered_tx,
            go: std::sync::Mutex::new(go_rx),
        };
        st.set_len(Regions::V1.data_offset()).unwrap();
        let wal = Wal::new(Regions::V1.log_slots(), 1, 0, None, false);
        assert!(wal.try_reserve(3));
        std::thread::scope(|s| {
            let first = s.spawn(|| wal.append(&st, &k, &[map_op(0), map_op(1)]));
            entered.recv().unwrap();
            // Slots 0 and 1 are assigned, not written: a sync now makes nothing durable.
            assert_eq!(wal.next(), 2);
            assert_eq!(wal.written(), 0);
            let second = s.spawn(|| wal.append(&st, &k, &[map_op(2)]));
            entered.recv().unwrap();
            go.send(()).unwrap();
            go.send(()).unwrap();
            first.join().unwrap().unwrap();
            second.join().unwrap().unwrap();
        });
        assert_eq!(wal.written(), 3);
        let scanned = scan(&read_log(&st.inner, Regions::V1).unwrap(), 1, &k, None, 0).unwrap();
        assert_eq!(scanned.records.len(), 3);
    }

    #[test]
    fn version_3_records_are_bound_to_their_superblock() {
        let k = keys();
        let rec = LogRecord {
            epoch: 7,
            seq: 0,
            durable: 0,
            op: map_op(1),
        };
        let mut b = [0u8; LOG_RECORD_LEN];
        rec.encode(&k, Some(&[1; 32]), &mut b);
        assert_eq!(
            LogRecord::decode_verified(&b, &k, Some(&[1; 32])),
            Some(rec)
        );
        assert_eq!(LogRecord::decode_verified(&b, &k, Some(&[2; 32])), None);
        assert_eq!(LogRecord::decode_verified(&b, &k, None), None);
    }

    #[test]
    fn durable_marks_verify_and_bind() {
        let k = keys();
        let st = MemStorage::new();
        st.set_len(Regions::V1.data_offset()).unwrap();
        let slots = Regions::V1.log_slots();
        let wal = Wal::new(slots, 4, 0, Some([9; 32]), false);
        assert!(wal.try_reserve(3));
        wal.append(&st, &k, &[map_op(0), map_op(1), map_op(2)])
            .unwrap();
        wal.write_mark(&st, &k).unwrap();
        assert_eq!(
            read_mark(&st, &k, Area::of(slots, false, 4), 4, &[9; 32]).unwrap(),
            0,
            "D = 0 is not written"
        );
        wal.set_durable(2);
        wal.write_mark(&st, &k).unwrap();
        wal.set_durable(3);
        wal.write_mark(&st, &k).unwrap();
        assert_eq!(
            read_mark(&st, &k, Area::of(slots, false, 4), 4, &[9; 32]).unwrap(),
            3
        );
        // A torn (here: destroyed) last copy leaves the previous one.
        st.write_all_at(&[0u8; MARK_LEN], MARK_OFFSETS[1]).unwrap();
        assert_eq!(
            read_mark(&st, &k, Area::of(slots, false, 4), 4, &[9; 32]).unwrap(),
            2
        );
        // Another epoch or another superblock: the mark does not apply.
        assert_eq!(
            read_mark(&st, &k, Area::of(slots, false, 5), 5, &[9; 32]).unwrap(),
            0
        );
        assert_eq!(
            read_mark(&st, &k, Area::of(slots, false, 4), 4, &[8; 32]).unwrap(),
            0
        );
        let mut b = [0u8; MARK_LEN];
        st.read_exact_at(&mut b, MARK_OFFSETS[0]).unwrap();
        for i in 0..MARK_LEN {
            let mut c = b;
            c[i] ^= 0x20;
            assert_eq!(DurableMark::decode_verified(&c, &k), None, "byte {i}");
        }
        // The mark counts in the tamper rule of replay.
        let log = read_log(&st, Regions::V1).unwrap();
        assert_eq!(scan(&log, 4, &k, Some(&[9; 32]), 2).unwrap().durable, 2);
        st.write_all_at(&[0u8; LOG_RECORD_LEN], LOG_OFFSET).unwrap();
        let log = read_log(&st, Regions::V1).unwrap();
        assert_eq!(
            scan(&log, 4, &k, Some(&[9; 32]), 2).unwrap_err().kind(),
            crate::error::ErrorKind::Integrity
        );
        assert_eq!(
            scan(&log, 4, &k, Some(&[9; 32]), 0).unwrap().records.len(),
            2
        );
        // Versions 1 and 2 write no mark.
        let old = Wal::new(slots, 4, 0, None, false);
        old.set_durable(0);
        let st2 = MemStorage::new();
        st2.set_len(Regions::V1.data_offset()).unwrap();
        old.write_mark(&st2, &k).unwrap();
        assert!(st2.to_vec().iter().all(|&x| x == 0));
    }

    #[test]
    fn reservations_bound_the_log() {
        let wal = Wal::new(
            Regions::V1.log_slots(),
            1,
            Regions::V1.log_slots() - 2,
            None,
            false,
        );
        assert!(wal.try_reserve(2));
        assert!(!wal.try_reserve(1));
        wal.release(2);
        assert!(wal.try_reserve(1));
        // Version 6: an epoch has half the region.
        let half = Regions::V1.log_slots() / 2;
        let two = Wal::new(Regions::V1.log_slots(), 3, half - 1, None, true);
        assert!(two.try_reserve(1));
        assert!(!two.try_reserve(1));
    }

    #[test]
    fn version_6_epochs_alternate_between_the_two_areas() {
        let k = keys();
        let st = MemStorage::new();
        st.set_len(Regions::V1.data_offset()).unwrap();
        let total = Regions::V1.log_slots();
        let wal = Wal::new(total, 4, 0, Some([9; 32]), true);
        assert!(wal.try_reserve(2));
        wal.append(&st, &k, &[map_op(0), map_op(1)]).unwrap();
        wal.set_durable(2);
        wal.write_mark(&st, &k).unwrap();
        wal.reset(5, [8; 32], true, true, false);
        assert_eq!(wal.area().index, 1);
        assert!(wal.try_reserve(1));
        wal.append(&st, &k, &[map_op(2)]).unwrap();
        wal.set_durable(1);
        wal.write_mark(&st, &k).unwrap();
        let log = read_log(&st, Regions::V1).unwrap();
        let (a0, a1) = (Area::of(total, true, 4), Area::of(total, true, 5));
        let old = scan(a0.bytes(&log), 4, &k, Some(&[9; 32]), 0).unwrap();
        let new = scan(a1.bytes(&log), 5, &k, Some(&[8; 32]), 0).unwrap();
        assert_eq!((old.records.len(), new.records.len()), (2, 1));
        assert_eq!(
            new.records[0].seq, 0,
            "sequence numbers count within the area"
        );
        // Each area keeps its own durable mark.
        assert_eq!(read_mark(&st, &k, a0, 4, &[9; 32]).unwrap(), 2);
        assert_eq!(read_mark(&st, &k, a1, 5, &[8; 32]).unwrap(), 1);
    }

    #[test]
    fn log_heads_verify_and_name_their_epoch() {
        let k = keys();
        let st = MemStorage::new();
        st.set_len(Regions::V1.data_offset()).unwrap();
        let head = LogHead {
            epoch: 7,
            prev_len: 12,
            parent: [1; 32],
            anchor: [2; 32],
        };
        head.write(&st, &k).unwrap();
        assert_eq!(LogHead::read(&st, &k, 7).unwrap(), Some(head));
        assert_eq!(LogHead::read(&st, &k, 9).unwrap(), None, "another epoch");
        assert_eq!(LogHead::read(&st, &k, 8).unwrap(), None, "the other area");
        let b = head.encode(&k);
        for i in 0..MARK_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert_eq!(LogHead::decode_verified(&c, &k), None, "byte {i}");
        }
        assert_eq!(
            DurableMark::decode_verified(&b, &k),
            None,
            "a head is not a mark"
        );
    }
}
