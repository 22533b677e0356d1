//! `qvol resize` end to end, through the binaries: an image grown offline serves its new
//! capacity to libblkio (the new range reads as zeros, the old data stays); a shrink needs
//! `--shrink`, says what it drops, needs `--yes`, and is refused while a snapshot holds data
//! past the new end; a shrink with `--yes` drops the tail. Bad input is one sentence, exit
//! 1, and the image byte for byte as it was. A served image grows through the daemon's
//! control socket (a connected client reads the new capacity on its next connection) and is
//! refused a shrink.

use std::path::Path;

use integration::daemon::Daemon;
use integration::fixture::{json_of, Fixture};
use integration::pattern;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn serve(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    f.start_daemon(image, tag, extra)
        .unwrap_or_else(|e| panic!("vhost-qvol did not start: {e}"))
}

fn info_size(f: &Fixture, image: &Path) -> u64 {
    json_of(&f.qvol(["info", s(image), "--json"]).success())["size"]
        .as_u64()
        .expect("qvol info --json has a size")
}

/// Writes each `(offset, data)` to `image` through a daemon and libblkio.
fn write_through_daemon(f: &Fixture, image: &Path, writes: &[(u64, &[u8])]) {
    let daemon = serve(f, image, "write", &[]);
    {
        let mut c = daemon.client();
        for (offset, data) in writes {
            // The client's buffer holds 1 MiB.
            for (i, chunk) in data.chunks(MIB as usize).enumerate() {
                c.write(offset + i as u64 * MIB, chunk).unwrap();
            }
        }
        c.flush().unwrap();
    }
    daemon.stop();
}

#[test]
fn a_grown_image_serves_its_new_capacity_and_keeps_its_data() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let head = pattern::make(256 << 10, 0, 1);
    let tail = pattern::make(64 << 10, 16 * MIB - (64 << 10), 2);
    write_through_daemon(&f, &image, &[(0, &head), (16 * MIB - (64 << 10), &tail)]);

    let grown = json_of(&f.qvol(["resize", s(&image), "+48M", "--json"]).success());
    assert_eq!(grown["old_size"], 16 * MIB, "{grown}");
    assert_eq!(grown["new_size"], 64 * MIB, "{grown}");
    assert_eq!(grown["online"], false, "{grown}");
    assert_eq!(info_size(&f, &image), 64 * MIB);
    let grown = f.qvol(["resize", s(&image), "1G"]).success();
    assert!(grown.stdout.contains("from 64 MiB to 1 GiB"), "{grown:#?}");
    assert_eq!(info_size(&f, &image), 1 << 30);
    // The same size again changes nothing.
    let same = f.qvol(["resize", s(&image), "1G"]).success();
    assert!(same.stdout.contains("already 1 GiB"), "{same:#?}");

    let daemon = serve(&f, &image, "grown", &[]);
    {
        let mut c = daemon.client();
        assert_eq!(c.capacity().unwrap(), 1 << 30);
        assert!(
            c.read(0, head.len()).unwrap() == head,
            "the old head changed"
        );
        assert!(
            c.read(16 * MIB - (64 << 10), tail.len()).unwrap() == tail,
            "the old tail changed"
        );
        let last = (1 << 30) - 4096;
        assert!(c.read(16 * MIB, 4096).unwrap().iter().all(|&b| b == 0));
        assert!(c.read(last, 4096).unwrap().iter().all(|&b| b == 0));
        let block = pattern::make(4096, last, 3);
        c.write(last, &block).unwrap();
        c.flush().unwrap();
        assert!(c.read(last, 4096).unwrap() == block);
    }
    daemon.stop();
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
}

