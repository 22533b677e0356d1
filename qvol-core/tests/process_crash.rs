//! The process-crash half of the durability contract: a write acknowledged to the caller
//! survives a kill -9 of the process, without any flush (the host page cache survives).
//!
//! The test re-executes its own binary as a child (`child_writer`, ignored in normal runs)
//! that opens a volume file, writes without ever flushing and prints `WROTE <i>` after each
//! completed write. The parent kills it with SIGKILL at a random moment, drains the pipe,
//! reopens the file and checks that every reported write is there. The one write that may
//! have been in flight may or may not be.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{BlockHistory, SECTOR};
use qvol_core::storage::FileStorage;

const VOLUME_SIZE: u64 = 4 << 20;
const ENV_IMAGE: &str = "QVOL_TEST_CHILD_IMAGE";
const ENV_ROUND: &str = "QVOL_TEST_CHILD_ROUND";

/// The `i`-th write of round `round`: (offset, data). Mixes sub-block, single-block and
/// multi-block writes at 512-byte alignment.
fn nth_write(round: u64, i: u64) -> (u64, Vec<u8>) {
    let r = common::pattern((round << 32) | i, 16);
    let pick = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
    let pick2 = u64::from_le_bytes(r[8..].try_into().unwrap_or_default());
    let total = VOLUME_SIZE / SECTOR;
    let sectors = match pick % 4 {
        0 => 1 + pick2 % 7,
        1 => 8,
        2 => 8 * (1 + pick2 % 4),
        _ => 1 + pick2 % 128,
    };
    let sector = (pick2 >> 8) % (total - sectors + 1);
    let data = common::pattern((round << 40) ^ i ^ 0xabcd, (sectors * SECTOR) as usize);
    (sector * SECTOR, data)
}

/// The child: writes forever (until killed), reporting each completed write.
#[test]
#[ignore = "run by process_crash_keeps_acknowledged_writes as a child process"]
fn child_writer() {
    let path = std::env::var(ENV_IMAGE).expect("the parent sets the image path");
    let round: u64 = std::env::var(ENV_ROUND)
        .expect("the parent sets the round")
        .parse()
        .expect("a number");
    let storage = FileStorage::open(&path, true).expect("open the image file");
    let vol = common::open(Arc::new(storage)).expect("open the volume");
    println!("OPENED");
    for i in 0.. {
        let (offset, data) = nth_write(round, i);
        vol.write_at(offset, &data).expect("write");
        // stdout is line-buffered: the line is in the pipe once println! returns.
        println!("WROTE {i}");
    }
}

/// Runs one child for `round` on `path`; returns how many writes it reported complete.
fn run_child_and_kill(path: &std::path::Path, round: u64, kill_after: u64) -> u64 {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args([
            "child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_IMAGE, path)
        .env(ENV_ROUND, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child writer");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut reported = 0u64;
    let mut opened = false;
    let mut killed = false;
    let mut other = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("read the child's stdout");
        // libtest prints "test child_writer ... " without a newline first.
        if line.ends_with("OPENED") {
            opened = true;
        } else if let Some(i) = line.strip_prefix("WROTE ") {
            let i: u64 = i.parse().expect("the child prints numbers");
            assert_eq!(i, reported, "writes are reported in order");
            reported += 1;
            if reported >= kill_after && !killed {
                // Child::kill sends SIGKILL; the lines still in the pipe are drained below.
                child.kill().expect("SIGKILL the child");
                killed = true;
            }
        } else if other.len() < 50 {
            other.push(line);
        }
    }
    let status = child.wait().expect("reap the child");
    assert!(
        opened,
        "the child never opened the volume ({status}): {other:#?}"
    );
    assert!(
        killed,
        "the child exited by itself ({status}) after {reported} writes: {other:#?}"
    );
    reported
}

#[test]
fn process_crash_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("v.qvol");
    let vol = common::create(
        Arc::new(FileStorage::create_new(&path).expect("create the image file")),
        VOLUME_SIZE,
    );
    vol.close().expect("close after create");

    let mut model = BlockHistory::new(VOLUME_SIZE);
    // Kill points: early, mid, and after enough writes to have filled part of the log.
    for (round, kill_after) in [(1u64, 1u64), (2, 37), (3, 400), (4, 1500)] {
        let reported = run_child_and_kill(&path, round, kill_after);
        for i in 0..reported {
            let (offset, data) = nth_write(round, i);
            model.apply(offset, &data);
        }
        let (offset, data) = nth_write(round, reported);
        let mut in_flight = model.clone();
        in_flight.apply(offset, &data);

        let storage = FileStorage::open(&path, true).expect("reopen the image file");
        let vol = common::open(Arc::new(storage))
            .unwrap_or_else(|e| panic!("round {round}: the volume does not open: {e:?}"));
        for lbn in 0..model.len() {
            let got = common::read_block(&vol, lbn as u64)
                .unwrap_or_else(|e| panic!("round {round}: block {lbn} fails: {e:?}"));
            assert!(
                got == model.current(lbn) || got == in_flight.current(lbn),
                "round {round}: block {lbn} lost a write the child had reported \
                 ({reported} reported)"
            );
        }
        // The next round starts from what is on disk now.
        model = BlockHistory::new(VOLUME_SIZE);
        for lbn in 0..model.len() {
            let got = common::read_block(&vol, lbn as u64).expect("read again");
            model.apply(lbn as u64 * common::BS as u64, &got);
        }
        model.make_durable();
        drop(vol);
    }
}
