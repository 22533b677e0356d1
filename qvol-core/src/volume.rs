//! [`Volume`]: create, open, flush, commit, info, close. Reads and writes are in
//! [`crate::rw`], the commit in [`crate::commit`], log replay in [`crate::replay`].

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::alloc::{space_capacity, AllocState, Allocator};
use crate::error::{Error, ErrorKind, Result};
use crate::header::{encode_keyslots, read_header_area, Header};
use crate::info::{CreateOptions, VolumeInfo};
use crate::key::VolumeKey;
use crate::keyslots::SlotArea;
use crate::layout::*;
use crate::map::BlockMap;
use crate::snapshot::{load_table, Snapshots};
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::superblock::{Superblock, SUPERBLOCK_LEN};
use crate::wal::Wal;

/// Identity of a committed state: its generation and the MAC of its superblock (FORMAT.md
/// §8). Two histories forked from one image may share a generation, never a `root_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPoint {
    /// The superblock's generation.
    pub generation: u64,
    /// The superblock's MAC (offset 480).
    pub root_id: [u8; 32],
}

/// Judges the commit point chosen at open, before anything is read from the log or written
/// (FORMAT.md §9, open order). An `Err` makes the open fail with [`ErrorKind::Refused`].
pub type CommitCheck = Box<
    dyn FnOnce(&CommitPoint) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
        + Send,
>;

/// Told every new commit point once its superblock is durable.
pub type CommitHook = Arc<dyn Fn(&CommitPoint) + Send + Sync>;

/// How [`Volume::open_with`] opens a volume.
#[derive(Default)]
pub struct OpenOptions {
    /// Open read-only: nothing is ever written (no replay commit either).
    pub read_only: bool,
    /// Called with the chosen superblock's commit point right after it is chosen, before log
    /// replay and before any write; an `Err` refuses the open and leaves the file untouched.
    pub check: Option<CommitCheck>,
    /// Called after every commit's superblock is durable (the replay commit of this open,
    /// log-full commits, [`Volume::commit`], [`Volume::close`]) with the new commit point, in
    /// commit order. It runs while a synchronous commit holds the volume's exclusive gate, or
    /// on the thread of a pipelined one (format version 6: log-full commits and
    /// [`Volume::commit_async`]) while I/O goes on: it must not call back into the volume nor
    /// hold it (a hook dropping the last handle would drop the volume on its own thread),
    /// and should be quick.
    pub on_commit: Option<CommitHook>,
    /// Accept a keyslot area that matches no superblock (damaged, or replaced behind the
    /// volume's back) instead of failing with `Integrity`. Only for a caller about to
    /// replace the whole area with [`Volume::set_keyslots`] from a backup it trusts (the
    /// key has been verified against the header's key check): `qvol header restore`.
    pub accept_any_keyslot_area: bool,
    /// The keyslot (number and blob) the caller unwrapped the key from, read without the key:
    /// the open is refused (`Refused`), before anything is written, unless the keyslot area
    /// it accepts holds that blob there (a keyless read may be shown slots that no verified
    /// superblock vouches for).
    pub unlocked_slot: Option<(usize, Vec<u8>)>,
    /// Open this snapshot instead of the live disk: reads see its content (only with
    /// `read_only`; the log is not replayed).
    pub snapshot: Option<String>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("read_only", &self.read_only)
            .field("check", &self.check.as_ref().map(|_| "<fn>"))
            .field("on_commit", &self.on_commit.as_ref().map(|_| "<fn>"))
            .field("accept_any_keyslot_area", &self.accept_any_keyslot_area)
            .field(
                "unlocked_slot",
                &self.unlocked_slot.as_ref().map(|(i, _)| i),
            )
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

/// The volume's gate held exclusively (and the lock taken before it; dropped after it).
pub(crate) struct Exclusive<'a> {
    _gate: RwLockWriteGuard<'a, ()>,
    _writer: MutexGuard<'a, ()>,
}

