//! Compressed volumes (FORMAT.md §18): whole-group writes become units that take fewer
//! blocks and read back as written, through every path (whole reads, partial reads, reads
//! across groups, replay after kill -9, a commit); a unit stays while any entry of its group
//! references it and is freed, exactly once, when the last one goes (`check` finds no leak
//! and no block used twice); groups that do not compress, groups of zeros and writes to part
//! of a group are stored as the format says.

mod common;

use std::sync::Arc;

use common::{options, pattern, text, BlockHistory, BS};
use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{CipherSuite, Compression, CompressionUsage, ErrorKind, Volume};

const SIZE: u64 = 64 << 20;

fn compressed(unit_log2: u8, level: Option<i8>) -> (Arc<MemStorage>, Volume) {
    let mem = Arc::new(MemStorage::new());
    let mut opts = options(SIZE, CipherSuite::XChaCha20Poly1305);
    opts.compression = Some(Compression { unit_log2, level });
    let vol = Volume::create(mem.clone(), opts, &common::key(1)).expect("create");
    (mem, vol)
}

fn usage(vol: &Volume) -> CompressionUsage {
    vol.compression_usage().expect("usage")
}

fn assert_clean(vol: &Volume, what: &str) {
    let report = vol.check(&mut |_, _| {}).expect("check");
    assert!(report.is_clean(), "{what}: {report:#?}");
}

/// Writes `data` at `off` to both.
fn write(vol: &Volume, model: &mut BlockHistory, off: u64, data: &[u8]) {
    model.apply(off, data);
    vol.write_at(off, data).expect("write");
}

#[test]
fn whole_groups_of_text_take_fewer_blocks_and_read_back() {
    for unit_log2 in 1..=4 {
        let (mem, vol) = compressed(unit_log2, Some(3));
        let mut model = BlockHistory::new(SIZE);
        write(&vol, &mut model, 0, &text(1, 1 << 20));
        let u = usage(&vol);
        assert_eq!(u.unit_lbns, 256, "N = {}: {u:?}", 1 << unit_log2);
        assert_eq!(u.plain_blocks, 0);
        assert!(u.unit_blocks <= 256 / 2, "N = {}: {u:?}", 1 << unit_log2);
        model.check_current(&vol).expect("reads back");
        // Reads of every shape: across groups, inside a block, a whole unit.
        let mut buf = vec![0u8; 3 * BS + 1024];
        vol.read_at(5 * 4096 + 512, &mut buf).expect("read");
        assert_eq!(
            buf,
            text(1, 1 << 20)[5 * BS + 512..5 * BS + 512 + buf.len()]
        );
        assert_clean(&vol, "written");
        // kill -9: the units come back from the log.
        std::mem::forget(vol);
        let vol = common::open(Arc::new(MemStorage::from_bytes(mem.to_vec()))).expect("reopen");
        model.check_current(&vol).expect("after replay");
        assert_eq!(usage(&vol), u);
        assert_clean(&vol, "replayed");
        vol.close().expect("close");
    }
}

