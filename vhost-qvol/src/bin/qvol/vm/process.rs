//! The processes of a running VM: one `vhost-qvol` per encrypted disk and QEMU, started
//! detached (their own process group, logs in the run directory), found again through pid
//! files, and stopped through QMP and signals.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// A pid read from a pid file, if that process is alive and has `arg` among its command-line
/// arguments (its disk or its VM name: a stale pid file whose number was reused names
/// another process, even another VM's QEMU or backend).
pub fn live_pid(pid_file: &Path, arg: &str) -> Option<i32> {
    let text = fs::read_to_string(pid_file).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = cmdline.split(|&b| b == 0).any(|a| a == arg.as_bytes());
    (ours && alive(pid)).then_some(pid)
}

/// Whether process `pid` exists (and is not a zombie of ours).
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    if !exists {
        return false;
    }
    // A zombie (exited, not yet reaped) is not running.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(true)
}

/// Sends `signal` to `pid` (errors ignored: it may be gone).
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Waits until `pid` is gone; false after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A program found next to this `qvol` binary, else on `PATH`.
pub fn sibling_program(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `cmd` detached from this process (its own process group, stdin closed, output
/// to `log`), writing its pid to `pid_file`.
pub fn spawn_detached(
    mut cmd: Command,
    log: &Path,
    pid_file: Option<&Path>,
) -> anyhow::Result<Child> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open the log {}", log.display()))?;
    let err = out.try_clone().context("cannot duplicate the log file")?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program} (is it installed? scripts/setup.sh)"))?;
    if let Some(pid_file) = pid_file {
        fs::write(pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("cannot write {}", pid_file.display()))?;
    }
    Ok(child)
}

/// Waits until something listens on the Unix socket `path`; fails if `child` exits first
/// (quoting the last line of `log`) or after `timeout`.
pub fn wait_for_socket(
    path: &Path,
    child: &mut Child,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("it exited ({status}): {}", last_line(log));
        }
        if start.elapsed() > timeout {
            bail!(
                "its socket {} did not appear within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last non-empty line of a log file (what a failed process said last).
pub fn last_line(log: &Path) -> String {
    fs::read_to_string(log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("no output (see {})", log.display()))
}

/// A QMP connection (QEMU's JSON control protocol) after capability negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path` and leaves negotiation mode.
    pub fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to QEMU's QMP socket {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read_message()?; // the greeting
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).context("QEMU sent something that is not JSON on QMP")
    }

    /// Runs `command`; returns its `return` value, skipping events.
    pub fn execute(&mut self, command: &str) -> anyhow::Result<serde_json::Value> {
        writeln!(self.writer, "{}", serde_json::json!({ "execute": command }))?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(anyhow!(
                    "QEMU refused {command}: {}",
                    err.get("desc").and_then(|d| d.as_str()).unwrap_or("?")
                ));
            }
        }
    }
}
