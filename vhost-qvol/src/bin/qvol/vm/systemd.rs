//! `qvol vm systemd NAME [--install]`: the unit that starts a VM at boot. One service per VM
//! runs `qvol vm start NAME --wait` (its disk backends, then QEMU, supervised until the
//! guest powers off) and `qvol vm stop NAME` when stopped; it is enabled for
//! `autostart: true`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::Vm;
use crate::keystore::KeystoreArgs;

/// Where `--install` writes units.
const UNIT_DIR: &str = "/etc/systemd/system";

/// The unit's file name.
pub fn unit_name(vm: &str) -> String {
    format!("qvol-vm-{vm}.service")
}

/// A value for a unit file: `%` doubled, quoted when it holds a space.
fn unit_arg(text: &str) -> String {
    let t = text.replace('%', "%%");
    if t.contains([' ', '"', '\\']) {
        format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        t
    }
}

/// The unit text for `vm`, run by the `qvol` binary at `qvol`.
pub fn unit_text(vm: &Vm, vms_dir: &Path, qvol: &Path, keys: &KeystoreArgs) -> String {
    let name = &vm.config.name;
    let common = format!("--vms-dir {}", unit_arg(&vms_dir.display().to_string()));
    let source = keys.source();
    let keystore = source
        .keystore
        .as_ref()
        .map(|ks| format!(" --keystore {}", unit_arg(&ks.display().to_string())))
        .unwrap_or_default();
    // A passphrase given to a keystore without one is refused: load it only when needed.
    let needs_pass = source
        .keystore
        .as_deref()
        .and_then(|d| qvol_keys::Keystore::open(d).ok())
        .is_none_or(|k| k.needs_passphrase());
    let credential = if needs_pass {
        "LoadCredential=qvol-passphrase:/etc/qvol/passphrase\n"
    } else {
        "# The keystore has no passphrase: no credential to load.\n"
    };
    let qvol = unit_arg(&qvol.display().to_string());
    let wanted = if vm.config.autostart {
        "WantedBy=multi-user.target\n"
    } else {
        "# autostart is false in config.yaml: not wanted by any target.\n"
    };
    format!(
        "# Written by `qvol vm systemd {name}`: starts VM {name} (its qvol disk backends, then\n\
         # QEMU) and stops it with an ACPI power-down. The keystore passphrase, if any, comes\n\
         # from the systemd credential qvol-passphrase.\n\
         [Unit]\n\
         Description=qvol VM {name}\n\
         After=network.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         ExecStart={qvol} vm start {name} --wait {common}{keystore}\n\
         ExecStop={qvol} vm stop {name} --timeout 60 {common}\n\
         {credential}\
         TimeoutStopSec=100\n\
         KillMode=mixed\n\
         LimitMEMLOCK=infinity\n\
         LimitCORE=0\n\
         \n\
         [Install]\n\
         {wanted}"
    )
}

/// Prints the unit, or writes it under /etc/systemd/system.
pub fn run(vm: &Vm, vms_dir: &Path, install: bool, keys: &KeystoreArgs) -> anyhow::Result<()> {
    let qvol = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qvol"));
    let text = unit_text(vm, vms_dir, &qvol, keys);
    if !install {
        print!("{text}");
        return Ok(());
    }
    let dir = Path::new(UNIT_DIR);
    if !dir.is_dir() {
        bail!("{UNIT_DIR} does not exist: is systemd installed here?");
    }
    let path = dir.join(unit_name(&vm.config.name));
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "Wrote {}; run `systemctl daemon-reload`{}.",
        path.display(),
        if vm.config.autostart {
            format!(
                " and `systemctl enable --now {}`",
                unit_name(&vm.config.name)
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
