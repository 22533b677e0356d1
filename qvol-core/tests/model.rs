//! Model-based test of the durability contract (a flushed write survives a power loss, an
//! acknowledged one a process crash; FORMAT.md §9 and §11): random sequences of
//! write / read / flush / discard / write_zeroes on a small volume, checked against a plain
//! in-memory reference, with crashes injected at random points through the crash model.
//!
//! - A power loss (`CrashStorage::crash`) may drop any subset of the writes made since the
//!   last sync and tear them at 512 bytes; after it, the volume must open and every block
//!   must read as its content at the last completed flush or as a later written version.
//! - A crash in the middle of an operation (a commit, a flush) is injected by making the
//!   storage fail after k operations (nothing reaches it afterwards), then losing power.
//! - A process crash (kill -9) keeps every completed write: every block must read as its
//!   latest version.
//!
//! The default run does `QVOL_MODEL_CASES` cases (256 unless set); the long run is
//! `QVOL_MODEL_CASES=10000 cargo test --release -p qvol-core --test model`.

mod common;

use std::sync::Arc;

use common::{BlockHistory, SECTOR};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};
use qvol_core::storage::{CrashPolicy, CrashStorage, FaultConfig, FaultStorage};
use qvol_core::Volume;

#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        tag: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
    Discard {
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
        unmap: bool,
    },
    /// Power loss now, survivors drawn from `seed`.
    PowerLoss {
        seed: u64,
    },
    /// kill -9 now.
    ProcessCrash,
    /// Power loss after `after` more storage operations, whatever the volume is doing.
    CrashAfterOps {
        after: u16,
        seed: u64,
    },
    /// close() then open().
    Reopen,
    /// An explicit commit (durable on return).
    Commit,
}

/// A range of `sectors` starting at `sector`, within `total` sectors: sub-block, one to a
/// few blocks, or long.
fn range(total: u64) -> impl Strategy<Value = (u64, u64)> {
    let len = prop_oneof![
        4 => 1u64..8,
        4 => (1u64..4).prop_map(|b| b * 8),
        3 => 1u64..40,
        1 => 40u64..257,
    ];
    (0..total, len).prop_map(move |(start, len)| {
        let len = len.min(total);
        (start.min(total - len), len)
    })
}

fn op(total: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (range(total), any::<u64>())
            .prop_map(|((sector, sectors), tag)| Op::Write { sector, sectors, tag }),
        3 => range(total).prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        3 => Just(Op::Flush),
        2 => range(total).prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => (range(total), any::<bool>())
            .prop_map(|((sector, sectors), unmap)| Op::WriteZeroes { sector, sectors, unmap }),
        2 => any::<u64>().prop_map(|seed| Op::PowerLoss { seed }),
        1 => Just(Op::ProcessCrash),
        2 => (0u16..400, any::<u64>()).prop_map(|(after, seed)| Op::CrashAfterOps { after, seed }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Commit),
    ]
}

/// The state under test: the volume, the storage stack under it, and the reference.
struct Harness {
    disk: Arc<CrashStorage>,
    fault: Arc<FaultStorage<Arc<CrashStorage>>>,
    vol: Option<Volume>,
    model: BlockHistory,
    /// A pending power loss injected by `CrashAfterOps`, with its seed.
    armed: Option<u64>,
    log: Vec<String>,
}

fn stack(disk: &Arc<CrashStorage>) -> Arc<FaultStorage<Arc<CrashStorage>>> {
    Arc::new(FaultStorage::new(disk.clone(), FaultConfig::never()))
}

impl Harness {
    fn new(size: u64) -> Self {
        let disk = Arc::new(CrashStorage::new());
        let fault = stack(&disk);
        let vol = common::create(fault.clone(), size);
        // Creation must be durable once it returns: the model starts from zeros.
        let disk = Arc::new(disk.crash_with(CrashPolicy::DropAll, 0));
        drop(vol);
        let fault = stack(&disk);
        let vol = common::open(fault.clone()).expect("a volume opens right after create");
        Self {
            disk,
            fault,
            vol: Some(vol),
            model: BlockHistory::new(size),
            armed: None,
            log: Vec::new(),
        }
    }

    fn vol(&self) -> &Volume {
        self.vol
            .as_ref()
            .expect("the volume is open between operations")
    }

    fn fail(&self, msg: String) -> TestCaseError {
        TestCaseError::fail(format!("{msg}\n  after: {:#?}", self.log))
    }

    /// Replaces the disk by `next` (a crash image) and reopens; `Err` if it does not open.
    fn reopen_on(&mut self, next: CrashStorage) -> Result<(), TestCaseError> {
        self.vol = None;
        self.disk = Arc::new(next);
        self.fault = stack(&self.disk);
        self.armed = None;
        match common::open(self.fault.clone()) {
            Ok(v) => {
                self.vol = Some(v);
                Ok(())
            }
            Err(e) => Err(self.fail(format!("the volume does not open after a crash: {e:?}"))),
        }
    }

    fn power_loss(&mut self, seed: u64) -> Result<(), TestCaseError> {
        let image = self.disk.crash(seed);
        self.reopen_on(image)?;
        let vol = self.vol.take();
        let result = self
            .model
            .check_after_crash(vol.as_ref().expect("just opened"));
        self.vol = vol;
        result.map_err(|m| self.fail(m))
    }

