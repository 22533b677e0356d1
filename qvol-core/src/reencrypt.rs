//! Re-encryption under a new, independent volume key (docs/FORMAT.md §17): the start
//! switches every map node, the superblocks and the log to the new key in one crash-safe
//! header change; steps then re-seal the data blocks of the live disk and of every snapshot,
//! a range of logical blocks at a time, each step one commit; the finish drops the old key
//! from the image and punches every free block.

use crate::datablock::reseal_block;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{encode_keyslots, Header};
use crate::key::VolumeKey;
use crate::keyslots::{join, same};
use crate::layout::*;
use crate::node::{LeafEntry, NodePtr, TreeKind};
use crate::rewrite::{Change, Copies, Rewrite};
use crate::subkeys::{Subkeys, SEALED_KEY_LEN};
use crate::suite::CipherSuite;
use crate::superblock::{RekeyRecord, Superblock};
use crate::tree::{read_node, PageWriter, TreeCache};
use crate::volume::Volume;
use std::collections::HashMap;

/// Associated data of the previous epoch's data key in the record (FORMAT.md §17).
const DATA_KEY_LABEL: &[u8] = b"qvol-rekey-data-v5";
/// Associated data of the current volume key in the record.
const VOLUME_KEY_LABEL: &[u8] = b"qvol-rekey-key-v5";
/// Associated data of a new key handed to a serving process.
const TRANSFER_LABEL: &[u8] = b"qvol-rekey-transfer-v5";
/// Map leaves read (without re-sealing anything) at most per step, so that a step over a
/// disk already under the new key still ends soon.
const SCAN_PER_STEP: u64 = 4096;
/// Free runs at least this many blocks long are punched at the end, shorter ones zeroed.
const ERASE_PUNCH_FROM: u64 = 64;

/// A re-encryption in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reencryption {
    /// The key epoch the data is moving away from.
    pub from_epoch: u32,
    /// The key epoch new data (and every re-sealed block) is under.
    pub to_epoch: u32,
    /// The suite of the old key epoch.
    pub from_suite: CipherSuite,
    /// The suite of the new key epoch.
    pub to_suite: CipherSuite,
    /// Map leaves done: every logical block below `done * 64` is under the new key in the
    /// live disk and every snapshot.
    pub done: u64,
    /// Map leaves in all (the disk size in units of 64 logical blocks, 256 KiB).
    pub total: u64,
    /// Bytes of data the step that returned this re-sealed (0 from
    /// [`Volume::reencryption`]).
    pub step_bytes: u64,
}

/// Bytes of logical disk one map leaf covers.
pub const LEAF_SPAN_BYTES: u64 = FANOUT * BLOCK_SIZE;

impl Reencryption {
    /// Bytes of the disk done.
    pub fn done_bytes(&self) -> u64 {
        self.done.min(self.total) * LEAF_SPAN_BYTES
    }

    /// Bytes of the disk in all.
    pub fn total_bytes(&self) -> u64 {
        self.total * LEAF_SPAN_BYTES
    }
}

/// `label || volume id || u32le(a) || u32le(b)`.
fn key_ad(label: &[u8], volume_id: &[u8; 16], a: u32, b: u32) -> Vec<u8> {
    let mut ad = Vec::with_capacity(label.len() + 24);
    ad.extend_from_slice(label);
    ad.extend_from_slice(volume_id);
    ad.extend_from_slice(&a.to_le_bytes());
    ad.extend_from_slice(&b.to_le_bytes());
    ad
}

fn transfer_ad(volume_id: &[u8; 16], nonce: &[u8; 16], slots: &[u8]) -> Vec<u8> {
    let mut ad = key_ad(TRANSFER_LABEL, volume_id, 0, 0);
    ad.extend_from_slice(nonce);
    ad.extend_from_slice(blake3::hash(slots).as_bytes());
    ad
}

