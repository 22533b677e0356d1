//! A temporary world for one test: a keystore, keys, images, daemons, all under one
//! temporary directory, driven through the `qvol` and `vhost-qvol` binaries exactly as a
//! user would.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use tempfile::TempDir;

use crate::background::Background;
use crate::bins;
use crate::daemon::{wait_within, Daemon};

/// How long a `qvol` or `vhost-qvol` command run to completion may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory with a keystore in it.
#[derive(Debug)]
pub struct Fixture {
    dir: TempDir,
    /// The keystore directory.
    pub keystore: PathBuf,
    /// The passphrase file, for a keystore with a passphrase.
    pub passphrase_file: Option<PathBuf>,
    /// The Ceph configuration the commands get as `CEPH_CONF` (`rbd:` images; see
    /// [`crate::ceph::CephCluster`]).
    pub ceph_conf: Option<PathBuf>,
}

/// The result of running a command: status, stdout, stderr as text.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The JSON a command printed on stdout (panics with the output if it is not JSON).
pub fn json_of(run: &Run) -> serde_json::Value {
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {run:#?}"))
}

impl Run {
    /// Panics with the output unless the command succeeded.
    pub fn success(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }

    /// Asserts a user-facing failure: exit status 1 and exactly one line on stderr,
    /// `PROGRAM: sentence`, containing `needle`. Returns the line.
    pub fn one_sentence_error(&self, program: &str, needle: &str) -> String {
        assert_eq!(self.code, 1, "expected exit status 1: {self:#?}");
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        let line = lines[0];
        assert!(line.starts_with(&format!("{program}: ")), "{line}");
        assert!(
            line.contains(needle),
            "{line:?} does not mention {needle:?}"
        );
        line.to_string()
    }
}

impl Fixture {
    /// A fixture whose keystore has no passphrase.
    pub fn new() -> Self {
        let f = Self::empty(None);
        f.qvol(["keystore", "init", "--no-passphrase"]).success();
        f
    }

    /// A fixture whose keystore is protected by `passphrase` (written to a file).
    pub fn with_passphrase(passphrase: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("passphrase");
        std::fs::write(&file, format!("{passphrase}\n")).expect("write passphrase");
        let mut f = Self::empty(Some(dir));
        f.passphrase_file = Some(file.clone());
        f.qvol([
            OsStr::new("keystore"),
            OsStr::new("init"),
            OsStr::new("--passphrase-file"),
            file.as_os_str(),
        ])
        .success();
        f
    }

    fn empty(dir: Option<TempDir>) -> Self {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("temp dir"));
        let keystore = dir.path().join("keystore");
        Self {
            dir,
            keystore,
            passphrase_file: None,
            ceph_conf: None,
        }
    }

    /// A path inside the fixture's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `Command` for `program` with this fixture's keystore and passphrase in its
    /// environment (and no stray settings from the caller's).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("QVOL_KEYSTORE", &self.keystore)
            .env_remove("QVOL_PASSPHRASE_FILE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("XDG_DATA_HOME", self.path("xdg"))
            // Keystores made here use argon2id parameters that take milliseconds.
            .env("QVOL_TEST_WEAK_KDF", "1");
        if let Some(file) = &self.passphrase_file {
            cmd.env("QVOL_PASSPHRASE_FILE", file);
        }
        match &self.ceph_conf {
            Some(conf) => cmd.env("CEPH_CONF", conf),
            None => cmd.env_remove("CEPH_CONF"),
        };
        cmd
    }

    /// Runs `qvol ARGS...`, for at most [`COMMAND_TIMEOUT`].
    pub fn qvol<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(&bins::qvol());
        cmd.args(args);
        run_bounded(cmd, "qvol")
    }

    /// Starts `qvol ARGS...` and leaves it running (see [`Background`]).
    pub fn qvol_background<I, S>(&self, args: I) -> Background
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(&bins::qvol());
        cmd.args(args);
        Background::spawn(cmd)
    }

    /// Runs `vhost-qvol ARGS...` to completion (for command lines that should fail): a
    /// daemon that starts serving instead is killed after [`COMMAND_TIMEOUT`].
    pub fn vhost_qvol<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(&bins::vhost_qvol());
        cmd.args(args);
        run_bounded(cmd, "vhost-qvol")
    }

    /// Makes a key for `vm` and returns its id.
    pub fn new_key(&self, vm: &str) -> String {
        let run = self.qvol(["key", "new", vm]).success();
        let id = run.stdout.trim().to_string();
        assert!(!id.is_empty(), "qvol key new printed no key id");
        id
    }

    /// Creates image `name` of `size` (e.g. "64M") for `key` and returns its path.
    pub fn create_image(&self, name: &str, size: &str, key: &str, extra: &[&str]) -> PathBuf {
        self.create_image_at(&self.path(name), size, key, extra)
    }

    /// Creates the image `image` (a path, or `rbd:POOL/IMAGE`) and returns it.
    pub fn create_image_at(&self, image: &Path, size: &str, key: &str, extra: &[&str]) -> PathBuf {
        let image = image.to_path_buf();
        let mut args = vec![
            OsStr::new("create"),
            image.as_os_str(),
            OsStr::new("--size"),
            OsStr::new(size),
            OsStr::new("--key"),
            OsStr::new(key),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.qvol(args).success();
        image
    }

    /// The volume id of `image`, as `qvol info --json` prints it.
    pub fn volume_id(&self, image: &Path) -> String {
        let run = self
            .qvol([OsStr::new("info"), image.as_os_str(), OsStr::new("--json")])
            .success();
        let doc: serde_json::Value =
            serde_json::from_str(&run.stdout).expect("qvol info --json prints JSON");
        doc["volume_id"]
            .as_str()
            .expect("qvol info --json has a volume_id")
            .to_string()
    }

    /// Starts `vhost-qvol` on `image` with a socket and a log named after `tag`, bound to
    /// the image's volume id (unless `extra` has `--volume-id` or `--any-volume`).
    pub fn start_daemon(&self, image: &Path, tag: &str, extra: &[&str]) -> Result<Daemon, String> {
        let socket = self.path(&format!("{tag}.sock"));
        let log = self.path(&format!("{tag}.log"));
        let mut cmd = self.command(&bins::vhost_qvol());
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--blk-file")
            .arg(image);
        if !extra
            .iter()
            .any(|a| *a == "--volume-id" || *a == "--any-volume")
        {
            cmd.arg("--volume-id").arg(self.volume_id(image));
        }
        cmd.args(extra);
        Daemon::start_command(cmd, &socket, &log)
    }
}

