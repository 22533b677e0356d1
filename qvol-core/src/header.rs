//! The header (block 0) and the keyslot area (blocks 1..=8): docs/FORMAT.md §2 and §3.
//! Readable without a key.

use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::storage::Storage;
use crate::suite::CipherSuite;
use crate::superblock::{Superblock, SUPERBLOCK_LEN};

/// `\x89QVOL\r\n\x1a`.
pub const HEADER_MAGIC: [u8; 8] = [0x89, b'Q', b'V', b'O', b'L', b'\r', b'\n', 0x1a];
const OFF_CHECKSUM: usize = 4064;
const OFF_NAME: usize = 146;
/// `log2 N` of the compression units (format version 7, FORMAT.md §18.2); 401..404 zero.
const OFF_UNIT_LOG2: usize = 400;
/// Bytes of header plus keyslot area, the span the superblock hashes.
pub(crate) const HEADER_AREA_LEN: usize = BS + MAX_KEYSLOTS * KEYSLOT_SIZE;

/// The decoded header of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The format version (1 to 5).
    pub version: u32,
    /// Length of the write-ahead log in bytes (4 MiB in version 1).
    pub log_len: u64,
    /// The volume's random identifier.
    pub volume_id: [u8; 16],
    /// The cipher suite of its data blocks.
    pub suite: CipherSuite,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// A human-readable name (may be empty).
    pub name: String,
    /// `BLAKE3-keyed(K_check, ...)`: tells a wrong key from a tampered image.
    pub key_check: [u8; 32],
    /// Feature flags (offset 104): bit 0 = portable node MACs (format version 4).
    pub features: u32,
    /// The key epoch of the volume key the keyslots wrap (offset 108, format version 5;
    /// FORMAT.md §17).
    pub key_epoch: u32,
    /// `log2 N` of the compression units (offset 400, with feature bit 1 in format version
    /// 7; FORMAT.md §18.2); 0 without units.
    pub unit_log2: u8,
}

/// What `qvol info` and key unwrapping need, read without any key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeaderInfo {
    /// The format version (1 to 5).
    pub format_version: u32,
    /// Length of the write-ahead log in bytes: writes between two commits take a 128-byte
    /// record per block, so a log of `n` bytes holds `n / 128` block writes.
    pub log_len: u64,
    /// The volume's random identifier (bound into keyslots as associated data).
    pub volume_id: [u8; 16],
    /// The cipher suite of its data blocks.
    pub suite: CipherSuite,
    /// The key epoch of the volume key the keyslots wrap (0 until a re-encryption).
    pub key_epoch: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// The volume's name.
    pub name: String,
    /// Bytes of each compression unit (FORMAT.md §18), 0 for a volume created without
    /// compression.
    pub unit_bytes: u32,
    /// The 8 keyslots in slot order (opaque blobs written by qvol-keys); an empty blob is a
    /// free slot.
    pub keyslots: Vec<Vec<u8>>,
}

impl Header {
    /// Where the log and the data region are.
    pub(crate) fn regions(&self) -> Regions {
        Regions {
            log_len: self.log_len,
        }
    }

    /// Whether log records are bound to their superblock and durable marks are written
    /// (format version 3 and later).
    pub(crate) fn binds_log(&self) -> bool {
        self.version >= BOUND_LOG_VERSION
    }

    /// Whether the log has two areas and commits can run while writers go on (format
    /// version 6).
    pub(crate) fn two_log_areas(&self) -> bool {
        self.version >= TWO_LOG_AREAS_VERSION
    }

    /// Whether the image has snapshots (a snapshot table, births; format version 4).
    pub(crate) fn has_snapshots(&self) -> bool {
        self.version >= SNAPSHOT_VERSION
    }

    /// Whether leaf entries may reference compressed units (FORMAT.md §18): `log2 N`.
    pub(crate) fn units(&self) -> Option<u8> {
        (self.features & FEATURE_UNITS != 0).then_some(self.unit_log2)
    }

    /// Bytes of a compression unit, 0 without units.
    pub(crate) fn unit_bytes(&self) -> u32 {
        self.units().map_or(0, |l| (BS as u32) << l)
    }

