//! `qvol create` and `qvol info` as a user runs them.

use std::ffi::OsStr;

use integration::fixture::Fixture;

fn info_json(f: &Fixture, image: &std::path::Path) -> serde_json::Value {
    let run = f
        .qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
        .success();
    serde_json::from_str(&run.stdout).expect("info --json prints JSON")
}

#[test]
fn create_then_info_describes_the_volume() {
    let f = Fixture::new();
    let key = f.new_key("web");
    let image = f.create_image("web.qvol", "1G", &key, &["--name", "web-root"]);
    let doc = info_json(&f, &image);
    assert_eq!(doc["name"], "web-root");
    assert_eq!(doc["size"], 1u64 << 30);
    assert_eq!(doc["cipher"], "xchacha20-poly1305");
    assert!(!doc["implementation"].as_str().unwrap().is_empty());
    assert_eq!(doc["keyslots"][0]["key_id"], key.as_str());
    assert_eq!(doc["keyslots"][0]["kem"], "ML-KEM-1024+X25519");
    assert!(doc["generation"].as_u64().unwrap() >= 1, "{doc}");
    assert!(doc["allocated_bytes"].is_u64(), "{doc}");
    // A thin volume: 1 GiB of disk takes only metadata.
    assert!(std::fs::metadata(&image).unwrap().len() < 64 << 20);

    let text = f
        .qvol([OsStr::new("info"), image.as_os_str()])
        .success()
        .stdout;
    for needle in [
        "web-root",
        "1 GiB",
        "xchacha20-poly1305",
        &key,
        "ML-KEM-1024+X25519",
        "generation",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn aegis_and_suffixes() {
    let f = Fixture::new();
    let key = f.new_key("db");
    let image = f.create_image("db.qvol", "512K", &key, &["--cipher", "aegis-256"]);
    let doc = info_json(&f, &image);
    assert_eq!(doc["cipher"], "aegis-256");
    assert_eq!(doc["size"], 512 * 1024);
    assert_eq!(doc["name"], "db");
}

#[test]
fn info_without_the_key_shows_the_header_and_says_why_not_more() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("vm.qvol", "64M", &key, &[]);
    let other = Fixture::new();
    let run = other
        .qvol([OsStr::new("info"), image.as_os_str()])
        .success();
    assert!(run.stdout.contains("64 MiB"), "{}", run.stdout);
    assert!(
        run.stdout.contains("generation:     unknown"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains(&key), "{}", run.stdout);
    let doc: serde_json::Value = serde_json::from_str(
        &other
            .qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
            .success()
            .stdout,
    )
    .unwrap();
    assert!(doc["locked"].as_str().unwrap().contains("keyslot"), "{doc}");
    assert!(doc.get("generation").is_none());
}

#[test]
fn create_refuses_to_overwrite_and_leaves_nothing_behind_on_failure() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let existing = f.path("existing.qvol");
    std::fs::write(&existing, b"precious").unwrap();
    let run = f.qvol([
        OsStr::new("create"),
        existing.as_os_str(),
        OsStr::new("--size"),
        OsStr::new("64M"),
        OsStr::new("--key"),
        OsStr::new(&key),
    ]);
    run.one_sentence_error("qvol", "already exists");
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");

    for (size, key, needle) in [
        ("64M", "no-such-key", "no-such-key"),
        ("12Q", key.as_str(), "not a size"),
        ("1000", key.as_str(), "multiple of 4 KiB"),
    ] {
        let image = f.path("new.qvol");
        let run = f.qvol([
            OsStr::new("create"),
            image.as_os_str(),
            OsStr::new("--size"),
            OsStr::new(size),
            OsStr::new("--key"),
            OsStr::new(key),
        ]);
        run.one_sentence_error("qvol", needle);
        assert!(
            !image.exists(),
            "a failed create left {} behind",
            image.display()
        );
    }
}

#[test]
fn info_on_a_foreign_file_is_one_sentence() {
    let f = Fixture::new();
    let path = f.path("foreign.img");
    std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
    let run = f.qvol([OsStr::new("info"), path.as_os_str()]);
    run.one_sentence_error("qvol", "not a usable qvol image");
    let missing = f.path("missing.qvol");
    let run = f.qvol([OsStr::new("info"), missing.as_os_str()]);
    run.one_sentence_error("qvol", "missing.qvol");
}
