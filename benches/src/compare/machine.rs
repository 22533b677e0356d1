//! A description of the machine the figures come from.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// CPU, kernel, filesystem and tool versions.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs available to this process.
    pub cpus: usize,
    /// The CPU flags that matter to the ciphers (aes, avx2, vaes, ...), as present.
    pub crypto_flags: Vec<String>,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// `uname -sr`.
    pub kernel: String,
    /// Filesystem type holding the images.
    pub filesystem: String,
    /// `qemu-storage-daemon --version`, first line.
    pub qsd_version: String,
    /// Which implementation each qvol suite uses on this CPU.
    pub qvol_implementations: Vec<(String, String)>,
}

const FLAGS: &[&str] = &[
    "aes",
    "vaes",
    "pclmulqdq",
    "vpclmulqdq",
    "avx",
    "avx2",
    "avx512f",
    "avx512vl",
    "sha_ni",
    "ssse3",
    // aarch64 names
    "pmull",
    "sha2",
    "asimd",
    "sve",
];

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

/// The filesystem type of the mount that holds `dir` (the longest matching mount point).
fn filesystem_of(dir: &Path) -> String {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mnt)
                .then(|| (mnt.len(), format!("{ty} ({mnt})")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, d)| d)
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Machine {
    /// Describes this machine; `image_dir` is where the images live.
    pub fn describe(image_dir: &Path, qsd: &Path) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let cpu_model = field("model name")
            .or_else(|| field("CPU part"))
            .unwrap_or_default();
        let flags = field("flags")
            .or_else(|| field("Features"))
            .unwrap_or_default();
        let present: Vec<&str> = flags.split_whitespace().collect();
        let crypto_flags = FLAGS
            .iter()
            .filter(|f| present.contains(f))
            .map(|f| (*f).to_owned())
            .collect();
        let memory_bytes = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024);
        Machine {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            crypto_flags,
            memory_bytes,
            kernel: first_line(Command::new("uname").arg("-sr")),
            filesystem: filesystem_of(image_dir),
            qsd_version: first_line(Command::new(qsd).arg("--version")),
            qvol_implementations: qvol_core::suite::CipherSuite::ALL
                .iter()
                .map(|s| (s.name().to_owned(), s.implementation().to_owned()))
                .collect(),
        }
    }
}
