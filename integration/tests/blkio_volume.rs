//! `vhost-qvol` serving real `.qvol` volumes, driven through libblkio: the daemon and the
//! `qvol` CLI are the workspace binaries (built on first use, see `integration::bins`).

use std::time::Duration;

use blkio::Errno;
use integration::client::{describe, BlkioClient};
use integration::fixture::Fixture;
use integration::pattern;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn connect(socket: &std::path::Path, queues: usize, read_only: bool) -> BlkioClient {
    BlkioClient::connect(socket, queues, read_only, 4 << 20)
        .unwrap_or_else(|e| panic!("connect to {}: {}", socket.display(), describe(&e)))
}

/// A fixture with one key and one 64 MiB image.
fn setup(extra_create: &[&str]) -> (Fixture, std::path::PathBuf) {
    let f = Fixture::new();
    let key = f.new_key("vm1");
    let image = f.create_image("disk.qvol", "64M", &key, extra_create);
    (f, image)
}

#[test]
fn round_trips_survive_a_daemon_restart() {
    let (f, image) = setup(&[]);
    let cases = [
        (0u64, 4096usize),
        (512, 512),
        (MIB + 512, 3072),
        (8 * MIB, 1 << 20),
        (64 * MIB - 8192, 8192),
    ];
    {
        let daemon = f.start_daemon(&image, "d1", &[]).unwrap();
        let mut c = connect(daemon.socket(), 1, false);
        assert_eq!(c.capacity().unwrap(), 64 * MIB);
        for (offset, len) in cases {
            let data = pattern::make(len, offset, 7);
            c.write(offset, &data).unwrap();
            assert_eq!(c.read(offset, len).unwrap(), data, "at {offset}");
        }
        // Never-written space reads as zeros.
        assert_eq!(c.read(32 * MIB, 8192).unwrap(), vec![0; 8192]);
        c.flush().unwrap();
    }
    let daemon = f.start_daemon(&image, "d2", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1, false);
    for (offset, len) in cases {
        assert_eq!(
            c.read(offset, len).unwrap(),
            pattern::make(len, offset, 7),
            "at {offset}"
        );
    }
}

#[test]
fn aegis_volumes_round_trip_too() {
    let (f, image) = setup(&["--cipher", "aegis-256"]);
    let daemon = f.start_daemon(&image, "d", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1, false);
    let data = pattern::make(1 << 20, 0, 8);
    c.write(4096, &data).unwrap();
    assert_eq!(c.read(4096, 1 << 20).unwrap(), data);
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let (f, image) = setup(&[]);
    let daemon = f.start_daemon(&image, "d", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1, false);
    let data = pattern::make(1 << 20, 0, 9);
    c.write(0, &data).unwrap();
    c.discard(0, 64 * 1024).unwrap();
    c.write_zeroes(128 * 1024, 64 * 1024, true).unwrap();
    c.write_zeroes(256 * 1024 + 512, 1024, false).unwrap();
    let back = c.read(0, 1 << 20).unwrap();
    assert!(back[..64 * 1024].iter().all(|&b| b == 0));
    assert_eq!(&back[64 * 1024..128 * 1024], &data[64 * 1024..128 * 1024]);
    assert!(back[128 * 1024..192 * 1024].iter().all(|&b| b == 0));
    assert!(back[256 * 1024 + 512..256 * 1024 + 1536]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        &back[256 * 1024..256 * 1024 + 512],
        &data[256 * 1024..256 * 1024 + 512]
    );
    assert_eq!(&back[256 * 1024 + 1536..], &data[256 * 1024 + 1536..]);
}

#[test]
fn read_only_serving_refuses_writes_and_leaves_the_image_alone() {
    let (f, image) = setup(&[]);
    {
        let daemon = f.start_daemon(&image, "rw", &[]).unwrap();
        let mut c = connect(daemon.socket(), 1, false);
        c.write(0, &pattern::make(8192, 0, 10)).unwrap();
        c.flush().unwrap();
    }
    let before = std::fs::read(&image).unwrap();
    let daemon = f.start_daemon(&image, "ro", &["--read-only"]).unwrap();
    let err = BlkioClient::connect(daemon.socket(), 1, false, 1 << 20).unwrap_err();
    assert_eq!(err.errno(), Errno::ROFS, "{}", describe(&err));
    let mut c = connect(daemon.socket(), 1, true);
    assert_eq!(c.read(0, 8192).unwrap(), pattern::make(8192, 0, 10));
    assert!(c.write(0, &[1; 4096]).is_err());
    drop(c);
    drop(daemon);
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a read-only session changed the image"
    );
}

