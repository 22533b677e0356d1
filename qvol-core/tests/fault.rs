//! I/O errors (issue 3): storage failures surface as `ErrorKind::Io`, never as integrity
//! errors, wrong data or panics; after a failed sync the volume refuses writes
//! (`PreviousIo`) until it is reopened; and the reopened volume still satisfies the crash
//! contract (every block reads as its last flushed content or a later written one).

mod common;

use std::sync::Arc;

use common::BlockHistory;
use qvol_core::storage::{CrashStorage, FaultConfig, FaultStorage, OpKinds, Storage};
use qvol_core::{ErrorKind, Volume};

const SIZE: u64 = 1 << 20;

type Stack = Arc<FaultStorage<Arc<CrashStorage>>>;

/// A fresh volume (created and closed without faults) on a crash-model disk.
fn fresh() -> Arc<CrashStorage> {
    let disk = Arc::new(CrashStorage::new());
    common::create(disk.clone(), SIZE)
        .close()
        .expect("close after create");
    disk
}

fn open_on(disk: &Arc<CrashStorage>, config: FaultConfig) -> (Stack, qvol_core::Result<Volume>) {
    let fault = Arc::new(FaultStorage::new(disk.clone(), config));
    let vol = common::open(fault.clone());
    (fault, vol)
}

/// One step of the workload: applies it to `vol` and, first, to the model (a failed
/// operation may still have landed, so its version is allowed).
fn step(vol: &Volume, model: &mut BlockHistory, i: usize) -> qvol_core::Result<()> {
    let data = |tag: u64, len: usize| common::pattern(tag * 1000 + i as u64, len);
    match i {
        0 | 4 | 9 => {
            let d = data(1, 4 * 4096);
            model.apply(i as u64 * 4096, &d);
            vol.write_at(i as u64 * 4096, &d)
        }
        1 | 5 | 8 => {
            vol.flush()?;
            model.make_durable();
            Ok(())
        }
        2 => {
            let d = data(2, 1024);
            model.apply(2 * 4096 + 512, &d);
            vol.write_at(2 * 4096 + 512, &d)
        }
        3 => {
            model.apply(0, &[0u8; 4096]);
            vol.discard(0, 4096)
        }
        6 => {
            model.apply(100 * 4096 + 512, &[0u8; 4096]);
            vol.write_zeroes(100 * 4096 + 512, 4096, true)
        }
        7 => {
            let d = data(3, 20 * 4096 + 512);
            model.apply(120 * 4096, &d);
            vol.write_at(120 * 4096, &d)
        }
        _ => {
            let mut buf = vec![0u8; 16 * 4096];
            vol.read_at(0, &mut buf)?;
            assert_eq!(
                buf,
                model.expected(0, buf.len()),
                "a read after step {i} is wrong"
            );
            Ok(())
        }
    }
}

const STEPS: usize = 11;

/// Runs the workload until the first error; returns it.
fn workload(vol: &Volume, model: &mut BlockHistory) -> Option<qvol_core::Error> {
    (0..STEPS).find_map(|i| step(vol, model, i).err())
}

#[test]
fn storage_failures_are_io_errors_and_the_crash_contract_survives_them() {
    // How many storage operations the whole workload (with its close) takes.
    let disk = fresh();
    let (fault, vol) = open_on(&disk, FaultConfig::never());
    let vol = vol.expect("open");
    let before = fault.ops();
    assert!(workload(&vol, &mut BlockHistory::new(SIZE)).is_none());
    vol.close().expect("close");
    let total = fault.ops() - before;
    assert!(
        total > 10,
        "the workload should touch the storage ({total} ops)"
    );

    for tear in [false, true] {
        for n in 0..=total {
            let disk = fresh();
            let (fault, vol) = open_on(&disk, FaultConfig::never());
            let vol = vol.expect("open");
            let mut config = FaultConfig::after(n);
            config.tear_failed_writes = tear;
            fault.set_config(config);
            let mut model = BlockHistory::new(SIZE);
            let err = workload(&vol, &mut model).or_else(|| vol.close().err());
            let what = format!("fault after {n} ops (tear {tear})");
            match &err {
                Some(e) => assert!(
                    matches!(e.kind(), ErrorKind::Io | ErrorKind::PreviousIo),
                    "{what}: a storage failure surfaced as {e:?}"
                ),
                None => assert_eq!(fault.failures(), 0, "{what}: a failure was swallowed"),
            }
            // The machine dies now: every way a power loss can go must reopen correctly.
            for seed in 0..4 {
                let image = disk.crash(seed ^ n.rotate_left(17));
                let vol = common::open(Arc::new(image))
                    .unwrap_or_else(|e| panic!("{what}, crash {seed}: open fails: {e:?}"));
                model
                    .clone()
                    .check_after_crash(&vol)
                    .unwrap_or_else(|m| panic!("{what}, crash {seed}: {m}"));
            }
        }
    }
}

