//! A snapshot taken while a QEMU guest (TCG) writes to ext4 on a vhost-qvol disk is
//! crash-consistent, and `qvol snapshot revert` brings exactly it back.
//!
//! First boot: the guest makes ext4 on the disk and creates numbered files of random bytes
//! in a loop (each printed as `QVOL-FILE i sha256`), running `sync` after every third one
//! (`QVOL-SYNCED i`: files 0..=i are on stable storage). While it writes (two files past a
//! sync, so some of its data is not yet synced), the host runs
//! `qvol snapshot create IMAGE snap1`, which goes through the daemon's `--control-socket`;
//! once the command has returned, the host tells the guest so on a second serial port
//! (ttyS1, a QEMU socket chardev). The guest prints `QVOL-AFTER-SNAPSHOT i`, creates eight
//! more files from `f<i>` on, syncs, unmounts and powers off; the daemon is stopped.
//!
//! Then `qvol snapshot revert IMAGE snap1` (daemon stopped) and a second boot on the
//! reverted disk. A snapshot is a crash-consistent state, so the ext4 journal may need a
//! replay: the guest copies the disk into its RAM, replays the journal only on the copy
//! (`e2fsck -E journal_only -y`) and requires `e2fsck -fn` on the copy to be clean (exit
//! 0); then it mounts the device itself (the kernel replays the journal), prints the
//! checksum of every file, unmounts, and requires `e2fsck -fn` on the device to be clean
//! too. The host asserts that every file whose `QVOL-SYNCED` it had seen before it started
//! the snapshot command is there with the same bytes, and that no file the guest created
//! after the command returned is there (they were synced on the live disk before the
//! revert, so a revert that changed nothing fails this).
//!
//! Needs QEMU and the guest kernel (`scripts/setup.sh`); without them it FAILS.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::daemon::Daemon;
use integration::fixture::{json_of, Fixture};
use integration::guest::{self, GuestKit, GuestOutcome, GuestSpec};

/// Files the guest creates after it learnt that the snapshot command returned.
const FILES_AFTER: u32 = 8;
/// The host takes the snapshot once the guest has written this file: two files after the
/// last sync before it (f8), so unsynced data is in flight when the snapshot is taken.
const SNAPSHOT_AFTER_FILE: u32 = 10;

/// First boot: ext4, then numbered files until eight after the host's signal on ttyS1.
/// `sh -e`; the host's `SNAPPED` line lands in /run/qvol/signal (a tmpfs in the guest).
const WRITE_WHILE_SNAPSHOT: &str = r#"
dev=/dev/vda
mnt=/run/qvol/mnt
stty -F /dev/ttyS1 raw -echo
: > /run/qvol/signal
cat /dev/ttyS1 > /run/qvol/signal &
mkfs.ext4 -q -F $dev
mkdir -p $mnt
mount -t ext4 $dev $mnt
echo QVOL-WRITING
i=0
after=
while :; do
    if [ -z "$after" ] && grep -q SNAPPED /run/qvol/signal; then
        after=$i
        echo "QVOL-AFTER-SNAPSHOT $i"
    fi
    if [ -n "$after" ] && [ "$i" -ge $((after + @FILES_AFTER@)) ]; then break; fi
    if [ "$i" -ge 3000 ]; then echo "QVOL-GUEST-ERROR the host never said SNAPPED"; exit 1; fi
    head -c $(( (i % 5 + 1) * 8192 )) /dev/urandom > $mnt/f$i
    echo "QVOL-FILE f$i $(sha256sum < $mnt/f$i | cut -d' ' -f1)"
    if [ $((i % 3)) -eq 2 ]; then
        sync
        echo "QVOL-SYNCED $i"
    fi
    i=$((i + 1))
done
sync
echo "QVOL-SYNCED $((i - 1))"
umount $mnt
echo QVOL-WRITE-DONE
"#;

/// Second boot, on the reverted disk: journal replay and `e2fsck -fn` on a copy, then the
/// kernel's own replay (mount), every file's checksum, and `e2fsck -fn` on the device.
const VERIFY_REVERTED: &str = r#"
dev=/dev/vda
mnt=/run/qvol/mnt
copy=/run/qvol/copy.img
if dumpe2fs -h $dev 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; then
    echo "QVOL-NEEDS-RECOVERY yes"