/// On each queue of `c` (one thread each), writes `blocks` blocks at queue depth `depth`,
/// 16 MiB apart per queue, then reads them back and checks them.
fn write_and_check_every_queue(c: &mut BlkioClient, blocks: u64, depth: usize, tag: u64) {
    std::thread::scope(|s| {
        for (q, mut h) in c.split().into_iter().enumerate() {
            s.spawn(move || {
                let offsets: Vec<u64> = (0..blocks)
                    .map(|i| q as u64 * 16 * MIB + i * 4096)
                    .collect();
                h.run_batch(
                    &offsets,
                    BLOCK,
                    depth,
                    true,
                    |i, b| pattern::fill(b, offsets[i], tag),
                    |_, _, r| {
                        r.unwrap();
                        true
                    },
                )
                .unwrap();
                h.run_batch(
                    &offsets,
                    BLOCK,
                    depth,
                    false,
                    |_, _| {},
                    |i, b, r| {
                        r.unwrap();
                        assert_eq!(b, &pattern::make(BLOCK, offsets[i], tag)[..], "queue {q}");
                        true
                    },
                )
                .unwrap();
            });
        }
    });
}

#[test]
fn several_queues_work_at_once() {
    let (f, image) = setup(&[]);
    let daemon = f
        .start_daemon(&image, "mq", &["--num-queues", "4"])
        .unwrap();
    let mut c = connect(daemon.socket(), 4, false);
    assert_eq!(c.num_queues(), 4);
    write_and_check_every_queue(&mut c, 128, 8, 11);
}

/// With `--poll-us`, the queue threads pick up requests while they watch their rings: every
/// request is still served exactly once and in full (QD1 and QD8, two queues).
#[test]
fn polling_queues_serve_every_request() {
    let (f, image) = setup(&[]);
    let daemon = f
        .start_daemon(&image, "poll", &["--num-queues", "2", "--poll-us", "500"])
        .unwrap();
    let mut c = connect(daemon.socket(), 2, false);
    for depth in [1, 8] {
        write_and_check_every_queue(&mut c, 200, depth, 30 + depth as u64);
    }
    // Without I/O the adaptive window closes: the daemon does not keep a core busy (a queue
    // thread spinning would use a whole one).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = cpu_ticks(daemon.pid()) - before;
    let per_s = 100; // USER_HZ on Linux
    assert!(
        used < per_s * 2 / 5,
        "an idle polling daemon used {used} ticks of CPU in 2 s"
    );
    let sock = f.path("p.sock");
    f.vhost_qvol([
        std::ffi::OsStr::new("--poll-us"),
        std::ffi::OsStr::new("5000"),
        std::ffi::OsStr::new("--socket-path"),
        sock.as_os_str(),
        std::ffi::OsStr::new("--blk-file"),
        image.as_os_str(),
        std::ffi::OsStr::new("--any-volume"),
    ])
    .one_sentence_error("vhost-qvol", "--poll-us");
}

