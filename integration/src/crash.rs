//! Kill -9 under load, the workload of the durability tests (`tests/blkio_crash.rs`,
//! `tests/rbd_*.rs`): a pass writes a version of every block with many requests in flight
//! and may kill the daemon after some completions; [`verify`] then checks that every write
//! seen complete reads back and that every other block reads as one of the versions written
//! to it (or zeros), never as an error.

use std::collections::HashSet;
use std::path::Path;

use crate::client::{describe, BlkioClient};
use crate::daemon::Daemon;
use crate::pattern;

/// The block size written and checked.
pub const BLOCK: usize = 4096;
/// Requests in flight during a pass.
pub const DEPTH: usize = 16;

/// A client with room for [`DEPTH`] blocks in flight.
pub fn connect(socket: &Path) -> BlkioClient {
    BlkioClient::connect(socket, 1, false, BLOCK * DEPTH)
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)))
}

/// Writes `seed` over the first `blocks` blocks; kills the daemon after `kill_after`
/// completions if given. Returns the offsets whose writes completed.
pub fn write_pass(
    daemon: &mut Daemon,
    blocks: u64,
    seed: u64,
    kill_after: Option<usize>,
) -> HashSet<u64> {
    let offsets: Vec<u64> = (0..blocks).map(|b| b * BLOCK as u64).collect();
    let mut done = HashSet::new();
    let mut client = connect(daemon.socket());
    let result = client.queue(0).run_batch(
        &offsets,
        BLOCK,
        DEPTH,
        true,
        |i, buf| pattern::fill(buf, offsets[i], seed),
        |i, _, r| {
            r.unwrap_or_else(|e| panic!("write at {} failed: {e}", offsets[i]));
            done.insert(offsets[i]);
            if kill_after.is_some_and(|k| done.len() >= k) {
                daemon.kill9();
                return false;
            }
            true
        },
    );
    result.unwrap();
    done
}

/// Each of the first `blocks` blocks must read as the last version whose write completed,
/// or as a later one that was in flight; blocks never completed read as zeros or an
/// in-flight version. `versions` are (seed, completed offsets), oldest first.
pub fn verify(client: &mut BlkioClient, blocks: u64, versions: &[(u64, HashSet<u64>)]) {
    let zeros = vec![0u8; BLOCK];
    for b in 0..blocks {
        let offset = b * BLOCK as u64;
        let data = client
            .read(offset, BLOCK)
            .unwrap_or_else(|e| panic!("block at {offset} reads as an error: {e}"));
        let last_done = versions
            .iter()
            .rposition(|(_, done)| done.contains(&offset));
        // Allowed: the last completed version, or any version written after it (which
        // may have been in flight when the daemon died).
        let from = last_done.unwrap_or(0);
        let mut allowed: Vec<Vec<u8>> = versions[from..]
            .iter()
            .map(|(seed, _)| pattern::make(BLOCK, offset, *seed))
            .collect();
        if last_done.is_none() {
            allowed.push(zeros.clone());
        }
        assert!(
            allowed.contains(&data),
            "block at {offset} holds none of the versions written to it (last completed: {:?})",
            last_done.map(|i| versions[i].0)
        );
    }
}
