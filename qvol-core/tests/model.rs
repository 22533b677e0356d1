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
//!   latest version. It too can be injected in the middle of an operation (the storage
//!   fails after k operations, then the process dies): the operation's own writes may or
//!   may not have landed.
//! - Snapshot create / delete / revert (with and without keeping the current state) commit:
//!   one that returned survives any later crash; one a crash interrupts happened whole or
//!   not at all (the snapshot list and the live disk agree on which). After every crash and
//!   reopen, every snapshot the model holds reads back exactly (a read-only snapshot view),
//!   the live disk reads as allowed, and `Volume::check` is clean: nothing damaged, no
//!   block leaked.
//! - Send / receive round trips: between operations, a snapshot the model holds is sent from
//!   the live sending image (keyless, as it lies on the storage) and received into a second,
//!   separate image: incrementally from the snapshot that image received last when the
//!   sender still holds it, else into a fresh image as a full stream (or a full stream of an
//!   older snapshot, then an incremental). The received snapshot must read back exactly as
//!   the model's, the receiver's live disk must read as it too, and the receiver's `check`
//!   must be clean. (A snapshot with an empty map is not sent yet: see `send_receive`.)
//! - Re-encryption (FORMAT.md §17): starts to a new key (sometimes a new suite) and steps
//!   of a few map leaves, interleaved with everything above, cut by the same crashes. It
//!   changes no content: the live disk and every snapshot must read as the model says
//!   throughout. The model tracks the key state (one key; or, mid-way, the new key and the
//!   old one, which both open the volume and see the same progress, which never goes
//!   back); after a crash that cut a start or a step, the newer key is tried first, the
//!   older one only if it is refused with `WrongKey`, and what the volume reports
//!   (re-encrypting or not, its suite, the keyslot in force) must be the outcome of the
//!   key that opened it. Once a finish committed, the old key opens nothing. Mid-way, a
//!   send is refused; a receiver seeded before the sender's re-encryption refuses its
//!   incrementals (a full stream seeds a new one, under the new key). A re-encryption
//!   still in progress at the end is finished, then checked the same way.
//! - Resizes (FORMAT.md §16), interleaved with all of the above and cut by the same crashes:
//!   to sizes up to twice the first one, down to a few blocks, back to it, past 16 MiB (the
//!   map grows from height 1 to 2) and invalid ones (`InvalidInput`, nothing changes). The
//!   ranges of the other operations are folded into the size the disk has when they run.
//!   `resize_plan` must name every snapshot the model has data for past a smaller end, and
//!   count at least the live disk's data there; the resize is refused (`Refused`) exactly
//!   when the plan names one. A shrink drops the tail (it reads as zeros if the disk grows
//!   back); one that returned committed (everything before it durable); a crash that cuts
//!   it leaves the old size (the live disk as the history allows, the tail dropped or not)
//!   or the new one, never another, with the snapshots unchanged. Snapshots keep their
//!   content: a snapshot view has the disk's size now, and a snapshot of a smaller disk
//!   reads zeros past its end (a revert to it too). Mid-way through a re-encryption a
//!   resize works like any other time (a shrink may leave fewer leaves than were done: the
//!   next step finishes it). A stream of a larger disk than the receiving image is refused
//!   (`Refused`) unless it holds nothing past that image's end; the image then grows to the
//!   sender's size and receives it. `resize_scenario` goes through these cases in a fixed
//!   order whatever proptest draws.
//! - Compression (FORMAT.md §18): 2 cases in 5 run on a volume with compression units (8 to
//!   64 KiB, zstd level 1 or 3). Their writes carry compressible data (text, text after
//!   random bytes, mostly zeros, now and then random bytes; each write's own, so that every
//!   version stays checkable), and whole aligned groups are written as often as anything
//!   else, so that units are written, then partly overwritten, discarded and zeroed, and
//!   cut by the same crashes; the compression level is changed (a commit: the level after a
//!   crash is the last one set, or one the crash cut). Everything above is checked the
//!   same way, `check` included, and snapshots, sends (stream version 2, with units) and
//!   re-encryption run on them as in the other cases. `compression_usage` must count every
//!   block with data. Across the run, units must have been seen in it, and snapshot, send
//!   and re-encryption operations must have completed on compressed volumes (the test
//!   cannot silently stop covering them). `compression_scenario` goes through a fixed
//!   sequence of these.
//!
//! The default run does `QVOL_MODEL_CASES` cases (256 unless set: about 10-14 s in debug
//! on 2 cores); the long run, in `scripts/long-tests.sh`, is
//! `QVOL_MODEL_CASES=10000 cargo test --release -p qvol-core --test model` (about 5.5 min).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{BlockHistory, SECTOR};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use qvol_core::storage::{
    CrashPolicy, CrashStorage, FaultConfig, FaultStorage, MemStorage, Storage,
};
use qvol_core::{
    read_stream_head, send_snapshot, CipherSuite, Compression, ErrorKind, OpenOptions,
    Reencryption, Volume,
};

/// The block size: sizes are multiples of it.
const BLOCK: u64 = 4096;

#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        tag: u64,
    },
    /// A write of `blocks` whole blocks from `block`, folded into the disk at a multiple of
    /// the unit size (compressed volumes: it covers whole groups).
    WriteWhole {
        block: u64,
        blocks: u64,
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
    /// The storage fails after `after` more storage operations, whatever the volume is
    /// doing; then power is lost (survivors drawn from `seed`), or the process dies (`kill`).
    CrashAfterOps {
        after: u16,
        seed: u64,
        kill: bool,
    },
    /// `create_snapshot("s{name}")` (a taken name is refused).
    CreateSnapshot {
        name: u8,
        cut: Option<Cut>,
    },
    /// `delete_snapshot` of the model's snapshot `pick % (n + 1)` (`n`: an unknown name).
    DeleteSnapshot {
        pick: u8,
        cut: Option<Cut>,
    },
    /// `revert_to_snapshot` of the snapshot `pick % (n + 1)`, keeping the current state as
    /// `"s{keep}"` if given.
    Revert {
        pick: u8,
        keep: Option<u8>,
        cut: Option<Cut>,
    },
    /// A send / receive round trip. If `incremental` and the snapshot the receiving image
    /// received last is still on the sender: the sender's snapshot `pick % k` of the `k`
    /// newer ones the receiver lacks, incremental from it. Otherwise the model's snapshot
    /// `pick % n` (nothing when there is none) into a fresh image: full or, if `incremental`
    /// and an older snapshot exists, a full stream of the older one `base % k` first, then
    /// an incremental.
    Send {
        pick: u8,
        base: u8,
        incremental: bool,
    },
    /// `start_reencryption` to a new key (the next one), with AEGIS-256 or
    /// XChaCha20-Poly1305; refused (`InvalidInput`, nothing changes) while one is in
    /// progress.
    StartReencrypt {
        aegis: bool,
        cut: Option<Cut>,
    },
    /// `reencrypt_step(leaves)`; refused (`InvalidInput`) when none is in progress.
    ReencryptStep {
        leaves: u64,
        cut: Option<Cut>,
    },
    /// `resize(size)` (bytes): grows or shrinks the disk; refused with `InvalidInput` (nothing
    /// changes) unless a non-zero multiple of 4096, with `Refused` while a snapshot holds
    /// data past a smaller end (`resize_plan` says which).
    Resize {
        size: u64,
        cut: Option<Cut>,
    },
    /// close() then open().
    Reopen,
    /// An explicit commit (durable on return).
    Commit,
    /// A pipelined commit (format version 6): durable later, on its own thread, while the
    /// next operations run; nothing more is promised durable by it.
    CommitAsync,
    /// `set_compression(level)` (compressed volumes): a commit; level 0 is refused
    /// (`InvalidInput`, nothing changes).
    SetCompression {
        level: Option<i8>,
        cut: Option<Cut>,
    },
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

/// A size to resize a disk first made of `blocks` blocks to: mostly up to twice as large and
/// down to a few blocks, sometimes back to the start, sometimes past 16 MiB (the map grows
/// from height 1 to 2: 64^2 blocks), sometimes invalid.
fn new_size(blocks: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (4..=2 * blocks).prop_map(|b| b * BLOCK),
        2 => Just(blocks * BLOCK),
        1 => (4097u64..4160).prop_map(|b| b * BLOCK),
        1 => prop_oneof![Just(0), (1..=2 * blocks).prop_map(|b| b * BLOCK - SECTOR)],
    ]
}

