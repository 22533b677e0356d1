//! Files the commands create: never over an existing one, with their mode from the start,
//! synced, and removed again if writing them fails.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

/// Writes `data` to the new file `path` (refused if anything is there) with `mode`, synced.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?;
    if let Err(e) = file.write_all(data).and_then(|()| file.sync_all()) {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}