    /// Whether node MACs are portable (FORMAT.md §6.2).
    pub(crate) fn portable_nodes(&self) -> bool {
        self.features & FEATURE_PORTABLE_NODES != 0
    }

    /// Encodes the header block, checksum included.
    pub(crate) fn encode(&self) -> Result<[u8; BS]> {
        let name = self.name.as_bytes();
        if name.len() > MAX_NAME_LEN {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the volume name is {} bytes long, the most is {MAX_NAME_LEN}",
                    name.len()
                ),
            ));
        }
        let mut b = [0u8; BS];
        b[..8].copy_from_slice(&HEADER_MAGIC);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, BS as u32);
        b[16..32].copy_from_slice(&self.volume_id);
        put_u16(&mut b, 32, self.suite.id());
        put_u32(&mut b, 36, BS as u32);
        put_u64(&mut b, 40, self.size);
        put_u64(&mut b, 48, KEYSLOT_OFFSET);
        put_u32(&mut b, 56, MAX_KEYSLOTS as u32);
        put_u32(&mut b, 60, KEYSLOT_SIZE as u32);
        put_u64(&mut b, 64, SUPERBLOCK_OFFSETS[0]);
        put_u64(&mut b, 72, SUPERBLOCK_OFFSETS[1]);
        put_u64(&mut b, 80, LOG_OFFSET);
        put_u64(&mut b, 88, self.log_len);
        put_u64(&mut b, 96, self.regions().data_offset());
        put_u32(&mut b, 104, self.features);
        put_u32(&mut b, 108, self.key_epoch);
        b[OFF_UNIT_LOG2] = self.unit_log2;
        b[112..144].copy_from_slice(&self.key_check);
        put_u16(&mut b, 144, name.len() as u16);
        b[OFF_NAME..OFF_NAME + name.len()].copy_from_slice(name);
        let sum = blake3::hash(&b[..OFF_CHECKSUM]);
        b[OFF_CHECKSUM..].copy_from_slice(sum.as_bytes());
        Ok(b)
    }
}

