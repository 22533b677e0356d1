//! The JSON descriptions of snapshots and of check reports: one shape for the control socket
//! (docs/CONTROL.md) and for `qvol snapshot list --json` / `qvol check --json`, so that a
//! served image and a stopped one print the same.

use qvol_core::{CheckReport, Damage, Snapshot, SnapshotUsage, BLOCK_SIZE};
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
