//! Changing the header area (the header block and the keyslot area) so that a crash at any
//! point leaves the old one or the new one (docs/FORMAT.md §3.1): the new area is staged
//! past the high-water mark, a commit names it, the area is rewritten in place, and a second
//! commit makes it the committed one. Opening picks whichever of the two the bytes on disk
//! and the MAC'd superblock agree on. Keyslot changes and format upgrades both go this way.

use crate::error::{Error, ErrorKind, Result};
use crate::failpoint;
use crate::header::{decode_header, decode_keyslots, encode_keyslots, read_staged, Header};
use crate::key::VolumeKey;
use crate::layout::*;
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::suite::CipherSuite;
use crate::superblock::Superblock;
use crate::volume::Volume;

/// The header area a volume accepted, and what its next commit says about it.
#[derive(Clone, Debug)]
pub(crate) struct SlotArea {
    /// The accepted header area: the header block (its exact bytes) and the keyslot area
    /// (36 KiB in all).
    area: Vec<u8>,
    /// `BLAKE3(area)`.
    area_hash: [u8; 32],
    /// The header hash the next commit writes (superblock offset 168).
    pub(crate) header_hash: [u8; 32],
    /// The staged area the next commit names (superblock offsets 216 and 224; 0 = none).
    pub(crate) staged_keyslots: u64,
    /// Its hash.
    pub(crate) staged_hash: [u8; 32],
}

pub(crate) fn hash_area(area: &[u8]) -> [u8; 32] {
    *blake3::hash(area).as_bytes()
}

/// A header area from a header block and a keyslot area.
pub(crate) fn join(header_block: &[u8], slots: &[u8]) -> Vec<u8> {
    let mut area = Vec::with_capacity(header_block.len() + slots.len());
    area.extend_from_slice(header_block);
    area.extend_from_slice(slots);
    area
}

/// Constant-time equality of two hashes.
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

impl SlotArea {
    /// The area of a new volume: committed as is, nothing staged.
    pub(crate) fn new(header_block: &[u8], slots: Vec<u8>) -> SlotArea {
        let area = join(header_block, &slots);
        let area_hash = hash_area(&area);
        SlotArea {
            area,
            area_hash,
            header_hash: area_hash,
            staged_keyslots: 0,
            staged_hash: [0; 32],
        }
    }

    /// The header area that `sb` (MAC-verified) vouches for, given the one read from disk.
    /// While a change is staged, the new area counts as soon as the superblock names it
    /// (FORMAT.md §3.1): the staged copy when it matches its hash, else the area on disk when
    /// it matches either hash (the staged copy was lost: it is the old one, or step 4 had
    /// completed). With nothing staged, the area on disk must match the committed hash.
    /// Anything else is `Integrity`. A staged header must keep the volume id, suite, key
    /// check, size and log of the one on disk (only its version may change: an upgrade).
    pub(crate) fn choose(
        storage: &dyn Storage,
        header_area: &[u8],
        sb: &Superblock,
    ) -> Result<SlotArea> {
        let on_disk = hash_area(header_area);
        let mut chosen = SlotArea {
            area: header_area.to_vec(),
            area_hash: on_disk,
            header_hash: sb.header_hash,
            staged_keyslots: sb.staged_keyslots,
            staged_hash: sb.staged_hash,
        };
        if sb.staged_keyslots != 0 {
            if let Ok(staged) = read_staged(storage, sb) {
                compatible(&header_area[..BS], &staged[..BS], sb.rekey.is_some())?;
                chosen.area = staged;
                chosen.area_hash = sb.staged_hash;
                return Ok(chosen);
            }
            if same(&on_disk, &sb.header_hash) || same(&on_disk, &sb.staged_hash) {
                return Ok(chosen);
            }
            return Err(Error::integrity(
                "the header area matches neither the committed nor the staged one, and the \
                 staged copy is gone",
            ));
        }
        if same(&on_disk, &sb.header_hash) {
            return Ok(chosen);
        }
        Err(Error::integrity(
            "the header or the keyslot area was changed after the last commit",
        ))
    }

    /// The area on disk as it is, whatever the superblock says (see
    /// `OpenOptions::accept_any_keyslot_area`).
    pub(crate) fn as_found(header_area: &[u8], sb: &Superblock) -> SlotArea {
        SlotArea {
            area: header_area.to_vec(),
            area_hash: hash_area(header_area),
            header_hash: sb.header_hash,
            staged_keyslots: sb.staged_keyslots,
            staged_hash: sb.staged_hash,
        }
    }

    /// `BLAKE3` of the accepted area.
    pub(crate) fn area_hash(&self) -> [u8; 32] {
        self.area_hash
    }

