//! Tampering and replay with compressed units (docs/FORMAT.md §18, §12): the rules of the
//! plain data blocks hold for units.
//!
//! - A flipped byte anywhere in a unit's `k` blocks (the frame, the padding after it) makes
//!   the reads of exactly the blocks of its group that reference it fail with `Integrity`;
//!   every other block (other groups, a block of the same group overwritten plain) reads
//!   back, and nothing panics.
//! - A unit moved to another unit's place (same `k`: a relocation, or a swap of the two), an
//!   older copy of a unit put back in its place, and a unit and a plain block standing for
//!   each other are `Integrity` for the blocks that referenced what was overwritten.
//! - Replay of a log whose kind-3 record landed but whose unit never did (kill -9 before the
//!   data write, or with only part of its blocks written) drops the record: the group reads
//!   as before the write, and `check` finds nothing damaged and nothing leaked.
//!
//! - A power loss after whole-group writes leaves each group as it was or as written, whole
//!   (one kind-3 record maps all its blocks), never part of each.
//!
//! Where the units are comes from the image as FORMAT.md describes it (`common::layout`
//! finds the map leaves; `k` is byte 11 of a version-7 leaf entry, §18.2).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::layout::{self, Layout};
use common::{BlockHistory, BS};
use qvol_core::storage::{CrashStorage, MemStorage, Storage};
use qvol_core::{CipherSuite, Compression, ErrorKind, Volume};

const SIZE: u64 = 1 << 20;
const BLOCKS: u64 = SIZE / 4096;
/// 16 KiB units.
const LOG2_N: u8 = 2;
const N: u64 = 1 << LOG2_N;
/// The byte offset of the data region (FORMAT.md §1).
const DATA_START: u64 = layout::DATA_START_BLOCK * 4096;

/// A compressed volume (16 KiB units, zstd 3) on `storage`, with key 1.
fn create(storage: Arc<dyn Storage>) -> Volume {
    let mut opts = common::options(SIZE, CipherSuite::XChaCha20Poly1305);
    opts.compression = Some(Compression {
        unit_log2: LOG2_N,
        level: Some(3),
    });
    Volume::create(storage, opts, &common::key(1)).expect("create a compressed volume")
}

