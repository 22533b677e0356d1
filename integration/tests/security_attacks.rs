//! The attacks of docs/SECURITY.md, replayed from outside: through the `qvol` and
//! `vhost-qvol` binaries, the image file and the keystore directory, as an attacker who can
//! write both would. Each test names the break it replays (the numbering of the security
//! review, kept in docs/SECURITY.md's threat table).
//!
//! A refusal is always one sentence on stderr, exit status 1, and leaves the image
//! byte-for-byte as it was. A daemon that serves instead of refusing is killed by
//! `Fixture::vhost_qvol` after its timeout and the test fails.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use integration::daemon::Daemon;
use integration::fixture::{file_tree, Fixture, Run};
use integration::pattern;

fn start(f: &Fixture, image: &Path, tag: &str) -> Daemon {
    f.start_daemon(image, tag, &[])
        .unwrap_or_else(|e| panic!("vhost-qvol ({tag}) did not start: {e}"))
}

/// Runs the daemon on `image` bound to `volume_id` (plus `extra`) and expects a refusal
/// naming `needle` that leaves the image as it was and creates no socket.
fn refused(f: &Fixture, image: &Path, volume_id: &str, extra: &[&str], needle: &str) -> String {
    let before = fs::read(image).expect("read the image");
    let keystore_before = file_tree(&f.keystore);
    let socket = f.path("refused.sock");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--blk-file"),
        image.as_os_str(),
        OsStr::new("--volume-id"),
        OsStr::new(volume_id),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let line = f.vhost_qvol(args).one_sentence_error("vhost-qvol", needle);
    assert!(
        fs::read(image).expect("read the image") == before,
        "the refused image changed"
    );
    assert!(!socket.exists(), "a socket was left behind");
    assert!(
        file_tree(&f.keystore) == keystore_before,
        "the refusal changed the keystore"
    );
    line
}

fn qvol(f: &Fixture, args: &[&OsStr]) -> Run {
    f.qvol(args)
}

/// A key for VM "vm" and a 16 MiB volume `disk.qvol` for it: (key id, image, volume id).
fn one_volume(f: &Fixture) -> (String, PathBuf, String) {
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let id = f.volume_id(&image);
    (key, image, id)
}

fn record_path(f: &Fixture, volume_id: &str) -> PathBuf {
    f.keystore.join("volumes").join(format!("{volume_id}.json"))
}

// Break 1: a daemon serves whatever image is at its path.

#[test]
fn another_volume_copied_to_the_path_is_refused() {
    let f = Fixture::new();
    let (k1, k2) = (f.new_key("vm1"), f.new_key("vm2"));
    let vm1 = f.create_image("vm1.qvol", "16M", &k1, &[]);
    let vm2 = f.create_image("vm2.qvol", "16M", &k2, &[]);
    let id2 = f.volume_id(&vm2);
    // Another VM's disk.
    fs::copy(&vm1, &vm2).unwrap();
    refused(&f, &vm2, &id2, &[], "refusing to open");
    // Two disks of one VM swapped.
    let d0 = f.create_image("vm1-d0.qvol", "16M", &k1, &[]);
    let d1 = f.create_image("vm1-d1.qvol", "16M", &k1, &[]);
    let id1 = f.volume_id(&d1);
    fs::copy(&d0, &d1).unwrap();
    refused(&f, &d1, &id1, &[], "refusing to open");
    // The right image, but a key the volume is not recorded for.
    let id0 = f.volume_id(&d0);
    refused(&f, &d0, &id0, &["--key", &k2], "recorded for key");
    let daemon = start(&f, &d0, "d0");
    daemon.stop();
}

#[test]
fn a_daemon_needs_a_binding_and_any_volume_warns() {
    let f = Fixture::new();
    let (_, image, _) = one_volume(&f);
    let socket = f.path("unbound.sock");
    let run = f.vhost_qvol([
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--blk-file"),
        image.as_os_str(),
    ]);
    run.one_sentence_error("vhost-qvol", "--volume-id");
    // Read-only too: another VM's disk served read-only is still its plaintext.
    let run = f.vhost_qvol([
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--blk-file"),
        image.as_os_str(),
        OsStr::new("--read-only"),
    ]);
    run.one_sentence_error("vhost-qvol", "--volume-id");
    let daemon = f.start_daemon(&image, "any", &["--any-volume"]).unwrap();
    assert!(
        daemon.log_text().contains("--any-volume"),
        "no warning: {}",
        daemon.log_text()
    );
    daemon.stop();
}

