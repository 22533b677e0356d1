//! Reopen-after-damage: a whole image built from arbitrary bytes is opened with a fixed key
//! and read; whatever happens must be an error, never a panic.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qvol_core::storage::MemStorage;
use qvol_core::{Volume, VolumeKey};

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::from_bytes(data.to_vec()));
    let _ = qvol_core::read_header(&*storage);
    if let Ok(vol) = Volume::open(storage, &VolumeKey::from_bytes([7; 32]), true) {
        let mut buf = vec![0u8; 4096];
        let _ = vol.read_at(0, &mut buf);
    }
});
