//! What `qvol reencrypt` prints: progress (a bar on a terminal; with `--json`, one line a
//! second), the end, and `--status`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_qvol::size::format_size;

use crate::progress::Bar;

/// How often a `--json` progress line is printed.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// The progress of one run of the command.
pub struct Progress {
    bar: Bar,
    json: bool,
    since: Instant,
    /// Bytes done when this run first saw the re-encryption.
    first: Option<u64>,
    /// The last bytes done seen.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    last_line: Option<Instant>,
}

impl Progress {
    /// Progress shown as a bar (on a terminal) and, with `json`, as lines.
    pub fn new(json: bool) -> Progress {
        Progress {
            bar: Bar::new("reencrypt"),
            json,
            since: Instant::now(),
            first: None,
            done: 0,
            total: 0,
            last_line: None,
        }
    }

    /// `done` of `total` bytes of disk are under the new key.
    pub fn update(&mut self, done: u64, total: u64) {
        self.first.get_or_insert(done);
        self.done = done;
        self.total = total;
        self.bar.set(done, total);
        if self.json && self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY) {
            self.last_line = Some(Instant::now());
            println!(
                "{}",
                json!({"done_bytes": done, "total_bytes": total,
                       "rate_bytes_per_s": self.rate()})
            );
        }
    }

    /// Bytes a second this run has re-sealed so far.
    pub fn rate(&self) -> u64 {
        let secs = self.since.elapsed().as_secs_f64();
        let bytes = self.done.saturating_sub(self.first.unwrap_or(self.done));
        if secs < 0.001 {
            0
        } else {
            (bytes as f64 / secs) as u64
        }
    }

    /// Seconds since the run began.
    pub fn seconds(&self) -> f64 {
        (self.since.elapsed().as_secs_f64() * 10.0).round() / 10.0
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        self.bar.finish();
    }

    /// Whole percent done.
    pub fn percent(&self) -> u64 {
        (self.done.min(self.total) * 100)
            .checked_div(self.total)
            .unwrap_or(100)
    }
}

/// Prints the end of a finished re-encryption; `doc` is the JSON object (`image`,
/// `finished`, `online`, `cipher`, `total_bytes`, `seconds`, and for a start `keyslots`
/// and `share_files`).
pub fn finished(doc: &Value, json: bool) {
    if json {
        println!("{doc}");
        return;
    }
    println!(
        "Re-encrypted {} ({}) under a new volume key ({}){} in {} s.",
        doc["image"].as_str().unwrap_or("?"),
        format_size(doc["total_bytes"].as_u64().unwrap_or(0)),
        doc["cipher"].as_str().unwrap_or("?"),
        if doc["online"] == json!(true) {
            ", by the serving daemon"
        } else {
            ""
        },
        doc["seconds"]
    );
    for slot in doc["keyslots"].as_array().into_iter().flatten() {
        let n = &slot["slot"];
        let what = vhost_qvol::text::escape_untrusted(slot["description"].as_str().unwrap_or(""));
        match slot["action"].as_str() {
            Some("dropped") => println!(
                "  keyslot {n}: dropped ({what}): {}",
                slot["reason"].as_str().unwrap_or("")
            ),
            _ => match slot["key_id"].as_str() {
                Some(key) => println!(
                    "  keyslot {n}: wraps the new key (key {key}, generation {})",
                    slot["generation"]
                ),
                None => println!("  keyslot {n}: wraps the new key ({what})"),
            },
        }
    }
    for file in doc["share_files"].as_array().into_iter().flatten() {
        println!("  new share file: {}", file.as_str().unwrap_or("?"));
    }
    if doc["share_files"].as_array().is_some_and(|a| !a.is_empty()) {
        println!("Give each new share to a different keeper; the old shares open nothing now.");
    }
}

/// Prints `--status`: `doc` has `image`, `reencryption` (or null), `served`, and for a
/// served image `running` and `error`.
pub fn status(image: &Path, doc: &Value, json: bool) {
    if json {
        println!("{doc}");
        return;
    }
    let r = &doc["reencryption"];
    if r.is_null() {
        println!("{} is not being re-encrypted.", image.display());
        return;
    }
    let state = match (doc["served"].as_bool(), doc["running"].as_bool()) {
        (Some(true), Some(true)) => "the serving daemon re-encrypts it in the background".into(),
        (Some(true), _) => format!(
            "the serving daemon's re-encryption stopped{}: `qvol reencrypt {} --resume` \
             restarts it",
            doc["error"]
                .as_str()
                .map(|e| format!(" ({})", vhost_qvol::text::escape_untrusted(e)))
                .unwrap_or_default(),
            image.display()
        ),
        _ => format!(
            "stopped: `qvol reencrypt {} --resume` continues",
            image.display()
        ),
    };
    println!(
        "{} is being re-encrypted from {} to {}: {}% done ({} of {}); {state}.",
        image.display(),
        r["from_cipher"].as_str().unwrap_or("?"),
        r["to_cipher"].as_str().unwrap_or("?"),
        r["percent"],
        format_size(r["done_bytes"].as_u64().unwrap_or(0)),
        format_size(r["total_bytes"].as_u64().unwrap_or(0)),
    );
}