/// The volume id of `image` as `qvol info` prints it and `vhost-qvol --volume-id` takes it,
/// read from the image header (no key needed).
pub fn volume_id_of(image: &Path) -> Result<String, String> {
    vhost_qvol::open::read_image_header(image)
        .map(|(_, header)| vhost_qvol::open::volume_id_hex(&header.volume_id))
        .map_err(|e| format!("{e:#}"))
}

/// Copies the tree `from` to `to` as a keystore has it: directories 0700, files 0600 (git
/// keeps no modes), without the keystore's lock file (`.lock`, made on use).
pub fn copy_private_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("create a directory");
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))
            .expect("set a directory's mode");
        for entry in std::fs::read_dir(from).expect("list a directory") {
            let entry = entry.expect("list a directory");
            if entry.file_name() != ".lock" {
                copy_private_tree(&entry.path(), &to.join(entry.file_name()));
            }
        }
    } else {
        std::fs::copy(from, to).expect("copy a file");
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))
            .expect("set a file's mode");
    }
}

/// Runs `cmd` with no input, for at most `limit` (then it is killed and the test fails),
/// its output through files: for commands that leave processes running (`qvol vm start`),
/// which would keep a pipe open.
pub fn bounded(mut cmd: Command, limit: Duration) -> Run {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start qvol");
    let status = wait_within(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for qvol");
    let run = Run {
        code: status.code().unwrap_or(-(status.signal().unwrap_or(0))),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    };
    assert!(
        status.code().is_some() || status.signal() == Some(libc::SIGABRT),
        "qvol did not exit within {limit:?}: {run:#?}"
    );
    run
}

/// Runs `cmd` to completion with no input, as `Command::output` does, but panics with what
/// it printed if it has not exited within [`COMMAND_TIMEOUT`] (and kills it).
fn run_bounded(mut cmd: Command, program: &str) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let stdout = read_to_end(child.stdout.take());
    let stderr = read_to_end(child.stderr.take());
    let exited = wait_within(&mut child, COMMAND_TIMEOUT);
    if exited.is_none() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("cannot wait for {program}: {e}"));
    let run = Run::from(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    });
    assert!(
        exited.is_some(),
        "{program} did not exit within {COMMAND_TIMEOUT:?} and was killed: {run:#?}"
    );
    run
}

/// Reads a child's pipe to its end on another thread (so that a full pipe cannot stall the
/// child while we wait for it).
fn read_to_end(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// Every file and directory of a tree, with each file's bytes (the keystore's lock file
/// aside: it is made on use and holds nothing): to assert that a refused command left a
/// directory exactly as it was.
pub fn file_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                todo.push(path);
            } else if entry.file_name() != ".lock" {
                out.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    out
}
