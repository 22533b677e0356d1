//! An existing deployment (keystore version 1, a format-version-2 image, made by the
//! binaries before keystore version 2: `tests/data/v1-deployment/`) under today's binaries:
//! the keystore is refused with the command that upgrades it, upgrades in place, keeps its
//! keys, and the image is adopted, served and stays version 2 until `qvol upgrade` makes it
//! version 3.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::Duration;

use integration::client::{describe, BlkioClient};
use integration::fixture::{copy_private_tree, Fixture};
use integration::pattern;

const KEY: &str = "vm1-8b683211";

fn data() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/v1-deployment"
    ))
}

#[test]
fn a_version_1_keystore_upgrades_and_its_volume_is_adopted_and_served() {
    let f = Fixture::with_passphrase("golden v1 passphrase");
    fs::remove_dir_all(&f.keystore).unwrap();
    copy_private_tree(&data().join("keystore"), &f.keystore);
    let image = f.path("vm1.qvol");
    fs::copy(data().join("vm1.qvol"), &image).unwrap();

    let before = fs::read(f.keystore.join("keystore.json")).unwrap();
    f.qvol(["key", "list"])
        .one_sentence_error("qvol", "qvol keystore upgrade");
    assert_eq!(
        fs::read(f.keystore.join("keystore.json")).unwrap(),
        before,
        "a refused command changed the keystore"
    );
    let show_v1 = f.qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")]);
    assert_eq!(show_v1.code, 0, "{show_v1:#?}");

    f.qvol(["keystore", "upgrade"]).success();
    let list = f.qvol(["key", "show", KEY, "--json"]).success();
    let key: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(
        key["fingerprint"], "40089a94203d414ff14c06b5554b7258791d3fe327612ef0f47258eb138a1acd",
        "the upgrade changed the key pair"
    );
    // Running it again is harmless.
    f.qvol(["keystore", "upgrade"]).success();

    // The version-1 volume record names no key: the daemon asks for an adoption.
    let id = f.volume_id(&image);
    let socket = f.path("pre-adopt.sock");
    f.vhost_qvol([
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--blk-file"),
        image.as_os_str(),
        OsStr::new("--volume-id"),
        OsStr::new(&id),
    ])
    .one_sentence_error("vhost-qvol", "qvol volume adopt");
    f.qvol([OsStr::new("volume"), OsStr::new("adopt"), image.as_os_str()])
        .success();

    let mut daemon = f.start_daemon(&image, "served", &[]).unwrap();
    {
        let mut c = BlkioClient::connect(daemon.socket(), 1, false, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        c.write(4096, &pattern::make(65536, 4096, 5)).unwrap();
        assert_eq!(c.read(4096, 65536).unwrap(), pattern::make(65536, 4096, 5));
    }
    let status = daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .expect("vhost-qvol exits on SIGTERM");
    assert!(status.success());
    let info = f
        .qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
        .success();
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["format_version"], 2, "{doc}");
    assert_eq!(doc["rolled_back"], false, "{doc}");

    // `qvol upgrade` converts the image to the current format (5) in place: refused while served, then
    // done, the data still there, the record still fresh; a second run has nothing to do.
    let daemon = f.start_daemon(&image, "served-v2", &[]).unwrap();
    f.qvol([OsStr::new("upgrade"), image.as_os_str()])
        .one_sentence_error("qvol", "in use");
    drop(daemon);
    let out = f.qvol([OsStr::new("upgrade"), image.as_os_str()]).success();
    assert!(out.stdout.contains("from format version 2 to 7"), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(
        &f.qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
            .success()
            .stdout,
    )
    .unwrap();
    assert_eq!(doc["format_version"], 7, "{doc}");
    assert_eq!(doc["rolled_back"], false, "{doc}");
    let mut daemon = f.start_daemon(&image, "served-v3", &[]).unwrap();
    {
        let mut c = BlkioClient::connect(daemon.socket(), 1, false, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        assert_eq!(c.read(4096, 65536).unwrap(), pattern::make(65536, 4096, 5));
    }
    let status = daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .expect("vhost-qvol exits on SIGTERM");
    assert!(status.success());
    let again = f.qvol([OsStr::new("upgrade"), image.as_os_str()]).success();
    assert!(again.stdout.contains("nothing to do"), "{again:?}");
}