#[test]
fn a_volume_without_a_record_is_refused_until_adopted() {
    let f = Fixture::new();
    let (key, image, id) = one_volume(&f);
    // A deleted volume: its record is gone.
    qvol(
        &f,
        &[OsStr::new("volume"), OsStr::new("forget"), OsStr::new(&id)],
    )
    .success();
    refused(&f, &image, &id, &[], "qvol volume adopt");
    // Brought from another host: the key is exported there and imported here.
    let there = f.path("key.export");
    let pass = f.path("export-pass");
    fs::write(&pass, "export secret\n").unwrap();
    qvol(
        &f,
        &[
            OsStr::new("key"),
            OsStr::new("export"),
            OsStr::new(&key),
            OsStr::new("-o"),
            there.as_os_str(),
            OsStr::new("--export-passphrase-file"),
            pass.as_os_str(),
        ],
    )
    .success();
    let other = Fixture::new();
    other
        .qvol([
            OsStr::new("key"),
            OsStr::new("import"),
            there.as_os_str(),
            OsStr::new("--export-passphrase-file"),
            pass.as_os_str(),
        ])
        .success();
    refused(&other, &image, &id, &[], "qvol volume adopt");
    let adopted = other
        .qvol([OsStr::new("volume"), OsStr::new("adopt"), image.as_os_str()])
        .success();
    assert!(adopted.stdout.contains(&key), "{adopted:#?}");
    start(&other, &image, "adopted").stop();
}

// Break 2: the freshness check ran after the open had already committed.

#[test]
fn an_old_copy_holding_log_records_is_refused_before_anything_is_written() {
    let f = Fixture::new();
    let (_, image, id) = one_volume(&f);
    let daemon = start(&f, &image, "a");
    let mut c = daemon.client();
    c.write(0, &pattern::make(65536, 0, 1)).unwrap();
    // Taken while the log holds the write's records, before any commit.
    let old = fs::read(&image).unwrap();
    c.write(0, &pattern::make(65536, 0, 2)).unwrap();
    drop(c);
    daemon.stop();
    fs::write(&image, &old).unwrap();
    refused(&f, &image, &id, &[], "older");
    // `qvol info` says so too, and writes nothing either.
    let info = qvol(
        &f,
        &[OsStr::new("info"), image.as_os_str(), OsStr::new("--json")],
    )
    .success();
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["rolled_back"], true, "{doc}");
    assert!(
        fs::read(&image).unwrap() == old,
        "qvol info changed the image"
    );
}

// Break 3: a flushed write could be silently undone by zeroing the log.

#[test]
fn a_flushed_write_cannot_be_undone_by_zeroing_the_log() {
    let f = Fixture::new();
    let (_, image, id) = one_volume(&f);
    let daemon = start(&f, &image, "old");
    daemon
        .client()
        .write(0, &pattern::make(65536, 0, 1))
        .unwrap();
    daemon.stop();
    let mut daemon = start(&f, &image, "new");
    {
        let mut c = daemon.client();
        c.write(0, &pattern::make(65536, 0, 2)).unwrap();
        c.flush().unwrap();
    }
    daemon.kill9();
    let (_, header) = vhost_qvol::open::read_image_header(&image).unwrap();
    assert!(header.format_version >= 3, "new images are version 3");
    let mut bytes = fs::read(&image).unwrap();
    let log = 0x10000..0x10000 + usize::try_from(header.log_len).unwrap();
    bytes[log].fill(0);
    fs::write(&image, &bytes).unwrap();
    refused(&f, &image, &id, &[], "synced");
}

// Break 4: log records were tied to a generation number only.

