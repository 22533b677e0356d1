//! Volumes on Ceph RBD (`rbd:POOL/IMAGE`), on a throwaway cluster of their own
//! (`integration::ceph`): `qvol create` makes the RBD image and formats it, `qvol info`
//! reads it, `vhost-qvol` serves it to libblkio across a restart, and bytes changed in the
//! RBD image behind qvol's back fail the reads of what they touch.

use std::time::Duration;

use blkio::Errno;
use integration::ceph::CephCluster;
use integration::client::{describe, BlkioClient};
use integration::fixture::{json_of, Fixture};
use integration::pattern;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn connect(socket: &std::path::Path, queues: usize) -> BlkioClient {
    BlkioClient::connect(socket, queues, false, 4 << 20)
        .unwrap_or_else(|e| panic!("connect to {}: {}", socket.display(), describe(&e)))
}

fn stop(mut daemon: integration::daemon::Daemon) {
    daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
        .expect("the daemon stops on SIGTERM");
}

#[test]
fn create_info_serve_restart_and_tamper_on_rbd() {
    let cluster = CephCluster::start();
    let f = cluster.fixture();
    let key = f.new_key("vm1");
    let image = f.create_image_at(&cluster.image("disk"), "64M", &key, &[]);

    // The RBD image exists, thin: far smaller in use than its size.
    let info = json_of(
        &f.qvol(["info".as_ref(), image.as_os_str(), "--json".as_ref()])
            .success(),
    );
    assert_eq!(info["size"], 64 * MIB, "{info}");
    let rbd = cluster
        .rbd(&["info", "rbd/disk", "--format", "json"])
        .success();
    let rbd: serde_json::Value = serde_json::from_str(&rbd.stdout).unwrap();
    assert!(
        rbd["features"].to_string().contains("exclusive-lock"),
        "{rbd}"
    );
    // Creating it again is refused, and the existing image is kept.
    let again = f.qvol([
        "create".as_ref(),
        image.as_os_str(),
        "--size".as_ref(),
        "64M".as_ref(),
        "--key".as_ref(),
        key.as_ref() as &std::ffi::OsStr,
    ]);
    again.one_sentence_error("qvol", "already exists");
    f.qvol(["info".as_ref(), image.as_os_str()]).success();

    // Round trips through the daemon, kept across a restart.
    let cases = [
        (0u64, 4096usize),
        (512, 512),
        (MIB + 512, 3072),
        (8 * MIB, 1 << 20),
    ];
    let daemon = f
        .start_daemon(&image, "d1", &["--num-queues", "2"])
        .unwrap();
    let mut c = connect(daemon.socket(), 2);
    assert_eq!(c.capacity().unwrap(), 64 * MIB);
    for (offset, len) in cases {
        let data = pattern::make(len, offset, 7);
        c.write(offset, &data).unwrap();
        assert_eq!(c.read(offset, len).unwrap(), data, "at {offset}");
    }
    assert_eq!(c.read(32 * MIB, 8192).unwrap(), vec![0; 8192]);
    // A region written one block at a time, backwards, lies scattered (each block's physical
    // block after the one of the block behind it): one read of it is 600 runs, more than the
    // 256 requests the RBD storage keeps in flight at once.
    let region = 40 * MIB;
    for b in (0..600u64).rev() {
        let at = region + b * BLOCK as u64;
        c.write(at, &pattern::make(BLOCK, at, 5)).unwrap();
    }
    assert_eq!(
        c.read(region, 600 * BLOCK).unwrap(),
        pattern::make(600 * BLOCK, region, 5)
    );
    c.discard(8 * MIB, MIB).unwrap();
    assert_eq!(c.read(8 * MIB, BLOCK).unwrap(), vec![0; BLOCK]);
    c.flush().unwrap();
    drop(c);
    stop(daemon);
    let daemon = f.start_daemon(&image, "d2", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1);
    for (offset, len) in &cases[..3] {
        assert_eq!(
            c.read(*offset, *len).unwrap(),
            pattern::make(*len, *offset, 7)
        );
    }
    drop(c);
    stop(daemon);

    tamper_fails_reads(&cluster, &f, &image);
}

