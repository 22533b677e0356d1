//! `qvol vm migrate NAME`: a VM's plain disks (qcow2, raw, ...) become encrypted qvol disks.
//! Order, so that an interruption at any step leaves the original disks and config.yaml as
//! they were: back up each disk (`<disk>.backup`), import it into `<stem>.qvol.partial`
//! (verified byte for byte), rename it to `<stem>.qvol`, and only then rewrite config.yaml
//! (atomically) to use the new disks. A later run picks up where an interrupted one stopped:
//! it removes a `.partial` leftover, keeps a backup identical to the disk, uses the VM's key
//! made before, and a finished `<stem>.qvol` recorded for this VM and identical to the disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};
use qvol_core::CipherSuite;
use vhost_qvol::open::volume_id_hex;
use vhost_qvol::size::format_size;

use super::config::{self, DiskConfig};
use super::Vm;
use crate::convert::{compare_volume, import_image, Target};
use crate::keystore::KeystoreArgs;
use crate::qemu_img::Source;

/// `qvol vm migrate`
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM (stopped).
    pub name: String,
    /// Do not keep a copy of the original disk (`<disk>.backup`).
    #[arg(long)]
    pub no_backup: bool,
    /// Cipher suite of the new disks [default: the config's algorithm].
    #[arg(long, value_name = "SUITE", value_parser = ["xchacha20-poly1305", "aegis-256"])]
    pub cipher: Option<String>,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// `<dir>/<stem>.qvol` for a plain disk.
fn target_of(disk: &DiskConfig) -> PathBuf {
    let stem = disk
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| disk.id.clone());
    disk.path.with_file_name(format!("{stem}.qvol"))
}

fn partial_of(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Runs `qvol vm migrate`.
pub fn run(vm: &Vm, args: &MigrateArgs) -> anyhow::Result<()> {
    let cfg = &vm.config;
    let name = &cfg.name;
    if vm.qemu_pid().is_some() || !super::live_backends(vm).is_empty() {
        bail!("VM {name} is running; stop it first (`qvol vm stop {name}`)");
    }
    let plain: Vec<&DiskConfig> = cfg.disks.iter().filter(|d| !d.is_qvol()).collect();
    if plain.is_empty() {
        bail!("every disk of VM {name} is already a qvol disk; nothing to migrate");
    }
    for disk in &plain {
        if !disk.path.is_file() {
            bail!(
                "disk {} of VM {name} ({}) does not exist",
                disk.id,
                disk.path.display()
            );
        }
        let _ = fs::remove_file(partial_of(&target_of(disk))); // left by an interrupted migrate
        let backup = backup_of(&disk.path);
        if !args.no_backup && backup.exists() && !same_bytes(&backup, &disk.path)? {
            bail!(
                "{} already exists and differs from {}; move it away or pass --no-backup",
                backup.display(),
                disk.path.display()
            );
        }
    }
    let suite: CipherSuite = match &args.cipher {
        Some(c) => c
            .parse()
            .map_err(|e| anyhow!("unknown cipher suite {c}: {e}"))?,
        None => cfg.suite,
    };
    let ks = args.keystore.unlock()?;
    // A key of this VM made by an earlier, interrupted migrate is used again.
    let existing = cfg.key_id.clone().or_else(|| {
        ks.list()
            .ok()?
            .into_iter()
            .find(|k| k.vm == *name)
            .map(|k| k.key_id)
    });
    let (key_id, new_key) = match existing {
        Some(k) => (k, false),
        None => (ks.new_key(name)?.key_id, true),
    };
    for disk in &plain {
        check_target(disk, name, &ks)?;
    }
    let result = migrate_disks(vm, &plain, &key_id, suite, &ks, !args.no_backup);
    match result {
        Ok(text) => {
            vm.write_config(&text)?;
            println!(
                "Migrated VM {name}: {} disk(s) now encrypted with {suite}, key {key_id}; config.yaml updated.",
                plain.len()
            );
            let left: Vec<String> = plain
                .iter()
                .flat_map(|d| {
                    let backup = backup_of(&d.path);
                    std::iter::once(d.path.display().to_string())
                        .chain(backup.exists().then(|| backup.display().to_string()))
                })
                .collect();
            eprintln!(
                "qvol: note: the old disk and its backup still hold the data in plaintext: {}; \
                 remove them (securely, on storage that overwrites in place) once VM {name} \
                 runs from its encrypted disk",
                left.join(", ")
            );
            Ok(())
        }
        Err(e) => {
            if new_key {
                let _ = ks.delete_checked(&key_id, true);
            }
            Err(e.context(format!(
                "VM {name} was not migrated; its disks and config.yaml are unchanged"
            )))
        }
    }
}

/// A target that already exists must be the finished disk of an interrupted migrate of this
/// VM: recorded in the keystore for a key of the VM, and identical to the source.
fn check_target(
    disk: &DiskConfig,
    vm: &str,
    ks: &qvol_keys::UnlockedKeystore,
) -> anyhow::Result<()> {
    let target = target_of(disk);
    if !target.exists() {
        return Ok(());
    }
    let not_ours = |why: String| {
        anyhow!(
            "{} already exists and is not in config.yaml ({why}); move it away and run migrate again",
            target.display()
        )
    };
    let source = Source::new(disk.path.clone(), Some(disk.qemu_format().into()), None)?;
    let bound = compare_volume(&target, &source, ks).map_err(|e| not_ours(format!("{e:#}")))?;
    if bound.vm != vm {
        return Err(not_ours(format!("it belongs to VM {}", bound.vm)));
    }
    Ok(())
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let status = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .context("cannot run cmp")?;
    Ok(status.success())
}

fn backup_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".backup");
    PathBuf::from(name)
}

