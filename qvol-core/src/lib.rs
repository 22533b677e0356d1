//! qvol-core: the `.qvol` format, cipher suites, block map, commit protocol and the
//! `Volume` API. Knows nothing of virtio or of key storage.
//!
//! The on-disk format is specified in `docs/FORMAT.md`; each structure is encoded and decoded
//! in one module: [`header`], [`superblock`], [`node`], [`wal`].
// The exceptions are `secret.rs` (mlock and madvise of the pages holding keys) and the
// `sync_file_range` call of `storage/file.rs`.
#![deny(unsafe_code)]

mod alloc;
mod check;
mod claim;
mod commit;
mod compress;
mod datablock;
pub mod error;
mod extents;
pub mod failpoint;
mod fasthash;
mod group;
pub mod header;
mod info;
mod key;
mod keyslots;
mod layout;
mod map;
pub mod node;
mod read;
mod reencrypt;
mod replay;
mod resize;
mod rewrite;
mod rw;
mod secret;
pub mod send;
mod snapshot;
pub mod storage;
mod subkeys;
pub mod suite;
pub mod superblock;
mod tree;
pub mod unit;
mod volume;
pub mod wal;
mod writeback;

pub use check::{CheckReport, Damage};
pub use compress::CompressionUsage;
pub use error::{Error, ErrorKind, Result};
pub use extents::Extent;
pub use header::{decode_header, decode_keyslots, read_header, HeaderInfo};
pub use info::{check_level, Compression, CreateOptions, VolumeInfo};
pub use key::VolumeKey;
pub use keyslots::{key_holder_proof, key_holder_proof_matches, keyslot_change_proof};
pub use layout::{
    BLOCK_SIZE, FORMAT_VERSION, KEYSLOT_SIZE, MAX_KEYSLOTS, MAX_KEYSLOT_LEN, MAX_NAME_LEN,
    MAX_VOLUME_SIZE, SECTOR_SIZE,
};
pub use node::decode_map_node;
pub use reencrypt::{seal_key_for_reencryption, Reencryption, LEAF_SPAN_BYTES};
pub use resize::ResizePlan;
pub use send::{read_stream_head, send_snapshot, SendSummary, StreamHead};
pub use snapshot::{
    decode_snapshot_table_block, validate_name as validate_snapshot_name, Snapshot, SnapshotUsage,
    MAX_SNAPSHOTS, MAX_SNAPSHOT_NAME,
};
pub use suite::CipherSuite;
pub use superblock::Superblock;
pub use volume::{CommitCheck, CommitHook, CommitPoint, OpenOptions, Volume};
pub use wal::LogRecord;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod keyslot_crash_tests;
#[cfg(test)]
mod volume_tests;
