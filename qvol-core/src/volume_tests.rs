//! Unit tests of the volume engine: round trips, replay, commit, discard, tampering, crashes.
//! (The big model-based, process-crash and fault suites are in `tests/`.)

use std::sync::Arc;

use crate::layout::*;
use crate::storage::{CrashPolicy, CrashStorage, MemStorage, Storage};
use crate::{CipherSuite, CreateOptions, ErrorKind, Volume, VolumeKey};

fn opts(size: u64, suite: CipherSuite) -> CreateOptions {
    CreateOptions {
        key_epoch: 0,
        size,
        suite,
        name: "test".into(),
        volume_id: [0x11; 16],
        keyslots: vec![vec![1, 2, 3]],
        compression: None,
    }
}

fn key() -> VolumeKey {
    VolumeKey::from_bytes([0x42; 32])
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read(vol: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    vol.read_at(off, &mut buf).unwrap();
    buf
}

#[test]
fn write_read_reopen_for_both_suites() {
    for suite in CipherSuite::ALL {
        let st = Arc::new(MemStorage::new());
        let vol = Volume::create(st.clone(), opts(64 << 20, suite), &key()).unwrap();
        assert_eq!(
            read(&vol, 0, 8192),
            vec![0; 8192],
            "unwritten reads as zeros"
        );
        let data = pattern(1, 1 << 20);
        vol.write_at(4096 * 10, &data).unwrap();
        vol.write_at(512 * 3, &pattern(2, 1024)).unwrap();
        vol.write_at((64 << 20) - 512, &pattern(3, 512)).unwrap();
        assert_eq!(read(&vol, 4096 * 10, 1 << 20), data);
        let mut expect = vec![0u8; 4096];
        expect[1536..2560].copy_from_slice(&pattern(2, 1024));
        assert_eq!(read(&vol, 0, 4096), expect);
        vol.close().unwrap();
        let vol = Volume::open(st.clone(), &key(), false).unwrap();
        assert_eq!(read(&vol, 4096 * 10, 1 << 20), data);
        assert_eq!(read(&vol, 0, 4096), expect);
        assert_eq!(read(&vol, (64 << 20) - 512, 512), pattern(3, 512));
        assert_eq!(vol.info().suite, suite);
        assert_eq!(vol.info().keyslot_count, 1);
    }
}

#[test]
fn requests_are_checked() {
    let vol = Volume::create(
        Arc::new(MemStorage::new()),
        opts(1 << 20, CipherSuite::default()),
        &key(),
    )
    .unwrap();
    let mut buf = vec![0u8; 512];
    assert_eq!(
        vol.read_at(100, &mut buf).unwrap_err().kind(),
        ErrorKind::Unaligned
    );
    assert_eq!(
        vol.read_at(1 << 20, &mut buf).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        vol.write_at(u64::MAX - 511, &buf).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    let bad = CreateOptions {
        key_epoch: 0,
        size: 1000,
        ..opts(0, CipherSuite::default())
    };
    assert!(Volume::create(Arc::new(MemStorage::new()), bad, &key()).is_err());
}

#[test]
fn wrong_key_and_foreign_files_are_told_apart() {
    let st = Arc::new(MemStorage::new());
    Volume::create(st.clone(), opts(1 << 20, CipherSuite::default()), &key())
        .unwrap()
        .close()
        .unwrap();
    let err = Volume::open(st.clone(), &VolumeKey::from_bytes([1; 32]), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKey);
    let junk = Arc::new(MemStorage::from_bytes(vec![7u8; 1 << 23]));
    assert_eq!(
        Volume::open(junk, &key(), false).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let info = crate::read_header(&*st).unwrap();
    assert_eq!(info.keyslots[0], vec![1, 2, 3]);
    assert!(info.keyslots[1..].iter().all(Vec::is_empty));
    assert_eq!(info.keyslots.len(), crate::MAX_KEYSLOTS);
    assert_eq!(info.size, 1 << 20);
}

#[test]
fn unclosed_writes_come_back_from_the_log() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(16 << 20, CipherSuite::default()), &key()).unwrap();
    vol.write_at(0, &pattern(5, 3 * 4096)).unwrap();
    vol.write_at(512, &pattern(6, 512)).unwrap();
    vol.discard(4096, 4096).unwrap();
    let gen = vol.info().generation;
    drop(vol); // no close, no commit: only the log knows
    let vol = Volume::open(st.clone(), &key(), true).unwrap();
    let mut expect = pattern(5, 3 * 4096);
    expect[512..1024].copy_from_slice(&pattern(6, 512));
    expect[4096..8192].fill(0);
    assert_eq!(read(&vol, 0, 3 * 4096), expect);
    assert_eq!(
        vol.info().generation,
        gen,
        "a read-only open does not commit"
    );
    assert_eq!(
        vol.write_at(0, &[0; 512]).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    drop(vol);
    let vol = Volume::open(st, &key(), false).unwrap();
    assert_eq!(
        vol.info().generation,
        gen + 1,
        "a writable open commits the replayed log"
    );
    assert_eq!(read(&vol, 0, 3 * 4096), expect);
}

#[test]
fn filling_the_log_commits_by_itself() {
    let st = Arc::new(MemStorage::new());
    // 128 MiB: the shortest log, 32,768 records.
    let vol = Volume::create(st.clone(), opts(128 << 20, CipherSuite::Aegis256), &key()).unwrap();
    let gen = vol.info().generation;
    let chunk = pattern(9, 1 << 20);
    for i in 0..200u64 {
        vol.write_at((i % 128) << 20, &chunk).unwrap();
    }
    assert!(
        vol.info().generation > gen,
        "51,200 records do not fit in one log"
    );
    drop(vol);
    let vol = Volume::open(st, &key(), false).unwrap();
    for i in [0u64, 77, 127] {
        assert_eq!(read(&vol, i << 20, 1 << 20), chunk);
    }
}

#[test]
fn a_long_log_holds_more_writes_and_replays_them() {
    let st = Arc::new(MemStorage::new());
    // 1 GiB: a 32 MiB log of 262,144 records.
    let vol = Volume::create(st.clone(), opts(1 << 30, CipherSuite::Aegis256), &key()).unwrap();
    assert_eq!(vol.header.log_len, 32 << 20);
    assert_eq!(vol.info().format_version, FORMAT_VERSION);
    let gen = vol.info().generation;
    let chunk = pattern(3, 1 << 20);
    for i in 0..160u64 {
        vol.write_at(i << 20, &chunk).unwrap();
    }
    assert_eq!(vol.info().log_records, 160 * 256);
    assert_eq!(
        vol.info().generation,
        gen,
        "40,960 records fit without a commit"
    );
    drop(vol);
    let vol = Volume::open(st, &key(), false).unwrap();
    assert!(
        vol.info().generation > gen,
        "the replayed log was committed"
    );
    for i in [0u64, 100, 159] {
        assert_eq!(read(&vol, i << 20, 1 << 20), chunk);
    }
}

#[test]
fn too_many_changed_map_leaves_commit_before_the_log_fills() {
    let st = Arc::new(MemStorage::new());
    // 8 GiB + 1 MiB: 32,772 leaves of 64 blocks, a 64 MiB log.
    let size = (8 << 30) + (1 << 20);
    let vol = Volume::create(st.clone(), opts(size, CipherSuite::Aegis256), &key()).unwrap();
    let gen = vol.info().generation;
    let block = pattern(5, BS);
    let leaves = crate::commit::MAX_DIRTY_LEAVES + 2;
    for leaf in 0..leaves {
        vol.write_at(leaf * FANOUT * BLOCK_SIZE, &block).unwrap();
    }
    assert!(
        vol.info().generation > gen,
        "a commit bounded the dirty leaves"
    );
    assert!(vol.info().log_records < leaves);
    assert!(vol.map.dirty_leaves() < leaves);
    drop(vol);
    let vol = Volume::open(st, &key(), false).unwrap();
    for leaf in [0, leaves / 2, leaves - 1] {
        assert_eq!(read(&vol, leaf * FANOUT * BLOCK_SIZE, BS), block);
    }
}

#[test]
fn discard_frees_and_punches_space() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(64 << 20, CipherSuite::default()), &key()).unwrap();
    vol.write_at(0, &pattern(1, 8 << 20)).unwrap();
    vol.commit().unwrap();
    let full = vol.info().allocated_bytes;
    assert!(full >= 8 << 20);
    vol.discard(0, 8 << 20).unwrap();
    vol.write_zeroes(0, 512, false).unwrap();
    assert_eq!(read(&vol, 0, 8 << 20), vec![0; 8 << 20]);
    vol.commit().unwrap();
    let after = vol.info().allocated_bytes;
    assert!(
        after < full - (7 << 20),
        "{after} of {full} bytes still allocated"
    );
    // The punched data region reads as zeros in the file.
    let bytes = st.to_vec();
    let data = &bytes[vol.header.regions().data_offset() as usize..];
    let nonzero_blocks = data
        .chunks(BS)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert!(
        nonzero_blocks < 64,
        "{nonzero_blocks} blocks still hold bytes"
    );
    // Freed space is reused.
    vol.write_at(0, &pattern(2, 8 << 20)).unwrap();
    vol.close().unwrap();
    let vol = Volume::open(st, &key(), false).unwrap();
    assert_eq!(read(&vol, 0, 8 << 20), pattern(2, 8 << 20));
}

