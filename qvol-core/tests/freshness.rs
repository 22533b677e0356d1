//! Freshness (format version 3, FORMAT.md §8, §9 and §12): the caller judges the chosen
//! commit point before anything is written, learns every commit point as it becomes durable,
//! a flushed log tail cannot be dropped unnoticed (the durable mark), and log records of a
//! forked history do not verify on the other side of the fork.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::layout::{self, Layout};
use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{CommitPoint, ErrorKind, OpenOptions, Volume, FORMAT_VERSION};

const SIZE: u64 = 1 << 20;

/// An error of the caller's check.
#[derive(Debug)]
struct Stale(u64);

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "generation {} is older than the keystore's", self.0)
    }
}

impl std::error::Error for Stale {}

/// Every commit point a hook was told, in order.
fn recorder() -> (Arc<Mutex<Vec<CommitPoint>>>, qvol_core::CommitHook) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        seen,
        Arc::new(move |p: &CommitPoint| s.lock().unwrap().push(*p)),
    )
}

/// A committed volume, then writes that live only in the log (flushed, then a process crash:
/// the volume is forgotten, never closed). Returns the storage and the last commit point.
fn image_with_records() -> (Arc<MemStorage>, CommitPoint) {
    let mem = Arc::new(MemStorage::new());
    let vol = common::create(mem.clone(), SIZE);
    vol.write_at(0, &common::pattern(1, 8 * 4096)).unwrap();
    vol.close().unwrap();
    let vol = common::open(mem.clone()).unwrap();
    let point = vol.commit_point();
    vol.write_at(20 * 4096, &common::pattern(2, 4 * 4096))
        .unwrap();
    vol.flush().unwrap();
    vol.write_at(30 * 4096, &common::pattern(3, 4096)).unwrap();
    std::mem::forget(vol); // kill -9: no close, no commit
    (mem, point)
}

#[test]
fn a_refused_open_writes_nothing_even_with_log_records() {
    let (mem, point) = image_with_records();
    let before = mem.to_vec();
    assert!(Layout::read(&before).records.len() >= 5);
    for read_only in [false, true] {
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let r = Volume::open_with(
            mem.clone(),
            &common::key(1),
            OpenOptions {
                read_only,
                check: Some(Box::new(move |p: &CommitPoint| {
                    *s.lock().unwrap() = Some(*p);
                    Err(Box::new(Stale(p.generation)) as _)
                })),
                ..OpenOptions::default()
            },
        );
        let err = r.expect_err("the check refused");
        assert_eq!(err.kind(), ErrorKind::Refused);
        let source = std::error::Error::source(&err).expect("the check's error is the source");
        assert!(source.downcast_ref::<Stale>().is_some(), "{source:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            Some(point),
            "the check saw the chosen superblock"
        );
        assert!(
            mem.to_vec() == before,
            "a refused open (read_only {read_only}) changed the image"
        );
    }
    // An accepting check sees the same point; the open then replays and commits.
    let (seen, hook) = recorder();
    let vol = Volume::open_with(
        mem.clone(),
        &common::key(1),
        OpenOptions {
            read_only: false,
            check: Some(Box::new(move |p: &CommitPoint| {
                assert_eq!(*p, point);
                Ok(())
            })),
            on_commit: Some(hook),
            ..OpenOptions::default()
        },
    )
    .expect("open");
    let after = vol.commit_point();
    assert_eq!(
        after.generation,
        point.generation + 1,
        "the replay committed"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![after],
        "the replay commit was reported"
    );
    assert_eq!(
        common::read_block(&vol, 30).unwrap(),
        common::pattern(3, 4096)
    );
}

