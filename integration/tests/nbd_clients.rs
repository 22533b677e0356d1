//! `qvol nbd` driven by real NBD clients: `qemu-io`, `qemu-img` (convert, compare, map,
//! info), `nbdinfo` and `nbdcopy`, then the same data read back through `vhost-qvol` and
//! libblkio. A missing client fails the test with a pointer to scripts/setup.sh; nothing
//! here is skipped.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration::bins;
use integration::client::{describe, BlkioClient};
use integration::daemon::wait_within;
use integration::fixture::{volume_id_of, Fixture, Run};
use integration::pattern;

const MIB: u64 = 1 << 20;
/// How long one client command may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `qvol nbd`; killed if still running when dropped.
struct NbdServe {
    child: Option<Child>,
    socket: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl NbdServe {
    /// Starts `qvol nbd IMAGE --socket DIR/TAG.sock EXTRA...` and waits for its socket.
    fn start(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Self {
        let socket = f.path(&format!("{tag}.sock"));
        let stdout = f.path(&format!("{tag}.out"));
        let stderr = f.path(&format!("{tag}.log"));
        let child = f
            .command(&bins::qvol())
            .arg("nbd")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create the stdout file"))
            .stderr(File::create(&stderr).expect("create the log file"))
            .spawn()
            .expect("start qvol nbd");
        let mut serve = Self {
            child: Some(child),
            socket,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !serve.socket.exists() {
            if let Some(status) = serve
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("qvol nbd exited with {status}: {}", serve.log());
            }
            assert!(
                Instant::now() < deadline,
                "qvol nbd did not listen: {}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The socket appears before the line that announces it is printed.
        while !serve.printed().contains("Serving") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        serve
    }

    /// The URI of the default export.
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn printed(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Sends `signal` and expects exit status 0 within 10 s, the socket gone.
    fn stop(mut self, signal: i32) {
        let mut child = self.child.take().expect("still running");
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let status = wait_within(&mut child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("qvol nbd did not exit: {}", self.log()));
        assert!(
            status.success(),
            "qvol nbd exited with {status}: {}",
            self.log()
        );
        assert!(!self.socket.exists(), "the socket was left behind");
    }
}

impl Drop for NbdServe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a client program to completion (killed after [`TOOL_TIMEOUT`]). A program that is
/// not installed fails the test, naming the package scripts/setup.sh installs.
fn tool<I, S>(program: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let package = match program {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        _ => "qemu-utils",
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): run scripts/setup.sh, which installs {package}")
        });
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_within(&mut child, TOOL_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for a client");
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    assert!(status.code().is_some(), "{program} was killed: {run:#?}");
    run
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// `qemu-io -f raw -c CMD... URI`; the commands must all succeed.
fn qemu_io(uri: &str, commands: &[&str]) -> Run {
    let run = qemu_io_may_fail(uri, commands);
    assert_eq!(run.code, 0, "qemu-io {commands:?} failed: {run:#?}");
    assert!(
        !run.stdout.contains("Pattern verification failed"),
        "{run:#?}"
    );
    run
}

fn qemu_io_may_fail(uri: &str, commands: &[&str]) -> Run {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    tool("qemu-io", args)
}

/// `qemu-img map --output=json` as (start, length, data) runs, merged.
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    let run = tool("qemu-img", ["map", "--output=json", "-f", "raw", uri]);
    assert_eq!(run.code, 0, "{run:#?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON map");
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in doc.as_array().expect("a list of extents") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        if !data {
            assert_eq!(e["zero"], true, "a hole reads as zeros: {e}");
        }
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len, data)),
        }
    }
    out
}

fn setup(size: &str) -> (Fixture, PathBuf) {
    let f = Fixture::new();
    let key = f.new_key("vm1");
    let image = f.create_image("disk.qvol", size, &key, &[]);
    (f, image)
}