/// `len` bytes of text (64-byte lines naming `tag` and their offset) after `random` bytes
/// that do not compress: with 16 KiB, no random bytes pack into one block, 6000 into two,
/// 10000 into three.
fn group_data(tag: u64, random: usize, len: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = [
        "block ", "unit ", "frame ", "seal ", "group ", "entry ", "leaf ", "zstd ",
    ];
    let mut out = common::pattern(tag, random.min(len));
    let mut i = 0;
    while out.len() < len {
        let mut line = format!("{tag:08x} {:06x} ", out.len());
        while line.len() < 63 {
            line.push_str(WORDS[((tag as usize) + i + line.len()) % WORDS.len()]);
        }
        line.truncate(63);
        line.push('\n');
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// The compressed unit a group's entries reference, read from a map leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Unit {
    /// The group's first logical block.
    first: u64,
    /// Its first physical block.
    pbn: u64,
    /// Its blocks.
    k: u64,
    /// The logical blocks whose entries reference it.
    refs: Vec<u64>,
}

/// The units of the committed map of `image`, by group.
fn units(image: &[u8]) -> Vec<Unit> {
    let l = Layout::read(image);
    let mut out: Vec<Unit> = Vec::new();
    for node in l.map_nodes.iter().filter(|n| n.level == 0) {
        let leaf = &image[node.pbn as usize * layout::BLOCK..][..layout::BLOCK];
        for e in 0..64u64 {
            let entry = &leaf[e as usize * 64..][..64];
            let pbn = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            let k = u64::from(entry[11]);
            if pbn == 0 || k == 0 {
                continue;
            }
            let lbn = node.index * 64 + e;
            let first = lbn / N * N;
            match out.iter_mut().find(|u| u.first == first) {
                Some(u) => {
                    assert_eq!((u.pbn, u.k), (pbn, k), "one unit per group (§18.2)");
                    u.refs.push(lbn);
                }
                None => out.push(Unit {
                    first,
                    pbn,
                    k,
                    refs: vec![lbn],
                }),
            }
        }
    }
    out
}

/// What the committed image holds: every block's content, and the units.
struct Image {
    bytes: Vec<u8>,
    model: BlockHistory,
    units: Vec<Unit>,
}

impl Image {
    fn unit(&self, first: u64) -> &Unit {
        self.units
            .iter()
            .find(|u| u.first == first)
            .unwrap_or_else(|| panic!("no unit at group {first}: {:?}", self.units))
    }

    fn block(&self, pbn: u64) -> std::ops::Range<usize> {
        pbn as usize * BS..(pbn as usize + 1) * BS
    }
}

/// Writes through `vol`, recording in `model`.
fn write(vol: &Volume, model: &mut BlockHistory, lbn: u64, data: &[u8]) {
    vol.write_at(lbn * 4096, data).expect("write");
    model.apply(lbn * 4096, data);
}

/// A committed compressed image: units of 1, 2, 2 and 3 blocks at groups 0, 4, 16 and 24; a
/// unit of group 32 with block 33 overwritten plain; a unit with holes (group 40: one block
/// of text, three of zeros); an incompressible group stored plain (48); a run of units over
/// a leaf boundary (60..68); plain blocks and a partial block elsewhere.
fn committed() -> Image {
    let mem = Arc::new(MemStorage::new());
    let vol = create(mem.clone());
    let mut model = BlockHistory::new(SIZE);
    let g = 4 * BS;
    write(&vol, &mut model, 0, &group_data(1, 0, g));
    write(&vol, &mut model, 4, &group_data(2, 6000, g));
    write(&vol, &mut model, 16, &group_data(3, 6000, g));
    write(&vol, &mut model, 24, &group_data(4, 10_000, g));
    write(&vol, &mut model, 32, &group_data(5, 0, g));
    let mut holes = vec![0u8; g];
    holes[..BS].copy_from_slice(&group_data(7, 0, BS));
    write(&vol, &mut model, 40, &holes);
    write(&vol, &mut model, 48, &common::pattern(8, g));
    write(&vol, &mut model, 60, &group_data(9, 0, 2 * g));
    // Writes to part of a group are stored plain with compression off (with it on, they
    // would rewrite their group as a unit: FORMAT.md §18.3 rule 3).
    vol.set_compression(None).expect("compression off");
    write(&vol, &mut model, 33, &common::pattern(6, BS));
    write(&vol, &mut model, 100, &common::pattern(10, BS));
    vol.write_at(200 * 4096 + 512, &common::pattern(11, 1024))
        .expect("write");
    model.apply(200 * 4096 + 512, &common::pattern(11, 1024));
    vol.set_compression(Some(3)).expect("compression on again");
    let usage = vol.compression_usage().expect("usage");
    vol.close().expect("close");
    model.make_durable();
    let bytes = mem.to_vec();
    let units = units(&bytes);
    let image = Image {
        bytes,
        model,
        units,
    };
    let ks: Vec<(u64, u64, usize)> = image
        .units
        .iter()
        .map(|u| (u.first, u.k, u.refs.len()))
        .collect();
    assert_eq!(
        ks,
        [
            (0, 1, 4),
            (4, 2, 4),
            (16, 2, 4),
            (24, 3, 4),
            (32, 1, 3),
            (40, 1, 4),
            (60, 1, 4),
            (64, 1, 4)
        ],
        "the units written (group, k, references)"
    );
    assert_eq!(image.unit(32).refs, [32, 34, 35]);
    // Plain: 33, 48..52, 100, 200.
    assert_eq!(
        usage,
        qvol_core::CompressionUsage {
            unit_lbns: 31,
            unit_blocks: 12,
            plain_blocks: 7
        }
    );
    image
}

/// What reading a (tampered) image gave.
#[derive(Debug, Default)]
struct Outcome {
    refused: Option<ErrorKind>,
    integrity: Vec<u64>,
    other_errors: Vec<(u64, ErrorKind)>,
    /// Blocks that read as something else than their content: never allowed.
    wrong: Vec<u64>,
}

/// Opens `bytes`, reads every block one at a time and the whole disk in one read (a read of
/// several blocks of one unit), then writes, flushes and closes (the outcome of which is not
/// judged: a damaged unit may fail a read-modify-write of its group). A block may read as
/// any of its versions in `model`.
fn evaluate(bytes: Vec<u8>, model: &BlockHistory) -> Outcome {
    let allowed = |lbn: usize, got: &[u8]| model.all_versions(lbn).iter().any(|v| v == got);
    let vol = match common::open(Arc::new(MemStorage::from_bytes(bytes))) {
        Ok(v) => v,
        Err(e) => {
            return Outcome {
                refused: Some(e.kind()),
                ..Outcome::default()
            }
        }
    };
    let mut out = Outcome::default();
    for lbn in 0..BLOCKS {
        match common::read_block(&vol, lbn) {
            Ok(got) if allowed(lbn as usize, &got) => {}
            Ok(_) => out.wrong.push(lbn),
            Err(e) if e.kind() == ErrorKind::Integrity => out.integrity.push(lbn),
            Err(e) => out.other_errors.push((lbn, e.kind())),
        }
    }
    // A read of several groups at once fails as a whole if any block fails, and must never
    // hand back wrong data when it succeeds.
    let mut all = vec![0u8; SIZE as usize];
    match vol.read_at(0, &mut all) {
        Ok(()) if all.chunks(BS).enumerate().all(|(l, b)| allowed(l, b)) => {}
        Ok(()) => out.wrong.push(u64::MAX),
        Err(e) if e.kind() == ErrorKind::Integrity && !out.integrity.is_empty() => {}
        Err(e) => out.other_errors.push((u64::MAX, e.kind())),
    }
    let _ = vol
        .write_at(7 * 4096 + 512, &common::pattern(999, 512))
        .and_then(|()| vol.write_at(8 * 4096, &group_data(998, 0, 4 * BS)))
        .and_then(|()| vol.flush())
        .and_then(|()| vol.close());
    out
}

/// Asserts that exactly `lbns` fail, with `Integrity`, and everything else reads back.
fn assert_only(what: &str, out: &Outcome, lbns: &[u64]) {
    assert!(
        out.wrong.is_empty(),
        "{what}: WRONG DATA in {:?}",
        out.wrong
    );
    assert_eq!(out.refused, None, "{what}: the volume does not open");
    assert!(
        out.other_errors.is_empty(),
        "{what}: errors other than Integrity: {:?}",
        out.other_errors
    );
    assert_eq!(
        out.integrity, lbns,
        "{what}: the blocks that fail with Integrity"
    );
}

#[test]
fn the_untampered_image_reads_back() {
    let img = committed();
    let out = evaluate(img.bytes.clone(), &img.model);
    assert_only("untampered", &out, &[]);
    let vol = common::open(Arc::new(MemStorage::from_bytes(img.bytes))).expect("open");
    let report = vol.check(&mut |_, _| {}).expect("check");
    assert!(report.is_clean(), "{report:#?}");
}

#[test]
fn a_flipped_unit_byte_fails_its_group_only() {
    let img = committed();
    for u in &img.units {
        let mut offsets = Vec::new();
        for b in 0..u.k {
            let base = (u.pbn + b) as usize * BS;
            offsets.extend([0, 1, 4, 100, 2047, 4000, 4095].map(|o| base + o));
        }
        for off in offsets {
            let mut t = img.bytes.clone();
            t[off] ^= 1 << (off % 8);
            let out = evaluate(t, &img.model);
            assert_only(&format!("unit {u:?}, byte {off:#x}"), &out, &u.refs);
        }
    }
}

#[test]
fn a_unit_in_another_units_place_fails() {
    let img = committed();
    let (a, b) = (img.unit(4), img.unit(16));
    assert_eq!(a.k, b.k, "two units of the same size");
    let span = |u: &Unit| u.pbn as usize * BS..(u.pbn + u.k) as usize * BS;
    // Relocated: the unit of group 4 copied over group 16's.
    let mut t = img.bytes.clone();
    t.copy_within(span(a), span(b).start);
    assert_only(
        "group 4's unit in group 16's place",
        &evaluate(t, &img.model),
        &b.refs,
    );
    // Swapped.
    let mut t = img.bytes.clone();
    let (ua, ub) = (img.bytes[span(a)].to_vec(), img.bytes[span(b)].to_vec());
    t[span(a)].copy_from_slice(&ub);
    t[span(b)].copy_from_slice(&ua);
    let mut both = [a.refs.clone(), b.refs.clone()].concat();
    both.sort_unstable();
    assert_only(
        "units of groups 4 and 16 swapped",
        &evaluate(t, &img.model),
        &both,
    );
    // A one-block unit in another one-block unit's place (group 0's over group 60's).
    let (c, d) = (img.unit(0), img.unit(60));
    let mut t = img.bytes.clone();
    t.copy_within(img.block(c.pbn), d.pbn as usize * BS);
    assert_only(
        "group 0's unit in group 60's place",
        &evaluate(t, &img.model),
        &d.refs,
    );
    // The first two blocks of the three-block unit in the place of a two-block one: the
    // same bytes a two-block unit would have, but not its seal.
    let e = img.unit(24);
    let mut t = img.bytes.clone();
    t.copy_within(
        e.pbn as usize * BS..(e.pbn + 2) as usize * BS,
        b.pbn as usize * BS,
    );
    assert_only(
        "two blocks of group 24's unit in group 16's place",
        &evaluate(t, &img.model),
        &b.refs,
    );
}

#[test]
fn a_unit_and_a_plain_block_cannot_stand_for_each_other() {
    let img = committed();
    let l = Layout::read(&img.bytes);
    let plain = l.pbn_of(100).expect("lbn 100 is plain");
    let u = img.unit(0);
    assert_eq!(u.k, 1);
    let mut t = img.bytes.clone();
    t.copy_within(img.block(u.pbn), plain as usize * BS);
    assert_only(
        "a one-block unit in a plain block's place",
        &evaluate(t, &img.model),
        &[100],
    );
    let mut t = img.bytes.clone();
    t.copy_within(img.block(plain), u.pbn as usize * BS);
    assert_only(
        "a plain block in a one-block unit's place",
        &evaluate(t, &img.model),
        &u.refs,
    );
    // The plain block of group 32 (lbn 33) in the place of that group's unit.
    let g = img.unit(32);
    let p33 = l.pbn_of(33).expect("lbn 33");
    assert_ne!(p33, g.pbn);
    let mut t = img.bytes.clone();
    t.copy_within(img.block(p33), g.pbn as usize * BS);
    assert_only(
        "group 32's plain block in its unit's place",
        &evaluate(t, &img.model),
        &g.refs,
    );
}

#[test]
fn putting_back_an_older_unit_fails() {
    let img = committed();
    // Group 4 and group 24 rewritten whole, with units of the same size as before.
    let mem = Arc::new(MemStorage::from_bytes(img.bytes.clone()));
    let vol = common::open(mem.clone()).expect("open");
    let mut model = img.model.clone();
    write(&vol, &mut model, 4, &group_data(20, 6000, 4 * BS));
    write(&vol, &mut model, 24, &group_data(21, 10_000, 4 * BS));
    vol.close().expect("close");
    model.make_durable();
    let new = mem.to_vec();
    let new_units = units(&new);
    for first in [4u64, 24] {
        let old = img.unit(first);
        let now = new_units
            .iter()
            .find(|u| u.first == first)
            .expect("still a unit");
        assert_eq!(old.k, now.k, "group {first}: a unit of the same size");
        let mut t = new.clone();
        let len = old.k as usize * BS;
        t[now.pbn as usize * BS..][..len]
            .copy_from_slice(&img.bytes[old.pbn as usize * BS..][..len]);
        assert_only(
            &format!("the older unit of group {first} put back"),
            &evaluate(t, &model),
            &now.refs,
        );
    }
}

/// How a write whose data never fully reaches the disk is cut.
#[derive(Clone, Copy, Debug)]
enum Lost {
    /// None of its data blocks.
    All,
    /// All but the first block of each multi-block data write.
    AllButFirst,
}

/// Writes with their data lost as `lost` (their log records land), then kill -9: replay
/// must drop the records whose unit does not open and keep the others.
fn replay_drops_units_that_never_landed(round_trips: bool, lost: Lost) {
    let what = format!("round trips {round_trips}, {lost:?}");
    let mem = Arc::new(MemStorage::new());
    let dropping = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicUsize::new(0));
    let partial = Arc::new(AtomicUsize::new(0));
    let st = {
        let (mem, dropping, dropped) = (mem.clone(), dropping.clone(), dropped.clone());
        let partial = partial.clone();
        common::Hooked::new(mem.clone(), round_trips, move |buf, offset| {
            if !dropping.load(Ordering::SeqCst) || offset < DATA_START {
                return true;
            }
            dropped.fetch_add(1, Ordering::SeqCst);
            if let Lost::AllButFirst = lost {
                if buf.len() > BS {
                    mem.write_all_at(&buf[..BS], offset).expect("write");
                    partial.fetch_add(1, Ordering::SeqCst);
                }
            }
            false
        })
    };
    let vol = create(st);
    let mut model = BlockHistory::new(SIZE);
    let g = 4 * BS;
    // Before: a unit at group 8, a plain group at 12, a unit at 16 partly overwritten.
    write(&vol, &mut model, 8, &group_data(1, 10_000, g));
    write(&vol, &mut model, 12, &common::pattern(2, g));
    write(&vol, &mut model, 16, &group_data(3, 6000, g));
    write(&vol, &mut model, 17, &common::pattern(4, BS));
    vol.flush().expect("flush");
    model.make_durable();
    let before = vol.compression_usage().expect("usage");

    // Now the data writes are lost: units over each group, a new one at 24 (two units in
    // one write: 24..32), and a plain write too.
    dropping.store(true, Ordering::SeqCst);
    vol.write_at(8 * 4096, &group_data(5, 10_000, g))
        .expect("write");
    vol.write_at(12 * 4096, &group_data(6, 6000, g))
        .expect("write");
    vol.write_at(16 * 4096, &group_data(7, 0, g))
        .expect("write");
    vol.write_at(24 * 4096, &group_data(8, 6000, 2 * g))
        .expect("write");
    vol.write_at(40 * 4096, &common::pattern(9, BS))
        .expect("write");
    assert!(
        dropped.load(Ordering::SeqCst) >= 5,
        "{what}: the data writes were not lost"
    );
    if let Lost::AllButFirst = lost {
        // Units of 3, 2 and 2 blocks at 8, 12 and 24.
        assert!(
            partial.load(Ordering::SeqCst) >= 3,
            "{what}: no unit was written in part"
        );
    }
    // kill -9: what the storage has now.
    let image = mem.to_vec();
    drop(vol);
    let l = Layout::read(&image);
    let d = l.durable_mark() as usize;
    let unsynced: Vec<(u8, u64)> = l
        .records
        .iter()
        .filter(|r| r.slot >= d)
        .map(|r| (r.kind, r.lbn))
        .collect();
    for lbn in [8, 12, 16, 24, 28] {
        assert!(
            unsynced.contains(&(3, lbn)),
            "{what}: no unsynced kind-3 record of group {lbn} in the log: {unsynced:?}"
        );
    }
    let after = Arc::new(MemStorage::from_bytes(image));
    let vol = common::open(after.clone())
        .unwrap_or_else(|e| panic!("{what}: the image does not open: {e:?}"));
    model
        .check_current(&vol)
        .unwrap_or_else(|e| panic!("{what}: after replay {e}"));
    assert_eq!(
        vol.compression_usage().expect("usage"),
        before,
        "{what}: after replay"
    );
    let report = vol.check(&mut |_, _| {}).expect("check");
    assert!(report.is_clean(), "{what}: {report:#?}");
    // The volume goes on: the groups are written again, and read back after a reopen.
    for (lbn, tag) in [(8u64, 10u64), (24, 11)] {
        write(&vol, &mut model, lbn, &group_data(tag, 6000, 2 * g));
    }
    vol.close().expect("close");
    let vol = common::open(after).expect("reopen");
    model
        .check_current(&vol)
        .unwrap_or_else(|e| panic!("{what}: after rewriting {e}"));
    let report = vol.check(&mut |_, _| {}).expect("check");
    assert!(report.is_clean(), "{what}: after rewriting {report:#?}");
}