/// Ranges are drawn within twice the first size (as large as most resizes make it) and
/// folded into the disk's size when they run (see [`Harness::fit`]). A compressed volume
/// (`unit`: log2 of its unit size) gets its own mix: [`compressed_op`].
fn op(total: u64, unit: Option<u8>) -> BoxedStrategy<Op> {
    if let Some(unit) = unit {
        return compressed_op(total, unit).boxed();
    }
    let blocks = total / (BLOCK / SECTOR);
    let total = 2 * total;
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
        2 => (0u16..400, any::<u64>(), prop::bool::weighted(0.3))
            .prop_map(|(after, seed, kill)| Op::CrashAfterOps { after, seed, kill }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Commit),
        2 => Just(Op::CommitAsync),
        2 => (0u8..5, cut()).prop_map(|(name, cut)| Op::CreateSnapshot { name, cut }),
        1 => (any::<u8>(), cut()).prop_map(|(pick, cut)| Op::DeleteSnapshot { pick, cut }),
        2 => (any::<u8>(), prop::option::of(0u8..5), cut())
            .prop_map(|(pick, keep, cut)| Op::Revert { pick, keep, cut }),
        2 => (any::<u8>(), any::<u8>(), prop::bool::weighted(0.7))
            .prop_map(|(pick, base, incremental)| Op::Send { pick, base, incremental }),
        1 => (any::<bool>(), cut()).prop_map(|(aegis, cut)| Op::StartReencrypt { aegis, cut }),
        3 => (1u64..5, cut()).prop_map(|(leaves, cut)| Op::ReencryptStep { leaves, cut }),
        2 => (new_size(blocks), cut()).prop_map(|(size, cut)| Op::Resize { size, cut }),
    ]
    .boxed()
}

/// The operations on a compressed volume with units of `2^unit` blocks: those of the other
/// cases, plus writes of whole aligned groups (16 to 64 KiB, sometimes a leaf or more) as
/// often as other writes, which then overwrite, discard and zero parts of the units, and
/// compression turned off and on again. Snapshots, sends and re-encryption run as in the
/// other cases.
fn compressed_op(total: u64, unit: u8) -> impl Strategy<Value = Op> {
    let blocks = total / (BLOCK / SECTOR);
    let total = 2 * total;
    prop_oneof![
        8 => (range(total), any::<u64>())
            .prop_map(|((sector, sectors), tag)| Op::Write { sector, sectors, tag }),
        8 => (0..2 * blocks, whole(unit), any::<u64>())
            .prop_map(|(block, blocks, tag)| Op::WriteWhole { block, blocks, tag }),
        3 => range(total).prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        3 => Just(Op::Flush),
        2 => range(total).prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => (range(total), any::<bool>())
            .prop_map(|((sector, sectors), unmap)| Op::WriteZeroes { sector, sectors, unmap }),
        2 => any::<u64>().prop_map(|seed| Op::PowerLoss { seed }),
        1 => Just(Op::ProcessCrash),
        2 => (0u16..400, any::<u64>(), prop::bool::weighted(0.3))
            .prop_map(|(after, seed, kill)| Op::CrashAfterOps { after, seed, kill }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Commit),
        2 => Just(Op::CommitAsync),
        2 => (
            prop_oneof![
                3 => Just(None),
                3 => Just(Some(1i8)),
                3 => Just(Some(3i8)),
                1 => Just(Some(-3i8)),
                1 => Just(Some(0i8)),
            ],
            cut(),
        )
            .prop_map(|(level, cut)| Op::SetCompression { level, cut }),
        2 => (0u8..5, cut()).prop_map(|(name, cut)| Op::CreateSnapshot { name, cut }),
        1 => (any::<u8>(), cut()).prop_map(|(pick, cut)| Op::DeleteSnapshot { pick, cut }),
        2 => (any::<u8>(), prop::option::of(0u8..5), cut())
            .prop_map(|(pick, keep, cut)| Op::Revert { pick, keep, cut }),
        2 => (any::<u8>(), any::<u8>(), prop::bool::weighted(0.7))
            .prop_map(|(pick, base, incremental)| Op::Send { pick, base, incremental }),
        1 => (any::<bool>(), cut()).prop_map(|(aegis, cut)| Op::StartReencrypt { aegis, cut }),
        3 => (1u64..5, cut()).prop_map(|(leaves, cut)| Op::ReencryptStep { leaves, cut }),
        2 => (new_size(blocks), cut()).prop_map(|(size, cut)| Op::Resize { size, cut }),
    ]
}

/// The length in blocks of a whole-group write with units of `2^unit` blocks: mostly 16 to
/// 64 KiB (at least one group), sometimes up to 128 blocks (over a leaf: several records of
/// units in one write).
fn whole(unit: u8) -> impl Strategy<Value = u64> {
    let n = 1u64 << unit;
    let (lo, hi) = ((4 / n).max(1), (16 / n).max(1));
    prop_oneof![
        4 => (lo..=hi).prop_map(move |m| m * n),
        1 => (1..=128 / n).prop_map(move |m| m * n),
    ]
}

/// Content for a write on a compressed volume, different for each `tag` and each byte
/// offset, mostly compressible: text (64-byte lines naming the tag and their offset, then
/// words) in 5 writes of 8, text after a run of random bytes (units of about half the
/// group) in 1, random bytes (whole groups stay plain) in 1, and mostly zeros (a few
/// blocks of text: units with holes, groups of zeros unmapped) in 1.
fn compressible(tag: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = [
        "qvol ", "unit ", "frame ", "sealed ", "group ", "entry ", "leaf ", "zstd ",
    ];
    let text = |out: &mut Vec<u8>, to: usize| {
        let mut i = tag as usize;
        while out.len() < to {
            let mut line = format!("{tag:016x} {:08x} ", out.len());
            while line.len() < 63 {
                line.push_str(WORDS[i % WORDS.len()]);
                i = i.wrapping_mul(5).wrapping_add(3);
            }
            line.truncate(63);
            line.push('\n');
            out.extend_from_slice(line.as_bytes());
        }
        out.truncate(to);
    };
    let mut out = Vec::with_capacity(len + 64);
    match tag % 8 {
        0 => out = common::pattern(tag, len),
        1 => {
            // Up to three quarters random, then text, in every 16 KiB.
            let random = common::pattern(tag, len);
            let cut = (tag >> 8) as usize % 12_288;
            while out.len() < len {
                let at = out.len();
                let end = (at + cut).min(len);
                out.extend_from_slice(&random[at..end]);
                text(&mut out, (at + 16_384).min(len));
            }
        }
        2 => {
            out.resize(len, 0);
            for (i, block) in out.chunks_mut(BLOCK as usize).enumerate() {
                if (tag >> 8).wrapping_add(i as u64) % 5 == 0 {
                    let mut t = Vec::new();
                    text(&mut t, block.len());
                    block.copy_from_slice(&t);
                    block[..8].copy_from_slice(&(i as u64).to_le_bytes());
                }
            }
        }
        _ => text(&mut out, len),
    }
    out
}

/// A crash injected into a snapshot operation: the storage fails after `after` more
/// operations (most land inside the operation's commits), then power is lost or the
/// process dies.
#[derive(Clone, Copy, Debug)]
struct Cut {
    after: u16,
    seed: u64,
    kill: bool,
}

/// A cut for one snapshot operation in three.
fn cut() -> impl Strategy<Value = Option<Cut>> {
    prop::option::weighted(
        0.35,
        (0u16..30, any::<u64>(), any::<bool>()).prop_map(|(after, seed, kill)| Cut {
            after,
            seed,
            kill,
        }),
    )
}

/// A whole disk's content.
type Image = Arc<Vec<u8>>;

/// The snapshots, oldest first, with their content.
type Snaps = Vec<(String, Image)>;

/// How a crash happens.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// Power loss, survivors drawn from the seed.
    Power(u64),
    /// kill -9.
    Kill,
}

/// What the live disk must read as after a crash, for one outcome of an interrupted
/// snapshot operation.
#[derive(Clone, Debug)]
enum Live {
    /// As the block history allows (the operation did not happen).
    History,
    /// Everything written before the operation, durable (it happened: it committed).
    Durable,
    /// Exactly this (a revert happened).
    Exact(Image),
}

/// One state a crash may leave: the snapshot list, the live disk and its size.
#[derive(Clone, Debug)]
struct Outcome {
    snaps: Snaps,
    live: Live,
    /// The disk's size in bytes (a resize that happened: the new one; blocks past a smaller
    /// end are gone, blocks past the old end read as zeros).
    size: u64,
}

/// A whole disk's content `image` as a disk of `size` bytes reads it: cut short (what is
/// cut off must be zeros: a shrink is refused while a snapshot holds data there) or
/// followed by zeros (a snapshot of a smaller disk).
fn fit(image: &[u8], size: u64) -> Vec<u8> {
    let size = size as usize;
    let mut out = image[..image.len().min(size)].to_vec();
    debug_assert!(
        image[out.len()..].iter().all(|&b| b == 0),
        "data past the end"
    );
    out.resize(size, 0);
    out
}

