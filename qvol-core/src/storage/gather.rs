//! Writes that arrive together, written together: where each write is a network round trip
//! (`Storage::round_trips`), writers that write at the same time hand their buffers to one
//! of them, which puts every contiguous run of them in flight at once
//! ([`Storage::write_many`]) while the others wait (group commit). Each writer returns only
//! after all of its own bytes were written, with those writes' outcome. Buffers one writer
//! hands in together carry no order among themselves: a writer hands in together only what
//! may land in any order (FORMAT.md §9: a log record and the data it names).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::Storage;

/// One stream of gathered writes.
#[derive(Debug, Default)]
pub(crate) struct Gather {
    state: Mutex<State>,
    turn: Condvar,
}

/// A write's outcome, as every writer it carried gets it (`io::Error` is not `Clone`).
type Outcome = Result<(), (io::ErrorKind, String)>;

#[derive(Debug, Default)]
struct State {
    /// Buffers handed in and not yet taken by a leader, by offset.
    queued: BTreeMap<u64, Vec<u8>>,
    /// Whether a writer is writing for the others now.
    leading: bool,
    /// Outcomes of written buffers, by offset, until their writer takes them.
    done: HashMap<u64, Outcome>,
}

impl Gather {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `buf` at `offset` of `st`, together with whatever other writers hand in
    /// meanwhile. Offsets of buffers in flight at once must differ.
    #[cfg(test)]
    pub(crate) fn write(&self, st: &dyn Storage, buf: Vec<u8>, offset: u64) -> io::Result<()> {
        self.write_all(st, vec![(offset, buf)])
    }

    /// Writes every `(offset, buffer)` of `bufs` to `st`, in any order and together with
    /// whatever other writers hand in meanwhile; returns once all of them are written, with
    /// the first error if any failed. Offsets of buffers in flight at once must differ.
    pub(crate) fn write_all(&self, st: &dyn Storage, bufs: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        let mine: Vec<u64> = bufs.iter().map(|(offset, _)| *offset).collect();
        let mut s = self.lock();
        for (offset, buf) in bufs {
            debug_assert!(
                !s.queued.contains_key(&offset) && !s.done.contains_key(&offset),
                "two buffers in flight at offset {offset}"
            );
            s.queued.insert(offset, buf);
        }
        loop {
            if mine.iter().all(|o| s.done.contains_key(o)) {
                let mut first = Ok(());
                for o in &mine {
                    if let Some(Err((kind, msg))) = s.done.remove(o) {
                        if first.is_ok() {
                            first = Err(io::Error::new(kind, msg));
                        }
                    }
                }
                return first;
            }
            if s.leading {
                s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.leading = true;
            let queued = std::mem::take(&mut s.queued);
            drop(s);
            let lead = Lead {
                gather: self,
                own: mine.clone(),
                carried: queued.keys().copied().collect(),
            };
            let outcomes = write_runs(st, queued);
            drop(lead);
            s = self.lock();
            s.leading = false;
            s.done.extend(outcomes);
            self.turn.notify_all();
        }
    }
}

/// A leader's write in progress: should it unwind (a panic below, which vhost-qvol's
/// request threads catch), the writers it carried get an error and the next may lead,
/// rather than all of them, and every later one, waiting for ever.
struct Lead<'a> {
    gather: &'a Gather,
    /// The leader's own offsets: it takes no outcome (it is unwinding).
    own: Vec<u64>,
    carried: Vec<u64>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut s = self.gather.lock();
        s.leading = false;
        for offset in self.carried.iter().filter(|o| !self.own.contains(o)) {
            s.done.insert(
                *offset,
                Err((
                    io::ErrorKind::Other,
                    "the writer that carried this write panicked".to_owned(),
                )),
            );
        }
        // The leader's own buffers still queued (handed in after it took the lead) are
        // nobody's now.
        for offset in &self.own {
            s.queued.remove(offset);
        }
        self.gather.turn.notify_all();
    }
}

