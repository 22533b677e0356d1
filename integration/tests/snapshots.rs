//! Snapshots and `qvol check` end to end, through the binaries: a libblkio client writes,
//! `qvol snapshot` takes, lists, reverts to and deletes snapshots (through the daemon's
//! control socket while served), `vhost-qvol --snapshot NAME --read-only` serves one, and
//! `qvol check` finds corruption injected at each kind of structure (found by parsing the
//! image as docs/FORMAT.md describes it) while `--salvage` recovers every other block.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::client::{describe, BlkioClient};
use integration::daemon::Daemon;
use integration::fixture::{copy_private_tree, json_of, Fixture};
use integration::pattern;
use serde_json::Value;

const BLOCK: usize = 4096;
/// Version A at 0 (256 KiB), version B over it (and 1 MiB more at 4 MiB).
const A_LEN: usize = 256 << 10;
const B_EXTRA: (u64, usize) = (4 << 20, 1 << 20);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn serve(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    f.start_daemon(image, tag, extra)
        .unwrap_or_else(|e| panic!("vhost-qvol did not start: {e}"))
}

#[test]
fn a_snapshot_taken_while_served_reverts_serves_read_only_and_frees_its_space_when_deleted() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let daemon = serve(&f, &image, "live", &["--control-socket", s(&ctl)]);
    let a = pattern::make(A_LEN, 0, 1);
    let b = pattern::make(A_LEN, 0, 2);
    let extra = pattern::make(B_EXTRA.1, B_EXTRA.0, 3);
    {
        let mut c = daemon.client();
        c.write(0, &a).unwrap();
        c.flush().unwrap();
    }
    // Taken through the daemon: the guest keeps its disk.
    let made = json_of(
        &f.qvol(["snapshot", "create", s(&image), "before", "--json"])
            .success(),
    );
    assert_eq!(made["name"], "before", "{made}");
    {
        let mut c = daemon.client();
        c.write(0, &b).unwrap();
        c.write(B_EXTRA.0, &extra).unwrap();
        c.flush().unwrap();
        assert!(c.read(0, A_LEN).unwrap() == b);
    }
    let listed = json_of(&f.qvol(["snapshot", "list", s(&image), "--json"]).success());
    let snaps = listed["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{listed}");
    assert_eq!(snaps[0]["name"], "before");
    assert!(
        snaps[0]["created"].as_u64().unwrap() > 1_600_000_000,
        "{listed}"
    );
    assert!(snaps[0]["generation"].as_u64().unwrap() >= 1, "{listed}");
    assert_eq!(snaps[0]["guid"].as_str().unwrap().len(), 32, "{listed}");
    // A was overwritten by B: the snapshot alone holds A's 64 blocks and its map nodes.
    let unique = snaps[0]["unique_bytes"].as_u64().unwrap();
    assert!(
        unique >= A_LEN as u64 && unique <= (A_LEN + 4 * BLOCK) as u64,
        "{listed}"
    );
    let text = f.qvol(["snapshot", "list", s(&image)]).success().stdout;
    assert!(
        text.contains("\"before\"") && text.contains("UTC") && text.contains("KiB"),
        "{text}"
    );
    // A revert of a served image is refused in one sentence; nothing changes.
    f.qvol(["snapshot", "revert", s(&image), "before"])
        .one_sentence_error("qvol", "stop the VM first");
    // A check through the daemon (a scrub while served).
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
    assert_eq!(checked["served"], true, "{checked}");
    assert_eq!(checked["snapshots"], 1, "{checked}");
    daemon.stop();

    // The snapshot served read-only shows A and refuses writes.
    f.vhost_qvol([
        "--socket-path",
        s(&f.path("x.sock")),
        "--blk-file",
        s(&image),
        "--any-volume",
        "--snapshot",
        "before",
    ])
    .one_sentence_error("vhost-qvol", "--read-only");
    let ro = serve(&f, &image, "snap", &["--snapshot", "before", "--read-only"]);
    {
        // A read-write connection is refused (the device is read-only); a read-only one
        // reads A.
        assert!(BlkioClient::connect(ro.socket(), 1, false, 1 << 20).is_err());
        let mut c = BlkioClient::connect(ro.socket(), 1, true, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        assert!(
            c.read(0, A_LEN).unwrap() == a,
            "the snapshot does not show A"
        );
        assert!(c.read(B_EXTRA.0, 4096).unwrap().iter().all(|&x| x == 0));
        assert!(c.write(0, &b[..4096]).is_err(), "a snapshot took a write");
    }
    ro.stop();

    // Revert, keeping the current state as a snapshot.
    f.qvol([
        "snapshot",
        "revert",
        s(&image),
        "before",
        "--keep-current",
        "after",
    ])
    .success();
    let live = serve(&f, &image, "reverted", &[]);
    {
        let mut c = live.client();
        assert!(c.read(0, A_LEN).unwrap() == a, "the revert does not read A");
        assert!(c.read(B_EXTRA.0, 4096).unwrap().iter().all(|&x| x == 0));
    }
    live.stop();
    let kept = serve(&f, &image, "kept", &["--snapshot", "after", "--read-only"]);
    {
        let mut c = BlkioClient::connect(kept.socket(), 1, true, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        assert!(c.read(0, A_LEN).unwrap() == b, "--keep-current lost B");
    }
    kept.stop();
    // Deleting the snapshot that alone holds B and the extra MiB frees them in the file.
    let before = std::fs::metadata(&image).unwrap().blocks();
    let freed = json_of(
        &f.qvol(["snapshot", "delete", s(&image), "after", "--json"])
            .success(),
    );
    assert!(
        freed["freed_bytes"].as_u64().unwrap() >= (A_LEN + B_EXTRA.1) as u64,
        "{freed}"
    );
    let after = std::fs::metadata(&image).unwrap().blocks();
    assert!(
        (before - after) * 512 >= (A_LEN + B_EXTRA.1) as u64,
        "st_blocks {before} -> {after}"
    );
    f.qvol(["check", s(&image)]).success();
}

#[test]
fn bad_snapshot_requests_are_one_sentence_and_change_nothing() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    f.qvol(["snapshot", "create", s(&image), "one"]).success();
    let bytes = std::fs::read(&image).unwrap();
    let long = "x".repeat(256);
    let cases: [(&[&str], &str); 7] = [
        (&["create", "one"], "already has a snapshot named"),
        (&["create", "a\nb"], "control characters"),
        (&["create", "tab\there"], "control characters"),
        (&["create", &long], "255 bytes"),
        (&["create", ""], "cannot be empty"),
        (&["delete", "nope"], "no snapshot named"),
        (&["revert", "nope"], "no snapshot named"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["snapshot", args[0], s(&image)];
        all.extend_from_slice(&args[1..]);
        f.qvol(&all).one_sentence_error("qvol", needle);
        assert!(
            std::fs::read(&image).unwrap() == bytes,
            "{all:?} changed the image"
        );
    }
    f.qvol([
        "snapshot",
        "revert",
        s(&image),
        "one",
        "--keep-current",
        "one",
    ])
    .one_sentence_error("qvol", "already has a snapshot named");
    assert!(std::fs::read(&image).unwrap() == bytes);
    // Serving a snapshot that does not exist: one sentence.
    f.start_daemon(&image, "none", &["--snapshot", "nope", "--read-only"])
        .expect_err("a missing snapshot was served");
    // An older format names `qvol upgrade`.
    let data = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/v2-deployment"
    ));
    let old = Fixture::with_passphrase("golden v2 passphrase");
    std::fs::remove_dir_all(&old.keystore).unwrap();
    copy_private_tree(&data.join("keystore"), &old.keystore);
    let v3 = old.path("vm1.qvol");
    std::fs::copy(data.join("vm1.qvol"), &v3).unwrap();
    for cmd in [
        &["snapshot", "create", s(&v3), "x"][..],
        &["snapshot", "list", s(&v3)][..],
    ] {
        old.qvol(cmd).one_sentence_error("qvol", "qvol upgrade");
    }
}

