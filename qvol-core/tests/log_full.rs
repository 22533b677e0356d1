//! The commit that a full write-ahead log forces, crashed at many points: the write that
//! triggers it and those after it may fail with an I/O error, and after a power loss the
//! volume opens and every block reads as its last flushed content or a later written one.
//! The model test's sequences are too short to fill the 32,768-record log; this one does.

mod common;

use std::sync::Arc;

use qvol_core::storage::{CrashStorage, FaultConfig, FaultStorage, OpKinds};
use qvol_core::Volume;

const SIZE: u64 = 1 << 20;
const BLOCKS: usize = (SIZE / 4096) as usize;
/// Writes before the log is nearly full (one record each).
const PREFIX: u64 = 32_768 - 16;
/// Writes that cross the full log.
const TRIGGER: u64 = 48;
/// A version that is all zeros (never written).
const ZEROS: u64 = u64::MAX;

/// Tags of the versions each block may hold: the last flushed one first.
struct Tags(Vec<Vec<u64>>);

impl Tags {
    fn write(&mut self, vol: &Volume, i: u64) -> qvol_core::Result<()> {
        let lbn = (i * 37) % BLOCKS as u64;
        self.0[lbn as usize].push(i);
        vol.write_at(lbn * 4096, &common::pattern(i, 4096))
    }

    fn flushed(&mut self) {
        for v in &mut self.0 {
            let last = v.last().copied().unwrap_or(ZEROS);
            *v = vec![last];
        }
    }

    fn check(&self, vol: &Volume, what: &str) {
        for (lbn, tags) in self.0.iter().enumerate() {
            let got = common::read_block(vol, lbn as u64)
                .unwrap_or_else(|e| panic!("{what}: block {lbn} fails to read: {e:?}"));
            let ok = tags.iter().any(|&t| {
                if t == ZEROS {
                    got.iter().all(|&b| b == 0)
                } else {
                    got == common::pattern(t, 4096)
                }
            });
            assert!(
                ok,
                "{what}: block {lbn} reads as none of its versions {tags:?}"
            );
        }
    }
}

/// Creates a volume and writes the prefix; returns the disk, the fault layer and the model.
fn prefix(
    round_trips: bool,
) -> (
    Arc<CrashStorage>,
    Arc<FaultStorage<Arc<CrashStorage>>>,
    Volume,
    Tags,
) {
    let disk = Arc::new(CrashStorage::new());
    disk.set_round_trips(round_trips);
    let fault = Arc::new(FaultStorage::new(disk.clone(), FaultConfig::never()));
    let vol = common::create(fault.clone(), SIZE);
    let mut tags = Tags(vec![vec![ZEROS]; BLOCKS]);
    for i in 0..PREFIX {
        tags.write(&vol, i).expect("prefix write");
        if i % 4096 == 4095 {
            vol.flush().expect("flush");
            tags.flushed();
        }
    }
    (disk, fault, vol, tags)
}

/// The trigger section: writes across the full log, a flush at the end.
fn trigger(vol: &Volume, tags: &mut Tags) -> qvol_core::Result<()> {
    for i in PREFIX..PREFIX + TRIGGER {
        tags.write(vol, i)?;
    }
    vol.flush()?;
    tags.flushed();
    Ok(())
}

#[test]
fn a_crash_anywhere_in_the_log_full_commit_keeps_the_contract() {
    // Dry run: the storage operations the trigger section takes, and proof it commits.
    let (_, fault, vol, mut tags) = prefix(false);
    let generation = vol.info().generation;
    let before = fault.ops();
    trigger(&vol, &mut tags).expect("trigger without faults");
    let span = fault.ops() - before;
    assert!(
        vol.info().generation > generation,
        "the log filled up but no commit happened (log records: {})",
        vol.info().log_records
    );
    drop(vol);

    let points: Vec<u64> = [0, 2, 7, span / 4, span / 2, 3 * span / 4, span - 2]
        .into_iter()
        .filter(|&k| k < span)
        .collect();
    // Also where each write is a round trip (RBD): data and records are then written
    // together (FORMAT.md §9, "Write path").
    let runs = points.iter().flat_map(|&k| [(k, false), (k, true)]);
    for (k, round_trips) in runs {
        let (disk, fault, vol, mut tags) = prefix(round_trips);
        // Hole punching may fail silently (FORMAT.md §11): fail everything else.
        fault.set_config(FaultConfig {
            fail: OpKinds::READ | OpKinds::WRITE | OpKinds::SYNC | OpKinds::SET_LEN | OpKinds::LEN,
            ..FaultConfig::after(k)
        });
        let result = trigger(&vol, &mut tags);
        // Failures in the thread of the commit the full log started may come after the
        // section returned (it makes its superblock durable after the flush: FORMAT.md
        // §10.1); any other must have failed the section.
        assert!(
            result.is_err() || fault.foreground_failures() == 0,
            "fault after {k} of {span} ops (round trips: {round_trips}): the section succeeded although the storage failed"
        );
        let image = disk.crash(k);
        drop(vol);
        let vol = common::open(Arc::new(image)).unwrap_or_else(|e| {
            panic!("fault after {k} of {span} ops (round trips: {round_trips}): open fails: {e:?}")
        });
        tags.check(
            &vol,
            &format!("fault after {k} of {span} ops (round trips: {round_trips})"),
        );
    }
}
