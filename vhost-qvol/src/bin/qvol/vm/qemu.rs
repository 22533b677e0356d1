//! The command lines of a VM: QEMU's and each disk backend's (`vhost-qvol`), each built by
//! one function from the parsed configuration and where its run files are, so that it can
//! be checked against an expected argv.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use vhost_qvol::open::KeySource;

use super::config::{Accel, DiskConfig, NetMode, VmConfig};

/// Where a running VM keeps its sockets, pid files and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// The vhost-user socket of disk `id`.
    pub fn disk_socket(&self, id: &str) -> PathBuf {
        self.0.join(format!("{id}.sock"))
    }
    /// The control socket of the backend of disk `id` (docs/CONTROL.md).
    pub fn disk_control(&self, id: &str) -> PathBuf {
        self.0.join(format!("{id}.ctl"))
    }
    /// The pid file of the backend of disk `id`.
    pub fn disk_pid(&self, id: &str) -> PathBuf {
        self.0.join(format!("{id}.pid"))
    }
    /// The log of the backend of disk `id`.
    pub fn disk_log(&self, id: &str) -> PathBuf {
        self.0.join(format!("{id}.log"))
    }
    /// QEMU's QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
    /// QEMU's pid file.
    pub fn qemu_pid(&self) -> PathBuf {
        self.0.join("qemu.pid")
    }
    /// QEMU's own log (stderr).
    pub fn qemu_log(&self) -> PathBuf {
        self.0.join("qemu.log")
    }
    /// The guest's serial console.
    pub fn serial_log(&self) -> PathBuf {
        self.0.join("serial.log")
    }
    /// What acceleration the running VM uses.
    pub fn accel_file(&self) -> PathBuf {
        self.0.join("accel")
    }
}

/// The arguments (after the program name) of the `vhost-qvol` serving `disk` of `cfg`, bound
/// to volume `volume_id` (hex), with its sockets in `run` and the keystore of `keys`. An
/// `rbd:` disk gets its cluster's `--ceph-conf` and `--ceph-id` when config.yaml names them
/// (else the daemon uses Ceph's defaults, `$CEPH_CONF` included, as `qvol` did).
pub fn backend_args(
    cfg: &VmConfig,
    disk: &DiskConfig,
    volume_id: &str,
    run: &RunDir,
    keys: &KeySource,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--socket-path".into(),
        run.disk_socket(&disk.id).into(),
        "--blk-file".into(),
        disk.path.clone().into(),
        "--volume-id".into(),
        volume_id.into(),
        "--num-queues".into(),
        cfg.cores.to_string().into(),
        "--control-socket".into(),
        run.disk_control(&disk.id).into(),
    ];
    if let Some(conf) = &disk.ceph.conf {
        a.extend(["--ceph-conf".into(), conf.clone().into()]);
    }
    if let Some(id) = &disk.ceph.id {
        a.extend(["--ceph-id".into(), id.into()]);
    }
    if let Some(ks) = &keys.keystore {
        a.extend(["--keystore".into(), ks.clone().into()]);
    }
    if let (Some(p), true) = (&keys.passphrase_file, keys.passphrase_named) {
        a.extend(["--passphrase-file".into(), p.clone().into()]);
    }
    a
}

/// The `-name` value of VM `name`'s QEMU (how a pid file's process is recognised as it).
pub fn name_arg(name: &str) -> String {
    format!("{name},process=qemu-{name}")
}

