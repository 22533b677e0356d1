//! Crash safety of re-encryption (FORMAT.md §3.1 and §17): the start (same suite, and
//! XChaCha20-Poly1305 to AEGIS-256), a step in the middle and the finishing step are each cut
//! after N storage mutations, for every N up to the one where the operation completes, on a
//! volume with data in the live disk and in two snapshots, and with writes flushed to the
//! log but not committed just before the operation. A cut is a process crash (kill -9: every
//! completed write kept) or a power loss (any unsynced subset kept, torn at 512 bytes; the
//! failing write itself lands torn).
//!
//! Every image a cut leaves must:
//! - open read-only with the key that its state allows: before the start's staging commit
//!   only the old key opens it (the new one gets `WrongKey`) and nothing changed (old
//!   keyslots, no re-encryption); after it, mid-way, both keys open it and see the same
//!   progress and the new keyslots; once the finish committed, the new key opens it with no
//!   re-encryption in progress (the old key may still open the previous superblock while
//!   the finish is between its two commits, and then sees everything done);
//! - read back exactly the content of the live disk and of each snapshot with every key that
//!   opens it, and `Volume::check` must be clean;
//! - after a writable open (either key, alternately) and resuming the re-encryption to its
//!   end, read the same and check clean; afterwards the key the image started from (old if
//!   the start did not take, else new) opens it with nothing in progress, and the other key
//!   is refused.
//!
//! Each cut yields the kill -9 image and 3 power-loss images; `QVOL_REENCRYPT_CRASH_ALL=1`
//! draws 8 (and would cut at every N of an operation long enough to be sampled).

mod common;

use std::sync::Arc;

use common::{key, pattern, BS};
use qvol_core::storage::{CrashStorage, FaultConfig, FaultStorage, MemStorage, OpKinds, Storage};
use qvol_core::{CipherSuite, ErrorKind, OpenOptions, Volume};

/// 16 map leaves (64 logical blocks each).
const SIZE: u64 = 4 << 20;
const BLOCKS: u64 = SIZE / BS as u64;
/// The key the volume is created with, and the one it moves to.
const OLD: u8 = 1;
const NEW: u8 = 2;

fn exhaustive() -> bool {
    std::env::var_os("QVOL_REENCRYPT_CRASH_ALL").is_some_and(|v| v != "0")
}

/// What every image must hold, whatever the cut.
#[derive(Clone)]
struct Expect {
    live: Vec<u8>,
    /// Snapshots, oldest first, with their content.
    snaps: Vec<(String, Vec<u8>)>,
    old_slots: Vec<Vec<u8>>,
    new_slots: Vec<Vec<u8>>,
    from: CipherSuite,
    to: CipherSuite,
}

fn image_of(st: &MemStorage) -> Vec<u8> {
    st.to_vec()
}

fn read_all(vol: &Volume) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; SIZE as usize];
    vol.read_at(0, &mut buf)
        .map_err(|e| format!("fails to read: {e:?}"))?;
    Ok(buf)
}

fn same_content(vol: &Volume, want: &[u8], what: &str) {
    let got = read_all(vol).unwrap_or_else(|m| panic!("{what}: {m}"));
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: reads wrong data at byte {at} (logical block {})",
            at / BS
        );
    }
}

fn assert_clean(vol: &Volume, what: &str) {
    let report = vol
        .check(&mut |_, _| {})
        .unwrap_or_else(|e| panic!("{what}: check fails: {e:?}"));
    assert!(report.is_clean(), "{what}: check is not clean: {report:#?}");
}

/// `check` of a read-only volume: clean (a staged header copy included, FORMAT.md §3.1).
fn assert_clean_ro(vol: &Volume, what: &str) {
    let report = vol
        .check(&mut |_, _| {})
        .unwrap_or_else(|e| panic!("{what}: check fails: {e:?}"));
    assert!(report.is_clean(), "{what}: check is not clean: {report:#?}");
}

/// `n` writes of whole blocks spread over the disk, tagged from `tag`, recorded in `live`.
fn scatter(vol: &Volume, live: &mut [u8], tag: u64, n: u64, stride: u64) {
    for i in 0..n {
        let lbn = (i * stride + tag) % BLOCKS;
        let data = pattern(tag * 10_000 + i, BS);
        vol.write_at(lbn * BS as u64, &data).expect("write");
        let at = (lbn as usize) * BS;
        live[at..at + BS].copy_from_slice(&data);
    }
}

