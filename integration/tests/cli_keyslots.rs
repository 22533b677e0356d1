//! Keyslots and the key lifecycle, end to end through `qvol` and `vhost-qvol`: every kind of
//! keyslot opens the volume for a daemon, removing one closes that way in, keys rotate and
//! rewrap, header backups restore removed slots, a keyslot change killed at any step leaves
//! the old set or the new one, and bad input is refused in one sentence with the image and
//! the keystore byte for byte as they were.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use integration::daemon::{wait_within, Daemon};
use integration::fixture::{file_tree, json_of, volume_id_of, Fixture, COMMAND_TIMEOUT};
use integration::pattern;
use serde_json::Value;

/// Where the known data lives: written once through a daemon, read back after each change.
const DATA_AT: u64 = 1 << 20;
const DATA_LEN: usize = 65536;
const DATA_SEED: u64 = 0x6b65_7973;

/// The crash points of a keyslot change, in the order a change passes them
/// (`Volume::set_keyslots`, then the CLI before it tells the keystore).
const CRASH_POINTS: [&str; 6] = [
    "keyslots:stage-written",
    "keyslots:staged",
    "keyslots:area-written",
    "keyslots:area-synced",
    "keyslots:committed",
    "qvol:slots-written",
];

fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

// Daemons and the data they serve.

fn start(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    let id = volume_id_of(image).expect("the image has a header");
    let mut args = vec!["--volume-id", id.as_str()];
    args.extend_from_slice(extra);
    f.start_daemon(image, tag, &args)
        .unwrap_or_else(|e| panic!("vhost-qvol ({tag}) did not start: {e}"))
}

/// Writes the known data through a daemon that unlocks with the keystore.
fn write_data(f: &Fixture, image: &Path) {
    let daemon = start(f, image, "write", &[]);
    {
        let mut c = daemon.client();
        c.write(DATA_AT, &pattern::make(DATA_LEN, DATA_AT, DATA_SEED))
            .unwrap();
        c.flush().unwrap();
    }
    daemon.stop();
}

/// Serves `image` with the unlock flags `extra` and reads the known data back.
fn reads_back(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) {
    let daemon = start(f, image, tag, extra);
    {
        let mut c = daemon.client();
        let got = c
            .read(DATA_AT, DATA_LEN)
            .unwrap_or_else(|e| panic!("{tag}: read failed: {e:?}"));
        let want = pattern::make(DATA_LEN, DATA_AT, DATA_SEED);
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            let zeros = got.iter().filter(|&&b| b == 0).count();
            let log = daemon.log_text();
            panic!(
                "{tag}: the data read back is not what was written: first difference at byte \
                 {first} of {DATA_LEN}, {zeros} zero bytes read; got {:02x?}, want {:02x?}; \
                 daemon log:\n{log}",
                &got[first..(first + 16).min(DATA_LEN)],
                &want[first..(first + 16).min(DATA_LEN)]
            );
        }
    }
    daemon.stop();
}

/// `vhost-qvol` with the unlock flags `extra` refuses `image`: exit 1, one sentence naming
/// `needle`, no socket, the image unchanged.
fn daemon_refuses(f: &Fixture, image: &Path, extra: &[&str], needle: &str) -> String {
    let before = fs::read(image).unwrap();
    let socket = f.path("refused.sock");
    let id = volume_id_of(image).unwrap();
    let mut args = vec![
        "--socket-path",
        s(&socket),
        "--blk-file",
        s(image),
        "--volume-id",
        id.as_str(),
    ];
    args.extend_from_slice(extra);
    let line = f.vhost_qvol(&args).one_sentence_error("vhost-qvol", needle);
    assert!(
        fs::read(image).unwrap() == before,
        "a refusing daemon changed the image"
    );
    assert!(!socket.exists(), "a refusing daemon left a socket");
    line
}

// What `qvol info` and `qvol keyslot list` say.

fn info(f: &Fixture, image: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["info", s(image), "--json"];
    args.extend_from_slice(extra);
    json_of(&f.qvol(args).success())
}

/// The keyslot that opened the volume for `qvol info` with `extra`; it must open and be as
/// fresh as the keystore's record (when there is one).
fn opened_with(f: &Fixture, image: &Path, extra: &[&str]) -> u64 {
    let doc = info(f, image, extra);
    assert!(
        doc.get("locked").is_none(),
        "{extra:?} did not unlock: {doc}"
    );
    assert_eq!(doc["rolled_back"], false, "{doc}");
    assert!(doc["generation"].as_u64().is_some(), "{doc}");
    doc["opened_with_keyslot"]
        .as_u64()
        .unwrap_or_else(|| panic!("no opened_with_keyslot: {doc}"))
}

