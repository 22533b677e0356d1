//! Recording each commit point in the keystore (the volume's own record, through its
//! [`VolumeGuard`]) off the commit path.
//!
//! A record is a small file write and fsync under the keystore's lock: done inside a commit
//! it would stall the guest's I/O for as long as the keystore takes, and someone holding the
//! keystore lock could stall it for the lock's whole deadline. So once the daemon serves,
//! commit points go to a thread of their own, which records the newest one it has (a record
//! never goes down, so older queued points add nothing) and retries a point it could not
//! record (a held lock, a full disk) until it can. Before that (the commit at open) and at
//! [`Recorder::flush`] (shutdown), recording is synchronous. A record may lag behind the
//! image (a later open accepts the newer image); it never runs ahead of it, because the
//! hook runs only once the commit is durable.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use log::{error, info};
use qvol_core::{CommitHook, CommitPoint};
use qvol_keys::VolumeGuard;

use crate::open::state_of;
use crate::volume_disk::error_chain;

/// How long the thread waits before trying a failed record again.
const RETRY: Duration = Duration::from_secs(2);

enum Message {
    Record(CommitPoint),
    Flush(SyncSender<bool>),
}

/// Records the commit points of one volume.
pub struct Recorder {
    guard: Arc<VolumeGuard>,
    image: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Message>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder that records synchronously until [`Recorder::start_thread`].
    pub fn new(guard: Arc<VolumeGuard>, image: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            guard,
            image,
            queue: Mutex::new(None),
        })
    }

    /// The hook to give `Volume::open_with`.
    pub fn hook(self: &Arc<Self>) -> CommitHook {
        let me = Arc::clone(self);
        Arc::new(move |point: &CommitPoint| me.note(*point))
    }

    fn note(&self, point: CommitPoint) {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        match queue.as_ref() {
            Some(tx) if tx.send(Message::Record(point)).is_ok() => {}
            _ => {
                self.record(&point);
            }
        }
    }

    /// Records `point`; says whether it worked (the failure is logged).
    fn record(&self, point: &CommitPoint) -> bool {
        match self.guard.record(&state_of(point)) {
            Ok(()) => true,
            Err(e) => {
                error!(
                    "cannot record generation {} of {} in the keystore (will retry): {}",
                    point.generation,
                    self.image.display(),
                    error_chain(&e)
                );
                false
            }
        }
    }

    /// From now on, records on a thread of its own. Call it after the daemon is sandboxed,
    /// so that the thread is too.
    pub fn start_thread(self: &Arc<Self>) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("qvol-recorder".into())
            .spawn(move || me.run(&rx))?;
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        Ok(())
    }

    fn run(&self, rx: &Receiver<Message>) {
        // The newest point not yet recorded, and whether recording it failed before.
        let mut pending: Option<CommitPoint> = None;
        let mut failing = false;
        loop {
            let first = if pending.is_some() {
                match rx.recv_timeout(RETRY) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                }
            };
            let mut waiters = Vec::new();
            let mut take = |m: Message| match m {
                Message::Record(p) => {
                    if pending.is_none_or(|n| p.generation >= n.generation) {
                        pending = Some(p);
                    }
                }
                Message::Flush(done) => waiters.push(done),
            };
            if let Some(m) = first {
                take(m);
            }
            while let Ok(more) = rx.try_recv() {
                take(more);
            }
            if let Some(point) = pending {
                if self.record(&point) {
                    if failing {
                        info!(
                            "recorded generation {} of {} in the keystore after all",
                            point.generation,
                            self.image.display()
                        );
                    }
                    pending = None;
                    failing = false;
                } else {
                    failing = true;
                }
            }
            for done in waiters {
                let _ = done.send(pending.is_none());
            }
        }
    }

    /// Waits (at most `timeout`) until every commit point noted so far is recorded; false
    /// if one still is not.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = mpsc::sync_channel(1);
        let sent = {
            let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue
                .as_ref()
                .is_some_and(|tx| tx.send(Message::Flush(done)).is_ok())
        };
        !sent || wait.recv_timeout(timeout).unwrap_or(false)
    }
}
