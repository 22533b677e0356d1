//! `qvol import` and `qvol export` against real images made with `qemu-img` and `qemu-io`:
//! a qcow2 with a backing file, compressed clusters and holes comes in identical and sparse,
//! raw, qcow2 and vmdk go round trip, a LUKS image imports with its passphrase, bad input is
//! refused in one sentence leaving nothing behind, and an import killed before it is recorded
//! leaves no volume record. A missing `qemu-img` or `qemu-io` fails the test and names
//! `scripts/setup.sh`; nothing here is skipped.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use integration::bins;
use integration::daemon::wait_within;
use integration::fixture::{file_tree, json_of, Fixture, Run, COMMAND_TIMEOUT};
use integration::guest::{find_in_path, SETUP_HINT};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Runs `cmd` to completion (at most [`COMMAND_TIMEOUT`]) with no input.
fn bounded(mut cmd: Command, what: &str) -> Run {
    let mut out = tempfile::tempfile().expect("a temporary file");
    let mut err = tempfile::tempfile().expect("a temporary file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}); {SETUP_HINT}"));
    let status = wait_within(&mut child, COMMAND_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for the child");
    let text = |f: &mut fs::File| {
        let mut s = String::new();
        f.rewind().expect("rewind");
        f.read_to_string(&mut s).expect("read the output");
        s
    };
    let run = Run {
        code: status.code().unwrap_or(-(status.signal().unwrap_or(0))),
        stdout: text(&mut out),
        stderr: text(&mut err),
    };
    assert!(
        status.code().is_some() || status.signal() == Some(libc::SIGABRT),
        "{what} did not exit within {COMMAND_TIMEOUT:?}: {run:#?}"
    );
    run
}

/// `qemu-img ARGS`, which must succeed.
fn qemu_img<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Run {
    tool("qemu-img", args).success()
}

/// `qemu-io ARGS`, which must succeed (qemu-io reports a failed command on stdout).
fn qemu_io<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Run {
    let run = tool("qemu-io", args).success();
    assert!(
        !run.stdout.contains("failed") && !run.stdout.contains("Pattern verification"),
        "qemu-io: {run:#?}"
    );
    run
}

fn tool<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(name: &str, args: I) -> Run {
    let program = find_in_path(name)
        .unwrap_or_else(|| panic!("{name} (qemu-utils) is not installed; {SETUP_HINT}"));
    let mut cmd = Command::new(program);
    cmd.args(args);
    bounded(cmd, name)
}

/// A private `TMPDIR` for `qvol`, to see what its NBD bridge leaves behind.
fn tmpdir(f: &Fixture) -> PathBuf {
    let dir = f.path("tmp");
    fs::create_dir_all(&dir).expect("create the TMPDIR");
    dir
}

/// `qvol ARGS` with `TMPDIR` set to [`tmpdir`] and extra environment `env`.
fn qvol_env(f: &Fixture, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = f.command(&bins::qvol());
    cmd.env("TMPDIR", tmpdir(f)).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    bounded(cmd, "qvol")
}

fn qvol(f: &Fixture, args: &[&str]) -> Run {
    qvol_env(f, &[], args)
}