/// Decodes and checks a header block (the first 4096 bytes of an image).
///
/// Fails with `Corrupt` for a wrong magic, checksum, length or region layout, and with
/// `Unsupported` for another format version, suite or feature flags.
pub fn decode_header(b: &[u8]) -> Result<Header> {
    if b.len() < BS {
        return Err(Error::corrupt(format!(
            "the image is {} bytes long, too short for a qvol header",
            b.len()
        )));
    }
    if b[..8] != HEADER_MAGIC {
        return Err(Error::corrupt("the file is not a qvol image (wrong magic)"));
    }
    let version = get_u32(b, 8);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the image has format version {version}, this build reads versions \
                 {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
            ),
        ));
    }
    if blake3::hash(&b[..OFF_CHECKSUM]).as_bytes() != &b[OFF_CHECKSUM..BS] {
        return Err(Error::corrupt(
            "the qvol header checksum does not match (damaged header)",
        ));
    }
    let layout_ok = get_u32(b, 12) == BS as u32
        && get_u32(b, 36) == BS as u32
        && get_u64(b, 48) == KEYSLOT_OFFSET
        && get_u32(b, 56) == MAX_KEYSLOTS as u32
        && get_u32(b, 60) == KEYSLOT_SIZE as u32
        && get_u64(b, 64) == SUPERBLOCK_OFFSETS[0]
        && get_u64(b, 72) == SUPERBLOCK_OFFSETS[1]
        && get_u64(b, 80) == LOG_OFFSET;
    // Version 1 has a 4 MiB log; versions 2 to 5 a power of two from 4 to 64 MiB (FORMAT.md §2).
    let log_len = get_u64(b, 88);
    let log_ok = match version {
        1 => log_len == MIN_LOG_LEN,
        _ => Regions::valid_log_len(log_len),
    };
    if !layout_ok || !log_ok || get_u64(b, 96) != LOG_OFFSET + log_len {
        return Err(Error::corrupt(format!(
            "the qvol header describes a region layout format version {version} does not have"
        )));
    }
    let flags = get_u32(b, 104);
    let known = if version >= UNITS_VERSION {
        FEATURE_PORTABLE_NODES | FEATURE_UNITS
    } else if version >= SNAPSHOT_VERSION {
        FEATURE_PORTABLE_NODES
    } else {
        0
    };
    if flags & !known != 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("the image uses feature flags {flags:#x} this build does not know"),
        ));
    }
    // Offsets 400..404: the unit size with feature bit 1, zeros without (version 7).
    let unit_log2 = if version >= UNITS_VERSION {
        let log2 = b[OFF_UNIT_LOG2];
        let ok = if flags & FEATURE_UNITS != 0 {
            crate::unit::LOG2_N_RANGE.contains(&log2)
        } else {
            log2 == 0
        };
        if !ok || b[OFF_UNIT_LOG2 + 1..OFF_UNIT_LOG2 + 4] != [0; 3] {
            return Err(Error::corrupt(
                "the qvol header gives an invalid compression unit size",
            ));
        }
        log2
    } else {
        0
    };
    // Version 7 bounds key epochs to 24 bits (FORMAT.md §18.2).
    if version >= UNITS_VERSION && get_u32(b, 108) > KEY_EPOCH_MASK {
        return Err(Error::corrupt(
            "the qvol header gives a key epoch beyond 2^24 - 1",
        ));
    }
    let suite_id = get_u16(b, 32);
    let suite = CipherSuite::from_id(suite_id).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!("the image uses unknown cipher suite id {suite_id}"),
        )
    })?;
    let size = get_u64(b, 40);
    if size == 0 || size % BLOCK_SIZE != 0 || size > MAX_VOLUME_SIZE {
        return Err(Error::corrupt(format!(
            "the header gives an invalid volume size of {size} bytes"
        )));
    }
    let name_len = usize::from(get_u16(b, 144));
    if name_len > MAX_NAME_LEN {
        return Err(Error::corrupt(format!(
            "the header gives a name length of {name_len} bytes"
        )));
    }
    let name = std::str::from_utf8(&b[OFF_NAME..OFF_NAME + name_len])
        .map_err(|_| Error::corrupt("the volume name in the header is not UTF-8"))?
        .to_owned();
    Ok(Header {
        version,
        log_len,
        volume_id: get_array(b, 16),
        suite,
        size,
        name,
        key_check: get_array(b, 112),
        features: flags,
        // Reserved (zero) before version 5.
        key_epoch: if version >= REKEY_VERSION {
            get_u32(b, 108)
        } else {
            0
        },
        unit_log2,
    })
}

/// Encodes the keyslot area (8 slots x 4096 bytes) from at most 8 blobs: blob `i` goes to
/// slot `i`, an empty blob leaves its slot free.
pub fn encode_keyslots(slots: &[Vec<u8>]) -> Result<Vec<u8>> {
    if slots.len() > MAX_KEYSLOTS {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} keyslots given, a volume holds at most {MAX_KEYSLOTS}",
                slots.len()
            ),
        ));
    }
    let mut area = vec![0u8; MAX_KEYSLOTS * KEYSLOT_SIZE];
    for (i, blob) in slots.iter().enumerate() {
        if blob.len() > MAX_KEYSLOT_LEN {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "keyslot {i} is {} bytes long; a slot holds at most {MAX_KEYSLOT_LEN}",
                    blob.len()
                ),
            ));
        }
        let at = i * KEYSLOT_SIZE;
        put_u32(&mut area, at, blob.len() as u32);
        area[at + 4..at + 4 + blob.len()].copy_from_slice(blob);
    }
    Ok(area)
}

/// Decodes the keyslot area into its 8 slots, in slot order: an empty blob is a free slot.
pub fn decode_keyslots(area: &[u8]) -> Result<Vec<Vec<u8>>> {
    if area.len() < MAX_KEYSLOTS * KEYSLOT_SIZE {
        return Err(Error::corrupt("the keyslot area is truncated"));
    }
    let mut slots = Vec::with_capacity(MAX_KEYSLOTS);
    for i in 0..MAX_KEYSLOTS {
        let at = i * KEYSLOT_SIZE;
        let len = get_u32(area, at) as usize;
        if len > MAX_KEYSLOT_LEN {
            return Err(Error::corrupt(format!(
                "keyslot {i} claims {len} bytes, more than a slot holds"
            )));
        }
        slots.push(area[at + 4..at + 4 + len].to_vec());
    }
    Ok(slots)
}

