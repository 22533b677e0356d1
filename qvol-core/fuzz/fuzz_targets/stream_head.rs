//! The send stream's head (docs/FORMAT.md §15) on arbitrary bytes, and what a receiver asks
//! of a head it read: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok((head, _)) = qvol_core::read_stream_head(&mut r) {
        let _ = head.volume_id();
        let _ = head.header_info();
        let _ = head.create_options();
    }
});
