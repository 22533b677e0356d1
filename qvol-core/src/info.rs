//! What a caller passes to create a volume and what it can learn about an open one.

use crate::suite::CipherSuite;

/// Parameters of [`crate::Volume::create`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual disk size in bytes: a multiple of 4096, at most [`crate::MAX_VOLUME_SIZE`].
    pub size: u64,
    /// Cipher suite of the data blocks.
    pub suite: CipherSuite,
    /// A name (at most [`crate::MAX_NAME_LEN`] bytes of UTF-8).
    pub name: String,
    /// The volume id: random, and the one the keyslots were wrapped for.
    pub volume_id: [u8; 16],
    /// Keyslot blobs (at most [`crate::MAX_KEYSLOTS`], each at most
    /// [`crate::MAX_KEYSLOT_LEN`] bytes).
    pub keyslots: Vec<Vec<u8>>,
    /// The key epoch of the key (0 for a new volume; a re-encrypted sender's for an image
    /// made to receive its stream, [`crate::StreamHead::create_options`]).
    pub key_epoch: u32,
    /// Compression units (FORMAT.md §18): `None` makes a volume that never compresses.
    pub compression: Option<Compression>,
}

/// The compression of a volume (FORMAT.md §18): the unit size, fixed at create, and the
/// zstd level new whole-unit writes use (`None`: off; changed with
/// [`crate::Volume::set_compression`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compression {
    /// `log2` of the blocks in a unit: 1..=4 (8 to 64 KiB).
    pub unit_log2: u8,
    /// The zstd level of new writes, or `None` for no compression of new writes.
    pub level: Option<i8>,
}

impl Compression {
    /// 16 KiB units (ZFS's default `volblocksize` for zvols; FORMAT.md §18.1).
    pub const DEFAULT_UNIT_LOG2: u8 = 2;
    /// zstd's default level.
    pub const DEFAULT_LEVEL: i8 = 3;

    /// Checks the unit size and the level: `InvalidInput` with one sentence if either is
    /// outside what the format and zstd take.
    pub fn check(self) -> crate::Result<Self> {
        if !crate::unit::LOG2_N_RANGE.contains(&self.unit_log2) {
            return Err(crate::Error::new(
                crate::ErrorKind::InvalidInput,
                format!(
                    "a compression unit is 8, 16, 32 or 64 KiB, not {} bytes",
                    4096u64 << self.unit_log2.min(32)
                ),
            ));
        }
        if let Some(level) = self.level {
            check_level(level)?;
        }
        Ok(self)
    }
}

/// Checks a zstd level: within what zstd accepts (`zstd -1`..`-22`, and its fast levels down
/// to −7 here; FORMAT.md §18.2).
pub fn check_level(level: i8) -> crate::Result<()> {
    if !(MIN_LEVEL..=MAX_LEVEL).contains(&level) || level == 0 {
        return Err(crate::Error::new(
            crate::ErrorKind::InvalidInput,
            format!("zstd levels are {MIN_LEVEL} to -1 and 1 to {MAX_LEVEL}, not {level}"),
        ));
    }
    Ok(())
}

/// The fastest zstd level taken (zstd's negative levels trade ratio for speed).
pub const MIN_LEVEL: i8 = -7;
/// The strongest zstd level.
pub const MAX_LEVEL: i8 = 22;

/// A description of an open volume (no secrets).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VolumeInfo {
    /// The format version of the image.
    pub format_version: u32,
    /// The volume's name.
    pub name: String,
    /// The volume id.
    pub volume_id: [u8; 16],
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Cipher suite of the data blocks.
    pub suite: CipherSuite,
    /// The implementation of the suite active on this CPU.
    pub implementation: &'static str,
    /// The generation of the last commit (format version 6: possibly a pipelined one whose
    /// superblock is not durable yet; [`crate::Volume::commit_point`] is the durable one).
    pub generation: u64,
    /// Bytes of the data region in use (data blocks and metadata nodes).
    pub allocated_bytes: u64,
    /// Number of non-empty keyslots.
    pub keyslot_count: usize,
    /// Whether the volume is open read-only.
    pub read_only: bool,
    /// Log records written since the last commit.
    pub log_records: u64,
    /// Bytes of a compression unit (0: the volume was created without compression).
    pub unit_bytes: u32,
    /// The zstd level of new writes (`None`: compression off).
    pub compress_level: Option<i8>,
}