/// Writes a 1 MiB region, then flips one byte in the RBD image (through `rados`, as anyone
/// with the pool's keys could) in the middle of the longest run of what the write changed:
/// a data block. Reading the region back must fail with EIO there, never return other data.
fn tamper_fails_reads(cluster: &CephCluster, f: &Fixture, image: &std::path::Path) {
    let export = |name: &str| {
        let path = f.path(name);
        cluster
            .rbd(&["export", "rbd/disk", path.to_str().unwrap()])
            .success();
        std::fs::read(&path).unwrap()
    };
    let before = export("before.raw");
    let daemon = f.start_daemon(image, "w", &[]).unwrap();
    let region = pattern::make(MIB as usize, 16 * MIB, 3);
    connect(daemon.socket(), 1)
        .write(16 * MIB, &region)
        .unwrap();
    stop(daemon);
    let after = export("after.raw");
    let changed: Vec<usize> = (0..after.len() / BLOCK)
        .filter(|&i| {
            before.get(i * BLOCK..(i + 1) * BLOCK) != after.get(i * BLOCK..(i + 1) * BLOCK)
        })
        .collect();
    // The middle of the longest run of consecutive changed blocks.
    let mut best = (0, 0);
    let mut start = 0;
    for (i, &b) in changed.iter().enumerate() {
        if i == 0 || changed[i - 1] + 1 != b {
            start = i;
        }
        if i + 1 - start > best.1 {
            best = (start, i + 1 - start);
        }
    }
    assert!(best.1 >= 128, "no long run of changed blocks: {changed:?}");
    let victim = changed[best.0 + best.1 / 2] as u64 * BLOCK as u64 + 100;
    flip_byte(cluster, f, victim);

    let daemon = f.start_daemon(image, "t", &[]).unwrap();
    let mut c = connect(daemon.socket(), 1);
    // 32 reads in flight: the daemon reads those it finds available together
    // (`rbd_aio_read`), and the tampered block must fail only its own.
    let offsets: Vec<u64> = (0..MIB / BLOCK as u64)
        .map(|b| 16 * MIB + b * BLOCK as u64)
        .collect();
    let mut failed = 0;
    c.queue(0)
        .run_batch(
            &offsets,
            BLOCK,
            32,
            false,
            |_, _| {},
            |i, data, result| {
                match result {
                    Ok(()) => assert_eq!(
                        data,
                        pattern::make(BLOCK, offsets[i], 3),
                        "wrong data at {} after tampering",
                        offsets[i]
                    ),
                    Err(e) => {
                        assert_eq!(e, Errno::IO);
                        failed += 1;
                    }
                }
                true
            },
        )
        .unwrap();
    assert_eq!(failed, 1, "one tampered data block, {failed} failed reads");
    assert!(
        daemon.log_text().contains("integrity"),
        "{}",
        daemon.log_text()
    );
}

/// Flips the byte at `offset` of the RBD image `rbd/disk` by rewriting the RADOS object
/// that holds it (`rbd_data.ID.N`, 4 MiB objects).
fn flip_byte(cluster: &CephCluster, f: &Fixture, offset: u64) {
    let info = cluster
        .rbd(&["info", "rbd/disk", "--format", "json"])
        .success();
    let info: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    let prefix = info["block_name_prefix"].as_str().unwrap().to_string();
    let object = format!("{prefix}.{:016x}", offset / (4 * MIB));
    let file = f.path("object");
    let file = file.to_str().unwrap();
    let rados = |args: &[&str]| {
        let out = std::process::Command::new("rados")
            .env("CEPH_CONF", cluster.conf())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "rados {args:?}: {out:?}");
    };
    rados(&["-p", "rbd", "get", &object, file]);
    let mut bytes = std::fs::read(file).unwrap();
    bytes[(offset % (4 * MIB)) as usize] ^= 0x01;
    std::fs::write(file, &bytes).unwrap();
    rados(&["-p", "rbd", "put", &object, file]);
}
