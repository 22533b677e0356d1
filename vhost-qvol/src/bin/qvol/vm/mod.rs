//! `qvol vm new|start|stop|info|list|migrate|systemd`: VMs whose disks are qvol volumes. Each VM is a
//! directory `<vms dir>/<name>/` with its `config.yaml` (see [`config`]), its disks, and a
//! `run/` directory (sockets, pid files, logs) while it runs. A thin layer: it builds
//! command lines ([`qemu`]) and supervises processes ([`process`]).

mod accel;
pub mod config;
mod migrate;
mod process;
mod qemu;
mod systemd;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use vhost_qvol::image::{set_rbd_settings, CephArgs, RbdSettings};
use vhost_qvol::open::{read_image_header, volume_id_hex};
use vhost_qvol::paths;
use vhost_qvol::size::format_size;

use self::config::{Accel, VmConfig, CONFIG_FILE, KEM};
use self::process::{live_pid, sibling_program, spawn_detached, wait_for_socket, Qmp};
use self::qemu::{backend_args, qemu_args, RunDir};
use crate::create::NewVolume;
use crate::keystore::KeystoreArgs;

/// `qvol vm ...`
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Where VMs live [default: $QVOL_VMS, then $XDG_DATA_HOME/qvol/vms].
    #[arg(long, value_name = "DIR", global = true)]
    pub vms_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: VmCommand,
}

