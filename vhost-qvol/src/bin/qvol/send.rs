//! `qvol send IMAGE --snapshot NAME [--from OLDER] [-o FILE]`: writes a snapshot as a raw
//! stream (FORMAT.md §15): its encrypted data blocks and authenticated map nodes, all of
//! them or only what changed since an older snapshot. Needs no key: the image is only read
//! (also while a daemon serves it), and the receiver checks everything with the key.

use std::fs::{self, File};
use std::io::{BufWriter, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use vhost_qvol::size::format_size;
use vhost_qvol::volume_disk::error_chain;

/// `qvol send`
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The image (opened read-only; no key needed).
    pub image: PathBuf,
    /// The snapshot to send.
    #[arg(long, value_name = "NAME")]
    pub snapshot: String,
    /// Send only what changed since this older snapshot (the receiver must have it).
    #[arg(long, value_name = "OLDER")]
    pub from: Option<String>,
    /// Write the stream to FILE (must not exist) instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs `qvol send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    let image = &args.image;
    let storage = vhost_qvol::image::open_read_only(image)?;
    let mut meter = Meter::new("sent");
    let mut progress = |bytes: u64| meter.show(bytes);
    let name = args.snapshot.as_str();
    let from = args.from.as_deref();
    let send = |out: &mut dyn Write, progress: &mut dyn FnMut(u64)| {
        qvol_core::send_snapshot(&storage, name, from, out, progress).map_err(|e| {
            anyhow!(
                "cannot send snapshot {name:?} of {}: {}",
                image.display(),
                error_chain(&e)
            )
        })
    };
    let summary = match &args.output {
        Some(path) => to_file(path, |out| send(out, &mut progress))?,
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!(
                    "refusing to write a binary stream to a terminal: redirect standard output \
                     or pass -o FILE"
                );
            }
            let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
            send(&mut out, &mut progress)?
        }
    };
    meter.finish();
    let what = match from {
        Some(f) => format!("incremental from {f:?}"),
        None => "full".to_string(),
    };
    eprintln!(
        "Sent snapshot {name:?} of {} ({what}): {} map nodes, {} data blocks, {}.",
        image.display(),
        summary.nodes,
        summary.data_blocks,
        format_size(summary.bytes)
    );
    Ok(())
}

/// Writes `path` through `write`: into `path.partial` (mode 0600, which must not exist),
/// synced, then linked to `path` (never over a file that appeared meanwhile) and unlinked;
/// removed again when anything fails, so that a failed send leaves no `path`.
fn to_file<T>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if fs::symlink_metadata(path).is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it",
            path.display()
        );
    }
    let partial = partial_path(path);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| {
            format!(
                "cannot create {} (if a send was interrupted, remove it)",
                partial.display()
            )
        })?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let value = write(&mut out)?;
        let file: File = out
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", partial.display(), e.error()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", partial.display()))?;
        // A link, unlike a rename, never replaces a file that appeared meanwhile.
        fs::hard_link(&partial, path).with_context(|| {
            format!(
                "cannot name the stream {} (it must not exist)",
                path.display()
            )
        })?;
        let _ = fs::remove_file(&partial);
        Ok(value)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// `path` with `.partial` appended to its file name.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".partial");
    PathBuf::from(name)
}

/// Bytes moved so far, on one line of stderr when it is a terminal (a stream's length is
/// not known before its end), redrawn at most ten times a second.
pub struct Meter {
    label: &'static str,
    shown: bool,
    start: Instant,
    last: Option<Instant>,
}

impl Meter {
    /// A meter labelled `label` (drawn only when stderr is a terminal).
    pub fn new(label: &'static str) -> Meter {
        Meter {
            label,
            shown: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
        }
    }

    /// Shows `bytes` moved.
    pub fn show(&mut self, bytes: u64) {
        if !self.shown
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = (bytes as f64 / secs) as u64;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} {:>10} ({}/s)   ",
            self.label,
            format_size(bytes),
            format_size(rate)
        );
        let _ = err.flush();
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.shown && self.last.take().is_some() {
            let _ = write!(std::io::stderr(), "\r{:<60}\r", "");
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_path_appends_to_the_file_name() {
        assert_eq!(
            partial_path(Path::new("/a/b.qvol")),
            PathBuf::from("/a/b.qvol.partial")
        );
    }

    #[test]
    fn a_failed_write_leaves_no_file_and_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.stream");
        let err = to_file::<()>(&path, |out| {
            out.write_all(b"half")?;
            bail!("the source failed")
        })
        .unwrap_err();
        assert!(err.to_string().contains("the source failed"));
        assert!(!path.exists());
        assert!(!partial_path(&path).exists());
        to_file(&path, |out| Ok(out.write_all(b"whole")?)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"whole");
        assert!(to_file(&path, |_| Ok(())).is_err(), "no overwrite");
        // A file that appears while the stream is written is kept, and so is nothing else.
        let late = dir.path().join("late.stream");
        let err = to_file(&late, |out| {
            fs::write(&late, b"someone else's")?;
            Ok(out.write_all(b"stream")?)
        })
        .unwrap_err();
        assert!(err.to_string().contains("must not exist"), "{err:#}");
        assert_eq!(fs::read(&late).unwrap(), b"someone else's");
        assert!(!partial_path(&late).exists());
    }
}
