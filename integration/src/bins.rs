//! The workspace binaries under test (`vhost-qvol`, `qvol`).
//!
//! Cargo only builds a package's own binaries for its integration tests, and these live
//! in another package. `cargo test --workspace` / `cargo nextest run --workspace` build
//! them anyway (vhost-qvol has integration tests of its own), so the binaries in the
//! test's target directory are used as they are when they are newer than every source
//! file they are built from. Otherwise (e.g. `cargo test -p integration` after an edit)
//! the first test in the process runs `cargo build -p vhost-qvol --bins` into the same
//! target directory and profile. Set `QVOL_BIN_DIR` to use binaries from elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The crates whose sources make up the binaries.
const SOURCE_DIRS: [&str; 4] = ["vhost-qvol", "qvol-core", "qvol-keys", "qvol-rbd"];
const BINARIES: [&str; 2] = ["vhost-qvol", "qvol"];

/// The directory holding the binaries, built if needed. Panics (failing the test
/// loudly) if they cannot be built.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("QVOL_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("the test binary has a path");
        // target/<profile>/deps/<test binary>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in target/<profile>/deps");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("integration/ is inside the workspace");
        if !fresh(profile_dir, workspace) {
            build(profile_dir);
        }
        profile_dir.to_path_buf()
    })
}

/// Whether both binaries exist and are newer than every file under the source crates
/// and the workspace manifest and lock file.
fn fresh(profile_dir: &Path, workspace: &Path) -> bool {
    let oldest_binary = BINARIES
        .iter()
        .map(|b| modified(&profile_dir.join(b)))
        .min()
        .flatten();
    let Some(oldest_binary) = oldest_binary else {
        return false;
    };
    let mut newest_source = SystemTime::UNIX_EPOCH;
    for file in ["Cargo.toml", "Cargo.lock"] {
        if let Some(t) = modified(&workspace.join(file)) {
            newest_source = newest_source.max(t);
        }
    }
    for dir in SOURCE_DIRS {
        newest_source = newest_source.max(newest_in(&workspace.join(dir)));
    }
    oldest_binary > newest_source
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files under `dir` (skipping fuzz/ and target/).
fn newest_in(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name == "fuzz" {
            continue;
        }
        if path.is_dir() {
            newest = newest.max(newest_in(&path));
        } else if let Some(t) = modified(&path) {
            newest = newest.max(t);
        }
    }
    newest
}

fn build(profile_dir: &Path) {
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "vhost-qvol",
        "--bins",
        "--features",
        "failpoints",
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .expect("cargo can be run to build the binaries");
    assert!(status.success(), "cargo build -p vhost-qvol --bins failed");
}

/// The path of the `vhost-qvol` daemon.
pub fn vhost_qvol() -> PathBuf {
    bin_dir().join("vhost-qvol")
}

/// The path of the `qvol` tool.
pub fn qvol() -> PathBuf {
    bin_dir().join("qvol")
}
