//! Re-encryption under a new, independent volume key (docs/FORMAT.md §17): the start
//! switches every map node, the superblocks and the log to the new key in one crash-safe
//! header change; steps then re-seal the data blocks of the live disk and of every snapshot,
//! a range of logical blocks at a time, each step one commit; the finish drops the old key
//! from the image and punches every free block.

use crate::error::{Error, ErrorKind, Result};
use crate::key::VolumeKey;
use crate::layout::*;
use crate::suite::CipherSuite;
use crate::volume::Volume;

/// A re-encryption in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reencryption {
    /// The key epoch the data is moving away from.
    pub from_epoch: u32,
    /// The key epoch new data (and every re-sealed block) is under.
    pub to_epoch: u32,
    /// The suite of the old key epoch.
    pub from_suite: CipherSuite,
    /// The suite of the new key epoch.
    pub to_suite: CipherSuite,
    /// Map leaves done: every logical block below `done * 64` is under the new key in the
    /// live disk and every snapshot.
    pub done: u64,
    /// Map leaves in all (the disk size in units of 64 logical blocks, 256 KiB).
    pub total: u64,
}

/// Bytes of logical disk one map leaf covers.
pub const LEAF_SPAN_BYTES: u64 = FANOUT * BLOCK_SIZE;

impl Reencryption {
    /// Bytes of the disk done.
    pub fn done_bytes(&self) -> u64 {
        self.done.min(self.total) * LEAF_SPAN_BYTES
    }

    /// Bytes of the disk in all.
    pub fn total_bytes(&self) -> u64 {
        self.total * LEAF_SPAN_BYTES
    }
}

/// `new_key` sealed under `current` (the volume's key now) for a process serving the volume:
/// what [`Volume::start_reencryption_sealed`] takes. `nonce` is a one-time value that process
/// issued; the seal also binds `slots` (the keyslots that will wrap `new_key`), so neither
/// can be swapped on the way.
pub fn seal_key_for_reencryption(
    current: &VolumeKey,
    volume_id: [u8; 16],
    nonce: &[u8; 16],
    slots: &[Vec<u8>],
    new_key: &VolumeKey,
) -> Result<Vec<u8>> {
    let _ = (current, volume_id, nonce, slots, new_key);
    Err(not_yet())
}

fn not_yet() -> Error {
    Error::new(ErrorKind::Unsupported, "re-encryption is not built yet")
}

impl Volume {
    /// The re-encryption in progress, if any.
    pub fn reencryption(&self) -> Option<Reencryption> {
        None
    }

    /// The suite new data is sealed with.
    pub fn data_suite(&self) -> CipherSuite {
        self.header.suite
    }

    /// Starts re-encrypting the volume under `new_key` (fresh, from
    /// [`VolumeKey::generate`]) with `suite`. `slots` replace the keyslot area and must wrap
    /// `new_key`; `expected` is [`Volume::keyslots_hash`] of the area they were planned from
    /// (`Refused` if it changed). Crash-safe: after a crash the volume opens under the old
    /// key and nothing changed, or it is re-encrypting. Writable volumes of format version 4
    /// or later; `InvalidInput` if a re-encryption is already in progress.
    pub fn start_reencryption(
        &self,
        new_key: &VolumeKey,
        suite: CipherSuite,
        slots: &[Vec<u8>],
        expected: &[u8; 32],
    ) -> Result<Reencryption> {
        let _ = (new_key, suite, slots, expected);
        Err(not_yet())
    }

    /// [`Volume::start_reencryption`] for a caller that is not trusted with the volume: the
    /// new key comes sealed by [`seal_key_for_reencryption`] with `nonce` (which the caller
    /// of this method issued and now retires); `Refused` unless it opens under this volume's
    /// key with these `slots`.
    pub fn start_reencryption_sealed(
        &self,
        sealed: &[u8],
        nonce: &[u8; 16],
        suite: CipherSuite,
        slots: &[Vec<u8>],
        expected: &[u8; 32],
    ) -> Result<Reencryption> {
        let _ = (sealed, nonce, suite, slots, expected);
        Err(not_yet())
    }

    /// Re-seals the data of up to `max_leaves` map leaves (64 logical blocks each) of the live
    /// disk and of every snapshot, in one commit, and finishes the re-encryption once
    /// everything is done. Returns the progress, or `None` when the re-encryption is
    /// finished (by this call). I/O waits meanwhile. `InvalidInput` if none is in progress.
    pub fn reencrypt_step(&self, max_leaves: u64) -> Result<Option<Reencryption>> {
        let _ = max_leaves;
        Err(not_yet())
    }
}