/// Reads the header block and keyslot area (36 KiB) from `storage`; returns the decoded
/// header and the whole area (which the superblock hashes).
pub(crate) fn read_header_area(storage: &dyn Storage) -> Result<(Header, Vec<u8>)> {
    let len = storage
        .len()
        .map_err(|e| Error::io("cannot get the length of the image", e))?;
    if len < Regions::V1.data_offset() {
        return Err(Error::corrupt(format!(
            "the image is {len} bytes long, too short for a qvol volume"
        )));
    }
    let mut area = vec![0u8; HEADER_AREA_LEN];
    storage
        .read_exact_at(&mut area, 0)
        .map_err(|e| Error::io("cannot read the qvol header", e))?;
    let header = match decode_header(&area[..BS]) {
        Ok(header) => header,
        // A header change cut while the new area was written in place (FORMAT.md §3.1,
        // step 4) can leave a torn header block: the staged copy, which the newest
        // superblock names, is the header that counts then (the open verifies it).
        Err(e) => match unverified_staged_area(storage).map(|s| decode_header(&s[..BS])) {
            Some(Ok(staged)) => staged,
            _ => return Err(e),
        },
    };
    if len < header.regions().data_offset() {
        return Err(Error::corrupt(format!(
            "the image is {len} bytes long, shorter than its {}-byte log needs",
            header.log_len
        )));
    }
    Ok((header, area))
}

/// Reads the header and keyslots without any key: for `qvol info` and to find one's keyslot.
///
/// While a change of the keyslots or the header is in flight (FORMAT.md §3.1) they come from
/// the staged copy that the newest superblock names (what is in place may be old or torn).
/// Nothing here is verified (that needs the key): a wrong guess only changes which slots are
/// tried, and [`crate::Volume::open`] checks what it accepts against the MAC'd superblock.
pub fn read_header(storage: &dyn Storage) -> Result<HeaderInfo> {
    let (on_disk, area) = read_header_area(storage)?;
    let (header, area) = match unverified_staged_area(storage) {
        Some(staged) => match decode_header(&staged[..BS]) {
            Ok(h) if h.volume_id == on_disk.volume_id => (h, staged),
            _ => (on_disk, area),
        },
        None => (on_disk, area),
    };
    let keyslots = decode_keyslots(&area[BS..])?;
    Ok(HeaderInfo {
        format_version: header.version,
        log_len: header.log_len,
        volume_id: header.volume_id,
        suite: header.suite,
        key_epoch: header.key_epoch,
        size: header.size,
        unit_bytes: header.unit_bytes(),
        name: header.name,
        keyslots,
    })
}

/// The staged header area, if the newest (unverified) superblock names one and the staged
/// copy matches its hash: then it is what counts (FORMAT.md §3.1).
fn unverified_staged_area(storage: &dyn Storage) -> Option<Vec<u8>> {
    let sb = SUPERBLOCK_OFFSETS
        .iter()
        .filter_map(|&off| {
            let mut b = [0u8; SUPERBLOCK_LEN];
            storage.read_exact_at(&mut b, off).ok()?;
            Superblock::decode(&b).ok()
        })
        .max_by_key(|sb| sb.generation)?;
    if sb.staged_keyslots == 0 {
        return None;
    }
    read_staged(storage, &sb).ok()
}

