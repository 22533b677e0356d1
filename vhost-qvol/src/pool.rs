//! The threads that serve one queue's requests together (`Device::set_parallel`): a fixed
//! set started on the queue's first use (after the sandbox, which only binds threads that
//! start after it), each with a worker of its own (its bounce buffer) and waiting for the
//! next request. The queue's thread hands requests out and completes each as it finishes,
//! in whatever order they finish, keeping up to the set's size in flight.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use crate::request::QueueWorker;

/// What a pool thread runs: requests, served with the thread's worker; it returns each
/// one's chain head and the bytes written to the guest.
pub(crate) type Job = Box<dyn FnOnce(&mut QueueWorker) -> Vec<(u16, u32)> + Send>;

/// Requests handed out: their chains' heads, the job, where their completions go.
type Task = (Vec<u16>, Job, Sender<(u16, u32)>);

/// Pool threads of one queue.
#[derive(Debug)]
pub(crate) struct Pool {
    tasks: Mutex<Sender<Task>>,
}

impl Pool {
    /// Starts `threads` threads named after `queue`. Dropping the pool ends them once idle.
    pub(crate) fn start(queue: usize, threads: usize) -> std::io::Result<Pool> {
        let (tx, rx) = channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("qvol-q{queue}-{i}"))
                .spawn(move || serve(queue, &rx))?;
        }
        Ok(Pool {
            tasks: Mutex::new(tx),
        })
    }

    /// Hands the requests of chains `heads` to a free thread; `(head, bytes)` goes to
    /// `done` for each when it is served.
    pub(crate) fn submit(
        &self,
        heads: Vec<u16>,
        job: Job,
        done: &Sender<(u16, u32)>,
    ) -> Result<(), String> {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send((heads, job, done.clone()))
            .map_err(|_| "the queue's request threads are gone".to_owned())
    }
}

fn serve(queue: usize, rx: &Mutex<Receiver<Task>>) {
    let mut worker = QueueWorker::new(queue);
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((heads, job, done)) = next else {
            return;
        };
        // A job only panics on a bug: its requests are completed with nothing written (the
        // guest sees the status byte it put there), and the thread goes on with a new worker.
        let served = match catch_unwind(AssertUnwindSafe(|| job(&mut worker))) {
            Ok(served) => served,
            Err(_) => {
                worker = QueueWorker::new(queue);
                Vec::new()
            }
        };
        worker.shed(KEEP_BOUNCE);
        // Every request handed out is completed exactly once, whatever the job returned.
        let served = if served.len() == heads.len() {
            served
        } else {
            heads.into_iter().map(|head| (head, 0)).collect()
        };
        for completion in served {
            let _ = done.send(completion);
        }
    }
}

/// The largest bounce buffer a request thread keeps between requests (a request's data is
/// up to 64 MiB; 32 threads a queue on RBD).
const KEEP_BOUNCE: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_thread_keeps_no_large_bounce_buffer() {
        let pool = Pool::start(0, 1).unwrap();
        let (tx, rx) = channel();
        let job = |n: usize| -> Job {
            Box::new(move |w: &mut QueueWorker| {
                let before = w.bounce_len() as u32;
                w.bounce_for_test(n);
                vec![(0, before)]
            })
        };
        pool.submit(vec![0], job(4 << 20), &tx).unwrap();
        assert_eq!(rx.recv().unwrap(), (0, 0));
        // The next job on the same (only) thread finds the 4 MiB buffer gone, a 64 KiB one kept.
        pool.submit(vec![0], job(64 << 10), &tx).unwrap();
        assert_eq!(rx.recv().unwrap(), (0, 0));
        pool.submit(vec![0], job(0), &tx).unwrap();
        assert_eq!(rx.recv().unwrap(), (0, 64 << 10));
    }

    #[test]
    fn a_job_that_panics_completes_each_of_its_requests_once() {
        let pool = Pool::start(0, 1).unwrap();
        let (tx, rx) = channel();
        let job: Job = Box::new(|_: &mut QueueWorker| panic!("a bug"));
        pool.submit(vec![4, 7, 9], job, &tx).unwrap();
        let mut got: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, [(4, 0), (7, 0), (9, 0)]);
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
    }
}