    /// The accepted header.
    pub(crate) fn header(&self) -> Result<Header> {
        decode_header(&self.area[..BS])
    }

    /// Slot `index` (empty = free), if the area decodes.
    pub(crate) fn slot(&self, index: usize) -> Option<Vec<u8>> {
        self.slots().ok()?.get(index).cloned()
    }

    /// The 8 slots (empty = free).
    fn slots(&self) -> Result<Vec<Vec<u8>>> {
        decode_keyslots(&self.area[BS..])
    }
}

/// A staged header may differ from the one in place only in its version (an upgrade, never
/// down) and its size (a resize, FORMAT.md §16), and, when the superblock naming it records a
/// re-encryption (`rekeying`), in its suite and key check (FORMAT.md §17).
fn compatible(in_place: &[u8], staged: &[u8], rekeying: bool) -> Result<()> {
    let b = decode_header(staged)?;
    let Ok(a) = decode_header(in_place) else {
        // Torn while the staged area was written over it (step 4): nothing to compare with;
        // the staged copy is the one a MAC'd superblock vouches for.
        return Ok(());
    };
    let same_volume = a.volume_id == b.volume_id
        && (rekeying || (a.suite == b.suite && a.key_check == b.key_check))
        && a.log_len == b.log_len
        && a.features == b.features
        && a.unit_log2 == b.unit_log2
        && b.version >= a.version;
    if !same_volume {
        return Err(Error::integrity(
            "the staged header describes another volume than the one in place",
        ));
    }
    Ok(())
}

/// Label of [`keyslot_change_proof`].
const CHANGE_PROOF_LABEL: &[u8] = b"qvol-keyslot-change-v1";

fn change_proof(keys: &Subkeys, nonce: &[u8; 16], expected: &[u8; 32], area: &[u8]) -> [u8; 32] {
    let mut h = keys.meta_mac();
    h.update(CHANGE_PROOF_LABEL);
    h.update(keys.volume_id());
    h.update(nonce);
    h.update(expected);
    h.update(area);
    *h.finalize().as_bytes()
}

/// A MAC, under the volume's metadata key, of a proposed keyslot area (`slots` as
/// [`Volume::set_keyslots`] takes them), of the hash of the area it replaces (`expected`,
/// [`Volume::keyslots_hash`]) and of a one-time `nonce` the serving process chose: what a
/// process serving the volume asks of whoever wants to change its keyslots through it, as
/// proof that they hold the volume key. The serving process uses each nonce once, so a
/// recorded request cannot be replayed, even onto a state that came back.
pub fn keyslot_change_proof(
    key: &VolumeKey,
    suite: CipherSuite,
    volume_id: [u8; 16],
    nonce: &[u8; 16],
    expected: &[u8; 32],
    slots: &[Vec<u8>],
) -> Result<[u8; 32]> {
    let area = encode_keyslots(slots)?;
    Ok(change_proof(
        &Subkeys::derive(key, suite, volume_id),
        nonce,
        expected,
        &area,
    ))
}

/// Label of [`key_holder_proof`].
const HOLDER_PROOF_LABEL: &[u8] = b"qvol-key-holder-v1";

fn holder_proof(keys: &Subkeys, challenge: &[u8; 32]) -> [u8; 32] {
    let mut h = keys.meta_mac();
    h.update(HOLDER_PROOF_LABEL);
    h.update(keys.volume_id());
    h.update(challenge);
    *h.finalize().as_bytes()
}

/// Whether `proof` is [`key_holder_proof`] of `challenge` (compared in constant time).
pub fn key_holder_proof_matches(
    key: &VolumeKey,
    suite: CipherSuite,
    volume_id: [u8; 16],
    challenge: &[u8; 32],
    proof: &[u8],
) -> bool {
    <[u8; 32]>::try_from(proof)
        .is_ok_and(|p| same(&key_holder_proof(key, suite, volume_id, challenge), &p))
}

/// A MAC of a client's random `challenge` under the volume's metadata key: a process serving
/// the volume answers it ([`Volume::prove_key`]) so that a client holding the key knows it
/// talks to a holder of the key, before it sends anything.
pub fn key_holder_proof(
    key: &VolumeKey,
    suite: CipherSuite,
    volume_id: [u8; 16],
    challenge: &[u8; 32],
) -> [u8; 32] {
    holder_proof(&Subkeys::derive(key, suite, volume_id), challenge)
}

impl Volume {
    /// `BLAKE3(header block || keyslot area)` of the slots [`Volume::keyslots`] returns: a
    /// caller changing them names it, so that two changes cannot overwrite each other.
    pub fn keyslots_hash(&self) -> [u8; 32] {
        self.slot_area().area_hash
    }