/// A closed volume under key `OLD` with `from`: data in the live disk and in two snapshots
/// (some blocks shared between them, some not, some only live). Returns its bytes.
fn populated(from: CipherSuite, to: CipherSuite) -> (Vec<u8>, Expect) {
    let st = Arc::new(MemStorage::new());
    let vol = Volume::create(
        st.clone() as Arc<dyn Storage>,
        common::options(SIZE, from),
        &key(OLD),
    )
    .expect("create");
    let mut live = vec![0u8; SIZE as usize];
    let mut snaps = Vec::new();
    for round in 0..3u64 {
        scatter(&vol, &mut live, round + 1, 130, 7 + round * 2);
        if round < 2 {
            let name = format!("s{round}");
            vol.create_snapshot(&name).expect("snapshot");
            snaps.push((name, live.clone()));
        }
    }
    // A hole punched in the live disk (blocks a snapshot still holds).
    vol.discard(40 * BS as u64, 24 * BS as u64)
        .expect("discard");
    live[40 * BS..64 * BS].fill(0);
    let old_slots = vol.keyslots();
    vol.close().expect("close");
    let expect = Expect {
        live,
        snaps,
        old_slots,
        new_slots: Vec::new(),
        from,
        to,
    };
    (image_of(&st), expect)
}

/// The keyslots that wrap the new key (opaque to the engine).
fn new_slots() -> Vec<Vec<u8>> {
    vec![Vec::new(), b"a new keyslot blob, for key 2".to_vec()]
}

/// The operation cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `start_reencryption` to `NEW` with this suite.
    Start(CipherSuite),
    /// A `reencrypt_step` of this many leaves that does not finish.
    Step(u64),
    /// The `reencrypt_step` that finishes.
    Finish,
}

impl Op {
    /// The key the volume running the operation is opened with.
    fn runner_key(self) -> u8 {
        match self {
            Op::Start(_) | Op::Finish => OLD,
            Op::Step(_) => NEW,
        }
    }

    fn run(self, vol: &Volume) -> qvol_core::Result<()> {
        match self {
            Op::Start(suite) => {
                let hash = vol.keyslots_hash();
                vol.start_reencryption(&key(NEW), suite, &new_slots(), &hash)
                    .map(drop)
            }
            Op::Step(n) => vol.reencrypt_step(n).map(|p| {
                assert!(p.is_some(), "a middle step must not finish");
            }),
            Op::Finish => vol.reencrypt_step(u64::MAX).map(|p| {
                assert!(p.is_none(), "the last step finishes");
            }),
        }
    }
}

/// The state an image is in, as the new key sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The start did not take: only the old key opens it.
    Before,
    /// Mid-way with this many leaves done.
    Mid(u64),
    /// Finished.
    After,
}

/// The whole scenario of one operation: the image it runs on and what cuts may leave.
struct Case {
    label: String,
    base: Vec<u8>,
    expect: Expect,
    op: Op,
    /// The states a cut may leave (the one before the operation first, the one after last;
    /// every one must be seen).
    allowed: Vec<State>,
}

/// Opens `st` with key `k`.
fn open(st: &Arc<dyn Storage>, k: u8, read_only: bool) -> qvol_core::Result<Volume> {
    Volume::open(st.clone(), &key(k), read_only)
}