fn log_region(image: &Path) -> std::ops::Range<usize> {
    let (_, header) = vhost_qvol::open::read_image_header(image).unwrap();
    0x10000..0x10000 + usize::try_from(header.log_len).unwrap()
}

#[test]
fn log_records_of_an_abandoned_history_do_not_replay() {
    let f = Fixture::new();
    let (_, image, id) = one_volume(&f);
    let backup = fs::read(&image).unwrap();
    // History H: a write, a commit at the next open, then a flushed write left in the log.
    let mut daemon = start(&f, &image, "h1");
    daemon
        .client()
        .write(0, &pattern::make(65536, 0, 1))
        .unwrap();
    daemon.kill9();
    let mut daemon = start(&f, &image, "h2");
    {
        let mut c = daemon.client();
        c.write(1 << 20, &pattern::make(65536, 1 << 20, 2)).unwrap();
        c.flush().unwrap();
    }
    daemon.kill9();
    let abandoned_log = fs::read(&image).unwrap()[log_region(&image)].to_vec();
    // The operator restores the backup (and re-adopts it): history H' reaches the same
    // generation with different content.
    fs::write(&image, &backup).unwrap();
    qvol(
        &f,
        &[OsStr::new("volume"), OsStr::new("forget"), OsStr::new(&id)],
    )
    .success();
    let adopt = [OsStr::new("volume"), OsStr::new("adopt"), image.as_os_str()];
    qvol(&f, &adopt).one_sentence_error("qvol", "--accept-rollback");
    let mut accepting = adopt.to_vec();
    accepting.push(OsStr::new("--accept-rollback"));
    qvol(&f, &accepting).success();
    let daemon = start(&f, &image, "h3");
    daemon
        .client()
        .write(0, &pattern::make(65536, 0, 3))
        .unwrap();
    daemon.stop();
    // The attacker splices H's log into H'.
    let mut bytes = fs::read(&image).unwrap();
    let region = log_region(&image);
    bytes[region].copy_from_slice(&abandoned_log);
    fs::write(&image, &bytes).unwrap();
    let daemon = start(&f, &image, "spliced");
    let mut c = daemon.client();
    assert!(
        c.read(1 << 20, 65536).unwrap() == vec![0u8; 65536],
        "a write of the abandoned history was replayed"
    );
    assert!(c.read(0, 65536).unwrap() == pattern::make(65536, 0, 3));
    drop(c);
    daemon.stop();
}

// Break 5: every daemon held the keystore's master seed.

fn memory_contains(pid: u32, needles: &[&[u8]]) -> Vec<bool> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("read /proc/PID/maps");
    let mem = fs::File::open(format!("/proc/{pid}/mem"))
        .expect("open /proc/PID/mem (the tests run as root, as CI does)");
    let mut found = vec![false; needles.len()];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut buf, start).is_err() {
            continue;
        }
        for (i, needle) in needles.iter().enumerate() {
            found[i] |= buf.windows(needle.len()).any(|w| w == *needle);
        }
    }
    found
}

#[test]
fn a_serving_daemon_holds_no_master_seed_and_dumps_no_core() {
    let f = Fixture::new();
    let (_, image, _) = one_volume(&f);
    let file: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(f.keystore.join("keystore.json")).unwrap())
            .unwrap();
    let seed_hex = file["seed"]
        .as_str()
        .expect("an unprotected keystore shows its seed");
    let seed = hex_decode(seed_hex);
    let daemon = start(&f, &image, "mem");
    let mut c = daemon.client();
    c.write(0, &pattern::make(4096, 0, 7)).unwrap();
    let image_path = image.to_string_lossy().into_owned();
    let found = memory_contains(
        daemon.pid(),
        &[&seed, seed_hex.as_bytes(), image_path.as_bytes()],
    );
    assert!(
        found[2],
        "the scan works: the image path is in the daemon's memory"
    );
    assert!(
        !found[0],
        "the master seed is in the serving daemon's memory"
    );
    assert!(
        !found[1],
        "the master seed (hex) is in the serving daemon's memory"
    );
    let limits = fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core size limit");
    assert!(
        core.split_whitespace().nth(4) == Some("0"),
        "core dumps are allowed: {core}"
    );
    // Sandboxed: keystore.json and the passphrase credential are out of its reach.
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
        "no_new_privs is not set: {status}"
    );
    assert!(
        daemon.log_text().contains("sandboxed (Landlock, seccomp)"),
        "{}",
        daemon.log_text()
    );
    drop(c);
    daemon.stop();
}

