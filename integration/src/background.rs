//! A command left running while a test goes on: its stdout lines arrive as they are
//! printed (long work with `--json` prints one line a second), it can be signalled, and its
//! end is collected as a [`Run`].

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::daemon::wait_within;
use crate::fixture::Run;

/// A running command; killed when dropped.
#[derive(Debug)]
pub struct Background {
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line seen so far.
    seen: Vec<String>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Background {
    /// Starts `cmd` with no input, stdout and stderr captured.
    pub fn spawn(mut cmd: Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        });
        Background {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits at most `timeout` for a stdout line that is JSON and satisfies `want`; returns
    /// it. Panics (with what was printed) if the command ends or the time runs out first.
    pub fn wait_for_json(
        &mut self,
        timeout: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if want(&v) {
                            return v;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no such line within {timeout:?}; printed: {:#?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    let stderr = self
                        .stderr
                        .take()
                        .and_then(|h| h.join().ok())
                        .unwrap_or_default();
                    panic!(
                        "the command ended ({status:?}) before printing such a line; printed: \
                         {:#?}; stderr: {}",
                        self.seen,
                        String::from_utf8_lossy(&stderr)
                    )
                }
            }
        }
    }

    /// Sends `signal`.
    pub fn signal(&mut self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped (we hold its
        // Child and have not waited for it), so the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits at most `timeout` for the end (panics if it has not ended then) and returns
    /// what it printed, the lines already seen included.
    pub fn finish(mut self, timeout: Duration) -> Run {
        let status: ExitStatus = wait_within(&mut self.child, timeout).unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!(
                "the command did not end within {timeout:?}; printed: {:#?}",
                self.seen
            )
        });
        let mut stdout: Vec<String> = std::mem::take(&mut self.seen);
        // The reader thread ends at EOF, once the process is gone.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            stdout.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let mut text = stdout.join("\n");
        text.push('\n');
        Run::from(Output {
            status,
            stdout: text.into_bytes(),
            stderr,
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