#[test]
fn on_commit_sees_every_commit_including_log_full_ones() {
    let mem = Arc::new(MemStorage::new());
    let (seen, hook) = recorder();
    let vol = Volume::create_with(
        mem.clone(),
        common::options(SIZE, qvol_core::CipherSuite::XChaCha20Poly1305),
        &common::key(1),
        Some(hook.clone()),
    )
    .expect("create");
    assert_eq!(vol.info().format_version, FORMAT_VERSION);
    assert_eq!(*seen.lock().unwrap(), vec![vol.commit_point()], "create");
    // One record per write: more writes than the log has slots force log-full commits.
    let block = common::pattern(5, 4096);
    for i in 0..(layout::LOG_SLOTS as u64 + 100) {
        vol.write_at((i % 256) * 4096, &block).unwrap();
    }
    // A log-full commit may still be in flight (format version 6): commit() waits for it.
    vol.commit().unwrap();
    let log_full = seen.lock().unwrap().len() - 2;
    assert!(log_full >= 1, "the log filled: {log_full} commits");
    assert_eq!(seen.lock().unwrap().last(), Some(&vol.commit_point()));
    vol.write_at(0, &common::pattern(6, 4096)).unwrap();
    let before_close = vol.commit_point();
    vol.close().unwrap();
    let points = seen.lock().unwrap().clone();
    assert_eq!(
        points.len(),
        log_full + 3,
        "create, log-full, commit(), close"
    );
    for (i, p) in points.iter().enumerate() {
        assert_eq!(
            p.generation,
            i as u64 + 1,
            "every generation reported, in order"
        );
    }
    assert!(points.windows(2).all(|w| w[0].root_id != w[1].root_id));
    assert!(points.contains(&before_close));
    // The last point reported is the one the next open chooses.
    let vol = Volume::open_with(
        mem,
        &common::key(1),
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(Some(&vol.commit_point()), points.last());
}

/// The golden version-2 image of `tests/data`.
fn golden_v2() -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-v2.qvol");
    std::fs::read(p).expect("the golden version-2 image")
}

fn golden_key() -> qvol_core::VolumeKey {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8;
    }
    qvol_core::VolumeKey::from_bytes(k)
}

/// Write, flush, kill -9; the attacker zeroes the log region. `vol` is open writable on `mem`.
fn write_flush_kill_zero(mem: &MemStorage, vol: Volume, log_len: usize) -> Vec<u8> {
    vol.write_at(40 * 4096, &common::pattern(7, 2 * 4096))
        .unwrap();
    vol.flush().unwrap();
    std::mem::forget(vol);
    let mut image = mem.to_vec();
    image[layout::LOG_OFFSET..layout::LOG_OFFSET + log_len].fill(0);
    image
}

#[test]
fn zeroing_a_flushed_log_tail_is_integrity_in_version_3_only() {
    // Version 3.
    let mem = Arc::new(MemStorage::new());
    common::create(mem.clone(), SIZE).close().unwrap();
    let vol = common::open(mem.clone()).unwrap();
    let image = write_flush_kill_zero(&mem, vol, 4 << 20);
    for read_only in [true, false] {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image.clone()));
        let r = Volume::open(storage, &common::key(1), read_only).map(|_| ());
        common::assert_kind(r, ErrorKind::Integrity, "version 3, zeroed flushed log");
    }
    // Version 2 keeps its semantics: the flushed writes vanish unnoticed.
    let mem = Arc::new(MemStorage::from_bytes(golden_v2()));
    let vol = Volume::open(mem.clone(), &golden_key(), false).unwrap();
    assert_eq!(vol.info().format_version, 2, "an image keeps its version");
    let before = common::read_block(&vol, 40).unwrap();
    let image = write_flush_kill_zero(&mem, vol, 8 << 20);
    assert!(
        image[0xB000..0xD000].iter().all(|&b| b == 0),
        "version 2 writes no mark"
    );
    let vol = Volume::open(Arc::new(MemStorage::from_bytes(image)), &golden_key(), true)
        .expect("version 2 opens");
    assert_eq!(common::read_block(&vol, 40).unwrap(), before);
}

/// The pbn a map record (kind 1) in `slot` points to (FORMAT.md §9, offset 40).
fn record_pbn(image: &[u8], l: &Layout, slot: usize) -> u64 {
    let r = l.slot_offset(slot);
    u64::from_le_bytes(image[r + 40..r + 48].try_into().unwrap())
}