/// Why `qvol info` with `extra` cannot unlock the volume.
fn locked(f: &Fixture, image: &Path, extra: &[&str]) -> String {
    let doc = info(f, image, extra);
    assert!(doc.get("generation").is_none(), "{extra:?} unlocked: {doc}");
    doc["locked"]
        .as_str()
        .unwrap_or_else(|| panic!("{extra:?} unlocked: {doc}"))
        .to_string()
}

/// A keyslot as `qvol keyslot list --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    slot: u64,
    kind: String,
    key_id: Option<String>,
    generation: Option<u64>,
    fingerprint: Option<String>,
}

impl Slot {
    fn passphrase(slot: u64) -> Self {
        Slot {
            slot,
            kind: "passphrase".into(),
            key_id: None,
            generation: None,
            fingerprint: None,
        }
    }
}

fn keyslots(f: &Fixture, image: &Path) -> Vec<Slot> {
    let doc = json_of(&f.qvol(["keyslot", "list", s(image), "--json"]).success());
    let slots = doc["keyslots"].as_array().expect("a keyslots array");
    let used = u64::try_from(slots.len()).unwrap();
    assert_eq!(doc["free"].as_u64(), Some(8 - used), "{doc}");
    slots
        .iter()
        .map(|e| Slot {
            slot: e["slot"].as_u64().expect("a slot number"),
            kind: e["kind"].as_str().expect("a kind").to_string(),
            key_id: e["key_id"].as_str().map(str::to_string),
            generation: e["generation"].as_u64(),
            fingerprint: e["fingerprint"].as_str().map(str::to_string),
        })
        .collect()
}

/// The fingerprint of generation `generation` of `key`.
fn fingerprint(f: &Fixture, key: &str, generation: u64) -> String {
    let doc = json_of(&f.qvol(["key", "show", key, "--json"]).success());
    doc["generations"]
        .as_array()
        .expect("a generations array")
        .iter()
        .find(|g| g["generation"].as_u64() == Some(generation))
        .and_then(|g| g["fingerprint"].as_str())
        .unwrap_or_else(|| panic!("key {key} has no generation {generation}: {doc}"))
        .to_string()
}

// Making slots.

fn write_file(f: &Fixture, name: &str, text: &str) -> PathBuf {
    let path = f.path(name);
    fs::write(&path, text).unwrap();
    path
}

/// Adds a passphrase slot (unlocking with `unlock`); returns its number.
fn add_passphrase(f: &Fixture, image: &Path, pass: &Path, unlock: &[&str]) -> u64 {
    let mut args = vec![
        "keyslot",
        "add",
        s(image),
        "--slot-passphrase-file",
        s(pass),
        "--json",
    ];
    args.extend_from_slice(unlock);
    let doc = json_of(&f.qvol(args).success());
    assert_eq!(doc["action"], "added", "{doc}");
    assert_eq!(doc["kind"], "passphrase", "{doc}");
    doc["slot"].as_u64().expect("a slot number")
}

/// Adds a recovery slot `k_of_n` with its shares in `dir`; returns the share files.
fn add_recovery(f: &Fixture, image: &Path, k_of_n: &str, dir: &Path) -> Vec<PathBuf> {
    let doc = json_of(
        &f.qvol([
            "keyslot",
            "add",
            s(image),
            "--recovery",
            k_of_n,
            "--shares-dir",
            s(dir),
            "--json",
        ])
        .success(),
    );
    assert_eq!(doc["kind"], "recovery", "{doc}");
    let files: Vec<PathBuf> = doc["share_files"]
        .as_array()
        .expect("share_files")
        .iter()
        .map(|p| PathBuf::from(p.as_str().expect("a path")))
        .collect();
    let (k, n) = k_of_n.split_once('/').unwrap();
    assert_eq!(doc["threshold"].as_u64(), Some(k.parse().unwrap()), "{doc}");
    assert_eq!(files.len(), n.parse::<usize>().unwrap(), "{doc}");
    let set = doc["share_set"].as_str().expect("a share set");
    let stem = image.file_stem().unwrap().to_str().unwrap();
    for (i, file) in files.iter().enumerate() {
        let name = format!("{stem}-{set}-share-{}-of-{n}.txt", i + 1);
        assert_eq!(file.file_name().unwrap().to_str(), Some(name.as_str()));
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
    }
    files
}

