//! Superblocks A and B (docs/FORMAT.md §8): the root of everything, MAC'd under `K_meta`.

use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::NodePtr;
use crate::subkeys::Subkeys;

/// `"QVOLSUP1"`.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"QVOLSUP1";
const OFF_MAC: usize = 480;
/// The superblock's compression algorithm byte for zstd (FORMAT.md §18.2).
const COMPRESS_ZSTD: u8 = 1;
/// Where the random commit id lives (16 bytes; FORMAT.md §8).
const OFF_COMMIT_ID: usize = 200;
/// Where the staged keyslot area's first block lives (8 bytes; FORMAT.md §3.1).
const OFF_STAGED: usize = 216;
/// Where the staged keyslot area's header hash lives (32 bytes).
const OFF_STAGED_HASH: usize = 224;
/// Where the snapshot epoch lives (4 bytes, format version 4; FORMAT.md §8).
const OFF_SNAP_EPOCH: usize = 256;
/// Where the map root's birth lives (4 bytes, format version 4).
const OFF_ROOT_BIRTH: usize = 260;
/// Where the map root's portable MAC lives (16 bytes, format version 4).
const OFF_ROOT_PMAC: usize = 264;
/// Where the re-encryption record lives (168 bytes, format version 5; FORMAT.md §17).
const OFF_REKEY: usize = 280;
/// The compression of new writes (format version 7; FORMAT.md §18.2): algorithm (0 none,
/// 1 zstd), then the zstd level as an `i8`, then 2 reserved bytes.
const OFF_COMPRESS: usize = 448;
/// The first reserved byte after it (450..452 are reserved in the compression field).
const OFF_RESERVED: usize = 450;
/// Flag bit of the re-encryption record: a re-encryption is in progress.
const REKEY_ACTIVE: u32 = 1;
/// Bytes of a superblock that carry meaning (one sector).
pub(crate) const SUPERBLOCK_LEN: usize = 512;

/// A decoded superblock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Superblock {
    /// Commit generation (>= 1); the copy written is `generation % 2`.
    pub generation: u64,
    /// The log epoch whose records belong to this superblock (= generation).
    pub log_epoch: u64,
    /// Root of the block map.
    pub map_root: NodePtr,
    /// Height of the block map.
    pub map_height: u8,
    /// Height of the space tree.
    pub space_height: u8,
    /// Key epoch new data is sealed under.
    pub key_epoch: u32,
    /// Root of the space tree.
    pub space_root: NodePtr,
    /// First block of the snapshot table (pbn 0: no snapshot; format version 4).
    pub snapshots: NodePtr,
    /// The snapshot epoch: the birth of every block written under this superblock; one more
    /// than the epoch of the newest snapshot ever taken (format version 4; FORMAT.md §6.1).
    pub snap_epoch: u32,
    /// Allocated data blocks.
    pub allocated_blocks: u64,
    /// File length in blocks when committed.
    pub high_water: u64,
    /// `BLAKE3(header block || keyslot area)`.
    pub header_hash: [u8; 32],
    /// Random bytes drawn for each commit (format version 3; zero in versions 1 and 2), so
    /// that no two commits ever have the same MAC, even with the same content.
    pub commit_id: [u8; 16],
    /// First block of a staged header area (header block and keyslot area, 9 blocks past the
    /// high-water mark), or 0: set only between the two commits of a change of the keyslots
    /// or the header (FORMAT.md §3.1).
    pub staged_keyslots: u64,
    /// `BLAKE3(staged header block || staged keyslot area)`: the header hash once the change
    /// is complete (zero when nothing is staged).
    pub staged_hash: [u8; 32],
    /// The re-encryption in progress (format version 5; FORMAT.md §17).
    pub rekey: Option<RekeyRecord>,
    /// The zstd level new whole-unit writes are compressed at; `None`: compression off
    /// (format version 7 with compression units; FORMAT.md §18.2).
    pub compress: Option<i8>,
}