#[test]
fn a_failed_sync_makes_the_volume_refuse_writes_until_reopened() {
    let disk = fresh();
    let sync_fails = FaultConfig {
        fail_after: 0,
        count: OpKinds::SYNC,
        fail: OpKinds::SYNC,
        tear_failed_writes: false,
    };
    let (fault, vol) = open_on(&disk, FaultConfig::never());
    let vol = vol.expect("open");
    let mut model = BlockHistory::new(SIZE);
    let a = common::pattern(1, 4096);
    vol.write_at(0, &a).expect("write");
    model.apply(0, &a);
    vol.flush().expect("flush");
    model.make_durable();
    let b = common::pattern(2, 8192);
    vol.write_at(4096, &b)
        .expect("write before the failing sync");
    model.apply(4096, &b);

    fault.set_config(sync_fails);
    common::assert_kind(vol.flush(), ErrorKind::Io, "the failing flush");
    // The storage works again, but the volume must not trust what it wrote before.
    fault.set_config(FaultConfig::never());
    let c = common::pattern(3, 4096);
    common::assert_kind(
        vol.write_at(0, &c),
        ErrorKind::PreviousIo,
        "a write after it",
    );
    common::assert_kind(vol.flush(), ErrorKind::PreviousIo, "a flush after it");
    common::assert_kind(
        vol.discard(0, 4096),
        ErrorKind::PreviousIo,
        "a discard after it",
    );
    common::assert_kind(
        vol.write_zeroes(0, 4096, false),
        ErrorKind::PreviousIo,
        "write_zeroes after it",
    );
    drop(vol);

    // Reopened on the disk as it is (process crash) and after a power loss: the contract.
    let vol = common::open(Arc::new(disk.process_crash())).expect("reopen");
    let mut got = vec![0u8; 3 * 4096];
    vol.read_at(0, &mut got).expect("read after reopen");
    assert_eq!(got[..4096], a[..], "the flushed block");
    for seed in 0..8 {
        let vol = common::open(Arc::new(disk.crash(seed))).expect("open after power loss");
        model
            .clone()
            .check_after_crash(&vol)
            .unwrap_or_else(|m| panic!("power loss {seed}: {m}"));
        vol.write_at(0, &c)
            .expect("a reopened volume accepts writes");
    }
}

#[test]
fn a_failed_write_is_an_io_error_and_nothing_later_is_trusted() {
    let disk = fresh();
    let writes_fail = FaultConfig {
        fail_after: 0,
        count: OpKinds::WRITE,
        fail: OpKinds::WRITE,
        tear_failed_writes: true,
    };
    // A writable open commits (it writes), so writes start failing only after it.
    let (fault, vol) = open_on(&disk, FaultConfig::never());
    let vol = vol.expect("open");
    fault.set_config(writes_fail);
    common::assert_kind(
        vol.write_at(0, &common::pattern(1, 4096)),
        ErrorKind::Io,
        "the failing write",
    );
    fault.set_config(FaultConfig::never());
    // Whatever the volume does next, it never reports success for a flush that would
    // claim the failed write durable, and never returns wrong data.
    let mut buf = vec![0u8; 4096];
    match vol.read_at(0, &mut buf) {
        Ok(()) => assert!(
            buf == vec![0u8; 4096] || buf == common::pattern(1, 4096),
            "a read after a failed write returns neither version"
        ),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::Io | ErrorKind::PreviousIo),
            "{e:?}"
        ),
    }
    drop(vol);
    let vol = common::open(Arc::new(disk.process_crash())).expect("reopen");
    vol.read_at(0, &mut buf).expect("read after reopen");
    assert!(buf == vec![0u8; 4096] || buf == common::pattern(1, 4096));
}

#[test]
fn failures_during_open_and_create_are_io_errors() {
    let disk = fresh();
    let mut n = 0;
    loop {
        let (fault, vol) = open_on(&disk, FaultConfig::after(n));
        match vol {
            Ok(_) if fault.failures() == 0 => break, // open needs fewer than n ops
            Ok(_) => panic!("open after {n} ops swallowed a storage failure"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Io, "open, fault after {n}: {e:?}"),
        }
        n += 1;
        assert!(n < 10_000, "open never finishes");
    }
    for n in 0..40 {
        let fault: Arc<dyn Storage> = Arc::new(FaultStorage::new(
            Arc::new(CrashStorage::new()),
            FaultConfig::after(n),
        ));
        let r = Volume::create(
            fault,
            common::options(SIZE, qvol_core::CipherSuite::XChaCha20Poly1305),
            &common::key(1),
        );
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Io, "create, fault after {n}: {e:?}");
        }
    }
}