#[test]
fn qemu_io_writes_read_back_through_qemu_io_and_the_vhost_user_daemon() {
    let (f, image) = setup("64M");
    let serve = NbdServe::start(&f, &image, "nbd", &[]);
    let id = volume_id_of(&image).unwrap();
    let line = serve.printed();
    assert!(
        line.starts_with(&format!("Serving {}", image.display()))
            && line.contains(&id)
            && line.contains("67108864 bytes")
            && line.contains(&serve.socket.display().to_string())
            && line.trim_end().ends_with("stop with Ctrl-C."),
        "{line}"
    );
    let mode = fs::symlink_metadata(&serve.socket).unwrap();
    assert!(mode.file_type().is_socket());
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    qemu_io(
        &serve.uri(),
        &["write -P 0xa5 1M 256k", "write -P 0x3c 40M 4k", "flush"],
    );
    qemu_io(
        &serve.uri(),
        &[
            "read -P 0xa5 1M 256k",
            "read -P 0x3c 40M 4k",
            "read -P 0 0 1M",
        ],
    );
    // The pattern check can fail.
    let wrong = qemu_io_may_fail(&serve.uri(), &["read -P 0x5a 1M 4k"]);
    assert!(
        wrong.stdout.contains("Pattern verification failed") || wrong.code != 0,
        "{wrong:#?}"
    );
    serve.stop(libc::SIGINT);

    // The daemon, a libblkio frontend: the same bytes.
    let daemon = f.start_daemon(&image, "d", &[]).unwrap();
    let mut c = BlkioClient::connect(daemon.socket(), 1, true, 1 << 20)
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
    assert_eq!(c.read(MIB, 256 << 10).unwrap(), vec![0xa5; 256 << 10]);
    assert_eq!(c.read(40 * MIB, 4096).unwrap(), vec![0x3c; 4096]);
    assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn block_status_shows_holes_and_data_to_qemu_img_and_nbdinfo() {
    let (f, image) = setup("64M");
    let serve = NbdServe::start(&f, &image, "nbd", &[]);
    let uri = serve.uri();
    assert_eq!(map(&uri), vec![(0, 64 * MIB, false)]);
    qemu_io(&uri, &["write -P 1 1M 64k", "write -P 2 20M 4k"]);
    assert_eq!(
        map(&uri),
        vec![
            (0, MIB, false),
            (MIB, 64 << 10, true),
            (MIB + (64 << 10), 19 * MIB - (64 << 10), false),
            (20 * MIB, 4096, true),
            (20 * MIB + 4096, 44 * MIB - 4096, false),
        ]
    );

    let info = tool("qemu-img", ["info", "--output=json", "-f", "raw", &uri]);
    assert_eq!(info.code, 0, "{info:#?}");
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["virtual-size"], 64 * MIB);

    let nbd_map = tool("nbdinfo", ["--map", &uri]);
    assert_eq!(nbd_map.code, 0, "{nbd_map:#?}");
    let rows: Vec<(u64, u64, u32)> = nbd_map
        .stdout
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3),
            (MIB, 64 << 10, 0),
            (MIB + (64 << 10), 19 * MIB - (64 << 10), 3),
            (20 * MIB, 4096, 0),
            (20 * MIB + 4096, 44 * MIB - 4096, 3),
        ],
        "{}",
        nbd_map.stdout
    );

    let json = tool("nbdinfo", ["--json", &uri]);
    assert_eq!(json.code, 0, "{json:#?}");
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("nbdinfo JSON");
    let export = &doc["exports"][0];
    assert_eq!(export["export-size"], 64 * MIB, "{doc}");
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["block_size_minimum"], 512);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    assert_eq!(export["contexts"], serde_json::json!(["base:allocation"]));
    let id = volume_id_of(&image).unwrap();
    assert!(
        export["description"].as_str().unwrap().contains(&id),
        "{doc}"
    );
    serve.stop(libc::SIGTERM);
}

