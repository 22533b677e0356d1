//! [`Volume`]: create, open, flush, commit, info, close. Reads and writes are in
//! [`crate::rw`], the commit in [`crate::commit`], log replay in [`crate::replay`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::alloc::{space_capacity, AllocState, Allocator};
use crate::error::{Error, ErrorKind, Result};
use crate::header::{decode_keyslots, encode_keyslots, read_header_area, Header};
use crate::info::{CreateOptions, VolumeInfo};
use crate::key::VolumeKey;
use crate::layout::*;
use crate::map::BlockMap;
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::superblock::{Superblock, SUPERBLOCK_LEN};
use crate::wal::Wal;

/// An open qvol volume. `Send + Sync`: share it as `Arc<Volume>` between queue threads.
///
/// Every acknowledged write is in the write-ahead log (kill -9 safe); [`Volume::flush`]
/// makes everything acknowledged so far durable against power loss.
#[derive(Debug)]
pub struct Volume {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) keys: Subkeys,
    pub(crate) header: Header,
    pub(crate) keyslot_count: usize,
    pub(crate) header_hash: [u8; 32],
    pub(crate) read_only: bool,
    /// Operations hold it shared; a commit holds it exclusively (no reader sees a block
    /// reused under it).
    pub(crate) gate: RwLock<()>,
    pub(crate) map: BlockMap,
    pub(crate) alloc: Allocator,
    pub(crate) wal: Wal,
    pub(crate) sb: Mutex<Superblock>,
    pub(crate) failed: AtomicBool,
    /// Logical blocks.
    pub(crate) blocks: u64,
}

impl Volume {
    /// Creates a volume on `storage` (whose previous content is discarded) and opens it.
    pub fn create(
        storage: Arc<dyn Storage>,
        opts: CreateOptions,
        key: &VolumeKey,
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
        let keys = Subkeys::derive(key, opts.suite, opts.volume_id);
        let header = Header {
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
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header_block);
        hasher.update(&slots);
        let blocks = size / BLOCK_SIZE;
        let capacity = space_capacity(header.regions(), blocks);
        let sb = Superblock {
            map_height: tree_height(blocks, FANOUT),
            space_height: AllocState::height_for(capacity),
            header_hash: *hasher.finalize().as_bytes(),
            ..Superblock::default()
        };
        let vol = Volume::assemble(storage, keys, header, opts.keyslots.len(), sb, false);
        {
            let mut a = vol.alloc.lock();
            a.mark_fixed_regions(&*vol.storage, &vol.keys)?;
        }
        let _gate = vol.exclusive();
        vol.commit_locked(true)?;
        drop(_gate);
        Ok(vol)
    }

    /// Opens the volume on `storage` with its volume key, replaying the write-ahead log.
    ///
    /// Errors: `Corrupt`/`Unsupported` (not a qvol image, or a version or suite this build
    /// does not know), `WrongKey`, `Integrity` (tampered superblocks, header or log).
    pub fn open(storage: Arc<dyn Storage>, key: &VolumeKey, read_only: bool) -> Result<Volume> {
        let (header, area) = read_header_area(&*storage)?;
        let keyslot_count = decode_keyslots(&area[BS..])?.len();
        let keys = Subkeys::derive(key, header.suite, header.volume_id);
        if blake3::Hash::from(keys.key_check()) != blake3::Hash::from(header.key_check) {
            return Err(Error::new(
                ErrorKind::WrongKey,
                format!("the key does not open volume {}", hex_id(&header.volume_id)),
            ));
        }
        let header_hash = *blake3::hash(&area).as_bytes();
        let sb = pick_superblock(&*storage, &keys)?;
        if blake3::Hash::from(sb.header_hash) != blake3::Hash::from(header_hash) {
            return Err(Error::integrity(
                "the header or the keyslot area was changed after the last commit",
            ));
        }
        let blocks = header.size / BLOCK_SIZE;
        if sb.map_height != tree_height(blocks, FANOUT)
            || sb.space_height != AllocState::height_for(space_capacity(header.regions(), blocks))
        {
            return Err(Error::corrupt(
                "the superblock's tree heights do not fit the volume size",
            ));
        }
        let vol = Volume::assemble(storage, keys, header, keyslot_count, sb, read_only);
        let replayed = vol.replay()?;
        if replayed > 0 && !read_only {
            let _gate = vol.exclusive();
            vol.commit_locked(true)?;
        }
        Ok(vol)
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        keys: Subkeys,
        header: Header,
        keyslot_count: usize,
        sb: Superblock,
        read_only: bool,
    ) -> Volume {
        let blocks = header.size / BLOCK_SIZE;
        let regions = header.regions();
        Volume {
            storage,
            map: BlockMap::new(sb.map_height, sb.map_root),
            alloc: Allocator::new(
                sb.space_height,
                sb.space_root,
                regions.data_start_block(),
                space_capacity(regions, blocks),
                sb.allocated_blocks,
                sb.high_water,
            ),
            wal: Wal::new(regions.log_slots(), sb.log_epoch, 0),
            keys,
            header,
            keyslot_count,
            header_hash: sb.header_hash,
            read_only,
            gate: RwLock::new(()),
            sb: Mutex::new(sb),
            failed: AtomicBool::new(false),
            blocks,
        }
    }

    /// The virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
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
            size: self.header.size,
            suite: self.header.suite,
            implementation: self.header.suite.implementation(),
            generation,
            allocated_bytes: self.alloc.lock().used() * BLOCK_SIZE,
            keyslot_count: self.keyslot_count,
            read_only: self.read_only,
            log_records: self.wal.next(),
        }
    }

    /// Makes every write completed so far durable against power loss (`fdatasync`).
    pub fn flush(&self) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Ok(());
        }
        let _gate = self.shared();
        let upto = self.wal.written();
        self.storage
            .sync_data()
            .map_err(|e| self.fail(Error::io("cannot sync the image (flush)", e)))?;
        self.wal.set_durable(upto);
        Ok(())
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

    /// Commits and syncs, then closes the volume.
    pub fn close(self) -> Result<()> {
        self.commit()?;
        if !self.read_only {
            self.storage
                .sync_data()
                .map_err(|e| self.fail(Error::io("cannot sync the image while closing it", e)))?;
        }
        Ok(())
    }

    pub(crate) fn superblock(&self) -> MutexGuard<'_, Superblock> {
        self.sb.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
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

/// Reads both superblocks and returns the valid one with the highest generation.
fn pick_superblock(storage: &dyn Storage, keys: &Subkeys) -> Result<Superblock> {
    let mut best: Option<Superblock> = None;
    for (i, &off) in SUPERBLOCK_OFFSETS.iter().enumerate() {
        let mut b = [0u8; SUPERBLOCK_LEN];
        storage
            .read_exact_at(&mut b, off)
            .map_err(|e| Error::io(format!("cannot read superblock {}", ["A", "B"][i]), e))?;
        if let Some(sb) = Superblock::decode_verified(&b, keys) {
            // Commit g writes copy g % 2: a copy elsewhere was moved there.
            if sb.generation % 2 == i as u64
                && best.as_ref().is_none_or(|b| b.generation < sb.generation)
            {
                best = Some(sb);
            }
        }
    }
    best.ok_or_else(|| {
        Error::integrity("neither superblock verifies: the image was tampered with or destroyed")
    })
}

pub(crate) fn hex_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
