//! Compression end to end, through the binaries (docs/FORMAT.md §18): `qvol create
//! --compress zstd[:LEVEL] --compress-unit SIZE` makes a volume with compression units;
//! text-like data written through a daemon and libblkio is stored at better than 1.5 to 1,
//! which `qvol info` and `qvol stats` report beside the setting; `qvol compress IMAGE
//! off|zstd[:LEVEL]` changes the setting of new writes and the data stays readable. Bad
//! settings are one sentence, exit 1, and leave the image byte for byte as it was (or no
//! image at all); a volume created without compression refuses `qvol compress`, and a
//! served one is named as in use.

use std::path::Path;

use integration::daemon::Daemon;
use integration::fixture::{json_of, Fixture};
use integration::pattern;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn serve(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    f.start_daemon(image, tag, extra)
        .unwrap_or_else(|e| panic!("vhost-qvol did not start: {e}"))
}

fn info(f: &Fixture, image: &Path) -> Value {
    json_of(&f.qvol(["info", s(image), "--json"]).success())
}

/// `len` bytes of log-like text (different on every line, as a filesystem's text is).
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "{seed}-{line:08}: GET /api/v1/volumes/{} HTTP/1.1 200 {} bytes in {} ms\n",
                line * 7919 % 10007,
                line * 31 % 4099,
                line % 97
            )
            .as_bytes(),
        );
        line += 1;
    }
    out.truncate(len);
    out
}

/// Writes each `(offset, data)` through `daemon` (1 MiB at a time: the client's buffer).
fn write(daemon: &Daemon, writes: &[(u64, &[u8])]) {
    let mut c = daemon.client();
    for (offset, data) in writes {
        for (i, chunk) in data.chunks(MIB as usize).enumerate() {
            c.write(offset + i as u64 * MIB, chunk).unwrap();
        }
    }
    c.flush().unwrap();
}

fn ratio(doc: &Value) -> f64 {
    doc["compression_ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("no compression_ratio in {doc}"))
}

#[test]
fn a_compressed_volume_reports_its_setting_and_ratio_and_changes_level() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image(
        "disk.qvol",
        "32M",
        &key,
        &["--compress", "zstd:5", "--compress-unit", "32K"],
    );
    let doc = info(&f, &image);
    assert_eq!(doc["compression_unit_bytes"], 32 << 10, "{doc}");
    assert_eq!(doc["compress_level"], 5, "{doc}");
    assert_eq!(ratio(&doc), 1.0, "{doc}");
    let out = f.qvol(["info", s(&image)]).success().stdout;
    assert!(
        out.contains("compression:    zstd level 5, 32 KiB units; no data stored yet"),
        "{out}"
    );
    // Without the key: what the header says.
    let stranger = Fixture::new();
    let out = stranger.qvol(["info", s(&image)]).success().stdout;
    assert!(
        out.contains("compression:    32 KiB units (the level and ratio need the volume key)"),
        "{out}"
    );
    let doc = json_of(&stranger.qvol(["info", s(&image), "--json"]).success());
    assert_eq!(doc["compression_unit_bytes"], 32 << 10, "{doc}");
    assert!(doc.get("compress_level").is_none(), "{doc}");

    // Text through a served disk; the daemon's statistics say what it achieved.
    let logs = text(4 * MIB as usize, 1);
    let ctl = f.path("ctl.sock");
    let daemon = serve(&f, &image, "text", &["--control-socket", s(&ctl)]);
    write(&daemon, &[(0, &logs)]);
    let stats = json_of(&f.qvol(["stats", s(&image), "--json"]).success());
    let v = &stats["volume"];
    assert_eq!(v["compression_unit_bytes"], 32 << 10, "{stats}");
    assert_eq!(v["compress_level"], 5, "{stats}");
    assert!(ratio(v) > 1.5, "{stats}");
    let out = f.qvol(["stats", s(&image)]).success().stdout;
    assert!(
        out.contains("compression:  zstd level 5, 32 KiB units; ratio "),
        "{out}"
    );
    daemon.stop();
    let doc = info(&f, &image);
    let compressed = ratio(&doc);
    assert!(compressed > 1.5, "{doc}");
    assert_eq!(doc["compression_usage"]["plain_blocks"], 0, "{doc}");
    assert_eq!(
        doc["compression_usage"]["unit_lbns"],
        4 * MIB / 4096,
        "{doc}"
    );

    // Off: new writes are stored plain, the compressed units stay as they are.
    let out = f.qvol(["compress", s(&image), "off"]).success().stdout;
    assert_eq!(
        out.trim(),
        format!(
            "Compression of new writes to {}: off (was zstd level 5), in 32 KiB units.",
            image.display()
        )
    );
    let doc = info(&f, &image);
    assert_eq!(doc["compress_level"], Value::Null, "{doc}");
    assert_eq!(doc["compression_unit_bytes"], 32 << 10, "{doc}");
    assert_eq!(ratio(&doc), compressed, "{doc}");
    let out = f.qvol(["info", s(&image)]).success().stdout;
    assert!(
        out.contains("compression:    off (32 KiB units); ratio "),
        "{out}"
    );

    let more = text(MIB as usize, 2);
    let noise = pattern::make(MIB as usize, 8 * MIB, 3);
    let daemon = serve(&f, &image, "plain", &[]);
    write(&daemon, &[(4 * MIB, &more), (8 * MIB, &noise)]);
    {
        let mut c = daemon.client();
        for (offset, data) in [(0, &logs), (4 * MIB, &more), (8 * MIB, &noise)] {
            for (i, chunk) in data.chunks(MIB as usize).enumerate() {
                let at = offset + i as u64 * MIB;
                assert!(c.read(at, chunk.len()).unwrap() == chunk, "at {at}");
            }
        }
    }
    daemon.stop();
    let doc = info(&f, &image);
    assert_eq!(
        doc["compression_usage"]["plain_blocks"],
        2 * MIB / 4096,
        "{doc}"
    );
    assert!(ratio(&doc) < compressed, "{doc}");

    // And on again, at the default level.
    let done = json_of(&f.qvol(["compress", s(&image), "zstd", "--json"]).success());
    assert_eq!(done["compress_level"], 3, "{done}");
    assert_eq!(done["previous_level"], Value::Null, "{done}");
    assert_eq!(done["compression_unit_bytes"], 32 << 10, "{done}");
    assert_eq!(info(&f, &image)["compress_level"], 3);
}

