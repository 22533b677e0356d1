//! `qvol vm` end to end with real guests (TCG: KVM does not work on the test machines, so
//! `start` falls back with a warning): a VM whose qcow2 root disk is migrated boots from the
//! encrypted disk; two VMs run at once, each on its own key, each guest's writes only on its
//! own disk; `start`, `stop` and `migrate` refuse what they cannot do in one sentence;
//! a migrate killed at each step leaves the disk and config.yaml as they were and can be run
//! again; bad configurations and names are refused, naming the key and the line.
//!
//! The guests are built here (`integration::rootfs`): an ext4 root with busybox, and an
//! initramfs that mounts it from `root=/dev/vda` or writes a marker to `/dev/vda`. A missing
//! QEMU, kernel, busybox, cpio, mke2fs or qemu-img fails the test naming `scripts/setup.sh`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::bins;
use integration::fixture::{bounded, file_tree, json_of, Fixture, Run};
use integration::rootfs::{file_contains, unique_marker, RootKit, INITRD_ERROR, MARK_WRITTEN};
use serde_json::Value;

/// How long a TCG guest may take to boot and do its work (both cores may be busy).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// The kernel command line common to the test VMs.
const CMDLINE: &str = "console=ttyS0 loglevel=4 mitigations=off";

fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// A keystore, a VMs directory, the guest kernel and the test initramfs; every VM process
/// a test started is killed when it is dropped.
struct World {
    f: Fixture,
    vms: PathBuf,
    kit: RootKit,
    initrd: PathBuf,
}

impl World {
    fn new() -> Self {
        let kit = RootKit::locate();
        let f = Fixture::new();
        let vms = f.path("vms");
        let initrd = f.path("initrd.cpio");
        kit.initramfs(&initrd);
        Self {
            f,
            vms,
            kit,
            initrd,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.vms.join(name)
    }

    fn config(&self, name: &str) -> PathBuf {
        self.dir(name).join("config.yaml")
    }

    /// A `qvol vm --vms-dir DIR ARGS...` command.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.f.command(&bins::qvol());
        cmd.arg("vm").arg("--vms-dir").arg(&self.vms).args(args);
        cmd
    }

    /// `qvol vm ARGS...`, for at most `limit`.
    fn vm_within(&self, limit: Duration, args: &[&str]) -> Run {
        bounded(self.command(args), limit)
    }

    /// `qvol vm ARGS...`, for at most a minute.
    fn vm(&self, args: &[&str]) -> Run {
        self.vm_within(Duration::from_secs(60), args)
    }

    /// `qvol vm new NAME --kernel ... --initrd ... --cmdline "CMDLINE EXTRA" ARGS...`.
    fn new_vm(&self, name: &str, cmdline_extra: &str, args: &[&str]) {
        let cmdline = format!("{CMDLINE} {cmdline_extra}");
        let mut all = vec![
            "new",
            name,
            "--cpus",
            "1",
            "--memory",
            "256",
            "--disk-size",
            "16M",
            "--kernel",
            s(&self.kit.kernel),
            "--initrd",
            s(&self.initrd),
            "--cmdline",
            &cmdline,
        ];
        all.extend_from_slice(args);
        self.vm(&all).success();
    }

    fn info(&self, name: &str) -> Value {
        json_of(&self.vm(&["info", name, "--json"]).success())
    }

