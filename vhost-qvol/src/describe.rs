//! The JSON descriptions of snapshots, check reports, re-encryptions and compression: one
//! shape for the control socket (docs/CONTROL.md) and for `qvol snapshot list --json` /
//! `qvol check --json` / `qvol reencrypt --status --json` / `qvol info --json`, so that a
//! served image and a stopped one print the same.

use qvol_core::{
    CheckReport, CompressionUsage, Damage, Reencryption, Snapshot, SnapshotUsage, BLOCK_SIZE,
};
use serde_json::{json, Value};

/// A snapshot: `name`, `guid` (hex), `created` (Unix seconds), `generation`.
pub fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "name": s.name,
        "guid": hex::encode(s.guid),
        "created": s.created,
        "generation": s.generation,
    })
}

/// A snapshot with `unique_bytes`: what only it holds (what deleting it frees).
pub fn usage_json(u: &SnapshotUsage) -> Value {
    let mut v = snapshot_json(&u.snapshot);
    v["unique_bytes"] = json!(u.unique_bytes);
    v
}

/// One damage: `tree`, `first_block`/`blocks` and `offset`/`length` (bytes of the disk,
/// `null` when no logical range is affected), `what` (a sentence).
pub fn damage_json(d: &Damage) -> Value {
    json!({
        "tree": d.tree,
        "first_block": d.first_lbn,
        "blocks": d.blocks,
        "offset": d.first_lbn.map(|b| b * BLOCK_SIZE),
        "length": d.first_lbn.map(|_| d.blocks * BLOCK_SIZE),
        "what": d.what,
    })
}

/// A check report: `clean`, `nodes`, `data_blocks`, `snapshots`, `leaked_blocks`, `damage`.
pub fn check_json(r: &CheckReport) -> Value {
    json!({
        "clean": r.is_clean(),
        "nodes": r.nodes,
        "data_blocks": r.data_blocks,
        "snapshots": r.snapshots,
        "leaked_blocks": r.leaked,
        "damage": r.damage.iter().map(damage_json).collect::<Vec<_>>(),
    })
}

/// A re-encryption in progress: `from_cipher`, `to_cipher`, `from_epoch`, `to_epoch`,
/// `done_bytes`, `total_bytes` (of the logical disk) and `percent` (whole percent done).
pub fn reencryption_json(r: &Reencryption) -> Value {
    json!({
        "from_cipher": r.from_suite.name(),
        "to_cipher": r.to_suite.name(),
        "from_epoch": r.from_epoch,
        "to_epoch": r.to_epoch,
        "done_bytes": r.done_bytes(),
        "total_bytes": r.total_bytes(),
        "percent": percent(r),
    })
}

/// Whole percent of `r` done (100 only when every leaf is).
pub fn percent(r: &Reencryption) -> u64 {
    match r.total {
        0 => 100,
        total => r.done.min(total) * 100 / total,
    }
}

/// What compression achieves on the data stored, added to `doc`: `compression_ratio`
/// (logical data blocks per block stored) and `compression_usage` (`unit_lbns`: blocks of
/// the disk stored in compressed units, `unit_blocks`: the blocks those units take,
/// `plain_blocks`: blocks stored uncompressed).
pub fn add_compression_usage(doc: &mut Value, usage: &CompressionUsage) {
    doc["compression_ratio"] = json!(usage.ratio());
    doc["compression_usage"] = json!({
        "unit_lbns": usage.unit_lbns,
        "unit_blocks": usage.unit_blocks,
        "plain_blocks": usage.plain_blocks,
    });
}
