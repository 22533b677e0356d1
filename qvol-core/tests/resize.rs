//! Resizing (FORMAT.md §16): growth keeps every block and snapshot, the new range reads as
//! zeros, trees get taller; a shrink is refused while a snapshot holds the tail and otherwise
//! drops it; cut after any storage operation (kill -9, power loss) the image opens with the old
//! size or the new one and everything reads back.

mod common;

use std::sync::Arc;

use qvol_core::storage::{CrashStorage, FaultConfig, FaultStorage, MemStorage, OpKinds, Storage};
use qvol_core::{ErrorKind, OpenOptions, Volume};

const MIB: u64 = 1 << 20;

fn block(tag: u64) -> Vec<u8> {
    common::pattern(tag, 4096)
}

fn clean(vol: &Volume, what: &str) {
    let r = vol.check(&mut |_, _| {}).unwrap();
    assert!(r.is_clean(), "{what}: {r:#?}");
}

#[test]
fn grow_keeps_data_and_snapshots_and_shrink_drops_the_tail() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, 8 * MIB);
    for lbn in 0..100 {
        vol.write_at(lbn * 4096, &block(lbn)).unwrap();
    }
    vol.write_at(8 * MIB - 4096, &block(999)).unwrap();
    vol.create_snapshot("small").unwrap();
    // 8 MiB -> 1 GiB: the map grows from height 1 to 2, the space tree too.
    vol.resize(1 << 30).unwrap();
    assert_eq!(vol.size(), 1 << 30);
    assert_eq!(common::read_block(&vol, 7).unwrap(), block(7));
    assert_eq!(common::read_block(&vol, 2047).unwrap(), block(999));
    assert_eq!(common::read_block(&vol, 100_000).unwrap(), vec![0; 4096]);
    vol.write_at((1 << 30) - 4096, &block(5)).unwrap();
    vol.write_at(3 * 4096, &block(33)).unwrap();
    clean(&vol, "grown");
    vol.close().unwrap();

    let vol = common::open(st.clone() as Arc<dyn Storage>).unwrap();
    assert_eq!(vol.size(), 1 << 30);
    assert_eq!(common::read_block(&vol, (1 << 18) - 1).unwrap(), block(5));
    assert_eq!(common::read_block(&vol, 3).unwrap(), block(33));
    clean(&vol, "reopened");
    // The snapshot of the small disk still reads; reverting to it keeps the new size.
    let before = vol.info().allocated_bytes;
    vol.revert_to_snapshot("small", Some("big")).unwrap();
    assert_eq!(vol.size(), 1 << 30);
    assert_eq!(common::read_block(&vol, 3).unwrap(), block(3));
    assert_eq!(
        common::read_block(&vol, (1 << 18) - 1).unwrap(),
        vec![0; 4096]
    );
    clean(&vol, "reverted to the small snapshot");
    assert!(vol.info().allocated_bytes >= before);

    // A shrink is refused while a snapshot holds the tail.
    let err = vol.resize(4 * MIB).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    vol.delete_snapshot("big").unwrap();
    vol.delete_snapshot("small").unwrap();
    clean(&vol, "deleted both");
    let plan = vol.resize_plan(4 * MIB).unwrap();
    assert_eq!(plan.dropped_bytes, 4096, "block 2047 is past 4 MiB");
    vol.resize(4 * MIB).unwrap();
    assert_eq!(
        vol.read_at(4 * MIB, &mut [0u8; 4096]).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    clean(&vol, "shrunk");
    vol.close().unwrap();
    let vol = common::open(st.clone() as Arc<dyn Storage>).unwrap();
    assert_eq!(vol.size(), 4 * MIB);
    assert_eq!(common::read_block(&vol, 99).unwrap(), block(99));
    // Growing again: the dropped tail reads as zeros.
    vol.resize(8 * MIB).unwrap();
    assert_eq!(common::read_block(&vol, 2047).unwrap(), vec![0; 4096]);
    clean(&vol, "grown again");
    assert_eq!(
        vol.resize(4097).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let snap = Volume::open_with(
        st.clone() as Arc<dyn Storage>,
        &common::key(1),
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        snap.resize(16 * MIB).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

/// A growth cut after every storage operation, as kill -9 and as power losses: the image
/// opens with one of the two sizes, every block reads back, and `check` is clean.
#[test]
fn a_growth_cut_anywhere_leaves_the_old_size_or_the_new_one() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, 8 * MIB);
    for lbn in 0..80 {
        vol.write_at(lbn * 4096, &block(lbn)).unwrap();
    }
    vol.create_snapshot("s").unwrap();
    vol.write_at(0, &block(500)).unwrap();
    vol.close().unwrap();
    let bytes = st.to_vec();
    let mut n = 0u64;
    loop {
        let crash = Arc::new(CrashStorage::from_bytes(bytes.clone()));
        let fault = Arc::new(FaultStorage::new(crash.clone(), FaultConfig::never()));
        let vol = common::open(fault.clone() as Arc<dyn Storage>).unwrap();
        fault.set_config(FaultConfig {
            fail_after: n,
            count: OpKinds::MUTATIONS,
            fail: OpKinds::ALL,
            tear_failed_writes: true,
        });
        let done = vol.resize(1 << 30).is_ok();
        drop(vol);
        let images = std::iter::once(crash.process_crash().live_image())
            .chain((0..3).map(|seed| crash.crash(seed).durable_image()));
        for (i, image) in images.enumerate() {
            let what = format!("cut after {n} operations, image {i}");
            let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
            let vol = common::open(st.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let size = vol.size();
            assert!(size == 8 * MIB || size == 1 << 30, "{what}: size {size}");
            if done && i == 0 {
                assert_eq!(size, 1 << 30, "{what}: a finished resize sticks");
            }
            assert_eq!(common::read_block(&vol, 0).unwrap(), block(500), "{what}");
            assert_eq!(common::read_block(&vol, 79).unwrap(), block(79), "{what}");
            clean(&vol, &what);
            vol.close().unwrap();
            let vol = common::open(st).unwrap();
            assert_eq!(vol.size(), size, "{what}: settled on another size");
        }
        if done {
            break;
        }
        n += 1;
        assert!(n < 200, "the resize never finished");
    }
}

/// A keyslot removed while a resize waits for the volume must stay removed: the resize
/// must not write back the keyslot area it read before the change (a revoked key would
/// open the volume again).
#[test]
fn a_resize_racing_a_keyslot_change_does_not_bring_back_old_slots() {
    let mem = Arc::new(MemStorage::new());
    let (parked_tx, parked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    // Once armed, the first write of a staged header area (36 KiB past block 0) stops until
    // released: a keyslot change is then parked holding the volume's gate.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let parked = std::sync::Mutex::new(Some(parked_tx));
    let release = std::sync::Mutex::new(Some(release_rx));
    let st = {
        let armed = armed.clone();
        common::Hooked::new(mem.clone(), false, move |buf, offset| {
            if offset != 0
                && buf.len() == 9 * 4096
                && armed.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                parked.lock().unwrap().take().unwrap().send(()).unwrap();
                release.lock().unwrap().take().unwrap().recv().unwrap();
            }
            true
        })
    };
    let vol = Arc::new(common::create(st, 8 * MIB));
    vol.set_keyslots(&[b"old key".to_vec(), b"revoked key".to_vec()])
        .unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let v = vol.clone();
    let change = std::thread::spawn(move || v.set_keyslots(&[b"old key".to_vec()]));
    parked_rx.recv().unwrap();
    // The change holds the gate; the resize reads the volume's state and waits for it.
    let v = vol.clone();
    let resize = std::thread::spawn(move || v.resize(16 * MIB));
    std::thread::sleep(std::time::Duration::from_millis(300));
    release_tx.send(()).unwrap();
    change.join().unwrap().unwrap();
    let resized = resize.join().unwrap();
    assert_eq!(vol.keyslots()[1], Vec::<u8>::new(), "{resized:?}");
    drop(vol);
    let vol = common::open(mem as Arc<dyn Storage>).unwrap();
    assert_eq!(
        vol.keyslots()[1],
        Vec::<u8>::new(),
        "the revoked slot is back"
    );
}

/// Snapshots of three map heights (8 MiB, 1 GiB, 100 GiB), written between, reverted to and
/// deleted in every order: every step reads what it should and `check` (which compares the
/// bitmap with what the maps hold: no leak, no double free) stays clean.
#[test]
fn snapshots_of_three_heights_revert_and_delete_cleanly() {
    for order in [[0usize, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
        let st = Arc::new(MemStorage::new());
        let vol = common::create(st.clone() as Arc<dyn Storage>, 8 * MIB);
        vol.write_at(0, &block(1)).unwrap();
        vol.write_at(4096 * 2047, &block(2)).unwrap();
        vol.create_snapshot("h1").unwrap();
        vol.write_at(0, &block(3)).unwrap();
        vol.resize(1 << 30).unwrap();
        vol.write_at((1 << 30) - 4096, &block(4)).unwrap();
        vol.create_snapshot("h2").unwrap();
        vol.write_at(4096, &block(5)).unwrap();
        vol.resize(100 << 30).unwrap();
        vol.write_at((100 << 30) - 4096, &block(6)).unwrap();
        vol.write_at(0, &block(7)).unwrap();
        vol.create_snapshot("h3").unwrap();
        vol.write_at(4096 * 2047, &block(8)).unwrap();
        clean(&vol, "built");
        vol.revert_to_snapshot("h1", Some("now")).unwrap();
        assert_eq!(common::read_block(&vol, 0).unwrap(), block(1));
        assert_eq!(common::read_block(&vol, 1).unwrap(), vec![0; 4096]);
        clean(&vol, "reverted to h1");
        vol.write_at(0, &block(9)).unwrap();
        vol.write_at((100 << 30) - 8192, &block(10)).unwrap();
        vol.commit().unwrap();
        clean(&vol, "written after the revert");
        let names = ["h1", "h2", "h3", "now"];
        for (k, &i) in order.iter().enumerate() {
            let usage = vol.snapshot_usage().unwrap();
            assert_eq!(usage.len(), 4 - k);
            if k == 1 {
                let target = names[order[2]];
                vol.revert_to_snapshot(target, None).unwrap();
                clean(&vol, &format!("{order:?}: reverted to {target}"));
            }
            vol.delete_snapshot(names[i]).unwrap();
            clean(&vol, &format!("{order:?}: deleted {}", names[i]));
        }
        vol.write_at(4096 * 3, &block(11)).unwrap();
        vol.close().unwrap();
        let vol = common::open(st.clone() as Arc<dyn Storage>).unwrap();
        clean(&vol, "reopened");
        let used = vol.info().allocated_bytes;
        vol.discard(0, 100 << 30).unwrap();
        vol.commit().unwrap();
        clean(&vol, "all discarded");
        assert!(vol.info().allocated_bytes < used);
    }
}

/// A shrink of a grown disk looks for data past the new end in snapshots of the smaller
/// disk too: their maps do not reach that far, which means no data there, not an error.
#[test]
fn a_shrink_judges_snapshots_shorter_than_the_range() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, 8 * MIB);
    vol.write_at(0, &block(1)).unwrap();
    vol.create_snapshot("small").unwrap();
    vol.resize(1 << 30).unwrap();
    vol.write_at((1 << 30) - 4096, &block(2)).unwrap();
    let plan = vol.resize_plan(512 * MIB).unwrap();
    assert_eq!(plan.dropped_bytes, 4096);
    assert!(plan.snapshots_past_end.is_empty(), "{plan:?}");
    vol.resize(512 * MIB).unwrap();
    clean(&vol, "shrunk");
    assert_eq!(common::read_block(&vol, 0).unwrap(), block(1));
}

/// A snapshot of the smaller disk, opened on its own after the disk grew, reads as the disk
/// it was: zeros past its old end, not an error.
#[test]
fn a_snapshot_of_the_smaller_disk_reads_zeros_past_its_end() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, 8 * MIB);
    vol.write_at(0, &block(1)).unwrap();
    vol.create_snapshot("small").unwrap();
    vol.resize(1 << 30).unwrap();
    vol.write_at((1 << 30) - 4096, &block(2)).unwrap();
    vol.close().unwrap();
    let snap = Volume::open_with(
        st.clone() as Arc<dyn Storage>,
        &common::key(1),
        OpenOptions {
            read_only: true,
            snapshot: Some("small".into()),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(common::read_block(&snap, 0).unwrap(), block(1));
    assert_eq!(
        common::read_block(&snap, (1 << 18) - 1).unwrap(),
        vec![0; 4096]
    );
    let _ = snap.allocation(0, snap.size(), usize::MAX).unwrap();
}

/// A power loss while a header change writes the new header area in place (FORMAT.md §3.1,
/// step 4) can tear the header block. The staged copy, which the newest superblock names,
/// is then the header that counts: the image opens with the new size, and a writable open
/// repairs the header in place.
#[test]
fn a_header_torn_in_place_opens_from_the_staged_copy() {
    use qvol_core::storage::CrashPolicy;
    let mut torn = 0;
    for after in 0..40u64 {
        for seed in 0..200u64 {
            let disk = Arc::new(CrashStorage::new());
            let vol = common::create(disk.clone(), 1 << 20);
            let disk = Arc::new(disk.crash_with(CrashPolicy::DropAll, 0));
            drop(vol);
            let fault = Arc::new(FaultStorage::new(disk.clone(), FaultConfig::never()));
            let vol = common::open(fault.clone()).expect("open");
            fault.set_config(FaultConfig::after(after));
            let cut = vol.resize(2 << 20).is_err();
            drop(vol);
            if !cut {
                continue;
            }
            let image = disk.crash(seed).durable_image();
            if qvol_core::decode_header(&image[..4096]).is_ok() {
                continue;
            }
            torn += 1;
            let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
            let what = format!("cut after {after}, power loss {seed}");
            let ro = Volume::open(st.clone(), &common::key(1), true)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                ro.size(),
                2 << 20,
                "{what}: a torn header means step 4 had begun"
            );
            drop(ro);
            let rw = common::open(st.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
            rw.close().expect("close");
            let mut header = vec![0u8; 4096];
            st.read_exact_at(&mut header, 0).unwrap();
            assert_eq!(
                qvol_core::decode_header(&header).expect("repaired").size,
                2 << 20,
                "{what}"
            );
        }
        if torn >= 3 {
            break;
        }
    }
    assert!(
        torn > 0,
        "no power loss tore the header: the test tests nothing"
    );
}