/// The `qvol vm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Write a new VM's config.yaml (its disk is made at the first start).
    New {
        /// VM name: letters, digits, '.', '_', '-'.
        name: String,
        /// Size of the primary disk.
        #[arg(long, value_name = "SIZE", default_value = "20G")]
        disk_size: String,
        /// Encrypt the disk with qvol (the default).
        #[arg(long, conflicts_with = "no_encrypt")]
        encrypt: bool,
        /// A plain qcow2 disk instead.
        #[arg(long)]
        no_encrypt: bool,
        /// Virtual CPUs.
        #[arg(long, value_name = "N", default_value_t = 2)]
        cpus: u16,
        /// Memory in MiB.
        #[arg(long, value_name = "MIB", default_value_t = 1024)]
        memory: u64,
        /// Direct kernel boot: the kernel.
        #[arg(long, value_name = "FILE", requires = "cmdline")]
        kernel: Option<PathBuf>,
        /// Direct kernel boot: the initrd.
        #[arg(long, value_name = "FILE", requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Direct kernel boot: the kernel command line.
        #[arg(long, value_name = "S", requires = "kernel")]
        cmdline: Option<String>,
    },
    /// Start a VM: make its key and disk if needed, its disk backends, then QEMU.
    Start {
        /// The VM.
        name: String,
        /// Stay until the VM powers off, then stop its backends.
        #[arg(long)]
        wait: bool,
        /// The serial console on this terminal (implies --wait).
        #[arg(long)]
        console: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Stop a VM: ACPI power-down, then quit after --timeout; its backends commit and exit.
    Stop {
        /// The VM.
        name: String,
        /// Kill QEMU at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Describe a VM: configuration, state, and its disks' encryption.
    Info {
        /// The VM.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// List the VMs, their state and whether their disks are encrypted.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn a VM's qcow2 disk into an encrypted qvol disk (backed up first, verified).
    Migrate(migrate::MigrateArgs),
    /// Print (or --install) the systemd unit that starts the VM at boot (autostart: true).
    Systemd {
        /// The VM.
        name: String,
        /// Write it to /etc/systemd/system instead of printing it.
        #[arg(long)]
        install: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// Runs `qvol vm ...`. The Ceph cluster of a VM's `rbd:` disks is the one its config.yaml
/// names (`ceph_conf`, `ceph_id`), not `ceph` (the global flags, which must be absent).
pub fn run(args: VmArgs, ceph: CephArgs) -> anyhow::Result<()> {
    if ceph.ceph_conf.is_some() || ceph.ceph_id.is_some() {
        bail!(
            "qvol vm takes the Ceph cluster of a VM's rbd: disks from its config.yaml \
             (hardware.disk.NAME.ceph_conf and ceph_id), not from --ceph-conf or --ceph-id"
        );
    }
    // `qvol vm start --break-lock` takes over the lock of the VM's rbd: disks (the global
    // flag, which no other vm command takes).
    let break_lock = ceph.break_lock;
    if break_lock && !matches!(args.command, VmCommand::Start { .. }) {
        bail!("--break-lock goes with `qvol vm start` (it takes over an rbd: disk's lock)");
    }
    let vms = paths::vms_dir(args.vms_dir.as_deref())
        .ok_or_else(|| anyhow!("no VMs directory: pass --vms-dir DIR or set QVOL_VMS"))?;
    // One VM's commands reach the cluster of its rbd: disks (one per VM, config.rs).
    let load = |name: &str| {
        let vm = Vm::load(&vms, name)?;
        if let Some(disk) = vm.config.disks.iter().find(|d| d.is_rbd()) {
            set_rbd_settings(RbdSettings {
                ceph: disk.ceph.clone(),
                break_lock: false,
            });
        }
        anyhow::Ok(vm)
    };
    match args.command {
        VmCommand::New {
            name,
            disk_size,
            encrypt: _,
            no_encrypt,
            cpus,
            memory,
            kernel,
            initrd,
            cmdline,
        } => {
            let boot = kernel
                .as_deref()
                .map(|k| (k, initrd.as_deref(), cmdline.as_deref().unwrap_or_default()));
            new(&vms, &name, &disk_size, !no_encrypt, cpus, memory, boot)
        }
        VmCommand::Start {
            name,
            wait,
            console,
            keystore,
        } => start(
            &load(&name)?,
            Starting {
                wait: wait || console,
                console,
                break_lock,
            },
            &keystore,
        ),
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => stop(&load(&name)?, force, Duration::from_secs(timeout)),
        VmCommand::Info {
            name,
            json,
            keystore,
        } => info(&load(&name)?, json, &keystore),
        VmCommand::List { json } => list(&vms, json),
        VmCommand::Migrate(args) => migrate::run(&load(&args.name)?, &args),
        VmCommand::Systemd {
            name,
            install,
            keystore,
        } => systemd::run(&load(&name)?, &vms, install, &keystore),
    }
}

/// A VM's directory and its validated configuration.
pub struct Vm {
    /// `<vms dir>/<name>`.
    pub dir: PathBuf,
    /// The parsed config.yaml.
    pub config: VmConfig,
    /// Its text (kept for in-place edits).
    pub text: String,
}

impl Vm {
    /// Loads and validates VM `name` of `vms`.
    pub fn load(vms: &Path, name: &str) -> anyhow::Result<Vm> {
        qvol_keys::validate_vm_name(name)?;
        let dir = vms.join(name);
        let file = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "there is no VM {name} in {} (create it with `qvol vm new {name}`)",
                    vms.display()
                )
            } else {
                anyhow!("cannot read {}: {e}", file.display())
            }
        })?;
        let config = config::parse(&text, &file.display().to_string(), &dir)?;
        if config.name != name {
            bail!(
                "{}: vm.name is {}, but the VM's directory is {name}",
                file.display(),
                config.name
            );
        }
        Ok(Vm { dir, config, text })
    }

    /// Its run directory.
    pub fn run_dir(&self) -> RunDir {
        RunDir(self.dir.join("run"))
    }

    /// QEMU's pid, if it runs.
    pub fn qemu_pid(&self) -> Option<i32> {
        live_pid(
            &self.run_dir().qemu_pid(),
            &qemu::name_arg(&self.config.name),
        )
    }

    /// Replaces config.yaml with `text` (validated first), atomically.
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        let file = self.dir.join(CONFIG_FILE);
        config::parse(text, &file.display().to_string(), &self.dir)?;
        let tmp = self.dir.join(format!(".{CONFIG_FILE}.tmp"));
        fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::File::open(&tmp).and_then(|f| f.sync_all()).ok();
        fs::rename(&tmp, &file).with_context(|| format!("cannot replace {}", file.display()))?;
        Ok(())
    }
}

