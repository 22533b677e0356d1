//! The server as a whole: binding, serving several clients, the one-writer rule, hostile
//! clients next to good ones, and shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::proto;
use super::testing::{go_data, Client, SparseDisk};
use super::*;

const BOTH: u32 = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;

fn serve(read_only: bool) -> (tempfile::TempDir, PathBuf, Arc<SparseDisk>, NbdHandle) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let disk = SparseDisk::new(1 << 20);
    let opts = NbdOptions {
        read_only,
        export_name: "disk".into(),
        description: String::new(),
    };
    let handle = NbdServer::bind(&path, Arc::clone(&disk) as Arc<dyn Disk>, opts)
        .unwrap()
        .spawn()
        .unwrap();
    (dir, path, disk, handle)
}

/// Writes `byte` over the first 512 bytes and reads it back.
fn round_trip(c: &mut Client, byte: u8) {
    c.request(0, proto::CMD_WRITE, 1, 0, 512);
    c.send(&[byte; 512]);
    assert_eq!(c.simple(), (0, 1));
    c.request(0, proto::CMD_READ, 2, 0, 512);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.recv(512), vec![byte; 512]);
}

fn read_zeros(c: &mut Client) {
    c.request(0, proto::CMD_READ, 3, 0, 512);
    assert_eq!(c.simple(), (0, 3));
    assert_eq!(c.recv(512), vec![0; 512]);
}

#[test]
fn bind_makes_a_private_socket_and_refuses_what_it_must_not_replace() {
    let (dir, path, _, handle) = serve(false);
    let meta = fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing left behind from binding.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // A live server's socket is not replaced.
    let disk: Arc<dyn Disk> = SparseDisk::new(4096);
    let err = NbdServer::bind(&path, Arc::clone(&disk), NbdOptions::default()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("another server"), "{err}");

    // Nor a regular file.
    let file = dir.path().join("precious");
    fs::write(&file, b"keep me").unwrap();
    let err = NbdServer::bind(&file, Arc::clone(&disk), NbdOptions::default()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"keep me");

    // A stale socket (its server gone without removing it) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let server = NbdServer::bind(&stale, disk, NbdOptions::default()).unwrap();
    drop(server);

    // A directory that does not exist: one sentence naming the socket.
    let err = NbdServer::bind(
        &dir.path().join("no/such/dir.sock"),
        SparseDisk::new(4096),
        NbdOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("cannot listen on "), "{err}");
    handle.shutdown().unwrap();
}

#[test]
fn shutdown_ends_clients_commits_and_removes_the_socket() {
    let (_dir, path, disk, handle) = serve(false);
    let mut idle = Client::connect(&path);
    idle.start(false, false);
    round_trip(&mut idle, 4);
    let mut haggling = Client::connect(&path);
    haggling.hello(BOTH);
    let started = Instant::now();
    handle.shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(idle.closed());
    assert!(haggling.closed());
    assert!(!path.exists());
    assert!(disk.commits.load(Ordering::SeqCst) >= 1);
    assert_eq!(disk.contents()[..512], [4; 512]);
}

#[test]
fn shutdown_leaves_a_socket_that_replaced_ours() {
    let (dir, path, _, handle) = serve(true);
    fs::remove_file(&path).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    handle.shutdown().unwrap();
    assert!(path.exists());
    drop(other);
    drop(dir);
}

#[test]
fn a_writable_export_serves_one_client_and_tells_the_second_why_not() {
    let (_dir, path, _, handle) = serve(false);
    let mut first = Client::connect(&path);
    first.start(false, false);
    round_trip(&mut first, 1);

    let mut second = Client::connect(&path);
    second.hello(BOTH);
    for option in [proto::OPT_GO, proto::OPT_INFO] {
        second.option(option, &go_data("", &[]));
        let r = second.replies(option);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, proto::REP_ERR_POLICY);
        assert_eq!(String::from_utf8_lossy(&r[0].1), BUSY);
    }
    // The first one never noticed.
    round_trip(&mut first, 2);
    // Once it leaves, the second one gets in.
    first.request(0, proto::CMD_DISC, 0, 0, 0);
    assert!(first.closed());
    second.option(proto::OPT_GO, &go_data("disk", &[]));
    assert_eq!(
        second.replies(proto::OPT_GO).last().unwrap().0,
        proto::REP_ACK
    );
    round_trip(&mut second, 3);

    // NBD_OPT_EXPORT_NAME cannot be refused with a message: the session ends.
    let mut third = Client::connect(&path);
    third.hello(BOTH);
    third.option(proto::OPT_EXPORT_NAME, b"");
    assert!(third.closed());
    round_trip(&mut second, 4);
    assert_eq!(handle.connections(), 3);
    handle.shutdown().unwrap();
}

#[test]
fn a_read_only_export_serves_many_clients_at_once() {
    let (_dir, path, _, handle) = serve(true);
    let mut clients: Vec<Client> = (0..4).map(|_| Client::connect(&path)).collect();
    for c in &mut clients {
        let (size, flags) = c.start(true, false);
        assert_eq!(size, 1 << 20);
        assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    }
    for c in &mut clients {
        c.request(0, proto::CMD_READ, 7, 0, 4096);
        assert_eq!(c.structured_read(7, 0, 4096).unwrap(), vec![0; 4096]);
    }
    assert_eq!(handle.connections(), 4);
    handle.shutdown().unwrap();
}

#[test]
fn hostile_clients_do_not_disturb_a_good_one() {
    let (_dir, path, _, handle) = serve(true);
    let mut good = Client::connect(&path);
    good.start(false, false);

    // Garbage instead of client flags, then instead of an option.
    let mut garbage = Client::connect(&path);
    garbage.greeting();
    garbage.send(&[0xFF; 64]);
    assert!(garbage.closed());
    // Connects and says nothing, for as long as the test runs.
    let mut silent = Client::connect(&path);
    silent.greeting();
    // A request header cut in half, then gone.
    let mut quitter = Client::connect(&path);
    quitter.start(false, false);
    quitter.send(&proto::REQUEST_MAGIC.to_be_bytes());
    drop(quitter);
    // A read request whose reply it never reads.
    let mut deaf = Client::connect(&path);
    deaf.start(false, false);
    deaf.request(0, proto::CMD_READ, 1, 0, 1 << 20);

    read_zeros(&mut good);
    let mut late = Client::connect(&path);
    late.start(false, false);
    read_zeros(&mut late);
    // Shutdown does not wait for the deaf one to read (it would until the write timeout).
    let started = Instant::now();
    handle.shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(silent.closed());
    drop(deaf);
}
