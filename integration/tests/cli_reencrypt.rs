//! `qvol reencrypt` on images no daemon serves, through the binaries: the live disk and two
//! snapshots read back the same after the whole volume moved to a new volume key (and to
//! another cipher suite), the old header with the old passphrase no longer opens anything,
//! and no block of old ciphertext is left in the file; a run killed half-way leaves a volume
//! that refuses a second start and that `--resume` finishes; keyslots whose secret is not
//! given are dropped with a warning naming them; bad input is one sentence, exit 1, and the
//! image byte for byte as it was.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::client::{describe, BlkioClient};
use integration::daemon::Daemon;
use integration::fixture::{copy_private_tree, json_of, Fixture, Run};
use integration::pattern;
use serde_json::Value;

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;
/// The header and the keyslot area: blocks 0 to 8 (docs/FORMAT.md §1).
const HEADER_AREA: usize = 9 * BLOCK;
/// The data written: every block of the first 4 MiB, and a tail.
const REGION_BLOCKS: usize = 1024;
const TAIL: (u64, usize, u64) = (60 * MIB, 256 << 10, 4);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn serve(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    f.start_daemon(image, tag, extra)
        .unwrap_or_else(|e| panic!("vhost-qvol ({tag}) did not start: {e}"))
}

/// The pattern seed of each block of the region in each view of the disk (0: zeros).
struct Model {
    s1: Vec<u64>,
    s2: Vec<u64>,
    live: Vec<u64>,
}

fn write_blocks(c: &mut BlkioClient, seeds: &mut [u64], range: std::ops::Range<usize>, seed: u64) {
    for chunk in range.clone().step_by(256) {
        let end = (chunk + 256).min(range.end);
        let offset = (chunk * BLOCK) as u64;
        c.write(offset, &pattern::make((end - chunk) * BLOCK, offset, seed))
            .unwrap();
    }
    seeds[range].fill(seed);
}

/// Writes version 1 over the region, takes snapshot s1, writes version 2 over its first MiB,
/// takes s2, then writes version 3 over blocks 128..384 and the tail (through a daemon, the
/// snapshots through its control socket).
fn write_history(f: &Fixture, image: &Path) -> Model {
    let ctl = f.path("history.ctl");
    let daemon = serve(f, image, "history", &["--control-socket", s(&ctl)]);
    let mut seeds = vec![0u64; REGION_BLOCKS];
    let mut c = daemon.client();
    write_blocks(&mut c, &mut seeds, 0..REGION_BLOCKS, 1);
    c.flush().unwrap();
    let s1 = seeds.clone();
    f.qvol(["snapshot", "create", s(image), "s1"]).success();
    write_blocks(&mut c, &mut seeds, 0..256, 2);
    c.flush().unwrap();
    let s2 = seeds.clone();
    f.qvol(["snapshot", "create", s(image), "s2"]).success();
    write_blocks(&mut c, &mut seeds, 128..384, 3);
    let (offset, len, seed) = TAIL;
    c.write(offset, &pattern::make(len, offset, seed)).unwrap();
    c.flush().unwrap();
    drop(c);
    daemon.stop();
    Model {
        s1,
        s2,
        live: seeds,
    }
}

/// Every block of the region reads as `seeds` says (and the tail, when `tail`).
fn verify(c: &mut BlkioClient, seeds: &[u64], tail: bool, what: &str) {
    for (chunk, blocks) in seeds.chunks(256).enumerate() {
        let offset = (chunk * 256 * BLOCK) as u64;
        let data = c
            .read(offset, blocks.len() * BLOCK)
            .unwrap_or_else(|e| panic!("{what}: reading at {offset}: {e}"));
        for (i, seed) in blocks.iter().enumerate() {
            let at = offset + (i * BLOCK) as u64;
            let want = match seed {
                0 => vec![0; BLOCK],
                seed => pattern::make(BLOCK, at, *seed),
            };
            assert!(
                data[i * BLOCK..(i + 1) * BLOCK] == want[..],
                "{what}: block at {at} is not version {seed}"
            );
        }
    }
    let (offset, len, seed) = TAIL;
    let want = if tail {
        pattern::make(len, offset, seed)
    } else {
        vec![0; len]
    };
    assert!(
        c.read(offset, len).unwrap() == want,
        "{what}: the tail is wrong"
    );
}

