//! The commit protocol (docs/FORMAT.md §10): new nodes to free blocks, sync, the other
//! superblock, sync, then freed blocks become reusable and discarded ones are punched.
//!
//! In format version 6 a commit when the log is full is *pipelined* (FORMAT.md §10.1): with
//! the gate held it writes the new nodes, encodes the superblock, writes the head of the
//! other log area and starts the next log epoch there; writers then go on while a thread of
//! its own syncs and writes the superblock. The next commit waits for that thread first, so
//! at most one commit is in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::alloc::AllocState;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::superblock::{Superblock, SUPERBLOCK_LEN};
use crate::tree::PageWriter;
use crate::volume::{CommitPoint, Volume};
use crate::wal::LogHead;

/// Map leaves kept cached across commits (64 Ki leaves = 256 MiB, mapping 16 GiB of data).
const MAX_CACHED_LEAVES: usize = 1 << 16;
/// Map leaves that may change before a commit (32 Ki leaves = 128 MiB held in memory, the
/// most a 4 MiB log could dirty): with a long log, scattered writes commit before it fills.
pub(crate) const MAX_DIRTY_LEAVES: u64 = 1 << 15;

/// A pipelined commit whose superblock its own thread is making durable.
#[derive(Debug)]
pub(crate) struct InFlight {
    handle: JoinHandle<Result<()>>,
}

impl InFlight {
    /// Waits for the thread; its result.
    pub(crate) fn wait(self) -> Result<()> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(Error::corrupt("internal: a commit thread panicked")))
    }
}

/// The first part of a commit done: new nodes written (not synced), superblock encoded.
struct Prepared {
    next: Superblock,
    encoded: [u8; SUPERBLOCK_LEN],
    point: CommitPoint,
    moved: Vec<(u64, u64)>,
    birth: u32,
    /// The header this commit makes current has two log areas (format version 6).
    two: bool,
    /// The header this commit makes current binds log records to superblocks (version 3).
    binds: bool,
}

impl Volume {
    /// Commits; the caller holds the gate exclusively. `force`: even with nothing to write.
    /// Durable on return: the commit hook (if any) is told the new commit point, with the
    /// gate still held but no other lock.
    pub(crate) fn commit_locked(&self, force: bool) -> Result<()> {
        self.check_usable()?;
        let point = self.commit_inner(force).map_err(|e| self.fail(e))?;
        if let (Some(point), Some(hook)) = (point, &self.on_commit.0) {
            hook(&point);
        }
        Ok(())
    }

    /// The commit of a full log (the caller holds the gate exclusively). Pipelined in format
    /// version 6 (FORMAT.md §10.1): returns as soon as writers can go on, and the commit hook
    /// is told the commit point from the commit's own thread once it is durable. Before
    /// version 6, [`Volume::commit_locked`].
    pub(crate) fn commit_pipelined(&self) -> Result<()> {
        if !self.wal.two_areas() {
            return self.commit_locked(false);
        }
        self.check_usable()?;
        self.start_commit().map_err(|e| self.fail(e))
    }