#[test]
fn tampered_data_and_nodes_are_detected() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(8 << 20, CipherSuite::default()), &key()).unwrap();
    vol.write_at(0, &pattern(1, 4096)).unwrap();
    vol.close().unwrap();
    let before = st.to_vec();
    // The first data block written after create.
    let vol = Volume::open(st.clone(), &key(), false).unwrap();
    let mut entry = [crate::node::LeafEntry::default()];
    vol.map.lookup(&*st, &vol.keys(), 0, &mut entry).unwrap();
    drop(vol);
    let pbn = entry[0].pbn;
    st.write_all_at(&[0xff], pbn * BLOCK_SIZE + 9).unwrap();
    let vol = Volume::open(st.clone(), &key(), false).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        vol.read_at(0, &mut buf).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    assert_eq!(
        read(&vol, 4096, 4096),
        vec![0; 4096],
        "other blocks still read"
    );
    drop(vol);
    // Both superblocks damaged: refused with Integrity, not WrongKey.
    let st2 = Arc::new(MemStorage::from_bytes(before));
    st2.write_all_at(&[1], SUPERBLOCK_OFFSETS[0] + 100).unwrap();
    st2.write_all_at(&[1], SUPERBLOCK_OFFSETS[1] + 100).unwrap();
    assert_eq!(
        Volume::open(st2, &key(), false).unwrap_err().kind(),
        ErrorKind::Integrity
    );
}