    fn serial(&self, name: &str) -> String {
        fs::read(self.dir(name).join("run/serial.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until VM `name`'s console shows `needle`; panics with the console and QEMU's
    /// log if QEMU exits first or [`BOOT_TIMEOUT`] passes.
    fn wait_console(&self, name: &str, needle: &str) {
        let start = Instant::now();
        let qemu = pid_in(&self.dir(name).join("run/qemu.pid"));
        loop {
            let console = self.serial(name);
            if console.contains(needle) {
                return;
            }
            let gone = qemu.is_some_and(|p| !alive(p));
            if gone || start.elapsed() > BOOT_TIMEOUT || console.contains(INITRD_ERROR) {
                panic!(
                    "VM {name} never printed {needle:?} ({}):\n--- console ---\n{console}\n--- qemu ---\n{}",
                    if gone { "QEMU exited" } else { "timed out or failed" },
                    fs::read_to_string(self.dir(name).join("run/qemu.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The files of VM `name`'s directory and their bytes.
    fn tree(&self, name: &str) -> BTreeMap<PathBuf, Vec<u8>> {
        file_tree(&self.dir(name))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Whatever a failed test left running: QEMU first, then the disk backends.
        for entry in fs::read_dir(&self.vms).into_iter().flatten().flatten() {
            let run = entry.path().join("run");
            let mut pids: Vec<PathBuf> = fs::read_dir(&run)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "pid"))
                .collect();
            pids.sort_by_key(|p| p.file_name() != Some("qemu.pid".as_ref()));
            for p in pids {
                if let Some(pid) = pid_in(&p).filter(|&p| alive(p) && is_vm_process(p)) {
                    // SAFETY: kill has no memory-safety preconditions; the pid is one this
                    // test's VM wrote, alive and still QEMU or vhost-qvol.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

fn pid_in(file: &Path) -> Option<i32> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Whether `pid` is QEMU or a disk backend (a stale pid file may name a reused pid).
fn is_vm_process(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let argv0 = c.split(|&b| b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        argv0.contains("qemu-system") || argv0.ends_with("vhost-qvol")
    })
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// The line (1-based) of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} is not in:\n{text}"))
        + 1
}

/// Start under TCG says why it did not use KVM.
fn assert_tcg_warning(run: &Run) {
    assert!(
        run.stderr.contains("qvol: warning:") && run.stderr.contains("using TCG"),
        "no KVM fallback warning: {run:#?}"
    );
}

/// B1. The boot story: a VM with a plain qcow2 root disk is migrated, then boots from the
/// encrypted disk, whose file holds none of the root's plaintext.
#[test]
fn a_migrated_vm_boots_from_its_encrypted_disk() {
    let w = World::new();
    let marker = unique_marker("QVOL-ROOT-OK");
    let root = w.f.path("root.qcow2");
    w.kit.root_disk(&marker, &root);
    w.new_vm("boot", "root=/dev/vda", &["--no-encrypt"]);
    let dir = w.dir("boot");
    fs::copy(&root, dir.join("disk.qcow2")).unwrap();
    assert!(
        file_contains(&dir.join("disk.qcow2"), marker.as_bytes()),
        "the plain disk should hold the init script in plaintext"
    );

    let run = w.vm(&["migrate", "boot"]).success();
    assert!(run.stdout.contains("Migrated VM boot"), "{run:#?}");
    assert_eq!(
        fs::read(dir.join("disk.qcow2.backup")).unwrap(),
        fs::read(&root).unwrap(),
        "the backup is not the original disk"
    );
    let config = fs::read_to_string(w.config("boot")).unwrap();
    assert!(config.contains("      path: disk.qvol\n"), "{config}");
    assert!(config.contains("    enabled: true\n"), "{config}");
    let key_line = config
        .lines()
        .find(|l| l.trim_start().starts_with("key_id: "))
        .unwrap_or_else(|| panic!("no key_id in config.yaml:\n{config}"));
    let key_id = key_line.trim_start().trim_start_matches("key_id: ");

    let started = Instant::now();
    let run = w
        .vm_within(BOOT_TIMEOUT, &["start", "boot", "--wait"])
        .success();
    eprintln!("boot from the encrypted disk: {:?}", started.elapsed());
    assert_tcg_warning(&run);
    assert!(run.stdout.contains("VM boot stopped"), "{run:#?}");
    let console = w.serial("boot");
    assert!(
        console.contains(&marker),
        "the root's init did not run:\n{console}"
    );
    assert!(!console.contains(INITRD_ERROR), "{console}");
    assert!(console.contains("reboot: Power down"), "{console}");

    let info = w.info("boot");
    assert_eq!(info["state"], "stopped", "{info}");
    assert_eq!(info["qemu_pid"], Value::Null, "{info}");
    let disk = &info["disks"][0];
    assert_eq!(disk["encryption"], "ENABLED (PQC)", "{info}");
    assert_eq!(disk["key_id"], key_id, "{info}");
    assert_eq!(disk["backend_pid"], Value::Null, "{info}");
    assert!(disk["generation"].as_u64().is_some(), "not opened: {info}");
    assert!(disk.get("locked").is_none(), "{info}");
    assert!(
        !file_contains(&dir.join("disk.qvol"), marker.as_bytes()),
        "the encrypted disk holds the marker in plaintext"
    );
}

/// B2 and B3. Two encrypted VMs at once, each with a key made at its first start; each
/// guest writes its own marker over its disk and then ignores ACPI power-down.
#[test]
fn two_vms_run_at_once_each_on_its_own_key() {
    let w = World::new();
    let names = ["alpha", "beta"];
    let marks = [unique_marker("QVOL-MARK-A"), unique_marker("QVOL-MARK-B")];
    for (name, mark) in names.iter().zip(&marks) {
        w.new_vm(name, &format!("qvol.mark={mark}"), &[]);
    }
    // A comment of the user's, on a line of its own and after a value qvol rewrites.
    let config = w.config("alpha");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace(
            "storage:\n",
            "storage:\n  # alpha's disk key: ask the ops team before rotating\n",
        )
        .replace(
            "    algorithm: xchacha20-poly1305\n",
            "    algorithm: xchacha20-poly1305   # fast without AES-NI\n",
        );
    fs::write(&config, &text).unwrap();

    for name in names {
        let run = w.vm(&["start", name]).success();
        assert_tcg_warning(&run);
        assert!(run.stdout.contains("Created key"), "{run:#?}");
        assert!(
            run.stdout.contains(&format!("Started VM {name}")),
            "{run:#?}"
        );
    }
    // Key write-back: the key_id line added and the algorithm line rewritten in place,
    // keeping its comment; every other line, comments included, as it was.
    let after = fs::read_to_string(&config).unwrap();
    let key_lines: Vec<&str> = after
        .lines()
        .filter(|l| l.trim_start().starts_with("key_id:"))
        .collect();
    assert_eq!(key_lines.len(), 1, "{after}");
    assert!(key_lines[0].starts_with("    key_id: alpha-"), "{after}");
    let algorithm = after
        .lines()
        .find(|l| l.trim_start().starts_with("algorithm:"))
        .unwrap();
    assert!(
        algorithm.starts_with("    algorithm: xchacha20-poly1305 ")
            && algorithm.ends_with("# fast without AES-NI"),
        "the algorithm line lost its comment: {algorithm:?}"
    );
    let others = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| {
                let l = l.trim_start();
                !l.starts_with("key_id:") && !l.starts_with("algorithm:")
            })
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        others(&after),
        others(&text),
        "config.yaml changed elsewhere"
    );
    assert!(after.contains("  # alpha's disk key: ask the ops team before rotating\n"));
    for (name, mark) in names.iter().zip(&marks) {
        w.wait_console(name, &format!("{MARK_WRITTEN} {mark}"));
    }

    let list = json_of(&w.vm(&["list", "--json"]).success());
    for name in names {
        let vm = list
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not listed: {list}"));
        assert_eq!(vm["state"], "running", "{list}");
        assert_eq!(vm["encrypted"], true, "{list}");
    }
    let infos: Vec<Value> = names.iter().map(|n| w.info(n)).collect();
    let keys: Vec<&str> = infos
        .iter()
        .map(|i| i["disks"][0]["key_id"].as_str().expect("a key id"))
        .collect();
    assert_ne!(keys[0], keys[1], "both VMs use one key");
    assert!(
        keys[0].starts_with("alpha-") && keys[1].starts_with("beta-"),
        "{keys:?}"
    );

    // B3: a running VM cannot be started again, nor migrated; nothing changes.
    let before = w.tree("alpha");
    w.vm(&["start", "alpha"])
        .one_sentence_error("qvol", "VM alpha is already running");
    w.vm(&["migrate", "alpha"])
        .one_sentence_error("qvol", "VM alpha is running");
    let now = w.tree("alpha");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        now.keys().collect::<Vec<_>>(),
        "a refused start or migrate added or removed files"
    );
    assert_eq!(before[&config], now[&config], "config.yaml changed");

    // The guests ignore the power-down request: stop quits QEMU after --timeout.
    let timeout = 3;
    for (name, info) in names.iter().zip(&infos) {
        let qemu = info["qemu_pid"].as_i64().expect("a QEMU pid") as i32;
        let backend = info["disks"][0]["backend_pid"]
            .as_i64()
            .expect("a backend pid") as i32;
        assert!(alive(qemu) && alive(backend), "{info}");
        let started = Instant::now();
        let run = w
            .vm(&["stop", name, "--timeout", &timeout.to_string()])
            .success();
        let took = started.elapsed();
        eprintln!("{} ({took:?})", run.stdout.trim());
        assert!(
            took < Duration::from_secs(timeout + 12),
            "stop took {took:?} with --timeout {timeout}: {run:#?}"
        );
        assert!(
            run.stdout.contains(&format!("Stopped VM {name}")),
            "{run:#?}"
        );
        assert!(!alive(qemu), "QEMU of {name} still runs");
        assert!(!alive(backend), "the disk backend of {name} still runs");
    }
    w.vm(&["stop", "alpha"])
        .one_sentence_error("qvol", "VM alpha is not running");

    let list = json_of(&w.vm(&["list", "--json"]).success());
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "stopped"),
        "{list}"
    );
    for (i, name) in names.iter().enumerate() {
        let image = w.dir(name).join("disk.qvol");
        let info = json_of(&w.f.qvol(["info", s(&image), "--json"]).success());
        assert_eq!(info["recorded"], true, "{info}");
        assert_eq!(info["rolled_back"], false, "{info}");
        assert!(info.get("locked").is_none(), "{info}");
        let raw = w.f.path(&format!("{name}.raw"));
        w.f.qvol(["export", s(&image), s(&raw)]).success();
        let (own, other) = (&marks[i], &marks[1 - i]);
        assert!(
            file_contains(&raw, own.as_bytes()),
            "{name}'s disk does not hold what its guest wrote"
        );
        assert!(
            !file_contains(&raw, other.as_bytes()),
            "{name}'s disk holds what the other guest wrote"
        );
        for mark in &marks {
            assert!(
                !file_contains(&image, mark.as_bytes()),
                "{} holds a marker in plaintext",
                image.display()
            );
        }
    }

    // A QEMU that died leaves its disk backend running, holding the disk: start refuses
    // (on RBD, `--break-lock` would fence that backend, not start the VM), and stop stops
    // the backend.
    w.vm(&["start", "alpha"]).success();
    let run = w.dir("alpha").join("run");
    let qemu = pid_in(&run.join("qemu.pid")).expect("a QEMU pid");
    let backend = pid_in(&run.join("primary.pid")).expect("a backend pid");
    // SAFETY: kill has no memory-safety preconditions; the pid is this test's QEMU.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    let t0 = Instant::now();
    while alive(qemu) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "QEMU outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = w
        .vm(&["start", "alpha"])
        .one_sentence_error("qvol", "is still running");
    assert!(line.contains(&format!("pid {backend}")), "{line}");
    w.vm(&["stop", "alpha"]).success();
    assert!(!alive(backend), "stop left the backend running");
}

/// B4. A migrate killed at each of its steps leaves the disk and config.yaml byte for byte,
/// and a second migrate then goes through.
#[test]
fn a_migrate_killed_at_any_step_changes_nothing_and_can_be_run_again() {
    let w = World::new();
    let root = w.f.path("root.qcow2");
    w.kit.root_disk(&unique_marker("QVOL-ROOT"), &root);
    let mut second_runs_failed = Vec::new();
    for (i, point) in [
        "qvol:migrate-backed-up",
        "qvol:imported",
        "qvol:migrate-converted",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("mig{i}");
        w.new_vm(&name, "root=/dev/vda", &["--no-encrypt"]);
        let dir = w.dir(&name);
        let disk = dir.join("disk.qcow2");
        fs::copy(&root, &disk).unwrap();
        let config_before = fs::read(w.config(&name)).unwrap();
        let disk_before = fs::read(&disk).unwrap();

        let mut cmd = w.command(&["migrate", &name]);
        // The killed import's NBD socket directory stays in TMPDIR: keep it in the fixture.
        let tmp = w.f.path("tmp");
        fs::create_dir_all(&tmp).unwrap();
        cmd.env("QVOL_FAILPOINT", point).env("TMPDIR", &tmp);
        let run = bounded(cmd, Duration::from_secs(60));
        assert_eq!(
            run.code,
            -libc::SIGABRT,
            "migrate did not stop at {point}: {run:#?}"
        );
        assert!(
            run.stderr.contains(&format!("failpoint {point}: aborting")),
            "{run:#?}"
        );
        assert_eq!(
            fs::read(&disk).unwrap(),
            disk_before,
            "{point}: the original disk changed"
        );
        assert_eq!(
            fs::read(w.config(&name)).unwrap(),
            config_before,
            "{point}: config.yaml changed"
        );
        let info = w.info(&name);
        assert_eq!(
            info["disks"][0]["encryption"], "DISABLED",
            "{point}: {info}"
        );
        let leftovers: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        eprintln!("{point}: the VM directory holds {leftovers:?}");

        // Every point is tried before the test fails, so that it reports them all.
        let run = w.vm(&["migrate", &name]);
        if run.code != 0 {
            second_runs_failed.push(format!("{point}: {}", run.stderr.trim()));
            continue;
        }
        let info = w.info(&name);
        assert_eq!(
            info["disks"][0]["encryption"], "ENABLED (PQC)",
            "{point}: {info}"
        );
        let raw = w.f.path(&format!("{name}.raw"));
        w.f.qvol(["export", s(&dir.join("disk.qvol")), s(&raw)])
            .success();
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw", s(&root), s(&raw)])
            .output()
            .expect("run qemu-img");
        assert!(
            cmp.status.success(),
            "{point}: the migrated disk differs from the original: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    assert!(
        second_runs_failed.is_empty(),
        "a second migrate after an interrupted one failed:\n{}",
        second_runs_failed.join("\n")
    );
    let check = w.f.qvol(["keystore", "check"]).success();
    assert!(check.stdout.contains("every record verifies"), "{check:#?}");
}

/// B5. Bad configurations, names and disks: one sentence, exit 1, nothing changed.
#[test]
fn bad_configs_names_and_disks_are_refused_in_one_sentence() {
    let w = World::new();
    w.new_vm("cfg", "root=/dev/vda", &[]);
    let config = w.config("cfg");
    let good = fs::read_to_string(&config).unwrap();
    let file = s(&config).to_string();

    let without_memory_size: String = good
        .lines()
        .filter(|l| !l.trim_start().starts_with("size: 256"))
        .map(|l| format!("{l}\n"))
        .collect();
    let cases = [
        (
            "hardware.memory.size removed",
            without_memory_size.clone(),
            format!(
                "{file}:{}: hardware.memory.size",
                line_of(&without_memory_size, "memory:")
            ),
        ),
        (
            "a mistyped key",
            good.replace("    cores: 1\n", "    coers: 1\n"),
            format!(
                "{file}:{}: unknown key hardware.cpu.coers",
                line_of(&good, "cores: 1")
            ),
        ),
        (
            "an unknown machine type",
            good.replace("  type: q35\n", "  type: sparc64\n"),
            format!(
                "{file}:{}: machine.type \"sparc64\"",
                line_of(&good, "type: q35")
            ),
        ),
    ];
    let keystore = file_tree(&w.f.keystore);
    for (what, text, needle) in &cases {
        fs::write(&config, text).unwrap();
        let before = w.tree("cfg");
        for args in [["start", "cfg"], ["info", "cfg"]] {
            w.vm(&args).one_sentence_error("qvol", needle);
        }
        w.vm(&["migrate", "cfg"]).one_sentence_error("qvol", needle);
        assert!(w.tree("cfg") == before, "{what}: the VM directory changed");
        assert!(
            file_tree(&w.f.keystore) == keystore,
            "{what}: the keystore changed"
        );
    }
    fs::write(&config, &good).unwrap();
    let before = w.tree("cfg");
    w.vm(&["stop", "cfg"])
        .one_sentence_error("qvol", "VM cfg is not running");
    assert!(w.tree("cfg") == before, "a refused stop changed the VM");

    // migrate of a VM whose disk does not exist: no key, backup or volume made.
    w.new_vm("nodisk", "root=/dev/vda", &["--no-encrypt"]);
    let before = w.tree("nodisk");
    w.vm(&["migrate", "nodisk"]).one_sentence_error(
        "qvol",
        &format!(
            "({}) does not exist",
            s(&w.dir("nodisk").join("disk.qcow2"))
        ),
    );
    assert!(
        w.tree("nodisk") == before,
        "a refused migrate changed the VM"
    );
    assert!(
        file_tree(&w.f.keystore) == keystore,
        "a refused migrate changed the keystore"
    );

    // Names that are not one path component of printable characters.
    let vms = file_tree(&w.vms);
    for name in [
        "a/b",
        "../cfg",
        "bad\u{1}name",
        "esc\u{1b}[31m",
        "new\nline",
        "",
    ] {
        for args in [
            vec!["new", name],
            vec!["start", name],
            vec!["migrate", name],
        ] {
            let run = w.vm(&args);
            let line = run.one_sentence_error("qvol", "VM name");
            assert!(
                !line.contains('\u{1b}') && !line.contains('\u{1}'),
                "a control character reached the terminal: {line:?}"
            );
        }
    }
    assert!(
        file_tree(&w.vms) == vms,
        "a refused name changed the VMs directory"
    );
}
