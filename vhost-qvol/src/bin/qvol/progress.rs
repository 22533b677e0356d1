//! A progress bar for long work (check, salvage), drawn on stderr only when stderr is a
//! terminal: nothing decorative reaches a pipe or a log.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One bar on one line, redrawn at most ten times a second.
pub struct Bar {
    label: &'static str,
    shown: bool,
    last: Option<Instant>,
}

impl Bar {
    /// A bar labelled `label` (drawn only on a terminal).
    pub fn new(label: &'static str) -> Bar {
        Bar {
            label,
            shown: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    /// Shows `done` of `total`.
    pub fn set(&mut self, done: u64, total: u64) {
        if !self.shown
            || (done < total
                && self
                    .last
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(100)))
        {
            return;
        }
        self.last = Some(Instant::now());
        let fraction = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        let filled = (fraction * 40.0) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{:<9} [{}{}] {:>5.1}%",
            self.label,
            "#".repeat(filled.min(40)),
            " ".repeat(40 - filled.min(40)),
            fraction * 100.0
        );
        let _ = err.flush();
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.shown && self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r{:<60}\r", "");
        }
        self.last = None;
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}
