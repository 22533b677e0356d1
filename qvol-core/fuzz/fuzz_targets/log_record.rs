//! The log-record parser (docs/FORMAT.md §9) on arbitrary bytes: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qvol_core::wal::LogRecord::decode(data);
});