#[test]
fn replay_drops_a_unit_that_never_reached_the_disk() {
    for round_trips in [false, true] {
        for lost in [Lost::All, Lost::AllButFirst] {
            replay_drops_units_that_never_landed(round_trips, lost);
        }
    }
}

/// The positive half: kill -9 after writes whose data did land keeps every one of them
/// (units, zeros over a unit, a plain overwrite of part of a unit), through replay.
#[test]
fn replay_keeps_units_that_landed() {
    let mem = Arc::new(MemStorage::new());
    let vol = create(mem.clone());
    let mut model = BlockHistory::new(SIZE);
    let g = 4 * BS;
    write(&vol, &mut model, 0, &group_data(1, 6000, 4 * g));
    vol.flush().expect("flush");
    model.make_durable();
    write(&vol, &mut model, 4, &group_data(2, 10_000, g));
    write(&vol, &mut model, 9, &common::pattern(3, 512));
    write(&vol, &mut model, 12, &vec![0u8; g]);
    write(&vol, &mut model, 20, &group_data(4, 0, 3 * g));
    let live = vol.compression_usage().expect("usage");
    let image = mem.to_vec();
    drop(vol);
    let vol = common::open(Arc::new(MemStorage::from_bytes(image))).expect("open");
    model.check_current(&vol).expect("after replay");
    assert_eq!(vol.compression_usage().expect("usage"), live);
    let report = vol.check(&mut |_, _| {}).expect("check");
    assert!(report.is_clean(), "{report:#?}");
}