#[test]
fn an_older_block_put_back_is_detected() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(8 << 20, CipherSuite::default()), &key()).unwrap();
    vol.write_at(0, &pattern(1, 4096)).unwrap();
    vol.commit().unwrap();
    let mut e1 = [crate::node::LeafEntry::default()];
    vol.map.lookup(&*st, &vol.keys(), 0, &mut e1).unwrap();
    let old = st.to_vec();
    vol.write_at(0, &pattern(2, 4096)).unwrap();
    vol.commit().unwrap();
    let mut e2 = [crate::node::LeafEntry::default()];
    vol.map.lookup(&*st, &vol.keys(), 0, &mut e2).unwrap();
    vol.close().unwrap();
    // Copy the old ciphertext over the new block.
    let at = (e1[0].pbn * BLOCK_SIZE) as usize;
    st.write_all_at(&old[at..at + BS], e2[0].pbn * BLOCK_SIZE)
        .unwrap();
    let vol = Volume::open(st, &key(), false).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        vol.read_at(0, &mut buf).unwrap_err().kind(),
        ErrorKind::Integrity
    );
}

/// `QVOL_CRASH_SEEDS` sets the number of seeds (40 unless set).
#[test]
fn crashes_leave_flushed_or_later_data() {
    let seeds = std::env::var("QVOL_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40u64);
    for seed in 0..seeds {
        let st = Arc::new(CrashStorage::new());
        let vol =
            Volume::create(st.clone(), opts(4 << 20, CipherSuite::default()), &key()).unwrap();
        vol.write_at(0, &pattern(1, 64 * 1024)).unwrap();
        vol.flush().unwrap();
        vol.write_at(0, &pattern(2, 32 * 1024)).unwrap();
        vol.write_at(8192, &pattern(3, 512)).unwrap();
        if seed % 3 == 0 {
            vol.commit().unwrap();
            vol.write_at(4096, &pattern(4, 4096)).unwrap();
        }
        let crashed = Arc::new(st.crash_with(CrashPolicy::from_seed(seed), seed));
        drop(vol);
        let vol = Volume::open(crashed, &key(), false)
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after crash failed: {e:?}"));
        let got = read(&vol, 0, 64 * 1024);
        for b in 0..16usize {
            let blk = &got[b * BS..(b + 1) * BS];
            let flushed = &pattern(1, 64 * 1024)[b * BS..(b + 1) * BS];
            assert!(
                blk == flushed || b < 8,
                "seed {seed}: block {b} lost its flushed content (zeros: {}, policy {:?})",
                blk.iter().all(|&x| x == 0),
                CrashPolicy::from_seed(seed)
            );
        }
        vol.close().unwrap();
    }
}

#[test]
fn several_threads_write_and_read_at_once() {
    let st = Arc::new(MemStorage::new());
    let vol = Arc::new(
        Volume::create(st.clone(), opts(64 << 20, CipherSuite::default()), &key()).unwrap(),
    );
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let off = (u64::from(t) * 1000 + i) * 4096;
                    vol.write_at(off, &pattern(t, 4096)).unwrap();
                    vol.write_at(off + 512, &pattern(t + 100, 512)).unwrap();
                    if i % 50 == 0 {
                        vol.commit().unwrap();
                    }
                    let mut want = pattern(t, 4096);
                    want[512..1024].copy_from_slice(&pattern(t + 100, 512));
                    assert_eq!(read(&vol, off, 4096), want);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let vol = Arc::try_unwrap(vol).unwrap();
    vol.close().unwrap();
    let vol = Volume::open(st, &key(), false).unwrap();
    let mut want = pattern(3, 4096);
    want[512..1024].copy_from_slice(&pattern(103, 512));
    assert_eq!(read(&vol, (3000 + 199) * 4096, 4096), want);
}

#[test]
fn trimmed_leaves_reload_verified() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(64 << 20, CipherSuite::default()), &key()).unwrap();
    for i in 0..40u64 {
        vol.write_at(i * 256 * 4096, &pattern(i as u8, 4096))
            .unwrap();
    }
    vol.commit().unwrap();
    vol.map.trim(0);
    for i in 0..40u64 {
        assert_eq!(read(&vol, i * 256 * 4096, 4096), pattern(i as u8, 4096));
    }
    vol.write_at(4096, &pattern(99, 4096)).unwrap();
    vol.close().unwrap();
    let vol = Volume::open(st, &key(), false).unwrap();
    assert_eq!(read(&vol, 4096, 4096), pattern(99, 4096));
    assert_eq!(read(&vol, 39 * 256 * 4096, 4096), pattern(39, 4096));
}