#[test]
fn a_unit_stays_until_its_last_reference_goes() {
    let (_mem, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    write(&vol, &mut model, 0, &text(2, 4 * BS));
    let k = usage(&vol).unit_blocks;
    assert!((1..4).contains(&k));
    // With compression off, writes to part of a group are plain (with it on they rewrite
    // the group). Entries 1 and 3 overwritten in place, entry 2 discarded: entry 0 holds it.
    vol.set_compression(None).expect("off");
    write(&vol, &mut model, BS as u64, &pattern(3, BS));
    write(&vol, &mut model, 3 * BS as u64 + 512, &pattern(4, 512));
    model.apply(2 * BS as u64, &[0; BS]);
    vol.discard(2 * BS as u64, BS as u64).expect("discard");
    let u = usage(&vol);
    assert_eq!((u.unit_lbns, u.unit_blocks, u.plain_blocks), (1, k, 2));
    model.check_current(&vol).expect("partly referenced");
    vol.commit().expect("commit");
    assert_clean(&vol, "partly referenced");
    // The last reference goes: the unit is freed (and only then).
    write(&vol, &mut model, 0, &pattern(5, BS));
    let u = usage(&vol);
    assert_eq!((u.unit_lbns, u.unit_blocks, u.plain_blocks), (0, 0, 3));
    vol.commit().expect("commit");
    assert_clean(&vol, "unit freed");
    model.check_current(&vol).expect("plain again");
}

#[test]
fn a_unit_replaced_or_discarded_whole_is_freed_once() {
    let (_mem, vol) = compressed(3, Some(1));
    let mut model = BlockHistory::new(SIZE);
    for round in 0..5u64 {
        write(&vol, &mut model, 0, &text(10 + round, 64 * BS));
        vol.commit().expect("commit");
        assert_clean(&vol, &format!("round {round}"));
    }
    let before = vol.info().allocated_bytes;
    model.apply(0, &vec![0; 32 * BS]);
    vol.discard(0, 32 * BS as u64).expect("discard");
    vol.commit().expect("commit");
    assert!(vol.info().allocated_bytes < before);
    assert_eq!(usage(&vol).unit_lbns, 32);
    assert_clean(&vol, "discarded");
    model.check_current(&vol).expect("reads back");
}

#[test]
fn zeros_are_unmapped_and_incompressible_groups_stay_plain() {
    let (_mem, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    write(&vol, &mut model, 0, &text(7, 8 * BS));
    write(&vol, &mut model, 0, &vec![0; 4 * BS]); // a group of zeros: unmapped
    write(&vol, &mut model, 8 * BS as u64, &pattern(8, 4 * BS)); // random: plain
    let u = usage(&vol);
    assert_eq!((u.unit_lbns, u.plain_blocks), (4, 4), "{u:?}");
    vol.commit().expect("commit");
    assert_clean(&vol, "mixed");
    model.check_current(&vol).expect("reads back");
}

#[test]
fn unaligned_writes_compress_their_whole_groups_only() {
    let (_mem, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    // From block 1 + 512 bytes to the end of block 12: groups 1 and 2 are whole; groups 0
    // and 3, written in part, are read, overlaid and stored as units too (§18.3 rule 3).
    write(&vol, &mut model, BS as u64 + 512, &text(9, 12 * BS - 512));
    let u = usage(&vol);
    assert_eq!((u.unit_lbns, u.plain_blocks), (16, 0), "{u:?}");
    model.check_current(&vol).expect("reads back");
    assert_clean(&vol, "partial groups rewritten");
    // Small writes one block at a time (a guest's small files): each rewrites its group,
    // which ends as one unit; a 512-byte write too; the old units are freed.
    for lbn in 32..40u64 {
        write(&vol, &mut model, lbn * BS as u64, &text(100 + lbn, BS));
    }
    write(&vol, &mut model, 33 * BS as u64 + 512, &text(200, 512));
    let u = usage(&vol);
    assert_eq!((u.unit_lbns, u.plain_blocks), (24, 0), "{u:?}");
    vol.commit().expect("commit");
    assert_clean(&vol, "small writes");
    model.check_current(&vol).expect("reads back");
    // A group that does not compress after the overlay: only the written block is stored,
    // plain, and the rest of the group keeps its unit.
    write(&vol, &mut model, 64 * BS as u64, &text(300, 4 * BS));
    write(&vol, &mut model, 65 * BS as u64, &pattern(301, BS));
    let before = usage(&vol);
    write(&vol, &mut model, 68 * BS as u64, &pattern(302, 3 * BS));
    let after = usage(&vol);
    assert_eq!(after.plain_blocks, before.plain_blocks + 3, "{after:?}");
    model.check_current(&vol).expect("reads back");
    // A group written in two halves of random data: the first half compresses (with holes),
    // the whole does not; the group ends plain, its unit freed (not kept beside the plain
    // blocks).
    let before = usage(&vol);
    write(&vol, &mut model, 80 * BS as u64, &pattern(303, 2 * BS));
    assert_eq!(usage(&vol).unit_lbns, before.unit_lbns + 4);
    write(&vol, &mut model, 82 * BS as u64, &pattern(304, 2 * BS));
    let after = usage(&vol);
    assert_eq!(
        (after.unit_lbns, after.plain_blocks),
        (before.unit_lbns, before.plain_blocks + 4),
        "{after:?}"
    );
    // A plain group stays plain under small writes, compressible or not.
    write(&vol, &mut model, 81 * BS as u64, &text(305, BS));
    assert_eq!(usage(&vol), after);
    vol.commit().expect("commit");
    assert_clean(&vol, "halves");
    model.check_current(&vol).expect("reads back");
    // The last group of the disk reaches past its end when the size is not a multiple: its
    // blocks that exist, written whole, stay plain.
    let mem = Arc::new(MemStorage::new());
    let mut opts = options(SIZE - 4096, CipherSuite::Aegis256);
    opts.compression = Some(Compression {
        unit_log2: 2,
        level: Some(3),
    });
    let vol = Volume::create(mem, opts, &common::key(1)).expect("create");
    vol.write_at(SIZE - 4 * 4096, &text(10, 3 * BS))
        .expect("write the tail");
    assert_eq!(
        usage(&vol),
        CompressionUsage {
            unit_lbns: 0,
            unit_blocks: 0,
            plain_blocks: 3
        }
    );
}

#[test]
fn the_setting_changes_new_writes_only_and_survives_a_reopen() {
    let (mem, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    write(&vol, &mut model, 0, &text(11, 8 * BS));
    vol.set_compression(None).expect("off");
    write(&vol, &mut model, 8 * BS as u64, &text(12, 8 * BS));
    assert_eq!(usage(&vol).unit_lbns, 8);
    vol.close().expect("close");
    let vol = common::open(mem.clone() as Arc<dyn Storage>).expect("reopen");
    assert_eq!(vol.compress_level(), None);
    assert_eq!(vol.info().unit_bytes, 16384);
    model
        .check_current(&vol)
        .expect("units read with compression off");
    vol.set_compression(Some(-3)).expect("a fast level");
    write(&vol, &mut model, 16 * BS as u64, &text(13, 8 * BS));
    assert_eq!(usage(&vol).unit_lbns, 16);
    vol.close().expect("close");
    let vol = common::open(mem as Arc<dyn Storage>).expect("reopen");
    assert_eq!(vol.compress_level(), Some(-3));
    model.check_current(&vol).expect("reads back");
    for bad in [0, 23, -8] {
        assert_eq!(
            vol.set_compression(Some(bad)).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "level {bad}"
        );
    }
}

#[test]
fn bad_settings_and_volumes_without_units_are_refused() {
    for (unit_log2, level) in [(0, Some(3)), (5, Some(3)), (2, Some(23)), (2, Some(0))] {
        let mut opts = options(SIZE, CipherSuite::XChaCha20Poly1305);
        opts.compression = Some(Compression { unit_log2, level });
        let r = Volume::create(Arc::new(MemStorage::new()), opts, &common::key(1));
        assert_eq!(
            r.map(|_| ()).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{unit_log2} {level:?}"
        );
    }
    let plain = common::create(Arc::new(MemStorage::new()), SIZE);
    assert_eq!(plain.info().unit_bytes, 0);
    assert_eq!(
        plain.set_compression(Some(3)).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

/// A unit shared with snapshots is freed when the last map whose group references it lets
/// go of it: a snapshot holding entry 0 holds it after the live disk dropped entries 1..3,
/// and the live entry 3 holds it after the snapshot (whose entries 0..3 did) is deleted.
#[test]
fn snapshots_hold_units_by_group() {
    let (mem, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    write(&vol, &mut model, 0, &text(20, 16 * BS));
    vol.create_snapshot("all").expect("snapshot");
    let all = model.image();
    // Live: group 0 keeps entry 3 only; group 1 is replaced whole; group 2 discarded.
    write(&vol, &mut model, 0, &pattern(21, 3 * BS));
    write(&vol, &mut model, 4 * BS as u64, &text(22, 4 * BS));
    model.apply(8 * BS as u64, &[0; 4 * BS]);
    vol.discard(8 * BS as u64, 4 * BS as u64).expect("discard");
    vol.commit().expect("commit");
    assert_clean(&vol, "live and snapshot share units");
    vol.create_snapshot("some").expect("snapshot");
    let some = model.image();
    write(&vol, &mut model, 3 * BS as u64, &pattern(23, BS));
    vol.commit().expect("commit");
    assert_clean(&vol, "before deletes");
    let usage_before = vol.snapshot_usage().expect("usage");
    assert_eq!(usage_before.len(), 2);
    vol.delete_snapshot("all").expect("delete");
    assert_clean(&vol, "after deleting the oldest");
    model.check_current(&vol).expect("live reads back");
    // The second snapshot still reads as taken (units it shares with nobody now).
    drop(vol);
    let view = qvol_core::Volume::open_with(
        mem.clone(),
        &common::key(1),
        qvol_core::OpenOptions {
            read_only: true,
            snapshot: Some("some".into()),
            ..Default::default()
        },
    )
    .expect("view");
    let mut got = vec![0u8; some.len()];
    view.read_at(0, &mut got).expect("read the snapshot");
    assert!(got == some, "snapshot \"some\" reads as taken");
    drop(view);
    let vol = common::open(mem.clone() as Arc<dyn Storage>).expect("reopen");
    vol.revert_to_snapshot("some", None).expect("revert");
    let mut got = vec![0u8; some.len()];
    vol.read_at(0, &mut got).expect("read");
    assert!(got == some, "the revert reads as the snapshot");
    assert_clean(&vol, "after the revert");
    vol.delete_snapshot("some").expect("delete");
    assert_clean(&vol, "no snapshot left");
    assert!(all != some);
}

/// Threads writing whole groups, single blocks and discards over the same few groups: each
/// unit is freed once, when its last reference goes, whatever the interleaving.
#[test]
fn racing_writers_of_one_group_free_each_unit_once() {
    let (mem, vol) = compressed(2, Some(1));
    let vol = Arc::new(vol);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let group = (i * 7 + t) % 4;
                    let off = group * 4 * BS as u64;
                    match (i + t) % 3 {
                        0 => vol.write_at(off, &text(t * 1000 + i, 4 * BS)),
                        1 => vol.write_at(off + (i % 4) * BS as u64, &pattern(i, BS)),
                        _ => vol.discard(off + (i % 4) * BS as u64, BS as u64),
                    }
                    .expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    vol.commit().expect("commit");
    assert_clean(&vol, "after the race");
    let mut live = vec![0u8; 16 * BS];
    vol.read_at(0, &mut live).expect("read");
    drop(vol);
    let vol = common::open(Arc::new(MemStorage::from_bytes(mem.to_vec()))).expect("reopen");
    let mut again = vec![0u8; 16 * BS];
    vol.read_at(0, &mut again).expect("read");
    assert!(live == again, "a reopen reads what was read before");
    assert_clean(&vol, "reopened");
}

/// Re-encryption (FORMAT.md §18.3 rule 4) copies each unit once under the new key, for
/// every map that references it, while the guest writes: the disk and its snapshot read the
/// same throughout and after, under the new key, and `check` finds each unit claimed once.
#[test]
fn re_encryption_copies_each_unit_once() {
    let (mem, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    // Units in several leaves, one shared with a snapshot and partly overwritten after it.
    write(&vol, &mut model, 0, &text(30, 256 * BS));
    vol.create_snapshot("before").expect("snapshot");
    let before = model.image();
    write(&vol, &mut model, 2 * BS as u64, &pattern(31, BS));
    write(&vol, &mut model, 64 * BS as u64, &text(32, 8 * BS));
    let units = usage(&vol);
    let slots = vol.keyslots();
    vol.start_reencryption(
        &common::key(2),
        CipherSuite::Aegis256,
        &slots,
        &vol.keyslots_hash(),
    )
    .expect("start");
    let mut steps = 0u64;
    while vol.reencrypt_step(1).expect("step").is_some() {
        steps += 1;
        // The guest goes on writing whole groups (new units under the new key).
        write(
            &vol,
            &mut model,
            (100 + 4 * steps) * BS as u64,
            &text(40 + steps, 4 * BS),
        );
        model
            .check_current(&vol)
            .expect("reads the same during the re-encryption");
    }
    assert!(steps > 0);
    vol.commit().expect("commit");
    assert_clean(&vol, "re-encrypted");
    assert!(usage(&vol).unit_lbns >= units.unit_lbns, "units stay units");
    drop(vol);
    let st: Arc<dyn Storage> = mem;
    let vol = Volume::open(st.clone(), &common::key(2), false).expect("the new key opens it");
    model.check_current(&vol).expect("reads the same after");
    assert_clean(&vol, "reopened under the new key");
    drop(vol);
    let view = Volume::open_with(
        st,
        &common::key(2),
        qvol_core::OpenOptions {
            read_only: true,
            snapshot: Some("before".into()),
            ..Default::default()
        },
    )
    .expect("view");
    let mut got = vec![0u8; before.len()];
    view.read_at(0, &mut got).expect("read the snapshot");
    assert!(got == before, "the snapshot reads as taken");
}

/// Send streams of a compressed volume (version 2, FORMAT.md §18.3 rule 4): a unit is one
/// record, an incremental stream leaves out the units its base holds, and the received
/// snapshots read as sent; a flipped byte in a unit record is refused and adds nothing.
#[test]
fn streams_carry_units_once_and_incrementals_share_them() {
    let (src, vol) = compressed(2, Some(3));
    let mut model = BlockHistory::new(SIZE);
    write(&vol, &mut model, 0, &text(50, 128 * BS));
    vol.create_snapshot("one").expect("snapshot");
    let one = model.image();
    write(&vol, &mut model, BS as u64, &pattern(51, BS)); // unit 0 partly referenced
    write(&vol, &mut model, 64 * BS as u64, &text(52, 8 * BS)); // two units replaced
    vol.create_snapshot("two").expect("snapshot");
    let two = model.image();
    vol.close().expect("close");
    let send = |name: &str, from: Option<&str>| {
        let mut out = Vec::new();
        let sum = qvol_core::send_snapshot(&*src, name, from, &mut out, &mut |_| {}).expect("send");
        (out, sum)
    };
    let (full, full_sum) = send("one", None);
    let (inc, inc_sum) = send("two", Some("one"));
    assert_eq!(u32::from_le_bytes(full[8..12].try_into().unwrap()), 2);
    // 128 blocks in 32 units: one record each.
    assert_eq!(full_sum.data_blocks, 32, "{full_sum:?}");
    assert!(full.len() < 128 * BS, "a compressed stream is smaller");
    // Incremental: the plain block and the two new units only.
    assert_eq!(inc_sum.data_blocks, 3, "{inc_sum:?}");
    let receive = |dst: &Arc<MemStorage>, stream: &[u8]| -> qvol_core::Result<()> {
        let mut r: &[u8] = stream;
        let (head, hash) = qvol_core::read_stream_head(&mut r)?;
        let vol = if dst.to_vec().is_empty() {
            Volume::create(dst.clone(), head.create_options()?, &common::key(1))?
        } else {
            common::open(dst.clone() as Arc<dyn Storage>)?
        };
        vol.receive(&head, hash, &mut r, false, &mut |_| {})?;
        vol.close()
    };
    let dst = Arc::new(MemStorage::new());
    receive(&dst, &full).expect("full");
    let before_inc = dst.to_vec();
    // A flipped byte inside the first unit record of the incremental stream.
    let mut at = 32 + 36_864 + 400;
    loop {
        match inc[at] {
            1 => at += 10 + 4096,
            2 => at += 9 + 4096,
            3 => break,
            kind => panic!("record kind {kind} at {at}"),
        }
    }
    at += 10 + 100;
    let mut bad = inc.clone();
    bad[at] ^= 1;
    assert_eq!(
        receive(&dst, &bad).unwrap_err().kind(),
        ErrorKind::Integrity,
        "a changed unit is refused"
    );
    let dst = Arc::new(MemStorage::from_bytes(before_inc));
    receive(&dst, &inc).expect("incremental");
    let vol = common::open(dst.clone() as Arc<dyn Storage>).expect("open");
    assert_eq!(vol.info().unit_bytes, 16384);
    assert_eq!(
        vol.compress_level(),
        None,
        "a received image compresses when told to"
    );
    let mut got = vec![0u8; two.len()];
    vol.read_at(0, &mut got).expect("read");
    assert!(got == two, "the live disk is the last snapshot");
    assert_clean(&vol, "received");
    let u = usage(&vol);
    assert!(u.unit_lbns > 100, "{u:?}");
    drop(vol);
    let view = Volume::open_with(
        dst,
        &common::key(1),
        qvol_core::OpenOptions {
            read_only: true,
            snapshot: Some("one".into()),
            ..Default::default()
        },
    )
    .expect("view");
    let mut got = vec![0u8; one.len()];
    view.read_at(0, &mut got).expect("read");
    assert!(got == one, "the first snapshot reads as sent");
    // Into a volume without units: refused before anything is written.
    let plain = Arc::new(MemStorage::new());
    let mut opts = options(SIZE, CipherSuite::XChaCha20Poly1305);
    opts.volume_id = [0x42; 16];
    let v = Volume::create(plain.clone(), opts, &common::key(1)).expect("create");
    let mut r: &[u8] = &full;
    let (head, hash) = qvol_core::read_stream_head(&mut r).expect("head");
    assert_eq!(
        v.receive(&head, hash, &mut r, false, &mut |_| {})
            .unwrap_err()
            .kind(),
        ErrorKind::Refused
    );
}

/// The records of a send stream after its head: (offset, kind, length).
fn stream_records(stream: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut at = 32 + 36_864 + 400;
    let mut out = Vec::new();
    loop {
        let len = match stream[at] {
            1 => 10 + BS,
            2 => 9 + BS,
            3 => 10 + usize::from(stream[at + 9]) * BS,
            0xff => {
                out.push((at, 0xff, 17 + 32));
                return out;
            }
            kind => panic!("record kind {kind} at {at}"),
        };
        out.push((at, stream[at], len));
        at += len;
    }
}

/// A stream whose sender pbns (which no MAC covers) make two groups look like one unit, with
/// the second group's unit record dropped and the counts and checksum made to match: the
/// receiver expects a unit for each group and refuses it (FORMAT.md §18.3 rule 4).
#[test]
fn a_stream_cannot_alias_one_unit_into_two_groups() {
    let (src, vol) = compressed(2, Some(3));
    vol.write_at(0, &text(60, 8 * BS)).expect("two units");
    vol.create_snapshot("s").expect("snapshot");
    vol.close().expect("close");
    let mut stream = Vec::new();
    qvol_core::send_snapshot(&*src, "s", None, &mut stream, &mut |_| {}).expect("send");
    let records = stream_records(&stream);
    let leaf = records
        .iter()
        .find(|r| r.1 == 1 && stream[r.0 + 1] == 0)
        .expect("the leaf");
    let units: Vec<_> = records.iter().filter(|r| r.1 == 3).collect();
    assert_eq!(units.len(), 2);
    // Entries 4..8 (group 1) take group 0's pbn (entry offset 0, 64 bytes each).
    let page = leaf.0 + 10;
    let pbn0 = stream[page..page + 8].to_vec();
    let mut forged = stream[..units[1].0].to_vec();
    for i in 4..8 {
        forged[page + i * 64..page + i * 64 + 8].copy_from_slice(&pbn0);
    }
    let end = records.last().expect("end");
    forged.extend_from_slice(&stream[units[1].0 + units[1].2..end.0]);
    let mut tail = [0u8; 17];
    tail[0] = 0xff;
    tail[1..9].copy_from_slice(&stream[end.0 + 1..end.0 + 9]);
    let data = u64::from_le_bytes(stream[end.0 + 9..end.0 + 17].try_into().unwrap()) - 1;
    tail[9..17].copy_from_slice(&data.to_le_bytes());
    forged.extend_from_slice(&tail);
    let hash = blake3::hash(&forged);
    forged.extend_from_slice(hash.as_bytes());
    let dst = Arc::new(MemStorage::new());
    let mut r: &[u8] = &forged;
    let (head, hash) = qvol_core::read_stream_head(&mut r).expect("head");
    let v = Volume::create(
        dst.clone(),
        head.create_options().expect("opts"),
        &common::key(1),
    )
    .expect("create");
    let err = v
        .receive(&head, hash, &mut r, false, &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
}