/// Bytes the file takes on the host.
fn on_disk(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

/// The data extents of an image as `qemu-img map` reports them, adjacent ones merged.
fn data_extents(image: &Path, format: &str) -> Vec<(u64, u64)> {
    let run = qemu_img(["map", "--output=json", "-f", format, s(image)]);
    let map: Value = serde_json::from_str(&run.stdout).expect("qemu-img map prints JSON");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().expect("a list of extents") {
        if e["data"] != true {
            continue;
        }
        let start = e["start"].as_u64().expect("start");
        let end = start + e["length"].as_u64().expect("length");
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// `qemu-img compare` of two images, which must find them identical.
fn assert_identical(a: (&Path, &str), b: (&Path, &str)) {
    let run = tool(
        "qemu-img",
        ["compare", "-f", a.1, "-F", b.1, s(a.0), s(b.0)],
    );
    assert_eq!(
        run.code,
        0,
        "qemu-img compare finds {} and {} different: {run:#?}",
        a.0.display(),
        b.0.display()
    );
    assert!(run.stdout.contains("Images are identical"), "{run:#?}");
}

/// `qvol import SRC DEST --key KEY EXTRA... --json`, which must succeed; its JSON line.
fn import(f: &Fixture, src: &Path, dest: &Path, key: &str, extra: &[&str]) -> Value {
    let mut args = vec!["import", s(src), s(dest), "--key", key];
    args.extend_from_slice(extra);
    args.push("--json");
    let doc = json_of(&qvol(f, &args).success());
    assert_eq!(doc["verified"], true, "{doc}");
    assert_eq!(doc["key_id"], key, "{doc}");
    doc
}

/// `qvol export IMAGE DEST -O FMT --json`, which must succeed; its JSON line.
fn export(f: &Fixture, image: &Path, dest: &Path, format: &str) -> Value {
    let doc = json_of(&qvol(f, &["export", s(image), s(dest), "-O", format, "--json"]).success());
    assert_eq!(doc["verified"], true, "{doc}");
    doc
}

/// (1) A qcow2 whose data is partly in a compressed backing file, partly in the overlay, with
/// a zeroed range over backing data and holes everywhere else.
#[test]
fn a_qcow2_with_a_backing_file_compressed_clusters_and_holes_imports_identical_and_sparse() {
    let f = Fixture::new();
    let key = f.new_key("imported");
    let (base_raw, base, top) = (
        f.path("base.raw"),
        f.path("base.qcow2"),
        f.path("top.qcow2"),
    );
    qemu_img(["create", "-q", "-f", "raw", s(&base_raw), "64M"]);
    qemu_io([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -P 0x22 8M 1M",
        s(&base_raw),
    ]);
    qemu_img([
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&base_raw),
        s(&base),
    ]);
    let check: Value =
        serde_json::from_str(&tool("qemu-img", ["check", "--output=json", s(&base)]).stdout)
            .expect("qemu-img check prints JSON");
    assert!(
        check["compressed-clusters"].as_u64() > Some(0),
        "the base has no compressed clusters: {check}"
    );
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 16M 1M",
        "-c",
        "write -z 8M 512k",
        "-c",
        "write -P 0x44 63M 1M",
        s(&top),
    ]);
    // What the guest sees as data: 1 MiB and the upper half of 8 MiB from the base, 1 MiB at
    // 16 MiB and at 63 MiB from the overlay.
    let expected = vec![
        (0, MIB),
        (8 * MIB + MIB / 2, 9 * MIB),
        (16 * MIB, 17 * MIB),
        (63 * MIB, 64 * MIB),
    ];
    let data: u64 = expected.iter().map(|(a, b)| b - a).sum();
    assert_eq!(
        data_extents(&base_raw, "raw").len(),
        2,
        "the base has two data ranges"
    );

    let image = f.path("top.qvol");
    let doc = import(&f, &top, &image, &key, &[]);
    assert_eq!(doc["format"], "qcow2", "{doc}");
    assert_eq!(doc["size"], 64 * MIB, "{doc}");
    let allocated = doc["allocated_bytes"].as_u64().expect("allocated_bytes");
    assert!(
        (data..=data + 256 * 1024).contains(&allocated),
        "{allocated} bytes allocated for {data} bytes of data: holes or zeros were written ({doc})"
    );
    assert!(
        on_disk(&image) < data + 2 * MIB,
        "the image takes {} bytes on disk for {data} bytes of data",
        on_disk(&image)
    );
    let info = json_of(&qvol(&f, &["info", s(&image), "--json"]).success());
    assert_eq!(info["recorded"], true, "{info}");
    assert_eq!(info["allocated_bytes"], allocated, "{info}");

    let raw = f.path("top.raw");
    let out = export(&f, &image, &raw, "raw");
    assert_identical((&top, "qcow2"), (&raw, "raw"));
    assert_eq!(
        data_extents(&raw, "raw"),
        expected,
        "the export's data is not where the source's is"
    );
    assert_eq!(out["dest_actual_bytes"], on_disk(&raw), "{out}");
    assert!(on_disk(&raw) <= data, "the export is not sparse: {out}");
    assert!(
        fs::read_dir(tmpdir(&f)).unwrap().next().is_none(),
        "import/export left files in TMPDIR"
    );
}