    /// Waits for a pipelined commit in flight if `wait` (else only if its thread is done),
    /// then lets the blocks it freed be reused.
    pub(crate) fn reap(&self, wait: bool) -> Result<()> {
        let mut slot = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(f) if wait || f.handle.is_finished() => {}
            _ => return Ok(()),
        }
        let Some(f) = slot.take() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        f.wait().map_err(|e| self.fail(e))?;
        log::debug!("waited {:?} for the commit in flight", started.elapsed());
        // Punched while still held back: nothing can have been written to them yet.
        let punch = self.alloc.lock().committed_punches();
        punch_runs(&*self.storage, &punch);
        self.alloc.lock().release_committed();
        Ok(())
    }

    /// Returns the new commit point, or `None` if there was nothing to commit.
    fn commit_inner(&self, force: bool) -> Result<Option<CommitPoint>> {
        self.reap(true)?;
        if !force && self.wal.next() == 0 && !self.map.is_dirty() {
            return Ok(None);
        }
        let st: &dyn Storage = &*self.storage;
        let keys = self.keys();
        let mut a = self.alloc.lock();
        let p = self.prepare(&mut a, &keys)?;
        make_durable(
            st,
            &p.encoded,
            p.next.generation,
            &self.sync_lock,
            &self.failed,
        )?;
        *self.point.lock().unwrap_or_else(|p| p.into_inner()) = p.point;
        let point = p.point;
        self.install(&mut a, p, false);
        let punch = a.committed_punches();
        punch_runs(st, &punch);
        a.release_committed();
        Ok(Some(point))
    }

    /// The first half of a pipelined commit (FORMAT.md §10.1, steps 1 to 4); its thread
    /// does the rest.
    fn start_commit(&self) -> Result<()> {
        let started = std::time::Instant::now();
        self.reap(true)?;
        if self.wal.next() == 0 && !self.map.is_dirty() {
            return Ok(());
        }
        let st: &dyn Storage = &*self.storage;
        let keys = self.keys();
        let mut a = self.alloc.lock();
        let p = self.prepare(&mut a, &keys)?;
        if !p.two {
            return Err(Error::corrupt(
                "internal: a pipelined commit of an image with one log area",
            ));
        }
        LogHead {
            epoch: p.next.log_epoch,
            prev_len: self.wal.next(),
            parent: self.commit_point().root_id,
            anchor: p.point.root_id,
        }
        .write(st, &keys)?;
        let (encoded, point, generation) = (p.encoded, p.point, p.next.generation);
        self.install(&mut a, p, true);
        drop(a);
        let storage = Arc::clone(&self.storage);
        let hook = self.on_commit.0.clone();
        let failed = Arc::clone(&self.failed);
        let durable_point = Arc::clone(&self.point);
        let sync_lock = Arc::clone(&self.sync_lock);
        let handle = std::thread::Builder::new()
            .name("qvol-commit".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let r = make_durable(&*storage, &encoded, generation, &sync_lock, &failed);
                log::debug!("commit {generation} durable after {:?}", started.elapsed());
                match &r {
                    Ok(()) => {
                        *durable_point.lock().unwrap_or_else(|p| p.into_inner()) = point;
                        if let Some(hook) = hook {
                            // The commit is durable whatever the hook does.
                            let told =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    hook(&point)
                                }));
                            if told.is_err() {
                                log::error!("the commit hook panicked at generation {generation}");
                            }
                        }
                    }
                    Err(_) => failed.store(true, Ordering::Release),
                }
                r
            })
            .map_err(|e| Error::io("cannot start a commit thread", e))?;
        *self.inflight.lock().unwrap_or_else(|p| p.into_inner()) = Some(InFlight { handle });
        log::debug!(
            "commit {generation} started in {:?} (writers waited that long)",
            started.elapsed()
        );
        Ok(())
    }

    /// Commit, steps 1 to 3 of FORMAT.md §10 without the sync: every dirty map leaf, the
    /// snapshot table and the space tree get new blocks and are written; the next superblock
    /// is encoded.
    fn prepare(&self, a: &mut AllocState, keys: &Subkeys) -> Result<Prepared> {
        let st: &dyn Storage = &*self.storage;
        let t0 = std::time::Instant::now();
        let mut out = PageWriter::new(st);
        // Blocks the live map stopped using that a snapshot may hold (FORMAT.md §7.1).
        self.settle_kills(a)?;
        let birth = self.snaps.epoch();
        let (map_root, moved) = self.map.prepare_commit(
            st,
            keys,
            &mut |old| self.realloc_map_node(a, old),
            birth,
            &mut out,
        )?;
        let (snapshots, snap_epoch) = self.commit_table(a, &mut out)?;
        let t1 = t0.elapsed();
        let space_root = a.prepare_commit(st, keys, &mut out)?;
        let t2 = t0.elapsed();
        out.flush()?;
        log::debug!(
            "commit nodes: map {t1:?}, space tree {:?}, written {:?} ({} leaves)",
            t2 - t1,
            t0.elapsed() - t2,
            moved.len()
        );
        let generation = self.superblock().generation + 1;
        let slots = self.slot_area();
        if slots.staged_keyslots != 0 && a.high_water() > slots.staged_keyslots {
            return Err(Error::corrupt(
                "internal: a commit allocated over the staged keyslot area",
            ));
        }
        // The header this commit makes current (a staged one counts, FORMAT.md §3.1).
        let header = slots.header()?;
        let (binds, two) = (header.binds_log(), header.two_log_areas());
        // Version 3: a random id makes every commit's MAC unique, even when two sessions
        // commit the same content at the same generation (FORMAT.md §8).
        let mut commit_id = [0u8; 16];
        if binds {
            crate::datablock::fill_random(&mut commit_id)?;
        }
        let next = Superblock {
            generation,
            log_epoch: generation,
            map_root,
            map_height: self.map.height(),
            space_height: a.height(),
            key_epoch: keys.epoch(),
            space_root,
            snapshots,
            snap_epoch,
            allocated_blocks: a.used(),
            high_water: a.high_water(),
            header_hash: slots.header_hash,
            commit_id,
            staged_keyslots: slots.staged_keyslots,
            staged_hash: slots.staged_hash,
            rekey: self.rekey.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            compress: self.compress_level(),
        };
        drop(slots);
        let encoded = next.encode(keys);
        let point = CommitPoint {
            generation,
            root_id: Superblock::mac_of(&encoded),
        };
        Ok(Prepared {
            next,
            encoded,
            point,
            moved,
            birth,
            two,
            binds,
        })
    }

    /// The prepared commit becomes the state the volume goes on from: its superblock, the
    /// leaves at their new blocks, the blocks it freed held back until it is durable, and
    /// the next log epoch (FORMAT.md §10 step 5; §10.1 step 4).
    fn install(&self, a: &mut AllocState, p: Prepared, pipelined: bool) {
        let (epoch, anchor) = (p.next.log_epoch, p.point.root_id);
        *self.superblock() = p.next;
        self.map.finish_commit(&p.moved, p.birth);
        self.after_commit();
        self.map.trim(MAX_CACHED_LEAVES);
        a.begin_commit();
        self.wal.reset(epoch, anchor, p.two, p.binds, pipelined);
    }
}

