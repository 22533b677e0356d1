//! The map-node parser (docs/FORMAT.md §6) on arbitrary bytes, at every level: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&level, node)) = data.split_first() else {
        return;
    };
    let _ = qvol_core::node::decode_map_node(node, level % 4);
});
