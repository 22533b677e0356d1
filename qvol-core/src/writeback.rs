//! Early writeback: data blocks written since the last kick are handed to the kernel's
//! writeback once they add up to [`KICK_BYTES`], without waiting for it. A commit's (or a
//! flush's) `fdatasync` then finds little left to write, so writers waiting behind a commit
//! wait for a sync of a few MiB, not of everything written since the last one (issue 15's
//! stall behind a log-full commit). A hint to the kernel: nothing about durability changes.
//! The kick runs on a thread of its own (`qvol-writeback`), so that the writer whose write
//! completed the span does not wait for the kernel to queue its writeback.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use crate::layout::*;
use crate::storage::Storage;

/// Bytes of data written between two kicks, unless `QVOL_WRITEBACK_MIB` says otherwise
/// (0 turns early writeback off: for measuring what it does).
const KICK_BYTES: u64 = 32 << 20;

fn kick_bytes() -> u64 {
    static KICK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KICK.get_or_init(|| {
        std::env::var("QVOL_WRITEBACK_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(KICK_BYTES, |mib| mib << 20)
    })
}

/// The blocks written since the last kick: how many, and the span they lie in.
#[derive(Debug, Default)]
pub(crate) struct Writeback {
    state: Mutex<Span>,
    /// The kicking thread (started with the first kick; it ends when this is dropped).
    kicker: OnceLock<Mutex<SyncSender<(u64, u64)>>>,
}

#[derive(Debug, Default)]
struct Span {
    bytes: u64,
    lo: u64,
    hi: u64,
}

impl Writeback {
    /// `pbns` were just written; kicks writeback of the span when enough has gathered.
    pub(crate) fn written(&self, st: &Arc<dyn Storage>, pbns: &[u64]) {
        let (Some(&lo), Some(&hi)) = (pbns.iter().min(), pbns.iter().max()) else {
            return;
        };
        let kick = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.bytes == 0 {
                s.lo = lo;
                s.hi = hi;
            } else {
                s.lo = s.lo.min(lo);
                s.hi = s.hi.max(hi);
            }
            s.bytes += pbns.len() as u64 * BLOCK_SIZE;
            let limit = kick_bytes();
            if limit == 0 || s.bytes < limit {
                if limit == 0 {
                    s.bytes = 0;
                }
                return;
            }
            let span = (s.lo, s.hi);
            *s = Span::default();
            span
        };
        let (offset, len) = (kick.0 * BLOCK_SIZE, (kick.1 + 1 - kick.0) * BLOCK_SIZE);
        let kicker = self.kicker.get_or_init(|| Mutex::new(start_kicker(st)));
        let sent = kicker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_send((offset, len));
        if sent.is_err() {
            // The thread is behind (or could not start): kick here, as a hint is all it is.
            let _ = st.start_writeback(offset, len);
        }
    }
}

/// The thread that asks the kernel to start writeback of the spans it is sent.
fn start_kicker(st: &Arc<dyn Storage>) -> SyncSender<(u64, u64)> {
    let (tx, rx) = sync_channel::<(u64, u64)>(4);
    let st = Arc::clone(st);
    let started = std::thread::Builder::new()
        .name("qvol-writeback".into())
        .spawn(move || {
            for (offset, len) in rx {
                // Best effort: a refusal only means the next sync writes it all.
                let _ = st.start_writeback(offset, len);
            }
        });
    if started.is_err() {
        // No thread: every send fails (the receiver is gone) and kicks happen in place.
        return sync_channel(0).0;
    }
    tx
}
