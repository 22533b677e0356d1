//! The daemon's control socket (docs/CONTROL.md), end to end: the greeting and every
//! command, counters that follow a libblkio client's requests, `qvol stats`, keyslot changes
//! and re-encryption starts of a served image through the daemon (and only with the volume
//! key), and clients that send garbage, hold connections or vanish mid-request while the
//! guest keeps being served.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::daemon::Daemon;
use integration::fixture::Fixture;
use integration::pattern;
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

/// A raw client: the greeting, then one line per request.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
        };
        raw.greeting = raw.line();
        raw
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("a response line");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))
    }

    fn send(&mut self, text: &str) -> Value {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        self.line()
    }
}

fn serve(f: &Fixture, image: &Path) -> (Daemon, PathBuf) {
    let ctl = f.path("ctl.sock");
    let daemon = f
        .start_daemon(image, "served", &["--control-socket", s(&ctl)])
        .unwrap_or_else(|e| panic!("vhost-qvol did not start: {e}"));
    (daemon, ctl)
}

#[test]
fn every_command_answers_and_the_counters_follow_the_guest() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let (daemon, ctl) = serve(&f, &image);
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is private");
    let mut raw = Raw::connect(&ctl);
    assert_eq!(raw.greeting["qvol"]["version"], 1);
    assert_eq!(
        raw.greeting["qvol"]["volume_id"].as_str(),
        Some(f.volume_id(&image).as_str())
    );
    let cmds = raw.send(r#"{"execute":"query-commands"}"#);
    assert!(cmds["return"]
        .as_array()
        .unwrap()
        .contains(&json!("keyslots-set")));
    let before = raw.send(r#"{"execute":"query-status","id":"a"}"#);
    assert_eq!(before["id"], "a");
    let generation = before["return"]["generation"].as_u64().unwrap();
    {
        let mut c = daemon.client();
        c.write(0, &pattern::make(65536, 0, 7)).unwrap();
        c.write(1 << 20, &pattern::make(4096, 1 << 20, 8)).unwrap();
        assert_eq!(c.read(0, 65536).unwrap(), pattern::make(65536, 0, 7));
        c.flush().unwrap();
    }
    let stats = raw.send(r#"{"execute":"stats"}"#)["return"].clone();
    assert_eq!(stats["requests"]["write"]["count"], 2, "{stats}");
    assert_eq!(stats["requests"]["write"]["bytes"], 65536 + 4096, "{stats}");
    assert!(
        stats["requests"]["read"]["count"].as_u64() >= Some(1),
        "{stats}"
    );
    assert!(
        stats["requests"]["flush"]["count"].as_u64() >= Some(1),
        "{stats}"
    );
    assert_eq!(stats["errors"], 0);
    let p50 = stats["requests"]["write"]["latency_us"]["p50"]
        .as_u64()
        .unwrap();
    assert!(p50 > 0 && p50.is_power_of_two(), "{stats}");
    assert!(
        stats["volume"]["allocated_bytes"].as_u64() > Some(65536),
        "{stats}"
    );
    let committed = raw.send(r#"{"execute":"commit","id":7}"#);
    assert_eq!(committed["id"], 7);
    assert!(committed["return"]["generation"].as_u64() > Some(generation));
    let slots = raw.send(r#"{"execute":"keyslots"}"#)["return"].clone();
    assert_eq!(slots["keyslots"].as_array().unwrap().len(), 8);
    assert_eq!(slots["hash"].as_str().unwrap().len(), 64);
    // qvol stats finds the daemon from the image.
    let out = f.qvol(["stats", s(&image), "--json"]).success();
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["requests"]["write"]["count"], 2, "{doc}");
    let text = f.qvol(["stats", s(&image)]).success().stdout;
    assert!(
        text.contains("write") && text.contains("commits since the daemon started"),
        "{text}"
    );
    daemon.stop();
}

#[test]
fn garbage_and_vanishing_clients_leave_the_guest_served() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let (daemon, ctl) = serve(&f, &image);
    let mut raw = Raw::connect(&ctl);
    let e = raw.send("this is not json");
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    let e = raw.send(r#"{"no":"execute"}"#);
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    let e = raw.send(r#"{"execute":"format-the-disk","id":3}"#);
    assert_eq!(e["error"]["class"], "CommandNotFound", "{e}");
    assert_eq!(e["id"], 3);
    let e = raw.send(r#"{"execute":"keyslots-set","arguments":{"keyslots":"x"}}"#);
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    // The same connection still works after errors.
    assert!(raw.send(r#"{"execute":"query-status"}"#)["return"].is_object());
    // A second client at the same time, a client that leaves mid-request, and one that
    // sends more than the line limit.
    let mut second = Raw::connect(&ctl);
    assert!(second.send(r#"{"execute":"stats"}"#)["return"].is_object());
    {
        let mut half = UnixStream::connect(&ctl).unwrap();
        half.write_all(br#"{"execute":"sta"#).unwrap();
    }
    {
        let mut big = UnixStream::connect(&ctl).unwrap();
        big.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = big.write_all(&vec![b'x'; 2 << 20]);
    }
    let mut c = daemon.client();
    c.write(4096, &pattern::make(4096, 4096, 1)).unwrap();
    assert_eq!(c.read(4096, 4096).unwrap(), pattern::make(4096, 4096, 1));
    drop(c);
    assert!(raw.send(r#"{"execute":"query-status"}"#)["return"].is_object());
    daemon.stop();
}

#[test]
fn keyslots_of_a_served_image_change_through_the_daemon_and_only_with_the_key() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let (daemon, ctl) = serve(&f, &image);
    let pass = f.path("pass");
    std::fs::write(&pass, "served passphrase\n").unwrap();
    let out = f
        .qvol([
            "keyslot",
            "add",
            s(&image),
            "--slot-passphrase-file",
            s(&pass),
            "--json",
        ])
        .success();
    let added: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(added["slot"], 1, "{added}");
    // A forged change (a proof not made with the volume key) is refused, nothing changes.
    let mut raw = Raw::connect(&ctl);
    let now = raw.send(r#"{"execute":"keyslots"}"#)["return"].clone();
    let refused = raw.send(
        &json!({"execute": "keyslots-set", "arguments": {
            "keyslots": ["", "", "", "", "", "", "", ""],
            "expected": now["hash"], "proof": "00".repeat(32)}})
        .to_string(),
    );
    assert_eq!(refused["error"]["class"], "Refused", "{refused}");
    // A stale hash is refused too (a proof alone is not enough to overwrite a newer change).
    let stale = raw.send(
        &json!({"execute": "keyslots-set", "arguments": {
            "keyslots": now["keyslots"], "expected": "11".repeat(32), "proof": "22".repeat(32)}})
        .to_string(),
    );
    assert_eq!(stale["error"]["class"], "Refused", "{stale}");
    assert_eq!(
        raw.send(r#"{"execute":"keyslots"}"#)["return"]["hash"],
        now["hash"]
    );
    // Removing the keystore's slot through the daemon, unlocked by the new passphrase.
    f.qvol([
        "keyslot",
        "remove",
        s(&image),
        "0",
        "--unlock-passphrase-file",
        s(&pass),
    ])
    .success();
    daemon.stop();
    // After the daemon: the passphrase opens the volume, the keystore's key no longer does.
    let info = f
        .qvol([
            "info",
            s(&image),
            "--json",
            "--unlock-passphrase-file",
            s(&pass),
        ])
        .success();
    let doc: Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["opened_with_keyslot"], 1, "{doc}");
    let locked: Value =
        serde_json::from_str(&f.qvol(["info", s(&image), "--json"]).success().stdout).unwrap();
    assert!(locked["locked"].is_string(), "{locked}");
}

#[test]
fn a_served_image_without_a_control_socket_is_refused_in_one_sentence() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let daemon = f.start_daemon(&image, "plain", &[]).unwrap();
    let pass = f.path("pass");
    std::fs::write(&pass, "p\n").unwrap();
    let line = f
        .qvol([
            "keyslot",
            "add",
            s(&image),
            "--slot-passphrase-file",
            s(&pass),
        ])
        .one_sentence_error("qvol", "no control socket");
    assert!(line.contains("--control-socket"), "{line}");
    f.qvol(["stats", s(&image)])
        .one_sentence_error("qvol", "no control socket");
    daemon.stop();
}

#[test]
fn resize_grows_a_served_disk_and_refuses_a_shrink_or_a_bad_size() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let (daemon, ctl) = serve(&f, &image);
    let mut raw = Raw::connect(&ctl);
    let cmds = raw.send(r#"{"execute":"query-commands"}"#);
    assert!(cmds["return"]
        .as_array()
        .unwrap()
        .contains(&json!("resize")));
    let refused = raw.send(r#"{"execute":"resize","arguments":{"size":8388608}}"#);
    assert_eq!(refused["error"]["class"], "Refused", "{refused}");
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("stop the VM first"),
        "{refused}"
    );
    for bad in [
        r#"{"execute":"resize"}"#,
        r#"{"execute":"resize","arguments":{"size":"32M"}}"#,
        r#"{"execute":"resize","arguments":{"size":16781313}}"#,
        r#"{"execute":"resize","arguments":{"size":-1}}"#,
    ] {
        let r = raw.send(bad);
        assert_eq!(r["error"]["class"], "GenericError", "{bad}: {r}");
    }
    let same = raw.send(r#"{"execute":"resize","arguments":{"size":16777216}}"#);
    assert_eq!(same["return"]["new_size"], 16 << 20, "{same}");
    assert_eq!(same["return"]["notified"], false, "{same}");
    let grown = raw.send(r#"{"execute":"resize","arguments":{"size":33554432},"id":1}"#);
    assert_eq!(grown["id"], 1, "{grown}");
    assert_eq!(grown["return"]["old_size"], 16 << 20, "{grown}");
    assert_eq!(grown["return"]["new_size"], 32 << 20, "{grown}");
    let status = raw.send(r#"{"execute":"query-status"}"#);
    assert_eq!(status["return"]["size"], 32 << 20, "{status}");
    assert_eq!(daemon.client().capacity().unwrap(), 32 << 20);
    daemon.stop();
}

#[test]
fn a_reencryption_starts_only_with_the_key_and_a_fresh_nonce() {
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "16M", &key, &[]);
    let (daemon, ctl) = serve(&f, &image);
    let mut raw = Raw::connect(&ctl);
    let cmds = raw.send(r#"{"execute":"query-commands"}"#)["return"].clone();
    for c in ["reencrypt-start", "reencrypt-status", "reencrypt-resume"] {
        assert!(cmds.as_array().unwrap().contains(&json!(c)), "{cmds}");
    }
    let before = std::fs::read(&image).unwrap();
    let status = raw.send(r#"{"execute":"reencrypt-status"}"#)["return"].clone();
    assert!(status["reencryption"].is_null(), "{status}");
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(status["cipher"], "xchacha20-poly1305", "{status}");
    let start = |now: &Value, suite: &str, sealed: String| {
        json!({"execute": "reencrypt-start", "arguments": {
            "suite": suite, "keyslots": now["keyslots"], "expected": now["hash"],
            "sealed": sealed}})
        .to_string()
    };
    // Without a nonce of this connection: refused.
    let elsewhere = Raw::connect(&ctl).send(r#"{"execute":"keyslots"}"#)["return"].clone();
    let refused = raw.send(&start(&elsewhere, "aegis-256", "00".repeat(72)));
    assert_eq!(refused["error"]["class"], "Refused", "{refused}");
    // With one, but a key not sealed under the volume's key: refused, and the nonce is
    // spent.
    let now = raw.send(r#"{"execute":"keyslots"}"#)["return"].clone();
    let refused = raw.send(&start(&now, "aegis-256", "5a".repeat(72)));
    assert_eq!(refused["error"]["class"], "Refused", "{refused}");
    let refused = raw.send(&start(&now, "aegis-256", "5a".repeat(72)));
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("ask for \"keyslots\" first"),
        "{refused}"
    );
    // Malformed arguments, and a resume with nothing to resume.
    raw.send(r#"{"execute":"keyslots"}"#);
    for bad in [
        start(&now, "rot13", "00".repeat(72)),
        start(&now, "aegis-256", "not hex".into()),
        r#"{"execute":"reencrypt-start","arguments":{"suite":"aegis-256"}}"#.into(),
        r#"{"execute":"reencrypt-resume"}"#.into(),
        r#"{"execute":"reencrypt-resume","arguments":{"rate_bytes_per_s":"fast"}}"#.into(),
    ] {
        let reply = raw.send(&bad);
        assert_eq!(reply["error"]["class"], "GenericError", "{bad}: {reply}");
    }
    let status = raw.send(r#"{"execute":"query-status"}"#)["return"].clone();
    assert!(status["reencryption"].is_null(), "{status}");
    assert_eq!(status["cipher"], "xchacha20-poly1305", "{status}");
    daemon.stop();
    let after = std::fs::read(&image).unwrap();
    // The header and keyslot area are as they were (the daemon's commits change only the
    // superblocks and what follows).
    assert!(
        after[..9 * 4096] == before[..9 * 4096],
        "a refused start changed the header"
    );
}