#[test]
fn qemu_img_convert_into_the_export_then_compare_and_nbdcopy_back() {
    let (f, image) = setup("32M");
    let raw = f.path("source.raw");
    let mut data = vec![0u8; 32 << 20];
    for (offset, len, seed) in [
        (0usize, 64 << 10, 1u64),
        (5 << 20, 1 << 20, 2),
        (31 << 20, 4096, 3),
    ] {
        pattern::fill(&mut data[offset..offset + len], offset as u64, seed);
    }
    fs::write(&raw, &data).unwrap();
    let serve = NbdServe::start(&f, &image, "nbd", &[]);
    let uri = serve.uri();
    let raw_arg = raw.to_str().unwrap();
    let convert = tool(
        "qemu-img",
        [
            "convert",
            "-n",
            "--target-is-zero",
            "-f",
            "raw",
            "-O",
            "raw",
            raw_arg,
            &uri,
        ],
    );
    assert_eq!(convert.code, 0, "{convert:#?}");
    let compare = tool(
        "qemu-img",
        ["compare", "-f", "raw", "-F", "raw", raw_arg, &uri],
    );
    assert_eq!(compare.code, 0, "{compare:#?}");
    assert!(compare.stdout.contains("identical"), "{compare:#?}");
    // Only the data was written: the holes of the source stay holes.
    let data_bytes: u64 = map(&uri).iter().filter(|e| e.2).map(|e| e.1).sum();
    assert_eq!(data_bytes, (64 << 10) + MIB + 4096);

    // A compare that must fail does.
    let mut changed = data.clone();
    changed[(5 << 20) + 7] ^= 1;
    let other = f.path("changed.raw");
    fs::write(&other, &changed).unwrap();
    let differ = tool(
        "qemu-img",
        [
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(differ.code, 1, "{differ:#?}");
    assert!(differ.stdout.contains("mismatch"), "{differ:#?}");

    let copy = f.path("copy.raw");
    let run = tool("nbdcopy", [uri.as_str(), copy.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        fs::read(&copy).unwrap() == data,
        "nbdcopy brought back other bytes"
    );
    serve.stop(libc::SIGINT);
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros_and_leave_holes() {
    let (f, image) = setup("16M");
    let serve = NbdServe::start(&f, &image, "nbd", &[]);
    let uri = serve.uri();
    qemu_io(&uri, &["write -P 0x77 0 2M"]);
    assert_eq!(
        map(&uri),
        vec![(0, 2 * MIB, true), (2 * MIB, 14 * MIB, false)]
    );
    qemu_io(
        &uri,
        &["discard 0 1M", "write -z 1M 512k", "write -z -u 1536k 4k"],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0 0 1540k",
            "read -P 0x77 1540k 508k",
            "read -P 0 2M 1M",
        ],
    );
    assert_eq!(
        map(&uri),
        vec![
            (0, MIB + (512 << 10) + 4096, false),
            (MIB + (512 << 10) + 4096, (512 << 10) - 4096, true),
            (2 * MIB, 14 * MIB, false),
        ]
    );
    serve.stop(libc::SIGINT);
}

#[test]
fn a_read_only_export_refuses_writes_and_leaves_the_image_alone() {
    let (f, image) = setup("16M");
    {
        let serve = NbdServe::start(&f, &image, "rw", &[]);
        qemu_io(&serve.uri(), &["write -P 0x42 0 64k"]);
        serve.stop(libc::SIGINT);
    }
    let before = fs::read(&image).unwrap();
    let serve = NbdServe::start(&f, &image, "ro", &["--read-only"]);
    assert!(serve.printed().contains("read-only"), "{}", serve.printed());
    let uri = serve.uri();
    let write = qemu_io_may_fail(&uri, &["write -P 0x43 0 4k"]);
    assert_ne!(
        write.code, 0,
        "a write to a read-only export succeeded: {write:#?}"
    );
    assert!(!write.stdout.contains("wrote"), "{write:#?}");
    let read = tool(
        "qemu-io",
        ["-r", "-f", "raw", "-c", "read -P 0x42 0 64k", &uri],
    );
    assert_eq!(read.code, 0, "{read:#?}");
    assert!(!read.stdout.contains("verification failed"), "{read:#?}");
    // Several clients at once: nbdcopy opens one connection per worker on a multi-conn
    // export, while nbdinfo looks at it too.
    let info = tool("nbdinfo", ["--json", &uri]);
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).expect("nbdinfo JSON");
    assert_eq!(doc["exports"][0]["is_read_only"], true);
    assert_eq!(doc["exports"][0]["can_multi_conn"], true);
    let copy = f.path("copy.raw");
    let run = tool(
        "nbdcopy",
        ["--connections=4", uri.as_str(), copy.to_str().unwrap()],
    );
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(fs::read(&copy).unwrap()[..65536], [0x42; 65536]);
    serve.stop(libc::SIGINT);
    assert!(
        fs::read(&image).unwrap() == before,
        "a read-only export changed the image"
    );
}

/// An interactive `qemu-io` that stays connected between commands.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Session {
    fn open(uri: &str) -> Self {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-io ({e}): run scripts/setup.sh"));
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one command and waits for a line containing `expect`.
    fn run(&mut self, command: &str, expect: &str) {
        let stdin = self.stdin.as_mut().expect("open");
        writeln!(stdin, "{command}").expect("qemu-io takes a command");
        stdin.flush().unwrap();
        let deadline = Instant::now() + TOOL_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(expect) => return,
                Ok(line) => seen.push(line),
                Err(_) => panic!("qemu-io {command:?}: no {expect:?} in {seen:#?}"),
            }
        }
    }

    fn quit(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let status = wait_within(&mut self.child, TOOL_TIMEOUT).expect("qemu-io quits");
        assert!(status.success(), "qemu-io exited with {status}");
    }
}