/// (2) raw, qcow2 and vmdk, each into a volume and back out in the same format.
#[test]
fn raw_qcow2_and_vmdk_go_round_trip() {
    let f = Fixture::new();
    let key = f.new_key("trip");
    let src_raw = f.path("src.raw");
    qemu_img(["create", "-q", "-f", "raw", s(&src_raw), "32M"]);
    qemu_io([
        "-f",
        "raw",
        "-c",
        "write -P 0xa1 0 64k",
        "-c",
        "write -P 0xb2 3M 1M",
        "-c",
        "write -P 0xc3 20M 12k",
        "-c",
        "write -P 0xd4 32764k 4k",
        s(&src_raw),
    ]);
    let data = 64 * 1024 + MIB + 12 * 1024 + 4096;
    for format in ["raw", "qcow2", "vmdk"] {
        let src = if format == "raw" {
            src_raw.clone()
        } else {
            let p = f.path(&format!("src.{format}"));
            qemu_img(["convert", "-f", "raw", "-O", format, s(&src_raw), s(&p)]);
            p
        };
        let image = f.path(&format!("{format}.qvol"));
        let extra: &[&str] = if format == "raw" {
            &["--format", "raw"]
        } else {
            &[]
        };
        let doc = import(&f, &src, &image, &key, extra);
        assert_eq!(doc["format"], format, "{doc}");
        let allocated = doc["allocated_bytes"].as_u64().unwrap();
        assert!(
            (data..data + 256 * 1024).contains(&allocated),
            "{format}: {allocated} bytes allocated for {data} bytes of data"
        );
        let back = f.path(&format!("back.{format}"));
        export(&f, &image, &back, format);
        let info = json_of(&qemu_img(["info", "--output=json", s(&back)]));
        assert_eq!(info["format"], format, "{info}");
        assert_identical((&src, format), (&back, format));
        if format == "raw" {
            assert!(
                on_disk(&back) <= data,
                "the exported raw file takes {} bytes for {data} bytes of data",
                on_disk(&back)
            );
        }
    }
}

/// (3) A LUKS image (qemu's own encryption) imports with its passphrase.
#[test]
fn a_luks_image_imports_with_its_passphrase() {
    let f = Fixture::new();
    let key = f.new_key("luks");
    let luks = f.path("src.luks");
    let opts = format!("driver=luks,key-secret=s0,file.filename={}", s(&luks));
    create_luks(&luks, "16M");
    let secret = ["--object", "secret,id=s0,data=PASS", "--image-opts"];
    let mut write = secret.to_vec();
    write.extend([
        "-c",
        "write -P 0x5a 1M 2M",
        "-c",
        "write -P 0xa5 15M 4k",
        &opts,
    ]);
    qemu_io(write);
    assert!(
        !rootfs_contains(&luks, &[0x5a; 4096]),
        "the LUKS image holds its data in plaintext"
    );
    let pass = f.path("luks-pass");
    fs::write(&pass, "PASS").unwrap();

    // Without the passphrase, or with a wrong one: refused, nothing made.
    let image = f.path("luks.qvol");
    let before = file_tree(&f.keystore);
    let run = qvol(
        &f,
        &[
            "import",
            s(&luks),
            s(&image),
            "--key",
            &key,
            "--format",
            "luks",
        ],
    );
    run.one_sentence_error("qvol", "--source-passphrase-file");
    let wrong = f.path("wrong-pass");
    fs::write(&wrong, "WRONG").unwrap();
    let run = qvol(
        &f,
        &[
            "import",
            s(&luks),
            s(&image),
            "--key",
            &key,
            "--format",
            "luks",
            "--source-passphrase-file",
            s(&wrong),
        ],
    );
    run.one_sentence_error("qvol", "Invalid password");
    assert!(!image.exists(), "a refused import left {}", image.display());
    assert!(
        file_tree(&f.keystore) == before,
        "a refused import changed the keystore"
    );

    let doc = import(
        &f,
        &luks,
        &image,
        &key,
        &["--format", "luks", "--source-passphrase-file", s(&pass)],
    );
    assert_eq!(doc["format"], "luks", "{doc}");
    assert_eq!(doc["size"], 16 * MIB, "{doc}");
    let raw = f.path("luks.raw");
    export(&f, &image, &raw, "raw");
    qemu_io([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 1M 2M",
        "-c",
        "read -P 0xa5 15M 4k",
        s(&raw),
    ]);
    let mut compare = vec![
        "compare",
        "--object",
        "secret,id=s0,data=PASS",
        "--image-opts",
    ];
    let raw_opts = format!("driver=raw,file.filename={}", s(&raw));
    compare.extend([opts.as_str(), raw_opts.as_str()]);
    let run = tool("qemu-img", compare);
    assert_eq!(
        run.code, 0,
        "the export differs from the LUKS source: {run:#?}"
    );
    assert!(
        !rootfs_contains(&image, &[0x5a; 4096]),
        "the volume holds the data in plaintext"
    );
}