/// `--recovery-share FILE` for each of `files`.
fn share_flags(files: &[&PathBuf]) -> Vec<String> {
    files
        .iter()
        .flat_map(|p| ["--recovery-share".to_string(), s(p).to_string()])
        .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A keystore, a key, a 16 MiB image holding the known data.
fn volume(f: &Fixture) -> (String, PathBuf) {
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    write_data(f, &image);
    (key, image)
}

// Refusals.

/// `qvol ARGS` is refused: exit 1, one sentence naming `needle`, and `image` and the
/// keystore are byte for byte as they were.
fn refused(f: &Fixture, image: &Path, args: &[&str], needle: &str) -> String {
    let image_before = fs::read(image).unwrap();
    let keystore_before = file_tree(&f.keystore);
    let line = f.qvol(args).one_sentence_error("qvol", needle);
    assert!(
        fs::read(image).unwrap() == image_before,
        "the refused `qvol {}` changed the image",
        args.join(" ")
    );
    assert!(
        file_tree(&f.keystore) == keystore_before,
        "the refused `qvol {}` changed the keystore",
        args.join(" ")
    );
    line
}

// 1. Each kind of keyslot opens the volume for a daemon; a removed one no longer does.

#[test]
fn every_kind_of_keyslot_serves_the_volume_until_removed() {
    let f = Fixture::new();
    let (_, image) = volume(&f);
    let p1 = write_file(&f, "p1", "first passphrase\n");
    let p2 = write_file(&f, "p2", "second passphrase\n");
    assert_eq!(add_passphrase(&f, &image, &p1, &[]), 1);
    let shares = add_recovery(&f, &image, "2/3", &f.path("shares"));
    let pass1 = ["--unlock-passphrase-file", s(&p1)];
    let two_shares = share_flags(&[&shares[0], &shares[2]]);

    // A second keystore's key, added as a recipient; that keystore adopts the volume.
    let other = Fixture::new();
    let other_key = other.new_key("vm");
    let public = other.path("other.pub");
    other
        .qvol(["key", "export-public", &other_key, "-o", s(&public)])
        .success();
    let added = json_of(
        &f.qvol([
            "keyslot",
            "add",
            s(&image),
            "--recipient",
            s(&public),
            "--json",
        ])
        .success(),
    );
    assert_eq!(added["slot"], 3, "{added}");
    assert_eq!(added["kind"], "recipient", "{added}");
    assert_eq!(added["key_id"], other_key.as_str(), "{added}");
    other
        .qvol([
            "volume",
            "adopt",
            s(&image),
            "--keystore",
            s(&other.keystore),
        ])
        .success();

    reads_back(&f, &image, "keystore", &[]);
    reads_back(&f, &image, "passphrase", &pass1);
    reads_back(&f, &image, "shares", &strs(&two_shares));
    reads_back(&other, &image, "other-keystore", &[]);

    // The second keystore's slot goes: its daemon and `qvol info` are locked out.
    f.qvol(["keyslot", "remove", s(&image), "3"]).success();
    daemon_refuses(&other, &image, &[], "keyslot");
    locked(&other, &image, &[]);
    // The recovery slot goes.
    f.qvol(["keyslot", "remove", s(&image), "2"]).success();
    daemon_refuses(&f, &image, &strs(&two_shares), "do not unlock");
    locked(&f, &image, &strs(&two_shares));
    // The keystore's own slot goes (unlocking through the passphrase).
    f.qvol(["keyslot", "remove", s(&image), "0", pass1[0], pass1[1]])
        .success();
    daemon_refuses(&f, &image, &[], "keyslot");
    assert!(locked(&f, &image, &[]).contains("keyslot"));
    // The first passphrase goes, the second one stays.
    assert_eq!(add_passphrase(&f, &image, &p2, &pass1), 0);
    let pass2 = ["--unlock-passphrase-file", s(&p2)];
    f.qvol(["keyslot", "remove", s(&image), "1", pass2[0], pass2[1]])
        .success();
    daemon_refuses(&f, &image, &pass1, "does not unlock");
    assert!(locked(&f, &image, &pass1).contains("does not unlock"));
    assert_eq!(opened_with(&f, &image, &pass2), 0);
    reads_back(&f, &image, "second-passphrase", &pass2);
}

// 2. Two users, two keystores.

#[test]
fn alice_adds_bob_and_removes_him_again() {
    let alice = Fixture::new();
    let bob = Fixture::new();
    let alice_key = alice.new_key("shared");
    let image = alice.create_image("shared.qvol", "16M", &alice_key, &[]);
    let bob_key = bob.new_key("bob-vm");
    let bob_pub = bob.path("bob.pub");
    let run = bob
        .qvol(["key", "export-public", &bob_key, "-o", s(&bob_pub)])
        .success();
    assert!(run.stdout.contains(&bob_key), "{run:#?}");
    alice
        .qvol(["keyslot", "add", s(&image), "--recipient", s(&bob_pub)])
        .success();
    let slots = keyslots(&alice, &image);
    assert_eq!(
        slots[1],
        Slot {
            slot: 1,
            kind: "recipient".into(),
            key_id: Some(bob_key.clone()),
            generation: Some(1),
            fingerprint: Some(fingerprint(&bob, &bob_key, 1)),
        }
    );
    let as_alice = ["--keystore", s(&alice.keystore)];
    let as_bob = ["--keystore", s(&bob.keystore)];
    let a = info(&alice, &image, &as_alice);
    let b = info(&bob, &image, &as_bob);
    assert_eq!(a["opened_with_keyslot"], 0, "{a}");
    assert_eq!(b["opened_with_keyslot"], 1, "{b}");
    assert!(a["generation"].as_u64().is_some(), "{a}");
    assert_eq!(a["generation"], b["generation"], "{a}\n{b}");
    assert_eq!(a["recorded"], true, "{a}");
    assert_eq!(b["recorded"], false, "{b}");

    alice.qvol(["keyslot", "remove", s(&image), "1"]).success();
    assert!(locked(&bob, &image, &as_bob).contains("keyslot"));
    assert_eq!(opened_with(&alice, &image, &as_alice), 0);
    assert_eq!(keyslots(&alice, &image).len(), 1);
}

// 3. The keystore is lost; two of three shares bring the volume into a new one.

#[test]
fn two_shares_recover_the_volume_into_a_new_keystore() {
    let f = Fixture::new();
    let (_, image) = volume(&f);
    let shares = add_recovery(&f, &image, "2/3", &f.path("shares"));
    let id = volume_id_of(&image).unwrap();
    fs::remove_dir_all(&f.keystore).unwrap();
    let two = share_flags(&[&shares[1], &shares[2]]);
    let new_ks = f.path("new-keystore");
    let mut with_new = strs(&two);
    with_new.extend(["--keystore", s(&new_ks)]);

    // No keystore at all, then a new, empty one.
    assert_eq!(opened_with(&f, &image, &with_new), 1);
    f.qvol([
        "keystore",
        "init",
        "--keystore",
        s(&new_ks),
        "--no-passphrase",
    ])
    .success();
    let doc = info(&f, &image, &with_new);
    assert_eq!(doc["opened_with_keyslot"], 1, "{doc}");
    assert_eq!(doc["recorded"], false, "{doc}");

    let run = f
        .qvol(["key", "new", "vm", "--keystore", s(&new_ks)])
        .success();
    let new_key = run.stdout.trim().to_string();
    let mut add = vec!["keyslot", "add", s(&image), "--key", &new_key, "--json"];
    add.extend_from_slice(&with_new);
    let run = f.qvol(&add).success();
    assert!(
        run.stderr.contains("cannot be checked"),
        "no warning that freshness is unchecked: {run:#?}"
    );
    let added = json_of(&run);
    let slot = added["slot"].as_u64().expect("a slot number");
    assert_eq!(added["key_id"], new_key.as_str(), "{added}");

    // The new keystore now has the volume's record, and its key opens it by default.
    let doc = info(&f, &image, &["--keystore", s(&new_ks)]);
    assert_eq!(doc["opened_with_keyslot"], slot, "{doc}");
    assert_eq!(doc["recorded"], true, "{doc}");
    assert_eq!(doc["recorded_key_id"], new_key.as_str(), "{doc}");
    assert!(new_ks.join("volumes").join(format!("{id}.json")).exists());
    reads_back(&f, &image, "new-keystore", &["--keystore", s(&new_ks)]);
}

// 4. Rotation and rewrapping.

#[test]
fn a_rotated_key_is_rewrapped_before_its_old_generation_goes() {
    let f = Fixture::new();
    let (key, image) = volume(&f);
    let run = f
        .qvol(["key", "rotate", &key, "--rewrap", s(&image)])
        .success();
    assert!(run.stdout.contains("rewrapped keyslot 0"), "{run:#?}");
    let slots = keyslots(&f, &image);
    assert_eq!(slots[0].generation, Some(2), "{slots:?}");
    assert_eq!(slots[0].fingerprint, Some(fingerprint(&f, &key, 2)));
    f.qvol(["key", "remove-generation", &key, "1"]).success();
    reads_back(&f, &image, "after-rewrap", &[]);

    // Rotated without a rewrap: the image still needs generation 2.
    f.qvol(["key", "rotate", &key]).success();
    let id = volume_id_of(&image).unwrap();
    let line = refused(&f, &image, &["key", "remove-generation", &key, "2"], &id);
    assert!(line.contains("--force"), "{line}");
    assert_eq!(keyslots(&f, &image)[0].generation, Some(2));
    let done = json_of(&f.qvol(["rekey", s(&image), "--json"]).success());
    assert_eq!(
        done["rewrapped"],
        serde_json::json!([{"slot": 0, "key_id": key, "from": 2, "to": 3}]),
        "{done}"
    );
    assert_eq!(keyslots(&f, &image)[0].generation, Some(3));
    let again = json_of(&f.qvol(["rekey", s(&image), "--json"]).success());
    assert_eq!(again["rewrapped"], serde_json::json!([]), "{again}");
    f.qvol(["key", "remove-generation", &key, "2"]).success();
    reads_back(&f, &image, "after-rekey", &[]);
}

// 5. Header backup and restore.

#[test]
fn a_header_backup_restores_a_removed_slot_and_only_for_its_volume() {
    let f = Fixture::new();
    let (key, image) = volume(&f);
    let pass = write_file(&f, "pass", "backup passphrase\n");
    let by_pass = ["--unlock-passphrase-file", s(&pass)];
    assert_eq!(add_passphrase(&f, &image, &pass, &[]), 1);
    let backup = f.path("disk.header");
    f.qvol(["header", "backup", s(&image), s(&backup)])
        .success();
    let meta = fs::metadata(&backup).unwrap();
    assert_eq!(meta.len(), 36864);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let saved = fs::read(&backup).unwrap();
    refused(
        &f,
        &image,
        &["header", "backup", s(&image), s(&backup)],
        "must not exist",
    );
    assert!(
        fs::read(&backup).unwrap() == saved,
        "the backup was overwritten"
    );

    f.qvol(["keyslot", "remove", s(&image), "1"]).success();
    assert!(locked(&f, &image, &by_pass).contains("does not unlock"));
    let done = json_of(
        &f.qvol(["header", "restore", s(&image), s(&backup), "--json"])
            .success(),
    );
    assert_eq!(done["restored_slots"], serde_json::json!([1]), "{done}");
    assert_eq!(done["dropped_slots"], serde_json::json!([]), "{done}");
    assert_eq!(opened_with(&f, &image, &by_pass), 1);
    reads_back(&f, &image, "restored-passphrase", &by_pass);

    // Another volume's backup, and a truncated one.
    let other = f.create_image("other.qvol", "16M", &key, &[]);
    let other_backup = f.path("other.header");
    f.qvol(["header", "backup", s(&other), s(&other_backup)])
        .success();
    refused(
        &f,
        &image,
        &["header", "restore", s(&image), s(&other_backup)],
        "not of volume",
    );
    let truncated = f.path("truncated.header");
    fs::write(&truncated, &saved[..1000]).unwrap();
    refused(
        &f,
        &image,
        &["header", "restore", s(&image), s(&truncated)],
        "1000 bytes",
    );
    assert_eq!(keyslots(&f, &image).len(), 2);
}

// 6. A keyslot change killed at each step.

/// Runs `qvol ARGS` with `QVOL_FAILPOINT=point` and checks that it died there (aborted),
/// so that a point that does not fire fails the test.
fn crash_at(f: &Fixture, point: &str, args: &[&str]) {
    let out = f.path("crash.stdout");
    let err = f.path("crash.stderr");
    let mut cmd = f.command(&integration::bins::qvol());
    cmd.args(args)
        .env("QVOL_FAILPOINT", point)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().expect("start qvol");
    let status = wait_within(&mut child, COMMAND_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!(
            "`qvol {}` at {point} did not exit: {stderr}",
            args.join(" ")
        )
    });
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "`qvol {}` with QVOL_FAILPOINT={point} was not stopped there ({status}): {stderr}",
        args.join(" ")
    );
    assert!(
        stderr.contains(&format!("failpoint {point}: aborting")),
        "{stderr}"
    );
}