/// Serves the live disk and each snapshot in turn and reads them against `model`.
fn verify_all(f: &Fixture, image: &Path, model: &Model, tag: &str) {
    let live = serve(f, image, &format!("{tag}-live"), &[]);
    verify(
        &mut live.client(),
        &model.live,
        true,
        &format!("{tag}: live"),
    );
    live.stop();
    for (name, seeds) in [("s1", &model.s1), ("s2", &model.s2)] {
        let d = serve(
            f,
            image,
            &format!("{tag}-{name}"),
            &["--snapshot", name, "--read-only"],
        );
        let mut c = BlkioClient::connect(d.socket(), 1, true, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        verify(&mut c, seeds, false, &format!("{tag}: snapshot {name}"));
        drop(c);
        d.stop();
    }
}

fn header_area(image: &Path) -> Vec<u8> {
    fs::read(image).unwrap()[..HEADER_AREA].to_vec()
}

fn add_passphrase_slot(f: &Fixture, image: &Path, pass: &Path) {
    f.qvol([
        "keyslot",
        "add",
        s(image),
        "--slot-passphrase-file",
        s(pass),
    ])
    .success();
}

/// `qvol check IMAGE` unlocked with the passphrase in `pass` and no keystore at all.
fn check_with_passphrase(f: &Fixture, image: &Path, pass: &Path) -> Run {
    f.qvol([
        "check",
        s(image),
        "--json",
        "--unlock-passphrase-file",
        s(pass),
        "--keystore",
        s(&f.path("no-keystore")),
    ])
}

/// The JSON lines a `--json` run printed: progress lines, then the final object.
fn json_lines(run: &Run) -> Vec<Value> {
    run.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

#[test]
fn a_reencrypted_volume_reads_the_same_and_its_old_key_opens_nothing() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "64M", &key, &[]);
    let model = write_history(&f, &image);
    let old_pass = f.path("old.txt");
    let new_pass = f.path("new.txt");
    fs::write(&old_pass, "the old passphrase\n").unwrap();
    fs::write(&new_pass, "the new passphrase\n").unwrap();
    add_passphrase_slot(&f, &image, &old_pass);
    // The control: the old passphrase alone (no keystore) opens and checks the image.
    let checked = json_of(&check_with_passphrase(&f, &image, &old_pass).success());
    assert_eq!(checked["clean"], true, "{checked}");
    let old_header = header_area(&image);
    let old_file = fs::read(&image).unwrap();
    let info = json_of(&f.qvol(["info", s(&image), "--json"]).success());
    assert_eq!(info["cipher"], "xchacha20-poly1305", "{info}");
    let data_start = 16 * BLOCK + info["log_bytes"].as_u64().unwrap() as usize;

    let run = f
        .qvol([
            "reencrypt",
            s(&image),
            "--cipher",
            "aegis-256",
            "--slot-passphrase-file",
            &format!("1={}", s(&new_pass)),
            "--json",
        ])
        .success();
    assert!(!run.stderr.contains("warning"), "{run:#?}");
    let lines = json_lines(&run);
    let (done, progress) = lines.split_last().expect("a final object");
    assert!(!progress.is_empty(), "no progress line: {run:#?}");
    for p in progress {
        assert_eq!(p["total_bytes"], 64 * MIB, "{p}");
        assert!(p["done_bytes"].as_u64() <= Some(64 * MIB), "{p}");
        assert!(p["rate_bytes_per_s"].is_u64(), "{p}");
    }
    assert_eq!(done["finished"], true, "{done}");
    assert_eq!(done["online"], false, "{done}");
    assert_eq!(done["cipher"], "aegis-256", "{done}");
    assert_eq!(done["total_bytes"], 64 * MIB, "{done}");
    let slots = done["keyslots"].as_array().unwrap();
    assert_eq!(slots.len(), 2, "{done}");
    assert_eq!(slots[0]["action"], "rewrapped", "{done}");
    assert_eq!(slots[0]["key_id"], key.as_str(), "{done}");
    assert_eq!(slots[1]["action"], "rewrapped", "{done}");
    assert_eq!(slots[1]["kind"], "passphrase", "{done}");

    let info = json_of(&f.qvol(["info", s(&image), "--json"]).success());
    assert_eq!(info["cipher"], "aegis-256", "{info}");
    assert_eq!(info["keyslots"].as_array().unwrap().len(), 2, "{info}");
    let status = json_of(
        &f.qvol(["reencrypt", s(&image), "--status", "--json"])
            .success(),
    );
    assert!(status["reencryption"].is_null(), "{status}");
    verify_all(&f, &image, &model, "after");
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
    assert_eq!(checked["snapshots"], 2, "{checked}");

    // The new passphrase opens it; the old one opens nothing.
    check_with_passphrase(&f, &image, &new_pass).success();
    check_with_passphrase(&f, &image, &old_pass).one_sentence_error("qvol", "does not unlock");
    // The old header area (its slots wrap the old key) put back: the old passphrase unwraps
    // the old key, and the volume does not open with it, through the keystore either.
    assert_ne!(header_area(&image), old_header);
    let restored = f.path("restored.qvol");
    fs::copy(&image, &restored).unwrap();
    let mut bytes = fs::read(&restored).unwrap();
    bytes[..HEADER_AREA].copy_from_slice(&old_header);
    fs::write(&restored, &bytes).unwrap();
    let refused = check_with_passphrase(&f, &restored, &old_pass);
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        refused.stderr.contains("cannot open the volume")
            && !refused.stderr.contains("does not unlock"),
        "the old passphrase should unwrap the old key, which opens nothing: {refused:#?}"
    );
    let refused = f.qvol(["check", s(&restored)]);
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        f.start_daemon(&restored, "restored", &["--any-volume"])
            .is_err(),
        "a daemon served the image with the old header"
    );
    // No block of old ciphertext (or old map node) is left where it was.
    let new_file = fs::read(&image).unwrap();
    let end = old_file.len().min(new_file.len());
    let mut compared = 0;
    for at in (data_start..end).step_by(BLOCK) {
        let old = &old_file[at..at + BLOCK];
        if old.iter().all(|&b| b == 0) {
            continue;
        }
        compared += 1;
        assert!(
            old != &new_file[at..at + BLOCK],
            "the block at byte {at} still holds what it held under the old key"
        );
    }
    // The data (1024 + 256 + 256 + 64 blocks) and its map nodes.
    assert!(compared > 1600, "only {compared} blocks compared");
}

