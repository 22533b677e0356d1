//! An independent reader of the version-1 layout, written from docs/FORMAT.md alone (no
//! qvol-core internals): it finds where each structure of an image lives so that the tamper
//! tests can aim at data blocks, map nodes, space nodes, log records and superblocks. It
//! verifies nothing (no MACs): it is only used on untampered images.
#![allow(dead_code)]

/// FORMAT.md §1.
pub const BLOCK: usize = 4096;
/// Header: block 0.
pub const HEADER: std::ops::Range<usize> = 0..4096;
/// Keyslot area: blocks 1..=8.
pub const KEYSLOTS: std::ops::Range<usize> = 4096..9 * 4096;
/// Superblocks A and B: blocks 9 and 10.
pub const SUPERBLOCKS: [usize; 2] = [9 * 4096, 10 * 4096];
/// The meaningful bytes of a superblock (§8).
pub const SUPERBLOCK_LEN: usize = 512;
/// Write-ahead log: blocks 16..=1039 (§9).
pub const LOG_OFFSET: usize = 0x10000;
/// Length of one log record.
pub const RECORD_LEN: usize = 128;
/// Number of log slots.
pub const LOG_SLOTS: usize = 32768;
/// First block of the data region.
pub const DATA_START_BLOCK: u64 = 1040;

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// A tree node found by walking from a superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    /// Physical block number.
    pub pbn: u64,
    /// 0 = leaf.
    pub level: u8,
    /// Position within its level.
    pub index: u64,
}

/// A log record in its slot.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// Slot index (= sequence number).
    pub slot: usize,
    /// 1 = map a block, 2 = unmap a range.
    pub kind: u8,
    /// The durable mark it carries.
    pub durable_mark: u64,
    /// lbn (kind 1) or first lbn (kind 2).
    pub lbn: u64,
}

/// Where everything of one image lives, as FORMAT.md describes it.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Byte offset of the superblock with the highest generation.
    pub newest_superblock: usize,
    /// Byte offset of the other one.
    pub older_superblock: usize,
    /// Generation of the newest superblock.
    pub generation: u64,
    /// Log epoch of the newest superblock.
    pub log_epoch: u64,
    /// Map-tree nodes.
    pub map_nodes: Vec<Node>,
    /// Space-tree nodes.
    pub space_nodes: Vec<Node>,
    /// (lbn, pbn) of every data block the committed map points to.
    pub data_blocks: Vec<(u64, u64)>,
    /// Log records of the current epoch, in slot order (the log's valid prefix and beyond).
    pub records: Vec<Record>,
    /// Byte offset of the log area of the current epoch: the log region before version 6,
    /// its half `epoch % 2` from version 6 on (§9.1).
    pub log_area: usize,
    /// Slots of that area.
    pub area_slots: usize,
}

impl Layout {
    /// Reads the layout of `image` (an untampered image).
    pub fn read(image: &[u8]) -> Self {
        let sb = |i: usize| {
            let off = SUPERBLOCKS[i];
            let bytes = &image[off..off + SUPERBLOCK_LEN];
            (bytes[..8] == *b"QVOLSUP1").then(|| u64_at(bytes, 8))
        };
        let (newest, older) = match (sb(0), sb(1)) {
            (Some(a), Some(b)) if b > a => (1, 0),
            (Some(_), _) => (0, 1),
            (None, Some(_)) => (1, 0),
            (None, None) => panic!("no superblock with the documented magic"),
        };
        let s = &image[SUPERBLOCKS[newest]..SUPERBLOCKS[newest] + SUPERBLOCK_LEN];
        let version = u32::from_le_bytes(image[8..12].try_into().unwrap());
        let log_slots = u64_at(image, 88) as usize / RECORD_LEN;
        let log_epoch = u64_at(s, 16);
        let (log_area, area_slots) = if version >= 6 {
            let half = log_slots / 2;
            (
                LOG_OFFSET + (log_epoch % 2) as usize * half * RECORD_LEN,
                half,
            )
        } else {
            (LOG_OFFSET, log_slots)
        };
        let mut layout = Layout {
            log_area,
            area_slots,
            newest_superblock: SUPERBLOCKS[newest],
            older_superblock: SUPERBLOCKS[older],
            generation: u64_at(s, 8),
            log_epoch: u64_at(s, 16),
            ..Layout::default()
        };
        let (map_root, map_height) = (u64_at(s, 24), s[64]);
        let (space_root, space_height) = (u64_at(s, 72), s[65]);
        walk(
            image,
            map_root,
            map_height,
            0,
            &mut layout.map_nodes,
            &mut |lbn, pbn| layout.data_blocks.push((lbn, pbn)),
        );
        walk(
            image,
            space_root,
            space_height,
            0,
            &mut layout.space_nodes,
            &mut |_, _| {},
        );
        for slot in 0..area_slots {
            let r = &image[log_area + slot * RECORD_LEN..][..RECORD_LEN];
            if u64_at(r, 8) == layout.log_epoch && u64_at(r, 16) == slot as u64 && r[0] != 0 {
                layout.records.push(Record {
                    slot,
                    kind: r[0],
                    durable_mark: u64_at(r, 24),
                    lbn: u64_at(r, 32),
                });
            }
        }
        layout
    }

    /// Byte offset of slot `slot` of the current epoch's log area.
    pub fn slot_offset(&self, slot: usize) -> usize {
        self.log_area + slot * RECORD_LEN
    }

    /// The highest durable mark any record carries (FORMAT.md §9, replay step 2).
    pub fn durable_mark(&self) -> u64 {
        self.records
            .iter()
            .map(|r| r.durable_mark)
            .max()
            .unwrap_or(0)
    }

    /// The pbn of the data block of `lbn`, if the committed map has one.
    pub fn pbn_of(&self, lbn: u64) -> Option<u64> {
        self.data_blocks
            .iter()
            .find(|(l, _)| *l == lbn)
            .map(|(_, p)| *p)
    }
}

/// Walks the subtree at `pbn` (level `level`, index `index`; the root is at (height, 0)).
/// Entries of level-0 nodes with a nonzero pbn are reported to `leaf` as (lbn, pbn): the data
/// blocks of the map tree (for the space tree, whose leaves are bitmaps, pass a no-op).
fn walk(
    image: &[u8],
    pbn: u64,
    level: u8,
    index: u64,
    nodes: &mut Vec<Node>,
    leaf: &mut dyn FnMut(u64, u64),
) {
    if pbn == 0 {
        return;
    }
    nodes.push(Node { pbn, level, index });
    let node = &image[pbn as usize * BLOCK..][..BLOCK];
    for e in 0..64u64 {
        let child = u64_at(node, e as usize * 64);
        if child == 0 {
            continue;
        }
        if level == 0 {
            leaf(index * 64 + e, child);
        } else {
            walk(image, child, level - 1, index * 64 + e, nodes, leaf);
        }
    }
}