else
    echo "QVOL-NEEDS-RECOVERY no"
fi
dd if=$dev of=$copy bs=1M 2>/dev/null
rc=0; e2fsck -E journal_only -y $copy || rc=$?
echo "QVOL-REPLAY $rc"
rc=0; e2fsck -fn $copy || rc=$?
echo "QVOL-FSCK-COPY $rc"
rm -f $copy
mkdir -p $mnt
mount -t ext4 $dev $mnt
for f in $(ls $mnt); do
    if [ -f $mnt/$f ]; then
        echo "QVOL-HAVE $f $(sha256sum < $mnt/$f | cut -d' ' -f1)"
    else
        echo "QVOL-HAVE $f dir"
    fi
done
umount $mnt
rc=0; e2fsck -fn $dev || rc=$?
echo "QVOL-FSCK-DEVICE $rc"
echo QVOL-VERIFY-DONE
"#;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn kit() -> GuestKit {
    GuestKit::locate().unwrap_or_else(|e| panic!("cannot boot the test guest: {e:#}"))
}

fn serve(f: &Fixture, image: &Path, tag: &str, extra: &[&str]) -> Daemon {
    f.start_daemon(image, tag, extra)
        .unwrap_or_else(|e| panic!("vhost-qvol did not start: {e}"))
}

/// QEMU for `spec`, plus a second serial port (ttyS1) on a socket chardev QEMU listens on
/// at `signal`: the host's way to tell the running guest something.
fn launcher(kit: &GuestKit, spec: &GuestSpec, signal: &Path) -> Command {
    let mut qemu = Command::new(&kit.qemu);
    qemu.args(guest::machine_args(spec)).args([
        "-chardev".to_string(),
        format!(
            "socket,id=signal,path={},server=on,wait=off",
            s(signal).replace(',', ",,")
        ),
        "-device".to_string(),
        "isa-serial,chardev=signal,index=1".to_string(),
    ]);
    qemu
}