/// Which volume key the image is under (keys are `common::key(n)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Keys {
    /// The key the volume is under: the new one while a re-encryption is in progress.
    key: u8,
    /// While a re-encryption is in progress, the key it started from (which opens the
    /// volume too).
    old: Option<u8>,
    /// The suite of new data.
    suite: CipherSuite,
}

/// The opaque keyslot blob that stands for key `k` (what `common::options` writes for the
/// first one).
fn slot_blob(k: u8) -> Vec<u8> {
    if k == 1 {
        b"an opaque keyslot blob".to_vec()
    } else {
        format!("a keyslot wrapping key {k}").into_bytes()
    }
}

/// The state under test: the volume, the storage stack under it, and the reference.
struct Harness {
    disk: Arc<CrashStorage>,
    fault: Arc<FaultStorage<Arc<CrashStorage>>>,
    vol: Option<Volume>,
    model: BlockHistory,
    /// A pending crash injected by `CrashAfterOps`.
    armed: Option<Crash>,
    /// The snapshots that exist, with their content.
    snaps: Snaps,
    /// The other outcome of the snapshot operation in progress, if a crash interrupts it
    /// (the model holds the outcome where it did not happen until it returns).
    interrupted: Option<Outcome>,
    /// `model.version_counts()` when the operation in progress began.
    mark: Vec<usize>,
    /// The image send / receive round trips receive into, if one was made.
    receiver: Option<Receiver>,
    /// The keys the image is under. Re-encryption changes no content: the model's disk
    /// and snapshots stay as they are.
    keys: Keys,
    /// The other key state an interrupted re-encryption operation may leave (a start that
    /// committed, a step that finished).
    keys_interrupted: Option<Keys>,
    /// While re-encrypting: the map leaves known done (progress never goes back).
    done: u64,
    /// For a volume created with compression units: log2 of the unit size.
    unit: Option<u8>,
    /// The compression level of new writes (`Volume::compress_level`).
    level: Option<i8>,
    /// The other level an interrupted `set_compression` may leave.
    level_interrupted: Option<Option<i8>>,
    log: Vec<String>,
}

/// Across the whole run (all cases of `crash_contract_holds`): the cases with a compressed
/// volume, and the most blocks a compressed unit held at once in any of them (so the run
/// cannot stop covering units unnoticed).
static COMPRESSED_CASES: AtomicU64 = AtomicU64::new(0);
static MOST_UNIT_LBNS: AtomicU64 = AtomicU64::new(0);
/// Snapshot, send and re-encryption operations that completed on compressed volumes, across
/// the run.
static DONE_ON_UNITS: AtomicU64 = AtomicU64::new(0);

/// The receiving side of the send / receive round trips: a separate image, open, whose
/// live disk is the snapshot it received last.
struct Receiver {
    storage: Arc<MemStorage>,
    vol: Volume,
    /// The key it was made with (the sender's when it received its first stream).
    key: u8,
    /// The guid of the snapshot it received last (the base of the next incremental).
    last: [u8; 16],
}

/// Reads all of `vol` and compares it with `content`; the error says where it differs.
fn compare(vol: &Volume, content: &[u8]) -> Result<(), String> {
    const CHUNK: usize = 64 << 10;
    let mut buf = vec![0u8; CHUNK];
    for (i, want) in content.chunks(CHUNK).enumerate() {
        let got = &mut buf[..want.len()];
        vol.read_at((i * CHUNK) as u64, got)
            .map_err(|e| format!("fails to read: {e:?}"))?;
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("reads wrong data at byte {}", i * CHUNK + at));
        }
    }
    Ok(())
}

fn stack(disk: &Arc<CrashStorage>) -> Arc<FaultStorage<Arc<CrashStorage>>> {
    Arc::new(FaultStorage::new(disk.clone(), FaultConfig::never()))
}

