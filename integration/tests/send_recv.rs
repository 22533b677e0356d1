//! `qvol send` and `qvol recv` between two hosts (two keystores; the second imported the
//! key): three snapshots with writes between go over as a full stream and two incrementals,
//! and the received image serves each state through vhost-qvol and libblkio. A stream with
//! a flipped byte or a dropped record, one applied out of order, or one of another volume
//! is refused in one sentence, leaving no new image (and no record) or an unchanged one.

use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use integration::bins;
use integration::daemon::wait_within;
use integration::fixture::{file_tree, Fixture, Run, COMMAND_TIMEOUT};
use integration::pattern;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Bytes of a stream before its first record: prelude, header area, snapshot entry.
const HEAD_LEN: usize = 32 + 36_864 + 400;
/// Bytes of a map node record: kind, level, index, the node.
const NODE_RECORD: usize = 1 + 1 + 8 + 4096;
/// Bytes of a data record: kind, logical block, the sealed block.
const DATA_RECORD: usize = 1 + 8 + 4096;
/// Bytes after the last record: the end record and the checksum.
const TAIL_LEN: usize = 17 + 32;

fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// What the disk holds at each snapshot: (offset, length, seed); seed 0 reads as zeros.
fn state(n: usize) -> Vec<(u64, usize, u64)> {
    let mb = MIB as usize;
    match n {
        1 => vec![(0, mb, 1), (MIB, mb, 0), (8 * MIB, mb / 4, 0)],
        2 => vec![
            (0, mb / 4, 1),
            (MIB / 4, mb / 4, 2),
            (MIB / 2, mb / 4, 1),
            (3 * MIB / 4, mb / 4, 0),
            (8 * MIB, mb / 4, 0),
        ],
        _ => vec![
            (0, mb / 4, 1),
            (MIB / 4, mb / 4, 2),
            (MIB / 2, mb / 4, 1),
            (3 * MIB / 4, mb / 4, 0),
            (8 * MIB, mb / 4, 3),
        ],
    }
}

fn expected(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    if seed == 0 {
        vec![0; len]
    } else {
        pattern::make(len, offset, seed)
    }
}

/// Serves `image` from `f`'s keystore and checks that it reads as snapshot state `n`.
fn reads_as(f: &Fixture, image: &Path, n: usize, tag: &str) {
    let daemon = f
        .start_daemon(image, tag, &[])
        .unwrap_or_else(|e| panic!("vhost-qvol ({tag}) did not start: {e}"));
    {
        let mut c = daemon.client();
        for (offset, len, seed) in state(n) {
            let got = c.read(offset, len).unwrap();
            assert!(
                got == expected(offset, len, seed),
                "{tag}: {len} bytes at {offset} are not those of snapshot {n}; daemon log:\n{}",
                daemon.log_text()
            );
        }
    }
    daemon.stop();
}

/// The sending host: a volume with snapshots s1, s2, s3 (states 1 to 3), data written
/// through a daemon between them, and the live disk changed again after s3.
fn source(a: &Fixture, key: &str, name: &str) -> PathBuf {
    let image = a.create_image(name, "16M", key, &[]);
    let write = |tag: &str, writes: &[(u64, usize, u64)], discard: Option<(u64, u64)>| {
        let daemon = a.start_daemon(&image, tag, &[]).unwrap();
        {
            let mut c = daemon.client();
            for &(offset, len, seed) in writes {
                c.write(offset, &pattern::make(len, offset, seed)).unwrap();
            }
            if let Some((offset, len)) = discard {
                c.discard(offset, len).unwrap();
            }
            c.flush().unwrap();
        }
        daemon.stop();
    };
    let snapshot = |snap: &str| {
        a.qvol(["snapshot", "create", s(&image), snap]).success();
    };
    write("w1", &[(0, MIB as usize, 1)], None);
    snapshot("s1");
    write(
        "w2",
        &[(MIB / 4, MIB as usize / 4, 2)],
        Some((3 * MIB / 4, MIB / 4)),
    );
    snapshot("s2");
    write("w3", &[(8 * MIB, MIB as usize / 4, 3)], None);
    snapshot("s3");
    write("w4", &[(0, 4096, 9)], None);
    image
}

