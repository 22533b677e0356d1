//! Where everything lives in an image (docs/FORMAT.md §1) and little-endian helpers.
//! Every on-disk offset of the format is a constant here or in the file of its structure.

/// The size of a data block, a map node and every other unit of the data region.
pub const BLOCK_SIZE: u64 = 4096;
/// Requests must be aligned to this many bytes.
pub const SECTOR_SIZE: u64 = 512;
/// The format version this crate writes. It reads this one and every earlier one.
pub const FORMAT_VERSION: u32 = 7;
/// The oldest format version this crate reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Number of keyslots in the keyslot area.
pub const MAX_KEYSLOTS: usize = 8;
/// Bytes reserved per keyslot (a 4-byte length, then the blob).
pub const KEYSLOT_SIZE: usize = 4096;
/// Blocks of the header area (the header block and the keyslot area): what a change of
/// either stages (FORMAT.md §3.1).
pub(crate) const HEADER_AREA_BLOCKS: u64 = 1 + (MAX_KEYSLOTS * KEYSLOT_SIZE) as u64 / BLOCK_SIZE;
/// The longest keyslot blob.
pub const MAX_KEYSLOT_LEN: usize = KEYSLOT_SIZE - 4;
/// The longest volume name in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 254;
/// The largest virtual disk: 256 TiB.
pub const MAX_VOLUME_SIZE: u64 = 1 << 48;

/// No physical block number reaches this (the space tree of the largest volume covers less).
pub(crate) const MAX_PBN: u64 = 1 << 40;
/// [`BLOCK_SIZE`] as a `usize`, for buffers.
pub(crate) const BS: usize = 4096;
/// Byte offset of the keyslot area.
pub(crate) const KEYSLOT_OFFSET: u64 = 4096;
/// Byte offsets of superblocks A and B.
pub(crate) const SUPERBLOCK_OFFSETS: [u64; 2] = [0x9000, 0xA000];
/// Byte offsets of the two copies of the durable mark (format version 3; blocks 11 and 12).
pub(crate) const MARK_OFFSETS: [u64; 2] = [0xB000, 0xC000];
/// The first format version with durable marks and log records bound to their superblock.
pub(crate) const BOUND_LOG_VERSION: u32 = 3;
/// The first format version with snapshots (a snapshot table, births in tree entries).
pub(crate) const SNAPSHOT_VERSION: u32 = 4;
/// The first format version with re-encryption (key epochs, the superblock's record).
pub(crate) const REKEY_VERSION: u32 = 5;
/// The first format version whose log has two areas, so that writers go on in one while the
/// commit of the other is in flight (FORMAT.md §9.1, §10.1).
pub(crate) const TWO_LOG_AREAS_VERSION: u32 = 6;
/// The first format version with compressed units (FORMAT.md §18): leaf entries' key epoch
/// field holds `k` in bits 24..31, log record kind 3, the header's unit size.
pub(crate) const UNITS_VERSION: u32 = 7;
/// Header feature flag (format version 7): the volume has compression units of `N` blocks,
/// `log2 N` at header offset 400 (FORMAT.md §18.2).
pub(crate) const FEATURE_UNITS: u32 = 2;
/// Bits 0..23 of a version-7 leaf entry's (and log record's) key epoch field: the key epoch.
pub(crate) const KEY_EPOCH_MASK: u32 = (1 << 24) - 1;
/// Byte offsets of the heads of log areas 0 and 1 (format version 6; blocks 13 and 14).
pub(crate) const LOG_HEAD_OFFSETS: [u64; 2] = [0xD000, 0xE000];
/// Header feature flag (format version 4): node MACs leave out block numbers and births, so
/// trees can be sent and received (FORMAT.md §6.2). Set on images created as version 4.
pub(crate) const FEATURE_PORTABLE_NODES: u32 = 1;
/// Byte offset of the write-ahead log.
pub(crate) const LOG_OFFSET: u64 = 0x10000;
/// Length of the write-ahead log of a version-1 image, and the shortest log of any version.
pub(crate) const MIN_LOG_LEN: u64 = 4 << 20;
/// The longest write-ahead log (format versions 2 and 3).
pub(crate) const MAX_LOG_LEN: u64 = 64 << 20;
/// Length of one log record.
pub(crate) const LOG_RECORD_LEN: usize = 128;
/// The most log slots of any image.
pub(crate) const MAX_LOG_SLOTS: u64 = MAX_LOG_LEN / LOG_RECORD_LEN as u64;
/// The lowest first block of any image's data region (that of a 4 MiB log): pointers below it
/// are invalid whatever the image.
pub(crate) const MIN_DATA_START_BLOCK: u64 = (LOG_OFFSET + MIN_LOG_LEN) / BLOCK_SIZE;

