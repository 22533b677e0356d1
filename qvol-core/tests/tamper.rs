//! Tampering (the threat model of docs/SECURITY.md and FORMAT.md §12): any change to any
//! byte of the image is detected — a read of an affected block fails with
//! `ErrorKind::Integrity`, or the volume refuses to open — never wrong data, never a panic; putting back an older copy of a block or a node
//! is detected; a wrong key is `WrongKey`.
//!
//! Bytes are flipped systematically (every byte, or every n-th, of each structure). Where
//! each structure lives comes from docs/FORMAT.md through `common::layout`, an independent
//! reader of the documented layout.

mod common;

use std::sync::Arc;

use common::layout::{self, Layout, Node};
use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{ErrorKind, Volume};

const SIZE: u64 = 1 << 20;
const BLOCKS: u64 = SIZE / 4096;

/// What opening and using a (tampered) image gave.
#[derive(Debug, Default)]
struct Outcome {
    /// Open failed with this kind.
    refused: Option<ErrorKind>,
    /// Blocks whose read failed with Integrity.
    integrity: Vec<u64>,
    /// Blocks whose read failed otherwise.
    other_errors: Vec<(u64, ErrorKind)>,
    /// Blocks that read as none of their allowed contents: the one thing never allowed.
    wrong: Vec<u64>,
    /// The first error of a write + flush + close after the reads (exercises the space tree).
    write_back: Option<ErrorKind>,
}

impl Outcome {
    fn detected(&self) -> bool {
        self.refused.is_some()
            || !self.integrity.is_empty()
            || self.write_back == Some(ErrorKind::Integrity)
    }
}

/// The allowed contents of each block.
type Allowed = Vec<Vec<Vec<u8>>>;

/// Opens `image` writable with the right key, reads every block, then writes, flushes and
/// closes.
fn evaluate(image: Vec<u8>, allowed: &Allowed) -> Outcome {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
    let vol = match common::open(storage) {
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
            Ok(got) if allowed[lbn as usize].contains(&got) => {}
            Ok(_) => out.wrong.push(lbn),
            Err(e) if e.kind() == ErrorKind::Integrity => out.integrity.push(lbn),
            Err(e) => out.other_errors.push((lbn, e.kind())),
        }
    }
    let write_back = vol
        .write_at(7 * 4096, &common::pattern(999, 4096))
        .and_then(|()| vol.flush())
        .and_then(|()| vol.close());
    out.write_back = write_back.err().map(|e| e.kind());
    out
}

fn refusal_is_clean(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Integrity | ErrorKind::Corrupt | ErrorKind::WrongKey | ErrorKind::Unsupported
    )
}

/// `image` with the byte at `offset` flipped.
fn flipped(image: &[u8], offset: usize) -> Vec<u8> {
    let mut t = image.to_vec();
    t[offset] ^= 0x01 << (offset % 8);
    t
}

/// Writes the content every scenario starts from; returns the volume and the model.
fn populate(vol: &Volume, model: &mut common::BlockHistory) {
    let mut w = |offset: u64, tag: u64, len: usize| {
        let data = common::pattern(tag, len);
        vol.write_at(offset, &data).expect("write");
        model.apply(offset, &data);
    };
    w(0, 1, 8 * 4096); // lbn 0..8
    w(100 * 4096 + 1024, 2, 1536); // part of lbn 100
    w(200 * 4096, 3, 4 * 4096); // lbn 200..204
    w(255 * 4096, 4, 4096); // the last block
    w(64 * 4096 - 512, 5, 1024); // straddles two map leaves
    vol.flush().expect("flush");
    w(3 * 4096, 6, 4096);
    vol.discard(5 * 4096, 4096).expect("discard");
    model.apply(5 * 4096, &[0u8; 4096]);
}

/// A committed image (closed cleanly) and the content of each block.
fn committed_image() -> (Vec<u8>, common::BlockHistory) {
    let mem = Arc::new(MemStorage::new());
    let vol = common::create(mem.clone(), SIZE);
    let mut model = common::BlockHistory::new(SIZE);
    populate(&vol, &mut model);
    vol.close().expect("close");
    model.make_durable();
    (mem.to_vec(), model)
}

