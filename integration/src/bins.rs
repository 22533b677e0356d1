//! The workspace binaries under test (`vhost-qvol`, `qvol`).
//!
//! Cargo only builds a package's own binaries for its integration tests, and these live
//! in another package, so the first test in each test process runs
//! `cargo build -p vhost-qvol --bins` (a no-op when they are up to date) into the same
//! target directory and profile as the test itself. Set `QVOL_BIN_DIR` to use binaries
//! from elsewhere and skip the build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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
        let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "vhost-qvol",
            "--bins",
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
        profile_dir.to_path_buf()
    })
}

/// The path of the `vhost-qvol` daemon.
pub fn vhost_qvol() -> PathBuf {
    bin_dir().join("vhost-qvol")
}

/// The path of the `qvol` tool.
pub fn qvol() -> PathBuf {
    bin_dir().join("qvol")
}