/// The commit hook of an open volume.
#[derive(Clone, Default)]
pub(crate) struct HookSlot(pub(crate) Option<CommitHook>);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(<fn>)"
        } else {
            "None"
        })
    }
}

/// An open qvol volume. `Send + Sync`: share it as `Arc<Volume>` between queue threads.
///
/// Every acknowledged write is in the write-ahead log (kill -9 safe); [`Volume::flush`]
/// makes everything acknowledged so far durable against power loss.
#[derive(Debug)]
pub struct Volume {
    pub(crate) storage: Arc<dyn Storage>,
    /// The subkeys; replaced (under the exclusive gate) when a re-encryption starts or
    /// finishes (FORMAT.md §17).
    keys: RwLock<Arc<Subkeys>>,
    /// The re-encryption record the next commit writes (FORMAT.md §17).
    pub(crate) rekey: Mutex<Option<crate::superblock::RekeyRecord>>,
    pub(crate) header: Header,
    /// The authenticated keyslot area and the header hash the next commit carries.
    pub(crate) slots: Mutex<SlotArea>,
    pub(crate) read_only: bool,
    /// Operations hold it shared; a commit holds it exclusively (no reader sees a block
    /// reused under it).
    pub(crate) gate: RwLock<()>,
    /// Taken before the gate is taken exclusively, and alone by work that must see no commit
    /// while it runs next to I/O (a re-encryption step's sealing, then its install).
    writer: Mutex<()>,
    pub(crate) map: BlockMap,
    pub(crate) alloc: Allocator,
    pub(crate) snaps: Snapshots,
    pub(crate) wal: Wal,
    /// The superblock of the last commit (durable, or being made durable by the commit in
    /// flight).
    pub(crate) sb: Mutex<Superblock>,
    /// The commit point of the last durable commit (set by the commit thread of a pipelined
    /// commit).
    pub(crate) point: Arc<Mutex<CommitPoint>>,
    /// The pipelined commit whose superblock may not be durable yet (FORMAT.md §10.1).
    pub(crate) inflight: Mutex<Option<crate::commit::InFlight>>,
    pub(crate) on_commit: HookSlot,
    pub(crate) failed: Arc<AtomicBool>,
    /// Held around every sync that can run next to another (flush, a commit's thread).
    pub(crate) sync_lock: Arc<Mutex<()>>,
    /// The virtual disk size in bytes (the header's, until a resize changes both).
    pub(crate) size: AtomicU64,
    /// Data written since writeback was last started (FORMAT.md §13).
    pub(crate) writeback: crate::writeback::Writeback,
    /// Data and log records of writers that write together, written together where each
    /// write is a round trip (`Storage::round_trips`).
    pub(crate) gather: crate::storage::gather::Gather,
    /// Logical blocks whose map an operation in flight is changing (`claim.rs`).
    pub(crate) claims: crate::claim::Claims,
    /// The zstd level of new whole-unit writes, [`NO_COMPRESSION`] for none (the
    /// superblock's setting, FORMAT.md §18.2).
    pub(crate) compress: AtomicI32,
}

/// [`Volume::compress`] when new writes are not compressed.
pub(crate) const NO_COMPRESSION: i32 = i32::MIN;

impl Volume {
    /// Creates a volume on `storage` (whose previous content is discarded) and opens it.
    /// Its first commit point is [`Volume::commit_point`].
    pub fn create(
        storage: Arc<dyn Storage>,
        opts: CreateOptions,
        key: &VolumeKey,
    ) -> Result<Volume> {
        Volume::create_with(storage, opts, key, None)
    }