fn exactly(model: &common::BlockHistory) -> Allowed {
    (0..model.len())
        .map(|lbn| vec![model.current(lbn).to_vec()])
        .collect()
}

/// Runs `flips` over `image`: each offset is flipped alone and `check` judges the outcome.
fn sweep(
    what: &str,
    image: &[u8],
    allowed: &Allowed,
    offsets: impl IntoIterator<Item = usize>,
    check: impl Fn(&Outcome) -> Result<(), String>,
) {
    let mut failures = Vec::new();
    let mut count = 0;
    for off in offsets {
        count += 1;
        let out = evaluate(flipped(image, off), allowed);
        if !out.wrong.is_empty() {
            failures.push(format!(
                "{what}: flipping byte {off:#x} gives WRONG DATA in blocks {:?}",
                out.wrong
            ));
        } else if let Some(kind) = out.refused.filter(|k| !refusal_is_clean(*k)) {
            failures.push(format!(
                "{what}: flipping byte {off:#x} refuses open with {kind:?}"
            ));
        } else if let Err(msg) = check(&out) {
            failures.push(format!("{what}: flipping byte {off:#x}: {msg} ({out:?})"));
        }
    }
    assert!(count > 0, "{what}: no byte was flipped");
    assert!(
        failures.is_empty(),
        "{} of {count} flips violate the contract:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn must_refuse(out: &Outcome) -> Result<(), String> {
    match out.refused {
        Some(_) => Ok(()),
        None => Err("the volume opened".into()),
    }
}

fn must_detect(out: &Outcome) -> Result<(), String> {
    if out.detected() {
        Ok(())
    } else {
        Err("not detected".into())
    }
}

fn nothing_lost(out: &Outcome) -> Result<(), String> {
    if out.refused.is_none() && out.integrity.is_empty() && out.other_errors.is_empty() {
        Ok(())
    } else {
        Err("a harmless change broke the volume".into())
    }
}

#[test]
fn the_reader_of_format_md_finds_every_structure() {
    let (image, model) = committed_image();
    let l = Layout::read(&image);
    let written: Vec<u64> = (0..BLOCKS)
        .filter(|&lbn| model.current(lbn as usize).iter().any(|&b| b != 0))
        .collect();
    let mut mapped: Vec<u64> = l.data_blocks.iter().map(|(lbn, _)| *lbn).collect();
    mapped.sort_unstable();
    assert_eq!(
        mapped, written,
        "the committed map holds exactly the written blocks"
    );
    assert!(l.map_nodes.len() >= 2, "{:?}", l.map_nodes);
    assert!(!l.space_nodes.is_empty());
    for &(_, pbn) in &l.data_blocks {
        assert!(
            pbn >= layout::DATA_START_BLOCK && (pbn as usize + 1) * layout::BLOCK <= image.len()
        );
    }
}

#[test]
fn data_block_flips_fail_that_block_only() {
    let (image, model) = committed_image();
    let allowed = exactly(&model);
    let l = Layout::read(&image);
    for &(lbn, pbn) in l.data_blocks.iter().take(8) {
        let base = pbn as usize * layout::BLOCK;
        sweep(
            &format!("data block of lbn {lbn}"),
            &image,
            &allowed,
            [0, 1, 511, 512, 2047, 4000, 4095].map(|o| base + o),
            |out| {
                if out.refused.is_none() && out.integrity == [lbn] && out.other_errors.is_empty() {
                    Ok(())
                } else {
                    Err(format!("expected only lbn {lbn} to fail with Integrity"))
                }
            },
        );
    }
}

/// The logical blocks a map node covers.
fn covers(node: &Node, lbn: u64) -> bool {
    let span = 64u64.pow(u32::from(node.level) + 1);
    lbn / span == node.index
}

#[test]
fn map_node_flips_are_detected() {
    let (image, model) = committed_image();
    let allowed = exactly(&model);
    let l = Layout::read(&image);
    for node in &l.map_nodes {
        let base = node.pbn as usize * layout::BLOCK;
        let offsets = (0..layout::BLOCK).step_by(61).chain([8, 16, 48, 63, 4095]);
        sweep(
            &format!("map node {node:?}"),
            &image,
            &allowed,
            offsets.map(|o| base + o),
            |out| {
                must_detect(out)?;
                match out.integrity.iter().find(|&&lbn| !covers(node, lbn)) {
                    Some(lbn) => Err(format!("lbn {lbn}, outside the node, fails too")),
                    None => Ok(()),
                }
            },
        );
    }
}

#[test]
fn space_node_flips_are_detected() {
    let (image, model) = committed_image();
    let allowed = exactly(&model);
    let l = Layout::read(&image);
    for node in &l.space_nodes {
        let base = node.pbn as usize * layout::BLOCK;
        sweep(
            &format!("space node {node:?}"),
            &image,
            &allowed,
            (0..layout::BLOCK)
                .step_by(97)
                .chain([4095])
                .map(|o| base + o),
            must_detect,
        );
    }
}

#[test]
fn superblock_flips_never_give_wrong_data() {
    let (image, model) = committed_image();
    let allowed = exactly(&model);
    let l = Layout::read(&image);
    // The newest copy: open must refuse, or fall back to a state that reads correctly.
    sweep(
        "newest superblock",
        &image,
        &allowed,
        (0..layout::SUPERBLOCK_LEN)
            .step_by(3)
            .map(|o| l.newest_superblock + o),
        |out| {
            if out.other_errors.is_empty() {
                Ok(())
            } else {
                Err("reads failed with a kind other than Integrity".into())
            }
        },
    );
    // The older copy is not in use: nothing may change.
    sweep(
        "older superblock",
        &image,
        &allowed,
        (0..layout::SUPERBLOCK_LEN)
            .step_by(11)
            .map(|o| l.older_superblock + o),
        nothing_lost,
    );
}

#[test]
fn destroying_both_superblocks_refuses_open_with_integrity() {
    let (mut image, model) = committed_image();
    for off in layout::SUPERBLOCKS {
        image[off + 100] ^= 0xff;
    }
    let out = evaluate(image, &exactly(&model));
    assert_eq!(out.refused, Some(ErrorKind::Integrity), "{out:?}");
}

#[test]
fn header_and_keyslot_flips_refuse_open() {
    let (image, model) = committed_image();
    let allowed = exactly(&model);
    sweep(
        "header",
        &image,
        &allowed,
        layout::HEADER.step_by(7),
        must_refuse,
    );
    // Slot 0 holds a blob: every byte of its length and blob; the rest sparsely.
    let used = 4 + b"an opaque keyslot blob".len();
    let slots = layout::KEYSLOTS;
    sweep(
        "keyslot area",
        &image,
        &allowed,
        (slots.start..slots.start + used + 2).chain(slots.clone().step_by(251)),
        must_refuse,
    );
}

/// An image with live log records: three writes, a flush, then two more writes and a
/// process crash (no close). Returns the image, the allowed contents and the lbns whose
/// records were never synced.
fn logged_image() -> (Vec<u8>, Allowed, Vec<u64>) {
    let (image, mut model) = committed_image();
    let mem = Arc::new(MemStorage::from_bytes(image));
    let vol = common::open(mem.clone()).expect("open");
    for (lbn, tag) in [(10u64, 10u64), (11, 11), (12, 12)] {
        let data = common::pattern(tag, 4096);
        vol.write_at(lbn * 4096, &data).expect("write");
        model.apply(lbn * 4096, &data);
    }
    vol.flush().expect("flush");
    model.make_durable();
    for (lbn, tag) in [(13u64, 13u64), (14, 14)] {
        let data = common::pattern(tag, 4096);
        vol.write_at(lbn * 4096, &data).expect("write");
        model.apply(lbn * 4096, &data);
    }
    let image = mem.to_vec(); // what kill -9 leaves: taken before any drop/close
    drop(vol);
    // Blocks written after the flush may read as either version: their records are
    // indistinguishable from a crash's leftovers (FORMAT.md §12).
    let allowed = (0..model.len())
        .map(|lbn| model.all_versions(lbn).to_vec())
        .collect();
    (image, allowed, vec![13, 14])
}

#[test]
fn log_record_flips_are_detected_below_the_durable_mark() {
    let (image, allowed, unsynced) = logged_image();
    let l = Layout::read(&image);
    let d = l.durable_mark() as usize;
    assert!(
        d >= 3,
        "the records written after the flush carry the durable mark: {l:?}"
    );
    assert!(l.records.len() >= 5, "{:?}", l.records);
    let slot = |s: usize| l.slot_offset(s);
    // Synced records: every byte of the first, every 5th of the others.
    let offsets = (slot(0)..slot(1)).chain((slot(1)..slot(d)).step_by(5));
    sweep("synced log record", &image, &allowed, offsets, must_detect);
    // Unsynced records: a flip looks like a torn record; either version is fine, never
    // wrong data; no other block may suffer.
    sweep(
        "unsynced log record",
        &image,
        &allowed,
        (slot(d)..slot(l.records.len())).step_by(3),
        |out| {
            if out.refused.is_none() && out.integrity.is_empty() && out.other_errors.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "a torn unsynced record (lbns {unsynced:?}) broke the volume"
                ))
            }
        },
    );
    // Unused slots: nothing changes.
    let unused = l.records.len() + 1;
    sweep(
        "unused log slot",
        &image,
        &allowed,
        (slot(unused)..slot(unused + 4))
            .step_by(17)
            .chain([slot(l.area_slots) - 1]),
        nothing_lost,
    );
}