#[test]
fn a_daemon_keeps_no_descriptor_its_parent_left_open() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    let (_, image, id) = one_volume(&f);
    // A parent that leaks a descriptor (here: the keystore file itself) into the daemon.
    let leaked = fs::File::open(f.keystore.join("keystore.json")).unwrap();
    let raw = leaked.as_raw_fd();
    let socket = f.path("fds.sock");
    let mut cmd = f.command(&integration::bins::vhost_qvol());
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        .arg("--volume-id")
        .arg(&id);
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 onto fd 9, which
    // clears close-on-exec for the copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let daemon = Daemon::start_command(cmd, &socket, &f.path("fds.log")).unwrap();
    let keystore_file = fs::canonicalize(f.keystore.join("keystore.json")).unwrap();
    let open: Vec<PathBuf> = fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(
        open.iter().any(|p| p == &fs::canonicalize(&image).unwrap()),
        "the scan works: the image is open in the daemon ({open:?})"
    );
    assert!(
        !open.contains(&keystore_file),
        "the daemon kept the descriptor its parent leaked: {open:?}"
    );
    daemon.stop();
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

// Break 6: anyone who can write the keystore directory.

#[test]
fn an_older_or_deleted_volume_record_does_not_reenable_an_old_image() {
    let f = Fixture::new();
    let (_, image, id) = one_volume(&f);
    let record = record_path(&f, &id);
    let (old_image, old_record) = (fs::read(&image).unwrap(), fs::read(&record).unwrap());
    let daemon = start(&f, &image, "a");
    daemon
        .client()
        .write(0, &pattern::make(65536, 0, 1))
        .unwrap();
    daemon.stop();
    // A later start raises the keystore's floor for the volume.
    start(&f, &image, "b").stop();
    let current_image = fs::read(&image).unwrap();
    fs::write(&image, &old_image).unwrap();
    fs::write(&record, &old_record).unwrap();
    refused(&f, &image, &id, &[], "older");
    fs::remove_file(&record).unwrap();
    refused(&f, &image, &id, &[], "missing");
    // The operator sees it and repairs the record from the manifest: the old image stays
    // refused, the current one is served again.
    let check = qvol(&f, &[OsStr::new("keystore"), OsStr::new("check")]);
    check.one_sentence_error("qvol", "damaged");
    assert!(check.stdout.contains("qvol volume repair"), "{check:#?}");
    qvol(
        &f,
        &[OsStr::new("volume"), OsStr::new("repair"), OsStr::new(&id)],
    )
    .success();
    qvol(&f, &[OsStr::new("keystore"), OsStr::new("check")]).success();
    refused(&f, &image, &id, &[], "older");
    fs::write(&image, &current_image).unwrap();
    start(&f, &image, "c").stop();
}