/// A re-encryption in progress, as its superblock records it (FORMAT.md §17): new data and
/// every node are under the current key epoch (offset 68); data blocks whose entries say the
/// previous one still open with its data key, sealed here under the current key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyRecord {
    /// The key epoch the data is moving away from (the current one minus one).
    pub prev_epoch: u32,
    /// Its suite id.
    pub prev_suite: u16,
    /// The suite id of the current key epoch.
    pub suite: u16,
    /// Map leaves done (every logical block below `done * 64` is under the current key).
    pub done: u64,
    /// `K_data` of the previous epoch, sealed under the current key's `K_wrap`.
    pub prev_data_key: [u8; 72],
    /// The current volume key, sealed under the previous key's `K_wrap`.
    pub key_for_prev: [u8; 72],
}

impl RekeyRecord {
    fn encode(&self, b: &mut [u8]) {
        put_u32(b, OFF_REKEY, self.prev_epoch);
        b[OFF_REKEY + 4..OFF_REKEY + 6].copy_from_slice(&self.prev_suite.to_le_bytes());
        b[OFF_REKEY + 6..OFF_REKEY + 8].copy_from_slice(&self.suite.to_le_bytes());
        put_u32(b, OFF_REKEY + 8, REKEY_ACTIVE);
        put_u64(b, OFF_REKEY + 16, self.done);
        b[OFF_REKEY + 24..OFF_REKEY + 96].copy_from_slice(&self.prev_data_key);
        b[OFF_REKEY + 96..OFF_REKEY + 168].copy_from_slice(&self.key_for_prev);
    }

    fn decode(b: &[u8], key_epoch: u32) -> Result<Option<RekeyRecord>> {
        let area = &b[OFF_REKEY..OFF_COMPRESS];
        if get_u32(b, OFF_REKEY + 8) != REKEY_ACTIVE {
            if area.iter().any(|&x| x != 0) {
                return Err(Error::corrupt(
                    "the superblock's re-encryption record is invalid",
                ));
            }
            return Ok(None);
        }
        let suite_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let r = RekeyRecord {
            prev_epoch: get_u32(b, OFF_REKEY),
            prev_suite: suite_at(OFF_REKEY + 4),
            suite: suite_at(OFF_REKEY + 6),
            done: get_u64(b, OFF_REKEY + 16),
            prev_data_key: get_array(b, OFF_REKEY + 24),
            key_for_prev: get_array(b, OFF_REKEY + 96),
        };
        let valid = r.prev_epoch.checked_add(1) == Some(key_epoch)
            && crate::suite::CipherSuite::from_id(r.prev_suite).is_some()
            && crate::suite::CipherSuite::from_id(r.suite).is_some()
            && get_u32(b, OFF_REKEY + 12) == 0
            && r.done < 1 << 40;
        if !valid {
            return Err(Error::corrupt(
                "the superblock's re-encryption record is invalid",
            ));
        }
        Ok(Some(r))
    }
}

impl Superblock {
    /// Encodes and MACs the superblock (512 bytes).
    pub(crate) fn encode(&self, keys: &Subkeys) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        b[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u64(&mut b, 8, self.generation);
        put_u64(&mut b, 16, self.log_epoch);
        put_u64(&mut b, 24, self.map_root.pbn);
        b[32..64].copy_from_slice(&self.map_root.mac);
        b[64] = self.map_height;
        b[65] = self.space_height;
        put_u32(&mut b, 68, self.key_epoch);
        put_u64(&mut b, 72, self.space_root.pbn);
        b[80..112].copy_from_slice(&self.space_root.mac);
        put_u64(&mut b, 112, self.snapshots.pbn);
        b[120..152].copy_from_slice(&self.snapshots.mac);
        put_u64(&mut b, 152, self.allocated_blocks);
        put_u64(&mut b, 160, self.high_water);
        b[168..200].copy_from_slice(&self.header_hash);
        b[OFF_COMMIT_ID..OFF_COMMIT_ID + 16].copy_from_slice(&self.commit_id);
        put_u64(&mut b, OFF_STAGED, self.staged_keyslots);
        b[OFF_STAGED_HASH..OFF_STAGED_HASH + 32].copy_from_slice(&self.staged_hash);
        put_u32(&mut b, OFF_SNAP_EPOCH, self.snap_epoch);
        put_u32(&mut b, OFF_ROOT_BIRTH, self.map_root.birth);
        b[OFF_ROOT_PMAC..OFF_ROOT_PMAC + 16].copy_from_slice(&self.map_root.pmac);
        if let Some(r) = &self.rekey {
            r.encode(&mut b);
        }
        if let Some(level) = self.compress {
            b[OFF_COMPRESS] = COMPRESS_ZSTD;
            b[OFF_COMPRESS + 1] = level as u8;
        }
        let mac = mac(keys, &b[..OFF_MAC]);
        b[OFF_MAC..].copy_from_slice(&mac);
        b
    }