/// A committed image opened again, units written whole, a flush, more units written (their
/// records never synced), then kill -9. Returns the image and the model (the unsynced
/// writes' blocks may read as either version).
fn logged() -> (Vec<u8>, BlockHistory) {
    let img = committed();
    let mem = Arc::new(MemStorage::from_bytes(img.bytes));
    let vol = common::open(mem.clone()).expect("open");
    let mut model = img.model;
    write(&vol, &mut model, 8, &group_data(30, 6000, 8 * BS));
    write(&vol, &mut model, 4, &group_data(31, 0, 4 * BS));
    write(&vol, &mut model, 2, &common::pattern(32, BS));
    vol.flush().expect("flush");
    model.make_durable();
    write(&vol, &mut model, 16, &group_data(33, 10_000, 4 * BS));
    write(&vol, &mut model, 44, &group_data(34, 0, 8 * BS));
    let image = mem.to_vec();
    drop(vol);
    (image, model)
}

#[test]
fn kind_3_record_flips_are_detected_below_the_durable_mark() {
    let (image, model) = logged();
    let l = Layout::read(&image);
    let d = l.durable_mark() as usize;
    let synced: Vec<usize> = l
        .records
        .iter()
        .filter(|r| r.kind == 3 && r.slot < d)
        .map(|r| r.slot)
        .collect();
    let unsynced: Vec<usize> = l
        .records
        .iter()
        .filter(|r| r.kind == 3 && r.slot >= d)
        .map(|r| r.slot)
        .collect();
    assert!(
        synced.len() >= 3 && unsynced.len() >= 3,
        "kind-3 records on both sides of the durable mark {d}: {:?}",
        l.records
    );
    let flip = |off: usize| {
        let mut t = image.clone();
        t[off] ^= 1 << (off % 8);
        evaluate(t, &model)
    };
    for slot in synced {
        let base = l.slot_offset(slot);
        for off in (base..base + layout::RECORD_LEN).step_by(3) {
            let out = flip(off);
            assert!(
                out.wrong.is_empty(),
                "synced record {slot}, byte {off:#x}: {out:?}"
            );
            assert!(
                out.refused.is_some() || !out.integrity.is_empty(),
                "synced record {slot}, byte {off:#x}: not detected: {out:?}"
            );
        }
    }
    // An unsynced record with a flipped byte is a torn one: the writes from it on may be
    // lost, nothing else.
    for slot in unsynced {
        let base = l.slot_offset(slot);
        for off in (base..base + layout::RECORD_LEN).step_by(5) {
            assert_only(
                &format!("unsynced record {slot}, byte {off:#x}"),
                &flip(off),
                &[],
            );
        }
    }
}