#[test]
fn check_exit_statuses_clean_usage_and_not_qvol() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let run = f.qvol(["check", s(&image)]).success();
    assert!(run.stdout.contains("No damage found"), "{run:#?}");
    let doc = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(doc["clean"], true, "{doc}");
    assert_eq!(doc["damage"].as_array().unwrap().len(), 0);
    assert_eq!(f.qvol(["check"]).code, 2);
    assert_eq!(f.qvol(["check", s(&image), "--bogus"]).code, 2);
    let junk = f.path("junk.raw");
    std::fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    f.qvol(["check", s(&junk)])
        .one_sentence_error("qvol", "not a usable qvol image");
    f.qvol(["check", s(&f.path("missing"))])
        .one_sentence_error("qvol", "missing");
}

// ---- corruption: the image as FORMAT.md describes it ---------------------------------

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Where the structures of a committed image live (FORMAT.md §6, §7, §8, §8.1).
#[derive(Debug, Default)]
struct Layout {
    /// (pbn, level, index) of the live map's nodes.
    map_nodes: Vec<(u64, u8, u64)>,
    /// (lbn, pbn) of the live map's data blocks.
    data: Vec<(u64, u64)>,
    /// Space-tree nodes (pbn, level).
    space_nodes: Vec<(u64, u8)>,
    /// The first block of the snapshot table.
    table: u64,
}