fn new(
    vms: &Path,
    name: &str,
    disk_size: &str,
    encrypt: bool,
    cpus: u16,
    memory: u64,
    boot: Option<(&Path, Option<&Path>, &str)>,
) -> anyhow::Result<()> {
    qvol_keys::validate_vm_name(name)?;
    let dir = vms.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; refusing to overwrite a VM",
            dir.display()
        );
    }
    let text = config::new_config_text(name, cpus, memory, disk_size, encrypt, boot);
    // Validated before anything is written.
    config::parse(&text, CONFIG_FILE, &dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(dir.join(CONFIG_FILE), &text)
        .with_context(|| format!("cannot write {}", dir.join(CONFIG_FILE).display()))?;
    println!(
        "Created VM {name} in {} ({}); start it with `qvol vm start {name}`.",
        dir.display(),
        if encrypt {
            "encrypted disk, made at the first start"
        } else {
            "plain qcow2 disk"
        }
    );
    Ok(())
}

/// Stops the processes started so far unless disarmed: a failed start leaves nothing running.
struct Started {
    pids: Vec<i32>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for &pid in self.pids.iter().rev() {
            process::signal(pid, libc::SIGTERM);
            if !process::wait_gone(pid, Duration::from_secs(10)) {
                process::signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn qemu_program() -> PathBuf {
    std::env::var_os("QVOL_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// Makes what a first start needs: the key (written back into config.yaml) and the disks.
fn prepare_disks(vm: &Vm, keys: &KeystoreArgs) -> anyhow::Result<Vm> {
    let cfg = &vm.config;
    let mut missing = Vec::new();
    for disk in &cfg.disks {
        if !vhost_qvol::image::exists(&disk.path)? {
            missing.push(disk);
        }
    }
    if missing.is_empty() {
        return Ok(Vm {
            dir: vm.dir.clone(),
            config: vm.config.clone(),
            text: vm.text.clone(),
        });
    }
    if missing.iter().any(|d| d.is_qvol()) && !cfg.encrypted {
        bail!(
            "{} is an encrypted (qvol) disk but storage.encryption.enabled is false in \
             config.yaml",
            missing[0].path.display()
        );
    }
    let mut vm = Vm::load(vm.dir.parent().unwrap_or(Path::new(".")), &cfg.name)?;
    if missing.iter().any(|d| d.is_qvol()) {
        let ks = keys.unlock()?;
        let key_id = match &cfg.key_id {
            Some(k) => k.clone(),
            None => {
                let k = ks.new_key(&cfg.name)?.key_id;
                let text = config::with_encryption_keys(&vm.text, &k, cfg.suite.name())?;
                vm.write_config(&text)?;
                println!(
                    "Created key {k} for VM {} (written into config.yaml).",
                    cfg.name
                );
                vm = Vm::load(vm.dir.parent().unwrap_or(Path::new(".")), &cfg.name)?;
                k
            }
        };
        for disk in missing.iter().filter(|d| d.is_qvol()) {
            let size = disk.size.ok_or_else(|| {
                anyhow!(
                    "hardware.disk.{}.size is needed to create {}",
                    disk.id,
                    disk.path.display()
                )
            })?;
            let name = format!("{}-{}", cfg.name, disk.id);
            let new = NewVolume::make(&disk.path, size, cfg.suite, &name, &key_id, &ks, None)?;
            let id = new.volume_id;
            new.finish(&ks)?;
            println!(
                "Created {} ({}, {}, volume {}).",
                disk.path.display(),
                format_size(size),
                cfg.suite,
                volume_id_hex(&id)
            );
        }
    }
    for disk in missing.iter().filter(|d| !d.is_qvol()) {
        let size = disk.size.ok_or_else(|| {
            anyhow!(
                "hardware.disk.{}.size is needed to create {}",
                disk.id,
                disk.path.display()
            )
        })?;
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk.path)
            .arg(size.to_string())
            .status()
            .context("cannot run qemu-img (scripts/setup.sh installs it)")?;
        if !status.success() {
            bail!("qemu-img could not create {}", disk.path.display());
        }
    }
    Ok(vm)
}

/// The disk backends of `vm` that are running: (disk id, pid).
pub(super) fn live_backends(vm: &Vm) -> Vec<(String, i32)> {
    let run = vm.run_dir();
    vm.config
        .disks
        .iter()
        .filter_map(|d| {
            live_pid(&run.disk_pid(&d.id), &d.path.display().to_string()).map(|p| (d.id.clone(), p))
        })
        .collect()
}

/// How `qvol vm start` starts a VM.
struct Starting {
    /// Stay until the VM powers off.
    wait: bool,
    /// The serial console on this terminal.
    console: bool,
    /// Break the exclusive lock of rbd: disks (`vhost-qvol --break-lock`).
    break_lock: bool,
}

fn start(vm: &Vm, how: Starting, keys: &KeystoreArgs) -> anyhow::Result<()> {
    let Starting {
        wait,
        console,
        break_lock,
    } = how;
    let name = &vm.config.name;
    if let Some(pid) = vm.qemu_pid() {
        bail!("VM {name} is already running (QEMU pid {pid}); `qvol vm stop {name}` first");
    }
    // A backend left from a QEMU that died still holds its disk (and, on RBD, its lock:
    // --break-lock would fence it, not start the VM).
    if let Some((disk, pid)) = live_backends(vm).first() {
        bail!(
            "the backend of VM {name}'s disk {disk} is still running (pid {pid}) although \
             its QEMU is not; `qvol vm stop {name}` stops it"
        );
    }
    if break_lock && !vm.config.disks.iter().any(|d| d.is_rbd()) {
        bail!("--break-lock is for rbd: disks, and VM {name} has none");
    }
    let run = vm.run_dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&run.0)
        .with_context(|| format!("cannot create {}", run.0.display()))?;
    let vm = prepare_disks(vm, keys)?;
    let cfg = &vm.config;
    let qemu = qemu_program();
    let (accel, warning) = accel::choose(cfg, &qemu, &run.0);
    if let Some(w) = warning {
        eprintln!("qvol: warning: {w}");
    }
    let mut started = Started { pids: Vec::new() };
    let source = keys.source();
    for disk in cfg.disks.iter().filter(|d| d.is_qvol()) {
        let (_, header) = read_image_header(&disk.path)?;
        let socket = run.disk_socket(&disk.id);
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new(sibling_program("vhost-qvol"));
        let id = volume_id_hex(&header.volume_id);
        cmd.args(backend_args(cfg, disk, &id, &run, &source));
        if break_lock && disk.is_rbd() {
            cmd.arg("--break-lock");
        }
        let log = run.disk_log(&disk.id);
        let mut child = spawn_detached(cmd, &log, Some(&run.disk_pid(&disk.id)))?;
        started.pids.push(child.id() as i32);
        // An rbd: disk whose lock a dead client holds waits until Ceph notices (its watch
        // times out, about 30 s) and then takes it over.
        let patience = Duration::from_secs(if disk.is_rbd() { 60 } else { 15 });
        wait_for_socket(&socket, &mut child, &log, patience).map_err(|e| {
            // vhost-qvol's own hint names its flag; here it is start's.
            let mut e = e.to_string().replace(
                "`vhost-qvol --break-lock`",
                &format!("`qvol vm start {name} --break-lock`"),
            );
            if disk.is_rbd() && !break_lock && e.contains("did not appear") {
                e += &format!(
                    " (if a client that died holds its lock, `qvol vm start {name} \
                     --break-lock` takes it over)"
                );
            }
            anyhow!(
                "the disk backend of {} did not start: {e}",
                disk.path.display()
            )
        })?;
    }
    let _ = fs::remove_file(run.qmp());
    let _ = fs::remove_file(run.qemu_pid());
    let mut cmd = Command::new(&qemu);
    cmd.args(qemu_args(cfg, accel, &run, console));
    // QEMU runs the guest: it gets no way to the keystore or its passphrase (only the disk
    // backends need them).
    for secret in [
        "CREDENTIALS_DIRECTORY",
        "QVOL_PASSPHRASE_FILE",
        "QVOL_KEYSTORE",
    ] {
        cmd.env_remove(secret);
    }
    fs::write(
        run.accel_file(),
        if accel == Accel::Kvm {
            "kvm\n"
        } else {
            "tcg\n"
        },
    )?;
    if console {
        // In the foreground, on this terminal, until the guest powers off.
        let status = cmd
            .status()
            .with_context(|| format!("cannot start {}", qemu.display()))?;
        drop(started);
        clear_run_files(&vm);
        println!("VM {name} stopped ({status}).");
        return Ok(());
    }
    let log = run.qemu_log();
    let mut child = spawn_detached(cmd, &log, None)?;
    started.pids.push(child.id() as i32);
    wait_for_socket(&run.qmp(), &mut child, &log, Duration::from_secs(15))
        .map_err(|e| anyhow!("QEMU did not start: {e}"))?;
    let pid = child.id() as i32;
    if !wait {
        started.pids.clear();
        println!(
            "Started VM {name} (QEMU pid {pid}, {}); console log {}; stop it with `qvol vm stop {name}`.",
            if accel == Accel::Kvm { "KVM" } else { "TCG" },
            run.serial_log().display()
        );
        return Ok(());
    }
    println!("Started VM {name} (QEMU pid {pid}); waiting for it to power off.");
    let status = child.wait().context("cannot wait for QEMU")?;
    // The backends commit and exit (Started's drop).
    drop(started);
    clear_run_files(&vm);
    println!("VM {name} stopped ({status}).");
    Ok(())
}

fn stop(vm: &Vm, force: bool, timeout: Duration) -> anyhow::Result<()> {
    let name = &vm.config.name;
    let run = vm.run_dir();
    let backends = live_backends(vm);
    let qemu = vm.qemu_pid();
    if qemu.is_none() && backends.is_empty() {
        bail!("VM {name} is not running");
    }
    let mut how = "powered off";
    if let Some(pid) = qemu {
        if force {
            process::signal(pid, libc::SIGKILL);
            how = "killed (--force)";
        } else {
            let asked = Qmp::connect(&run.qmp()).and_then(|mut q| q.execute("system_powerdown"));
            if asked.is_err() || !process::wait_gone(pid, timeout) {
                how = "quit after the timeout";
                let quit = Qmp::connect(&run.qmp()).and_then(|mut q| q.execute("quit"));
                if quit.is_err() || !process::wait_gone(pid, Duration::from_secs(10)) {
                    process::signal(pid, libc::SIGKILL);
                    how = "killed (it did not quit)";
                }
            }
        }
        process::wait_gone(pid, Duration::from_secs(10));
    }
    for (id, pid) in &backends {
        process::signal(*pid, libc::SIGTERM);
        if !process::wait_gone(*pid, Duration::from_secs(20)) {
            process::signal(*pid, libc::SIGKILL);
            eprintln!("qvol: warning: the backend of disk {id} did not exit within 20 s; killed");
        }
    }
    clear_run_files(vm);
    println!("Stopped VM {name} ({how}).");
    Ok(())
}

/// Removes the pid files and sockets of a VM that no longer runs (logs stay).
fn clear_run_files(vm: &Vm) {
    let run = vm.run_dir();
    for d in &vm.config.disks {
        let _ = fs::remove_file(run.disk_pid(&d.id));
        let _ = fs::remove_file(run.disk_socket(&d.id));
        let _ = fs::remove_file(run.disk_control(&d.id));
    }
    let _ = fs::remove_file(run.qemu_pid());
    let _ = fs::remove_file(run.qmp());
}

/// The JSON description of a VM (what `info` prints, and `list` in short).
fn describe(vm: &Vm, keys: Option<&KeystoreArgs>) -> Value {
    let cfg = &vm.config;
    let run = vm.run_dir();
    let qemu = vm.qemu_pid();
    let accel_used = qemu
        .and_then(|_| fs::read_to_string(run.accel_file()).ok())
        .map(|s| s.trim().to_string());
    let unlocked = keys.map(|k| k.unlock().map_err(|e| format!("{e:#}")));
    let disks: Vec<Value> = cfg
        .disks
        .iter()
        .map(|d| {
            // `list` (no keys) does not connect to a Ceph cluster for an rbd: disk.
            let look = keys.is_some() || !d.is_rbd();
            let exists = look
                .then(|| vhost_qvol::image::exists(&d.path).ok())
                .flatten();
            let mut v = json!({"id": d.id, "path": d.path.display().to_string(), "size": d.size,
                "exists": exists, "encrypted": d.is_qvol(),
                "backend_pid": live_pid(&run.disk_pid(&d.id), &d.path.display().to_string())});
            if d.is_qvol() {
                v["encryption"] = json!("ENABLED (PQC)");
                v["algorithm"] = json!(cfg.suite.name());
                v["key_encapsulation"] = json!(KEM);
                v["key_id"] = json!(cfg.key_id);
                let read = (exists == Some(true)).then(|| read_image_header(&d.path));
                if let Some(Ok((_, header))) = read {
                    v["volume_id"] = json!(volume_id_hex(&header.volume_id));
                    v["algorithm"] = json!(header.suite.name());
                    v["size"] = json!(header.size);
                    v["keyslots"] = json!(header.keyslots.iter().filter(|s| !s.is_empty()).count());
                    if let Some(Ok(ks)) = &unlocked {
                        detail_with_key(&mut v, &d.path, &header, ks);
                    }
                }
                v["snapshots"] = json!([]);
            } else {
                v["encryption"] = json!("DISABLED");
            }
            v
        })
        .collect();
    json!({
        "name": cfg.name, "type": cfg.kind, "description": cfg.description,
        "dir": vm.dir.display().to_string(),
        "machine": cfg.machine, "accel": if cfg.accel == Accel::Kvm { "kvm" } else { "tcg" },
        "accel_used": accel_used,
        "cpu": {"model": cfg.cpu_model, "cores": cfg.cores}, "memory_mib": cfg.memory_mib,
        "network": {"mode": format!("{:?}", cfg.net_mode).to_lowercase(), "device": cfg.net_device, "mac": cfg.mac},
        "boot": cfg.boot.as_ref().map(|b| json!({"kernel": b.kernel.display().to_string(),
            "initrd": b.initrd.as_ref().map(|i| i.display().to_string()), "cmdline": b.cmdline})),
        "autostart": cfg.autostart,
        "state": if qemu.is_some() { "running" } else { "stopped" },
        "qemu_pid": qemu,
        "encrypted": cfg.encrypted,
        "disks": disks,
    })
}

/// Generation and space used, from a read-only open with the keystore.
fn detail_with_key(
    v: &mut Value,
    path: &Path,
    header: &qvol_core::HeaderInfo,
    ks: &qvol_keys::UnlockedKeystore,
) {
    let only_key = ks
        .volume_guard(&header.volume_id)
        .ok()
        .map(|g| g.binding().key_id.clone());
    match vhost_qvol::open::open_unrecorded(
        path,
        header,
        Some(ks),
        &vhost_qvol::unlock::Unlock::Keystore,
        only_key.as_deref(),
    ) {
        Ok((_, volume)) => {
            let info = volume.info();
            v["generation"] = json!(info.generation);
            v["allocated_bytes"] = json!(info.allocated_bytes);
        }
        Err(e) => v["locked"] = json!(format!("{e:#}")),
    }
}

fn info(vm: &Vm, as_json: bool, keys: &KeystoreArgs) -> anyhow::Result<()> {
    let d = describe(vm, Some(keys));
    if as_json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    println!("VM:             {}", s(&d["name"]));
    println!("type:           {}", s(&d["type"]));
    if !d["description"].as_str().unwrap_or_default().is_empty() {
        println!("description:    {}", s(&d["description"]));
    }
    println!(
        "state:          {}{}",
        s(&d["state"]),
        d["qemu_pid"]
            .as_i64()
            .map_or(String::new(), |p| format!(" (QEMU pid {p})"))
    );
    println!(
        "machine:        {}, accel {}{}",
        s(&d["machine"]),
        s(&d["accel"]),
        d["accel_used"]
            .as_str()
            .map_or(String::new(), |a| format!(" (running with {a})"))
    );
    println!(
        "CPU:            {} x {}",
        d["cpu"]["cores"],
        s(&d["cpu"]["model"])
    );
    println!("memory:         {} MiB", d["memory_mib"]);
    println!(
        "network:        {} {} {}",
        s(&d["network"]["mode"]),
        s(&d["network"]["device"]),
        s(&d["network"]["mac"])
    );
    println!("autostart:      {}", d["autostart"]);
    for disk in d["disks"].as_array().into_iter().flatten() {
        println!("disk {}:", s(&disk["id"]));
        println!("  path:         {}", s(&disk["path"]));
        println!("  Encryption:   {}", s(&disk["encryption"]));
        if disk["encrypted"].as_bool() == Some(true) {
            println!("  algorithm:    {}", s(&disk["algorithm"]));
            println!("  key encapsulation: {}", s(&disk["key_encapsulation"]));
            println!(
                "  key id:       {}",
                disk["key_id"]
                    .as_str()
                    .unwrap_or("(made at the first start)")
            );
            if let Some(id) = disk["volume_id"].as_str() {
                println!("  volume id:    {id}");
            }
            if let Some(g) = disk["generation"].as_u64() {
                println!("  generation:   {g}");
            }
            if let Some(a) = disk["allocated_bytes"].as_u64() {
                println!("  space used:   {}", format_size(a));
            }
            if let Some(why) = disk["locked"].as_str() {
                println!("  (locked: {why})");
            }
            println!("  snapshots:    none");
        }
        if let Some(size) = disk["size"].as_u64() {
            println!("  size:         {}", format_size(size));
        }
        if disk["exists"].as_bool() == Some(false) {
            println!("  (not created yet: made at the first start)");
        }
    }
    Ok(())
}

fn list(vms: &Path, as_json: bool) -> anyhow::Result<()> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(vms) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if as_json {
                println!("[]");
            } else {
                println!(
                    "No VMs in {} (create one with `qvol vm new NAME`).",
                    vms.display()
                );
            }
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", vms.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join(CONFIG_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        match Vm::load(vms, &name) {
            Ok(vm) => {
                let d = describe(&vm, None);
                out.push(
                    json!({"name": name, "state": d["state"], "encrypted": d["encrypted"],
                    "disks": d["disks"].as_array().map_or(0, Vec::len)}),
                );
            }
            Err(e) => {
                out.push(json!({"name": name, "state": "invalid", "error": format!("{e:#}")}))
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<24} {:<9} DISKS", "NAME", "STATE");
    for v in &out {
        let enc = match v["encrypted"].as_bool() {
            Some(true) => "encrypted (PQC)",
            Some(false) => "not encrypted",
            None => v["error"].as_str().unwrap_or("?"),
        };
        println!(
            "{:<24} {:<9} {enc}",
            v["name"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
