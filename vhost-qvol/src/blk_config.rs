//! The virtio-blk configuration space (virtio 1.2, section 5.2.4), serialised by hand:
//! every multi-byte field little-endian, at the offsets of `struct virtio_blk_config`.
//! (`virtio_blk_config` from virtio-bindings is not `ByteValued`, and its layout would be
//! host-endian anyway.)

use crate::disk::SECTOR_SIZE;

/// Offset of the `writeback` byte, the only field a driver may write (with
/// VIRTIO_BLK_F_CONFIG_WCE, virtio 1.2 5.2.5).
pub const WRITEBACK_OFFSET: usize = 32;

/// Bytes of the layout we fill: up to and including `unused1[3]` after
/// `write_zeroes_may_unmap`. Later fields (secure erase, zoned) stay zero.
pub const CONFIG_LEN: usize = 60;

/// The largest config space a vhost-user frontend may ask for (vhost-user spec,
/// VHOST_USER_GET_CONFIG: at most 256 bytes).
pub const MAX_CONFIG_LEN: usize = 256;

/// Values the backend advertises; see [`BlkConfig::to_bytes`] for the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Maximum number of segments in a request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// log2(physical block / logical block) (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// 1 = write back (flushes needed), 0 = write through (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Largest discard, in sectors, per segment (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Largest number of segments in one discard request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, in sectors, per segment (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Largest number of segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 if a write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
}

/// qvol's data block: the unit of encryption, so the natural physical block.
const PHYSICAL_BLOCK: u64 = 4096;
/// Sectors per qvol block.
const SECTORS_PER_BLOCK: u32 = (PHYSICAL_BLOCK / SECTOR_SIZE) as u32;
/// Per-segment limit for discard and write-zeroes: 1 GiB in sectors.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Segments per discard or write-zeroes request we accept.
pub const MAX_DISCARD_SEG: u32 = 32;

impl BlkConfig {
    /// The configuration for a disk of `size` bytes served over `num_queues` queues of
    /// `queue_size` entries.
    pub fn new(size: u64, num_queues: u16, queue_size: u16) -> Self {
        Self {
            capacity: size / SECTOR_SIZE,
            // A request needs one descriptor for the header and one for the status
            // (as QEMU's virtio-blk computes it).
            seg_max: u32::from(queue_size.saturating_sub(2).max(1)),
            blk_size: SECTOR_SIZE as u32,
            physical_block_exp: SECTORS_PER_BLOCK.trailing_zeros() as u8,
            min_io_size: SECTORS_PER_BLOCK as u16,
            opt_io_size: SECTORS_PER_BLOCK,
            writeback: 1,
            num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: SECTORS_PER_BLOCK,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            write_zeroes_may_unmap: 1,
        }
    }

    /// The `struct virtio_blk_config` bytes (virtio 1.2, 5.2.4).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes()); // le64 capacity
                                                               // 8: le32 size_max — VIRTIO_BLK_F_SIZE_MAX is not offered, left 0.
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes()); // le32 seg_max
                                                                // 16: struct virtio_blk_geometry (le16 cylinders, u8 heads, u8 sectors) — not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes()); // le32 blk_size
                                                                 // 24: struct virtio_blk_topology
        b[24] = self.physical_block_exp; // u8 physical_block_exp
        b[25] = 0; // u8 alignment_offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes()); // le16 min_io_size
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes()); // le32 opt_io_size
        b[WRITEBACK_OFFSET] = self.writeback; // u8 writeback
                                              // 33: u8 unused0
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes()); // le16 num_queues
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        // 57..60: u8 unused1[3]
        b
    }

    /// What VHOST_USER_GET_CONFIG answers: `size` bytes from `offset`, zero beyond our
    /// layout, empty (the protocol's "error") if the range is invalid.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        let Some(end) = offset.checked_add(size).filter(|&e| e <= MAX_CONFIG_LEN) else {
            return Vec::new();
        };
        let mut space = [0u8; MAX_CONFIG_LEN];
        space[..CONFIG_LEN].copy_from_slice(&self.to_bytes());
        space[offset..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_offsets() {
        let cfg = BlkConfig::new(1 << 30, 4, 256);
        let b = cfg.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2_097_152);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[24], 3); // 4096-byte physical blocks
        assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_ne!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 0);
        assert_ne!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_ne!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 0);
        assert_ne!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 0);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn read_pads_with_zeros_and_rejects_ranges_past_256() {
        let cfg = BlkConfig::new(4096, 1, 256);
        let all = cfg.read(0, 100);
        assert_eq!(all.len(), 100);
        assert_eq!(&all[..CONFIG_LEN], &cfg.to_bytes());
        assert!(all[CONFIG_LEN..].iter().all(|&b| b == 0));
        assert_eq!(cfg.read(32, 1), vec![1]);
        assert!(cfg.read(200, 100).is_empty());
        assert!(cfg.read(u32::MAX, 2).is_empty());
    }
}