/// (3b) A LUKS passphrase file written as qvol's own passphrase files are (`echo PASS > FILE`,
/// read without its trailing newline) works as well.
#[test]
fn a_luks_passphrase_file_may_end_in_a_newline() {
    let f = Fixture::new();
    let key = f.new_key("luks");
    let luks = f.path("src.luks");
    create_luks(&luks, "4M");
    let pass = f.path("luks-pass");
    fs::write(&pass, "PASS\n").unwrap();
    let image = f.path("luks.qvol");
    let doc = import(
        &f,
        &luks,
        &image,
        &key,
        &["--format", "luks", "--source-passphrase-file", s(&pass)],
    );
    assert_eq!(doc["size"], 4 * MIB, "{doc}");
}

/// `qemu-img create -f luks` with passphrase `PASS`. Its PBKDF benchmark now and then fails
/// with "Unable to get accurate CPU usage" (qemu-img 7.2, about one run in six here): that
/// one error is retried.
fn create_luks(path: &Path, size: &str) {
    for _ in 0..5 {
        let run = tool(
            "qemu-img",
            [
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,id=s0,data=PASS",
                "-o",
                "key-secret=s0,iter-time=10",
                s(path),
                size,
            ],
        );
        if run.code == 0 {
            return;
        }
        assert!(
            run.stderr.contains("Unable to get accurate CPU usage"),
            "qemu-img create -f luks failed: {run:#?}"
        );
        let _ = fs::remove_file(path);
    }
    panic!("qemu-img create -f luks failed five times in its PBKDF benchmark");
}

fn rootfs_contains(path: &Path, needle: &[u8]) -> bool {
    integration::rootfs::file_contains(path, needle)
}

/// (4) Bad input: one sentence, exit 1, no destination left, the keystore untouched.
#[test]
fn bad_input_is_refused_in_one_sentence_and_leaves_nothing() {
    let f = Fixture::new();
    let key = f.new_key("bad");
    let good = f.path("good.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&good), "8M"]);
    qemu_io(["-f", "qcow2", "-c", "write -P 0x77 0 64k", s(&good)]);
    let garbage = f.path("garbage.bin");
    fs::write(&garbage, vec![0x5cu8; 1 << 16]).unwrap();
    // A qcow2 whose backing file is gone.
    let (gone, orphan) = (f.path("gone.qcow2"), f.path("orphan.qcow2"));
    qemu_img(["create", "-q", "-f", "qcow2", s(&gone), "8M"]);
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&gone),
        "-F",
        "qcow2",
        s(&orphan),
    ]);
    fs::remove_file(&gone).unwrap();
    let existing = f.path("existing.qvol");
    fs::write(&existing, b"not to be touched").unwrap();
    let volume = f.path("volume.qvol");
    import(&f, &good, &volume, &key, &[]);
    let out_existing = f.path("existing.raw");
    fs::write(&out_existing, b"not to be touched either").unwrap();
    let dest = f.path("dest.qvol");
    let out = f.path("out.raw");

    let cases: Vec<(&str, Vec<&str>, &str, &Path)> = vec![
        (
            "a file qemu-img cannot read as the format given",
            vec![
                "import",
                s(&garbage),
                s(&dest),
                "--key",
                &key,
                "--format",
                "qcow2",
            ],
            "qemu-img cannot read",
            &dest,
        ),
        (
            "a qcow2 whose backing file is gone",
            vec!["import", s(&orphan), s(&dest), "--key", &key],
            "gone.qcow2",
            &dest,
        ),
        (
            "a missing source",
            vec!["import", "/nonexistent/src.qcow2", s(&dest), "--key", &key],
            "/nonexistent/src.qcow2",
            &dest,
        ),
        (
            "an existing destination",
            vec!["import", s(&good), s(&existing), "--key", &key],
            "already exists",
            &existing,
        ),
        (
            "an unknown key",
            vec!["import", s(&good), s(&dest), "--key", "nobody-00000000"],
            "nobody-00000000",
            &dest,
        ),
        (
            "an export to an existing file",
            vec!["export", s(&volume), s(&out_existing)],
            "already exists",
            &out_existing,
        ),
        (
            "an export of a file that is not a qvol image",
            vec!["export", s(&good), s(&out)],
            "not a usable qvol image",
            &out,
        ),
    ];
    for (what, args, needle, target) in cases {
        let keystore = file_tree(&f.keystore);
        let target_before = fs::read(target).ok();
        let volume_before = fs::read(&volume).unwrap();
        let run = qvol(&f, &args);
        let line = run.one_sentence_error("qvol", needle);
        assert_eq!(
            fs::read(target).ok(),
            target_before,
            "{what}: {} was made or changed ({line})",
            target.display()
        );
        assert!(
            file_tree(&f.keystore) == keystore,
            "{what}: the keystore changed ({line})"
        );
        assert_eq!(
            fs::read(&volume).unwrap(),
            volume_before,
            "{what}: the volume changed"
        );
        assert!(
            fs::read_dir(tmpdir(&f)).unwrap().next().is_none(),
            "{what}: TMPDIR is not empty"
        );
    }
}