    /// Parses a superblock's fields without checking its MAC (for fuzzing and diagnostics).
    pub fn decode(b: &[u8]) -> Result<Superblock> {
        if b.len() < SUPERBLOCK_LEN || b[..8] != SUPERBLOCK_MAGIC {
            return Err(Error::corrupt(
                "no superblock here (wrong magic or too short)",
            ));
        }
        if b[66..68] != [0, 0] || b[OFF_RESERVED..OFF_MAC].iter().any(|&x| x != 0) {
            return Err(Error::corrupt(
                "the superblock's reserved bytes are not zero",
            ));
        }
        let sb = Superblock {
            generation: get_u64(b, 8),
            log_epoch: get_u64(b, 16),
            map_root: NodePtr {
                pbn: get_u64(b, 24),
                mac: get_array(b, 32),
                birth: get_u32(b, OFF_ROOT_BIRTH),
                pmac: get_array(b, OFF_ROOT_PMAC),
            },
            map_height: b[64],
            space_height: b[65],
            key_epoch: get_u32(b, 68),
            space_root: NodePtr {
                pbn: get_u64(b, 72),
                mac: get_array(b, 80),
                ..NodePtr::default()
            },
            snapshots: NodePtr {
                pbn: get_u64(b, 112),
                mac: get_array(b, 120),
                ..NodePtr::default()
            },
            snap_epoch: get_u32(b, OFF_SNAP_EPOCH),
            allocated_blocks: get_u64(b, 152),
            high_water: get_u64(b, 160),
            header_hash: get_array(b, 168),
            commit_id: get_array(b, OFF_COMMIT_ID),
            staged_keyslots: get_u64(b, OFF_STAGED),
            staged_hash: get_array(b, OFF_STAGED_HASH),
            rekey: RekeyRecord::decode(b, get_u32(b, 68))?,
            compress: match (b[OFF_COMPRESS], b[OFF_COMPRESS + 1]) {
                (0, 0) => None,
                (COMPRESS_ZSTD, level) => Some(level as i8),
                _ => {
                    return Err(Error::corrupt(
                        "the superblock names a compression this build does not know",
                    ))
                }
            },
        };
        let staged_ok = if sb.staged_keyslots == 0 {
            sb.staged_hash == [0; 32]
        } else {
            (MIN_DATA_START_BLOCK..MAX_PBN - HEADER_AREA_BLOCKS).contains(&sb.staged_keyslots)
        };
        if !staged_ok {
            return Err(Error::corrupt(
                "the superblock's staged keyslot area is invalid",
            ));
        }
        let ptr_ok = |p: &NodePtr| p.pbn == 0 || (MIN_DATA_START_BLOCK..MAX_PBN).contains(&p.pbn);
        if !ptr_ok(&sb.map_root) || !ptr_ok(&sb.space_root) || !ptr_ok(&sb.snapshots) {
            return Err(Error::corrupt(
                "the superblock points outside the data region",
            ));
        }
        if sb.generation == 0
            || sb.map_height == 0
            || sb.map_height > 8
            || sb.space_height == 0
            || sb.space_height > 8
        {
            return Err(Error::corrupt(
                "the superblock has an invalid generation or tree height",
            ));
        }
        Ok(sb)
    }

    /// Whether the MAC of the encoded superblock `b` verifies under `keys`.
    pub(crate) fn mac_verifies(b: &[u8], keys: &Subkeys) -> bool {
        b.len() >= SUPERBLOCK_LEN
            && blake3::Hash::from(mac(keys, &b[..OFF_MAC]))
                == blake3::Hash::from(get_array::<32>(b, OFF_MAC))
    }