impl Harness {
    /// A volume of `size` bytes; `round_trips`: on a storage that says each write is a
    /// round trip (as RBD does: data and log records are then written together);
    /// `compression`: created with compression units.
    fn new(size: u64, round_trips: bool, compression: Option<Compression>) -> Self {
        let disk = Arc::new(CrashStorage::new());
        disk.set_round_trips(round_trips);
        let fault = stack(&disk);
        let mut opts = common::options(size, CipherSuite::XChaCha20Poly1305);
        opts.compression = compression;
        let vol = Volume::create(fault.clone(), opts, &common::key(1))
            .unwrap_or_else(|e| panic!("create a {size}-byte volume ({compression:?}): {e:?}"));
        // Creation must be durable once it returns: the model starts from zeros.
        let disk = Arc::new(disk.crash_with(CrashPolicy::DropAll, 0));
        drop(vol);
        let fault = stack(&disk);
        let vol = common::open(fault.clone()).expect("a volume opens right after create");
        let level = compression.and_then(|c| c.level);
        assert_eq!(vol.compress_level(), level, "the level it was created with");
        if compression.is_some() {
            COMPRESSED_CASES.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            disk,
            fault,
            vol: Some(vol),
            model: BlockHistory::new(size),
            armed: None,
            snaps: Vec::new(),
            interrupted: None,
            mark: Vec::new(),
            receiver: None,
            keys: Keys {
                key: 1,
                old: None,
                suite: CipherSuite::XChaCha20Poly1305,
            },
            keys_interrupted: None,
            done: 0,
            unit: compression.map(|c| c.unit_log2),
            level,
            level_interrupted: None,
            log: vec![format!("create: {size} bytes, {compression:?}")],
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
    /// The key state is the model's or, after an interrupted re-encryption operation, its
    /// other outcome: the newest key is tried first, then the older one (which may open it
    /// only if the newer one is refused with `WrongKey`), and what the volume says of its
    /// re-encryption must be the outcome of the key that opened it.
    fn reopen_on(&mut self, next: CrashStorage) -> Result<(), TestCaseError> {
        self.vol = None;
        self.disk = Arc::new(next);
        self.fault = stack(&self.disk);
        self.armed = None;
        let mut outcomes = vec![self.keys];
        outcomes.extend(self.keys_interrupted.take());
        let mut tries: Vec<u8> = outcomes.iter().map(|k| k.key).collect();
        tries.sort_unstable_by(|a, b| b.cmp(a));
        tries.dedup();
        let mut refused = Vec::new();
        for k in tries {
            let vol = match Volume::open(self.fault.clone(), &common::key(k), false) {
                Ok(v) => v,
                Err(e) if e.kind() == ErrorKind::WrongKey => {
                    refused.push(k);
                    continue;
                }
                Err(e) => {
                    return Err(self.fail(format!(
                        "the volume does not open with key {k} after a crash: {e:?}"
                    )));
                }
            };
            let progress = vol.reencryption();
            let Some(&keys) = outcomes
                .iter()
                .find(|o| o.key == k && o.old.is_some() == progress.is_some())
            else {
                return Err(self.fail(format!(
                    "after a crash key {k} opens the volume with re-encryption {progress:?}; \
                     allowed key states: {outcomes:?}"
                )));
            };
            if vol.data_suite() != keys.suite || vol.keyslots()[0] != slot_blob(k) {
                return Err(self.fail(format!(
                    "after a crash key {k} opens the volume with suite {} and keyslot {:?} \
                     ({keys:?} expected)",
                    vol.data_suite(),
                    String::from_utf8_lossy(&vol.keyslots()[0])
                )));
            }
            if let Some(p) = &progress {
                // A re-encryption the crash cut the start of has done nothing known yet.
                let known = if k == self.keys.key { self.done } else { 0 };
                // A shrink may leave fewer leaves than were done already (and a step then
                // finishes it); no step goes past the end.
                if p.done < known || (p.done > p.total && p.done != known) {
                    return Err(self.fail(format!(
                        "after a crash the re-encryption is at {} of {} leaves, known done: \
                         {known}",
                        p.done, p.total
                    )));
                }
                self.done = p.done;
            }
            let retired = self.keys.old.filter(|_| keys.old.is_none());
            self.keys = keys;
            self.vol = Some(vol);
            self.log
                .push(format!("  -> reopened with key {k}: {keys:?}"));
            // Mid-way, the old key opens it too; once finished (and this open committed),
            // the old key opens nothing.
            if let Some(old) = keys.old {
                let ro = self.open_ro(old, None).map_err(|e| {
                    self.fail(format!(
                        "mid-way, the old key {old} does not open it: {e:?}"
                    ))
                })?;
                if ro.reencryption() != progress {
                    return Err(self.fail(format!(
                        "mid-way, the old key {old} sees {:?}, the new one {progress:?}",
                        ro.reencryption()
                    )));
                }
            }
            if let Some(old) = retired {
                self.assert_retired(old)?;
            }
            return Ok(());
        }
        Err(self.fail(format!(
            "after a crash no key opens the volume (refused: {refused:?}; allowed key states: \
             {outcomes:?})"
        )))
    }

    /// Opens the image (as it lies on the storage) read-only with key `k`.
    fn open_ro(&self, k: u8, snapshot: Option<String>) -> qvol_core::Result<Volume> {
        Volume::open_with(
            self.disk.clone(),
            &common::key(k),
            OpenOptions {
                read_only: true,
                snapshot,
                ..OpenOptions::default()
            },
        )
    }

    /// Key `k`, replaced by a finished re-encryption, opens nothing any more.
    fn assert_retired(&self, k: u8) -> Result<(), TestCaseError> {
        match self.open_ro(k, None) {
            Ok(v) => Err(self.fail(format!(
                "the re-encryption finished, yet the old key {k} still opens the volume \
                 (re-encryption {:?})",
                v.reencryption()
            ))),
            Err(_) => Ok(()),
        }
    }

    fn power_loss(&mut self, seed: u64) -> Result<(), TestCaseError> {
        self.crash(Crash::Power(seed))
    }

    /// Crashes `how`, reopens, and checks everything against the model: the snapshot list
    /// is one the contract allows (with an interrupted snapshot operation, the state before
    /// it or after it, whole), every snapshot reads back exactly, the live disk reads as the
    /// same outcome allows, and `check` is clean.
    fn crash(&mut self, how: Crash) -> Result<(), TestCaseError> {
        let image = match how {
            Crash::Power(seed) => self.disk.crash(seed),
            Crash::Kill => self.disk.process_crash(),
        };
        self.reopen_on(image)?;
        // The compression setting is the last one set, or one a crash cut the commit of.
        let mut levels = vec![self.level];
        levels.extend(self.level_interrupted.take());
        let level = self.vol().compress_level();
        if !levels.contains(&level) {
            return Err(self.fail(format!(
                "after {how:?} the compression level is {level:?}, allowed: {levels:?}"
            )));
        }
        self.level = level;
        let mut outcomes = vec![Outcome {
            snaps: self.snaps.clone(),
            live: Live::History,
            size: self.size(),
        }];
        outcomes.extend(self.interrupted.take());
        let names: Vec<String> = self.vol().snapshots().into_iter().map(|s| s.name).collect();
        let size = self.vol().size();
        let mut why = Vec::new();
        let mut chosen = None;
        for o in outcomes {
            let want: Vec<&String> = o.snaps.iter().map(|(n, _)| n).collect();
            if want.iter().copied().ne(names.iter()) || o.size != size {
                why.push(format!("snapshots {want:?}, size {}", o.size));
                continue;
            }
            let mut model = self.model.clone();
            let r = match (&o.live, how) {
                (Live::History, Crash::Power(_)) => model.check_after_crash(self.vol()),
                (Live::History, Crash::Kill) => model.check_after_kill(self.vol(), &self.mark),
                (Live::Durable, _) => {
                    model.make_durable();
                    model.resize(o.size);
                    model.check_current(self.vol())
                }
                (Live::Exact(image), _) => {
                    model.reset_to(&fit(image, o.size));
                    model.check_current(self.vol())
                }
            };
            match r {
                Ok(()) => {
                    chosen = Some((o, model));
                    break;
                }
                Err(m) => why.push(format!("snapshots {want:?}, live {:?}: {m}", o.live)),
            }
        }
        let Some((o, model)) = chosen else {
            return Err(self.fail(format!(
                "after {how:?} the volume has snapshots {names:?} and size {size} and matches \
                 no allowed outcome:\n  {}",
                why.join("\n  ")
            )));
        };
        self.model = model;
        self.snaps = o.snaps;
        self.verify_snapshots()?;
        self.verify_clean(&format!("after {how:?}"))?;
        self.usage()
    }

    /// On a compressed volume with no crash armed (the model is what it reads): what
    /// `compression_usage` counts holds every block with data, and no more blocks than the
    /// disk has; the blocks in units count for the whole run.
    fn usage(&self) -> Result<(), TestCaseError> {
        if self.unit.is_none() || self.armed.is_some() {
            return Ok(());
        }
        let u = self
            .vol()
            .compression_usage()
            .map_err(|e| self.fail(format!("compression_usage fails: {e:?}")))?;
        let data = (0..self.model.len())
            .filter(|&b| self.model.current(b).iter().any(|&x| x != 0))
            .count() as u64;
        let mapped = u.unit_lbns + u.plain_blocks;
        if mapped < data || mapped > self.model.len() as u64 {
            return Err(self.fail(format!(
                "compression_usage says {u:?}; the model has {data} blocks with data of {}",
                self.model.len()
            )));
        }
        MOST_UNIT_LBNS.fetch_max(u.unit_lbns, Ordering::Relaxed);
        Ok(())
    }

    /// Every snapshot of the model reads back exactly through a read-only snapshot view,
    /// which has the disk's size now: a snapshot of a smaller disk reads zeros past its end.
    fn verify_snapshots(&self) -> Result<(), TestCaseError> {
        for (name, content) in &self.snaps {
            let view = self
                .open_ro(self.keys.key, Some(name.clone()))
                .map_err(|e| self.fail(format!("snapshot {name} does not open: {e:?}")))?;
            if view.size() != self.size() {
                return Err(self.fail(format!(
                    "snapshot {name} opens with size {}, the disk's is {}",
                    view.size(),
                    self.size()
                )));
            }
            compare(&view, &fit(content, self.size()))
                .map_err(|m| self.fail(format!("snapshot {name} {m}")))?;
        }
        Ok(())
    }

    /// The disk's size as the model has it.
    fn size(&self) -> u64 {
        self.model.len() as u64 * BLOCK
    }

    /// A range drawn as `(sector, sectors)` folded into the disk as it is now: as long as
    /// fits, starting at `sector` modulo the room.
    fn fit(&self, sector: u64, sectors: u64) -> (u64, u64) {
        let total = self.size() / SECTOR;
        let len = sectors.min(total);
        (sector % (total - len + 1), len)
    }

    /// Sends snapshot `name` of the sending image (incremental from `from`) as it lies on
    /// the storage now.
    fn send(&self, name: &str, from: Option<&str>) -> Result<Vec<u8>, TestCaseError> {
        let mut out = Vec::new();
        send_snapshot(&*self.disk, name, from, &mut out, &mut |_| {})
            .map_err(|e| self.fail(format!("send {name} from {from:?} fails: {e:?}")))?;
        Ok(out)
    }

    /// Receives `stream` (of the model's snapshot `name`) into the receiving image, made
    /// from the stream's head if `None` (with the sender's size now). A stream of a disk
    /// larger than the receiving image is refused (`Refused`: grow it to the sender's size
    /// first, which this then does), unless what it holds past the image's end is nothing.
    fn receive(
        &mut self,
        receiver: Option<Receiver>,
        name: &str,
        stream: &[u8],
    ) -> Result<Receiver, TestCaseError> {
        let what = |e: qvol_core::Error| format!("receive fails: {e:?}");
        let mut r: &[u8] = stream;
        let (head, hash) = read_stream_head(&mut r).map_err(|e| self.fail(what(e)))?;
        let sender_size = head.create_options().map_err(|e| self.fail(what(e)))?.size;
        let receiver = match receiver {
            Some(rx) if sender_size > rx.vol.size() => {
                let content = &self
                    .snaps
                    .iter()
                    .find(|(n, _)| n == name)
                    .expect("a snapshot of the model")
                    .1;
                // (A snapshot of a disk smaller than the image holds nothing past its end.)
                let past_end = content
                    .get(rx.vol.size() as usize..)
                    .is_some_and(|tail| tail.iter().any(|&b| b != 0));
                let mut r1 = r;
                match rx
                    .vol
                    .receive(&head, hash.clone(), &mut r1, false, &mut |_| {})
                {
                    Err(e) if e.kind() == ErrorKind::Refused => {}
                    Err(e) => return Err(self.fail(what(e))),
                    Ok(snap) if !past_end => {
                        self.log.push(format!(
                            "  -> a stream of a {sender_size}-byte disk received into a {}-byte \
                             image (nothing past its end)",
                            rx.vol.size()
                        ));
                        return Ok(Receiver {
                            last: snap.guid,
                            ..rx
                        });
                    }
                    Ok(_) => {
                        return Err(self.fail(format!(
                            "a {}-byte image took a stream of a {sender_size}-byte disk with \
                             data past its end",
                            rx.vol.size()
                        )))
                    }
                }
                self.log.push(format!(
                    "  -> refused by the {}-byte receiver: grown to {sender_size}",
                    rx.vol.size()
                ));
                rx.vol
                    .resize(sender_size)
                    .map_err(|e| self.fail(format!("the receiver does not grow: {e:?}")))?;
                Some(rx)
            }
            other => other,
        };
        let what = |e: qvol_core::Error| self.fail(what(e));
        let receiver = match receiver {
            Some(rx) => rx,
            None => {
                let storage = Arc::new(MemStorage::new());
                let opts = head.create_options().map_err(what)?;
                let vol = Volume::create(
                    storage.clone() as Arc<dyn Storage>,
                    opts,
                    &common::key(self.keys.key),
                )
                .map_err(what)?;
                Receiver {
                    storage,
                    vol,
                    key: self.keys.key,
                    last: [0; 16],
                }
            }
        };
        let snap = receiver
            .vol
            .receive(&head, hash, &mut r, false, &mut |_| {})
            .map_err(what)?;
        Ok(Receiver {
            last: snap.guid,
            ..receiver
        })
    }

    /// A send / receive round trip (see [`Op::Send`]).
    fn send_receive(&mut self, pick: u8, base: u8, incremental: bool) -> Result<(), TestCaseError> {
        let list = self.vol().snapshots();
        let sendable: Vec<(usize, &qvol_core::Snapshot)> = self
            .snaps
            .iter()
            .enumerate()
            .filter_map(|(i, (n, _))| Some((i, list.iter().find(|s| &s.name == n)?)))
            .collect();
        if self.keys.old.is_some() {
            // Mid-way through a re-encryption, nothing is sent.
            let Some(&(_, snap)) = sendable.get(usize::from(pick) % sendable.len().max(1)) else {
                return Ok(());
            };
            self.log
                .push(format!("  -> send {} (refused mid-way)", snap.name));
            let mut out = Vec::new();
            return match send_snapshot(&*self.disk, &snap.name, None, &mut out, &mut |_| {}) {
                Err(e) if e.kind() == ErrorKind::Refused => Ok(()),
                other => Err(self.fail(format!(
                    "a send from a volume being re-encrypted was not refused: {:?}",
                    other.map(|_| ())
                ))),
            };
        }
        // Continue the receiver's chain when it can: the snapshot it received last is still
        // on the sender, and the sender has a newer one the receiver holds nothing of
        // (neither name nor guid).
        let chain = self
            .receiver
            .as_ref()
            .filter(|_| incremental)
            .and_then(|rx| {
                let last = list.iter().find(|s| s.guid == rx.last)?;
                let held = rx.vol.snapshots();
                let newer: Vec<usize> = sendable
                    .iter()
                    .filter(|(_, s)| {
                        s.epoch > last.epoch
                            && !held.iter().any(|h| h.name == s.name || h.guid == s.guid)
                    })
                    .map(|&(i, _)| i)
                    .collect();
                let i = *newer.get(usize::from(pick) % newer.len().max(1))?;
                Some((i, last.name.clone()))
            });
        let chain = match chain {
            Some((i, from))
                if self
                    .receiver
                    .as_ref()
                    .is_some_and(|rx| rx.key != self.keys.key) =>
            {
                // The receiver was seeded before the sender was re-encrypted: it refuses the
                // incremental, and a full stream seeds a new one.
                let name = self.snaps[i].0.clone();
                self.log.push(format!(
                    "  -> send {name} from {from} (chain, another key: refused)"
                ));
                let stream = self.send(&name, Some(&from))?;
                let rx = self.receiver.take().expect("a receiver");
                let mut r: &[u8] = &stream;
                let (head, hash) = read_stream_head(&mut r)
                    .map_err(|e| self.fail(format!("a stream head does not read: {e:?}")))?;
                match rx.vol.receive(&head, hash, &mut r, false, &mut |_| {}) {
                    Err(e) if e.kind() == ErrorKind::Refused => None,
                    other => {
                        return Err(self.fail(format!(
                            "a receiver under key {} took a stream of key {}: {:?}",
                            rx.key,
                            self.keys.key,
                            other.map(|s| s.name)
                        )));
                    }
                }
            }
            other => other,
        };
        let (i, rx) = match chain {
            Some((i, from)) => {
                let name = self.snaps[i].0.clone();
                self.log
                    .push(format!("  -> send {name} from {from} (chain)"));
                let stream = self.send(&name, Some(&from))?;
                let prev = self.receiver.take();
                (i, self.receive(prev, &name, &stream)?)
            }
            None => {
                let Some(&(i, snap)) = sendable.get(usize::from(pick) % sendable.len().max(1))
                else {
                    return Ok(());
                };
                self.receiver = None;
                let name = &self.snaps[i].0.clone();
                let older: Vec<&str> = sendable
                    .iter()
                    .filter(|(_, s)| s.epoch < snap.epoch)
                    .map(|(_, s)| s.name.as_str())
                    .collect();
                let rx = if incremental && !older.is_empty() {
                    let from = older[usize::from(base) % older.len()];
                    self.log
                        .push(format!("  -> send {from} full, then {name} from {from}"));
                    let full = self.send(from, None)?;
                    let inc = self.send(name, Some(from))?;
                    let rx = self.receive(None, from, &full)?;
                    self.receive(Some(rx), name, &inc)?
                } else {
                    self.log.push(format!("  -> send {name} full"));
                    let stream = self.send(name, None)?;
                    self.receive(None, name, &stream)?
                };
                (i, rx)
            }
        };
        let (name, content) = &self.snaps[i];
        let content = &fit(content, rx.vol.size());
        let view = Volume::open_with(
            rx.storage.clone() as Arc<dyn Storage>,
            &common::key(rx.key),
            OpenOptions {
                read_only: true,
                snapshot: Some(name.clone()),
                ..OpenOptions::default()
            },
        )
        .map_err(|e| self.fail(format!("received snapshot {name} does not open: {e:?}")))?;
        compare(&view, content).map_err(|m| self.fail(format!("received snapshot {name} {m}")))?;
        drop(view);
        compare(&rx.vol, content)
            .map_err(|m| self.fail(format!("the receiver's live disk (after {name}) {m}")))?;
        if self.unit.is_some() {
            DONE_ON_UNITS.fetch_add(1, Ordering::Relaxed);
        }
        let report = rx
            .vol
            .check(&mut |_, _| {})
            .map_err(|e| self.fail(format!("check of the receiver fails: {e:?}")))?;
        if !report.is_clean() {
            return Err(self.fail(format!(
                "check of the receiver is not clean after {name}: {report:#?}"
            )));
        }
        self.receiver = Some(rx);
        Ok(())
    }

    /// The content of write `tag`: compressible data on a compressed volume (see
    /// [`compressible`]), random bytes elsewhere.
    fn data(&self, tag: u64, len: usize) -> Vec<u8> {
        if self.unit.is_some() {
            compressible(tag, len)
        } else {
            common::pattern(tag, len)
        }
    }

    /// A range of whole blocks drawn as `(block, blocks)` folded into the disk as it is now,
    /// starting at a multiple of the unit size (of 16 blocks without units): as long as
    /// fits.
    fn fit_whole(&self, block: u64, blocks: u64) -> (u64, u64) {
        let total = self.size() / BLOCK;
        let n = 1u64 << self.unit.unwrap_or(4);
        let len = blocks.min(total);
        (block % (total - len + 1) / n * n, len)
    }

    /// `check` finds nothing damaged and no space leaked.
    fn verify_clean(&self, what: &str) -> Result<(), TestCaseError> {
        let report = self
            .vol()
            .check(&mut |_, _| {})
            .map_err(|e| self.fail(format!("check fails {what}: {e:?}")))?;
        if report.is_clean() {
            Ok(())
        } else {
            Err(self.fail(format!("check is not clean {what}: {report:#?}")))
        }
    }

    /// An operation returned an error: legitimate only if an injected fault caused it, and
    /// then the machine is dead: crash as armed.
    fn on_error(&mut self, what: &str, e: qvol_core::Error) -> Result<(), TestCaseError> {
        match self.armed {
            Some(how) if self.fault.failures() > 0 => {
                self.log
                    .push(format!("  -> {what} failed ({:?}); {how:?}", e.kind()));
                self.crash(how)
            }
            _ => Err(self.fail(format!("{what} failed without any injected fault: {e:?}"))),
        }
    }

    /// Arms an injected crash (unless one is armed already).
    fn arm(&mut self, cut: Cut) {
        if self.armed.is_none() {
            self.fault
                .set_config(FaultConfig::after(u64::from(cut.after)));
            self.armed = Some(if cut.kill {
                Crash::Kill
            } else {
                Crash::Power(cut.seed)
            });
        }
    }

    /// The name of the model's snapshot `pick % (n + 1)`, or an unknown one.
    fn pick(&self, pick: u8) -> (Option<usize>, String) {
        let i = usize::from(pick) % (self.snaps.len() + 1);
        match self.snaps.get(i) {
            Some((name, _)) => (Some(i), name.clone()),
            None => (None, "unknown".to_string()),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.snaps.iter().any(|(n, _)| n == name)
    }

    /// Runs a snapshot operation: `refused` says it must fail with `InvalidInput` and change
    /// nothing; otherwise `done` is the outcome if it happens (the model is the outcome if
    /// it does not).
    fn snapshot_op(
        &mut self,
        what: &str,
        refused: bool,
        done: Outcome,
        call: impl FnOnce(&Volume) -> qvol_core::Result<()>,
    ) -> Result<(), TestCaseError> {
        let before = self.fault.failures();
        let r = call(self.vol());
        if refused {
            return match r {
                Err(e) if e.kind() == ErrorKind::InvalidInput => Ok(()),
                Err(e) => self.on_error(what, e),
                Ok(()) => Err(self.fail(format!("{what} should have been refused"))),
            };
        }
        match r {
            Ok(()) => {
                if self.unit.is_some() {
                    DONE_ON_UNITS.fetch_add(1, Ordering::Relaxed);
                }
                match done.live {
                    Live::History => {}
                    Live::Durable => self.model.make_durable(),
                    Live::Exact(image) => self.model.reset_to(&fit(&image, done.size)),
                }
                self.snaps = done.snaps;
                self.mark = self.model.version_counts();
                match self.armed {
                    // Only what follows the commit's sync may fail unnoticed (punching the
                    // freed blocks, best effort): the operation is done, and the storage
                    // is dead from now on.
                    Some(how) if self.fault.failures() > before => {
                        self.log
                            .push(format!("  -> {what} Ok after a storage failure; {how:?}"));
                        self.crash(how)
                    }
                    Some(_) => Ok(()),
                    // The operation committed: the accounting is exact right away.
                    None => self.verify_clean(&format!("after {what}")),
                }
            }
            Err(e) => {
                self.interrupted = Some(done);
                let r = self.on_error(what, e);
                self.interrupted = None;
                r
            }
        }
    }

    /// Runs a re-encryption operation: `refused` says it must fail with `InvalidInput` and
    /// change nothing; otherwise a crash that cuts it may leave the key state `interrupted`
    /// (or the model's). Returns what it returned, with the failure count before it, or
    /// `None` when it was refused or a crash was handled.
    #[allow(clippy::type_complexity)]
    fn rekey_call(
        &mut self,
        what: &str,
        refused: bool,
        interrupted: Keys,
        call: impl FnOnce(&Volume) -> qvol_core::Result<Option<Reencryption>>,
    ) -> Result<Option<(Option<Reencryption>, u64)>, TestCaseError> {
        let before = self.fault.failures();
        let r = call(self.vol());
        if refused {
            return match r {
                Err(e) if e.kind() == ErrorKind::InvalidInput => Ok(None),
                Err(e) => self.on_error(what, e).map(|()| None),
                Ok(p) => Err(self.fail(format!("{what} should have been refused: {p:?}"))),
            };
        }
        match r {
            Ok(p) => {
                if self.unit.is_some() {
                    DONE_ON_UNITS.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some((p, before)))
            }
            Err(e) => {
                self.keys_interrupted = Some(interrupted);
                let r = self.on_error(what, e);
                self.keys_interrupted = None;
                r.map(|()| None)
            }
        }
    }

    /// A re-encryption operation returned (the model's keys are updated): it committed
    /// first, so everything written before is durable; a finish (`retired`: the old key)
    /// leaves no superblock the old key opens.
    fn rekey_done(
        &mut self,
        what: &str,
        before: u64,
        retired: Option<u8>,
    ) -> Result<(), TestCaseError> {
        self.model.make_durable();
        self.mark = self.model.version_counts();
        if let Some(k) = retired {
            self.assert_retired(k)?;
        }
        match self.armed {
            Some(how) if self.fault.failures() > before => {
                self.log
                    .push(format!("  -> {what} Ok after a storage failure; {how:?}"));
                self.crash(how)
            }
            Some(_) => Ok(()),
            None => {
                if retired.is_some() {
                    // Finished: every snapshot's blocks moved to the new key too.
                    self.verify_snapshots()?;
                }
                self.verify_clean(&format!("after {what}"))
            }
        }
    }

    /// A resize (see [`Op::Resize`]): `resize_plan` first, which must agree with the model
    /// (every snapshot with data past a smaller end named; the live disk's data there
    /// counted), then the resize itself, refused as the plan says. A shrink discards the
    /// tail first (recorded in the model like a discard). One that returned committed:
    /// everything before it is durable, and the disk has the new size. A crash that cuts it
    /// leaves the old size (the live disk as the history allows: the tail dropped or not) or
    /// the new one (everything before it durable).
    fn resize(&mut self, size: u64) -> Result<(), TestCaseError> {
        let old = self.size();
        if size == 0 || size % BLOCK != 0 {
            for (what, r) in [
                ("resize_plan", self.vol().resize_plan(size).map(|_| ())),
                ("resize", self.vol().resize(size).map(|_| ())),
            ] {
                match r {
                    Err(e) if e.kind() == ErrorKind::InvalidInput => {}
                    Err(e) => return self.on_error(what, e),
                    Ok(()) => {
                        return Err(self.fail(format!("{what} to {size} bytes was not refused")))
                    }
                }
            }
            return Ok(());
        }
        let plan = match self.vol().resize_plan(size) {
            Ok(p) => p,
            Err(e) => return self.on_error("resize_plan", e),
        };
        // Data the model knows of past the new end (a block may also hold zeros that were
        // written: the engine may count those as data, the model cannot tell).
        let first = (size / BLOCK) as usize;
        let live_data = (first..self.model.len())
            .filter(|&b| self.model.current(b).iter().any(|&x| x != 0))
            .count() as u64;
        let must: Vec<&String> = self
            .snaps
            .iter()
            .filter(|(_, c)| c.len() > size as usize && c[size as usize..].iter().any(|&x| x != 0))
            .map(|(n, _)| n)
            .collect();
        let sane = plan.old_size == old
            && plan.new_size == size
            && (size < old || plan.dropped_bytes == 0 && plan.snapshots_past_end.is_empty())
            && plan.dropped_bytes >= live_data * BLOCK
            && plan.dropped_bytes <= old.saturating_sub(size)
            && must.iter().all(|n| plan.snapshots_past_end.contains(n))
            && plan.snapshots_past_end.iter().all(|n| self.has(n));
        if !sane {
            return Err(self.fail(format!(
                "resize_plan({size}) of a {old}-byte disk returned {plan:?}; the model has \
                 {live_data} blocks of data past the new end, and snapshots {must:?} with data \
                 there"
            )));
        }
        let refused = !plan.snapshots_past_end.is_empty();
        self.log.push(format!(
            "  -> {old} -> {size}{}",
            if refused { " (refused)" } else { "" }
        ));
        if size < old && !refused {
            // The tail is discarded through the log first.
            self.model.apply(size, &vec![0u8; (old - size) as usize]);
        }
        let before = self.fault.failures();
        match self.vol().resize(size) {
            Err(e) if refused && e.kind() == ErrorKind::Refused => Ok(()),
            Err(e) if refused => self.on_error("resize", e),
            Ok(p) if refused => {
                Err(self.fail(format!("the resize should have been refused: {p:?}")))
            }
            Ok(p) => {
                if p != plan {
                    return Err(self.fail(format!("resize returned {p:?}, its plan was {plan:?}")));
                }
                if size != old {
                    // It committed (a resize to the same size does nothing).
                    self.model.make_durable();
                    self.model.resize(size);
                }
                self.mark = self.model.version_counts();
                if self.vol().size() != size {
                    return Err(self.fail(format!(
                        "the resize returned, the size is {}",
                        self.vol().size()
                    )));
                }
                match self.armed {
                    Some(how) if self.fault.failures() > before => {
                        self.log
                            .push(format!("  -> resize Ok after a storage failure; {how:?}"));
                        self.crash(how)
                    }
                    Some(_) => Ok(()),
                    None => {
                        self.verify_snapshots()?;
                        self.verify_clean("after resize")
                    }
                }
            }
            Err(e) => {
                self.interrupted = (size != old).then(|| Outcome {
                    snaps: self.snaps.clone(),
                    live: Live::Durable,
                    size,
                });
                let r = self.on_error("resize", e);
                self.interrupted = None;
                r
            }
        }
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.log.push(format!("{op:?}"));
        if self.log.len() > 40 {
            self.log.remove(0);
        }
        self.mark = self.model.version_counts();
        match *op {
            Op::Write {
                sector,
                sectors,
                tag,
            } => {
                let (sector, sectors) = self.fit(sector, sectors);
                let data = self.data(tag, (sectors * SECTOR) as usize);
                // Record first: a write that fails midway may still have landed.
                self.model.apply(sector * SECTOR, &data);
                if let Err(e) = self.vol().write_at(sector * SECTOR, &data) {
                    return self.on_error("write", e);
                }
            }
            Op::WriteWhole { block, blocks, tag } => {
                let (block, blocks) = self.fit_whole(block, blocks);
                let data = self.data(tag, (blocks * BLOCK) as usize);
                self.log.push(format!("  -> blocks {block}+{blocks}"));
                self.model.apply(block * BLOCK, &data);
                if let Err(e) = self.vol().write_at(block * BLOCK, &data) {
                    return self.on_error("write", e);
                }
                self.usage()?;
            }
            Op::SetCompression { level, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                let before = self.fault.failures();
                match self.vol().set_compression(level) {
                    Err(e) if level == Some(0) && e.kind() == ErrorKind::InvalidInput => {}
                    Ok(()) if level == Some(0) => {
                        return Err(self.fail("set_compression(Some(0)) was not refused".into()));
                    }
                    Err(e) => {
                        self.level_interrupted = Some(level);
                        let r = self.on_error("set_compression", e);
                        self.level_interrupted = None;
                        return r;
                    }
                    Ok(()) => {
                        // It committed: everything before it is durable.
                        self.level = level;
                        self.model.make_durable();
                        self.mark = self.model.version_counts();
                        if self.vol().compress_level() != level {
                            return Err(self.fail(format!(
                                "set_compression({level:?}) returned, the level is {:?}",
                                self.vol().compress_level()
                            )));
                        }
                        if let Some(how) = self.armed.filter(|_| self.fault.failures() > before) {
                            self.log.push(format!(
                                "  -> set_compression Ok after a storage failure; {how:?}"
                            ));
                            return self.crash(how);
                        }
                    }
                }
            }
            Op::Read { sector, sectors } => {
                let (sector, sectors) = self.fit(sector, sectors);
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
                let (sector, sectors) = self.fit(sector, sectors);
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
                let (sector, sectors) = self.fit(sector, sectors);
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
            Op::CommitAsync => {
                if let Err(e) = self.vol().commit_async() {
                    return self.on_error("commit_async", e);
                }
            }
            Op::PowerLoss { seed } => self.power_loss(seed)?,
            Op::ProcessCrash => self.crash(Crash::Kill)?,
            Op::CrashAfterOps { after, seed, kill } => self.arm(Cut { after, seed, kill }),
            Op::CreateSnapshot { name, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                let name = format!("s{name}");
                let mut snaps = self.snaps.clone();
                snaps.push((name.clone(), Arc::new(self.model.image())));
                let done = Outcome {
                    snaps,
                    live: Live::Durable,
                    size: self.size(),
                };
                let refused = self.has(&name);
                self.snapshot_op("create_snapshot", refused, done, |v| {
                    v.create_snapshot(&name).map(|_| ())
                })?;
            }
            Op::DeleteSnapshot { pick, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                let (i, name) = self.pick(pick);
                let mut snaps = self.snaps.clone();
                if let Some(i) = i {
                    snaps.remove(i);
                }
                let done = Outcome {
                    snaps,
                    live: Live::Durable,
                    size: self.size(),
                };
                self.snapshot_op("delete_snapshot", i.is_none(), done, |v| {
                    v.delete_snapshot(&name).map(|_| ())
                })?;
            }
            Op::Revert { pick, keep, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                let (i, name) = self.pick(pick);
                let keep = keep.map(|k| format!("s{k}"));
                let refused = i.is_none() || keep.as_deref().is_some_and(|k| self.has(k));
                let mut snaps = self.snaps.clone();
                if let Some(k) = &keep {
                    snaps.push((k.clone(), Arc::new(self.model.image())));
                }
                let target = i.map_or_else(Image::default, |i| self.snaps[i].1.clone());
                let done = Outcome {
                    snaps,
                    live: Live::Exact(target),
                    size: self.size(),
                };
                self.snapshot_op("revert_to_snapshot", refused, done, |v| {
                    v.revert_to_snapshot(&name, keep.as_deref())
                })?;
            }
            Op::Send {
                pick,
                base,
                incremental,
            } => self.send_receive(pick, base, incremental)?,
            Op::StartReencrypt { aegis, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                let suite = if aegis {
                    CipherSuite::Aegis256
                } else {
                    CipherSuite::XChaCha20Poly1305
                };
                let next = Keys {
                    key: self.keys.key + 1,
                    old: Some(self.keys.key),
                    suite,
                };
                let slots = vec![slot_blob(next.key)];
                let refused = self.keys.old.is_some();
                let r = self.rekey_call("start_reencryption", refused, next, |v| {
                    let hash = v.keyslots_hash();
                    v.start_reencryption(&common::key(next.key), suite, &slots, &hash)
                        .map(Some)
                })?;
                if let Some((p, before)) = r {
                    match p {
                        Some(p) if p.done == 0 && p.to_suite == suite => {}
                        other => {
                            return Err(self.fail(format!("the start returned {other:?}")));
                        }
                    }
                    self.keys = next;
                    self.done = 0;
                    self.rekey_done("start_reencryption", before, None)?;
                }
            }
            Op::ReencryptStep { leaves, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                let finished = Keys {
                    old: None,
                    ..self.keys
                };
                let refused = self.keys.old.is_none();
                let r = self.rekey_call("reencrypt_step", refused, finished, |v| {
                    v.reencrypt_step(leaves)
                })?;
                if let Some((p, before)) = r {
                    let retired = match p {
                        Some(p) if p.done > self.done && p.done < p.total => {
                            self.log
                                .push(format!("  -> {} of {} leaves done", p.done, p.total));
                            self.done = p.done;
                            None
                        }
                        Some(p) => {
                            return Err(self.fail(format!(
                                "a step returned {p:?} (known done: {})",
                                self.done
                            )));
                        }
                        None => {
                            self.log.push("  -> finished".into());
                            let old = self.keys.old;
                            self.keys = finished;
                            old
                        }
                    };
                    self.rekey_done("reencrypt_step", before, retired)?;
                }
            }
            Op::Resize { size, cut } => {
                if let Some(c) = cut {
                    self.arm(c);
                }
                self.resize(size)?;
            }
            Op::Reopen => {
                let vol = self.vol.take().expect("open");
                if let Err(e) = vol.close() {
                    // close commits: with an armed fault it may fail like anything else.
                    self.vol = None;
                    return match self.armed {
                        Some(how) if self.fault.failures() > 0 => self.crash(how),
                        _ => Err(self.fail(format!("close failed: {e:?}"))),
                    };
                }
                if self.fault.failures() > 0 {
                    // A failure inside close that close did not report would be a bug.
                    return Err(self.fail("close returned Ok after a storage failure".into()));
                }
                self.model.make_durable();
                self.mark = self.model.version_counts();
                self.crash(Crash::Kill)?;
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

/// The compression of a case: none in 3 of 5; else units of 8 to 64 KiB, zstd level 1 or 3.
fn compression() -> impl Strategy<Value = Option<Compression>> {
    prop_oneof![
        3 => Just(None),
        2 => (1u8..=4, prop_oneof![Just(1i8), Just(3i8)]).prop_map(|(unit_log2, level)| {
            Some(Compression {
                unit_log2,
                level: Some(level),
            })
        }),
    ]
}

/// The durability contract under random operations and crashes, on volumes with and without
/// compression units. Across the run, compressed units must have been written (and seen
/// through `compression_usage`) whenever enough compressed cases ran.
#[test]
fn crash_contract_holds() {
    let config = Config {
        cases: cases(),
        max_shrink_iters: 2000,
        source_file: Some(file!()),
        ..Config::default()
    };
    let case = (
        prop_oneof![3 => Just(1u64 << 20), 1 => Just(4u64 << 20)],
        compression(),
    )
        .prop_flat_map(|(size, compression)| {
            (
                Just(size),
                Just(compression),
                prop::collection::vec(op(size / SECTOR, compression.map(|c| c.unit_log2)), 1..60),
            )
        });
    let mut runner = TestRunner::new(config);
    let result = runner.run(
        &(case, any::<bool>()),
        |((size, compression, ops), round_trips)| {
            let mut h = Harness::new(size, round_trips, compression);
            for op in &ops {
                h.run(op)?;
            }
            settle(&mut h)
        },
    );
    match result {
        Ok(()) => {}
        Err(e @ (TestError::Fail(..) | TestError::Abort(_))) => panic!("{e}\n{runner}"),
    }
    let compressed = COMPRESSED_CASES.load(Ordering::Relaxed);
    let most = MOST_UNIT_LBNS.load(Ordering::Relaxed);
    let done = DONE_ON_UNITS.load(Ordering::Relaxed);
    eprintln!(
        "{compressed} cases with compression; at most {most} blocks in units at once; \
         {done} snapshot, send and re-encryption operations completed on them"
    );
    assert!(
        compressed < 8 || (most > 0 && done > 0),
        "{compressed} compressed cases ran: {most} blocks in units at most, {done} snapshot, \
         send and re-encryption operations: the test no longer covers compressed volumes"
    );
}

/// The end of a run: a last power loss, then everything must read as allowed; a close and
/// reopen keeps it; a re-encryption in progress finishes; deleting every snapshot leaves
/// exactly the live disk.
fn settle(h: &mut Harness) -> Result<(), TestCaseError> {
    {
        // The end: a last power loss, then everything must read as allowed.
        h.power_loss(0x5eed)?;
        // And the recovered state is stable: a clean close and reopen keeps it.
        let vol = h.vol.take().expect("open");
        vol.close()
            .map_err(|e| TestCaseError::fail(format!("close after recovery: {e:?}")))?;
        h.mark = h.model.version_counts();
        h.crash(Crash::Kill)?;
        // A re-encryption in progress finishes; then every snapshot and the live disk read
        // the same and only the new key opens the volume.
        if let Some(old) = h.keys.old {
            let mut steps = 0;
            while h
                .vol()
                .reencrypt_step(3)
                .map_err(|e| h.fail(format!("resume: {e:?}")))?
                .is_some()
            {
                steps += 1;
                prop_assert!(steps < 1000, "the re-encryption does not end");
            }
            h.keys.old = None;
            h.model.check_current(h.vol()).map_err(|m| h.fail(m))?;
            h.verify_snapshots()?;
            h.verify_clean("after finishing the re-encryption")?;
            h.assert_retired(old)?;
        }
        // Deleting every snapshot leaves exactly the live disk's blocks in use.
        for (name, _) in std::mem::take(&mut h.snaps) {
            h.vol()
                .delete_snapshot(&name)
                .map_err(|e| h.fail(format!("delete {name}: {e:?}")))?;
        }
        h.verify_clean("after deleting every snapshot")?;
        h.model.check_current(h.vol()).map_err(|m| h.fail(m))?;
    }
    Ok(())
}

/// Resizes through the model, whatever proptest draws: a 1 MiB disk grows past 16 MiB
/// (the map grows from height 1 to 2) with a snapshot of the small disk, a receiver of the
/// small disk's stream is refused the grown one's until it grows, a shrink is refused while
/// a snapshot holds the tail, a shrink cut by a power loss, snapshots of the shrunk disk
/// (their maps taller than it needs) sent, a re-encryption the disk grows and shrinks under
/// (fewer leaves than it has done), a revert to a snapshot of a larger disk.
#[test]
fn resize_scenario() {
    const MIB: u64 = 1 << 20;
    let block = |b: u64| b * (BLOCK / SECTOR);
    let write = |b: u64, tag| Op::Write {
        sector: block(b),
        sectors: 8,
        tag,
    };
    let resize = |size| Op::Resize { size, cut: None };
    let snapshot = |name| Op::CreateSnapshot { name, cut: None };
    let send = |pick, incremental| Op::Send {
        pick,
        base: 0,
        incremental,
    };
    let step = Op::ReencryptStep {
        leaves: 1,
        cut: None,
    };
    let ops = [
        write(100, 1),
        snapshot(0),
        send(0, false),
        resize(16 * MIB + BLOCK),
        write(4096, 2),
        write(1000, 3),
        snapshot(1),
        // s1 from s0 into the 1 MiB receiver: refused, grown, received.
        send(0, true),
        resize(MIB),
        Op::DeleteSnapshot { pick: 1, cut: None },
        Op::Resize {
            size: MIB,
            cut: Some(Cut {
                after: 12,
                seed: 7,
                kill: false,
            }),
        },
        resize(MIB),
        snapshot(2),
        send(1, true),
        // 8 leaves; data in leaves 1 (every map), 4 and 7: two steps do 5 leaves.
        resize(2 * MIB),
        write(300, 4),
        write(500, 6),
        Op::StartReencrypt {
            aegis: true,
            cut: None,
        },
        step.clone(),
        step.clone(),
        // 2 leaves, 5 done; then 16 leaves, 5 done, what is past them new.
        resize(MIB / 2),
        Op::PowerLoss { seed: 3 },
        resize(4 * MIB),
        write(200, 7),
        step.clone(),
        step.clone(),
        snapshot(3),
        resize(MIB),
        Op::Revert {
            pick: 2,
            keep: None,
            cut: None,
        },
        write(100, 5),
        send(2, true),
        Op::Resize {
            size: 4095,
            cut: None,
        },
    ];
    let mut h = Harness::new(MIB, false, None);
    for op in &ops {
        h.run(op).unwrap_or_else(|e| panic!("{e}"));
    }
    settle(&mut h).unwrap_or_else(|e| panic!("{e}"));
}

/// Compression through the model, whatever proptest draws (16 KiB units): whole-group
/// writes of text, of half-random data and of random data (plain), a write of zeros over a
/// unit, a unit partly overwritten, discarded and zeroed, crashes in the middle of writes of
/// units, compression turned off (whole writes stay plain, the units read on) and on again
/// across a reopen, a snapshot and a re-encryption started (or their refusal while the
/// engine does not support them with units), a shrink through a unit and a grow back.
#[test]
fn compression_scenario() {
    let block = |b: u64| b * (BLOCK / SECTOR);
    let whole = |b: u64, blocks: u64, tag| Op::WriteWhole {
        block: b,
        blocks,
        tag,
    };
    let write = |b: u64, sectors, tag| Op::Write {
        sector: block(b),
        sectors,
        tag,
    };
    let set = |level| Op::SetCompression { level, cut: None };
    let crash_after = |after, kill| Op::CrashAfterOps {
        after,
        seed: u64::from(after),
        kill,
    };
    let ops = [
        whole(0, 16, 3),  // text: four units
        whole(16, 4, 9),  // half random: k = 2 or 3
        whole(20, 4, 8),  // random: plain
        whole(24, 8, 10), // mostly zeros: units with holes, or unmapped
        write(1, 8, 11),  // one block of a unit, plain
        Op::Discard {
            sector: block(2),
            sectors: 8,
        },
        Op::WriteZeroes {
            sector: block(17) + 3,
            sectors: 2,
            unmap: true,
        },
        Op::Flush,
        whole(64, 128, 19), // over two leaves
        Op::PowerLoss { seed: 1 },
        crash_after(3, false),
        whole(32, 16, 27),
        crash_after(2, true),
        whole(0, 8, 35),
        whole(4, 4, 1),
        Op::CommitAsync,
        whole(40, 4, 43),
        Op::PowerLoss { seed: 2 },
        set(None),
        whole(48, 8, 51), // plain now
        Op::Reopen,
        Op::Commit,
        whole(56, 4, 59),
        set(Some(1)),
        whole(48, 4, 67),
        Op::CreateSnapshot { name: 0, cut: None },
        Op::StartReencrypt {
            aegis: false,
            cut: None,
        },
        set(Some(0)),
        Op::SetCompression {
            level: Some(3),
            cut: Some(Cut {
                after: 1,
                seed: 5,
                kill: false,
            }),
        },
        whole(8, 8, 75),
        Op::Resize {
            size: 50 * BLOCK,
            cut: None,
        },
        Op::Resize {
            size: 1 << 20,
            cut: None,
        },
        whole(200, 56, 83),
        write(198, 40, 91),
        Op::ProcessCrash,
    ];
    let mut h = Harness::new(
        1 << 20,
        false,
        Some(Compression {
            unit_log2: 2,
            level: Some(3),
        }),
    );
    let mut most = 0;
    for op in &ops {
        h.run(op).unwrap_or_else(|e| panic!("{e}"));
        if h.armed.is_none() {
            let u = h.vol().compression_usage().expect("usage");
            most = most.max(u.unit_lbns);
        }
    }
    assert!(
        most >= 64,
        "units were written: at most {most} blocks in units"
    );
    settle(&mut h).unwrap_or_else(|e| panic!("{e}"));
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
