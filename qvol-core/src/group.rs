//! Groups and compressed units in the block map (docs/FORMAT.md §18): the local validity
//! rule of a leaf's groups, what a log record does to a leaf and which blocks and units the
//! change frees (§18.3 rule 2), and opening the unit an entry references. Live writes and
//! replay change leaves through [`apply`] alike, so that they free the same blocks.

use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::map::Leaf;
use crate::node::LeafEntry;
use crate::snapshot::Kill;
use crate::storage::Storage;
use crate::subkeys::Subkeys;
use crate::unit::{open_unit, UnitPlace};
use crate::wal::LogOp;

/// Checks the entries of a map leaf `page` against §18.2: an entry referencing a unit
/// (`k > 0`) only in a volume with units (`units` = `log2 N`), with `k < N`, and all the
/// entries of one group that reference a unit reference the same one. `Corrupt` otherwise.
pub(crate) fn check_groups(page: &[u8], units: Option<u8>) -> Result<()> {
    let mut first: Option<LeafEntry> = None;
    let n = units.map_or(1, |l| 1usize << l);
    for i in 0..FANOUT as usize {
        if i % n == 0 {
            first = None;
        }
        let e = LeafEntry::decode(page, i)?;
        if e.k == 0 {
            continue;
        }
        if units.is_none() || usize::from(e.k) >= n {
            return Err(Error::corrupt(format!(
                "map leaf entry {i} references a compressed unit of {} blocks, which the \
                 volume cannot have",
                e.k
            )));
        }
        match first {
            None => first = Some(e),
            Some(f) if f == e => {}
            Some(_) => {
                return Err(Error::corrupt(format!(
                    "map leaf entry {i} references another compressed unit than its group"
                )))
            }
        }
    }
    Ok(())
}

/// The entries of leaf entry `i`'s group (`units` = `log2 N`).
pub(crate) fn group_of(units: Option<u8>, i: usize) -> std::ops::Range<usize> {
    let n = 1usize << units.unwrap_or(0);
    i - i % n..i - i % n + n
}

/// The first entry of `group` in the leaf `page` that references the unit at `pbn`, if any.
pub(crate) fn first_reference(
    page: &[u8],
    group: std::ops::Range<usize>,
    pbn: u64,
) -> Result<Option<usize>> {
    for j in group {
        let o = LeafEntry::decode(page, j)?;
        if o.k > 0 && o.pbn == pbn {
            return Ok(Some(j));
        }
    }
    Ok(None)
}

/// Applies `op` (whose blocks all lie in `leaf`, leaf number `leaf_no`) to the leaf and
/// pushes onto `kills` what the live group stopped referencing: each plain block an entry
/// stopped pointing to, and each unit no entry of its group references any more, once
/// (§18.3 rule 2). Runs in the leaf's critical section, so that two
/// writers of one group cannot both see the last reference go. Returns whether any entry
/// changed.
pub(crate) fn apply(
    leaf: &mut Leaf,
    leaf_no: u64,
    op: &LogOp,
    units: Option<u8>,
    kills: &mut Vec<Kill>,
) -> bool {
    let base = leaf_no * FANOUT;
    let mut olds: Vec<(u64, LeafEntry)> = Vec::new();
    let mut set = |lbn: u64, e: &LeafEntry, leaf: &mut Leaf| {
        let i = (lbn - base) as usize;
        let old = leaf.get(i);
        if old != *e {
            leaf.set(i, e);
            if old.pbn != 0 {
                olds.push((lbn, old));
            }
            return true;
        }
        false
    };
    let mut changed = false;
    // Blocks a discard frees are punched out of the file, and so are those a unit replaces
    // and every unit freed: with compression, groups are rewritten in place of their old
    // blocks (§18.3 rule 3), which would otherwise stay allocated in the host file until the
    // allocator came back to them.
    let punch = matches!(op, LogOp::Unmap { .. } | LogOp::MapUnit { .. });
    match *op {
        LogOp::Map { lbn, entry } => changed |= set(lbn, &entry, leaf),
        LogOp::Unmap { lbn, count } => {
            for l in lbn..lbn + count {
                changed |= set(l, &LeafEntry::default(), leaf);
            }
        }
        LogOp::MapUnit { lbn, log2_n, entry } => {
            for l in lbn..lbn + (1u64 << log2_n) {
                changed |= set(l, &entry, leaf);
            }
        }
    }
    let start = kills.len();
    for (lbn, old) in olds {
        if old.k == 0 {
            kills.push(Kill::of(&old, lbn, punch));
            continue;
        }
        let n = 1u64 << units.unwrap_or(0);
        let first = lbn - lbn % n;
        let referenced = (first..first + n).any(|l| {
            let e = leaf.get((l - base) as usize);
            e.k > 0 && e.pbn == old.pbn
        });
        let listed = kills[start..].iter().any(|k| k.pbn == old.pbn);
        if !referenced && !listed {
            kills.push(Kill {
                blocks: old.k,
                ..Kill::of(&old, first, true)
            });
        }
    }
    changed
}