    /// [`Volume::create`], with `on_commit` told of every commit point from the first (that
    /// of the create) on, like [`OpenOptions::on_commit`].
    pub fn create_with(
        storage: Arc<dyn Storage>,
        opts: CreateOptions,
        key: &VolumeKey,
        on_commit: Option<CommitHook>,
    ) -> Result<Volume> {
        let size = opts.size;
        if size == 0 || size % BLOCK_SIZE != 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a volume size must be a non-zero multiple of 4096 up to 256 TiB, not {size}"
                ),
            ));
        }
        let keys = Subkeys::derive_epoch(key, opts.suite, opts.volume_id, opts.key_epoch)
            .with_portable_nodes(true);
        if opts.key_epoch > KEY_EPOCH_MASK {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a key epoch is at most {KEY_EPOCH_MASK}, not {}",
                    opts.key_epoch
                ),
            ));
        }
        let units = match opts.compression {
            Some(c) => Some(c.check()?),
            None => None,
        };
        let header = Header {
            key_epoch: opts.key_epoch,
            features: FEATURE_PORTABLE_NODES | units.map_or(0, |_| FEATURE_UNITS),
            unit_log2: units.map_or(0, |c| c.unit_log2),
            version: FORMAT_VERSION,
            log_len: Regions::for_size(size).log_len,
            volume_id: opts.volume_id,
            suite: opts.suite,
            size,
            name: opts.name,
            key_check: keys.key_check(),
        };
        let header_block = header.encode()?;
        let slots = encode_keyslots(&opts.keyslots)?;
        let io = |what: &str, e| Error::io(format!("cannot {what} while creating the volume"), e);
        storage
            .set_len(0)
            .map_err(|e| io("truncate the image", e))?;
        storage
            .write_all_at(&header_block, 0)
            .map_err(|e| io("write the header", e))?;
        storage
            .write_all_at(&slots, KEYSLOT_OFFSET)
            .map_err(|e| io("write the keyslots", e))?;
        storage
            .set_len(header.regions().data_offset())
            .map_err(|e| io("size the image", e))?;
        let area = SlotArea::new(&header_block, slots);
        let blocks = size / BLOCK_SIZE;
        let capacity = space_capacity(header.regions(), blocks);
        let sb = Superblock {
            compress: units.and_then(|c| c.level),
            map_height: tree_height(blocks, FANOUT),
            space_height: AllocState::height_for(capacity),
            header_hash: area.header_hash,
            ..Superblock::default()
        };
        let point = CommitPoint {
            generation: 0,
            root_id: [0; 32],
        };
        let mut vol = Volume::assemble(storage, keys, header, area, sb, point, false);
        vol.on_commit = HookSlot(on_commit);
        {
            let mut a = vol.alloc.lock();
            a.mark_fixed_regions(&*vol.storage, &vol.keys())?;
        }
        let _gate = vol.exclusive();
        vol.commit_locked(true)?;
        drop(_gate);
        Ok(vol)
    }

    /// Opens the volume on `storage` with its volume key, replaying the write-ahead log.
    /// The same as [`Volume::open_with`] with only `read_only` set.
    ///
    /// Errors: `Corrupt`/`Unsupported` (not a qvol image, or a version or suite this build
    /// does not know), `WrongKey`, `Integrity` (tampered superblocks, header or log).
    pub fn open(storage: Arc<dyn Storage>, key: &VolumeKey, read_only: bool) -> Result<Volume> {
        Volume::open_with(
            storage,
            key,
            OpenOptions {
                read_only,
                ..OpenOptions::default()
            },
        )
    }

    /// Opens the volume on `storage` with its volume key (FORMAT.md §9, open order): checks
    /// the header and the key, chooses the superblock, hands its commit point to
    /// `opts.check`, and only if that accepts it replays the log and (writable) commits.
    ///
    /// Errors: those of [`Volume::open`], and `Refused` (with the check's error as source)
    /// when the check refuses: then nothing was written.
    pub fn open_with(
        storage: Arc<dyn Storage>,
        key: &VolumeKey,
        opts: OpenOptions,
    ) -> Result<Volume> {
        let read_only = opts.read_only;
        let (header, area) = read_header_area(&*storage)?;
        let (sb, root_id, keys) = match pick_superblock(&*storage, key, &header) {
            Ok(picked) => picked,
            Err(e) => {
                let mine = Subkeys::derive(key, header.suite, header.volume_id);
                if blake3::Hash::from(mine.key_check()) != blake3::Hash::from(header.key_check) {
                    return Err(Error::new(
                        ErrorKind::WrongKey,
                        format!("the key does not open volume {}", hex_id(&header.volume_id)),
                    ));
                }
                return Err(e);
            }
        };
        let slot_area = match SlotArea::choose(&*storage, &area, &sb) {
            Err(e) if opts.accept_any_keyslot_area && e.kind() == ErrorKind::Integrity => {
                SlotArea::as_found(&area, &sb)
            }
            other => other?,
        };
        if let Some((index, blob)) = &opts.unlocked_slot {
            if slot_area.slot(*index).as_deref() != Some(blob.as_slice()) {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!(
                        "keyslot {index} unlocked volume {} but is not in its committed keyslot \
                         area",
                        hex_id(&header.volume_id)
                    ),
                ));
            }
        }
        let blocks = header.size / BLOCK_SIZE;
        // A tree may be taller than the size needs (grown before a resize changed the
        // header, FORMAT.md §16), never shorter.
        if sb.map_height < tree_height(blocks, FANOUT)
            || sb.space_height < AllocState::height_for(space_capacity(header.regions(), blocks))
        {
            return Err(Error::corrupt(
                "the superblock's tree heights do not fit the volume size",
            ));
        }
        if sb.compress.is_some() && header.units().is_none() {
            return Err(Error::corrupt(
                "the superblock turns compression on for a volume without compression units",
            ));
        }
        let point = CommitPoint {
            generation: sb.generation,
            root_id,
        };
        if let Some(check) = opts.check {
            check(&point).map_err(|e| {
                Error::with_source(
                    ErrorKind::Refused,
                    format!(
                        "volume {} at generation {} was refused by the caller's check",
                        hex_id(&header.volume_id),
                        point.generation
                    ),
                    e,
                )
            })?;
        }
        // A staged header (an interrupted upgrade) is the header that counts.
        let header = slot_area.header()?;
        if opts.snapshot.is_some() && !read_only {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "a snapshot can only be opened read-only",
            ));
        }
        let (list, table_blocks) = load_table(&*storage, &keys, &sb.snapshots, sb.snap_epoch)?;
        let view = match &opts.snapshot {
            None => None,
            Some(name) => Some(list.iter().find(|s| &s.name == name).cloned().ok_or_else(
                || {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!("the volume has no snapshot named {name:?}"),
                    )
                },
            )?),
        };
        let snaps = Snapshots::new(sb.snap_epoch, sb.snapshots, list, table_blocks);
        let mut vol = Volume::assemble(storage, keys, header, slot_area, sb, point, read_only);
        vol.snaps = snaps;
        vol.on_commit = HookSlot(opts.on_commit);
        if let Some(s) = view {
            vol.map.reset(s.map_height, s.root);
            return Ok(vol);
        }
        if !read_only {
            // Finishes (or undoes) a keyslot change a crash interrupted, before anything
            // else can be allocated over its staged copy (FORMAT.md §3.1).
            vol.settle_keyslots()?;
        }
        vol.replay()?;
        if !read_only {
            // Always, even with an empty log: each writable session then extends its own
            // superblock, so log records of two sessions that started from one commit
            // (bound to the same superblock MAC) can never be mixed (FORMAT.md §9).
            let _gate = vol.exclusive();
            vol.commit_locked(true)?;
        }
        Ok(vol)
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        keys: Subkeys,
        header: Header,
        slots: SlotArea,
        sb: Superblock,
        point: CommitPoint,
        read_only: bool,
    ) -> Volume {
        let blocks = header.size / BLOCK_SIZE;
        let regions = header.regions();
        let anchor = header.binds_log().then_some(point.root_id);
        let compress = sb.compress.map_or(NO_COMPRESSION, i32::from);
        Volume {
            storage,
            map: BlockMap::new(sb.map_height, sb.map_root, header.units()),
            alloc: Allocator::new(
                sb.space_height,
                sb.space_root,
                regions.data_start_block(),
                // Never below the high-water mark: blocks allocated before a shrink (or
                // by a growth a crash cut short) stay in range (FORMAT.md §16).
                space_capacity(regions, blocks).max(sb.high_water),
                sb.allocated_blocks,
                sb.high_water,
            ),
            wal: Wal::new(
                regions.log_slots(),
                sb.log_epoch,
                0,
                anchor,
                header.two_log_areas(),
            ),
            snaps: Snapshots::default(),
            rekey: Mutex::new(sb.rekey.clone()),
            keys: RwLock::new(Arc::new(keys)),
            header,
            slots: Mutex::new(slots),
            read_only,
            gate: RwLock::new(()),
            writer: Mutex::new(()),
            sb: Mutex::new(sb),
            point: Arc::new(Mutex::new(point)),
            inflight: Mutex::new(None),
            on_commit: HookSlot::default(),
            failed: Arc::new(AtomicBool::new(false)),
            sync_lock: Arc::new(Mutex::new(())),
            size: AtomicU64::new(blocks * BLOCK_SIZE),
            writeback: Default::default(),
            gather: Default::default(),
            claims: Default::default(),
            compress: AtomicI32::new(compress),
        }
    }

    /// The subkeys in force.
    pub(crate) fn keys(&self) -> Arc<Subkeys> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `keys` in force (gate held exclusively).
    pub(crate) fn set_keys(&self, keys: Subkeys) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    /// The virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The virtual disk size in logical blocks.
    pub(crate) fn blocks(&self) -> u64 {
        self.size() / BLOCK_SIZE
    }

    /// The commit point of the last durable commit (that of the superblock chosen at open,
    /// or of the latest commit since).
    pub fn commit_point(&self) -> CommitPoint {
        *self.point.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the volume was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// A description of the volume (no secrets).
    pub fn info(&self) -> VolumeInfo {
        let generation = self.superblock().generation;
        VolumeInfo {
            format_version: self.header.version,
            name: self.header.name.clone(),
            volume_id: self.header.volume_id,
            size: self.size(),
            suite: self.keys().data_suite(),
            implementation: self.keys().data_suite().implementation(),
            generation,
            allocated_bytes: self.alloc.lock().used() * BLOCK_SIZE,
            keyslot_count: self.keyslots().iter().filter(|s| !s.is_empty()).count(),
            read_only: self.read_only,
            log_records: self.wal.next(),
            unit_bytes: self.header.unit_bytes(),
            compress_level: self.compress_level(),
        }
    }

    /// Makes every write completed so far durable against power loss (`fdatasync`).
    pub fn flush(&self) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Ok(());
        }
        let _gate = self.shared();
        // A commit in flight needs no waiting for (FORMAT.md §10.1); one that is done is
        // tidied up.
        self.reap(false)?;
        let upto = self.wal.written();
        self.sync()
            .map_err(|e| self.fail(Error::io("cannot sync the image (flush)", e)))?;
        self.wal.set_durable(upto);
        self.wal
            .write_mark(&*self.storage, &self.keys())
            .map_err(|e| self.fail(e))
    }

    /// Writes the block map and space map back and starts a new log (see FORMAT.md §10).
    /// Durable on return. Happens by itself when the log fills and on close.
    pub fn commit(&self) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Ok(());
        }
        let _gate = self.exclusive();
        self.commit_locked(false)
    }

    /// Starts a commit and returns as soon as writers can go on (format version 6; FORMAT.md
    /// §10.1): the new nodes are written, the next log epoch started, and a thread of the
    /// commit's own makes its superblock durable; [`Volume::commit_point`] and the commit
    /// hook say when it is. What the commit covers is safe against kill -9 on return, as
    /// every acknowledged write is. Before version 6, the same as [`Volume::commit`].
    pub fn commit_async(&self) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Ok(());
        }
        let _gate = self.exclusive();
        self.commit_pipelined()
    }

    /// Commits and syncs, then closes the volume.
    pub fn close(self) -> Result<()> {
        self.commit()?;
        if !self.read_only {
            self.sync()
                .map_err(|e| self.fail(Error::io("cannot sync the image while closing it", e)))?;
        }
        Ok(())
    }

    /// Syncs the storage, one sync at a time, and never reports success after a sync of
    /// this volume failed ([`crate::commit::sync_guarded`]).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        crate::commit::sync_guarded(&*self.storage, &self.sync_lock, &self.failed)
    }

    pub(crate) fn superblock(&self) -> MutexGuard<'_, Superblock> {
        self.sb.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn exclusive(&self) -> Exclusive<'_> {
        self.exclusive_after(self.no_commits())
    }

    /// Keeps every commit (and everything else that takes the gate exclusively) away while
    /// I/O goes on: the committed trees stay as they are.
    pub(crate) fn no_commits(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate taken exclusively by the holder of [`Volume::no_commits`]: nothing committed
    /// in between.
    pub(crate) fn exclusive_after<'a>(&'a self, writer: MutexGuard<'a, ()>) -> Exclusive<'a> {
        Exclusive {
            _gate: self.gate.write().unwrap_or_else(|p| p.into_inner()),
            _writer: writer,
        }
    }

    /// Fails with `PreviousIo` after an earlier write or sync failed.
    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::PreviousIo,
                "an earlier write or sync of this volume failed; reopen it",
            ));
        }
        Ok(())
    }

    /// Marks the volume failed (after a write or sync error) and returns `e`.
    pub(crate) fn fail(&self, e: Error) -> Error {
        self.failed.store(true, Ordering::Release);
        e
    }
}