/// (5) An import killed after the copy, before the volume is recorded.
#[test]
fn an_import_killed_before_it_is_recorded_leaves_no_volume_record() {
    let f = Fixture::new();
    let key = f.new_key("killed");
    let src = f.path("src.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&src), "16M"]);
    qemu_io(["-f", "qcow2", "-c", "write -P 0x3c 4M 1M", s(&src)]);
    let before = file_tree(&f.keystore);
    let image = f.path("killed.qvol");
    let run = qvol_env(
        &f,
        &[("QVOL_FAILPOINT", "qvol:imported")],
        &["import", s(&src), s(&image), "--key", &key],
    );
    assert_eq!(
        run.code,
        -libc::SIGABRT,
        "the import did not stop at qvol:imported: {run:#?}"
    );
    assert!(
        run.stderr.contains("failpoint qvol:imported: aborting"),
        "{run:#?}"
    );
    assert!(
        file_tree(&f.keystore) == before,
        "the killed import changed the keystore"
    );
    let check = qvol(&f, &["keystore", "check"]).success();
    assert!(check.stdout.contains("every record verifies"), "{check:#?}");

    // What it leaves: the destination, complete but not recorded (`qvol volume adopt` would
    // take it), and the NBD bridge's private socket directory in TMPDIR.
    let leftovers: Vec<String> = fs::read_dir(tmpdir(&f))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!(
        "a killed import leaves {} ({} bytes) and in TMPDIR {leftovers:?}",
        image.display(),
        fs::metadata(&image).map(|m| m.len()).unwrap_or(0)
    );
    assert!(
        leftovers.iter().all(|n| n.starts_with("qvol-nbd-")),
        "{leftovers:?}"
    );
    assert!(image.exists(), "the killed import left no destination");
    let info = json_of(&qvol(&f, &["info", s(&image), "--json"]).success());
    assert_eq!(info["recorded"], false, "{info}");
    let text = qvol(&f, &["info", s(&image)]).success();
    assert!(
        text.stdout.contains("not recorded in this keystore"),
        "{text:#?}"
    );
    // It is refused as a destination, and once removed the import goes through.
    qvol(&f, &["import", s(&src), s(&image), "--key", &key])
        .one_sentence_error("qvol", "already exists");
    fs::remove_file(&image).unwrap();
    let doc = import(&f, &src, &image, &key, &[]);
    let info = json_of(&qvol(&f, &["info", s(&image), "--json"]).success());
    assert_eq!(info["recorded"], true, "{info}");
    assert_eq!(info["volume_id"], doc["volume_id"], "{info}");
}