impl Layout {
    fn read(image: &[u8]) -> Layout {
        let sb = |i: usize| {
            let b = &image[(9 + i) * BLOCK..][..512];
            (b[..8] == *b"QVOLSUP1").then(|| u64_at(b, 8))
        };
        let newest = match (sb(0), sb(1)) {
            (Some(a), Some(b)) if b > a => 1,
            (Some(_), _) => 0,
            _ => 1,
        };
        let s = &image[(9 + newest) * BLOCK..][..512];
        let mut l = Layout {
            table: u64_at(s, 112),
            ..Layout::default()
        };
        let mut map = Vec::new();
        walk(image, u64_at(s, 24), s[64], 0, &mut map, &mut |lbn, pbn| {
            l.data.push((lbn, pbn))
        });
        l.map_nodes = map;
        let mut space = Vec::new();
        walk(image, u64_at(s, 72), s[65], 0, &mut space, &mut |_, _| {});
        l.space_nodes = space.into_iter().map(|(p, lv, _)| (p, lv)).collect();
        l
    }
}

fn walk(
    image: &[u8],
    pbn: u64,
    level: u8,
    index: u64,
    nodes: &mut Vec<(u64, u8, u64)>,
    leaf: &mut dyn FnMut(u64, u64),
) {
    if pbn == 0 {
        return;
    }
    nodes.push((pbn, level, index));
    let node = &image[pbn as usize * BLOCK..][..BLOCK];
    for e in 0..64u64 {
        let child = u64_at(node, e as usize * 64);
        if child == 0 {
            continue;
        }
        if level == 0 {
            leaf(index * 64 + e, child);
        } else {
            walk(image, child, level - 1, index * 64 + e, nodes, leaf);
        }
    }
}

/// Flips bytes of block `pbn` of a copy of `pristine`.
fn corrupt(pristine: &[u8], pbn: u64, at: usize) -> Vec<u8> {
    let mut img = pristine.to_vec();
    for b in &mut img[pbn as usize * BLOCK + at..][..16] {
        *b ^= 0x5a;
    }
    img
}