/// Reads the header area (header block and keyslot area) staged at `sb.staged_keyslots` and
/// checks it against `sb.staged_hash`: `Integrity` if it does not match.
pub(crate) fn read_staged(storage: &dyn Storage, sb: &Superblock) -> Result<Vec<u8>> {
    let mut staged = vec![0u8; HEADER_AREA_LEN];
    storage
        .read_exact_at(&mut staged, sb.staged_keyslots * BLOCK_SIZE)
        .map_err(|e| Error::io("cannot read the staged header area", e))?;
    if blake3::hash(&staged) != blake3::Hash::from(sb.staged_hash) {
        return Err(Error::integrity(
            "the staged header area does not match the superblock",
        ));
    }
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: FORMAT_VERSION,
            log_len: 16 << 20,
            volume_id: [7; 16],
            suite: CipherSuite::Aegis256,
            size: 1 << 30,
            name: "vm-disk é".into(),
            key_check: [9; 32],
            features: FEATURE_PORTABLE_NODES,
            key_epoch: 3,
            unit_log2: 0,
        }
    }

    #[test]
    fn header_round_trips() {
        let b = sample().encode().unwrap();
        assert_eq!(decode_header(&b).unwrap(), sample());
    }

    #[test]
    fn any_flipped_byte_is_rejected() {
        let b = sample().encode().unwrap();
        for i in (0..BS).step_by(97) {
            let mut c = b;
            c[i] ^= 1;
            assert!(decode_header(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn version_1_has_a_4_mib_log_version_2_a_power_of_two() {
        let mut v1 = sample();
        v1.version = 1;
        v1.features = 0;
        v1.key_epoch = 0;
        v1.log_len = MIN_LOG_LEN;
        assert_eq!(decode_header(&v1.encode().unwrap()).unwrap(), v1);
        v1.log_len = 16 << 20;
        assert_eq!(
            decode_header(&v1.encode().unwrap()).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut v2 = sample();
        for bad in [2 << 20, 5 << 20, 128 << 20] {
            v2.log_len = bad;
            assert_eq!(
                decode_header(&v2.encode().unwrap()).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "log of {bad} bytes"
            );
        }
        let mut v3 = sample();
        v3.version = 3;
        v3.key_epoch = 0;
        // The portable-node flag is a version-4 flag.
        assert_eq!(
            decode_header(&v3.encode().unwrap()).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        v3.features = 0;
        assert_eq!(decode_header(&v3.encode().unwrap()).unwrap(), v3);
        let mut v6 = sample();
        v6.version = FORMAT_VERSION + 1;
        assert_eq!(
            decode_header(&v6.encode().unwrap()).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let mut unknown = sample();
        unknown.features = 4;
        assert_eq!(
            decode_header(&unknown.encode().unwrap())
                .unwrap_err()
                .kind(),
            ErrorKind::Unsupported
        );
    }

    /// Compression units (FORMAT.md §18.2): bit 1 with `log2 N` at offset 400, version 7 on.
    #[test]
    fn compression_units_are_a_version_7_feature() {
        let mut h = sample();
        h.features |= FEATURE_UNITS;
        h.unit_log2 = 2;
        let decoded = decode_header(&h.encode().unwrap()).unwrap();
        assert_eq!(decoded, h);
        assert_eq!(decoded.units(), Some(2));
        // Outside 1..=4, or a size without the flag: corrupt.
        for (features, log2) in [
            (h.features, 0),
            (h.features, 5),
            (FEATURE_PORTABLE_NODES, 2),
        ] {
            let mut bad = h.clone();
            bad.features = features;
            bad.unit_log2 = log2;
            assert_eq!(
                decode_header(&bad.encode().unwrap()).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "features {features:#x}, log2 {log2}"
            );
        }
        // The flag before version 7: unknown.
        let mut old = h.clone();
        old.version = 6;
        assert_eq!(
            decode_header(&old.encode().unwrap()).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn foreign_files_are_corrupt() {
        assert_eq!(
            decode_header(&[0u8; BS]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            decode_header(&[0u8; 10]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn long_names_are_refused() {
        let mut h = sample();
        h.name = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(h.encode().unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn keyslots_round_trip() {
        let slots = vec![vec![1u8; 10], vec![], vec![2u8; MAX_KEYSLOT_LEN]];
        let area = encode_keyslots(&slots).unwrap();
        let mut all = slots.clone();
        all.resize(MAX_KEYSLOTS, Vec::new());
        assert_eq!(decode_keyslots(&area).unwrap(), all);
        assert!(encode_keyslots(&[vec![0u8; MAX_KEYSLOT_LEN + 1]]).is_err());
        assert!(encode_keyslots(&vec![vec![1u8]; 9]).is_err());
        let mut bad = area.clone();
        put_u32(&mut bad, 0, 5000);
        assert!(decode_keyslots(&bad).is_err());
    }
}