/// After a crash at `point`: the keyslots are the `old` set or the `new` one; `qvol info`
/// opens the volume through `unlock` with keyslot `slot` (one of both sets) at a generation
/// not below `generation`; a daemon serves the known data; and the set `keyslot list` showed
/// is the one that holds after that writable open settled the change (FORMAT.md §3.1): a
/// change that looks undone must not come back later, nor one that looks done go away.
/// Returns whether the change happened.
fn survived(
    f: &Fixture,
    image: &Path,
    point: &str,
    (old, new): (&[Slot], &[Slot]),
    (unlock, slot): (&[&str], u64),
    generation: u64,
) -> bool {
    let seen = keyslots(f, image);
    assert!(
        seen == old || seen == new,
        "after a crash at {point} the keyslots are neither set:\nold  {old:?}\nnew  {new:?}\nseen {seen:?}"
    );
    let doc = info(f, image, unlock);
    assert!(doc.get("locked").is_none(), "{point}: {doc}");
    assert_eq!(doc["rolled_back"], false, "{point}: {doc}");
    assert_eq!(doc["opened_with_keyslot"], slot, "{point}: {doc}");
    let now = doc["generation"].as_u64().expect("a generation");
    assert!(
        now >= generation,
        "{point}: generation {now} < {generation}"
    );
    reads_back(f, image, &format!("after-{}", point.replace(':', "-")), &[]);
    assert_eq!(
        keyslots(f, image),
        seen,
        "{point}: the writable open changed the set of keyslots it was given"
    );
    seen == new
}