/// Checks `img` (written at `path`) with --salvage; its JSON (exit status asserted 1).
fn check_damaged(f: &Fixture, path: &Path, img: &[u8], tag: &str) -> (Value, PathBuf) {
    std::fs::write(path, img).unwrap();
    let out = f.path(&format!("{tag}.raw"));
    let run = f.qvol([
        OsStr::new("check"),
        path.as_os_str(),
        OsStr::new("--json"),
        OsStr::new("--salvage"),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, 1, "{tag}: {run:#?}");
    (json_of(&run), out)
}

/// Every block of `salvaged` equals `reference` except the unreadable ranges, which are zeros.
fn assert_salvaged(reference: &[u8], salvaged: &Path, doc: &Value) -> u64 {
    let got = std::fs::read(salvaged).unwrap();
    assert_eq!(got.len(), reference.len());
    let mut bad = vec![false; reference.len() / BLOCK];
    for u in doc["salvage"]["unreadable"].as_array().unwrap() {
        let (o, l) = (u["offset"].as_u64().unwrap(), u["length"].as_u64().unwrap());
        for b in o / BLOCK as u64..(o + l) / BLOCK as u64 {
            bad[b as usize] = true;
        }
    }
    for (i, (g, r)) in got.chunks(BLOCK).zip(reference.chunks(BLOCK)).enumerate() {
        if bad[i] {
            assert!(g.iter().all(|&x| x == 0), "unreadable block {i} not zeros");
        } else {
            assert!(g == r, "block {i} was not salvaged byte for byte");
        }
    }
    bad.iter().filter(|&&b| b).count() as u64
}

fn damage_mentions(doc: &Value, tree: &str, lbn: Option<u64>) -> bool {
    doc["damage"].as_array().unwrap().iter().any(|d| {
        d["tree"].as_str().unwrap_or("").contains(tree)
            && lbn.is_none_or(|l| {
                let first = d["first_block"].as_u64().unwrap_or(u64::MAX);
                first <= l && l < first + d["blocks"].as_u64().unwrap_or(0)
            })
    })
}

#[test]
fn check_finds_each_corruption_and_salvage_recovers_every_other_block() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let daemon = serve(&f, &image, "fill", &[]);
    {
        let mut c = daemon.client();
        // Data under two map leaves (lbn 0..64 and 1024..1088), a snapshot, then more.
        c.write(0, &pattern::make(A_LEN, 0, 11)).unwrap();
        c.write(4 << 20, &pattern::make(A_LEN, 4 << 20, 12))
            .unwrap();
        c.flush().unwrap();
    }
    daemon.stop();
    f.qvol(["snapshot", "create", s(&image), "snap"]).success();
    let daemon = serve(&f, &image, "fill2", &[]);
    {
        let mut c = daemon.client();
        c.write(8192, &pattern::make(8192, 8192, 13)).unwrap();
        c.flush().unwrap();
    }
    daemon.stop();
    // The reference: a salvage of the untouched image.
    let reference_raw = f.path("reference.raw");
    f.qvol(["check", s(&image), "--salvage", s(&reference_raw)])
        .success();
    let reference = std::fs::read(&reference_raw).unwrap();
    assert!(reference[8192..16384] == pattern::make(8192, 8192, 13)[..]);
    let pristine = std::fs::read(&image).unwrap();
    let l = Layout::read(&pristine);
    let victim = f.path("victim.qvol");

    // A data block of the live disk: only its block is lost.
    let (lbn, pbn) = *l.data.iter().find(|(lbn, _)| *lbn == 40).unwrap();
    let (doc, raw) = check_damaged(&f, &victim, &corrupt(&pristine, pbn, 100), "data");
    assert!(damage_mentions(&doc, "live", Some(lbn)), "{doc}");
    assert_eq!(assert_salvaged(&reference, &raw, &doc), 1, "{doc}");

    // A map leaf of the live disk alone (lbn 0..64, rewritten since the snapshot): its 64
    // blocks, nothing else.
    let leaf = l.map_nodes.iter().find(|n| n.1 == 0 && n.2 == 0).unwrap();
    let (doc, raw) = check_damaged(&f, &victim, &corrupt(&pristine, leaf.0, 8), "leaf");
    assert!(damage_mentions(&doc, "live", Some(0)), "{doc}");
    assert_eq!(assert_salvaged(&reference, &raw, &doc), 64, "{doc}");

    // A map leaf shared by the live disk and the snapshot (lbn 1024..1088): its range is
    // named (qvol-core's check walks a shared node once, under the first tree that holds it).
    let leaf = l.map_nodes.iter().find(|n| n.1 == 0 && n.2 == 16).unwrap();
    let (doc, raw) = check_damaged(&f, &victim, &corrupt(&pristine, leaf.0, 8), "shared");
    assert!(damage_mentions(&doc, "", Some(1024)), "{doc}");
    assert_eq!(assert_salvaged(&reference, &raw, &doc), 64, "{doc}");

    // An interior map node (the root): the whole live disk is lost, and said so.
    let root = l.map_nodes.iter().find(|n| n.1 > 0).unwrap();
    let (doc, raw) = check_damaged(&f, &victim, &corrupt(&pristine, root.0, 8), "root");
    assert!(damage_mentions(&doc, "live", Some(0)), "{doc}");
    assert_salvaged(&reference, &raw, &doc);

    // A space-tree leaf: the accounting is damaged, every block still salvages.
    let space = l.space_nodes.iter().find(|n| n.1 == 0).unwrap();
    let (doc, raw) = check_damaged(&f, &victim, &corrupt(&pristine, space.0, 200), "space");
    assert!(damage_mentions(&doc, "space", None), "{doc}");
    assert_eq!(assert_salvaged(&reference, &raw, &doc), 0, "{doc}");

    // The snapshot table: named as such (the volume may not open at all).
    assert_ne!(l.table, 0);
    let img = corrupt(&pristine, l.table, 64 + 200);
    std::fs::write(&victim, &img).unwrap();
    let run = f.qvol(["check", s(&victim), "--json"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        (run.stdout.clone() + &run.stderr)
            .to_lowercase()
            .contains("snapshot"),
        "{run:#?}"
    );
    // And the pristine image is still clean.
    f.qvol(["check", s(&image)]).success();
}

/// A raw control-socket client.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = raw.line();
        assert!(
            greeting["qvol"]["commands"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("snapshot-create")),
            "{greeting}"
        );
        raw
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("a response line");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))
    }

    fn send(&mut self, text: &str) -> Value {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        self.line()
    }
}