    /// [`Volume::keyslots`] and [`Volume::keyslots_hash`] of one and the same state.
    pub fn keyslots_with_hash(&self) -> (Vec<Vec<u8>>, [u8; 32]) {
        let s = self.slot_area();
        (s.slots().unwrap_or_default(), s.area_hash)
    }

    /// The answer to [`key_holder_proof`]'s `challenge`.
    pub fn prove_key(&self, challenge: &[u8; 32]) -> [u8; 32] {
        holder_proof(&self.keys(), challenge)
    }

    /// [`Volume::set_keyslots`] for a caller that is not trusted with the volume: `proof`
    /// must be [`keyslot_change_proof`] of `nonce` (which the caller of this method issued
    /// and now retires), `expected` and `slots`, and the slots must still hash to `expected`
    /// ([`Volume::keyslots_hash`]). `Refused` otherwise, with nothing written.
    pub fn set_keyslots_checked(
        &self,
        slots: &[Vec<u8>],
        nonce: &[u8; 16],
        expected: &[u8; 32],
        proof: &[u8; 32],
    ) -> Result<()> {
        let area = encode_keyslots(slots)?;
        if !same(&change_proof(&self.keys(), nonce, expected, &area), proof) {
            return Err(Error::new(
                ErrorKind::Refused,
                "the keyslot change is not signed with this volume's key",
            ));
        }
        self.replace_keyslots(slots, Some(expected))
    }

    pub(crate) fn slot_area(&self) -> std::sync::MutexGuard<'_, SlotArea> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The 8 keyslots of the committed (MAC-verified) keyslot area, in slot order; an empty
    /// blob is a free slot.
    pub fn keyslots(&self) -> Vec<Vec<u8>> {
        // The area was decoded once at open or written by `set_keyslots`: it decodes.
        self.slot_area().slots().unwrap_or_default()
    }

    /// Replaces the keyslot area with `slots` (blob `i` to slot `i`, empty = free, at most
    /// 8), crash-safely: after a crash at any point the volume opens with either the old
    /// slots or the new ones (FORMAT.md §3.1). Commits three times; the commit hook sees
    /// each. Writable volumes only.
    pub fn set_keyslots(&self, slots: &[Vec<u8>]) -> Result<()> {
        self.replace_keyslots(slots, None)
    }

    /// [`Volume::set_keyslots`]; with `expected`, refused unless the current area still
    /// hashes to it (checked under the exclusive gate, so no other change slips between).
    fn replace_keyslots(&self, slots: &[Vec<u8>], expected: Option<&[u8; 32]>) -> Result<()> {
        let new_slots = encode_keyslots(slots)?;
        self.replace_area(None, &new_slots, expected)
    }