/// Writes `queued` in runs of contiguous buffers, all runs in flight together; the outcome
/// of each buffer's run.
fn write_runs(st: &dyn Storage, queued: BTreeMap<u64, Vec<u8>>) -> Vec<(u64, Outcome)> {
    // Runs: (start, bytes, offsets of the buffers in it).
    let mut runs: Vec<(u64, Vec<u8>, Vec<u64>)> = Vec::new();
    for (offset, buf) in queued {
        match runs.last_mut() {
            Some((start, run, members)) if *start + run.len() as u64 == offset => {
                run.extend_from_slice(&buf);
                members.push(offset);
            }
            _ => runs.push((offset, buf, vec![offset])),
        }
    }
    let writes: Vec<(u64, &[u8])> = runs
        .iter()
        .map(|(start, run, _)| (*start, run.as_slice()))
        .collect();
    let results = st.write_many(&writes);
    let mut outcomes = Vec::new();
    for (i, (_, _, members)) in runs.iter().enumerate() {
        let outcome = match results.get(i) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err((e.kind(), e.to_string())),
            None => Err((
                io::ErrorKind::Other,
                "internal: the storage reported fewer writes than it was given".to_owned(),
            )),
        };
        outcomes.extend(members.iter().map(|&m| (m, outcome.clone())));
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::storage::MemStorage;

    /// Counts write calls; the first one waits at `gate` until the test has queued the
    /// other writers; `at` says what a write at an offset does before it lands.
    #[derive(Debug)]
    struct Held {
        inner: MemStorage,
        writes: AtomicUsize,
        gate: Barrier,
        at: fn(u64) -> io::Result<()>,
    }

    impl Held {
        fn new(at: fn(u64) -> io::Result<()>) -> Arc<Held> {
            Arc::new(Held {
                inner: MemStorage::new(),
                writes: AtomicUsize::new(0),
                gate: Barrier::new(2),
                at,
            })
        }
    }

    impl Storage for Held {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if self.writes.fetch_add(1, Ordering::SeqCst) == 0 {
                self.gate.wait();
            }
            (self.at)(offset)?;
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.punch_hole(offset, len)
        }
    }

    #[test]
    fn writers_that_arrive_together_share_one_write_per_run_and_get_its_outcome() {
        // Writer 0 leads alone (its write waits at the barrier until the others queued);
        // writers 1..=4 (contiguous, 128 bytes each) then go out in one write, writer 5 (past
        // 4096, apart from them) in another, which fails for it alone.
        let st = Held::new(|offset| {
            if offset >= 4096 {
                return Err(io::Error::other("no room past 4096"));
            }
            Ok(())
        });
        let gather = Arc::new(Gather::default());
        let offsets = [0u64, 128, 256, 384, 512, 8192];
        let first = {
            let (st, gather) = (st.clone(), gather.clone());
            std::thread::spawn(move || gather.write(&*st, vec![1; 128], 0))
        };
        while st.writes.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let others: Vec<_> = offsets[1..]
            .iter()
            .map(|&off| {
                let (st, gather) = (st.clone(), gather.clone());
                std::thread::spawn(move || gather.write(&*st, vec![(off / 128) as u8; 128], off))
            })
            .collect();
        while gather.lock().queued.len() < others.len() {
            std::thread::yield_now();
        }
        st.gate.wait();
        first.join().unwrap().unwrap();
        let outcomes: Vec<_> = others.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(outcomes[..4].iter().all(|o| o.is_ok()), "{outcomes:?}");
        assert!(outcomes[4].is_err());
        assert_eq!(
            st.writes.load(Ordering::SeqCst),
            3,
            "1 + one run + the far one"
        );
        let mut back = vec![0u8; 640];
        st.inner.read_exact_at(&mut back, 0).unwrap();
        for (i, chunk) in back.chunks(128).enumerate() {
            let want = if i == 0 { 1 } else { i as u8 };
            assert!(chunk.iter().all(|&b| b == want), "record {i}");
        }
        assert!(gather.lock().done.is_empty());
    }

    /// A leader whose write panics (caught above it, as vhost-qvol's request threads do)
    /// must not leave the writers it carried, nor every later one, waiting for ever.
    #[test]
    fn a_leader_that_panics_leaves_no_writer_waiting() {
        // Writes at 0 panic (a bug below the engine).
        let st = Held::new(|offset| {
            assert_ne!(offset, 0, "storage bug");
            Ok(())
        });
        let gather = Arc::new(Gather::default());
        let leader = {
            let (st, gather) = (st.clone(), gather.clone());
            std::thread::spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    gather.write(&*st, vec![1; 128], 0)
                }))
                .is_err()
            })
        };
        while st.writes.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Queued behind the leader: one contiguous with nothing, at 4096.
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (st, gather, tx) = (st.clone(), gather.clone(), tx.clone());
            std::thread::spawn(move || {
                let _ = tx.send(gather.write(&*st, vec![2; 128], 4096).is_ok());
            });
        }
        while gather.lock().queued.is_empty() {
            std::thread::yield_now();
        }
        st.gate.wait();
        assert!(leader.join().unwrap(), "the leader's write panicked");
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Ok(true),
            "the writer queued behind a panicking leader never returned"
        );
        // Nothing is left behind for a later writer to take as its own.
        gather.write(&*st, vec![3; 128], 8192).unwrap();
        assert!(gather.lock().done.is_empty(), "{:?}", gather.lock().done);
    }
}
