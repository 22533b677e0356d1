//! Running `qemu-img` for `qvol import` and `qvol export`: it reads and writes every format
//! QEMU knows, and talks to a qvol volume through `qvol`'s own NBD server.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};

/// An image `qemu-img` opens: a file, its format (`None`: probed), and for LUKS the file
/// holding its passphrase.
#[derive(Clone, Debug)]
pub struct Source {
    /// The file.
    pub path: PathBuf,
    /// The format (`qcow2`, `raw`, `vmdk`, `luks`, ...), or probed when `None`.
    pub format: Option<String>,
    /// For `luks`: its passphrase, as qemu reads it.
    pub secret: Option<std::sync::Arc<QemuSecret>>,
}

impl Source {
    /// A source file; `passphrase_file` for a LUKS one (one trailing newline ignored, as
    /// for every qvol passphrase file).
    pub fn new(
        path: PathBuf,
        format: Option<String>,
        passphrase_file: Option<&Path>,
    ) -> anyhow::Result<Source> {
        let secret = passphrase_file
            .map(QemuSecret::from_passphrase_file)
            .transpose()?
            .map(std::sync::Arc::new);
        Ok(Source {
            path,
            format,
            secret,
        })
    }
}

/// A passphrase file as qemu reads it (every byte counts): qvol's reading of `file` (one
/// trailing newline dropped) in a private temporary file, removed on drop.
pub struct QemuSecret {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl std::fmt::Debug for QemuSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QemuSecret([REDACTED])")
    }
}

impl QemuSecret {
    /// Copies the passphrase of `file`.
    pub fn from_passphrase_file(file: &Path) -> anyhow::Result<QemuSecret> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let pass = vhost_qvol::open::read_passphrase(file)?;
        // In memory when the system has a tmpfs for it: the passphrase never reaches a disk.
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("qvol-secret-");
            b
        };
        let dir = match std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("/dev/shm")])
            .find(|d| d.is_dir())
        {
            Some(d) => builder.tempdir_in(d),
            None => builder.tempdir(),
        }
        .context("cannot make a private directory for the LUKS passphrase")?;
        let path = dir.path().join("pass");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(pass.expose()))
            .context("cannot write the LUKS passphrase for qemu-img")?;
        Ok(QemuSecret { _dir: dir, path })
    }
}

impl Source {
    /// The arguments that name this image to `qemu-img` (after any `--object`).
    fn args(&self) -> anyhow::Result<Vec<String>> {
        let path = self.path.to_str().ok_or_else(|| {
            anyhow!(
                "{} is not a UTF-8 path, which qemu-img needs",
                self.path.display()
            )
        })?;
        match (self.format.as_deref(), &self.secret) {
            (Some("luks"), Some(secret)) => {
                let secret = secret
                    .path
                    .to_str()
                    .ok_or_else(|| anyhow!("the temporary directory's path is not UTF-8"))?;
                Ok(vec![
                    "--object".into(),
                    format!("secret,id=qvolsec0,file={}", escape_opt(secret)),
                    "--image-opts".into(),
                    format!(
                        "driver=luks,key-secret=qvolsec0,file.filename={}",
                        escape_opt(path)
                    ),
                ])
            }
            (Some("luks"), None) => {
                bail!("a LUKS source needs its passphrase: --source-passphrase-file FILE")
            }
            (Some(fmt), _) => Ok(vec!["-f".into(), fmt.into(), path.into()]),
            (None, _) => Ok(vec![path.into()]),
        }
    }
}

/// QEMU option values double a comma to escape it.
fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// Its format.
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file takes on the host.
    pub actual_size: u64,
}

/// `qemu-img info --output=json`.
pub fn info(source: &Source) -> anyhow::Result<ImageInfo> {
    let mut cmd = qemu_img();
    cmd.arg("info").arg("--output=json").args(source.args()?);
    let out = run(&mut cmd, &format!("read {}", source.path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out).context("qemu-img info printed something that is not JSON")?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    Ok(ImageInfo {
        format: v
            .get("format")
            .and_then(|f| f.as_str())
            .unwrap_or("?")
            .to_string(),
        virtual_size: num("virtual-size").ok_or_else(|| {
            anyhow!(
                "qemu-img info gave no virtual size for {}",
                source.path.display()
            )
        })?,
        actual_size: num("actual-size").unwrap_or(0),
    })
}

/// The NBD URI of an export of `qvol`'s server on `socket`.
pub fn nbd_uri(socket: &Path) -> anyhow::Result<String> {
    let s = socket
        .to_str()
        .ok_or_else(|| anyhow!("the socket path {} is not UTF-8", socket.display()))?;
    Ok(format!("nbd+unix:///?socket={s}"))
}

/// `qemu-img convert` from `source` into the (already zeroed) NBD export at `uri`: ranges
/// that are unallocated or zero in the source are not written.
pub fn convert_into(source: &Source, uri: &str) -> anyhow::Result<()> {
    let mut cmd = qemu_img();
    cmd.arg("convert");
    progress(&mut cmd);
    cmd.args(["-n", "--target-is-zero", "-O", "raw"]);
    cmd.args(source.args()?).arg(uri);
    run_visible(&mut cmd, &format!("convert {}", source.path.display()))
}

/// `qemu-img convert` from the NBD export at `uri` to a new file `dest` in `format`
/// (holes stay holes: qemu-img asks the export's block status).
pub fn convert_out(uri: &str, dest: &Path, format: &str) -> anyhow::Result<()> {
    let mut cmd = qemu_img();
    cmd.arg("convert");
    progress(&mut cmd);
    cmd.args(["-f", "raw", "-O", format, uri]).arg(dest);
    run_visible(&mut cmd, &format!("write {}", dest.display()))
}

/// `qemu-img compare` of `source` with the NBD export on `socket`: `Ok(())` when identical
/// (an export longer than the source must hold only zeros past its end).
pub fn compare(source: &Source, socket: &Path) -> anyhow::Result<()> {
    let mut cmd = qemu_img();
    cmd.arg("compare");
    let args = source.args()?;
    if args.iter().any(|a| a == "--image-opts") {
        // --image-opts applies to both images: name the export by options too.
        let s = socket.to_str().unwrap_or_default();
        cmd.args(&args).arg(format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={}",
            escape_opt(s)
        ));
    } else {
        cmd.args(["-F", "raw"]).args(&args).arg(nbd_uri(socket)?);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("cannot run qemu-img (install it: scripts/setup.sh, package qemu-utils)")?;
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!(
            "the copy differs from {}: {}",
            source.path.display(),
            first_line(&out.stdout)
        ),
        _ => bail!(
            "qemu-img could not compare the copy with {}: {}",
            source.path.display(),
            first_line(&out.stderr)
        ),
    }
}

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// `-p` on a terminal: qemu-img draws its own progress line.
fn progress(cmd: &mut Command) {
    if std::io::stdout().is_terminal() {
        cmd.arg("-p");
    }
}

/// Runs `cmd`, returning stdout; a failure is one sentence with qemu-img's first line.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("cannot run qemu-img (install it: scripts/setup.sh, package qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img cannot {what}: {}", first_line(&out.stderr));
    }
    Ok(out.stdout)
}

/// Runs `cmd` with stdout on the terminal (its progress line), stderr captured.
fn run_visible(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(if std::io::stdout().is_terminal() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .output()
        .context("cannot run qemu-img (install it: scripts/setup.sh, package qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img cannot {what}: {}", first_line(&out.stderr));
    }
    Ok(())
}

/// The first non-empty line of a tool's output, without its "qemu-img: " prefix.
fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    line.trim_start_matches("qemu-img: ").trim().to_string()
}