    /// Parses a superblock and checks its MAC; `None` if either fails (a torn or foreign copy).
    #[cfg(test)]
    pub(crate) fn decode_verified(b: &[u8], keys: &Subkeys) -> Option<Superblock> {
        Superblock::decode_verified_mac(b, keys).map(|(sb, _)| sb)
    }

    /// [`Superblock::decode_verified`] that also returns the MAC (the root id of its commit
    /// point, FORMAT.md §8).
    #[cfg(test)]
    pub(crate) fn decode_verified_mac(b: &[u8], keys: &Subkeys) -> Option<(Superblock, [u8; 32])> {
        if b.len() < SUPERBLOCK_LEN {
            return None;
        }
        let expected = blake3::Hash::from(mac(keys, &b[..OFF_MAC]));
        let stored = get_array::<32>(b, OFF_MAC);
        if expected != blake3::Hash::from(stored) {
            return None;
        }
        Superblock::decode(b).ok().map(|sb| (sb, stored))
    }

    /// The MAC of an encoded superblock.
    pub(crate) fn mac_of(encoded: &[u8]) -> [u8; 32] {
        get_array(encoded, OFF_MAC)
    }
}

fn mac(keys: &Subkeys, body: &[u8]) -> [u8; 32] {
    let mut h = keys.meta_mac();
    h.update(b"qvol-super-v1");
    h.update(keys.volume_id());
    h.update(body);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::suite::CipherSuite;

    fn keys(k: u8) -> Subkeys {
        Subkeys::derive(
            &VolumeKey::from_bytes([k; 32]),
            CipherSuite::default(),
            [1; 16],
        )
    }

    fn sample() -> Superblock {
        Superblock {
            generation: 42,
            log_epoch: 42,
            map_root: NodePtr {
                pbn: 1500,
                mac: [1; 32],
                birth: 6,
                pmac: [8; 16],
            },
            map_height: 3,
            space_height: 2,
            key_epoch: 0,
            space_root: NodePtr {
                pbn: 1600,
                mac: [2; 32],
                ..NodePtr::default()
            },
            snapshots: NodePtr {
                pbn: 1700,
                mac: [5; 32],
                ..NodePtr::default()
            },
            snap_epoch: 7,
            allocated_blocks: 77,
            high_water: 3000,
            header_hash: [3; 32],
            commit_id: [9; 16],
            staged_keyslots: 5000,
            staged_hash: [4; 32],
            rekey: None,
            compress: Some(-5),
        }
    }

    #[test]
    fn rekey_records_round_trip_and_are_covered() {
        let mut sb = sample();
        sb.key_epoch = 3;
        sb.rekey = Some(RekeyRecord {
            prev_epoch: 2,
            prev_suite: 1,
            suite: 2,
            done: 77,
            prev_data_key: [6; 72],
            key_for_prev: [7; 72],
        });
        let b = sb.encode(&keys(1));
        assert_eq!(Superblock::decode_verified(&b, &keys(1)), Some(sb.clone()));
        for i in OFF_REKEY..OFF_MAC {
            let mut c = b;
            c[i] ^= 0x10;
            assert_eq!(Superblock::decode_verified(&c, &keys(1)), None, "byte {i}");
        }
        sb.key_epoch = 4;
        let b = sb.encode(&keys(1));
        assert!(
            Superblock::decode(&b).is_err(),
            "epochs must be consecutive"
        );
    }

    #[test]
    fn round_trips_and_verifies() {
        let b = sample().encode(&keys(1));
        assert_eq!(Superblock::decode_verified(&b, &keys(1)), Some(sample()));
        assert_eq!(Superblock::decode(&b).unwrap(), sample());
        assert_eq!(Superblock::decode_verified(&b, &keys(2)), None);
    }

    #[test]
    fn every_byte_is_covered() {
        let b = sample().encode(&keys(1));
        for i in 0..SUPERBLOCK_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert_eq!(Superblock::decode_verified(&c, &keys(1)), None, "byte {i}");
        }
    }
}