/// Runs `qvol ARGS` with stdin and stdout from/to files (the stream is binary).
fn qvol_io(f: &Fixture, args: &[&str], stdin: Option<&Path>, stdout: Option<&Path>) -> Run {
    let mut err = tempfile::tempfile().expect("a temporary file");
    let mut cmd: Command = f.command(&bins::qvol());
    cmd.args(args)
        .stdin(match stdin {
            Some(p) => Stdio::from(File::open(p).expect("open the stream")),
            None => Stdio::null(),
        })
        .stdout(match stdout {
            Some(p) => Stdio::from(File::create(p).expect("create the output")),
            None => Stdio::null(),
        })
        .stderr(err.try_clone().expect("dup"));
    let mut child = cmd.spawn().expect("start qvol");
    let status = wait_within(&mut child, COMMAND_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for qvol");
    let mut stderr = String::new();
    err.rewind().expect("rewind");
    err.read_to_string(&mut stderr).expect("read stderr");
    let run = Run {
        code: status.code().unwrap_or(-(status.signal().unwrap_or(0))),
        stdout: String::new(),
        stderr,
    };
    assert!(status.code().is_some(), "qvol did not exit: {run:#?}");
    run
}

fn snapshot_names(f: &Fixture, image: &Path) -> Vec<String> {
    let run = f.qvol(["snapshot", "list", s(image), "--json"]).success();
    let doc: Value = serde_json::from_str(&run.stdout).expect("JSON");
    doc["snapshots"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["name"].as_str().expect("a name").to_string())
        .collect()
}

/// The second host: its own keystore, with the sender's key imported.
fn other_host(a: &Fixture, key: &str) -> Fixture {
    let b = Fixture::new();
    let pass = a.path("export-pass");
    fs::write(&pass, "export passphrase\n").unwrap();
    let exported = a.path("key.export");
    a.qvol([
        "key",
        "export",
        key,
        "-o",
        s(&exported),
        "--export-passphrase-file",
        s(&pass),
    ])
    .success();
    b.qvol([
        "key",
        "import",
        s(&exported),
        "--export-passphrase-file",
        s(&pass),
    ])
    .success();
    b
}

/// Sends s1 (full), s2 and s3 (incremental) of `image` to files; s3 also on stdout.
fn send_all(a: &Fixture, image: &Path) -> [PathBuf; 3] {
    let full = a.path("s1.stream");
    let inc2 = a.path("s2.stream");
    let inc3 = a.path("s3.stream");
    let run = a
        .qvol(["send", s(image), "--snapshot", "s1", "-o", s(&full)])
        .success();
    assert!(run.stderr.contains("Sent snapshot \"s1\""), "{run:#?}");
    a.qvol([
        "send",
        s(image),
        "--snapshot",
        "s2",
        "--from",
        "s1",
        "-o",
        s(&inc2),
    ])
    .success();
    let piped = a.path("s3.stdout");
    let run = qvol_io(
        a,
        &["send", s(image), "--snapshot", "s3", "--from", "s2"],
        None,
        Some(&piped),
    );
    assert_eq!(run.code, 0, "{run:#?}");
    a.qvol([
        "send",
        s(image),
        "--snapshot",
        "s3",
        "--from",
        "s2",
        "-o",
        s(&inc3),
    ])
    .success();
    assert!(
        fs::read(&piped).unwrap() == fs::read(&inc3).unwrap(),
        "the stream on stdout differs from the one written with -o"
    );
    let len = |p: &Path| fs::metadata(p).unwrap().len();
    assert!(
        len(&inc2) < len(&full) / 2,
        "an incremental stream carries only what changed"
    );
    [full, inc2, inc3]
}

fn with_byte_flipped(f: &Fixture, stream: &Path, at: usize, name: &str) -> PathBuf {
    let mut bytes = fs::read(stream).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x10;
    let out = f.path(name);
    fs::write(&out, bytes).unwrap();
    out
}

/// Where the data records of a stream start (walking its records: a map node is 1 + 1 +
/// 8 + 4096 bytes, a data record 1 + 8 + 4096).
fn data_records(bytes: &[u8]) -> Vec<usize> {
    let mut at = HEAD_LEN;
    let mut data = Vec::new();
    while at < bytes.len() - TAIL_LEN {
        match bytes[at] {
            1 => at += NODE_RECORD,
            2 => {
                data.push(at);
                at += DATA_RECORD;
            }
            kind => panic!("record kind {kind} at {at}"),
        }
    }
    assert_eq!(bytes[at], 0xff, "the end record");
    data
}

/// The stream without its last data record.
fn with_record_dropped(f: &Fixture, stream: &Path, name: &str) -> PathBuf {
    let mut bytes = fs::read(stream).unwrap();
    let last = *data_records(&bytes).last().expect("a data record");
    bytes.drain(last..last + DATA_RECORD);
    let out = f.path(name);
    fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn snapshots_go_to_another_host_and_serve_there() {
    let a = Fixture::new();
    let key = a.new_key("vm");
    let image = source(&a, &key, "src.qvol");
    assert_eq!(snapshot_names(&a, &image), ["s1", "s2", "s3"]);
    let [full, inc2, inc3] = send_all(&a, &image);
    let b = other_host(&a, &key);
    let dst = b.path("dst.qvol");

    // The full stream makes the image, recorded in b's keystore; it serves state 1.
    let run = b.qvol(["recv", s(&dst), "-i", s(&full)]).success();
    assert!(run.stdout.contains("recorded for key"), "{run:#?}");
    assert!(!b.path("dst.qvol.partial").exists());
    assert_eq!(snapshot_names(&b, &dst), ["s1"]);
    reads_as(&b, &dst, 1, "recv1");

    // The disk changed since s1: refused, unless --force discards the change. The first
    // incremental from a file, the second on stdin.
    let daemon = b.start_daemon(&dst, "change", &[]).unwrap();
    {
        let mut c = daemon.client();
        c.write(0, &pattern::make(8192, 0, 7)).unwrap();
        c.flush().unwrap();
    }
    daemon.stop();
    let before = fs::read(&dst).unwrap();
    b.qvol(["recv", s(&dst), "-i", s(&inc2)])
        .one_sentence_error("qvol", "changed since the stream's base");
    assert!(
        fs::read(&dst).unwrap() == before,
        "a receive refused for a changed disk wrote"
    );
    assert_eq!(snapshot_names(&b, &dst), ["s1"]);
    let run = b
        .qvol(["recv", s(&dst), "-i", s(&inc2), "--force"])
        .success();
    assert!(run.stdout.contains("incremental from"), "{run:#?}");
    reads_as(&b, &dst, 2, "recv2");
    let run = qvol_io(&b, &["recv", s(&dst)], Some(&inc3), None);
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(snapshot_names(&b, &dst), ["s1", "s2", "s3"]);
    reads_as(&b, &dst, 3, "recv3");

    // The same stream twice is refused.
    let before = fs::read(&dst).unwrap();
    b.qvol(["recv", s(&dst), "-i", s(&inc3)])
        .one_sentence_error("qvol", "already has a snapshot named \"s3\"");
    assert!(fs::read(&dst).unwrap() == before, "a refused receive wrote");
}

#[test]
fn damaged_reordered_and_foreign_streams_are_refused() {
    let a = Fixture::new();
    let key = a.new_key("vm");
    let image = source(&a, &key, "src.qvol");
    let [full, inc2, inc3] = send_all(&a, &image);
    let b = other_host(&a, &key);
    let dst = b.path("dst.qvol");
    let keystore_before = file_tree(&b.keystore);

    // A damaged full stream leaves no image, no partial image and no record.
    let no_image = |run: Run, needle: &str| {
        run.one_sentence_error("qvol", needle);
        assert!(!dst.exists(), "a refused receive left an image");
        assert!(
            !b.path("dst.qvol.partial").exists(),
            "it left a partial image"
        );
        assert!(
            file_tree(&b.keystore) == keystore_before,
            "a refused receive changed the keystore"
        );
    };
    let len = fs::metadata(&full).unwrap().len() as usize;
    for (i, at) in [HEAD_LEN + 3, HEAD_LEN + 9 + 4096 + 100, len / 2, len - 5]
        .into_iter()
        .enumerate()
    {
        let bad = with_byte_flipped(&a, &full, at, &format!("flip{i}.stream"));
        no_image(b.qvol(["recv", s(&dst), "-i", s(&bad)]), "stream");
    }
    let dropped = with_record_dropped(&a, &full, "dropped-full.stream");
    no_image(b.qvol(["recv", s(&dst), "-i", s(&dropped)]), "stream");
    no_image(b.qvol(["recv", s(&dst), "-i", s(&inc2)]), "incremental");
    let garbage = a.path("garbage");
    fs::write(&garbage, vec![7u8; 50_000]).unwrap();
    no_image(
        b.qvol(["recv", s(&dst), "-i", s(&garbage)]),
        "not a qvol send stream",
    );

    // The full stream goes in; then damaged and reordered incrementals are refused and
    // the image keeps its one snapshot and its data.
    b.qvol(["recv", s(&dst), "-i", s(&full)]).success();
    let unchanged = |run: Run, needle: &str| {
        run.one_sentence_error("qvol", needle);
        assert_eq!(snapshot_names(&b, &dst), ["s1"], "{needle}");
    };
    let before = fs::read(&dst).unwrap();
    unchanged(
        b.qvol(["recv", s(&dst), "-i", s(&inc3)]),
        "receive the streams in order",
    );
    assert!(fs::read(&dst).unwrap() == before, "a refused receive wrote");
    let len = fs::metadata(&inc2).unwrap().len() as usize;
    for (i, at) in [40, HEAD_LEN - 200, HEAD_LEN + 3, len / 2, len - 40]
        .into_iter()
        .enumerate()
    {
        let bad = with_byte_flipped(&a, &inc2, at, &format!("flip-inc{i}.stream"));
        let before = fs::read(&dst).unwrap();
        unchanged(b.qvol(["recv", s(&dst), "-i", s(&bad)]), "");
        if at < HEAD_LEN {
            // A damaged head (a forged entry) is refused before the image is opened for
            // writing.
            assert!(
                fs::read(&dst).unwrap() == before,
                "flip at {at}: a refused receive wrote"
            );
        }
    }
    let dropped = with_record_dropped(&a, &inc2, "dropped-inc.stream");
    unchanged(b.qvol(["recv", s(&dst), "-i", s(&dropped)]), "stream");
    reads_as(&b, &dst, 1, "after-refusals");

    // Another volume's stream (same key, same snapshot names) is refused.
    let other = source(&a, &key, "other.qvol");
    let foreign = a.path("other-s2.stream");
    a.qvol([
        "send",
        s(&other),
        "--snapshot",
        "s2",
        "--from",
        "s1",
        "-o",
        s(&foreign),
    ])
    .success();
    let before = fs::read(&dst).unwrap();
    unchanged(b.qvol(["recv", s(&dst), "-i", s(&foreign)]), "is of volume");
    assert!(fs::read(&dst).unwrap() == before, "a refused receive wrote");

    // A served image takes no stream.
    let daemon = b.start_daemon(&dst, "served", &[]).unwrap();
    b.qvol(["recv", s(&dst), "-i", s(&inc2)])
        .one_sentence_error("qvol", "served by");
    daemon.stop();
    assert_eq!(snapshot_names(&b, &dst), ["s1"]);

    // After all that, the streams still go in, in order.
    b.qvol(["recv", s(&dst), "-i", s(&inc2)]).success();
    b.qvol(["recv", s(&dst), "-i", s(&inc3)]).success();
    reads_as(&b, &dst, 3, "in-order-at-last");
}

#[test]
fn send_refuses_unknown_snapshots_and_existing_files() {
    let a = Fixture::new();
    let key = a.new_key("vm");
    let image = a.create_image("v.qvol", "16M", &key, &[]);
    a.qvol(["snapshot", "create", s(&image), "s1"]).success();
    let out = a.path("out.stream");
    a.qvol(["send", s(&image), "--snapshot", "nope", "-o", s(&out)])
        .one_sentence_error("qvol", "no snapshot named \"nope\"");
    assert!(!out.exists() && !a.path("out.stream.partial").exists());
    a.qvol([
        "send",
        s(&image),
        "--snapshot",
        "s1",
        "--from",
        "nope",
        "-o",
        s(&out),
    ])
    .one_sentence_error("qvol", "no snapshot named \"nope\"");
    assert!(!out.exists() && !a.path("out.stream.partial").exists());
    fs::write(&out, b"keep me").unwrap();
    a.qvol(["send", s(&image), "--snapshot", "s1", "-o", s(&out)])
        .one_sentence_error("qvol", "already exists");
    assert_eq!(fs::read(&out).unwrap(), b"keep me");

    // Keyless: another host with no key at all sends it, while a daemon serves it.
    let daemon = a.start_daemon(&image, "served", &[]).unwrap();
    let stranger = Fixture::new();
    let sent = a.path("sent.stream");
    stranger
        .qvol(["send", s(&image), "--snapshot", "s1", "-o", s(&sent)])
        .success();
    assert!(fs::metadata(&sent).unwrap().len() > HEAD_LEN as u64);
    daemon.stop();
}

#[test]
fn a_passphrase_slot_in_the_stream_receives_without_the_key() {
    let a = Fixture::new();
    let key = a.new_key("vm");
    let image = source(&a, &key, "src.qvol");
    let pass = a.path("slot-pass");
    fs::write(&pass, "a slot passphrase\n").unwrap();
    a.qvol([
        "keyslot",
        "add",
        s(&image),
        "--slot-passphrase-file",
        s(&pass),
    ])
    .success();
    let full = a.path("s1.stream");
    a.qvol(["send", s(&image), "--snapshot", "s1", "-o", s(&full)])
        .success();

    // A host whose keystore lacks the key: refused, unless the passphrase unlocks.
    let b = Fixture::new();
    let dst = b.path("dst.qvol");
    b.qvol(["recv", s(&dst), "-i", s(&full)])
        .one_sentence_error("qvol", "no keyslot of the stream opens");
    assert!(!dst.exists() && !b.path("dst.qvol.partial").exists());
    let run = b
        .qvol([
            "recv",
            s(&dst),
            "-i",
            s(&full),
            "--unlock-passphrase-file",
            s(&pass),
        ])
        .success();
    assert!(run.stdout.contains("not recorded"), "{run:#?}");
    assert!(run.stderr.contains("qvol keyslot add"), "{run:#?}");

    // A keyslot for a key of this keystore records it; its daemon serves it.
    let key_b = b.new_key("vm-b");
    b.qvol([
        "keyslot",
        "add",
        s(&dst),
        "--key",
        &key_b,
        "--unlock-passphrase-file",
        s(&pass),
    ])
    .success();
    reads_as(&b, &dst, 1, "passphrase-received");
}