/// A second committed image after overwriting some blocks, with both layouts.
fn two_versions() -> (Vec<u8>, Vec<u8>, Allowed) {
    let (old, mut model) = committed_image();
    let mem = Arc::new(MemStorage::from_bytes(old.clone()));
    let vol = common::open(mem.clone()).expect("open");
    for (lbn, tag) in [(0u64, 20u64), (1, 21), (200, 22), (255, 23)] {
        let data = common::pattern(tag, 4096);
        vol.write_at(lbn * 4096, &data).expect("write");
        model.apply(lbn * 4096, &data);
    }
    vol.close().expect("close");
    model.make_durable();
    (old, mem.to_vec(), exactly(&model))
}

#[test]
fn putting_back_an_older_data_block_is_detected() {
    let (old, new, allowed) = two_versions();
    let (lo, ln) = (Layout::read(&old), Layout::read(&new));
    for lbn in [0u64, 1, 200, 255] {
        let (po, pn) = (lo.pbn_of(lbn).expect("old"), ln.pbn_of(lbn).expect("new"));
        let mut t = new.clone();
        let b = layout::BLOCK;
        t[pn as usize * b..][..b].copy_from_slice(&old[po as usize * b..][..b]);
        let out = evaluate(t, &allowed);
        assert!(
            out.wrong.is_empty(),
            "older block of lbn {lbn} read back: {out:?}"
        );
        assert_eq!(
            out.integrity,
            vec![lbn],
            "older block of lbn {lbn}: {out:?}"
        );
    }
}