/// Backs up, imports and renames each disk; returns the new config.yaml text. On failure,
/// removes what it made (the new disks; the backups stay, they are copies).
fn migrate_disks(
    vm: &Vm,
    plain: &[&DiskConfig],
    key_id: &str,
    suite: CipherSuite,
    ks: &qvol_keys::UnlockedKeystore,
    backup: bool,
) -> anyhow::Result<String> {
    let mut made: Vec<PathBuf> = Vec::new();
    let outcome = (|| -> anyhow::Result<String> {
        let mut text = config::set_scalars(
            &vm.text,
            &["storage", "encryption"],
            &[
                ("enabled", "true"),
                ("key_id", key_id),
                ("algorithm", suite.name()),
            ],
        )?;
        for disk in plain {
            if backup {
                copy_sparse(&disk.path, &backup_of(&disk.path))?;
                qvol_core::failpoint::hit("qvol:migrate-backed-up");
            }
            let target = target_of(disk);
            let partial = partial_of(&target);
            let source = Source::new(disk.path.clone(), Some(disk.qemu_format().into()), None)?;
            made.push(partial.clone());
            let into = Target {
                path: &partial,
                suite,
                compression: None,
            };
            let done = import_image(
                &source,
                &into,
                key_id,
                &format!("{}-{}", vm.config.name, disk.id),
                ks,
                true,
            )?;
            fs::rename(&partial, &target).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    partial.display(),
                    target.display()
                )
            })?;
            made.push(target.clone());
            qvol_core::failpoint::hit("qvol:migrate-converted");
            println!(
                "{} -> {}: {} ({} allocated), volume {}, verified identical.",
                disk.path.display(),
                target.display(),
                format_size(done.size),
                format_size(done.allocated),
                volume_id_hex(&done.volume_id)
            );
            let file_name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let relative = if target.parent() == Some(vm.dir.as_path()) {
                file_name
            } else {
                target.display().to_string()
            };
            text = config::set_scalars(
                &text,
                &["hardware", "disk", &disk.id],
                &[("path", &relative)],
            )?;
        }
        Ok(text)
    })();
    if outcome.is_err() {
        for path in &made {
            let _ = fs::remove_file(path);
        }
    }
    outcome
}

/// `cp --sparse=always --reflink=auto`: a copy that keeps holes (and shares blocks where the
/// file system can).
fn copy_sparse(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto", "--no-clobber"])
        .arg(from)
        .arg(to)
        .status()
        .context("cannot run cp")?;
    if !status.success() || !to.exists() {
        bail!("cannot back up {} to {}", from.display(), to.display());
    }
    Ok(())
}