#[test]
fn a_shrink_needs_shrink_and_yes_is_refused_for_a_snapshot_and_drops_the_tail() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "32M", &key, &[]);
    let head = pattern::make(1 << 20, 0, 1);
    let tail = pattern::make(2 << 20, 20 * MIB, 2);
    write_through_daemon(&f, &image, &[(0, &head), (20 * MIB, &tail)]);
    let before = std::fs::read(&image).unwrap();

    let run = f.qvol(["resize", s(&image), "16M"]);
    run.one_sentence_error("qvol", "--shrink");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
    // --shrink without --yes: the plan, exit 1, nothing changed.
    let run = f.qvol(["resize", s(&image), "16M", "--shrink"]);
    let line = run.one_sentence_error("qvol", "drops 2 MiB of data");
    assert!(line.contains("--yes"), "{line}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );

    // A snapshot holding the tail blocks the shrink, even with --yes.
    f.qvol(["snapshot", "create", s(&image), "keep"]).success();
    let before = std::fs::read(&image).unwrap();
    let run = f.qvol(["resize", s(&image), "16M", "--shrink", "--yes"]);
    let line = run.one_sentence_error("qvol", "snapshot \"keep\"");
    assert!(line.contains("delete it first"), "{line}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
    // ... but not a shrink that keeps everything the snapshot holds.
    let kept = json_of(
        &f.qvol(["resize", s(&image), "24M", "--shrink", "--yes", "--json"])
            .success(),
    );
    assert_eq!(kept["new_size"], 24 * MIB, "{kept}");
    assert_eq!(kept["dropped_bytes"], 0, "{kept}");
    f.qvol(["snapshot", "delete", s(&image), "keep"]).success();

    let shrunk = json_of(
        &f.qvol(["resize", s(&image), "16M", "--shrink", "--yes", "--json"])
            .success(),
    );
    assert_eq!(shrunk["old_size"], 24 * MIB, "{shrunk}");
    assert_eq!(shrunk["new_size"], 16 * MIB, "{shrunk}");
    assert_eq!(shrunk["dropped_bytes"], 2 * MIB, "{shrunk}");
    assert_eq!(info_size(&f, &image), 16 * MIB);
    // Grown again, the dropped range reads as zeros.
    f.qvol(["resize", s(&image), "32M"]).success();
    let daemon = serve(&f, &image, "shrunk", &[]);
    {
        let mut c = daemon.client();
        assert_eq!(c.capacity().unwrap(), 32 * MIB);
        assert!(c.read(0, head.len()).unwrap() == head, "the head changed");
        for at in [20 * MIB, 21 * MIB] {
            assert!(
                c.read(at, MIB as usize).unwrap().iter().all(|&b| b == 0),
                "the dropped tail came back at {at}"
            );
        }
    }
    daemon.stop();
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
}

#[test]
fn bad_sizes_are_one_sentence_and_change_nothing() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let before = std::fs::read(&image).unwrap();
    for (size, needle) in [
        ("16385K", "multiple of 4 KiB"),
        ("10000", "multiple of 4 KiB"),
        ("+100", "multiple of 4 KiB"),
        ("0", "non-zero"),
        ("lots", "is not a size"),
        ("+", "is not a size"),
        ("1.5G", "is not a size"),
        ("-4M", "negative"),
        ("8M", "--shrink"),
        ("257T", "larger than a volume can be"),
        ("99999999999T", "too large"),
    ] {
        let run = f.qvol(["resize", s(&image), size]);
        run.one_sentence_error("qvol", needle);
        assert!(
            std::fs::read(&image).unwrap() == before,
            "resize {size} changed the image"
        );
    }
    assert_eq!(info_size(&f, &image), 16 * MIB);
}

#[test]
fn a_served_image_grows_through_its_daemon_and_is_refused_a_shrink() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let daemon = serve(&f, &image, "live", &["--control-socket", s(&ctl)]);
    let data = pattern::make(64 << 10, 0, 1);
    let mut c = daemon.client();
    c.write(0, &data).unwrap();
    c.flush().unwrap();
    assert_eq!(c.capacity().unwrap(), 16 * MIB);

    let grown = json_of(&f.qvol(["resize", s(&image), "+16M", "--json"]).success());
    assert_eq!(grown["old_size"], 16 * MIB, "{grown}");
    assert_eq!(grown["new_size"], 32 * MIB, "{grown}");
    assert_eq!(grown["online"], true, "{grown}");
    // libblkio gives the backend no request channel (QEMU does: guest_resize.rs), so there
    // is nobody to tell; it reads the capacity when it connects.
    assert_eq!(grown["notified"], false, "{grown}");
    // The connected client may write to the new range at once.
    let block = pattern::make(4096, 32 * MIB - 4096, 2);
    c.write(32 * MIB - 4096, &block).unwrap();
    c.flush().unwrap();
    drop(c);

    let run = f.qvol(["resize", s(&image), "8M", "--shrink", "--yes"]);
    run.one_sentence_error("qvol", "stop the VM first");
    let status = json_of(&f.qvol(["stats", s(&image), "--json"]).success());
    assert_eq!(status["volume"]["size"], 32 * MIB, "{status}");
    {
        let mut c = daemon.client();
        assert_eq!(c.capacity().unwrap(), 32 * MIB);
        assert!(c.read(0, data.len()).unwrap() == data);
        assert!(c.read(32 * MIB - 4096, 4096).unwrap() == block);
    }
    daemon.stop();
    assert_eq!(info_size(&f, &image), 32 * MIB);
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
}
