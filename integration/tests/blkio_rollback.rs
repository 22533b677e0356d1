//! Freshness (docs/SECURITY.md): the keystore records every state the daemon commits, so an
//! older copy of the whole image put back is refused, and `qvol info` says so.

use std::ffi::OsStr;
use std::time::Duration;

use integration::client::{describe, BlkioClient};
use integration::daemon::Daemon;
use integration::fixture::Fixture;
use integration::pattern;

// Every wait here is bounded, so a regression fails with a sentence instead of hanging
// until nextest gives up: the daemon's start (`Daemon::start_command`), the connect and
// each request (`BlkioClient`), the exit on SIGTERM (below), and the commands run to
// completion (`Fixture::qvol`, `Fixture::vhost_qvol`: a rolled-back image served instead
// of refused is killed and reported).

fn start(f: &Fixture, image: &std::path::Path, tag: &str) -> Daemon {
    f.start_daemon(image, tag, &[])
        .unwrap_or_else(|e| panic!("vhost-qvol ({tag}) did not start: {e}"))
}

fn write_and_stop(f: &Fixture, image: &std::path::Path, tag: &str, seed: u64) {
    let mut daemon = start(f, image, tag);
    {
        let mut c = BlkioClient::connect(daemon.socket(), 1, false, 1 << 20)
            .unwrap_or_else(|e| panic!("connect ({tag}): {}", describe(&e)));
        c.write(0, &pattern::make(65536, 0, seed))
            .unwrap_or_else(|e| panic!("write ({tag}): {e}"));
    }
    let status = daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("vhost-qvol ({tag}) did not exit within 5 s of SIGTERM"));
    assert!(status.success(), "vhost-qvol ({tag}) exited with {status}");
}

#[test]
fn an_older_copy_of_the_image_is_refused() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("r.qvol", "64M", &key, &[]);
    write_and_stop(&f, &image, "a", 1);
    let old = std::fs::read(&image).unwrap();
    write_and_stop(&f, &image, "b", 2);
    let new = std::fs::read(&image).unwrap();

    std::fs::write(&image, &old).unwrap();
    let socket = f.path("rolled.sock");
    let id = f.volume_id(&image);
    let run = f.vhost_qvol([
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--blk-file"),
        image.as_os_str(),
        OsStr::new("--volume-id"),
        OsStr::new(&id),
    ]);
    run.one_sentence_error("vhost-qvol", "older");
    assert_eq!(
        std::fs::read(&image).unwrap(),
        old,
        "the refused image changed"
    );

    let info = f
        .qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
        .success();
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["rolled_back"], true, "{doc}");

    // The current copy still opens.
    std::fs::write(&image, &new).unwrap();
    let _daemon = start(&f, &image, "c");
}
