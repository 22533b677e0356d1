//! Tampering with one data block of the image fails reads of that block with an I/O
//! error (logged with its position) while every other block keeps working.

use std::time::Duration;

use blkio::Errno;
use integration::client::{describe, BlkioClient};
use integration::fixture::Fixture;
use integration::pattern;

const BLOCK: usize = 4096;
const REGION: u64 = 1 << 20; // the tampered-with data lives in the first MiB
const OTHER: u64 = 32 << 20; // a block written before, never touched

fn connect(socket: &std::path::Path) -> BlkioClient {
    BlkioClient::connect(socket, 1, false, 2 << 20)
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)))
}

/// 4 KiB blocks of the file that differ between `a` and `b`.
fn changed_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    let n = a.len().max(b.len()) / BLOCK;
    (0..n)
        .filter(|&i| {
            let r = i * BLOCK..(i + 1) * BLOCK;
            a.get(r.clone()) != b.get(r)
        })
        .collect()
}

#[test]
fn a_tampered_block_fails_alone() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("t.qvol", "64M", &key, &[]);
    let mut daemon = f.start_daemon(&image, "w1", &[]).unwrap();
    connect(daemon.socket())
        .write(OTHER, &pattern::make(BLOCK, OTHER, 5))
        .unwrap();
    daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .unwrap();
    let before = std::fs::read(&image).unwrap();
    let mut daemon = f.start_daemon(&image, "w2", &[]).unwrap();
    let region = pattern::make(REGION as usize, 0, 6);
    connect(daemon.socket()).write(0, &region).unwrap();
    daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .unwrap();
    let after = std::fs::read(&image).unwrap();

    // Data blocks are the bulk of what changed; try blocks in the middle of long runs of
    // changed blocks until one flip makes exactly one guest block unreadable.
    let changed = changed_blocks(&before, &after);
    assert!(
        changed.len() >= 256,
        "only {} blocks changed",
        changed.len()
    );
    let candidates: Vec<usize> = changed
        .windows(9)
        .filter(|w| w[8] - w[0] == 8)
        .map(|w| w[4])
        .step_by(37)
        .take(6)
        .collect();
    for (n, victim) in candidates.into_iter().enumerate() {
        let copy = f.path(&format!("tampered-{n}.qvol"));
        let mut bytes = after.clone();
        bytes[victim * BLOCK + 100] ^= 0x01;
        std::fs::write(&copy, &bytes).unwrap();
        let Ok(daemon) = f.start_daemon(&copy, &format!("t{n}"), &[]) else {
            continue; // hit metadata that is checked at open: try another block
        };
        let mut c = connect(daemon.socket());
        let mut failed = Vec::new();
        for b in 0..REGION / BLOCK as u64 {
            let offset = b * BLOCK as u64;
            match c.read(offset, BLOCK) {
                Ok(data) => assert_eq!(
                    data,
                    region[offset as usize..offset as usize + BLOCK],
                    "wrong data at {offset}"
                ),
                Err(e) => {
                    assert_eq!(e, Errno::IO);
                    failed.push(offset);
                }
            }
        }
        if failed.len() != 1 {
            continue; // metadata node or nothing: try another block
        }
        assert_eq!(
            c.read(OTHER, BLOCK).unwrap(),
            pattern::make(BLOCK, OTHER, 5)
        );
        c.write(failed[0], &[9; BLOCK]).unwrap();
        assert_eq!(c.read(failed[0], BLOCK).unwrap(), vec![9; BLOCK]);
        let log = daemon.log_text();
        assert!(log.contains("integrity"), "{log}");
        assert!(
            log.contains(&format!("sector {}", failed[0] / 512)),
            "{log}"
        );
        return;
    }
    panic!("no single-byte change of a data block made exactly one block fail");
}