impl Drop for Volume {
    /// Waits for a commit in flight: its thread writes to the storage, and whoever opens
    /// the storage next must find it finished (or cut by a crash, never running).
    fn drop(&mut self) {
        let inflight = self.inflight.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = inflight.take() {
            let _ = f.wait();
        }
    }
}

/// Reads both superblocks and returns the valid one with the highest generation, and its MAC.
/// Chooses the superblock to open (FORMAT.md §8): of the copies whose MAC verifies and whose
/// generation's parity matches their position, the one with the highest generation. A copy
/// written while a re-encryption is in progress (FORMAT.md §17) is MAC'd under the new key:
/// a holder of the old key finds the new one sealed for it in that copy's record. Returns it
/// with its MAC and the subkeys of its key epoch.
fn pick_superblock(
    storage: &dyn Storage,
    key: &VolumeKey,
    header: &Header,
) -> Result<(Superblock, [u8; 32], Subkeys)> {
    let vid = header.volume_id;
    let mine = Subkeys::derive(key, header.suite, vid);
    let mut best: Option<(Superblock, [u8; 32], VolumeKey)> = None;
    for (i, &off) in SUPERBLOCK_OFFSETS.iter().enumerate() {
        let mut b = [0u8; SUPERBLOCK_LEN];
        storage
            .read_exact_at(&mut b, off)
            .map_err(|e| Error::io(format!("cannot read superblock {}", ["A", "B"][i]), e))?;
        let Ok(sb) = Superblock::decode(&b) else {
            continue;
        };
        // Commit g writes copy g % 2: a copy elsewhere was moved there.
        if sb.generation % 2 != i as u64
            || best
                .as_ref()
                .is_some_and(|b| b.0.generation >= sb.generation)
        {
            continue;
        }
        let under = if Superblock::mac_verifies(&b, &mine) {
            Some(key.clone())
        } else {
            sb.rekey
                .as_ref()
                .and_then(|r| crate::reencrypt::open_key_for_prev(&mine, &vid, sb.key_epoch, r))
                .filter(|k| Superblock::mac_verifies(&b, &Subkeys::derive(k, header.suite, vid)))
        };
        if let Some(k) = under {
            best = Some((sb, Superblock::mac_of(&b), k));
        }
    }
    let (sb, mac, cur) = best.ok_or_else(|| {
        Error::integrity("neither superblock verifies: the image was tampered with or destroyed")
    })?;
    let keys = crate::reencrypt::subkeys_of(&cur, header, &sb)?;
    Ok((sb, mac, keys))
}

pub(crate) fn hex_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
