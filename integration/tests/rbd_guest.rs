//! A QEMU guest (TCG) on a qvol volume in Ceph RBD, booted with
//! `qemu-configs/qemu-vhost-qvol-rbd.sh` (which starts vhost-qvol on `rbd:POOL/IMAGE`, then
//! QEMU): an ext4 filesystem written in a first boot is clean and unchanged in a second one,
//! served by a new daemon (`integration::guest::ext4`), and the RBD image never holds the
//! guest's plaintext. Needs QEMU, the guest kernel and Ceph (`scripts/setup.sh`); without
//! them it fails.

use std::time::Duration;

use integration::bins;
use integration::ceph::CephCluster;
use integration::guest::ext4::{sums, CANARY, VERIFY_FS, WRITE_FS};
use integration::guest::{self, repo_root, GuestKit, GuestOutcome};

fn boot(
    kit: &GuestKit,
    f: &integration::fixture::Fixture,
    script: &str,
    tag: &str,
) -> GuestOutcome {
    let mut launcher = f.command(&repo_root().join("qemu-configs/qemu-vhost-qvol-rbd.sh"));
    launcher
        .env("QVOL_IMAGE", "rbd:rbd/guest")
        .env("QVOL", bins::qvol())
        .env("VHOST_QVOL", bins::vhost_qvol())
        .env("QVOL_RUN_DIR", f.path("run"))
        .env("QVOL_ACCEL", "tcg")
        .env("QVOL_MEM", "512M")
        .env("QVOL_QUEUES", "1")
        .env("QEMU", &kit.qemu);
    let outcome = guest::boot_with(
        kit,
        launcher,
        script,
        Duration::from_secs(240),
        &f.path(tag),
    )
    .and_then(|g| g.wait())
    .unwrap_or_else(|e| panic!("the guest did not run: {e:#}"));
    assert!(outcome.succeeded(), "{tag}: {}", outcome.report());
    assert!(
        outcome.io_error_lines().is_empty(),
        "{tag}: {}",
        outcome.report()
    );
    outcome
}

#[test]
fn ext4_on_an_rbd_volume_survives_a_daemon_restart() {
    let kit = GuestKit::locate().unwrap_or_else(|e| panic!("cannot boot the test guest: {e:#}"));
    let cluster = CephCluster::start();
    let f = cluster.fixture();
    let key = f.new_key("guest");
    f.create_image_at(&cluster.image("guest"), "64M", &key, &[]);

    let first = boot(&kit, &f, WRITE_FS, "boot1");
    assert!(
        first.console.contains("QVOL-WRITE-DONE"),
        "{}",
        first.report()
    );
    let written = sums(&first);
    assert_eq!(written.len(), 9, "nine checksums\n{}", first.report());

    let raw = f.path("export.raw");
    cluster
        .rbd(&["export", "rbd/guest", raw.to_str().unwrap()])
        .success();
    let bytes = std::fs::read(&raw).unwrap();
    assert!(
        !bytes.windows(CANARY.len()).any(|w| w == CANARY),
        "the RBD image holds the guest's plaintext"
    );

    let second = boot(&kit, &f, VERIFY_FS, "boot2");
    assert!(
        second.console.contains("QVOL-VERIFY-DONE"),
        "{}",
        second.report()
    );
    assert_eq!(
        sums(&second),
        written,
        "checksums changed\n{}",
        second.report()
    );
    // Both daemons closed the image when QEMU exited: no client watches it any more.
    let status = cluster.rbd(&["status", "rbd/guest"]).success();
    assert!(status.stdout.contains("Watchers: none"), "{status:?}");
}