/// Runs `check` for every crash point, then fails naming each point where it failed (so
/// that one broken point does not hide the others; each panic message is printed as it
/// happens).
fn at_every_point(check: impl Fn(&str)) {
    let failed: Vec<&str> = CRASH_POINTS
        .into_iter()
        .filter(|point| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(point))).is_err()
        })
        .collect();
    assert!(failed.is_empty(), "failed after a crash at {failed:?}");
}

fn generation(f: &Fixture, image: &Path) -> u64 {
    info(f, image, &[])["generation"]
        .as_u64()
        .expect("a generation")
}

#[test]
fn keyslot_add_killed_at_each_step_leaves_one_set() {
    at_every_point(|point| {
        let f = Fixture::new();
        let (_, image) = volume(&f);
        let pass = write_file(&f, "pass", "added passphrase\n");
        let by_pass = ["--unlock-passphrase-file", s(&pass)];
        let old = keyslots(&f, &image);
        let mut new = old.clone();
        new.push(Slot::passphrase(1));
        let g = generation(&f, &image);
        let add = [
            "keyslot",
            "add",
            s(&image),
            "--slot-passphrase-file",
            s(&pass),
        ];
        crash_at(&f, point, &add);
        let added = survived(&f, &image, point, (&old, &new), (&[], 0), g);
        if added {
            assert_eq!(opened_with(&f, &image, &by_pass), 1, "{point}");
        } else {
            locked(&f, &image, &by_pass);
        }
        let slot = add_passphrase(&f, &image, &pass, &[]);
        assert_eq!(slot, if added { 2 } else { 1 }, "{point}");
        assert!(opened_with(&f, &image, &by_pass) >= 1, "{point}");
    });
}

