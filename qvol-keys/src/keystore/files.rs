//! Keystore file handling: 0700 directories, 0600 files written atomically (temporary file
//! in the same directory, fsync, rename, fsync of the directory), bounded reads.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Largest keystore file we read (a key record with many generations is a few KiB).
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// Creates `dir` (and parents) and sets it to mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create directory {}", dir.display()), e))?;
    #[cfg(unix)]
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("cannot set mode 0700 on {}", dir.display()), e))?;
    Ok(())
}

/// Writes `data` to `path` atomically with mode 0600: no reader ever sees a partial file, and
/// after a crash the file is either the old or the new one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid(format!("{} has no parent directory", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} has no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = write_new_file(&tmp, data).and_then(|()| {
        fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("cannot rename into {}", path.display()), e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir)
}

fn write_new_file(tmp: &Path, data: &[u8]) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut file = opts
        .open(tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))
}

/// fsyncs a directory so that a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot sync directory {}", dir.display()), e))
}

/// Reads a keystore file of at most [`MAX_FILE_LEN`] bytes into a buffer that is zeroized
/// on drop (keystore.json of a `--no-passphrase` keystore holds the master seed in hex).
/// The buffer is sized from the file's length and read into directly, so no partial copy
/// of the bytes is left behind in freed memory (as a growing `Vec` would).
pub fn read_bounded(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let hint = file
        .metadata()
        .map(|m| m.len().min(MAX_FILE_LEN))
        .unwrap_or(0);
    // One byte more than expected, so that a file that grew is noticed without a realloc.
    let mut buf = Zeroizing::new(vec![0u8; usize::try_from(hint).unwrap_or(0) + 1]);
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len as u64 > MAX_FILE_LEN {
                return Err(Error::corrupt(format!(
                    "{} is too large to be a keystore file",
                    path.display()
                )));
            }
            // Grow by copying into a new zeroizing buffer; the old one is wiped on drop.
            let mut bigger = Zeroizing::new(vec![0u8; (len * 2).max(4096)]);
            bigger[..len].copy_from_slice(&buf[..len]);
            buf = bigger;
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }
    if len as u64 > MAX_FILE_LEN {
        return Err(Error::corrupt(format!(
            "{} is too large to be a keystore file",
            path.display()
        )));
    }
    // Shrinking in place (truncate) keeps the allocation: it is wiped whole on drop.
    buf.truncate(len);
    Ok(buf)
}

/// Removes a file and syncs its directory.
pub fn remove(path: &Path) -> Result<()> {
    fs::remove_file(path).map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_is_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn bounded_reads_return_the_whole_file_and_refuse_huge_ones() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 4095, 4096, 70_000] {
            let p = dir.path().join(format!("{len}.json"));
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            fs::write(&p, &data).unwrap();
            assert_eq!(&read_bounded(&p).unwrap()[..], &data[..]);
        }
        let p = dir.path().join("huge.json");
        fs::write(&p, vec![b'x'; MAX_FILE_LEN as usize + 1]).unwrap();
        assert_eq!(
            read_bounded(&p).unwrap_err().kind(),
            crate::error::ErrorKind::Corrupt
        );
    }
}
