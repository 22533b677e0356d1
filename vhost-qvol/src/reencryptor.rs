//! Re-encryption steps at a bounded rate (`Volume::reencrypt_step`, docs/FORMAT.md §17):
//! the loop `qvol reencrypt` runs on an image it opened, and the daemon's background worker,
//! which runs the same loop on a thread of its own while the guest's I/O goes on (a step
//! re-seals its data next to the guest's I/O and makes I/O wait only while it installs the
//! copies: two commits).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info};
use qvol_core::{Reencryption, Volume, LEAF_SPAN_BYTES};

use crate::volume_disk::error_chain;

/// Map leaves (256 KiB of disk each) a daemon re-seals per step, at most: 16 MiB. The
/// sealing runs next to the guest's I/O; a guest request waits only while a step installs
/// its copies (two commits, whatever the step's size), so fewer, larger steps disturb the
/// guest less often.
pub const ONLINE_LEAVES: u64 = 64;
/// Map leaves `qvol reencrypt` re-seals per step on an image it opened: 16 MiB a commit.
pub const OFFLINE_LEAVES: u64 = 64;
/// The longest a sleep between steps goes without looking at the stop flag.
const NAP: Duration = Duration::from_millis(50);

/// Paces work to at most `rate` bytes a second (0: as fast as it goes), measured from its
/// start.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    since: Instant,
    bytes: u64,
}

impl Pacer {
    /// A pacer for `rate` bytes a second (0: no limit).
    pub fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// Notes `bytes` more done; how long to wait before the next piece of work.
    pub fn after(&mut self, bytes: u64) -> Duration {
        self.bytes = self.bytes.saturating_add(bytes);
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        due.saturating_sub(self.since.elapsed())
    }
}

/// Leaves per step for `rate` bytes a second (0: no limit): about four steps a second, at
/// least one leaf and at most `max`.
pub fn leaves_per_step(max: u64, rate: u64) -> u64 {
    if rate == 0 {
        return max.max(1);
    }
    (rate / 4 / LEAF_SPAN_BYTES).clamp(1, max.max(1))
}

/// Steps the re-encryption of `vol` until it is finished (`Ok(None)`) or `stop` is set
/// (`Ok(Some(progress))`), re-sealing at most `rate` bytes of data a second (read before each
/// step: it may change meanwhile; ranges of the disk that hold no data are passed over at
/// once), calling `progress` after each step. `InvalidInput` when no re-encryption is in
/// progress.
pub fn step_until_done(
    vol: &Volume,
    max_leaves: u64,
    rate: &AtomicU64,
    stop: &AtomicBool,
    mut progress: impl FnMut(&Reencryption),
) -> qvol_core::Result<Option<Reencryption>> {
    let mut pacer = Pacer::new(rate.load(Ordering::Relaxed));
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(vol.reencryption());
        }
        let now = rate.load(Ordering::Relaxed);
        if now != pacer.rate {
            pacer = Pacer::new(now);
        }
        let leaves = leaves_per_step(max_leaves, now);
        let Some(p) = vol.reencrypt_step(leaves)? else {
            return Ok(None);
        };
        progress(&p);
        // The rate counts the data re-sealed (a step passes over ranges without data, or
        // already under the new key, for free).
        nap(pacer.after(p.step_bytes), stop);
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19): on a busy host the guest's
/// queue threads run first and re-encryption takes what is left.
fn lower_priority() {
    // SAFETY: gettid(2) takes nothing and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(2) with PRIO_PROCESS and a thread id changes that thread's nice
    // value (Linux keeps it per thread); nothing is passed by pointer.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc != 0 {
        log::debug!(
            "the re-encryption thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sleeps `total`, or until `stop` is set.
fn nap(total: Duration, stop: &AtomicBool) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(NAP));
    }
}

/// The daemon's background re-encryption: at most one thread, stepping the served volume.
#[derive(Debug)]
pub struct Reencryptor {
    volume: Arc<Volume>,
    /// Bytes of disk a second (0: no limit).
    rate: AtomicU64,
    stop: AtomicBool,
    state: Mutex<WorkerState>,
}

/// What the worker is doing.
#[derive(Debug, Default)]
struct WorkerState {
    running: bool,
    /// Why the last run stopped, if it failed.
    failure: Option<String>,
}

impl Reencryptor {
    /// A worker for `volume` at `rate` bytes a second (0: no limit); started by
    /// [`Reencryptor::start`].
    pub fn new(volume: Arc<Volume>, rate: u64) -> Arc<Reencryptor> {
        Arc::new(Reencryptor {
            volume,
            rate: AtomicU64::new(rate),
            stop: AtomicBool::new(false),
            state: Mutex::new(WorkerState::default()),
        })
    }

    /// The rate limit, bytes of disk a second (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate limit (the running worker follows from its next step).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Whether the worker thread is stepping.
    pub fn running(&self) -> bool {
        self.state().running
    }

    /// Why the last run failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state().failure.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the worker thread unless it runs already (or the daemon is stopping); says
    /// whether it started one.
    pub fn start(self: &Arc<Self>) -> std::io::Result<bool> {
        let mut state = self.state();
        if state.running || self.stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        let me = Arc::clone(self);
        thread::Builder::new()
            .name("qvol-reencrypt".into())
            .spawn(move || me.work())?;
        state.running = true;
        state.failure = None;
        Ok(true)
    }

    fn work(&self) {
        lower_priority();
        let outcome = step_until_done(&self.volume, ONLINE_LEAVES, &self.rate, &self.stop, |_| {});
        let mut state = self.state();
        state.running = false;
        match outcome {
            Ok(None) => info!("re-encryption finished: every block is under the new volume key"),
            Ok(Some(p)) => info!(
                "re-encryption paused at {}% (the daemon is stopping); it resumes when the \
                 daemon starts again",
                crate::describe::percent(&p)
            ),
            Err(e) => {
                let why = error_chain(&e);
                error!(
                    "re-encryption stopped: {why}; it resumes when the daemon starts again, or \
                     with `qvol reencrypt IMAGE --resume`"
                );
                state.failure = Some(why);
            }
        }
    }

    /// Stops the worker after its current step, waiting at most `timeout` for that step.
    pub fn stop(&self, timeout: Duration) {
        self.stop.store(true, Ordering::Release);
        let until = Instant::now() + timeout;
        while self.running() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_about_a_quarter_second_of_the_rate() {
        let mib = 1 << 20;
        assert_eq!(leaves_per_step(64, 0), 64);
        assert_eq!(leaves_per_step(4, 0), 4);
        // 1 MiB/s: a quarter MiB a step, one leaf.
        assert_eq!(leaves_per_step(64, mib), 1);
        // Slower still: never less than one leaf.
        assert_eq!(leaves_per_step(64, 1), 1);
        // 64 MiB/s: 16 MiB a step, 64 leaves; faster: capped.
        assert_eq!(leaves_per_step(64, 64 * mib), 64);
        assert_eq!(leaves_per_step(64, 1024 * mib), 64);
        assert_eq!(leaves_per_step(4, 1024 * mib), 4);
    }

    #[test]
    fn a_pacer_waits_as_long_as_the_rate_asks() {
        let mut unlimited = Pacer::new(0);
        assert_eq!(unlimited.after(1 << 30), Duration::ZERO);
        let mut p = Pacer::new(1 << 20);
        let wait = p.after(1 << 20);
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Twice the bytes, twice the time from the start.
        let wait = p.after(1 << 20);
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
    }

    #[test]
    fn a_nap_ends_when_stopped() {
        let stop = AtomicBool::new(true);
        let t = Instant::now();
        nap(Duration::from_secs(60), &stop);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
