//! Kill -9 under load (docs/SECURITY.md, durability contract): a client writes with many
//! requests in flight, the daemon is killed with SIGKILL, restarted, and then every write
//! the client saw complete reads back, every other block reads as one of the versions
//! written to it, and no block reads as an error (`integration::crash`).

use std::collections::HashSet;

use integration::crash::{connect, verify, write_pass};
use integration::fixture::Fixture;

const BLOCKS: u64 = 2048; // 8 MiB

#[test]
fn every_completed_write_survives_kill_9_and_nothing_reads_as_an_error() {
    let f = Fixture::new();
    let key = f.new_key("vm1");
    let image = f.create_image("crash.qvol", "16M", &key, &[]);
    let mut daemon = f.start_daemon(&image, "c0", &[]).unwrap();
    // Round 0: kill in the middle of the first writes (old content: zeros).
    let first = write_pass(&mut daemon, BLOCKS, 1, Some(700));
    let mut versions: Vec<(u64, HashSet<u64>)> = vec![(1, first)];
    for (round, kill_after) in [(1u64, 900usize), (2, 1500), (3, 300)] {
        daemon = f.start_daemon(&image, &format!("c{round}"), &[]).unwrap();
        let seed = round + 1;
        verify(&mut connect(daemon.socket()), BLOCKS, &versions);
        let done = write_pass(&mut daemon, BLOCKS, seed, Some(kill_after));
        versions.push((seed, done));
    }
    let daemon = f.start_daemon(&image, "final", &[]).unwrap();
    verify(&mut connect(daemon.socket()), BLOCKS, &versions);
}
