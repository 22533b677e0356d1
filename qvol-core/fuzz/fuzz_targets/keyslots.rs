//! The keyslot-area parser (docs/FORMAT.md §3) on arbitrary bytes: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qvol_core::header::decode_keyslots(data);
});
