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
