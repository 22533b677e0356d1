//! Claims on ranges of logical blocks. An operation that changes the map of some blocks
//! holds a claim on them for its whole course (log slots taken, data and records written,
//! map updated), so that the operations on one block take their log slots in the order they
//! update the map: the order replay applies them in (FORMAT.md §9, §13). Operations on
//! other blocks go on meanwhile.

use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The ranges claimed now.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Range<u64>>,
    /// Claimants waiting for a range to be given back (no wake-up is sent without one).
    waiting: usize,
}

/// A claim on a range of logical blocks, given back on drop.
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    claims: &'a Claims,
    range: Range<u64>,
}

impl Claims {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims logical blocks `range`, waiting while any of them is claimed. Take it inside
    /// the commit gate (a holder never waits for the gate, so a claimant inside it always
    /// gets its turn).
    pub(crate) fn claim(&self, range: Range<u64>) -> Claim<'_> {
        let mut s = self.lock();
        while s
            .held
            .iter()
            .any(|r| r.start < range.end && range.start < r.end)
        {
            s.waiting += 1;
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
            s.waiting -= 1;
        }
        s.held.push(range.clone());
        Claim {
            claims: self,
            range,
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.claims.lock();
        if let Some(k) = s.held.iter().position(|r| *r == self.range) {
            s.held.swap_remove(k);
        }
        if s.waiting > 0 {
            self.claims.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_overlapping_claim_waits_and_a_disjoint_one_does_not() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim(10..20);
        // Disjoint (touching ends included): granted at once.
        drop((claims.claim(0..10), claims.claim(20..30)));
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (claims, got) = (claims.clone(), got.clone());
            std::thread::spawn(move || {
                let _c = claims.claim(19..25);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !got.load(Ordering::SeqCst),
            "a claim overlapping a held one was granted"
        );
        drop(first);
        waiter.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert!(claims.lock().held.is_empty());
        assert_eq!(claims.lock().waiting, 0);
    }
}