#[test]
fn putting_back_an_older_map_node_is_detected() {
    let (old, new, allowed) = two_versions();
    let (lo, ln) = (Layout::read(&old), Layout::read(&new));
    let mut tried = 0;
    for node in &ln.map_nodes {
        let Some(prev) = lo
            .map_nodes
            .iter()
            .find(|n| n.level == node.level && n.index == node.index)
        else {
            continue;
        };
        let b = layout::BLOCK;
        let old_bytes = &old[prev.pbn as usize * b..][..b];
        if old_bytes == &new[node.pbn as usize * b..][..b] {
            continue; // unchanged node: nothing older to put back
        }
        tried += 1;
        let mut t = new.clone();
        t[node.pbn as usize * b..][..b].copy_from_slice(old_bytes);
        let out = evaluate(t, &allowed);
        assert!(
            out.wrong.is_empty(),
            "older node {node:?} gave wrong data: {out:?}"
        );
        assert!(out.detected(), "older node {node:?} not detected: {out:?}");
    }
    assert!(
        tried >= 2,
        "the rewrite changed at least a leaf and the root"
    );
}

#[test]
fn wrong_key_is_wrong_key() {
    let (image, _) = committed_image();
    for read_only in [false, true] {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image.clone()));
        let r = Volume::open(storage, &common::key(2), read_only);
        common::assert_kind(r.map(|_| ()), ErrorKind::WrongKey, "open with another key");
    }
}