#[test]
fn control_socket_snapshot_commands_and_garbage_leave_the_guest_served() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let daemon = serve(&f, &image, "served", &["--control-socket", s(&ctl)]);
    let mut raw = Raw::connect(&ctl);
    let made = raw.send(r#"{"execute":"snapshot-create","arguments":{"name":"s1"},"id":1}"#);
    assert_eq!(made["return"]["name"], "s1", "{made}");
    assert_eq!(made["id"], 1);
    let dup = raw.send(r#"{"execute":"snapshot-create","arguments":{"name":"s1"}}"#);
    assert_eq!(dup["error"]["class"], "GenericError", "{dup}");
    let bad = raw.send(r#"{"execute":"snapshot-create","arguments":{"name":"a\u0007b"}}"#);
    assert_eq!(bad["error"]["class"], "GenericError", "{bad}");
    let none = raw.send(r#"{"execute":"snapshot-create"}"#);
    assert_eq!(none["error"]["class"], "GenericError", "{none}");
    let list = raw.send(r#"{"execute":"snapshot-list"}"#);
    assert_eq!(list["return"]["snapshots"][0]["name"], "s1", "{list}");
    assert!(list["return"]["snapshots"][0]["unique_bytes"].is_u64());
    let gone = raw.send(r#"{"execute":"snapshot-delete","arguments":{"name":"nope"}}"#);
    assert_eq!(gone["error"]["class"], "GenericError", "{gone}");
    assert!(
        gone["error"]["desc"].as_str().unwrap().contains("nope"),
        "{gone}"
    );
    let check = raw.send(r#"{"execute":"check"}"#);
    assert_eq!(check["return"]["clean"], true, "{check}");
    let garbage = raw.send("{\"execute\": \"snapshot-delete\", \"arguments\": [1,2");
    assert_eq!(garbage["error"]["class"], "GenericError", "{garbage}");
    let wrong = raw.send(r#"{"execute":"snapshot-delete","arguments":{"name":7}}"#);
    assert_eq!(wrong["error"]["class"], "GenericError", "{wrong}");
    {
        let mut c = daemon.client();
        c.write(0, &pattern::make(8192, 0, 5)).unwrap();
        assert!(c.read(0, 8192).unwrap() == pattern::make(8192, 0, 5));
    }
    let deleted = raw.send(r#"{"execute":"snapshot-delete","arguments":{"name":"s1"}}"#);
    assert!(deleted["return"]["freed_bytes"].is_u64(), "{deleted}");
    // qvol through the daemon: delete of an unknown snapshot is one sentence.
    f.qvol(["snapshot", "delete", s(&image), "nope"])
        .one_sentence_error("qvol", "nope");
    assert!(raw.send(r#"{"execute":"query-status"}"#)["return"].is_object());
    daemon.stop();
}