#[test]
fn an_interrupted_reencryption_refuses_a_second_start_and_resumes() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "64M", &key, &[]);
    let model = write_history(&f, &image);
    // 16 MiB more data (at 8 MiB): with the history, about 21 s at 1 MiB a second.
    let bulk = pattern::make(16 << 20, 8 * MIB, 5);
    let d = serve(&f, &image, "bulk", &[]);
    {
        let mut c = d.client();
        for (i, chunk) in bulk.chunks(MIB as usize).enumerate() {
            c.write(8 * MIB + i as u64 * MIB, chunk).unwrap();
        }
        c.flush().unwrap();
    }
    d.stop();
    let check_bulk = |tag: &str| {
        let d = serve(&f, &image, tag, &["--reencrypt-rate", "1"]);
        let mut c = d.client();
        for (i, chunk) in bulk.chunks(MIB as usize).enumerate() {
            let at = 8 * MIB + i as u64 * MIB;
            assert!(
                c.read(at, chunk.len()).unwrap() == chunk,
                "{tag}: bulk data at {at}"
            );
        }
        drop(c);
        d.stop();
    };
    // Stopped after the first leaves.
    let mut run = f.qvol_background(["reencrypt", s(&image), "--rate", "1", "--json"]);
    run.wait_for_json(Duration::from_secs(30), |v| {
        v["done_bytes"].as_u64().is_some_and(|d| d > 0)
    });
    run.signal(libc::SIGTERM);
    let stopped = run.finish(Duration::from_secs(20));
    stopped.one_sentence_error("qvol", "--resume");
    assert!(stopped.stderr.contains("interrupted"), "{stopped:#?}");
    let status = json_of(
        &f.qvol(["reencrypt", s(&image), "--status", "--json"])
            .success(),
    );
    let first = status["reencryption"]["done_bytes"].as_u64().unwrap();
    assert!(first > 0 && first < 64 * MIB, "{status}");
    assert_eq!(status["reencryption"]["to_cipher"], "xchacha20-poly1305");
    let text = f.qvol(["reencrypt", s(&image), "--status"]).success();
    assert!(
        text.stdout.contains("is being re-encrypted") && text.stdout.contains("--resume"),
        "{text:#?}"
    );
    let info = json_of(&f.qvol(["info", s(&image), "--json"]).success());
    assert_eq!(info["key_epoch"], 1, "{info}");
    assert_eq!(info["reencryption"]["done_bytes"], first, "{info}");
    let text = f.qvol(["info", s(&image)]).success();
    assert!(text.stdout.contains("re-encryption to it"), "{text:#?}");

    // A second start is refused, and changes nothing.
    let before = fs::read(&image).unwrap();
    f.qvol(["reencrypt", s(&image)])
        .one_sentence_error("qvol", "already being re-encrypted");
    f.qvol(["reencrypt", s(&image), "--cipher", "aegis-256"])
        .one_sentence_error("qvol", "use --resume");
    assert!(fs::read(&image).unwrap() == before, "a refused start wrote");

    // Resumed, then killed with SIGKILL mid-step: the volume stays consistent.
    let mut run = f.qvol_background(["reencrypt", s(&image), "--resume", "--rate", "1", "--json"]);
    run.wait_for_json(Duration::from_secs(30), |v| {
        v["done_bytes"].as_u64().is_some_and(|d| d > first)
    });
    std::thread::sleep(Duration::from_millis(300));
    run.signal(libc::SIGKILL);
    assert_eq!(run.finish(Duration::from_secs(10)).code, -1);
    let status = json_of(
        &f.qvol(["reencrypt", s(&image), "--status", "--json"])
            .success(),
    );
    assert!(
        status["reencryption"]["done_bytes"].as_u64() > Some(first),
        "{status}"
    );
    // Data written while it is half done reads back with the rest.
    let extra = pattern::make(256 << 10, 32 * MIB, 9);
    // (A daemon resumes the re-encryption in the background: slowly here.)
    let d = serve(&f, &image, "half", &["--reencrypt-rate", "1"]);
    {
        let mut c = d.client();
        verify(&mut c, &model.live, true, "half-way");
        c.write(32 * MIB, &extra).unwrap();
        c.flush().unwrap();
    }
    d.stop();

    let done = json_lines(
        &f.qvol(["reencrypt", s(&image), "--resume", "--json"])
            .success(),
    );
    let last = done.last().unwrap();
    assert_eq!(last["finished"], true, "{last}");
    assert!(last["keyslots"].is_null(), "{last}");
    let status = json_of(
        &f.qvol(["reencrypt", s(&image), "--status", "--json"])
            .success(),
    );
    assert!(status["reencryption"].is_null(), "{status}");
    let info = json_of(&f.qvol(["info", s(&image), "--json"]).success());
    assert!(
        info["reencryption"].is_null() && info["key_epoch"] == 1,
        "{info}"
    );
    let text = f.qvol(["info", s(&image)]).success();
    assert!(
        text.stdout.contains("epoch 1 (re-encrypted once)"),
        "{text:#?}"
    );
    f.qvol(["reencrypt", s(&image), "--resume"])
        .one_sentence_error("qvol", "nothing to resume");
    verify_all(&f, &image, &model, "resumed");
    check_bulk("bulk");
    let d = serve(&f, &image, "extra", &[]);
    assert!(d.client().read(32 * MIB, extra.len()).unwrap() == extra);
    d.stop();
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
}