#[test]
fn a_second_writer_is_refused_while_the_first_keeps_working() {
    let (f, image) = setup("16M");
    let serve = NbdServe::start(&f, &image, "nbd", &[]);
    let uri = serve.uri();
    let mut first = Session::open(&uri);
    first.run("write -P 0x11 0 4k", "wrote 4096/4096");

    let second = qemu_io_may_fail(&uri, &["read 0 4k"]);
    assert_ne!(second.code, 0, "{second:#?}");
    assert!(
        second.stderr.contains(
            "the export is in use by another client; qvol nbd serves one writer at a time"
        ),
        "{second:#?}"
    );
    let info = tool("nbdinfo", [uri.as_str()]);
    assert_ne!(info.code, 0, "{info:#?}");

    first.run("write -P 0x12 4k 4k", "wrote 4096/4096");
    first.run("read -P 0x11 0 4k", "read 4096/4096");
    first.quit();
    // Once the first has left, the next one gets in and sees what it wrote.
    qemu_io(&uri, &["read -P 0x11 0 4k", "read -P 0x12 4k 4k"]);
    serve.stop(libc::SIGINT);
}

/// The server's greeting, read by hand.
fn greeting(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("a greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
}

/// Whether the server closed `s` (within a few seconds) without answering: an end of file,
/// or a reset when it left bytes unread.
fn closed_by_server(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn garbage_and_vanishing_clients_leave_the_server_serving() {
    let (f, image) = setup("16M");
    let serve = NbdServe::start(&f, &image, "nbd", &[]);
    let uri = serve.uri();
    qemu_io(&uri, &["write -P 0x66 0 64k"]);

    // Garbage where the client flags and the first option belong.
    let mut garbage = UnixStream::connect(&serve.socket).unwrap();
    greeting(&mut garbage);
    let _ = garbage.write_all(&[0xde; 4096]);
    assert!(closed_by_server(&mut garbage));

    // A client that gets into transmission, sends half a write, and vanishes.
    let mut quitter = UnixStream::connect(&serve.socket).unwrap();
    greeting(&mut quitter);
    quitter.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    option.extend_from_slice(&0u32.to_be_bytes()); // the default export
    quitter.write_all(&option).unwrap();
    let mut export = [0u8; 10];
    quitter.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        16 * MIB
    );
    let mut request = 0x2560_9513u32.to_be_bytes().to_vec();
    request.extend_from_slice(&0u16.to_be_bytes()); // flags
    request.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    request.extend_from_slice(&7u64.to_be_bytes()); // cookie
    request.extend_from_slice(&(64u64 << 10).to_be_bytes()); // offset
    request.extend_from_slice(&(64u32 << 10).to_be_bytes()); // length
    quitter.write_all(&request).unwrap();
    quitter.write_all(&[0x99; 1000]).unwrap();
    drop(quitter);

    // A huge write announced: the connection ends without the server reading 4 GiB.
    let mut huge = UnixStream::connect(&serve.socket).unwrap();
    greeting(&mut huge);
    huge.write_all(&3u32.to_be_bytes()).unwrap();
    huge.write_all(&option).unwrap();
    huge.read_exact(&mut export).unwrap();
    let mut request = 0x2560_9513u32.to_be_bytes().to_vec();
    request.extend_from_slice(&0u16.to_be_bytes());
    request.extend_from_slice(&1u16.to_be_bytes());
    request.extend_from_slice(&8u64.to_be_bytes());
    request.extend_from_slice(&0u64.to_be_bytes());
    request.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.write_all(&request).unwrap();
    assert!(closed_by_server(&mut huge));

    // A real client still works, and nothing was written by the broken ones.
    qemu_io(
        &uri,
        &[
            "read -P 0x66 0 64k",
            "read -P 0 64k 64k",
            "write -P 0x67 1M 4k",
        ],
    );
    let log = serve.log();
    assert!(log.contains("dropped"), "the garbage was not logged: {log}");
    assert!(
        !log.contains("panicked"),
        "a client made the server panic: {log}"
    );
    serve.stop(libc::SIGTERM);
}

#[test]
fn refusals_are_one_sentence() {
    let (f, image) = setup("16M");
    // A regular file where the socket should go is not replaced.
    let taken = f.path("taken");
    fs::write(&taken, b"keep").unwrap();
    let run = f.qvol([
        OsStr::new("nbd"),
        image.as_os_str(),
        OsStr::new("--socket"),
        taken.as_os_str(),
    ]);
    run.one_sentence_error("qvol", "not a socket");
    assert_eq!(fs::read(&taken).unwrap(), b"keep");

    // An image a daemon is serving cannot be served again.
    let _daemon = f.start_daemon(&image, "d", &[]).unwrap();
    let socket = f.path("second.sock");
    let run = f.qvol([
        OsStr::new("nbd"),
        image.as_os_str(),
        OsStr::new("--socket"),
        socket.as_os_str(),
    ]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:#?}");
    assert!(!socket.exists());
}