/// Opens the unit `e` references (its `k` sealed blocks in `sealed`, opened in place and
/// wiped afterwards) into `out`, the `N` blocks of the group of logical block `lbn`.
pub(crate) fn open_entry_unit(
    keys: &Subkeys,
    log2_n: u8,
    lbn: u64,
    e: &LeafEntry,
    sealed: &mut [u8],
    out: &mut [u8],
) -> Result<()> {
    let cipher = keys.data(e.key_epoch).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "logical block {lbn} uses key epoch {}, which this build cannot open",
                e.key_epoch
            ),
        )
    })?;
    let place = UnitPlace {
        volume_id: keys.volume_id(),
        first_lbn: lbn - lbn % (1u64 << log2_n),
        epoch: e.key_epoch,
        log2_n,
    };
    let nonce = &e.nonce[..cipher.suite().nonce_len()];
    let opened = open_unit(cipher, &place, (nonce, &e.tag), sealed, out);
    sealed.fill(0);
    opened
}

/// A group's plaintext: `N` blocks, wiped when dropped.
pub(crate) fn group_buffer(log2_n: u8) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(vec![0u8; BS << log2_n])
}

/// Reads the unit `e` references from `st` and re-seals it under the new keys' epoch with a
/// fresh nonce, after opening it by every rule of §18.2 under the old keys (FORMAT.md §18.3
/// rule 4: same `k`, the same compressed bytes). Returns its new entry without a physical
/// block, and its `k` sealed blocks. A unit that does not open stops the caller:
/// re-encryption never turns a damaged unit into a valid one.
pub(crate) fn reseal_unit(
    st: &dyn Storage,
    (old, new): (&Subkeys, &Subkeys),
    log2_n: u8,
    lbn: u64,
    e: &LeafEntry,
) -> Result<(LeafEntry, Vec<u8>)> {
    let mut sealed = vec![0u8; usize::from(e.k) * BS];
    st.read_exact_at(&mut sealed, e.pbn * BLOCK_SIZE)
        .map_err(|err| Error::io(format!("cannot read physical block {}", e.pbn), err))?;
    let entry = reseal_in_place(old, new, log2_n, lbn, e, &mut sealed)?;
    Ok((entry, sealed))
}

/// [`reseal_unit`] of the unit's sealed blocks in `buf`, in place.
fn reseal_in_place(
    old: &Subkeys,
    new: &Subkeys,
    log2_n: u8,
    lbn: u64,
    e: &LeafEntry,
    buf: &mut [u8],
) -> Result<LeafEntry> {
    let cipher = crate::datablock::data_key(old, e.key_epoch)?;
    let first_lbn = lbn - lbn % (1u64 << log2_n);
    let place = UnitPlace {
        volume_id: old.volume_id(),
        first_lbn,
        epoch: e.key_epoch,
        log2_n,
    };
    let nonce = &e.nonce[..cipher.suite().nonce_len()];
    let mut out = group_buffer(log2_n);
    // On success `buf` holds the unit's plaintext (the compressed bytes), sealed again below.
    open_unit(cipher, &place, (nonce, &e.tag), buf, &mut out)?;
    let epoch = new.epoch();
    let sealer = crate::datablock::data_key(new, epoch).inspect_err(|_| buf.fill(0))?;
    let fresh = crate::datablock::random_nonces(sealer.suite(), 1).inspect_err(|_| buf.fill(0))?;
    let place = UnitPlace { epoch, ..place };
    let tag = sealer.seal(&fresh, &place.ad(e.k), buf);
    let mut padded = [0u8; crate::suite::MAX_NONCE_LEN];
    padded[..fresh.len()].copy_from_slice(&fresh);
    Ok(LeafEntry {
        pbn: 0,
        key_epoch: epoch,
        k: e.k,
        nonce: padded,
        tag,
        birth: e.birth,
    })
}