/// QEMU's option syntax: a comma in a value is doubled.
fn opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The QEMU arguments (after the program name) for `cfg`, accelerated by `accel`, with its
/// run files in `run`; `console`: the serial port on stdio instead of the log file.
pub fn qemu_args(cfg: &VmConfig, accel: Accel, run: &RunDir, console: bool) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mem = format!("{}M", cfg.memory_mib);
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", cfg.cpu_model.clone()),
        // "host" needs KVM; TCG's closest is "max".
        Accel::Tcg if cfg.cpu_model == "host" => ("tcg", "max".to_string()),
        Accel::Tcg => ("tcg", cfg.cpu_model.clone()),
    };
    push(&["-name", &name_arg(&cfg.name)]);
    push(&[
        "-machine",
        &format!("{},accel={accel_name},memory-backend=mem", cfg.machine),
    ]);
    push(&["-cpu", &cpu, "-smp", &cfg.cores.to_string(), "-m", &mem]);
    // vhost-user backends map guest memory: it must be a shared memfd.
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // QEMU runs the guest: deny it the system calls a guest that broke out would want.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    for (i, disk) in cfg.disks.iter().enumerate() {
        let boot = if i == 0 { ",bootindex=1" } else { "" };
        if disk.is_qvol() {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=chr-{},path={},reconnect=1",
                    disk.id,
                    opt(&run.disk_socket(&disk.id))
                ),
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=chr-{},num-queues={}{boot}",
                    disk.id, cfg.cores
                ),
            ]);
        } else {
            let format = disk.qemu_format();
            push(&[
                "-blockdev",
                &format!(
                    "driver={format},node-name=drv-{},file.driver=file,file.filename={}",
                    disk.id,
                    opt(&disk.path)
                ),
                "-device",
                &format!("virtio-blk-pci,drive=drv-{}{boot}", disk.id),
            ]);
        }
    }
    if let Some(boot) = &cfg.boot {
        push(&["-kernel", &boot.kernel.display().to_string()]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        if !boot.cmdline.is_empty() {
            push(&["-append", &boot.cmdline]);
        }
    }
    match cfg.net_mode {
        NetMode::User => push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            &format!("{},netdev=net0,mac={}", cfg.net_device, cfg.mac),
        ]),
        NetMode::None => {}
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt(&run.qmp())),
    ]);
    if console {
        push(&["-serial", "mon:stdio"]);
    } else {
        // `file:` takes the rest of the value as the path (no option escaping).
        push(&["-serial", &format!("file:{}", run.serial_log().display())]);
    }
    push(&["-pidfile", &run.qemu_pid().display().to_string()]);
    a.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::super::config::parse;
    use super::*;

    #[test]
    fn an_encrypted_vm_gets_memfd_memory_and_one_vhost_user_disk_per_volume() {
        let text = super::super::config::new_config_text(
            "web01",
            2,
            512,
            "64M",
            true,
            Some((
                Path::new("/k/vmlinuz"),
                Some(Path::new("/k/initrd")),
                "console=ttyS0",
            )),
        )
        .replace(
            "      size: 64M\n",
            "      size: 64M\n    data:\n      path: data.qcow2\n",
        );
        let cfg = parse(&text, "config.yaml", Path::new("/vms/web01")).unwrap();
        let run = RunDir(PathBuf::from("/vms/web01/run"));
        let argv: Vec<String> = qemu_args(&cfg, Accel::Tcg, &run, false)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let expected = [
            "-name",
            "web01,process=qemu-web01",
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "512M",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-chardev",
            "socket,id=chr-primary,path=/vms/web01/run/primary.sock,reconnect=1",
            "-device",
            "vhost-user-blk-pci,chardev=chr-primary,num-queues=2,bootindex=1",
            "-blockdev",
            "driver=qcow2,node-name=drv-data,file.driver=file,file.filename=/vms/web01/data.qcow2",
            "-device",
            "virtio-blk-pci,drive=drv-data",
            "-kernel",
            "/k/vmlinuz",
            "-initrd",
            "/k/initrd",
            "-append",
            "console=ttyS0",
            "-netdev",
            "user,id=net0",
        ];
        assert_eq!(&argv[..expected.len()], &expected);
        let rest = &argv[expected.len()..];
        assert_eq!(rest[0], "-device");
        assert_eq!(
            rest[1],
            format!("virtio-net-pci,netdev=net0,mac={}", cfg.mac)
        );
        assert_eq!(
            &rest[2..],
            &[
                "-qmp",
                "unix:/vms/web01/run/qmp.sock,server=on,wait=off",
                "-serial",
                "file:/vms/web01/run/serial.log",
                "-pidfile",
                "/vms/web01/run/qemu.pid",
            ]
        );
    }

    #[test]
    fn an_rbd_disk_is_a_vhost_user_disk_whose_backend_names_its_cluster() {
        let text = super::super::config::new_config_text("web01", 2, 512, "64M", true, None)
            .replace(
                "      size: 64M\n",
                "      size: 64M\n    data:\n      path: rbd:vms/tenant/web01-data\n      \
                 size: 1G\n      ceph_conf: ceph/cluster.conf\n      ceph_id: qvol\n",
            );
        let cfg = parse(&text, "config.yaml", Path::new("/vms/web01")).unwrap();
        let run = RunDir(PathBuf::from("/vms/web01/run"));
        let keys = KeySource {
            keystore: Some(PathBuf::from("/ks")),
            passphrase_file: Some(PathBuf::from("/p")),
            passphrase_named: true,
        };
        let text = |v: Vec<OsString>| -> Vec<String> {
            v.into_iter().map(|s| s.into_string().unwrap()).collect()
        };
        let data = &cfg.disks[1];
        assert!(data.is_qvol() && data.is_rbd());
        assert_eq!(
            text(backend_args(&cfg, data, "00ff", &run, &keys)),
            [
                "--socket-path",
                "/vms/web01/run/data.sock",
                "--blk-file",
                "rbd:vms/tenant/web01-data",
                "--volume-id",
                "00ff",
                "--num-queues",
                "2",
                "--control-socket",
                "/vms/web01/run/data.ctl",
                "--ceph-conf",
                "/vms/web01/ceph/cluster.conf",
                "--ceph-id",
                "qvol",
                "--keystore",
                "/ks",
                "--passphrase-file",
                "/p",
            ]
        );
        // A file disk gets no Ceph flags; an unnamed keystore is not passed.
        let primary = text(backend_args(
            &cfg,
            &cfg.disks[0],
            "00ff",
            &run,
            &KeySource::default(),
        ));
        assert_eq!(primary[3], "/vms/web01/disk.qvol");
        assert!(!primary
            .iter()
            .any(|a| a.starts_with("--ceph") || a == "--keystore"));
        // QEMU sees the rbd: disk as any other qvol disk: a vhost-user socket.
        let argv = text(qemu_args(&cfg, Accel::Tcg, &run, false));
        assert!(
            argv.contains(
                &"socket,id=chr-data,path=/vms/web01/run/data.sock,reconnect=1".to_string()
            ),
            "{argv:?}"
        );
    }

    #[test]
    fn commas_in_paths_are_doubled_and_host_cpu_becomes_max_under_tcg() {
        let text = super::super::config::new_config_text("a", 1, 64, "4M", true, None)
            .replace("model: max", "model: host");
        let cfg = parse(&text, "config.yaml", Path::new("/x,y")).unwrap();
        let run = RunDir(PathBuf::from("/x,y/run"));
        let argv: Vec<String> = qemu_args(&cfg, Accel::Tcg, &run, true)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(argv.contains(
            &"socket,id=chr-primary,path=/x,,y/run/primary.sock,reconnect=1".to_string()
        ));
        assert!(argv.windows(2).any(|w| w == ["-cpu", "max"]));
        assert!(argv.windows(2).any(|w| w == ["-serial", "mon:stdio"]));
        let kvm: Vec<String> = qemu_args(&cfg, Accel::Kvm, &run, true)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(kvm.windows(2).any(|w| w == ["-cpu", "host"]));
    }
}
