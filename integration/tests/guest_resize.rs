//! A running QEMU guest (TCG) sees its vhost-qvol disk grow without a reboot, and grows ext4
//! on it online.
//!
//! The guest makes ext4 on the 64 MiB disk, writes files (each printed as `QVOL-FILE name
//! sha256`), syncs, prints `QVOL-READY`, and waits for `/sys/block/vda/size` to change. The
//! host then runs `qvol resize IMAGE +64M`, which goes through the daemon's
//! `--control-socket`: the daemon grows the volume and sends
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, QEMU re-reads the config space and raises the
//! guest's config interrupt, and virtio_blk updates the capacity. The guest then runs
//! `resize2fs /dev/vda` with the filesystem mounted (online resize), prints what `df` says
//! before and after, writes a file larger than the whole old filesystem, checks every file,
//! unmounts and runs `e2fsck -fn`. After power-off the host exports the disk to a raw file
//! (`qvol export`) and requires the host's `e2fsck -fn` on it to be clean, and `qvol check`.
//!
//! Needs QEMU and the guest kernel (`scripts/setup.sh`); without them it FAILS.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::daemon::Daemon;
use integration::fixture::{json_of, Fixture};
use integration::guest::{self, GuestKit, GuestOutcome, GuestSpec};

const MIB: u64 = 1 << 20;

/// The guest's side; `sh -e`, chrooted into the host root (e2fsprogs' resize2fs is there).
const GROW_ONLINE: &str = r#"
dev=/dev/vda
mnt=/run/qvol/mnt
echo "QVOL-SECTORS-BEFORE $(cat /sys/block/vda/size)"
mkfs.ext4 -q -F $dev
mkdir -p $mnt
mount -t ext4 $dev $mnt
for i in 0 1 2 3 4 5 6 7; do
    head -c $(( (i + 1) * 65536 )) /dev/urandom > $mnt/f$i
    echo "QVOL-FILE f$i $(sha256sum < $mnt/f$i | cut -d' ' -f1)"
done
sync
echo "QVOL-DF-BEFORE $(df -k $mnt | tail -1 | awk '{print $2}')"
before=$(cat /sys/block/vda/size)
echo QVOL-READY
n=0
while [ "$(cat /sys/block/vda/size)" = "$before" ]; do
    n=$((n + 1))
    if [ $n -ge 900 ]; then echo "QVOL-GUEST-ERROR the disk never grew"; exit 1; fi
    sleep 0.2
done
echo "QVOL-SECTORS-AFTER $(cat /sys/block/vda/size)"
dmesg | grep -i 'vda' | sed 's/^/QVOL-DMESG /' || true
rc=0; resize2fs $dev || rc=$?
echo "QVOL-RESIZE2FS $rc"
echo "QVOL-DF-AFTER $(df -k $mnt | tail -1 | awk '{print $2}')"
dd if=/dev/zero of=$mnt/big bs=1M count=72 conv=fsync 2>/dev/null
echo "QVOL-BIG $(stat -c %s $mnt/big)"
for f in f0 f1 f2 f3 f4 f5 f6 f7; do
    echo "QVOL-AGAIN $f $(sha256sum < $mnt/$f | cut -d' ' -f1)"
done
umount $mnt
rc=0; e2fsck -fn $dev || rc=$?
echo "QVOL-FSCK $rc"
echo QVOL-DONE
"#;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

/// The single number of a `PREFIX n` marker line.
fn number(outcome: &GuestOutcome, prefix: &str) -> u64 {
    outcome.marker(prefix).parse().unwrap_or_else(|_| {
        panic!(
            "{prefix:?} is not a number
{}",
            outcome.report()
        )
    })
}