#[test]
fn keyslots_without_their_secret_are_dropped_and_named() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let pass = f.path("pass.txt");
    fs::write(&pass, "a passphrase\n").unwrap();
    add_passphrase_slot(&f, &image, &pass);
    let run = f.qvol(["reencrypt", s(&image), "--json"]).success();
    assert!(
        run.stderr.contains("warning: keyslot 1 (passphrase")
            && run.stderr.contains("is dropped")
            && run.stderr.contains("--slot-passphrase-file 1=FILE"),
        "{run:#?}"
    );
    let done = json_lines(&run).pop().unwrap();
    assert_eq!(done["keyslots"][1]["action"], "dropped", "{done}");
    let listed = json_of(&f.qvol(["keyslot", "list", s(&image), "--json"]).success());
    let slots = listed["keyslots"].as_array().unwrap();
    assert_eq!(slots.len(), 1, "{listed}");
    assert_eq!(slots[0]["kind"], "recipient", "{listed}");
    check_with_passphrase(&f, &image, &pass).one_sentence_error("qvol", "no passphrase keyslot");
    f.qvol(["check", s(&image)]).success();
}

#[test]
fn a_volume_left_with_recovery_shares_alone_needs_new_shares() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let old = f.path("old-shares");
    f.qvol([
        "keyslot",
        "add",
        s(&image),
        "--recovery",
        "2/3",
        "--shares-dir",
        s(&old),
    ])
    .success();
    let shares = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let old_shares = shares(&old);
    assert_eq!(old_shares.len(), 3);
    let unlock_with = |files: &[PathBuf]| -> Vec<String> {
        files[..2]
            .iter()
            .flat_map(|p| ["--recovery-share".to_string(), s(p).to_string()])
            .collect()
    };
    let mut remove = vec![
        "keyslot".to_string(),
        "remove".into(),
        s(&image).into(),
        "0".into(),
    ];
    remove.extend(unlock_with(&old_shares));
    f.qvol(&remove).success();

    // Without --shares-dir its only slot would go: refused, nothing changed.
    let before = fs::read(&image).unwrap();
    let mut cmd = vec!["reencrypt".to_string(), s(&image).into()];
    cmd.extend(unlock_with(&old_shares));
    f.qvol(&cmd)
        .one_sentence_error("qvol", "would leave no keyslot");
    assert!(
        fs::read(&image).unwrap() == before,
        "a refused re-encryption wrote"
    );

    let new = f.path("new-shares");
    cmd.extend(["--shares-dir".to_string(), format!("0={}", s(&new))]);
    f.qvol(&cmd)
        .one_sentence_error("qvol", "--shares-dir names keyslot 0");
    cmd.pop();
    cmd.push(format!("1={}", s(&new)));
    let run = f.qvol(&cmd).success();
    assert!(run.stdout.contains("new share file"), "{run:#?}");
    let new_shares = shares(&new);
    assert_eq!(new_shares.len(), 3, "{run:#?}");
    let mut check = vec!["check".to_string(), s(&image).into()];
    check.extend(unlock_with(&new_shares));
    f.qvol(&check).success();
    let mut check = vec!["check".to_string(), s(&image).into()];
    check.extend(unlock_with(&old_shares));
    f.qvol(&check).one_sentence_error("qvol", "do not unlock");
}