/// Steps 3 and 4 of FORMAT.md §10: syncs the new nodes (and everything written before them),
/// writes superblock `generation` to its copy, syncs.
fn make_durable(
    st: &dyn Storage,
    encoded: &[u8],
    generation: u64,
    lock: &std::sync::Mutex<()>,
    failed: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    sync_guarded(st, lock, failed)
        .map_err(|e| Error::io("cannot sync the new map nodes during a commit", e))?;
    let offset = SUPERBLOCK_OFFSETS[(generation % 2) as usize];
    st.write_all_at(encoded, offset).map_err(|e| {
        Error::io(
            format!("cannot write superblock generation {generation}"),
            e,
        )
    })?;
    sync_guarded(st, lock, failed)
        .map_err(|e| Error::io(format!("cannot sync superblock generation {generation}"), e))
}

/// A sync of the volume's storage, serialised with every other one, that marks the volume
/// failed before any later sync can report success: Linux reports a writeback error to one
/// `fsync` of the file only, so a sync that returns Ok after another one failed proves
/// nothing.
pub(crate) fn sync_guarded(
    st: &dyn Storage,
    lock: &std::sync::Mutex<()>,
    failed: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    if failed.load(Ordering::Acquire) {
        return Err(std::io::Error::other(
            "an earlier sync of this volume failed",
        ));
    }
    let r = st.sync_data();
    if r.is_err() {
        failed.store(true, Ordering::Release);
    }
    r
}

/// Punches freed blocks that held discarded data, in contiguous runs. Best effort: a
/// failure only means the host keeps the space (the blocks are reused all the same).
fn punch_runs(st: &dyn Storage, blocks: &[u64]) {
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[i] + (j - i) as u64 {
            j += 1;
        }
        let _ = st.punch_hole(blocks[i] * BLOCK_SIZE, (j - i) as u64 * BLOCK_SIZE);
        i = j;
    }
}
