//! Where the keystore and the passphrase come from when the command line does not say:
//! the flag, then the environment, then the XDG or systemd default (README, "Commands").

use std::env;
use std::path::{Path, PathBuf};

/// The keystore directory: `--keystore`, then `$QVOL_KEYSTORE`, then
/// `$XDG_DATA_HOME/qvol/keystore`, then `~/.local/share/qvol/keystore`.
pub fn keystore_dir(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = flag {
        return Some(dir.to_path_buf());
    }
    if let Some(dir) = non_empty_var("QVOL_KEYSTORE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(data) = non_empty_var("XDG_DATA_HOME") {
        return Some(Path::new(&data).join("qvol/keystore"));
    }
    non_empty_var("HOME").map(|home| Path::new(&home).join(".local/share/qvol/keystore"))
}

/// The VMs directory of `qvol vm`: `--vms-dir`, then `$QVOL_VMS`, then
/// `$XDG_DATA_HOME/qvol/vms`, then `~/.local/share/qvol/vms`.
pub fn vms_dir(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = flag {
        return Some(dir.to_path_buf());
    }
    if let Some(dir) = non_empty_var("QVOL_VMS") {
        return Some(PathBuf::from(dir));
    }
    if let Some(data) = non_empty_var("XDG_DATA_HOME") {
        return Some(Path::new(&data).join("qvol/vms"));
    }
    non_empty_var("HOME").map(|home| Path::new(&home).join(".local/share/qvol/vms"))
}

/// The passphrase file: `--passphrase-file`, then `$QVOL_PASSPHRASE_FILE`, then
/// `$CREDENTIALS_DIRECTORY/qvol-passphrase` (systemd credentials). `None` when none is set.
pub fn passphrase_file(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(file) = flag {
        return Some(file.to_path_buf());
    }
    if let Some(file) = non_empty_var("QVOL_PASSPHRASE_FILE") {
        return Some(PathBuf::from(file));
    }
    non_empty_var("CREDENTIALS_DIRECTORY").map(|dir| Path::new(&dir).join("qvol-passphrase"))
}

/// Whether the passphrase file is named by `--passphrase-file` or `$QVOL_PASSPHRASE_FILE`
/// (rather than being the systemd credential's default place, used only if it exists).
pub fn passphrase_file_named(flag: Option<&Path>) -> bool {
    flag.is_some() || non_empty_var("QVOL_PASSPHRASE_FILE").is_some()
}

fn non_empty_var(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.is_empty())
}
