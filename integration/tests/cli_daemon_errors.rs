//! Bad command lines for `vhost-qvol`: each one clear sentence on stderr, exit status 1,
//! no socket created, and the image byte-for-byte untouched.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use integration::fixture::{Fixture, Run};

fn serve(f: &Fixture, image: &Path, socket: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--blk-file"),
        image.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    f.vhost_qvol(args)
}

/// Runs the daemon on `image` and checks the failure is one sentence with `needle` and
/// that neither the image nor the socket directory changed.
fn refused(f: &Fixture, image: &Path, needle: &str) -> String {
    let before = std::fs::read(image).ok();
    let socket = f.path("refused.sock");
    let run = serve(f, image, &socket, &["--any-volume"]);
    let line = run.one_sentence_error("vhost-qvol", needle);
    assert_eq!(std::fs::read(image).ok(), before, "the image changed");
    assert!(!socket.exists(), "a socket was left behind");
    line
}

fn image_for(f: &Fixture) -> PathBuf {
    let key = f.new_key("vm");
    f.create_image("disk.qvol", "64M", &key, &[])
}

#[test]
fn missing_image() {
    let f = Fixture::new();
    refused(&f, &f.path("nope.qvol"), "does not exist");
}

#[test]
fn wrong_keystore_passphrase() {
    let f = Fixture::with_passphrase("correct horse battery staple");
    let image = image_for(&f);
    std::fs::write(f.passphrase_file.as_ref().unwrap(), "wrong\n").unwrap();
    refused(&f, &image, "passphrase");
}

#[test]
fn a_key_that_opens_no_keyslot() {
    let owner = Fixture::new();
    let image = image_for(&owner);
    let stranger = Fixture::new();
    stranger.new_key("vm");
    refused(&stranger, &image, "qvol volume adopt");
}

#[test]
fn truncated_and_foreign_files() {
    let f = Fixture::new();
    let image = image_for(&f);
    let full = std::fs::read(&image).unwrap();
    for len in [0usize, 100, 4096] {
        let cut = f.path(&format!("cut-{len}.qvol"));
        std::fs::write(&cut, &full[..len]).unwrap();
        refused(&f, &cut, "qvol image");
    }
    let foreign = f.path("foreign.img");
    std::fs::write(&foreign, vec![0xa5; 1 << 20]).unwrap();
    refused(&f, &foreign, "not a usable qvol image");
}

#[test]
fn socket_in_a_missing_directory() {
    let f = Fixture::new();
    let image = image_for(&f);
    let before = std::fs::read(&image).unwrap();
    let socket = f.path("no-such-dir/x.sock");
    let run = serve(&f, &image, &socket, &["--any-volume"]);
    run.one_sentence_error("vhost-qvol", "does not exist");
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

#[test]
fn fd_that_is_not_a_listening_socket() {
    let f = Fixture::new();
    let image = image_for(&f);
    let run = f.vhost_qvol([
        OsStr::new("--fd"),
        OsStr::new("0"),
        OsStr::new("--blk-file"),
        image.as_os_str(),
        OsStr::new("--any-volume"),
    ]);
    run.one_sentence_error("vhost-qvol", "not a listening Unix socket");
}

#[test]
fn print_capabilities_and_usage_errors() {
    let f = Fixture::new();
    let run = f.vhost_qvol(["--print-capabilities"]).success();
    let caps: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        caps,
        serde_json::json!({"type": "block", "features": ["read-only", "blk-file"]})
    );
    let run = f.vhost_qvol(["--no-such-flag"]);
    assert_eq!(run.code, 2, "{run:#?}");
    let run = f.vhost_qvol(["--blk-file", "x"]);
    run.one_sentence_error("vhost-qvol", "--socket-path");
}
