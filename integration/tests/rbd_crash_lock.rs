//! One writer per RBD volume, and the durability contract on RBD, on a throwaway cluster
//! (`integration::ceph`): while a daemon serves `rbd:POOL/IMAGE`, a second one is refused
//! with one sentence naming the holder of RBD's exclusive lock; after kill -9 under load
//! `vhost-qvol --break-lock` takes the volume over at once (the dead daemon's lock would
//! otherwise hold until the cluster notices it is gone), and every write the client saw
//! complete reads back (`integration::crash`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use integration::ceph::CephCluster;
use integration::crash::{connect, verify, write_pass};

const BLOCKS: u64 = 2048; // 8 MiB

#[test]
fn a_second_writer_is_refused_and_break_lock_takes_over_after_kill_9() {
    let cluster = CephCluster::start();
    let f = cluster.fixture();
    let key = f.new_key("vm1");
    let image = f.create_image_at(&cluster.image("crash"), "16M", &key, &[]);
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

    let mut daemon = f.start_daemon(&image, "a", &[]).unwrap();
    // A reader needs no lock: `qvol info` works while the daemon serves.
    f.qvol(["info".as_ref(), image.as_os_str()]).success();
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
    let mut daemon = f.start_daemon(&image, "final", &["--break-lock"]).unwrap();
    verify(&mut connect(daemon.socket()), BLOCKS, &versions);
    // The qvol commands that write take --break-lock too.
    daemon.kill9();
    let image = image.to_str().unwrap();
    f.qvol(["--break-lock", "snapshot", "create", image, "after"])
        .success();
    let list = f.qvol(["snapshot", "list", image]).success();
    assert!(list.stdout.contains("after"), "{list:?}");
}
