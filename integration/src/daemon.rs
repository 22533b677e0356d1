//! Running `vhost-qvol` as a child process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::bins;

/// How long the daemon may take to open its image and start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `vhost-qvol`; killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `vhost-qvol --socket-path SOCKET ARGS...` with `RUST_LOG=debug`-level logs in
    /// `log`, and waits until the socket exists. Returns the log's text as the error if the
    /// daemon exits first.
    pub fn start(socket: &Path, log: &Path, args: &[&str]) -> Result<Self, String> {
        let mut cmd = Command::new(bins::vhost_qvol());
        cmd.arg("--socket-path").arg(socket).args(args);
        Self::start_command(cmd, socket, log)
    }

    /// Starts a prepared command (which must make the daemon listen on `socket`).
    pub fn start_command(mut cmd: Command, socket: &Path, log: &Path) -> Result<Self, String> {
        let _ = std::fs::remove_file(socket);
        let log_file = File::create(log).map_err(|e| format!("cannot create log: {e}"))?;
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start vhost-qvol: {e}"))?;
        let mut daemon = Self {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if socket.exists() {
                return Ok(daemon);
            }
            if let Some(status) = daemon.try_wait() {
                return Err(format!(
                    "vhost-qvol exited with {status} before listening:\n{}",
                    daemon.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "vhost-qvol did not listen within {START_TIMEOUT:?}:\n{}",
                    daemon.log_text()
                ));
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` and waits up to `timeout` for the exit; `None` on timeout (or if
    /// the daemon was already reaped).
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: kill(2) on our own child's pid; the child has not been reaped yet
        // (we hold its Child), so the pid cannot have been reused.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let status = wait_within(child, timeout)?;
        self.child = None;
        Some(status)
    }

    /// A libblkio client on one queue with a 1 MiB buffer (panics if it cannot connect).
    pub fn client(&self) -> crate::client::BlkioClient {
        crate::client::BlkioClient::connect(&self.socket, 1, false, 1 << 20)
            .unwrap_or_else(|e| panic!("connect: {}", crate::client::describe(&e)))
    }

    /// SIGTERM, and asserts a clean exit (status 0) within 10 s.
    pub fn stop(mut self) {
        let status = self
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
            .expect("vhost-qvol exits within 10 s of SIGTERM");
        assert!(status.success(), "vhost-qvol exited with {status}");
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running then.
pub fn wait_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(5));
    }
}
