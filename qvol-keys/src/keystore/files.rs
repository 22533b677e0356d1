//! Keystore file handling: 0700 directories, 0600 files written atomically (temporary file
//! in the same directory, fsync, rename, fsync of the directory), bounded reads.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::secret::fill_random;

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

/// How many random temporary names [`write_atomic`] tries before giving up.
const TMP_ATTEMPTS: usize = 8;

/// Writes `data` to `path` atomically with mode 0600: no reader ever sees a partial file, and
/// after a crash the file is either the old or the new one. The temporary file
/// `.<name>.tmp-<16 random hex digits>` is created with `O_EXCL | O_NOFOLLOW` (a file or
/// link planted under that name is never written through, and a planted name only costs a
/// retry under another random name).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid(format!("{} has no parent directory", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} has no file name", path.display())))?;
    let mut attempt = 0;
    let tmp = loop {
        let mut suffix = [0u8; 8];
        fill_random(&mut suffix);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
        let tmp = dir.join(tmp_name);
        match write_new_file(&tmp, data) {
            Ok(()) => break tmp,
            Err(NewFileError::Exists(_)) if attempt + 1 < TMP_ATTEMPTS => attempt += 1,
            Err(NewFileError::Exists(e)) => {
                return Err(Error::io(
                    format!(
                        "cannot create a temporary file next to {}: {TMP_ATTEMPTS} random names \
                         were all taken",
                        path.display()
                    ),
                    e,
                ))
            }
            Err(NewFileError::Other(e)) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
    };
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(
            format!("cannot rename into {}", path.display()),
            e,
        ));
    }
    sync_dir(dir)
}

enum NewFileError {
    /// The name is taken (nothing was created).
    Exists(std::io::Error),
    /// Anything else (the file may have been created).
    Other(Error),
}

fn write_new_file(tmp: &Path, data: &[u8]) -> std::result::Result<(), NewFileError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    let mut file = opts.open(tmp).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            NewFileError::Exists(e)
        } else {
            NewFileError::Other(Error::io(format!("cannot create {}", tmp.display()), e))
        }
    })?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| NewFileError::Other(Error::io(format!("cannot write {}", tmp.display()), e)))
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
///
/// The file is opened with `O_NOFOLLOW | O_NONBLOCK` and must be a regular file (checked with
/// fstat on the open descriptor): a symbolic link, FIFO, socket or device planted under a
/// keystore name is refused (Integrity) instead of followed or blocking forever.
pub fn read_bounded(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let mut file = opts.open(path).map_err(|e| {
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ELOOP) {
            return not_a_regular_file(path, "a symbolic link");
        }
        Error::io(format!("cannot open {}", path.display()), e)
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    if !meta.file_type().is_file() {
        return Err(not_a_regular_file(path, file_type_name(&meta.file_type())));
    }
    let hint = meta.len().min(MAX_FILE_LEN);
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

fn not_a_regular_file(path: &Path, what: &str) -> Error {
    Error::new(
        ErrorKind::Integrity,
        format!(
            "{} is {what}, not a regular file (not written by qvol; remove it)",
            path.display()
        ),
    )
}

fn file_type_name(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
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

    #[test]
    fn a_planted_temporary_name_does_not_block_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        // The names of the old scheme (pid), as a file and as a link to a victim file.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"victim").unwrap();
        let pid_name = dir
            .path()
            .join(format!(".f.json.tmp-{}", std::process::id()));
        fs::write(&pid_name, b"planted").unwrap();
        write_atomic(&p, b"one").unwrap();
        fs::remove_file(&pid_name).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&victim, &pid_name).unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read(&victim).unwrap(), b"victim");
        // Temporary names are random: two writes never use the same one.
        let names: std::collections::BTreeSet<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}"); // f.json, victim, the planted name
    }

    /// mkfifo(1): the crate has no unsafe outside mlock.rs and no extra dependency for this.
    #[cfg(unix)]
    fn make_fifo(path: &Path) {
        let ok = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfifo {}", path.display());
    }

    #[cfg(unix)]
    #[test]
    fn fifos_and_symlinks_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.json");
        make_fifo(&fifo);
        // Run in a thread so that a regression shows as a failure, not a hung test.
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_bounded(&f).map(|_| ()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read_bounded blocked on a FIFO")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(
            err.to_string().contains("is a FIFO, not a regular file"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&fifo.display().to_string()),
            "{err}"
        );

        let target = dir.path().join("target.json");
        fs::write(&target, b"{}").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = read_bounded(&link).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(
            err.to_string()
                .contains("is a symbolic link, not a regular file"),
            "{err}"
        );
        let err = read_bounded(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert_eq!(&read_bounded(&target).unwrap()[..], b"{}");
    }
}