#[test]
fn leaf_flips_in_unit_entries_are_detected() {
    let img = committed();
    let l = Layout::read(&img.bytes);
    let leaves: Vec<_> = l.map_nodes.iter().filter(|n| n.level == 0).collect();
    assert!(leaves.len() >= 2, "{leaves:?}");
    let mut tried = 0;
    for u in &img.units {
        let node = leaves
            .iter()
            .find(|n| n.index == u.first / 64)
            .expect("the unit's leaf");
        for &lbn in &u.refs {
            let entry = node.pbn as usize * BS + (lbn % 64) as usize * 64;
            // pbn, key epoch and k, birth, nonce, tag.
            for off in [0, 3, 8, 10, 11, 12, 16, 40, 48, 63] {
                tried += 1;
                let mut t = img.bytes.clone();
                t[entry + off] ^= 1 << (off % 8);
                let out = evaluate(t, &img.model);
                let what = format!("unit {u:?}, entry of lbn {lbn}, byte {off}");
                assert!(out.wrong.is_empty(), "{what}: WRONG DATA {out:?}");
                assert!(
                    out.refused.is_some() || !out.integrity.is_empty(),
                    "{what}: not detected: {out:?}"
                );
                assert!(
                    out.integrity.iter().all(|&b| b / 64 == node.index),
                    "{what}: blocks outside the leaf fail: {out:?}"
                );
                assert!(out.other_errors.is_empty(), "{what}: {out:?}");
            }
        }
    }
    assert!(tried > 100);
}