    /// Converts an image of an older format version to the current one, in place and
    /// crash-safely (the header's version is the only byte that changes, through the same
    /// staged change as keyslots). The volume keeps its old semantics until it is reopened.
    /// `Unsupported` if it is already current.
    pub fn upgrade_format(&self) -> Result<()> {
        if self.header.version >= FORMAT_VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the image already has format version {FORMAT_VERSION}"),
            ));
        }
        // The header as it is now (a resize in this session changed its size), with the
        // slots and the hash of that same state: refused if it changes before the gate.
        let (header, slots, expected) = {
            let s = self.slot_area();
            let header = Header {
                version: FORMAT_VERSION,
                ..s.header()?
            };
            (header, s.area[BS..].to_vec(), s.area_hash)
        };
        self.replace_area(Some(&header), &slots, Some(&expected))
    }

    /// Replaces the header block with `header` through the staged change of FORMAT.md §3.1,
    /// after running `prepare` with the gate held exclusively right after a commit (its
    /// changes are committed before the header is staged). `expected`: the hash of the area
    /// `header` was read from; refused (nothing written) if the area changed since, so that
    /// slots changed meanwhile are never written back as they were.
    pub(crate) fn replace_header(
        &self,
        header: &Header,
        expected: &[u8; 32],
        prepare: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let slots = self.slot_area().area[BS..].to_vec();
        self.replace_area_with(Some(header), &slots, Some(expected), Some(prepare))
    }

    /// Replaces the header area (the header block, if `header`, and the keyslot area) through
    /// the staged change of FORMAT.md §3.1.
    fn replace_area(
        &self,
        header: Option<&Header>,
        new_slots: &[u8],
        expected: Option<&[u8; 32]>,
    ) -> Result<()> {
        self.replace_area_with(header, new_slots, expected, None)
    }

    fn replace_area_with(
        &self,
        header: Option<&Header>,
        new_slots: &[u8],
        expected: Option<&[u8; 32]>,
        prepare: Option<&mut dyn FnMut() -> Result<()>>,
    ) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the volume is open read-only; its header and keyslots cannot change",
            ));
        }
        let header_block = match header {
            Some(h) => h.encode()?.to_vec(),
            None => self.slot_area().area[..BS].to_vec(),
        };
        let new_area = join(&header_block, new_slots);
        let _gate = self.exclusive();
        if expected.is_some_and(|e| !same(&self.keyslots_hash(), e)) {
            return Err(Error::new(
                ErrorKind::Refused,
                "the keyslots (or the header) changed since they were read; read them again",
            ));
        }
        if let Some(prepare) = prepare {
            self.commit_locked(true)?;
            prepare().map_err(|e| self.fail(e))?;
        }
        // Nothing pending, so that the next commit allocates nothing past the mark.
        self.commit_locked(true)?;
        self.stage_and_switch(new_area, 0)?;
        if let Some(h) = header {
            // Under the gate, with the header that now counts (a resize).
            self.size
                .store(h.size, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }

    /// Steps 2-5 of FORMAT.md §3.1 (gate held exclusively): stages `new_area` `margin` blocks
    /// past the high-water mark (room for what the staging commit itself allocates: nothing
    /// when nothing is pending), commits naming it, writes it in place and commits it.
    pub(crate) fn stage_and_switch(&self, new_area: Vec<u8>, margin: u64) -> Result<()> {
        let new_hash = hash_area(&new_area);
        let stage_at = self.alloc.lock().high_water() + margin;
        let st: &dyn Storage = &*self.storage;
        let io = |what: &str, e| self.fail(Error::io(format!("cannot {what}"), e));
        st.write_all_at(&new_area, stage_at * BLOCK_SIZE)
            .map_err(|e| io("write the staged header area", e))?;
        failpoint::hit("keyslots:stage-written");
        self.sync()
            .map_err(|e| io("sync the staged header area", e))?;
        {
            let mut s = self.slot_area();
            s.staged_keyslots = stage_at;
            s.staged_hash = new_hash;
        }
        self.commit_locked(true)?;
        failpoint::hit("keyslots:staged");
        self.write_area(&new_area)?;
        {
            let mut s = self.slot_area();
            s.area = new_area;
            s.area_hash = new_hash;
            s.header_hash = new_hash;
            s.staged_keyslots = 0;
            s.staged_hash = [0; 32];
        }
        self.commit_locked(true)?;
        failpoint::hit("keyslots:committed");
        self.drop_stage(stage_at);
        Ok(())
    }

    /// Writes `area` (header block and keyslot area) over the header area in place and
    /// syncs it.
    fn write_area(&self, area: &[u8]) -> Result<()> {
        let st: &dyn Storage = &*self.storage;
        st.write_all_at(area, 0)
            .map_err(|e| self.fail(Error::io("cannot write the header area", e)))?;
        failpoint::hit("keyslots:area-written");
        self.sync()
            .map_err(|e| self.fail(Error::io("cannot sync the header area", e)))?;
        failpoint::hit("keyslots:area-synced");
        Ok(())
    }

    /// Removes the staged copy at `stage_at` once no superblock names it: truncated when it
    /// ends the file, else punched (best effort; later allocations overwrite it anyway).
    fn drop_stage(&self, stage_at: u64) {
        let st: &dyn Storage = &*self.storage;
        let end = (stage_at + HEADER_AREA_BLOCKS) * BLOCK_SIZE;
        let result = match st.len() {
            Ok(len) if len == end => st.set_len(stage_at * BLOCK_SIZE),
            _ => st.punch_hole(stage_at * BLOCK_SIZE, HEADER_AREA_BLOCKS * BLOCK_SIZE),
        };
        if let Err(e) = result {
            log::debug!("the staged keyslot copy stays in the file: {e}");
        }
    }

    /// At a writable open, before replay: completes a keyslot change that a crash
    /// interrupted (or, when its staged copy is gone, keeps the committed area). The open's
    /// own commit then writes a superblock that names no staged area.
    pub(crate) fn settle_keyslots(&self) -> Result<()> {
        let (staged_hash, forward) = {
            let s = self.slot_area();
            if s.staged_keyslots == 0 {
                return Ok(());
            }
            // `choose` took the staged copy whenever it verified: the area it accepted is the
            // new one exactly then, else the old one stays.
            let forward = same(&s.area_hash, &s.staged_hash).then(|| s.area.clone());
            (s.staged_hash, forward)
        };
        if let Some(area) = &forward {
            self.write_area(area)?;
        }
        let mut s = self.slot_area();
        if let Some(area) = forward {
            s.area = area;
            s.area_hash = staged_hash;
            s.header_hash = staged_hash;
        }
        s.staged_keyslots = 0;
        s.staged_hash = [0; 32];
        drop(s);
        log::info!("settled a keyslot change that was interrupted");
        Ok(())
    }
}