/// The volume key of the current epoch of a superblock whose record is `r`, opened with the
/// previous epoch's keys `prev` (a holder of the old key finds the new one, FORMAT.md §17).
pub(crate) fn open_key_for_prev(
    prev: &Subkeys,
    volume_id: &[u8; 16],
    key_epoch: u32,
    r: &RekeyRecord,
) -> Option<VolumeKey> {
    let ad = key_ad(VOLUME_KEY_LABEL, volume_id, key_epoch, r.prev_epoch);
    prev.open_key(&ad, &r.key_for_prev)
        .map(|k| VolumeKey::from_bytes(*k))
}

/// The subkeys of `sb`'s key epoch from its volume key `key`: with the previous epoch's data
/// key while a re-encryption is in progress.
pub(crate) fn subkeys_of(key: &VolumeKey, header: &Header, sb: &Superblock) -> Result<Subkeys> {
    let suite_of = |id: u16| {
        CipherSuite::from_id(id)
            .ok_or_else(|| Error::corrupt("the re-encryption record names an unknown suite"))
    };
    let suite = match &sb.rekey {
        Some(r) => suite_of(r.suite)?,
        None => header.suite,
    };
    let keys = Subkeys::derive_epoch(key, suite, header.volume_id, sb.key_epoch)
        .with_portable_nodes(header.portable_nodes());
    let Some(r) = &sb.rekey else {
        return Ok(keys);
    };
    let ad = key_ad(
        DATA_KEY_LABEL,
        &header.volume_id,
        r.prev_epoch,
        sb.key_epoch,
    );
    let data_key = keys.open_key(&ad, &r.prev_data_key).ok_or_else(|| {
        Error::integrity(
            "the re-encryption record's old data key does not open under the volume key",
        )
    })?;
    Ok(keys.with_previous(r.prev_epoch, suite_of(r.prev_suite)?, &data_key))
}

/// `new_key` sealed under `current` (the volume's key now) for a process serving the volume:
/// what [`Volume::start_reencryption_sealed`] takes. `nonce` is a one-time value that process
/// issued; the seal also binds `slots` (the keyslots that will wrap `new_key`), so neither
/// can be swapped on the way.
pub fn seal_key_for_reencryption(
    current: &VolumeKey,
    volume_id: [u8; 16],
    nonce: &[u8; 16],
    slots: &[Vec<u8>],
    new_key: &VolumeKey,
) -> Result<Vec<u8>> {
    let keys = Subkeys::derive(current, CipherSuite::default(), volume_id);
    let area = encode_keyslots(slots)?;
    let sealed = keys.seal_key(&transfer_ad(&volume_id, nonce, &area), new_key.expose())?;
    Ok(sealed.to_vec())
}

impl Volume {
    /// The re-encryption in progress, if any.
    pub fn reencryption(&self) -> Option<Reencryption> {
        let record = self
            .rekey
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let keys = self.keys();
        let (from_epoch, from_suite) = keys.previous()?;
        Some(Reencryption {
            from_epoch,
            to_epoch: keys.epoch(),
            from_suite,
            to_suite: keys.data_suite(),
            done: record.done,
            total: self.blocks().div_ceil(FANOUT),
            step_bytes: 0,
        })
    }

    /// The suite new data is sealed with.
    pub fn data_suite(&self) -> CipherSuite {
        self.keys().data_suite()
    }