/// Where one image's log ends and its data region starts (docs/FORMAT.md §1): the log length
/// is 4 MiB in version 1 and a power of two from 4 to 64 MiB in versions 2 and 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Regions {
    /// Length of the write-ahead log in bytes.
    pub(crate) log_len: u64,
}

impl Regions {
    /// The regions of a version-1 image.
    pub(crate) const V1: Regions = Regions {
        log_len: MIN_LOG_LEN,
    };

    /// The log a new volume of `size` bytes gets: 1/32 of the size, rounded up to a power of
    /// two, from 4 to 64 MiB. A longer log means fewer commits (each commit rewrites every map
    /// leaf changed since the last one) at the cost of room in the image and a longer replay.
    pub(crate) fn for_size(size: u64) -> Regions {
        Regions {
            log_len: (size / 32)
                .next_power_of_two()
                .clamp(MIN_LOG_LEN, MAX_LOG_LEN),
        }
    }

    /// Whether `log_len` is a valid log length.
    pub(crate) fn valid_log_len(log_len: u64) -> bool {
        log_len.is_power_of_two() && (MIN_LOG_LEN..=MAX_LOG_LEN).contains(&log_len)
    }

    /// Number of log slots.
    pub(crate) fn log_slots(self) -> u64 {
        self.log_len / LOG_RECORD_LEN as u64
    }

    /// Byte offset of the data region.
    pub(crate) fn data_offset(self) -> u64 {
        LOG_OFFSET + self.log_len
    }

    /// First physical block of the data region.
    pub(crate) fn data_start_block(self) -> u64 {
        self.data_offset() / BLOCK_SIZE
    }
}

/// Entries per tree node.
pub(crate) const FANOUT: u64 = 64;
/// Bytes per tree-node entry.
pub(crate) const ENTRY_LEN: usize = 64;
/// Physical blocks covered by one space-tree leaf (one bit each).
pub(crate) const BITS_PER_SPACE_LEAF: u64 = BLOCK_SIZE * 8;

/// Reads a little-endian u16 at `off`.
pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

/// Reads a little-endian u32 at `off`.
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `off`.
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads `N` bytes at `off`.
pub(crate) fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

/// Writes `v` little-endian at `off`.
pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `off`.
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `off`.
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The smallest tree height `h >= 1` whose root covers `units` leaf entries when each leaf
/// holds `per_leaf` of them and every interior node has [`FANOUT`] children.
pub(crate) fn tree_height(units: u64, per_leaf: u64) -> u8 {
    let mut height = 1u8;
    let mut covered = per_leaf.saturating_mul(FANOUT);
    while covered < units {
        height += 1;
        covered = covered.saturating_mul(FANOUT);
    }
    height
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_match_the_format_document() {
        assert_eq!(Regions::V1.data_offset(), 0x41_0000);
        assert_eq!(Regions::V1.data_start_block(), 1040);
        assert_eq!(MIN_DATA_START_BLOCK, 1040);
        assert_eq!(Regions::V1.log_slots(), 32768);
        let big = Regions {
            log_len: MAX_LOG_LEN,
        };
        assert_eq!(big.data_offset(), 0x401_0000);
        assert_eq!(big.log_slots(), MAX_LOG_SLOTS);
        assert_eq!(
            KEYSLOT_OFFSET + (MAX_KEYSLOTS * KEYSLOT_SIZE) as u64,
            0x9000
        );
    }

    #[test]
    fn new_volumes_get_a_log_of_a_thirty_second_of_their_size() {
        let mib = 1u64 << 20;
        assert_eq!(Regions::for_size(4 * mib), Regions::V1);
        assert_eq!(Regions::for_size(128 * mib), Regions::V1);
        assert_eq!(Regions::for_size(129 * mib).log_len, 8 * mib);
        assert_eq!(Regions::for_size(1 << 30).log_len, 32 * mib);
        assert_eq!(Regions::for_size(1 << 48).log_len, MAX_LOG_LEN);
        for len in [4 * mib, 8 * mib, 64 * mib] {
            assert!(Regions::valid_log_len(len));
        }
        for len in [0, 2 * mib, 5 * mib, 128 * mib] {
            assert!(!Regions::valid_log_len(len));
        }
    }

    #[test]
    fn heights() {
        assert_eq!(tree_height(1, 64), 1);
        assert_eq!(tree_height(4096, 64), 1);
        assert_eq!(tree_height(4097, 64), 2);
        assert_eq!(tree_height(1 << 36, 64), 5);
    }

    #[test]
    fn little_endian_round_trip() {
        let mut b = [0u8; 16];
        put_u64(&mut b, 1, 0x0102_0304_0506_0708);
        assert_eq!(b[1], 8);
        assert_eq!(get_u64(&b, 1), 0x0102_0304_0506_0708);
        put_u32(&mut b, 9, 7);
        put_u16(&mut b, 13, 9);
        assert_eq!((get_u32(&b, 9), get_u16(&b, 13)), (7, 9));
    }
}