#[test]
fn truncated_images_refuse_or_fail_reads_never_wrong_data() {
    let (image, model) = committed_image();
    let allowed = exactly(&model);
    for len in [
        0,
        7,
        4096,
        0x9000,
        0xA200,
        0x10000,
        0x410000,
        image.len() - 4096,
    ] {
        let out = evaluate(image[..len].to_vec(), &allowed);
        assert!(out.wrong.is_empty(), "truncated to {len}: {out:?}");
        assert!(
            out.refused.is_some()
                || !out.integrity.is_empty()
                || !out.other_errors.is_empty()
                || len >= 0x410000,
            "truncated to {len} bytes and nothing noticed: {out:?}"
        );
    }
}

/// Destroying the newest superblock may make open fall back to the previous commit (the
/// same as a torn superblock write after a crash): that is a rollback, which only the
/// generation can reveal (FORMAT.md §12; qvol-keys records the last generation seen). So a
/// fallback that serves older data must show in `info().generation`, and what it reads must
/// be an older version of each block, never anything else.
#[test]
fn a_superblock_fallback_shows_in_the_generation() {
    // History kept whole (never made durable): every version ever written is "older".
    let mem = Arc::new(MemStorage::new());
    let vol = common::create(mem.clone(), SIZE);
    let mut model = common::BlockHistory::new(SIZE);
    let mut w = |vol: &Volume, lbn: u64, tag: u64| {
        let data = common::pattern(tag, 4096);
        vol.write_at(lbn * 4096, &data).expect("write");
        model.apply(lbn * 4096, &data);
    };
    for lbn in 0..8 {
        w(&vol, lbn, lbn);
    }
    vol.commit().expect("commit");
    for lbn in 0..8 {
        w(&vol, lbn, 100 + lbn); // these records overwrite the previous epoch's slots
    }
    vol.commit().expect("commit");
    w(&vol, 0, 200);
    w(&vol, 200, 201);
    vol.flush().expect("flush");
    let latest_generation = vol.info().generation;
    let image = mem.to_vec();
    drop(vol);
    let l = Layout::read(&image);
    let mut opened = 0;
    let mut rollbacks = 0;
    for off in (0..layout::SUPERBLOCK_LEN).step_by(23) {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(flipped(
            &image,
            l.newest_superblock + off,
        )));
        let Ok(vol) = Volume::open(storage, &common::key(1), true) else {
            continue; // refused: detected
        };
        opened += 1;
        let mut rolled_back = false;
        for lbn in 0..BLOCKS {
            match common::read_block(&vol, lbn) {
                Ok(got) if got == model.current(lbn as usize) => {}
                Ok(got) => {
                    assert!(
                        model.version_of(lbn as usize, &got).is_some(),
                        "flip at superblock byte {off}: block {lbn} is none of its versions"
                    );
                    rolled_back = true;
                }
                Err(e) => assert_eq!(e.kind(), ErrorKind::Integrity, "{e:?}"),
            }
        }
        if rolled_back {
            rollbacks += 1;
            assert!(
                vol.info().generation < latest_generation,
                "flip at superblock byte {off}: older data is served under generation {} \
                 (latest {latest_generation}): the rollback is invisible",
                vol.info().generation
            );
        }
    }
    eprintln!("{opened} flips opened (fallback), {rollbacks} of them rolled data back");
}
