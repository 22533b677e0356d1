//! The processes that serve the guest's disk: `vhost-qvol` on a `.qvol` volume (created with
//! the `qvol` CLI in a throwaway keystore), or `qemu-storage-daemon` on a raw file (the
//! reference backend the guest scripts were first developed against).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{require_tool, GuestError};

/// A binary of this workspace (`vhost-qvol`, `qvol`), built on first use by
/// [`crate::bins::bin_dir`].
pub fn workspace_binary(name: &str) -> Result<PathBuf, GuestError> {
    let candidate = crate::bins::bin_dir().join(name);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(GuestError::new(format!(
            "{} is missing after `cargo build -p vhost-qvol --bins`",
            candidate.display()
        )))
    }
}

/// A unique scratch directory under the system temporary directory, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `$TMPDIR/qvol-<tag>-<pid>-<n>`; keeps it on drop when `QVOL_KEEP_SCRATCH` is set.
    pub fn new(tag: &str) -> Result<Self, GuestError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qvol-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)
            .map_err(|e| GuestError::io(format!("cannot create {}", dir.display()), e))?;
        Ok(Self(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("QVOL_KEEP_SCRATCH").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `cmd`, returning its stdout, or an error holding its stderr.
fn run_checked(cmd: &mut Command, what: &str) -> Result<String, GuestError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| GuestError::io(format!("cannot run {what}"), e))?;
    if !out.status.success() {
        return Err(GuestError::new(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `.qvol` image with its own throwaway keystore (no passphrase) and one key.
#[derive(Debug, Clone)]
pub struct QvolVolume {
    /// The `qvol` CLI.
    pub qvol: PathBuf,
    /// The keystore directory.
    pub keystore: PathBuf,
    /// The image file.
    pub image: PathBuf,
    /// The key the volume was created for.
    pub key_id: String,
    /// The volume id (hex, as `qvol info` prints it): the daemon is bound to it.
    pub volume_id: String,
}

impl QvolVolume {
    /// `qvol keystore init --no-passphrase`, `qvol key new VM`, `qvol create IMAGE --size SIZE
    /// --key ID [--cipher CIPHER]`, all under `dir`.
    pub fn create(dir: &Path, size: &str, cipher: Option<&str>) -> Result<Self, GuestError> {
        let qvol = workspace_binary("qvol")?;
        let keystore = dir.join("keystore");
        let image = dir.join("disk.qvol");
        let cli = |args: &[&str], what: &str| -> Result<String, GuestError> {
            run_checked(
                Command::new(&qvol)
                    .args(args)
                    .env("QVOL_KEYSTORE", &keystore)
                    .env_remove("QVOL_PASSPHRASE_FILE")
                    .env_remove("CREDENTIALS_DIRECTORY"),
                what,
            )
        };
        let ks = keystore.to_string_lossy().into_owned();
        cli(
            &["keystore", "init", "--keystore", &ks, "--no-passphrase"],
            "qvol keystore init",
        )?;
        let key_id = cli(
            &["key", "new", "guest-test", "--keystore", &ks],
            "qvol key new",
        )?
        .trim()
        .to_string();
        if key_id.is_empty() || key_id.contains(char::is_whitespace) {
            return Err(GuestError::new(format!(
                "qvol key new printed {key_id:?} instead of one key id"
            )));
        }
        let img = image.to_string_lossy().into_owned();
        let mut create = vec![
            "create",
            img.as_str(),
            "--size",
            size,
            "--key",
            key_id.as_str(),
        ];
        if let Some(cipher) = cipher {
            create.extend(["--cipher", cipher]);
        }
        cli(&create, "qvol create")?;
        let volume_id = crate::fixture::volume_id_of(&image).map_err(GuestError::new)?;
        Ok(Self {
            qvol,
            keystore,
            image,
            key_id,
            volume_id,
        })
    }

    /// `qvol info IMAGE --json`, parsed.
    pub fn info_json(&self) -> Result<String, GuestError> {
        run_checked(
            Command::new(&self.qvol)
                .arg("info")
                .arg(&self.image)
                .arg("--json")
                .env("QVOL_KEYSTORE", &self.keystore),
            "qvol info --json",
        )
    }
}

/// Which program serves a disk.
#[derive(Debug, Clone)]
pub enum BackendKind {
    /// `vhost-qvol` serving a `.qvol` volume.
    VhostQvol(QvolVolume),
    /// `qemu-storage-daemon` exporting a raw file.
    QemuStorageDaemon(PathBuf),
}

/// A running vhost-user-blk backend listening on a socket. Dropping it kills the process.
#[derive(Debug)]
pub struct Backend {
    kind: BackendKind,
    socket: PathBuf,
    num_queues: u16,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Backend {
    /// Starts `kind` on `socket` with `num_queues` queues and waits for the socket to appear.
    /// Its stderr goes to `SOCKET.log` (appended across restarts).
    pub fn start(kind: BackendKind, socket: &Path, num_queues: u16) -> Result<Self, GuestError> {
        let mut backend = Self {
            kind,
            socket: socket.to_path_buf(),
            num_queues,
            log: socket.with_extension("log"),
            child: None,
            starts: 0,
        };
        backend.spawn()?;
        Ok(backend)
    }

    fn spawn(&mut self) -> Result<(), GuestError> {
        // A killed backend leaves its socket file behind; a supervisor removes it first.
        let _ = fs::remove_file(&self.socket);
        let mut cmd = match &self.kind {
            BackendKind::VhostQvol(vol) => {
                let mut cmd = Command::new(workspace_binary("vhost-qvol")?);
                cmd.arg("--socket-path")
                    .arg(&self.socket)
                    .arg("--blk-file")
                    .arg(&vol.image)
                    .arg("--volume-id")
                    .arg(&vol.volume_id)
                    .arg("--keystore")
                    .arg(&vol.keystore)
                    .arg("--num-queues")
                    .arg(self.num_queues.to_string())
                    .env_remove("QVOL_PASSPHRASE_FILE")
                    .env_remove("CREDENTIALS_DIRECTORY");
                cmd
            }
            BackendKind::QemuStorageDaemon(image) => {
                let mut cmd = Command::new(require_tool("qemu-storage-daemon")?);
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f0,filename={},aio=threads",
                    image.to_string_lossy().replace(',', ",,")
                ));
                cmd.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={}",
                    self.socket.to_string_lossy().replace(',', ",,"),
                    self.num_queues
                ));
                cmd
            }
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| GuestError::io(format!("cannot open {}", self.log.display()), e))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| GuestError::io("cannot start the backend", e))?;
        self.child = Some(child);
        self.starts += 1;
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if self.socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                return Err(GuestError::new(format!(
                    "the backend exited ({status}) before listening on {}: {}",
                    self.socket.display(),
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(GuestError::new(format!(
            "the backend did not create {} within 30 s: {}",
            self.socket.display(),
            self.log()
        )))
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, GuestError> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(|e| GuestError::io("cannot poll the backend", e)),
            None => Ok(None),
        }
    }

    /// The socket the guest connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The backend's stderr so far (all runs).
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && matches!(self.try_wait(), Ok(None))
    }

    /// Sends `signal` (a `kill -s` name such as `TERM` or `KILL`) and waits up to `timeout`
    /// for the process to exit.
    pub fn signal_and_wait(
        &mut self,
        signal: &str,
        timeout: Duration,
    ) -> Result<ExitStatus, GuestError> {
        let Some(mut child) = self.child.take() else {
            return Err(GuestError::new("the backend is not running"));
        };
        run_checked(
            Command::new("kill")
                .arg("-s")
                .arg(signal)
                .arg(child.id().to_string()),
            "kill",
        )?;
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| GuestError::io("cannot poll the backend", e))?
            {
                return Ok(status);
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(GuestError::new(format!(
                    "the backend did not exit within {timeout:?} of SIG{signal}"
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the same backend again on the same socket (after it stopped or was killed).
    pub fn restart(&mut self) -> Result<(), GuestError> {
        if self.is_running() {
            return Err(GuestError::new("the backend is still running"));
        }
        self.spawn()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