/// A unit is created whole by one record (FORMAT.md §18.3 rule 1): after a power loss, a
/// group written whole (compressed) reads entirely as before or entirely as written.
#[test]
fn a_power_loss_leaves_each_unit_whole_or_not_at_all() {
    for round_trips in [false, true] {
        let disk = Arc::new(CrashStorage::new());
        disk.set_round_trips(round_trips);
        let vol = create(disk.clone());
        let groups = 12u64;
        let old: Vec<Vec<u8>> = (0..groups)
            .map(|g| group_data(100 + g, (g as usize % 3) * 5000, 4 * BS))
            .collect();
        let new: Vec<Vec<u8>> = (0..groups)
            .map(|g| group_data(200 + g, ((g as usize + 1) % 3) * 5000, 4 * BS))
            .collect();
        for (g, data) in old.iter().enumerate() {
            vol.write_at(g as u64 * N * 4096, data).expect("write");
        }
        vol.flush().expect("flush");
        // One write per group, then three groups in one write.
        for (g, data) in new.iter().enumerate().take(9) {
            vol.write_at(g as u64 * N * 4096, data).expect("write");
        }
        vol.write_at(9 * N * 4096, &new[9..].concat())
            .expect("write");
        assert_eq!(
            vol.compression_usage().expect("usage").unit_lbns,
            groups * N,
            "every group is a unit"
        );
        let (mut whole_old, mut whole_new) = (0, 0);
        for seed in 0..64 {
            let what = format!("round trips {round_trips}, seed {seed}");
            let after = common::open(Arc::new(disk.crash(seed)))
                .unwrap_or_else(|e| panic!("{what}: does not open: {e:?}"));
            for g in 0..groups as usize {
                let mut got = vec![0u8; 4 * BS];
                after
                    .read_at(g as u64 * N * 4096, &mut got)
                    .unwrap_or_else(|e| panic!("{what}: group {g} fails: {e:?}"));
                if got == old[g] {
                    whole_old += 1;
                } else if got == new[g] {
                    whole_new += 1;
                } else {
                    let blocks: Vec<&str> = (0..4)
                        .map(|b| {
                            let r = b * BS..(b + 1) * BS;
                            if got[r.clone()] == old[g][r.clone()] {
                                "old"
                            } else if got[r.clone()] == new[g][r] {
                                "new"
                            } else {
                                "neither"
                            }
                        })
                        .collect();
                    panic!("{what}: group {g} reads as {blocks:?}");
                }
            }
            let report = after.check(&mut |_, _| {}).expect("check");
            assert!(report.is_clean(), "{what}: {report:#?}");
        }
        assert!(
            whole_old > 0 && whole_new > 0,
            "round trips {round_trips}: the crashes left {whole_old} groups old and {whole_new} \
             new: both must happen for this test to mean anything"
        );
        drop(vol);
    }
}
