//! Whether KVM works here: `/dev/kvm` existing is not enough (nested virtualisation may
//! hang guests, or QEMU may abort setting up the CPU model), so QEMU itself boots a
//! five-byte boot sector with the VM's machine and CPU model under KVM, which powers off
//! through the isa-debug-exit port. Anything else within the time limit means TCG.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::config::{Accel, VmConfig};
use super::process::signal;

/// A boot sector: `mov al, 1; out 0xf4, al; hlt; jmp $`, then the 0x55AA signature.
fn boot_sector() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..7].copy_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0xeb, 0xfe]);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// The acceleration to run `cfg` with, and why not the one it asks for (a warning).
pub fn choose(cfg: &VmConfig, qemu: &Path, scratch: &Path) -> (Accel, Option<String>) {
    if cfg.accel == Accel::Tcg {
        return (Accel::Tcg, None);
    }
    if std::env::var("QVOL_VM_ACCEL").is_ok_and(|v| v == "tcg") {
        return (Accel::Tcg, Some("QVOL_VM_ACCEL=tcg: using TCG".into()));
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (
            Accel::Tcg,
            Some("/dev/kvm cannot be opened: using TCG (much slower)".into()),
        );
    }
    match probe(cfg, qemu, scratch) {
        Ok(()) => (Accel::Kvm, None),
        Err(why) => (
            Accel::Tcg,
            Some(format!(
                "KVM does not work here ({why}): using TCG (much slower)"
            )),
        ),
    }
}

fn probe(cfg: &VmConfig, qemu: &Path, scratch: &Path) -> Result<(), String> {
    let image = scratch.join("kvm-probe.img");
    std::fs::write(&image, boot_sector())
        .map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    let cpu = &cfg.cpu_model;
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-machine",
            &cfg.machine,
            "-cpu",
            cpu,
            "-m",
            "64",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=ide",
            image.display().to_string().replace(',', ",,")
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < Duration::from_secs(8) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                signal(child.id() as i32, libc::SIGKILL);
                let _ = child.wait();
                let _ = std::fs::remove_file(&image);
                return Err("a test guest did not finish within 8 s".into());
            }
        }
    };
    let _ = std::fs::remove_file(&image);
    // isa-debug-exit: QEMU exits with (1 << 1) | 1.
    if status.code() == Some(3) {
        Ok(())
    } else {
        Err(format!("a test guest failed ({status})"))
    }
}