#[test]
fn bad_requests_are_one_sentence_and_change_nothing() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let pass = f.path("pass.txt");
    fs::write(&pass, "a passphrase\n").unwrap();
    let before = fs::read(&image).unwrap();
    f.qvol(["reencrypt", s(&image), "--cipher", "aes-xts"])
        .one_sentence_error("qvol", "unknown cipher suite \"aes-xts\"");
    f.qvol(["reencrypt", s(&image), "--resume"])
        .one_sentence_error("qvol", "nothing to resume");
    f.qvol([
        "reencrypt",
        s(&image),
        "--slot-passphrase-file",
        &format!("0={}", s(&pass)),
    ])
    .one_sentence_error("qvol", "which is a recipient slot, not a passphrase slot");
    f.qvol([
        "reencrypt",
        s(&image),
        "--shares-dir",
        &format!("3={}", s(&f.path("d"))),
    ])
    .one_sentence_error("qvol", "which is a free slot");
    f.qvol([
        "reencrypt",
        s(&image),
        "--recipient",
        s(&f.path("missing.pub")),
    ])
    .one_sentence_error("qvol", "cannot read the public key file");
    // Usage errors are clap's (exit 2).
    assert_eq!(
        f.qvol(["reencrypt", s(&image), "--resume", "--status"])
            .code,
        2
    );
    assert_eq!(f.qvol(["reencrypt", s(&image), "--rate", "fast"]).code, 2);
    let status = f.qvol(["reencrypt", s(&image), "--status"]).success();
    assert!(
        status.stdout.contains("is not being re-encrypted"),
        "{status:#?}"
    );
    let status = json_of(
        &f.qvol(["reencrypt", s(&image), "--status", "--json"])
            .success(),
    );
    assert!(status["reencryption"].is_null(), "{status}");
    assert_eq!(status["served"], false, "{status}");
    assert!(
        fs::read(&image).unwrap() == before,
        "a refused request wrote"
    );
}

#[test]
fn an_image_of_format_3_is_refused() {
    let data = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/v2-deployment"
    ));
    let f = Fixture::with_passphrase("golden v2 passphrase");
    fs::remove_dir_all(&f.keystore).unwrap();
    copy_private_tree(&data.join("keystore"), &f.keystore);
    let image = f.path("vm1.qvol");
    fs::copy(data.join("vm1.qvol"), &image).unwrap();
    let before = fs::read(&image).unwrap();
    f.qvol(["reencrypt", s(&image)])
        .one_sentence_error("qvol", "format version 3");
    assert!(
        fs::read(&image).unwrap() == before,
        "a refused request wrote"
    );
}
