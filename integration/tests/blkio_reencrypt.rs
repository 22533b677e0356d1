//! Online re-encryption through the daemon and libblkio: while `qvol reencrypt` has the
//! daemon serving an image move it to a new volume key, a client keeps writing patterns and
//! reading them back, and every block verifies during and after; `--status` shows the
//! progress, an interrupted `qvol` leaves the daemon going on, and a daemon killed with
//! SIGKILL half-way resumes by itself when it starts again and finishes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use integration::client::{describe, BlkioClient};
use integration::daemon::Daemon;
use integration::fixture::{json_of, Fixture};
use integration::pattern;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The data: the first 8 MiB, in 64 KiB chunks.
const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 128;
/// The workload writes the first quarter of them (and reads any): the rest is left for the
/// re-encryption to re-seal (a leaf the guest rewrote whole is under the new key already).
const WRITTEN: u64 = 32;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn serve(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    f.start_daemon(image, tag, extra)
        .unwrap_or_else(|e| panic!("vhost-qvol ({tag}) did not start: {e}"))
}

fn connect(socket: &Path) -> BlkioClient {
    BlkioClient::connect(socket, 1, false, 1 << 20)
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)))
}

fn chunk_data(chunk: usize, seed: u64) -> Vec<u8> {
    let offset = (chunk * CHUNK) as u64;
    pattern::make(CHUNK, offset, seed)
}

/// Every chunk reads as the version `seeds` records.
fn verify_all(c: &mut BlkioClient, seeds: &[u64], what: &str) {
    for (chunk, seed) in seeds.iter().enumerate() {
        let offset = (chunk * CHUNK) as u64;
        let data = c
            .read(offset, CHUNK)
            .unwrap_or_else(|e| panic!("{what}: chunk {chunk} reads as an error: {e}"));
        assert!(
            data == chunk_data(chunk, *seed),
            "{what}: chunk {chunk} is not version {seed}"
        );
    }
}

/// A client writing new versions of chunks and reading each back (and another chunk of all
/// the data) until stopped; returns the version of each chunk and how many writes it made.
struct Workload {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<u64>, u64)>,
}

impl Workload {
    fn start(socket: &Path, mut seeds: Vec<u64>, first_seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let socket = socket.to_path_buf();
        let thread = thread::spawn(move || {
            let mut c = connect(&socket);
            let mut writes = 0u64;
            let mut x = first_seed;
            while !flag.load(Ordering::Acquire) {
                // xorshift: which chunk to write, which to read back besides it.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let chunk = (x % WRITTEN) as usize;
                let other = ((x >> 32) % CHUNKS as u64) as usize;
                let seed = first_seed + writes;
                c.write((chunk * CHUNK) as u64, &chunk_data(chunk, seed))
                    .unwrap_or_else(|e| panic!("write of chunk {chunk}: {e}"));
                seeds[chunk] = seed;
                writes += 1;
                for k in [chunk, other] {
                    let data = c
                        .read((k * CHUNK) as u64, CHUNK)
                        .unwrap_or_else(|e| panic!("chunk {k} reads as an error: {e}"));
                    assert!(
                        data == chunk_data(k, seeds[k]),
                        "chunk {k} is not version {} during the re-encryption",
                        seeds[k]
                    );
                }
                if writes % 64 == 0 {
                    c.flush().unwrap();
                }
            }
            c.flush().unwrap();
            (seeds, writes)
        });
        Workload { stop, thread }
    }

    fn stop(self) -> (Vec<u64>, u64) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .expect("the workload verified every read")
    }
}

/// Writes version 1 of every chunk.
fn fill(socket: &Path) -> Vec<u64> {
    let mut c = connect(socket);
    for chunk in 0..CHUNKS {
        c.write((chunk * CHUNK) as u64, &chunk_data(chunk, 1))
            .unwrap();
    }
    c.flush().unwrap();
    vec![1; CHUNKS]
}

fn status(f: &Fixture, image: &Path) -> Value {
    json_of(
        &f.qvol(["reencrypt", s(image), "--status", "--json"])
            .success(),
    )
}

