//! One writer per RBD volume, and the durability contract on RBD, on a throwaway cluster
//! (`integration::ceph`), on an image in a pool namespace (`rbd:POOL/NAMESPACE/IMAGE`):
//! while a daemon serves it, the commands that only read work on their own, taking no lock
//! (their storage refuses writes) and leaving the daemon's lock alone; the commands that
//! change it go through the daemon's control socket, found by its command line; a daemon
//! this host cannot see (another host's) is named by its lock's address; a second daemon
//! is refused with one sentence naming the holder of RBD's exclusive lock; after kill -9
//! under load `vhost-qvol --break-lock` takes the volume over at once (the dead daemon's
//! lock would otherwise hold until the cluster notices it is gone), and every write the
//! client saw complete reads back (`integration::crash`).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use integration::ceph::CephCluster;
use integration::crash::{connect, verify, write_pass};
use integration::fixture::{json_of, Fixture};

const BLOCKS: u64 = 2048; // 8 MiB

#[test]
fn a_second_writer_is_refused_and_break_lock_takes_over_after_kill_9() {
    let cluster = CephCluster::start();
    let f = cluster.fixture();
    let key = f.new_key("vm1");
    cluster
        .rbd(&["namespace", "create", "rbd/tenant"])
        .success();
    let image = f.create_image_at(Path::new("rbd:rbd/tenant/crash"), "16M", &key, &[]);
    let volume_id = f.volume_id(&image);
    let second = |tag: &str, extra: &[&str]| {
        let mut args = vec![
            "--socket-path".to_string(),
            f.path(&format!("{tag}.sock")).display().to_string(),
            "--blk-file".to_string(),
            image.display().to_string(),
            "--volume-id".to_string(),
            volume_id.clone(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let t0 = Instant::now();
        let run = f.vhost_qvol(&args);
        (run, t0.elapsed())
    };

    let control = f.path("a.ctl");
    let control = control.to_str().unwrap();
    let mut daemon = f
        .start_daemon(&image, "a", &["--control-socket", control])
        .unwrap();
    readers_and_changes_while_served(&cluster, &f, &image);
    let (run, took) = second("b", &[]);
    run.one_sentence_error("vhost-qvol", "holds its exclusive lock");
    assert!(
        run.stderr.contains("client at 127.0.0.1:"),
        "names the holder: {run:?}"
    );
    eprintln!("second writer refused in {took:?}");
    assert!(took < Duration::from_secs(30), "refused after {took:?}");

    let first = write_pass(&mut daemon, BLOCKS, 1, Some(700));
    let mut versions: Vec<(u64, HashSet<u64>)> = vec![(1, first)];
    for (round, kill_after) in [(1u64, 1500usize), (2, 300)] {
        let mut daemon = f
            .start_daemon(&image, &format!("r{round}"), &["--break-lock"])
            .unwrap();
        assert!(
            daemon.log_text().contains("exclusive lock"),
            "says whose lock it broke: {}",
            daemon.log_text()
        );
        verify(&mut connect(daemon.socket()), BLOCKS, &versions);
        let seed = round + 1;
        let done = write_pass(&mut daemon, BLOCKS, seed, Some(kill_after));
        versions.push((seed, done));
    }
    // The last daemon reads the cluster through a copy of its configuration file: to this
    // host's qvol (CEPH_CONF, the original) it is another cluster client, as a daemon on
    // another host is.
    let elsewhere = f.path("elsewhere.conf");
    std::fs::copy(cluster.conf(), &elsewhere).unwrap();
    let elsewhere = ["--break-lock", "--ceph-conf", elsewhere.to_str().unwrap()];
    let mut daemon = f.start_daemon(&image, "final", &elsewhere).unwrap();
    verify(&mut connect(daemon.socket()), BLOCKS, &versions);
    let run = f.qvol(["snapshot", "create", image.to_str().unwrap(), "remote"]);
    let line = run.one_sentence_error("qvol", "not by a vhost-qvol on this host");
    assert!(
        line.contains("served by the Ceph client at 127.0.0.1:") && line.contains("that host"),
        "names the lock holder: {line}"
    );
    // The qvol commands that write take --break-lock too.
    daemon.kill9();
    let image = image.to_str().unwrap();
    f.qvol(["--break-lock", "snapshot", "create", image, "after"])
        .success();
    let list = f.qvol(["snapshot", "list", image]).success();
    assert!(list.stdout.contains("after"), "{list:?}");
}

/// While a daemon serves `image` (with a control socket): reading commands work without
/// a lock, changing ones go through the daemon, and the daemon's lock stays where it was.
fn readers_and_changes_while_served(cluster: &CephCluster, f: &Fixture, image: &Path) {
    let spec = "rbd/tenant/crash";
    let locks = || cluster.rbd(&["lock", "ls", spec]).success().stdout;
    let held = locks();
    assert!(held.contains("auto "), "the daemon holds the lock: {held}");
    let name = image.to_str().unwrap();

    // Reading: on their own, read-only, no lock taken or broken.
    let info = json_of(&f.qvol(["info", name, "--json"]).success());
    assert_eq!(info["size"], 16 << 20, "{info}");
    let raw = f.path("served.raw");
    f.qvol(["export", name, raw.to_str().unwrap()]).success();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 << 20);
    // Such an open's storage refuses every write (librbd's read-only open would too).
    vhost_qvol::image::set_rbd_settings(
        vhost_qvol::image::CephArgs {
            ceph_conf: Some(cluster.conf().to_path_buf()),
            ..Default::default()
        }
        .into(),
    );
    let storage = vhost_qvol::image::open_read_only(image).unwrap();
    let refused = storage.write_all_at(&[0u8; 4096], 0).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{refused}"
    );
    assert!(storage.set_len(0).is_err() && storage.punch_hole(0, 4096).is_err());
    drop(storage);

    // Changing (and checking, as for a file): through the daemon's control socket.
    f.qvol(["snapshot", "create", name, "served"]).success();
    let list = f.qvol(["snapshot", "list", name]).success();
    assert!(list.stdout.contains("served"), "{list:?}");
    // The consistent copy of a served image: a snapshot, sent (read-only, no lock).
    let stream = f.path("served.stream");
    let stream = stream.to_str().unwrap();
    f.qvol(["send", name, "--snapshot", "served", "-o", stream])
        .success();
    assert!(std::fs::metadata(stream).unwrap().len() > 0);
    let pass = f.path("pass");
    std::fs::write(&pass, "served passphrase\n").unwrap();
    let added = json_of(
        &f.qvol([
            "keyslot",
            "add",
            name,
            "--slot-passphrase-file",
            pass.to_str().unwrap(),
            "--json",
        ])
        .success(),
    );
    assert_eq!(added["slot"], 1, "{added}");
    f.qvol(["check", name]).success();
    let stats = f.qvol(["stats", name]).success();
    assert!(stats.stdout.contains("image:"), "{stats:?}");
    assert_eq!(locks(), held, "the daemon's lock moved");
}