/// Every `KEY n ...` console line's numbers `n` (lines may end in `\r`).
fn numbers(console: &str, key: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

fn assert_ran(outcome: &GuestOutcome, daemon: &Daemon, done: &str, what: &str) {
    assert!(
        outcome.succeeded() && outcome.console.contains(done),
        "{what}: the guest script failed\n{}\n--- vhost-qvol ---\n{}",
        outcome.report(),
        daemon.log_text()
    );
    let errors = outcome.io_error_lines();
    assert!(
        errors.is_empty(),
        "{what}: the guest reported I/O errors: {errors:#?}\n{}",
        outcome.report()
    );
}

#[test]
fn guest_ext4_snapshot_taken_while_writing_reverts_to_a_clean_filesystem() {
    let kit = kit();
    let f = Fixture::new();
    let key = f.new_key("vm");
    let image = f.create_image("disk.qvol", "64M", &key, &[]);
    let ctl = f.path("ctl.sock");
    let daemon = serve(&f, &image, "vm", &["--control-socket", s(&ctl)]);

    // First boot: write files; take the snapshot while the guest writes.
    let signal = f.path("signal.sock");
    let script = WRITE_WHILE_SNAPSHOT.replace("@FILES_AFTER@", &FILES_AFTER.to_string());
    let mut spec = GuestSpec::new(script.as_str(), &[daemon.socket()]);
    spec.timeout = Duration::from_secs(240);
    let mut running = guest::boot_with(
        &kit,
        launcher(&kit, &spec, &signal),
        &script,
        spec.timeout,
        &f.path("boot1"),
    )
    .unwrap_or_else(|e| panic!("the guest did not start: {e:#}"));
    running
        .wait_for_console(
            &format!("QVOL-FILE f{SNAPSHOT_AFTER_FILE} "),
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n--- vhost-qvol ---\n{}", daemon.log_text()));
    // Every file up to this one was synced before the snapshot command started.
    let synced_before = numbers(&running.console(), "QVOL-SYNCED ")
        .into_iter()
        .max()
        .expect("a QVOL-SYNCED line was seen");
    let started = Instant::now();
    let made = json_of(
        &f.qvol(["snapshot", "create", s(&image), "snap1", "--json"])
            .success(),
    );
    let snapshot_took = started.elapsed();
    assert_eq!(made["name"], "snap1", "{made}");
    let mut tell = UnixStream::connect(&signal)
        .unwrap_or_else(|e| panic!("cannot connect to the guest's ttyS1 at {signal:?}: {e}"));
    tell.write_all(b"SNAPPED\n")
        .expect("tell the guest the snapshot was taken");
    let first = running
        .wait()
        .unwrap_or_else(|e| panic!("the guest did not finish: {e:#}"));
    drop(tell);
    assert_ran(&first, &daemon, "QVOL-WRITE-DONE", "first boot");
    daemon.stop();

    let written = first.pairs("QVOL-FILE ");
    let after: u32 = first
        .marker("QVOL-AFTER-SNAPSHOT ")
        .parse()
        .expect("QVOL-AFTER-SNAPSHOT has a number");
    let last = after + FILES_AFTER - 1;
    assert!(
        after > synced_before,
        "the guest saw the signal before the files synced earlier\n{}",
        first.report()
    );
    assert_eq!(
        written.len() as u32,
        last + 1,
        "the guest did not print one checksum per file\n{}",
        first.report()
    );
    assert_eq!(
        numbers(&first.console, "QVOL-SYNCED ").into_iter().max(),
        Some(last),
        "the last files were not synced on the live disk\n{}",
        first.report()
    );

    // Revert with the VM and the daemon stopped; the image checks clean.
    f.qvol(["snapshot", "revert", s(&image), "snap1"]).success();
    let checked = json_of(&f.qvol(["check", s(&image), "--json"]).success());
    assert_eq!(checked["clean"], true, "{checked}");

    // Second boot, on the reverted disk.
    let daemon = serve(&f, &image, "reverted", &[]);
    let mut spec = GuestSpec::new(VERIFY_REVERTED, &[daemon.socket()]);
    spec.timeout = Duration::from_secs(180);
    let second = guest::run(&kit, &spec, &f.path("boot2"))
        .unwrap_or_else(|e| panic!("the guest did not run: {e:#}"));
    assert_ran(&second, &daemon, "QVOL-VERIFY-DONE", "second boot");
    daemon.stop();
    for check in ["QVOL-REPLAY ", "QVOL-FSCK-COPY ", "QVOL-FSCK-DEVICE "] {
        let rc = second.marker(check);
        // e2fsck exits 0 when it found nothing to fix (the journal-only run: nothing
        // beyond replaying the journal, which is no error).
        assert_eq!(rc, "0", "{check}exit status {rc}\n{}", second.report());
    }

    let have = second.pairs("QVOL-HAVE ");
    for i in 0..=synced_before {
        let name = format!("f{i}");
        assert_eq!(
            have.get(&name),
            Some(&written[&name]),
            "{name} was synced before the snapshot was taken but is not back intact\n{}",
            second.report()
        );
    }
    for i in after..=last {
        let name = format!("f{i}");
        assert!(
            !have.contains_key(&name),
            "{name} was created after the snapshot command returned, yet it is on the reverted disk\n{}",
            second.report()
        );
    }
    // Files written while the snapshot was taken may or may not be in it; none other.
    for name in have.keys() {
        let known = name == "lost+found"
            || name
                .strip_prefix('f')
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n < after);
        assert!(
            known,
            "unexpected {name} on the reverted disk\n{}",
            second.report()
        );
    }
    let in_between = (synced_before + 1..after)
        .filter(|i| have.contains_key(&format!("f{i}")))
        .count();
    eprintln!(
        "snapshot after f{synced_before} was synced, took {snapshot_took:?}; the guest heard \
         of it before f{after}; {in_between} of the {} files in between are in it; \
         journal needed recovery: {}",
        after - synced_before - 1,
        second.marker("QVOL-NEEDS-RECOVERY ")
    );
}