#[test]
fn records_of_a_forked_history_do_not_verify() {
    // Generation g with records in its log; the copy is taken now.
    let (mem, at_copy) = image_with_records();
    let copy = mem.to_vec();
    // The original goes on: replay commit (g+1), more writes, a commit (g+2), then writes
    // that live in the log of epoch g+2 only (flushed, then a crash).
    let original = Volume::open(mem.clone(), &common::key(1), false).unwrap();
    original
        .write_at(50 * 4096, &common::pattern(8, 4 * 4096))
        .unwrap();
    original.commit().unwrap();
    let forked_point = original.commit_point();
    original
        .write_at(60 * 4096, &common::pattern(9, 3 * 4096))
        .unwrap();
    original.flush().unwrap();
    std::mem::forget(original);
    let a = mem.to_vec();
    // The copy is used too: the same generations, another history.
    let b_mem = Arc::new(MemStorage::from_bytes(copy));
    let b = Volume::open(b_mem.clone(), &common::key(1), false).unwrap();
    assert_eq!(b.commit_point().generation, at_copy.generation + 1);
    b.write_at(70 * 4096, &common::pattern(10, 4096)).unwrap();
    b.commit().unwrap();
    let b_point = b.commit_point();
    assert_eq!(
        b_point.generation, forked_point.generation,
        "same generation"
    );
    assert_ne!(b_point.root_id, forked_point.root_id, "another superblock");
    b.close().unwrap();
    let mut b_image = b_mem.to_vec();
    let b_lbn60 = {
        let v = Volume::open(
            Arc::new(MemStorage::from_bytes(b_image.clone())),
            &common::key(1),
            true,
        )
        .unwrap();
        common::read_block(&v, 60).unwrap()
    };
    // The attacker moves the original's log, durable marks and the data blocks its records
    // point to (where the fork's committed tree has nothing) into the fork.
    let la = Layout::read(&a);
    assert_eq!(la.generation, forked_point.generation);
    assert_eq!(la.records.len(), 3);
    let lb = Layout::read(&b_image);
    let live: Vec<u64> = (lb.data_blocks.iter().map(|&(_, p)| p))
        .chain(lb.map_nodes.iter().chain(&lb.space_nodes).map(|n| n.pbn))
        .collect();
    let mut moved = 0;
    for r in &la.records {
        let pbn = record_pbn(&a, &la, r.slot);
        let off = (pbn * 4096) as usize;
        if b_image.len() < off + 4096 {
            b_image.resize(off + 4096, 0);
        }
        if !live.contains(&pbn) {
            b_image[off..off + 4096].copy_from_slice(&a[off..off + 4096]);
            moved += 1;
        }
    }
    // With the data there, only the binding of the records keeps them out (without it they
    // would pass replay's data check, as in version 2).
    assert!(moved > 0, "no data block of the original could be moved");
    b_image[0xB000..0xD000].copy_from_slice(&a[0xB000..0xD000]);
    let log = layout::LOG_OFFSET..layout::LOG_OFFSET + (4 << 20);
    b_image[log.clone()].copy_from_slice(&a[log]);
    // In the original those records verify and carry the writes...
    let va = Volume::open(Arc::new(MemStorage::from_bytes(a)), &common::key(1), true).unwrap();
    assert_eq!(
        common::read_block(&va, 60).unwrap(),
        common::pattern(9, 3 * 4096)[..4096]
    );
    // ...in the fork they are invalid slots: ignored, and the fork reads as itself.
    let vb = Volume::open(
        Arc::new(MemStorage::from_bytes(b_image)),
        &common::key(1),
        true,
    )
    .expect("the fork opens");
    assert_eq!(vb.commit_point(), b_point);
    assert_eq!(common::read_block(&vb, 60).unwrap(), b_lbn60);
    assert_eq!(
        common::read_block(&vb, 70).unwrap(),
        common::pattern(10, 4096)
    );
}

/// Two writable sessions started from the same commit (an old copy put back between them)
/// commit at open, and their commit points differ even though neither wrote anything yet:
/// the random commit id keeps their log records apart (FORMAT.md §8, §9).
#[test]
fn two_sessions_from_one_commit_never_share_a_commit_point() {
    let mem = Arc::new(MemStorage::new());
    common::create(mem.clone(), SIZE).close().unwrap();
    let copy = mem.to_vec();
    let first = common::open(mem.clone()).unwrap().commit_point();
    let again = Arc::new(MemStorage::from_bytes(copy));
    let second = common::open(again).unwrap().commit_point();
    assert_eq!(first.generation, second.generation);
    assert_ne!(
        first.root_id, second.root_id,
        "the same superblock MAC twice"
    );
}