    /// Starts re-encrypting the volume under `new_key` (fresh, from
    /// [`VolumeKey::generate`]) with `suite`. `slots` replace the keyslot area and must wrap
    /// `new_key`; `expected` is [`Volume::keyslots_hash`] of the area they were planned from
    /// (`Refused` if it changed). Crash-safe: after a crash the volume opens under the old
    /// key and nothing changed, or it is re-encrypting. Writable volumes of format version 4
    /// or later; `InvalidInput` if a re-encryption is already in progress.
    ///
    /// Every map node is rewritten under the new key before this returns (I/O waits
    /// meanwhile: about the time to write a 64th of the data); the data follows in
    /// [`Volume::reencrypt_step`]s.
    pub fn start_reencryption(
        &self,
        new_key: &VolumeKey,
        suite: CipherSuite,
        slots: &[Vec<u8>],
        expected: &[u8; 32],
    ) -> Result<Reencryption> {
        self.check_usable()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the volume is open read-only; it cannot be re-encrypted",
            ));
        }
        if self.keys().epoch() >= KEY_EPOCH_MASK {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("a volume is re-encrypted at most {KEY_EPOCH_MASK} times"),
            ));
        }
        if !self.header.has_snapshots() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "re-encryption needs format version {SNAPSHOT_VERSION} or later; this image \
                     has version {} (run `qvol upgrade` first)",
                    self.header.version
                ),
            ));
        }
        let area = encode_keyslots(slots)?;
        if slots.iter().all(Vec::is_empty) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "no keyslot would open the volume after the re-encryption",
            ));
        }
        let _gate = self.exclusive();
        if let Some(r) = self.reencryption() {
            return Err(in_progress(&r));
        }
        if !same(&self.keyslots_hash(), expected) {
            return Err(Error::new(
                ErrorKind::Refused,
                "the keyslots (or the header) changed since they were read; read them again",
            ));
        }
        let old = self.keys();
        let epoch = old.epoch().checked_add(1).ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                "the volume has used up its 2^32 key epochs",
            )
        })?;
        let vid = *old.volume_id();
        let new = Subkeys::derive_epoch(new_key, suite, vid, epoch)
            .with_portable_nodes(old.portable_nodes());
        let record = RekeyRecord {
            prev_epoch: old.epoch(),
            prev_suite: old.data_suite().id(),
            suite: suite.id(),
            done: 0,
            prev_data_key: new.seal_key(
                &key_ad(DATA_KEY_LABEL, &vid, old.epoch(), epoch),
                &old.data_key(),
            )?,
            key_for_prev: old.seal_key(
                &key_ad(VOLUME_KEY_LABEL, &vid, epoch, old.epoch()),
                new_key.expose(),
            )?,
        };
        let new = new.with_previous(old.epoch(), old.data_suite(), &old.data_key());
        let header = Header {
            version: FORMAT_VERSION,
            key_epoch: epoch,
            suite,
            key_check: new.key_check(),
            ..self.slot_area().header()?
        };
        let new_area = join(&header.encode()?[..], &area);
        self.commit_locked(true)?;
        let margin = self
            .switch_keys(&old, new, record)
            .map_err(|e| self.fail(e))?;
        self.stage_and_switch(new_area, margin)?;
        log::info!(
            "re-encryption started: key epoch {} ({}) to {epoch} ({suite})",
            old.epoch(),
            old.data_suite()
        );
        self.reencryption()
            .ok_or_else(|| Error::corrupt("internal: the re-encryption did not start"))
    }

    /// The start, right after a commit (gate held exclusively): every map node rewritten
    /// under `new`, the space tree and the snapshot table made to follow at the next commit,
    /// `new` put in force with `record`. Returns the most blocks that commit allocates.
    fn switch_keys(&self, old: &Subkeys, new: Subkeys, record: RekeyRecord) -> Result<u64> {
        let st = &*self.storage;
        let mut a = self.alloc.lock();
        let (live, roots, _) =
            self.rewrite_maps(Rewrite::new(st, old, &new, Change::AllNodes, &mut a))?;
        let space_nodes = a.dirty_all(st, old)?;
        drop(a);
        self.install_maps(live, &roots);
        self.set_keys(new);
        *self.rekey.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
        let table_blocks = (crate::snapshot::MAX_SNAPSHOTS / crate::snapshot::PER_BLOCK) as u64;
        Ok(space_nodes + table_blocks + 8)
    }

    /// Rewrites the committed live map and every snapshot's with `rw` (right after a commit,
    /// gate held exclusively). Returns the new roots (live, then the snapshots in table order)
    /// and the data blocks re-sealed.
    fn rewrite_maps(&self, mut rw: Rewrite<'_>) -> Result<(NodePtr, Vec<NodePtr>, u64)> {
        let (live, height) = self.committed_live();
        let live = rw.map(height, live)?;
        let roots = self
            .snapshots()
            .iter()
            .map(|s| rw.map(s.map_height, s.root))
            .collect::<Result<Vec<_>>>()?;
        Ok((live, roots, rw.finish()?))
    }

    /// Puts rewritten roots in force; the next commit writes them.
    fn install_maps(&self, live: NodePtr, snapshots: &[NodePtr]) {
        self.map.reset(self.committed_live().1, live);
        self.set_snapshot_roots(snapshots);
    }

    /// [`Volume::start_reencryption`] for a caller that is not trusted with the volume: the
    /// new key comes sealed by [`seal_key_for_reencryption`] with `nonce` (which the caller
    /// of this method issued and now retires); `Refused` unless it opens under this volume's
    /// key with these `slots`.
    pub fn start_reencryption_sealed(
        &self,
        sealed: &[u8],
        nonce: &[u8; 16],
        suite: CipherSuite,
        slots: &[Vec<u8>],
        expected: &[u8; 32],
    ) -> Result<Reencryption> {
        let area = encode_keyslots(slots)?;
        let keys = self.keys();
        let refused = || {
            Error::new(
                ErrorKind::Refused,
                "the new key is not sealed with this volume's key for these keyslots",
            )
        };
        let sealed = <[u8; SEALED_KEY_LEN]>::try_from(sealed).map_err(|_| refused())?;
        let key = keys
            .open_key(&transfer_ad(keys.volume_id(), nonce, &area), &sealed)
            .ok_or_else(refused)?;
        let key = VolumeKey::from_bytes(*key);
        drop(keys);
        self.start_reencryption(&key, suite, slots, expected)
    }

    /// Re-seals the data of up to `max_leaves` map leaves (64 logical blocks each) of the live
    /// disk and of every snapshot, in one commit, and finishes the re-encryption once
    /// everything is done. Returns the progress, or `None` when the re-encryption is
    /// finished (by this call). I/O waits meanwhile. `InvalidInput` if none is in progress.
    pub fn reencrypt_step(&self, max_leaves: u64) -> Result<Option<Reencryption>> {
        self.check_usable()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the volume is open read-only; its re-encryption cannot go on",
            ));
        }
        {
            // No commit until this step is installed: the committed maps stay as they are
            // while the data is re-sealed next to the guest's I/O.
            let writer = self.no_commits();
            let Some(r) = self.reencryption() else {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "the volume is not being re-encrypted: nothing to resume",
                ));
            };
            if r.done < r.total {
                let (end, copies) =
                    self.seal_copies(r.from_epoch, r.done, r.total, max_leaves.max(1))?;
                let _gate = self.exclusive_after(writer);
                let resealed = self
                    .install_step(r.from_epoch, r.done..end, copies)
                    .map_err(|e| self.fail(e))?;
                self.commit_locked(true)?;
                if end < r.total {
                    return Ok(self.reencryption().map(|p| Reencryption {
                        step_bytes: resealed * BLOCK_SIZE,
                        ..p
                    }));
                }
            }
        }
        self.erase_free_blocks()?;
        let _gate = self.exclusive();
        if self.reencryption().is_some_and(|r| r.done >= r.total) {
            self.finish_reencryption()?;
        }
        Ok(None)
    }

    /// A step, first part (commits kept away by [`Volume::no_commits`], I/O going on): from
    /// map leaf `done`, a re-sealed copy of every block of key epoch `from` that a committed
    /// map holds, written to a new block, by (logical block, old block), until `budget`
    /// leaves held such blocks, [`SCAN_PER_STEP`] leaves were read, or leaf `total` (absent
    /// subtrees are skipped whole). Returns where the step ends and the copies, which are
    /// allocated but referenced by nothing yet; on an error they are freed again.
    fn seal_copies(&self, from: u32, done: u64, total: u64, budget: u64) -> Result<(u64, Copies)> {
        let mut copies = HashMap::new();
        let sealed = self.seal_copies_into(from, done, total, budget, &mut copies);
        if sealed.is_err() {
            let keys = self.keys();
            let mut a = self.alloc.lock();
            for e in copies.values() {
                for pbn in e.pbn..e.pbn + u64::from(e.k.max(1)) {
                    a.free_unused(&*self.storage, &keys, pbn)?;
                }
            }
        }
        sealed.map(|end| (end, copies))
    }

    fn seal_copies_into(
        &self,
        from: u32,
        done: u64,
        total: u64,
        budget: u64,
        copies: &mut Copies,
    ) -> Result<u64> {
        let st = &*self.storage;
        let keys = self.keys();
        let suite = keys.data_suite();
        let mut maps = self.map_views();
        let mut seen = Vec::new();
        let mut out = PageWriter::new(st);
        let mut buf = vec![0u8; FANOUT as usize * BS];
        let (mut leaf, mut found, mut read) = (done, 0u64, 0u64);
        while leaf < total && found < budget && read < SCAN_PER_STEP {
            let mut skip = u64::MAX;
            let mut holds = false;
            seen.clear();
            for map in &mut maps {
                let (ptr, n) = map.probe_leaf(st, &keys, leaf)?;
                skip = skip.min(n);
                // A leaf shared by several maps is the same block in each (§7.1).
                if ptr.pbn == 0 || seen.contains(&ptr.pbn) {
                    continue;
                }
                seen.push(ptr.pbn);
                read += 1;
                let page = read_node(st, &keys, TreeKind::Map, 0, leaf, &ptr)?;
                let mut todo = Vec::new();
                for i in 0..FANOUT as usize {
                    let e = LeafEntry::decode(&page[..], i)?;
                    let lbn = leaf * FANOUT + i as u64;
                    if e.pbn == 0 || e.key_epoch != from {
                        continue;
                    }
                    if e.k > 0 {
                        // A unit: one copy for its group (FORMAT.md §18.3 rule 4).
                        let first = lbn - lbn % self.unit_blocks();
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            copies.entry((first, e.pbn))
                        {
                            holds = true;
                            slot.insert(self.seal_unit_copy(first, &e, &mut out)?);
                        }
                    } else if !copies.contains_key(&(lbn, e.pbn)) {
                        todo.push((lbn, e));
                    }
                }
                if todo.is_empty() {
                    continue;
                }
                holds = true;
                // Physically consecutive blocks are read with one call.
                todo.sort_by_key(|(_, e)| e.pbn);
                let nonces = crate::datablock::random_nonces(suite, todo.len())?;
                let nl = suite.nonce_len();
                let pbns = self.alloc.lock().alloc(st, &keys, todo.len())?;
                let mut i = 0;
                while i < todo.len() {
                    let mut j = i + 1;
                    while j < todo.len() && todo[j].1.pbn == todo[i].1.pbn + (j - i) as u64 {
                        j += 1;
                    }
                    let run = &mut buf[..(j - i) * BS];
                    if let Err(err) = st.read_exact_at(run, todo[i].1.pbn * BLOCK_SIZE) {
                        // Those not handed out yet; the caller frees the others.
                        self.free_copies(&pbns[i..])?;
                        return Err(Error::io(
                            format!("cannot read physical block {}", todo[i].1.pbn),
                            err,
                        ));
                    }
                    for (k, block) in run.chunks_exact_mut(BS).enumerate() {
                        let (lbn, e) = todo[i + k];
                        let nonce = &nonces[(i + k) * nl..(i + k + 1) * nl];
                        let sealed = reseal_block(&keys, &keys, lbn, &e, nonce, block);
                        let mut copy = match sealed {
                            Ok(copy) => copy,
                            Err(err) => {
                                // Those not handed out yet; the caller frees the others.
                                self.free_copies(&pbns[i + k..])?;
                                return Err(err);
                            }
                        };
                        copy.pbn = pbns[i + k];
                        copies.insert((lbn, e.pbn), copy);
                        out.push(copy.pbn, block)?;
                    }
                    i = j;
                }
            }
            found += u64::from(holds);
            leaf = leaf.saturating_add(skip.max(1)).min(total);
        }
        out.flush()?;
        // Synced now, next to the guest's I/O, so that the install's commit (which stops
        // I/O) has only its own nodes to sync.
        if !copies.is_empty() {
            self.sync()
                .map_err(|e| Error::io("cannot sync the re-sealed copies", e))?;
        }
        Ok(leaf.max(done + 1).min(total))
    }

    /// A copy of the unit `e` references (group from `first`), re-sealed under the current
    /// keys and queued on `out`, in blocks allocated for it.
    fn seal_unit_copy(
        &self,
        first: u64,
        e: &LeafEntry,
        out: &mut PageWriter<'_>,
    ) -> Result<LeafEntry> {
        let st = &*self.storage;
        let keys = self.keys();
        let log2_n = self.header.units().unwrap_or(0);
        let (mut copy, buf) = crate::group::reseal_unit(st, (&keys, &keys), log2_n, first, e)?;
        let k = u64::from(e.k);
        copy.pbn = self.alloc.lock().alloc_run_anywhere(st, &keys, k)?;
        let queued = buf
            .chunks_exact(BS)
            .enumerate()
            .try_for_each(|(i, block)| out.push(copy.pbn + i as u64, block));
        if let Err(err) = queued {
            self.free_copies(&(copy.pbn..copy.pbn + k).collect::<Vec<_>>())?;
            return Err(err);
        }
        Ok(copy)
    }

    /// Frees blocks allocated for copies that were never handed out.
    fn free_copies(&self, pbns: &[u64]) -> Result<()> {
        let keys = self.keys();
        let mut a = self.alloc.lock();
        for &pbn in pbns {
            a.free_unused(&*self.storage, &keys, pbn)?;
        }
        Ok(())
    }

    /// Views of the committed live map and of every snapshot's map.
    fn map_views(&self) -> Vec<TreeCache> {
        std::iter::once(self.committed_live())
            .chain(self.snapshots().iter().map(|s| (s.root, s.map_height)))
            .map(|(root, height)| TreeCache::new(TreeKind::Map, height, root))
            .collect()
    }

    /// A step, second part (gate held exclusively, nothing committed since the copies were
    /// sealed): commits what the guest wrote meanwhile (the copies are handed back to the
    /// allocator for that commit, which may reuse some, and taken back after it), then
    /// rewrites every map over leaves `leaves` to hold the copies, sealing any block the
    /// copies miss, installs the new roots and moves `done` to the range's end; the caller
    /// commits. Returns the blocks re-sealed.
    fn install_step(&self, from: u32, leaves: std::ops::Range<u64>, copies: Copies) -> Result<u64> {
        let st = &*self.storage;
        let keys = self.keys();
        {
            let mut a = self.alloc.lock();
            for e in copies.values() {
                for pbn in e.pbn..e.pbn + u64::from(e.k.max(1)) {
                    a.free_unused(st, &keys, pbn)?;
                }
            }
        }
        self.commit_locked(false)?;
        let mut kept = HashMap::with_capacity(copies.len());
        {
            let mut a = self.alloc.lock();
            'copies: for (k, e) in copies {
                // A unit's copy is kept only whole (its blocks are one AEAD message).
                let blocks = e.pbn..e.pbn + u64::from(e.k.max(1));
                for pbn in blocks.clone() {
                    if !a.try_claim(st, &keys, pbn)? {
                        for taken in blocks.start..pbn {
                            a.free_unused(st, &keys, taken)?;
                        }
                        continue 'copies;
                    }
                }
                kept.insert(k, e);
            }
        }
        let end = leaves.end;
        let mut a = self.alloc.lock();
        let rw = Rewrite::new(st, &keys, &keys, Change::Reseal { from, leaves }, &mut a)
            .with_units(self.header.units())
            .with_copies(kept);
        let (live, roots, resealed) = self.rewrite_maps(rw)?;
        drop(a);
        self.install_maps(live, &roots);
        if let Some(rec) = self
            .rekey
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            rec.done = end;
        }
        Ok(resealed)
    }

    /// Erases every free block of the file (every block under the new key by now, so what is
    /// free holds old ciphertext, old nodes, or nothing), a space-tree leaf's span (128 MiB
    /// of the file) at a time under the gate, so that I/O waits for one span at most. Blocks
    /// freed since the last commit are left (a crash could need them); they hold data under
    /// the new key.
    fn erase_free_blocks(&self) -> Result<()> {
        let (start, end) = {
            let a = self.alloc.lock();
            (a.data_start(), a.high_water())
        };
        let span = crate::layout::BITS_PER_SPACE_LEAF;
        let zeros = vec![0u8; ERASE_PUNCH_FROM as usize * BS];
        let mut at = start;
        while at < end {
            let _gate = self.exclusive();
            self.check_usable()?;
            let keys = self.keys();
            let runs = self
                .alloc
                .lock()
                .free_runs(&*self.storage, &keys, at..at + span)?;
            for (pbn, n) in runs {
                self.erase(pbn, n, &zeros)
                    .map_err(|e| self.fail(Error::io("cannot erase the old blocks", e)))?;
            }
            self.sync()
                .map_err(|e| self.fail(Error::io("cannot sync the erased blocks", e)))?;
            at += span;
        }
        Ok(())
    }

    /// The end (gate held exclusively, every block under the new key, free blocks erased):
    /// the old data key leaves the keys in force and, by two commits, both superblock
    /// copies. A crash before those commits finishes again.
    fn finish_reencryption(&self) -> Result<()> {
        let keys = self.keys();
        let header = self.slot_area().header()?;
        if !same(&header.key_check, &keys.key_check()) {
            return Err(Error::new(
                ErrorKind::Integrity,
                "the keyslot area in force does not wrap the new key (its staged copy was \
                 lost), so the re-encryption cannot drop the old one",
            ));
        }
        self.set_keys(keys.without_previous());
        *self.rekey.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.commit_locked(true)?;
        self.commit_locked(true)?;
        log::info!("re-encryption finished: key epoch {}", keys.epoch());
        Ok(())
    }

    /// Erases blocks `start .. start + n`: a long run is punched out of the file, a short one
    /// (or one the file system cannot punch) overwritten from `zeros`
    /// ([`ERASE_PUNCH_FROM`] blocks of zeros), which costs less than a punch's journal
    /// transaction. The caller syncs.
    fn erase(&self, start: u64, n: u64, zeros: &[u8]) -> std::io::Result<()> {
        let st = &*self.storage;
        if n >= ERASE_PUNCH_FROM && st.punch_hole(start * BLOCK_SIZE, n * BLOCK_SIZE).is_ok() {
            return Ok(());
        }
        let mut pbn = start;
        while pbn < start + n {
            let m = (start + n - pbn).min(ERASE_PUNCH_FROM);
            st.write_all_at(&zeros[..m as usize * BS], pbn * BLOCK_SIZE)?;
            pbn += m;
        }
        Ok(())
    }
}

fn in_progress(r: &Reencryption) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "the volume is already being re-encrypted ({}% done); resume it instead",
            r.done * 100 / r.total.max(1)
        ),
    )
}
