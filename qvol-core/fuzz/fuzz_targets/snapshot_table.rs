//! The snapshot table block parser (docs/FORMAT.md §8.1) on arbitrary bytes: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qvol_core::decode_snapshot_table_block(data);
    // The same bytes as a whole block (padded or cut), so that the entries are reached.
    let mut block = vec![0u8; qvol_core::BLOCK_SIZE as usize];
    let n = data.len().min(block.len());
    block[..n].copy_from_slice(&data[..n]);
    let _ = qvol_core::decode_snapshot_table_block(&block);
});