#[test]
fn a_deleted_key_put_back_or_an_edited_key_record_is_refused() {
    let f = Fixture::new();
    let gone = f.new_key("vm2");
    let file = f.keystore.join("keys").join(format!("{gone}.json"));
    let saved = fs::read(&file).unwrap();
    qvol(
        &f,
        &[
            OsStr::new("key"),
            OsStr::new("delete"),
            OsStr::new(&gone),
            OsStr::new("--yes"),
        ],
    )
    .success();
    fs::write(&file, &saved).unwrap();
    qvol(
        &f,
        &[OsStr::new("key"), OsStr::new("show"), OsStr::new(&gone)],
    )
    .one_sentence_error("qvol", &gone);
    fs::remove_file(&file).unwrap();

    // current_generation set back after a rotation: new volumes would be wrapped for a
    // retired key.
    let key = f.new_key("vm1");
    qvol(
        &f,
        &[OsStr::new("key"), OsStr::new("rotate"), OsStr::new(&key)],
    )
    .success();
    let file = f.keystore.join("keys").join(format!("{key}.json"));
    let mut rec: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    rec["current_generation"] = 1.into();
    fs::write(&file, serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
    let image = f.path("x.qvol");
    qvol(
        &f,
        &[
            OsStr::new("create"),
            image.as_os_str(),
            OsStr::new("--size"),
            OsStr::new("16M"),
            OsStr::new("--key"),
            OsStr::new(&key),
        ],
    )
    .one_sentence_error("qvol", &key);
    assert!(!image.exists(), "a refused create left an image");
}

#[test]
fn a_replaced_keystore_file_is_refused() {
    let f = Fixture::with_passphrase("correct horse battery staple");
    let (_, image, id) = one_volume(&f);
    let ks = f.keystore.join("keystore.json");
    let genuine = fs::read(&ks).unwrap();
    // The attacker's own keystore, without a passphrase, over the real one.
    let attacker = Fixture::new();
    fs::copy(attacker.keystore.join("keystore.json"), &ks).unwrap();
    qvol(&f, &[OsStr::new("key"), OsStr::new("list")]).one_sentence_error("qvol", "passphrase");
    refused(&f, &image, &id, &[], "passphrase");
    assert!(
        fs::read_dir(f.keystore.join("keys")).unwrap().count() == 1,
        "a refused command wrote to the keystore"
    );
    // Without a passphrase configured, the manifest no longer verifies.
    let mut cmd = f.command(&integration::bins::qvol());
    cmd.env_remove("QVOL_PASSPHRASE_FILE").args(["key", "list"]);
    let out: Run = cmd.output().unwrap().into();
    out.one_sentence_error("qvol", "manifest");
    fs::write(&ks, &genuine).unwrap();
    qvol(&f, &[OsStr::new("key"), OsStr::new("list")]).success();
}

#[test]
fn removing_a_generation_a_volume_depends_on_needs_force() {
    let f = Fixture::new();
    let (key, image, id) = one_volume(&f);
    qvol(
        &f,
        &[OsStr::new("key"), OsStr::new("rotate"), OsStr::new(&key)],
    )
    .success();
    let remove = [
        OsStr::new("key"),
        OsStr::new("remove-generation"),
        OsStr::new(&key),
        OsStr::new("1"),
    ];
    let line = qvol(&f, &remove).one_sentence_error("qvol", &id);
    assert!(line.contains("--force"), "{line}");
    // The volume still opens: nothing was removed.
    start(&f, &image, "still").stop();
    let mut forced = remove.to_vec();
    forced.push(OsStr::new("--force"));
    qvol(&f, &forced).success();
}

// Break 7: argon2id parameters read from a file.

#[test]
fn forged_argon2_parameters_are_refused() {
    let f = Fixture::with_passphrase("correct horse battery staple");
    f.new_key("vm");
    let ks = f.keystore.join("keystore.json");
    let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(&ks).unwrap()).unwrap();
    doc["kdf"]["m_cost_kib"] = (4u64 << 20).into();
    doc["kdf"]["t_cost"] = 64.into();
    doc["kdf"]["p_cost"] = 64.into();
    fs::write(&ks, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    qvol(&f, &[OsStr::new("key"), OsStr::new("list")]).one_sentence_error("qvol", "argon2");
}

// Break 9: header text is shown before anything is authenticated.

#[test]
fn qvol_info_escapes_control_characters_of_the_header() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let name = "evil\x1b]0;owned\x07\x1b[2J\u{9b}1m";
    let image = f.create_image("disk.qvol", "16M", &key, &["--name", name]);
    let run = qvol(&f, &[OsStr::new("info"), image.as_os_str()]).success();
    for c in ['\x1b', '\x07', '\u{9b}'] {
        assert!(!run.stdout.contains(c), "{:?} reached the terminal", c);
    }
    assert!(run.stdout.contains("evil\\u{1b}]0;owned"), "{}", run.stdout);
}