#[test]
fn guest_sees_its_disk_grow_online_and_grows_ext4_without_a_reboot() {
    let kit = GuestKit::locate().unwrap_or_else(|e| panic!("cannot boot the test guest: {e:#}"));
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "64M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let daemon: Daemon = f
        .start_daemon(&image, "vm", &["--control-socket", s(&ctl)])
        .unwrap_or_else(|e| panic!("vhost-qvol did not start: {e}"));

    let mut spec = GuestSpec::new(GROW_ONLINE, &[daemon.socket()]);
    spec.timeout = Duration::from_secs(300);
    let mut running = guest::boot(&kit, &spec, &f.path("boot"))
        .unwrap_or_else(|e| panic!("the guest did not start: {e:#}"));
    running
        .wait_for_console("QVOL-READY", Duration::from_secs(200))
        .unwrap_or_else(|e| panic!("{e:#}\n--- vhost-qvol ---\n{}", daemon.log_text()));
    let grown = json_of(&f.qvol(["resize", s(&image), "+64M", "--json"]).success());
    assert_eq!(grown["old_size"], 64 * MIB, "{grown}");
    assert_eq!(grown["new_size"], 128 * MIB, "{grown}");
    assert_eq!(grown["online"], true, "{grown}");
    assert_eq!(
        grown["notified"],
        true,
        "QEMU was not told: {grown}\n--- vhost-qvol ---\n{}",
        daemon.log_text()
    );
    let outcome = running
        .wait()
        .unwrap_or_else(|e| panic!("the guest did not finish: {e:#}"));
    assert!(
        outcome.succeeded() && outcome.console.contains("QVOL-DONE"),
        "the guest script failed\n{}\n--- vhost-qvol ---\n{}",
        outcome.report(),
        daemon.log_text()
    );
    let errors = outcome.io_error_lines();
    assert!(
        errors.is_empty(),
        "the guest reported I/O errors: {errors:#?}\n{}",
        outcome.report()
    );
    daemon.stop();

    // The guest saw the new capacity (512-byte sectors) without a reboot.
    assert_eq!(number(&outcome, "QVOL-SECTORS-BEFORE "), 64 * MIB / 512);
    assert_eq!(number(&outcome, "QVOL-SECTORS-AFTER "), 128 * MIB / 512);
    // ext4 grew online by (nearly) the 64 MiB added (less its metadata), and a file larger
    // than the whole old filesystem fits.
    assert_eq!(
        number(&outcome, "QVOL-RESIZE2FS "),
        0,
        "{}",
        outcome.report()
    );
    let (df_before, df_after) = (
        number(&outcome, "QVOL-DF-BEFORE "),
        number(&outcome, "QVOL-DF-AFTER "),
    );
    assert!(
        df_before < 64 * 1024 && df_after >= df_before + 56 * 1024,
        "df: {df_before} KiB before, {df_after} KiB after\n{}",
        outcome.report()
    );
    assert_eq!(number(&outcome, "QVOL-BIG "), 72 * MIB);
    assert_eq!(
        outcome.pairs("QVOL-AGAIN "),
        outcome.pairs("QVOL-FILE "),
        "the files changed\n{}",
        outcome.report()
    );
    assert_eq!(
        number(&outcome, "QVOL-FSCK "),
        0,
        "e2fsck in the guest\n{}",
        outcome.report()
    );

    // After power-off: the image says 128 MiB, checks clean, and its ext4 too.
    let info = json_of(&f.qvol(["info", s(&image), "--json"]).success());
    assert_eq!(info["size"], 128 * MIB, "{info}");
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");
    let raw = f.path("disk.raw");
    f.qvol(["export", s(&image), s(&raw), "-O", "raw"])
        .success();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 128 * MIB);
    let fsck =
        Command::new(guest::find_in_path("e2fsck").unwrap_or_else(|| "/usr/sbin/e2fsck".into()))
            .args(["-fn", s(&raw)])
            .output()
            .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the exported disk: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    eprintln!(
        "guest df: {df_before} KiB before, {df_after} KiB after; {}",
        outcome
            .lines_with_prefix("QVOL-DMESG ")
            .collect::<Vec<_>>()
            .join(" | ")
    );
}