#[test]
fn keyslot_remove_killed_at_each_step_leaves_one_set() {
    at_every_point(|point| {
        let f = Fixture::new();
        let (_, image) = volume(&f);
        let pass = write_file(&f, "pass", "removed passphrase\n");
        let by_pass = ["--unlock-passphrase-file", s(&pass)];
        add_passphrase(&f, &image, &pass, &[]);
        let old = keyslots(&f, &image);
        let new = old[..1].to_vec();
        let g = generation(&f, &image);
        let remove = ["keyslot", "remove", s(&image), "1"];
        crash_at(&f, point, &remove);
        if survived(&f, &image, point, (&old, &new), (&[], 0), g) {
            locked(&f, &image, &by_pass);
            refused(&f, &image, &remove, "empty");
            add_passphrase(&f, &image, &pass, &[]);
        } else {
            assert_eq!(opened_with(&f, &image, &by_pass), 1, "{point}");
        }
        f.qvol(remove).success();
        assert_eq!(keyslots(&f, &image), new, "{point}");
        locked(&f, &image, &by_pass);
    });
}

#[test]
fn rekey_killed_at_each_step_leaves_one_set() {
    at_every_point(|point| {
        let f = Fixture::new();
        let (key, image) = volume(&f);
        let pass = write_file(&f, "pass", "steady passphrase\n");
        let by_pass = ["--unlock-passphrase-file", s(&pass)];
        add_passphrase(&f, &image, &pass, &[]);
        f.qvol(["key", "rotate", &key]).success();
        let old = keyslots(&f, &image);
        let mut new = old.clone();
        new[0].generation = Some(2);
        new[0].fingerprint = Some(fingerprint(&f, &key, 2));
        let g = generation(&f, &image);
        crash_at(&f, point, &["rekey", s(&image)]);
        survived(&f, &image, point, (&old, &new), (&by_pass, 1), g);
        assert_eq!(opened_with(&f, &image, &by_pass), 1, "{point}");
        f.qvol(["rekey", s(&image)]).success();
        assert_eq!(keyslots(&f, &image), new, "{point}");
        // The keystore knows the volume no longer needs generation 1.
        f.qvol(["key", "remove-generation", &key, "1"]).success();
        assert_eq!(opened_with(&f, &image, &[]), 0, "{point}");
    });
}

