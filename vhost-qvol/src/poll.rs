//! Adaptive polling of a queue (as QEMU's iothread `poll-max-ns`, util/aio-posix.c
//! `adjust_polling_time`): after serving its ring, a queue's thread watches it for a window
//! before sleeping, so that a request arriving meanwhile is served without waking a sleeping
//! thread. The window adapts to the arrivals: it grows (4 µs, then doubling, up to the
//! configured maximum) while requests keep arriving soon after the thread went to sleep, and
//! shrinks (halving, then off) when they come later than the maximum. An idle queue thus
//! stops polling after its first long sleep and costs nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The first window when polling starts to grow.
const START_NS: u64 = 4_000;

/// One queue's polling window.
#[derive(Debug, Default)]
pub struct AdaptivePoll {
    window_ns: AtomicU64,
    /// When the thread stopped polling and went to sleep (`None` while serving).
    slept_at: Mutex<Option<Instant>>,
}

impl AdaptivePoll {
    /// The thread was woken by a kick: adjusts the window to how long it slept, given the
    /// maximum `max_ns` (QEMU's rules: slept no longer than the window, keep it; longer than
    /// the maximum, shrink it; in between, grow it).
    pub fn woke(&self, max_ns: u64) {
        let slept = self
            .slept_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(at) = slept else {
            return;
        };
        let block_ns = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let window = self.window_ns.load(Ordering::Relaxed);
        let next = if block_ns <= window {
            window
        } else if block_ns > max_ns {
            let half = window / 2;
            if half < START_NS {
                0
            } else {
                half
            }
        } else {
            (window * 2).max(START_NS).min(max_ns)
        };
        self.window_ns.store(next.min(max_ns), Ordering::Relaxed);
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// The thread stops polling and goes to sleep.
    pub fn sleeping(&self) {
        *self.slept_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after_sleep(p: &AdaptivePoll, slept: Duration, max: Duration) -> Duration {
        *p.slept_at.lock().unwrap() = Some(Instant::now() - slept);
        p.woke(max.as_nanos() as u64);
        p.window()
    }

    #[test]
    fn the_window_grows_for_close_arrivals_and_closes_when_idle() {
        let p = AdaptivePoll::default();
        let max = Duration::from_micros(50);
        assert_eq!(p.window(), Duration::ZERO, "starts off");
        // Requests 20 µs after going to sleep: grow until the window covers them.
        let grown: Vec<u128> = (0..5)
            .map(|_| after_sleep(&p, Duration::from_micros(20), max).as_micros())
            .collect();
        assert_eq!(grown, vec![4, 8, 16, 32, 32]);
        // Never past the maximum.
        assert_eq!(
            after_sleep(&p, Duration::from_micros(45), max).as_micros(),
            50
        );
        assert_eq!(
            after_sleep(&p, Duration::from_micros(49), max).as_micros(),
            50
        );
        // Idle: long sleeps halve it, then turn it off.
        let shrunk: Vec<u128> = (0..5)
            .map(|_| after_sleep(&p, Duration::from_millis(10), max).as_micros())
            .collect();
        assert_eq!(shrunk, vec![25, 12, 6, 0, 0]);
        // A kick while serving (no sleep recorded) changes nothing.
        p.woke(50_000);
        assert_eq!(p.window(), Duration::ZERO);
    }
}
