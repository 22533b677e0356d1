//! A QEMU guest (TCG) on a vhost-user-blk disk served by `vhost-qvol`: an ext4 filesystem
//! survives a daemon restart and a second boot (checksums and `e2fsck -fn` clean), and I/O
//! goes on without a guest-visible error when the daemon is killed and restarted mid-I/O
//! (QEMU `-chardev socket,...,reconnect=1`). `--print-capabilities` is checked in
//! `guest_configs.rs` against the vhost-user JSON descriptor.
//!
//! These tests need QEMU and the guest kernel; without them they FAIL and name
//! `scripts/setup.sh`. The `qemu_storage_daemon_*` variants (ignored by default) run the same
//! guests against qemu-storage-daemon, the reference backend, to check the harness itself:
//! `cargo nextest run -p integration --test guest_disk --run-ignored all`.

use std::fs;
use std::time::Duration;

use integration::guest::backend::{Backend, BackendKind, QvolVolume, ScratchDir};
use integration::guest::ext4::{sums, CANARY, VERIFY_FS, WRITE_FS};
use integration::guest::{self, GuestKit, GuestOutcome, GuestSpec};

/// Writes a 4 MiB random pattern to six regions of the raw disk with O_DIRECT, reading each
/// back and comparing, printing `QVOL-PASS n` after each; then reads all regions again.
const IO_LOOP: &str = r#"
dev=/dev/vda
head -c 4194304 /dev/urandom > /run/qvol/pattern
want=$(sha256sum < /run/qvol/pattern | cut -d' ' -f1)
echo QVOL-IO-START
for pass in 0 1 2 3 4 5; do
    dd if=/run/qvol/pattern of=$dev bs=256k seek=$((pass * 16)) oflag=direct conv=fsync 2>/dev/null
    got=$(dd if=$dev bs=256k skip=$((pass * 16)) count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then echo "QVOL-MISMATCH pass $pass"; exit 1; fi
    echo "QVOL-PASS $pass"
done
for pass in 0 1 2 3 4 5; do
    got=$(dd if=$dev bs=256k skip=$((pass * 16)) count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then echo "QVOL-MISMATCH reread $pass"; exit 1; fi
done
echo QVOL-IO-DONE
"#;

fn kit() -> GuestKit {
    GuestKit::locate().unwrap_or_else(|e| panic!("cannot boot the test guest: {e:#}"))
}

fn qvol_backend(dir: &ScratchDir, size: &str) -> BackendKind {
    let volume = QvolVolume::create(dir.path(), size, None)
        .unwrap_or_else(|e| panic!("cannot create the test volume: {e:#}"));
    BackendKind::VhostQvol(volume)
}

fn raw_backend(dir: &ScratchDir, size: u64) -> BackendKind {
    let image = dir.path().join("disk.raw");
    let file = fs::File::create(&image).expect("create the raw image");
    file.set_len(size).expect("size the raw image");
    BackendKind::QemuStorageDaemon(image)
}

fn run_guest(
    kit: &GuestKit,
    script: &str,
    backend: &Backend,
    workdir: &std::path::Path,
) -> GuestOutcome {
    let spec = GuestSpec::new(script, &[backend.socket()]);
    guest::run(kit, &spec, workdir).unwrap_or_else(|e| panic!("the guest did not run: {e:#}"))
}

fn assert_clean(outcome: &GuestOutcome, backend: &Backend, what: &str) {
    assert!(
        outcome.succeeded(),
        "{what}: the guest script failed\n{}\n--- backend ---\n{}",
        outcome.report(),
        backend.log()
    );
    let errors = outcome.io_error_lines();
    assert!(
        errors.is_empty(),
        "{what}: the guest reported I/O errors: {errors:#?}\n{}",
        outcome.report()
    );
}
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Boot, mkfs + write, stop the backend, restart it, boot again and verify.
fn ext4_survives_restart(kind: BackendKind, dir: &ScratchDir) {
    let kit = kit();
    let mut backend = Backend::start(kind.clone(), &dir.path().join("disk.sock"), 1)
        .unwrap_or_else(|e| panic!("cannot start the backend: {e:#}"));
    let first = run_guest(&kit, WRITE_FS, &backend, &dir.path().join("boot1"));
    assert_clean(&first, &backend, "first boot");
    assert!(
        first.console.contains("QVOL-WRITE-DONE"),
        "{}",
        first.report()
    );
    let written = sums(&first);
    assert_eq!(
        written.len(),
        9,
        "expected nine checksums\n{}",
        first.report()
    );

    let status = backend
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("stopping the backend: {e:#}\n{}", backend.log()));
    assert!(
        status.success(),
        "the backend exited with {status} on SIGTERM\n{}",
        backend.log()
    );
    if let BackendKind::VhostQvol(volume) = &kind {
        let raw = fs::read(&volume.image).expect("read the raw image");
        assert!(
            !contains(&raw, CANARY),
            "the .qvol image holds the guest's plaintext"
        );
    }
    backend
        .restart()
        .unwrap_or_else(|e| panic!("cannot restart the backend: {e:#}"));

    let second = run_guest(&kit, VERIFY_FS, &backend, &dir.path().join("boot2"));
    assert_clean(&second, &backend, "second boot");
    assert!(
        second.console.contains("QVOL-VERIFY-DONE"),
        "{}",
        second.report()
    );
    assert_eq!(
        sums(&second),
        written,
        "checksums changed across the restart\n{}",
        second.report()
    );
}

/// Kill the backend with SIGKILL while the guest writes and reads, restart it, and check the
/// guest saw no error and read back what it wrote.
fn io_survives_backend_kill(kind: BackendKind, dir: &ScratchDir) {
    let kit = kit();
    let mut backend = Backend::start(kind, &dir.path().join("disk.sock"), 1)
        .unwrap_or_else(|e| panic!("cannot start the backend: {e:#}"));
    let spec = GuestSpec::new(IO_LOOP, &[backend.socket()]);
    let mut running = guest::boot(&kit, &spec, &dir.path().join("boot"))
        .unwrap_or_else(|e| panic!("the guest did not start: {e:#}"));
    running
        .wait_for_console("QVOL-PASS 1", Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e:#}\n--- backend ---\n{}", backend.log()));
    let _ = backend
        .signal_and_wait("KILL", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("killing the backend: {e:#}"));
    // Four more 4 MiB write+read passes remain: the kill landed in the middle of the I/O.
    assert!(
        !running.console().contains("QVOL-PASS 5"),
        "the guest finished its I/O before the backend was killed"
    );
    std::thread::sleep(Duration::from_millis(300));
    backend
        .restart()
        .unwrap_or_else(|e| panic!("cannot restart the backend: {e:#}"));
    let outcome = running
        .wait()
        .unwrap_or_else(|e| panic!("the guest did not finish: {e:#}"));
    assert_clean(&outcome, &backend, "I/O across a backend restart");
    assert!(
        outcome.console.contains("QVOL-IO-DONE"),
        "{}",
        outcome.report()
    );
    let passes = outcome.lines_with_prefix("QVOL-PASS ").count();
    assert_eq!(passes, 6, "{}", outcome.report());
}

#[test]
fn guest_ext4_survives_vhost_qvol_restart() {
    let dir = ScratchDir::new("guest-ext4").expect("scratch dir");
    ext4_survives_restart(qvol_backend(&dir, "64M"), &dir);
}

#[test]
fn guest_io_survives_vhost_qvol_kill_and_reconnect() {
    let dir = ScratchDir::new("guest-reconnect").expect("scratch dir");
    io_survives_backend_kill(qvol_backend(&dir, "32M"), &dir);
}

#[test]
#[ignore = "harness check against the reference backend; see the module doc"]
fn qemu_storage_daemon_ext4_survives_restart() {
    let dir = ScratchDir::new("qsd-ext4").expect("scratch dir");
    ext4_survives_restart(raw_backend(&dir, 64 << 20), &dir);
}

#[test]
#[ignore = "harness check against the reference backend; see the module doc"]
fn qemu_storage_daemon_io_survives_kill_and_reconnect() {
    let dir = ScratchDir::new("qsd-reconnect").expect("scratch dir");
    io_survives_backend_kill(raw_backend(&dir, 32 << 20), &dir);
}