/// User + system CPU of process `pid` in clock ticks (`/proc/PID/stat`, fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon's stat");
    let after_name = &stat[stat.rfind(')').expect("a process name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 of the text after the name is field 3 of stat (state); 14 and 15 are 12 and 13 here.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn out_of_range_requests_fail_cleanly_and_serving_goes_on() {
    let (f, image) = setup(&[]);
    let daemon = f.start_daemon(&image, "oor", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1, false);
    assert_eq!(c.read(64 * MIB, 4096), Err(Errno::IO));
    assert_eq!(c.read(64 * MIB - 512, 1024), Err(Errno::IO));
    assert_eq!(c.write(64 * MIB, &[1; 4096]), Err(Errno::IO));
    assert_eq!(c.write_zeroes(64 * MIB - 4096, 8192, true), Err(Errno::IO));
    c.write(0, &[5; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![5; 4096]);
    assert!(
        daemon.log_text().contains("beyond the disk"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_client_killed_mid_io_is_followed_by_a_new_one() {
    let (f, image) = setup(&[]);
    let daemon = f.start_daemon(&image, "kc", &[]).unwrap();
    let done = run_load_and_kill(daemon.socket(), 21, 512, 300);
    let mut c = connect(daemon.socket(), 1, false);
    for offset in done {
        assert_eq!(
            c.read(offset, BLOCK).unwrap(),
            pattern::make(BLOCK, offset, 21),
            "at {offset}"
        );
    }
}

/// Runs `blkio-load` against `socket` until it reported `min_done` completed writes, kills
/// it with SIGKILL, and returns the offsets it saw complete.
fn run_load_and_kill(
    socket: &std::path::Path,
    seed: u64,
    blocks: u64,
    min_done: usize,
) -> Vec<u64> {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_blkio-load"))
        .arg(socket)
        .arg(seed.to_string())
        .arg(blocks.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut done = Vec::new();
    while done.len() < min_done {
        let line = lines.next().expect("blkio-load ended early").unwrap();
        done.push(line.trim_start_matches("done ").parse::<u64>().unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Lines printed before the kill are completed writes too.
    for line in lines.map_while(Result::ok) {
        if let Some(offset) = line.strip_prefix("done ").and_then(|o| o.parse().ok()) {
            done.push(offset);
        }
    }
    done
}

#[test]
fn sigterm_commits_and_exits_zero_promptly() {
    let (f, image) = setup(&[]);
    let mut daemon = f.start_daemon(&image, "term", &[]).unwrap();
    {
        let mut c = connect(daemon.socket(), 1, false);
        c.write(4096, &pattern::make(65536, 4096, 12)).unwrap();
        // The goal is under a second; the bound here is loose so that a loaded CI machine
        // cannot make it flaky (no timing assertions in tests).
        let status = daemon
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
            .expect("vhost-qvol exits within 5 s of SIGTERM");
        assert!(
            status.success(),
            "exit status {status}: {}",
            daemon.log_text()
        );
    }
    let info = f
        .qvol([
            std::ffi::OsStr::new("info"),
            image.as_os_str(),
            "--json".as_ref(),
        ])
        .success();
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert!(doc["allocated_bytes"].as_u64().unwrap() >= 65536, "{doc}");
    let daemon = f.start_daemon(&image, "term2", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1, false);
    assert_eq!(c.read(4096, 65536).unwrap(), pattern::make(65536, 4096, 12));
}

#[test]
fn a_second_writer_is_refused_by_the_lock() {
    let (f, image) = setup(&[]);
    let _first = f.start_daemon(&image, "one", &[]).unwrap();
    let socket = f.path("two.sock");
    let run = f.vhost_qvol([
        "--socket-path".as_ref(),
        socket.as_os_str(),
        "--blk-file".as_ref(),
        image.as_os_str(),
        "--any-volume".as_ref(),
    ]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains("in use by another process"),
        "{}",
        run.stderr
    );
    assert!(!socket.exists());
}

#[test]
fn the_image_never_contains_written_plaintext() {
    let (f, image) = setup(&[]);
    let marker = b"QVOL-PLAINTEXT-MARKER-0123456789";
    let block: Vec<u8> = marker.iter().copied().cycle().take(BLOCK).collect();
    let mut daemon = f.start_daemon(&image, "pt", &[]).unwrap();
    {
        let mut c = connect(daemon.socket(), 1, false);
        for i in 0..64u64 {
            c.write(i * 65536, &block).unwrap();
        }
        c.write(MIB, &block.repeat(64)).unwrap();
        c.flush().unwrap();
    }
    daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .unwrap();
    let raw = std::fs::read(&image).unwrap();
    // Any leaked run of the pattern longer than 2 markers holds a whole marker starting at
    // a 'Q': look at every 'Q' (a quick scan even in a debug build).
    let count = |bytes: &[u8]| {
        bytes
            .iter()
            .enumerate()
            .filter(|(i, &b)| b == b'Q' && bytes[*i..].starts_with(marker))
            .count()
    };
    assert_eq!(count(&block), BLOCK / marker.len(), "the scan itself works");
    let leaks = count(&raw);
    assert_eq!(
        leaks, 0,
        "the plaintext marker appears {leaks} times in the image"
    );
}
