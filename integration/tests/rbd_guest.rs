//! A QEMU guest (TCG) on a qvol volume in Ceph RBD, booted with
//! `qemu-configs/qemu-vhost-qvol-rbd.sh` (which starts vhost-qvol on `rbd:POOL/IMAGE`, then
//! QEMU): an ext4 filesystem written in a first boot is clean and unchanged in a second one,
//! served by a new daemon (`integration::guest::ext4`), and the RBD image never holds the
//! guest's plaintext. Then `qvol vm` with an `rbd:POOL/NAMESPACE/IMAGE` disk whose cluster
//! config.yaml names: its first start makes the volume, its backend serves that image of
//! that cluster, the guest writes to it, a snapshot goes through the backend, and stop
//! releases the image. Needs QEMU, the guest kernel and Ceph (`scripts/setup.sh`); without
//! them it fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::bins;
use integration::ceph::CephCluster;
use integration::fixture::{bounded, json_of, Fixture, Run};
use integration::guest::ext4::{sums, CANARY, VERIFY_FS, WRITE_FS};
use integration::guest::{self, repo_root, GuestKit, GuestOutcome};
use integration::rootfs::{file_contains, unique_marker, RootKit, MARK_WRITTEN};

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

    a_vm_on_an_rbd_disk(&cluster, &f);
}

/// Kills what a VM's pid files name (QEMU first) if the test fails half-way.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for name in ["qemu.pid", "primary.pid"] {
            let pid = fs::read_to_string(self.0.join(name)).ok();
            if let Some(pid) = pid.and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill has no memory-safety preconditions; the pid is one this
                // test's VM wrote (a stale one is gone: the VM was stopped and cleared it).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// `qvol vm --vms-dir VMS ARGS...` without `CEPH_CONF` (config.yaml names the cluster),
/// for at most a minute.
fn qvol_vm(f: &Fixture, vms: &Path, args: &[&str]) -> Run {
    let mut cmd = f.command(&bins::qvol());
    cmd.env_remove("CEPH_CONF")
        .env("QVOL_VM_ACCEL", "tcg")
        .arg("vm")
        .arg("--vms-dir")
        .arg(vms)
        .args(args);
    bounded(cmd, Duration::from_secs(60))
}

fn a_vm_on_an_rbd_disk(cluster: &CephCluster, f: &Fixture) {
    let began = Instant::now();
    let kit = RootKit::locate();
    let initrd = f.path("initrd.cpio");
    kit.initramfs(&initrd);
    let vms = f.path("vms");
    let mark = unique_marker("QVOL-RBD-VM");
    let cmdline = format!("console=ttyS0 loglevel=4 mitigations=off qvol.mark={mark}");
    let kernel = kit.kernel.to_str().unwrap();
    let new = [
        "new",
        "web",
        "--cpus",
        "1",
        "--memory",
        "256",
        "--disk-size",
        "16M",
        "--kernel",
        kernel,
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    qvol_vm(f, &vms, &new).success();
    cluster.rbd(&["namespace", "create", "rbd/vms"]).success();
    let config = vms.join("web/config.yaml");
    let conf = cluster.conf().display().to_string();
    let text = fs::read_to_string(&config).unwrap().replace(
        "      path: disk.qvol\n",
        &format!("      path: rbd:rbd/vms/web\n      ceph_conf: {conf}\n"),
    );
    fs::write(&config, text).unwrap();
    let run = vms.join("web/run");
    let _kill = KillOnDrop(run.clone());

    let started = qvol_vm(f, &vms, &["start", "web"]).success();
    assert!(
        started.stdout.contains("Created rbd:rbd/vms/web"),
        "{started:#?}"
    );
    // Its backend serves that image of the cluster config.yaml names.
    let pid: u32 = fs::read_to_string(run.join("primary.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let argv: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for pair in [
        ["--blk-file", "rbd:rbd/vms/web"],
        ["--ceph-conf", conf.as_str()],
    ] {
        assert!(
            argv.windows(2).any(|w| w == pair),
            "{pair:?} not in {argv:?}"
        );
    }
    let t0 = Instant::now();
    let serial = run.join("serial.log");
    while !file_contains(&serial, format!("{MARK_WRITTEN} {mark}").as_bytes()) {
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "the guest never wrote its mark:\n{}",
            fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = json_of(&qvol_vm(f, &vms, &["info", "web", "--json"]).success());
    let disk = &info["disks"][0];
    assert_eq!(disk["path"], "rbd:rbd/vms/web", "{info}");
    assert_eq!(disk["exists"], true, "{info}");
    assert_eq!(disk["backend_pid"], pid, "{info}");
    assert!(disk["volume_id"].is_string(), "{info}");
    // A change of the running VM's disk goes through its backend.
    f.qvol(["snapshot", "create", "rbd:rbd/vms/web", "booted"])
        .success();

    qvol_vm(f, &vms, &["stop", "web", "--force"]).success();
    let status = cluster.rbd(&["status", "rbd/vms/web"]).success();
    assert!(status.stdout.contains("Watchers: none"), "{status:?}");
    let raw = f.path("vm-rbd.raw");
    cluster
        .rbd(&["export", "rbd/vms/web", raw.to_str().unwrap()])
        .success();
    assert!(
        !file_contains(&raw, mark.as_bytes()),
        "the RBD image holds the guest's plaintext"
    );
    let plain = f.path("vm-plain.raw");
    f.qvol(["export", "rbd:rbd/vms/web", plain.to_str().unwrap()])
        .success();
    let bytes = fs::read(&plain).unwrap();
    assert!(
        bytes.starts_with(mark.as_bytes()),
        "the guest's write is not on the volume"
    );
    let list = f.qvol(["snapshot", "list", "rbd:rbd/vms/web"]).success();
    assert!(list.stdout.contains("booted"), "{list:?}");

    // A backend that died holding the disk's lock (kill -9: Ceph lets the lock go only when
    // its watch times out, about 30 s later): --break-lock takes the disk over at once.
    let mut dead = f
        .start_daemon(Path::new("rbd:rbd/vms/web"), "dead", &[])
        .unwrap();
    dead.kill9();
    qvol_vm(f, &vms, &["start", "web", "--break-lock"]).success();
    let log = fs::read_to_string(run.join("primary.log")).unwrap();
    assert!(
        log.contains("exclusive lock"),
        "says whose lock it broke: {log}"
    );
    qvol_vm(f, &vms, &["stop", "web", "--force"]).success();
    eprintln!(
        "qvol vm on rbd: made, booted, stopped, read back in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}