    /// An operation returned an error: legitimate only if an injected fault caused it, and
    /// then the machine is dead: lose power.
    fn on_error(&mut self, what: &str, e: qvol_core::Error) -> Result<(), TestCaseError> {
        match self.armed {
            Some(seed) if self.fault.failures() > 0 => {
                self.log
                    .push(format!("  -> {what} failed ({:?}); power loss", e.kind()));
                self.power_loss(seed)
            }
            _ => Err(self.fail(format!("{what} failed without any injected fault: {e:?}"))),
        }
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.log.push(format!("{op:?}"));
        if self.log.len() > 40 {
            self.log.remove(0);
        }
        match *op {
            Op::Write {
                sector,
                sectors,
                tag,
            } => {
                let data = common::pattern(tag, (sectors * SECTOR) as usize);
                // Record first: a write that fails midway may still have landed.
                self.model.apply(sector * SECTOR, &data);
                if let Err(e) = self.vol().write_at(sector * SECTOR, &data) {
                    return self.on_error("write", e);
                }
            }
            Op::Read { sector, sectors } => {
                let mut buf = vec![0u8; (sectors * SECTOR) as usize];
                match self.vol().read_at(sector * SECTOR, &mut buf) {
                    Err(e) => return self.on_error("read", e),
                    Ok(()) => {
                        if buf != self.model.expected(sector * SECTOR, buf.len()) {
                            return Err(self.fail("a read returned wrong data".into()));
                        }
                    }
                }
            }
            Op::Flush => match self.vol().flush() {
                Ok(()) => self.model.make_durable(),
                Err(e) => return self.on_error("flush", e),
            },
            Op::Discard { sector, sectors } => {
                self.model
                    .apply(sector * SECTOR, &vec![0u8; (sectors * SECTOR) as usize]);
                if let Err(e) = self.vol().discard(sector * SECTOR, sectors * SECTOR) {
                    return self.on_error("discard", e);
                }
            }
            Op::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => {
                self.model
                    .apply(sector * SECTOR, &vec![0u8; (sectors * SECTOR) as usize]);
                if let Err(e) = self
                    .vol()
                    .write_zeroes(sector * SECTOR, sectors * SECTOR, unmap)
                {
                    return self.on_error("write_zeroes", e);
                }
            }
            Op::Commit => match self.vol().commit() {
                Ok(()) => self.model.make_durable(),
                Err(e) => return self.on_error("commit", e),
            },
            Op::PowerLoss { seed } => self.power_loss(seed)?,
            Op::ProcessCrash => {
                let image = self.disk.process_crash();
                self.reopen_on(image)?;
                self.model
                    .check_current(self.vol())
                    .map_err(|m| self.fail(m))?;
            }
            Op::CrashAfterOps { after, seed } => {
                if self.armed.is_none() {
                    self.fault.set_config(FaultConfig::after(u64::from(after)));
                    self.armed = Some(seed);
                }
            }
            Op::Reopen => {
                let vol = self.vol.take().expect("open");
                if let Err(e) = vol.close() {
                    // close commits: with an armed fault it may fail like anything else.
                    self.vol = None;
                    return match self.armed {
                        Some(seed) if self.fault.failures() > 0 => self.power_loss(seed),
                        _ => Err(self.fail(format!("close failed: {e:?}"))),
                    };
                }
                if self.fault.failures() > 0 {
                    // A failure inside close that close did not report would be a bug.
                    return Err(self.fail("close returned Ok after a storage failure".into()));
                }
                self.model.make_durable();
                let image = self.disk.process_crash();
                self.reopen_on(image)?;
                self.model
                    .check_current(self.vol())
                    .map_err(|m| self.fail(m))?;
            }
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("QVOL_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(Config { cases: cases(), max_shrink_iters: 2000, ..Config::default() })]

    /// The durability contract under random operations and crashes.
    #[test]
    fn crash_contract_holds(
        (size, ops) in prop_oneof![3 => Just(1u64 << 20), 1 => Just(4u64 << 20)]
            .prop_flat_map(|size| (Just(size), prop::collection::vec(op(size / SECTOR), 1..60)))
    ) {
        let mut h = Harness::new(size);
        for op in &ops {
            h.run(op)?;
        }
        // The end: a last power loss, then everything must read as allowed.
        h.power_loss(0x5eed)?;
        // And the recovered state is stable: a clean close and reopen keeps it.
        let vol = h.vol.take().expect("open");
        vol.close().map_err(|e| TestCaseError::fail(format!("close after recovery: {e:?}")))?;
        let image = h.disk.process_crash();
        h.reopen_on(image)?;
        h.model.check_current(h.vol()).map_err(|m| h.fail(m))?;
    }
}

/// A fixed scenario that must hold whatever proptest draws: flushed data survives a power
/// loss that drops everything unsynced, and unflushed data may vanish but never corrupts.
#[test]
fn flushed_writes_survive_power_loss() {
    let disk = Arc::new(CrashStorage::new());
    let vol = common::create(disk.clone(), 1 << 20);
    let a = common::pattern(1, 8192);
    vol.write_at(0, &a).unwrap();
    vol.flush().unwrap();
    let b = common::pattern(2, 8192);
    vol.write_at(4096, &b).unwrap();
    let image = disk.crash_with(CrashPolicy::DropAll, 0);
    drop(vol);
    let vol = common::open(Arc::new(image)).expect("opens after power loss");
    let mut got = vec![0u8; 8192];
    vol.read_at(0, &mut got).unwrap();
    assert_eq!(&got[..4096], &a[..4096]);
    assert!(got[4096..] == a[4096..] || got[4096..] == b[..4096]);
}
