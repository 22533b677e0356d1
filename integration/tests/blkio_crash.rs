//! Kill -9 under load (docs/SECURITY.md, durability contract): a client writes with many
//! requests in flight, the daemon is killed with SIGKILL, restarted, and then every write
//! the client saw complete reads back, every other block reads as one of the versions
//! written to it, and no block reads as an error.

use std::collections::HashSet;

use integration::client::{describe, BlkioClient};
use integration::fixture::Fixture;
use integration::pattern;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 2048; // 8 MiB
const DEPTH: usize = 16;

fn connect(socket: &std::path::Path) -> BlkioClient {
    BlkioClient::connect(socket, 1, false, BLOCK * DEPTH)
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)))
}

/// Writes `seed` over every block; kills the daemon after `kill_after` completions if
/// given. Returns the offsets whose writes completed.
fn write_pass(
    daemon: &mut integration::daemon::Daemon,
    seed: u64,
    kill_after: Option<usize>,
) -> HashSet<u64> {
    let offsets: Vec<u64> = (0..BLOCKS).map(|b| b * BLOCK as u64).collect();
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

#[test]
fn every_completed_write_survives_kill_9_and_nothing_reads_as_an_error() {
    let f = Fixture::new();
    let key = f.new_key("vm1");
    let image = f.create_image("crash.qvol", "16M", &key, &[]);
    let mut daemon = f.start_daemon(&image, "c0", &[]).unwrap();
    // Round 0: kill in the middle of the first writes (old content: zeros).
    let first = write_pass(&mut daemon, 1, Some(700));
    let mut versions: Vec<(u64, HashSet<u64>)> = vec![(1, first)];
    for (round, kill_after) in [(1u64, 900usize), (2, 1500), (3, 300)] {
        daemon = f.start_daemon(&image, &format!("c{round}"), &[]).unwrap();
        let seed = round + 1;
        verify(&mut connect(daemon.socket()), &versions);
        let done = write_pass(&mut daemon, seed, Some(kill_after));
        versions.push((seed, done));
    }
    let daemon = f.start_daemon(&image, "final", &[]).unwrap();
    verify(&mut connect(daemon.socket()), &versions);
}

/// Each block must read as the last version whose write completed, or as a later one
/// that was in flight; blocks never completed read as zeros or an in-flight version.
fn verify(client: &mut BlkioClient, versions: &[(u64, HashSet<u64>)]) {
    let zeros = vec![0u8; BLOCK];
    for b in 0..BLOCKS {
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