#[test]
fn bad_settings_are_one_sentence_and_change_nothing() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &["--compress", "zstd"]);
    let before = std::fs::read(&image).unwrap();
    for (setting, needle) in [
        (
            "lz4",
            "unknown compression \"lz4\": give zstd, zstd:LEVEL or off",
        ),
        ("zstd:99", "zstd levels are -7 to -1 and 1 to 22, not 99"),
        ("zstd:0", "not 0"),
        ("zstd:abc", "\"abc\" is not a zstd level"),
        ("zstd:", "is not a zstd level"),
        ("off:1", "off takes no level"),
    ] {
        let run = f.qvol(["compress", s(&image), setting]);
        let line = run.one_sentence_error("qvol", needle);
        assert!(line.contains("nothing was changed"), "{line}");
        assert!(
            std::fs::read(&image).unwrap() == before,
            "compress {setting} changed the image"
        );
    }
    assert_eq!(info(&f, &image)["compress_level"], 3);

    for (flags, needle) in [
        (&["--compress", "lz4"][..], "unknown compression \"lz4\""),
        (&["--compress", "zstd:99"], "not 99"),
        (&["--compress", "zstd:abc"], "\"abc\" is not a zstd level"),
        (&["--compress", "zstd:0"], "not 0"),
        (&["--compress-unit", "16K"], "needs --compress"),
        (
            &["--compress", "off", "--compress-unit", "8K"],
            "needs --compress",
        ),
        (
            &["--compress", "zstd", "--compress-unit", "128K"],
            "a compression unit is 8K, 16K, 32K or 64K, not \"128K\"",
        ),
    ] {
        let new = f.path("new.qvol");
        let mut args = vec!["create", s(&new), "--size", "16M", "--key", &key];
        args.extend_from_slice(flags);
        f.qvol(&args).one_sentence_error("qvol", needle);
        assert!(!new.exists(), "create {flags:?} left an image");
    }
}

#[test]
fn a_volume_without_compression_units_refuses_compress() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    for (name, flags) in [
        ("plain.qvol", &[][..]),
        ("off.qvol", &["--compress", "off"]),
    ] {
        let image = f.create_image(name, "16M", &key, flags);
        let doc = info(&f, &image);
        assert_eq!(doc["compression_unit_bytes"], 0, "{doc}");
        assert_eq!(doc["compress_level"], Value::Null, "{doc}");
        assert!(doc.get("compression_ratio").is_none(), "{doc}");
        let out = f.qvol(["info", s(&image)]).success().stdout;
        assert!(
            out.contains("compression:    none (created without compression)"),
            "{out}"
        );
        let before = std::fs::read(&image).unwrap();
        for setting in ["zstd", "off"] {
            f.qvol(["compress", s(&image), setting])
                .one_sentence_error("qvol", "was created without compression units");
            assert!(std::fs::read(&image).unwrap() == before, "{name} changed");
        }
    }
}

#[test]
fn compress_of_a_served_image_says_it_is_in_use() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &["--compress", "zstd"]);
    let daemon = serve(&f, &image, "busy", &[]);
    f.qvol(["compress", s(&image), "off"])
        .one_sentence_error("qvol", "is in use");
    daemon.stop();
    assert_eq!(info(&f, &image)["compress_level"], 3);
}

/// `qvol import --compress zstd` makes a compressed volume of a raw image of text, verified
/// identical to its source by qemu-img, stored at better than 1.5 to 1.
#[test]
fn import_compresses_a_raw_image() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let raw = f.path("text.raw");
    std::fs::write(&raw, text(8 * MIB as usize, 7)).expect("write the source");
    let dest = f.path("text.qvol");
    let doc = json_of(
        &f.qvol([
            "import",
            s(&raw),
            s(&dest),
            "--key",
            &key,
            "--format",
            "raw",
            "--compress",
            "zstd:3",
            "--json",
        ])
        .success(),
    );
    assert_eq!(doc["verified"], true, "{doc}");
    let doc = info(&f, &dest);
    assert_eq!(doc["compress_level"], 3, "{doc}");
    assert!(ratio(&doc) > 1.5, "{doc}");
    // A bad setting refuses before anything is made.
    let bad = f.path("bad.qvol");
    f.qvol([
        "import",
        s(&raw),
        s(&bad),
        "--key",
        &key,
        "--format",
        "raw",
        "--compress",
        "lz4",
    ])
    .one_sentence_error("qvol", "unknown compression");
    assert!(!bad.exists());
}