/// A shrink lowers the size, and with it the physical capacity the allocator and log
/// replay accept; blocks already allocated above the smaller capacity (live data, nodes,
/// records logged after the shrink) must stay usable: the image must reopen, replay, and
/// free them like any other block.
#[test]
fn blocks_above_a_shrunk_capacity_stay_usable() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(64 << 20, CipherSuite::default()), &key()).unwrap();
    let small = crate::alloc::space_capacity(vol.header.regions(), 1024);
    // Live data within the future size, at physical blocks above the future capacity.
    vol.alloc.lock().set_cursor(small + 100);
    vol.write_at(0, &pattern(1, 4096)).unwrap();
    vol.write_at(4096, &pattern(2, 4096)).unwrap();
    vol.resize(4 << 20).unwrap();
    // Written after the shrink, in this session, before any commit: only the log has it.
    vol.alloc.lock().set_cursor(small + 200);
    vol.write_at(8192, &pattern(3, 4096)).unwrap();
    drop(vol); // a crash: the log must replay
    let vol = Volume::open(st.clone(), &key(), false).unwrap();
    assert_eq!(vol.size(), 4 << 20);
    assert_eq!(read(&vol, 0, 4096), pattern(1, 4096));
    assert_eq!(read(&vol, 8192, 4096), pattern(3, 4096));
    // Overwriting frees the old copies, above the small capacity.
    vol.write_at(0, &pattern(4, 4096)).unwrap();
    vol.discard(4096, 8192).unwrap();
    vol.commit().unwrap();
    let r = vol.check(&mut |_, _| {}).unwrap();
    assert!(r.is_clean(), "{r:#?}");
    vol.close().unwrap();
    let vol = Volume::open(st, &key(), true).unwrap();
    assert_eq!(read(&vol, 0, 4096), pattern(4, 4096));
    assert_eq!(read(&vol, 4096, 8192), vec![0; 8192]);
}

#[test]
fn leaves_macd_ahead_of_a_commit_and_changed_after_are_macd_again() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), opts(1 << 20, CipherSuite::default()), &key()).unwrap();
    vol.write_at(0, &pattern(1, 8192)).unwrap();
    vol.write_at(70 * 4096, &pattern(2, 4096)).unwrap();
    vol.map.premac_dirty(&vol.keys());
    // Leaf 0 changes after its MACs were computed; leaf 1 does not.
    vol.write_at(4096, &pattern(3, 4096)).unwrap();
    vol.commit().unwrap();
    drop(vol);
    let vol = Volume::open(st, &key(), true).unwrap();
    let mut want = pattern(1, 8192);
    want[4096..].copy_from_slice(&pattern(3, 4096));
    assert_eq!(read(&vol, 0, 8192), want);
    assert_eq!(read(&vol, 70 * 4096, 4096), pattern(2, 4096));
}

#[test]
fn the_turn_to_prepare_a_commit_comes_once_per_log_epoch() {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(st, opts(1 << 20, CipherSuite::default()), &key()).unwrap();
    let slots = Regions::for_size(1 << 20).log_slots() / 2;
    assert!(vol.wal.try_reserve(slots * 7 / 8 - 1));
    assert!(!vol.wal.take_prepare_turn(), "before 7/8 of the area");
    assert!(vol.wal.try_reserve(1));
    assert!(vol.wal.take_prepare_turn());
    assert!(!vol.wal.take_prepare_turn(), "once");
}