/// Waits at most `timeout` until `--status` satisfies `want`; returns it.
fn wait_status(
    f: &Fixture,
    image: &Path,
    timeout: Duration,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(f, image);
        if want(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "--status never got there: {st}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_served_volume_reencrypts_under_a_verifying_workload() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "64M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let daemon = serve(&f, &image, "live", &["--control-socket", s(&ctl)]);
    let seeds = fill(daemon.socket());
    let work = Workload::start(daemon.socket(), seeds, 2);

    // 1 MiB of data a second: about 8 s for the region (the rest of the disk holds none).
    // The qvol following it is killed; the daemon goes on.
    let mut run = f.qvol_background([
        "reencrypt",
        s(&image),
        "--cipher",
        "aegis-256",
        "--rate",
        "1",
        "--json",
    ]);
    run.wait_for_json(Duration::from_secs(30), |v| {
        v["done_bytes"].as_u64().is_some_and(|d| d > 0)
    });
    run.signal(libc::SIGKILL);
    run.finish(Duration::from_secs(10));
    let st = wait_status(&f, &image, Duration::from_secs(10), |st| {
        st["reencryption"]["done_bytes"].as_u64() > Some(0)
    });
    assert_eq!(st["served"], true, "{st}");
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["reencryption"]["to_cipher"], "aegis-256", "{st}");
    assert_eq!(st["reencryption"]["total_bytes"], 64 * MIB, "{st}");
    assert!(st["reencryption"]["percent"].as_u64() < Some(100), "{st}");
    let text = f.qvol(["reencrypt", s(&image), "--status"]).success();
    assert!(
        text.stdout.contains("re-encrypts it in the background"),
        "{text:#?}"
    );
    let qs = json_of(&f.qvol(["stats", s(&image), "--json"]).success());
    assert!(qs["volume"]["reencryption"].is_object(), "{qs}");
    // A second start is refused; --resume follows it to the end.
    f.qvol(["reencrypt", s(&image)])
        .one_sentence_error("qvol", "already being re-encrypted");
    let run = f
        .qvol(["reencrypt", s(&image), "--resume", "--json"])
        .success();
    let last: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["finished"], true, "{last}");
    assert_eq!(last["online"], true, "{last}");
    assert_eq!(last["cipher"], "aegis-256", "{last}");

    let (seeds, writes) = work.stop();
    assert!(writes > 10, "the workload made only {writes} writes");
    verify_all(&mut connect(daemon.socket()), &seeds, "after");
    let st = status(&f, &image);
    assert!(st["reencryption"].is_null(), "{st}");
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
    daemon.stop();
    let info = json_of(&f.qvol(["info", s(&image), "--json"]).success());
    assert_eq!(info["cipher"], "aegis-256", "{info}");
    let again = serve(&f, &image, "again", &[]);
    verify_all(&mut connect(again.socket()), &seeds, "after a restart");
    again.stop();
}

#[test]
fn a_daemon_killed_half_way_resumes_by_itself_and_finishes() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "64M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let mut daemon = serve(
        &f,
        &image,
        "first",
        &["--control-socket", s(&ctl), "--reencrypt-rate", "2"],
    );
    let seeds = fill(daemon.socket());
    let work = Workload::start(daemon.socket(), seeds, 2);
    let mut run = f.qvol_background(["reencrypt", s(&image), "--json"]);
    run.wait_for_json(Duration::from_secs(30), |v| {
        v["done_bytes"].as_u64().is_some_and(|d| d >= 2 * MIB)
    });
    let (seeds, _) = work.stop();
    daemon.kill9();
    let lost = run.finish(Duration::from_secs(30));
    lost.one_sentence_error("qvol", "lost the daemon");

    let daemon = serve(
        &f,
        &image,
        "second",
        &["--control-socket", s(&ctl), "--reencrypt-rate", "16"],
    );
    verify_all(&mut connect(daemon.socket()), &seeds, "after kill -9");
    let work = Workload::start(daemon.socket(), seeds, 1000);
    wait_status(&f, &image, Duration::from_secs(40), |st| {
        st["reencryption"].is_null()
    });
    // It was killed mid-way (at least 2 MiB of 64 done), and resumed from there.
    let log = daemon.log_text();
    let resumed_at: u64 = log
        .split("resuming the re-encryption of the volume in the background (")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the daemon did not resume by itself: {log}"));
    assert!((3..100).contains(&resumed_at), "{log}");
    // The worker logs its end just after the volume says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log_text().contains("re-encryption finished") {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        thread::sleep(Duration::from_millis(50));
    }
    let (seeds, _) = work.stop();
    verify_all(&mut connect(daemon.socket()), &seeds, "after resuming");
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
    daemon.stop();
}