#[test]
fn header_restore_killed_at_each_step_leaves_one_set() {
    at_every_point(|point| {
        let f = Fixture::new();
        let (_, image) = volume(&f);
        let pass = write_file(&f, "pass", "restored passphrase\n");
        let by_pass = ["--unlock-passphrase-file", s(&pass)];
        add_passphrase(&f, &image, &pass, &[]);
        let new = keyslots(&f, &image);
        let backup = f.path("disk.header");
        f.qvol(["header", "backup", s(&image), s(&backup)])
            .success();
        f.qvol(["keyslot", "remove", s(&image), "1"]).success();
        let old = keyslots(&f, &image);
        let g = generation(&f, &image);
        let restore = ["header", "restore", s(&image), s(&backup)];
        crash_at(&f, point, &restore);
        if survived(&f, &image, point, (&old, &new), (&[], 0), g) {
            assert_eq!(opened_with(&f, &image, &by_pass), 1, "{point}");
        } else {
            locked(&f, &image, &by_pass);
        }
        f.qvol(restore).success();
        assert_eq!(keyslots(&f, &image), new, "{point}");
        assert_eq!(opened_with(&f, &image, &by_pass), 1, "{point}");
    });
}

// 7. Bad input: one sentence, exit 1, nothing changed.

#[test]
fn wrong_passphrases_and_bad_shares_are_refused() {
    let f = Fixture::new();
    let (key, image) = volume(&f);
    let pass = write_file(&f, "pass", "right passphrase\n");
    let wrong = write_file(&f, "wrong", "wrong passphrase\n");
    let new_pass = write_file(&f, "new", "another passphrase\n");
    add_passphrase(&f, &image, &pass, &[]);
    let shares = add_recovery(&f, &image, "2/3", &f.path("shares"));
    let other = f.create_image("other.qvol", "16M", &key, &[]);
    let other_shares = add_recovery(&f, &other, "2/3", &f.path("other-shares"));
    // One hex digit of the share line flipped.
    let text = fs::read_to_string(&shares[1]).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("qvol-share-v1-"))
        .expect("a share line");
    let at = line.len() - 5;
    let digit = if &line[at..=at] == "0" { "1" } else { "0" };
    let typo = format!("{}{digit}{}", &line[..at], &line[at + 1..]);
    let mistyped = write_file(&f, "mistyped.txt", &text.replace(line, &typo));

    let add = [
        "keyslot",
        "add",
        s(&image),
        "--slot-passphrase-file",
        s(&new_pass),
    ];
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec!["--unlock-passphrase-file".into(), s(&wrong).into()],
            "does not unlock",
        ),
        (share_flags(&[&shares[0]]), "2 needed"),
        (share_flags(&[&shares[0], &mistyped]), "checksum"),
        (
            share_flags(&[&other_shares[0], &other_shares[1]]),
            "do not unlock",
        ),
    ];
    for (unlock, needle) in &cases {
        let unlock = strs(unlock);
        let mut args = add.to_vec();
        args.extend_from_slice(&unlock);
        refused(&f, &image, &args, needle);
        let mut args = vec!["keyslot", "remove", s(&image), "0"];
        args.extend_from_slice(&unlock);
        refused(&f, &image, &args, needle);
        let mut args = vec!["rekey", s(&image)];
        args.extend_from_slice(&unlock);
        refused(&f, &image, &args, needle);
        daemon_refuses(&f, &image, &unlock, needle);
    }
    assert_eq!(keyslots(&f, &image).len(), 3);
}

