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
}

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
}