/// Every snapshot reads back exactly through a read-only view opened with key `k`.
fn check_snapshots(st: &Arc<dyn Storage>, k: u8, expect: &Expect, what: &str) {
    for (name, content) in &expect.snaps {
        let view = Volume::open_with(
            st.clone(),
            &key(k),
            OpenOptions {
                read_only: true,
                snapshot: Some(name.clone()),
                ..OpenOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: snapshot {name} does not open with key {k}: {e:?}"));
        same_content(&view, content, &format!("{what}: snapshot {name}, key {k}"));
    }
}

/// Content, snapshot list and check of a volume open with key `k` on `st`.
fn check_volume(st: &Arc<dyn Storage>, vol: &Volume, k: u8, expect: &Expect, what: &str) {
    let names: Vec<String> = vol.snapshots().into_iter().map(|s| s.name).collect();
    let want: Vec<String> = expect.snaps.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, want, "{what}: the snapshot list (key {k})");
    same_content(
        vol,
        &expect.live,
        &format!("{what}: the live disk, key {k}"),
    );
    if vol.is_read_only() {
        assert_clean_ro(vol, &format!("{what}, key {k}"));
    } else {
        assert_clean(vol, &format!("{what}, key {k}"));
    }
    check_snapshots(st, k, expect, what);
}

/// Checks one image a cut left (see the module documentation); `flip` picks the key of the
/// writable open when both open. Returns the state it was in, and whether the old key
/// opened it.
fn verify(case: &Case, image: Vec<u8>, flip: bool, what: &str) -> (State, bool) {
    let expect = &case.expect;
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
    let new_ro = open(&st, NEW, true);
    let old_ro = open(&st, OLD, true);
    let state = match &new_ro {
        Err(e) => {
            assert_eq!(
                e.kind(),
                ErrorKind::WrongKey,
                "{what}: the new key fails otherwise than WrongKey: {e:?}"
            );
            State::Before
        }
        Ok(v) => match v.reencryption() {
            Some(r) => State::Mid(r.done),
            None => State::After,
        },
    };
    assert!(
        case.allowed.contains(&state),
        "{what}: the image is {state:?}; allowed: {:?}",
        case.allowed
    );
    match state {
        State::Before => {
            let old = old_ro
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: neither key opens it (old: {e:?})"));
            assert_eq!(old.reencryption(), None, "{what}: nothing started");
            assert_eq!(old.keyslots(), expect.old_slots, "{what}: the old keyslots");
            assert_eq!(old.data_suite(), expect.from, "{what}: the old suite");
            check_volume(&st, old, OLD, expect, what);
        }
        State::Mid(done) => {
            let new = new_ro.as_ref().expect("opened");
            let old = old_ro
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: mid-way, the old key must open it: {e:?}"));
            let r = new.reencryption().expect("in progress");
            assert_eq!(
                old.reencryption().as_ref(),
                Some(&r),
                "{what}: both keys see the same re-encryption"
            );
            assert_eq!(
                (r.from_suite, r.to_suite),
                (expect.from, expect.to),
                "{what}: the suites of the re-encryption"
            );
            assert_eq!(r.to_epoch, r.from_epoch + 1, "{what}: the key epochs");
            assert!(done <= r.total, "{what}: {done} leaves done of {}", r.total);
            for (k, v) in [(NEW, new), (OLD, old)] {
                assert_eq!(v.keyslots(), expect.new_slots, "{what}: key {k}, keyslots");
                assert_eq!(v.data_suite(), expect.to, "{what}: key {k}, suite");
                check_volume(&st, v, k, expect, what);
            }
        }
        State::After => {
            let new = new_ro.as_ref().expect("opened");
            assert_eq!(new.keyslots(), expect.new_slots, "{what}: the new keyslots");
            assert_eq!(new.data_suite(), expect.to, "{what}: the new suite");
            check_volume(&st, new, NEW, expect, what);
            if let Ok(old) = &old_ro {
                // Only the superblock before the finish's first commit can still open under
                // the old key: everything done, and older than what the new key opened.
                let r = old.reencryption().unwrap_or_else(|| {
                    panic!("{what}: the old key opens a finished re-encryption")
                });
                assert_eq!(r.done, r.total, "{what}: the old key opens a stale state");
                assert!(
                    old.info().generation < new.info().generation,
                    "{what}: the old key opens the newest superblock of a finished image"
                );
                same_content(old, &expect.live, &format!("{what}: stale, old key"));
            }
        }
    }
    let old_opens = old_ro.is_ok();
    drop((new_ro, old_ro));

    // A writable open settles and resumes; then only the right key opens it.
    let writer = match state {
        State::Before => OLD,
        _ if flip && old_opens => OLD,
        _ => NEW,
    };
    let rw = open(&st, writer, false)
        .unwrap_or_else(|e| panic!("{what}: a writable open with key {writer} fails: {e:?}"));
    let mut steps = 0;
    if rw.reencryption().is_some() {
        while rw
            .reencrypt_step(5)
            .unwrap_or_else(|e| panic!("{what}: resuming fails: {e:?}"))
            .is_some()
        {
            steps += 1;
            assert!(steps < 100, "{what}: the re-encryption does not end");
        }
    }
    assert_eq!(rw.reencryption(), None, "{what}: still re-encrypting");
    same_content(&rw, &expect.live, &format!("{what}: after resuming"));
    assert_clean(&rw, &format!("{what}: after resuming"));
    rw.close()
        .unwrap_or_else(|e| panic!("{what}: close after resuming: {e:?}"));
    let (good, bad, slots, suite) = match state {
        State::Before => (OLD, NEW, &expect.old_slots, expect.from),
        _ => (NEW, OLD, &expect.new_slots, expect.to),
    };
    match open(&st, bad, true) {
        Ok(_) => panic!("{what}: key {bad} still opens the image after resuming"),
        Err(e) => assert!(
            e.kind() != ErrorKind::Io,
            "{what}: key {bad} fails with an I/O error: {e:?}"
        ),
    }
    let end = open(&st, good, true)
        .unwrap_or_else(|e| panic!("{what}: key {good} does not open it after resuming: {e:?}"));
    assert_eq!(
        end.reencryption(),
        None,
        "{what}: reopened, still in progress"
    );
    assert_eq!(end.keyslots(), *slots, "{what}: keyslots after resuming");
    assert_eq!(end.data_suite(), suite, "{what}: suite after resuming");
    check_volume(&st, &end, good, expect, &format!("{what}, resumed"));
    (state, old_opens)
}

/// Storage mutations between arming and the end of the operation when nothing fails, and
/// the progress it leaves.
fn reference(case_base: &[u8], expect: &mut Expect, op: Op) -> (u64, Option<u64>) {
    let crash = Arc::new(CrashStorage::from_bytes(case_base.to_vec()));
    let fault = Arc::new(FaultStorage::new(crash.clone(), FaultConfig::never()));
    let vol = open(&(fault.clone() as Arc<dyn Storage>), op.runner_key(), false).expect("open");
    prepare(&vol, &mut expect.live, op);
    fault.set_config(FaultConfig {
        fail_after: u64::MAX,
        count: OpKinds::MUTATIONS,
        fail: OpKinds::NONE,
        tear_failed_writes: false,
    });
    op.run(&vol).expect("the operation, uncut");
    let ops = fault.ops();
    if matches!(op, Op::Start(_)) {
        expect.new_slots = vol.keyslots();
    }
    let done = vol.reencryption().map(|r| r.done);
    (ops, done)
}

/// What happens between the open and the operation: writes made durable by a flush but not
/// committed (the operation commits them first; a cut must keep them).
fn prepare(vol: &Volume, live: &mut [u8], op: Op) {
    let tag = match op {
        Op::Start(_) => 11,
        Op::Step(_) => 12,
        Op::Finish => 13,
    };
    scatter(vol, live, tag, 12, 53);
    vol.flush().expect("flush");
}

/// The cut points: every one up to `total` (where the operation completes); for a long
/// operation (not one here so far), every one at the ends and a stride in the middle,
/// unless exhaustive.
fn cut_points(total: u64) -> Vec<u64> {
    const ENDS: u64 = 40;
    const MIDDLE: u64 = 80;
    if exhaustive() || total <= 2 * ENDS + MIDDLE {
        return (0..=total).collect();
    }
    let stride = (total - 2 * ENDS).div_ceil(MIDDLE);
    let mut out: Vec<u64> = (0..ENDS).collect();
    out.extend((ENDS..total - ENDS).step_by(stride as usize));
    out.extend(total - ENDS..=total);
    out
}

fn crash_everywhere(mut case: Case) {
    let (total, _) = reference(&case.base, &mut case.expect, case.op);
    let seeds: u64 = if exhaustive() { 8 } else { 3 };
    let mut seen = Vec::new();
    // Finished images the old key still opened (between the finish's two commits).
    let mut stale = 0u64;
    for n in cut_points(total) {
        let crash = Arc::new(CrashStorage::from_bytes(case.base.clone()));
        let fault = Arc::new(FaultStorage::new(crash.clone(), FaultConfig::never()));
        let vol = open(
            &(fault.clone() as Arc<dyn Storage>),
            case.op.runner_key(),
            false,
        )
        .expect("open");
        prepare(&vol, &mut case.expect.live.clone(), case.op);
        fault.set_config(FaultConfig {
            fail_after: n,
            count: OpKinds::MUTATIONS,
            fail: OpKinds::ALL,
            tear_failed_writes: true,
        });
        let done = case.op.run(&vol).is_ok();
        drop(vol);
        assert!(
            done || n < total,
            "{}: cut after {n} of {total} mutations, the operation did not complete",
            case.label
        );
        let images = std::iter::once(crash.process_crash().live_image())
            .chain((0..seeds).map(|s| crash.crash(n * 131 + s).durable_image()));
        for (i, image) in images.enumerate() {
            let what = format!(
                "{}: cut after {n} of {total} mutations ({}), {}",
                case.label,
                if done { "completed" } else { "interrupted" },
                if i == 0 {
                    "kill -9".to_string()
                } else {
                    format!("power loss {}", n * 131 + i as u64 - 1)
                }
            );
            let (state, old_opens) = verify(&case, image, (n + i as u64) % 2 == 1, &what);
            stale += u64::from(state == State::After && old_opens);
            if done {
                assert_eq!(
                    Some(&state),
                    case.allowed.last(),
                    "{what}: a completed operation must stick"
                );
                assert!(
                    state != State::After || !old_opens,
                    "{what}: the old key still opens a finished image"
                );
            }
            seen.push(state);
        }
    }
    let count = |s: State| seen.iter().filter(|&&x| x == s).count();
    eprintln!(
        "{}: {total} mutations, {} cut points, {} images: {:?}, {stale} finished ones the \
         old key opened (stale)",
        case.label,
        cut_points(total).len(),
        seen.len(),
        case.allowed
            .iter()
            .map(|&s| (s, count(s)))
            .collect::<Vec<_>>()
    );
    for &s in &case.allowed {
        assert!(
            seen.contains(&s),
            "{}: no cut left the image {s:?} (the cuts missed the operation)",
            case.label
        );
    }
}

/// `image` (mid-way, opened with `NEW`) after `steps` steps of `leaves` leaves; its progress.
fn step_image(image: Vec<u8>, steps: u32, leaves: u64) -> (Vec<u8>, u64) {
    let st = Arc::new(MemStorage::from_bytes(image));
    let vol = open(&(st.clone() as Arc<dyn Storage>), NEW, false).expect("open");
    for _ in 0..steps {
        vol.reencrypt_step(leaves)
            .expect("step")
            .expect("not finished");
    }
    let done = vol.reencryption().expect("in progress").done;
    vol.close().expect("close");
    (image_of(&st), done)
}

/// The image right after an uncut start (prepared as the start case is) and what it holds.
fn started(from: CipherSuite, to: CipherSuite) -> (Vec<u8>, Expect) {
    let (base, mut expect) = populated(from, to);
    let st = Arc::new(MemStorage::from_bytes(base));
    let vol = open(&(st.clone() as Arc<dyn Storage>), OLD, false).expect("open");
    let op = Op::Start(to);
    prepare(&vol, &mut expect.live, op);
    op.run(&vol).expect("start");
    expect.new_slots = vol.keyslots();
    vol.close().expect("close");
    (image_of(&st), expect)
}

#[test]
fn a_cut_start_leaves_the_old_volume_or_a_started_one() {
    for (from, to) in [
        (
            CipherSuite::XChaCha20Poly1305,
            CipherSuite::XChaCha20Poly1305,
        ),
        (CipherSuite::XChaCha20Poly1305, CipherSuite::Aegis256),
    ] {
        let (base, expect) = populated(from, to);
        let op = Op::Start(to);
        let (_, done) = reference(&base, &mut expect.clone(), op);
        assert_eq!(done, Some(0), "a start does nothing to the data yet");
        crash_everywhere(Case {
            label: format!("start {from} -> {to}"),
            base,
            expect,
            op,
            allowed: vec![State::Before, State::Mid(0)],
        });
    }
}

#[test]
fn a_cut_step_leaves_the_range_done_or_not() {
    let (image, expect) = started(CipherSuite::XChaCha20Poly1305, CipherSuite::Aegis256);
    let (base, before) = step_image(image, 2, 2);
    assert!(before > 0, "two steps did something");
    let op = Op::Step(3);
    let (_, after) = reference(&base, &mut expect.clone(), op);
    let after = after.expect("a middle step leaves it in progress");
    assert!(after > before, "the step makes progress");
    crash_everywhere(Case {
        label: format!("step {before} -> {after}"),
        base,
        expect,
        op,
        allowed: vec![State::Mid(before), State::Mid(after)],
    });
}

#[test]
fn a_cut_finish_leaves_the_last_range_undone_or_the_old_key_gone() {
    let (image, expect) = started(CipherSuite::XChaCha20Poly1305, CipherSuite::Aegis256);
    let (base, before) = step_image(image, 2, 5);
    let op = Op::Finish;
    let (_, after) = reference(&base, &mut expect.clone(), op);
    assert_eq!(after, None, "the last step finishes");
    let total = SIZE / qvol_core::LEAF_SPAN_BYTES;
    assert!(before < total, "the last range is left to do");
    crash_everywhere(Case {
        label: format!("finish from {before}"),
        base,
        expect,
        op,
        // The last range re-sealed is one commit, dropping the old key two more.
        allowed: vec![State::Mid(before), State::Mid(total), State::After],
    });
}
