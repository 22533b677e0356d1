//! A throwaway single-node Ceph cluster for one test (`scripts/ceph-cluster.sh`: one
//! monitor, one OSD with BlueStore on a sparse file, the pool `rbd`), stopped and removed
//! when dropped. Starting fails the test loudly when Ceph is not installed: a test that
//! needs a cluster never passes without one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tempfile::TempDir;

use crate::fixture::{Fixture, Run};

/// A running cluster.
#[derive(Debug)]
pub struct CephCluster {
    dir: TempDir,
    conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

impl CephCluster {
    /// Starts a cluster (about 10 s); panics with the script's output if it cannot.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ceph")
            .tempdir()
            .expect("a temporary directory");
        let t0 = Instant::now();
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("scripts/ceph-cluster.sh runs");
        assert!(
            out.status.success(),
            "cannot start a Ceph cluster (is Ceph installed? scripts/setup.sh installs it): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("ceph: cluster up in {:.1} s", t0.elapsed().as_secs_f64());
        let conf = dir.path().join("ceph.conf");
        Self { dir, conf }
    }

    /// Its configuration file (what `CEPH_CONF` or `--ceph-conf` names).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// A fixture (keystore, binaries) whose commands reach this cluster (`CEPH_CONF`).
    pub fn fixture(&self) -> Fixture {
        let mut f = Fixture::new();
        f.ceph_conf = Some(self.conf.clone());
        f
    }

    /// `--ceph-conf FILE`, for the `qvol` and `vhost-qvol` command lines.
    pub fn args(&self) -> [String; 2] {
        ["--ceph-conf".into(), self.conf.display().to_string()]
    }

    /// The `rbd:` name of `image` in the pool `rbd`.
    pub fn image(&self, image: &str) -> PathBuf {
        PathBuf::from(format!("rbd:rbd/{image}"))
    }

    /// Runs Ceph's `rbd` tool against this cluster.
    pub fn rbd(&self, args: &[&str]) -> Run {
        Command::new("rbd")
            .env("CEPH_CONF", &self.conf)
            .args(args)
            .output()
            .expect("the rbd tool runs")
            .into()
    }

    /// Runs Ceph's `ceph` tool against this cluster.
    pub fn ceph(&self, args: &[&str]) -> Run {
        Command::new("ceph")
            .env("CEPH_CONF", &self.conf)
            .args(args)
            .output()
            .expect("the ceph tool runs")
            .into()
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}
