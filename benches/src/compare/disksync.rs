//! The disk's own sync bandwidth, the bound for any backend that keeps its data durable:
//! what `dd if=/dev/urandom of=FILE bs=1M count=N conv=fdatasync` reports, measured in the
//! bench directory (the filesystem the images are on) in the same run as the backends.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

/// One measurement of the disk's sync bandwidth.
#[derive(Clone, Debug, Serialize)]
pub struct DiskSync {
    /// When in the run: "before" or "after" the backends.
    pub when: String,
    /// Bytes written (1 MiB `write`s to a new file) before the one `fdatasync`.
    pub bytes: u64,
    /// Bytes over the seconds from the first write to the end of the `fdatasync`.
    pub bytes_per_sec: f64,
    /// Seconds the `fdatasync` alone took.
    pub sync_s: f64,
}

/// Writes `bytes` of incompressible data to a new file in `dir` in 1 MiB writes, then
/// `fdatasync`s it, and removes it; the filesystem is synced (syncfs) before the clock
/// starts.
pub fn measure(dir: &Path, bytes: u64, when: &str) -> Result<DiskSync, String> {
    const CHUNK: usize = 1 << 20;
    let path = dir.join("disk-sync.tmp");
    let _ = fs::remove_file(&path);
    let mut buf = vec![0u8; CHUNK];
    // Filled once, outside the timing; each write carries its own index in front.
    integration::pattern::fill(&mut buf, 0, 0x5eed_d15c);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    // Whatever others left dirty on this filesystem is written back first, so that the
    // fdatasync below waits for this file's data only.
    // SAFETY: syncfs(2) on a descriptor this function owns for the duration of the call.
    unsafe {
        use std::os::fd::AsRawFd as _;
        libc::syncfs(f.as_raw_fd());
    }
    let result = (|| {
        let start = Instant::now();
        let mut done = 0u64;
        while done < bytes {
            buf[..8].copy_from_slice(&done.to_le_bytes());
            let n = CHUNK.min((bytes - done) as usize);
            f.write_all(&buf[..n])
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            done += n as u64;
        }
        let sync_start = Instant::now();
        f.sync_data()
            .map_err(|e| format!("fdatasync of {}: {e}", path.display()))?;
        let end = Instant::now();
        Ok(DiskSync {
            when: when.to_owned(),
            bytes,
            bytes_per_sec: bytes as f64 / end.duration_since(start).as_secs_f64(),
            sync_s: end.duration_since(sync_start).as_secs_f64(),
        })
    })();
    drop(f);
    let _ = fs::remove_file(&path);
    result
}