#[test]
fn files_that_are_not_public_keys_are_refused() {
    let f = Fixture::new();
    let (key, image) = volume(&f);
    let export_pass = write_file(&f, "export-pass", "export secret\n");
    let secret_export = f.path("key.export");
    f.qvol([
        "key",
        "export",
        &key,
        "-o",
        s(&secret_export),
        "--export-passphrase-file",
        s(&export_pass),
    ])
    .success();
    let json = write_file(&f, "random.json", r#"{"format": 7, "key": [1, 2, 3]}"#);
    let garbage = f.path("garbage.pub");
    fs::write(&garbage, pattern::make(300, 0, 9)).unwrap();
    for file in [&json, &secret_export, &garbage] {
        refused(
            &f,
            &image,
            &["keyslot", "add", s(&image), "--recipient", s(file)],
            "not a usable public key file",
        );
    }
}

#[test]
fn slot_numbers_out_of_range_and_a_full_area_are_refused() {
    let f = Fixture::new();
    let (_, image) = volume(&f);
    let pass = write_file(&f, "pass", "a passphrase\n");
    refused(
        &f,
        &image,
        &["keyslot", "remove", s(&image), "9"],
        "no keyslot 9",
    );
    let add = [
        "keyslot",
        "add",
        s(&image),
        "--slot-passphrase-file",
        s(&pass),
    ];
    let mut at_8 = add.to_vec();
    at_8.extend(["--slot", "8"]);
    refused(&f, &image, &at_8, "no keyslot 8");
    let mut at_0 = add.to_vec();
    at_0.extend(["--slot", "0"]);
    refused(&f, &image, &at_0, "in use");
    for slot in 1..8 {
        assert_eq!(add_passphrase(&f, &image, &pass, &[]), slot);
    }
    assert_eq!(keyslots(&f, &image).len(), 8);
    refused(&f, &image, &add, "all 8 keyslots");
}

#[test]
fn removals_that_could_lock_everyone_out_are_refused() {
    let f = Fixture::new();
    let (_, image) = volume(&f);
    for args in [
        ["keyslot", "remove", s(&image), "0", "--json"],
        ["keyslot", "remove", s(&image), "0", "--force"],
    ] {
        refused(&f, &image, &args, "last keyslot");
    }
    let pass = write_file(&f, "pass", "a passphrase\n");
    let by_pass = ["--unlock-passphrase-file", s(&pass)];
    add_passphrase(&f, &image, &pass, &[]);
    let line = refused(
        &f,
        &image,
        &["keyslot", "remove", s(&image), "0"],
        "--force",
    );
    assert!(line.contains("unlocked with"), "{line}");
    refused(
        &f,
        &image,
        &["keyslot", "remove", s(&image), "1", by_pass[0], by_pass[1]],
        "--force",
    );
    // With --force the unlocking slot goes.
    f.qvol(["keyslot", "remove", s(&image), "0", "--force"])
        .success();
    locked(&f, &image, &[]);
    assert_eq!(opened_with(&f, &image, &by_pass), 1);
}

#[test]
fn recovery_thresholds_outside_2_to_n_are_refused() {
    let f = Fixture::new();
    let (_, image) = volume(&f);
    let dir = f.path("shares");
    for spec in ["1/3", "4/3", "0/0", "three/five"] {
        let line = refused(
            &f,
            &image,
            &[
                "keyslot",
                "add",
                s(&image),
                "--recovery",
                spec,
                "--shares-dir",
                s(&dir),
            ],
            "K/N",
        );
        assert!(line.contains(spec), "{line}");
        assert!(
            !dir.exists(),
            "a refused --recovery {spec} made the shares directory"
        );
    }
}

#[test]
fn keyslots_do_not_change_while_a_daemon_serves_the_image() {
    let f = Fixture::new();
    let (key, image) = volume(&f);
    let pass = write_file(&f, "pass", "a passphrase\n");
    add_passphrase(&f, &image, &pass, &[]);
    let backup = f.path("disk.header");
    f.qvol(["header", "backup", s(&image), s(&backup)])
        .success();
    f.qvol(["key", "rotate", &key]).success();
    let daemon = start(&f, &image, "serving", &[]);
    for args in [
        vec![
            "keyslot",
            "add",
            s(&image),
            "--slot-passphrase-file",
            s(&pass),
        ],
        vec!["keyslot", "remove", s(&image), "1"],
        vec!["rekey", s(&image)],
    ] {
        let line = refused(&f, &image, &args, "in use");
        assert!(line.contains("served"), "{line}");
    }
    refused(
        &f,
        &image,
        &["header", "restore", s(&image), s(&backup)],
        "in use",
    );
    daemon.stop();
    assert_eq!(keyslots(&f, &image).len(), 2);
    f.qvol(["keyslot", "remove", s(&image), "1"]).success();
    f.qvol(["rekey", s(&image)]).success();
    assert_eq!(keyslots(&f, &image)[0].generation, Some(2));
}
