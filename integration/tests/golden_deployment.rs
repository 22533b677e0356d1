//! A deployment as this version writes it, kept so that later versions must keep opening it:
//! a keystore of version 2 (manifest, random generation seeds, bound volume records) and a
//! format-version-3 image holding known data (`tests/data/v2-deployment/`, written once by
//! the ignored test below). Today's binaries check its keystore, serve its image bound to
//! its volume id and read the data back.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::Duration;

use integration::client::{describe, BlkioClient};
use integration::fixture::{copy_private_tree, Fixture};
use integration::pattern;

const PASSPHRASE: &str = "golden v2 passphrase";
/// Where the known data lies: (offset, length, pattern seed).
const DATA: [(u64, usize, u64); 2] = [(0, 256 << 10, 42), (8 << 20, 64 << 10, 43)];

fn data_dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/v2-deployment"
    ))
}

fn serve_and_check(f: &Fixture, image: &Path, write: bool) {
    let mut daemon = f.start_daemon(image, "golden", &[]).unwrap();
    {
        let mut c = BlkioClient::connect(daemon.socket(), 1, false, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        for (offset, len, seed) in DATA {
            if write {
                c.write(offset, &pattern::make(len, offset, seed)).unwrap();
            }
            assert!(
                c.read(offset, len).unwrap() == pattern::make(len, offset, seed),
                "the data at {offset} does not read back"
            );
        }
        c.flush().unwrap();
    }
    let status = daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .expect("vhost-qvol exits on SIGTERM");
    assert!(status.success());
}

#[test]
fn the_golden_v2_deployment_opens_and_serves() {
    let f = Fixture::with_passphrase(PASSPHRASE);
    fs::remove_dir_all(&f.keystore).unwrap();
    copy_private_tree(&data_dir().join("keystore"), &f.keystore);
    let image = f.path("vm1.qvol");
    fs::copy(data_dir().join("vm1.qvol"), &image).unwrap();
    f.qvol(["keystore", "check"]).success();
    let info = f
        .qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
        .success();
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["format_version"], 3, "{doc}");
    assert_eq!(doc["recorded"], true, "{doc}");
    assert_eq!(doc["rolled_back"], false, "{doc}");
    serve_and_check(&f, &image, false);
}

#[test]
#[ignore = "writes tests/data/v2-deployment; run by hand, once per keystore or format version"]
fn write_the_golden_v2_deployment() {
    let f = Fixture::with_passphrase(PASSPHRASE);
    let key = f.new_key("vm1");
    let image = f.create_image("vm1.qvol", "16M", &key, &["--name", "vm1"]);
    serve_and_check(&f, &image, true);
    let out = data_dir();
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).unwrap();
    copy_private_tree(&f.keystore, &out.join("keystore"));
    fs::copy(&image, out.join("vm1.qvol")).unwrap();
    fs::write(
        out.join("README.md"),
        format!(
            "# A keystore of version 2 and a format-version-3 image\n\n\
             Written by `cargo nextest run -p integration --run-ignored only -E \
             'test(write_the_golden_v2_deployment)'` (tests/golden_deployment.rs): a keystore \
             with the passphrase `{PASSPHRASE}` (argon2id m = 64 KiB, t = 1, p = 1), key \
             `{key}` for VM vm1, and `vm1.qvol` (16 MiB, xchacha20-poly1305) holding the \
             patterns listed in the test. Later versions must keep opening it.\n"
        ),
    )
    .unwrap();
}
