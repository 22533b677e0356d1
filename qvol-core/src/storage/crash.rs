//! [`CrashStorage`]: a model of what a power loss (or a process crash) leaves on a disk.
//!
//! The model keeps two things: the *durable* image (the bytes as of the last successful
//! `sync_data`) and the list of operations made since (writes, length changes, hole
//! punches). Reads see the *live* image, durable plus every pending operation.
//!
//! A power loss ([`CrashStorage::crash`]) keeps the durable image and replays, in their
//! original order, any subset of the pending operations; a surviving write may be torn, only
//! some of its 512-byte sectors (aligned on absolute offsets) landing. Replaying a subset in
//! order lets every sector end up holding any one of the versions written to it since the
//! sync, or its durable content: the most a real page cache and disk can do. A process crash
//! ([`CrashStorage::process_crash`]) loses nothing: the page cache survives the process, but
//! what it holds is still not durable, so the result keeps the pending list too.
//!
//! Crashes are deterministic functions of a seed, so that a failing property-test case
//! replays exactly.

use std::fmt;
use std::io;
use std::sync::{Mutex, MutexGuard};

use super::chunked::Chunked;
use super::{Storage, STORAGE_SECTOR};

/// What a crash keeps of the operations made since the last sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPolicy {
    /// Everything written survives (the disk had written it all back).
    KeepAll,
    /// Nothing since the last sync survives.
    DropAll,
    /// Each pending operation survives with probability `survive_percent`%; a surviving write
    /// is torn with probability `tear_percent`%, each of its sectors then landing with
    /// probability 1/2.
    Random {
        /// Chance (0-100) that an operation survives.
        survive_percent: u8,
        /// Chance (0-100) that a surviving write is torn.
        tear_percent: u8,
    },
}

impl CrashPolicy {
    /// A policy drawn from `seed`: all, nothing, or a subset with a random survival rate,
    /// so that a range of seeds covers each kind of crash.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x0c4a_5b01_1c7e_5eed);
        match rng.below(8) {
            0 => CrashPolicy::KeepAll,
            1 => CrashPolicy::DropAll,
            _ => CrashPolicy::Random {
                survive_percent: [10, 25, 50, 75, 90][rng.below(5) as usize],
                tear_percent: [0, 25, 50][rng.below(3) as usize],
            },
        }
    }
}

#[derive(Clone, Debug)]
enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { offset: u64, len: u64 },
}

#[derive(Clone, Default)]
struct State {
    durable: Chunked,
    live: Chunked,
    pending: Vec<PendingOp>,
    syncs: u64,
}

/// An in-memory storage that can simulate a power loss; see the module documentation.
#[derive(Default)]
pub struct CrashStorage {
    state: Mutex<State>,
    /// Whether it says each write is a round trip (`Storage::round_trips`), as RBD does.
    round_trips: std::sync::atomic::AtomicBool,
}

impl CrashStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage whose durable (and live) bytes are `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self::from_image(Chunked::from_bytes(&bytes))
    }

    fn from_image(image: Chunked) -> Self {
        Self {
            state: Mutex::new(State {
                live: image.clone(),
                durable: image,
                pending: Vec::new(),
                syncs: 0,
            }),
            round_trips: Default::default(),
        }
    }

    /// Makes it say that each write is a round trip (`Storage::round_trips`, as RBD does),
    /// so that the engine gathers the writes of writers that write together.
    pub fn set_round_trips(&self, on: bool) {
        self.round_trips
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The image a power loss could leave, drawn from `seed` with
    /// [`CrashPolicy::from_seed`]; everything synced survives. The result is a fresh storage
    /// with no pending operations.
    pub fn crash(&self, seed: u64) -> CrashStorage {
        self.crash_with(CrashPolicy::from_seed(seed), seed)
    }

    /// The image a power loss could leave under `policy`, deterministic in `seed` (saying
    /// each write is a round trip if this one does).
    pub fn crash_with(&self, policy: CrashPolicy, seed: u64) -> CrashStorage {
        let crashed = CrashStorage::from_image(self.crashed(policy, seed));
        crashed.set_round_trips(self.round_trips());
        crashed
    }

    /// The bytes a power loss under `policy` could leave, deterministic in `seed`.
    pub fn crash_image(&self, policy: CrashPolicy, seed: u64) -> Vec<u8> {
        self.crashed(policy, seed).to_vec()
    }

    fn crashed(&self, policy: CrashPolicy, seed: u64) -> Chunked {
        let st = self.lock();
        let mut rng = SplitMix64::new(seed);
        let mut image = st.durable.clone();
        for op in &st.pending {
            let (survives, tear) = match policy {
                CrashPolicy::KeepAll => (true, false),
                CrashPolicy::DropAll => (false, false),
                CrashPolicy::Random {
                    survive_percent,
                    tear_percent,
                } => (rng.percent(survive_percent), rng.percent(tear_percent)),
            };
            if survives {
                apply(&mut image, op, tear.then_some(&mut rng));
            }
        }
        image
    }

    /// What a crash of the process (not of the machine) leaves: every completed operation,
    /// still not durable. The pending list is kept, so the result can lose power later.
    pub fn process_crash(&self) -> CrashStorage {
        let st = self.lock().clone();
        CrashStorage {
            state: Mutex::new(st),
            round_trips: self.round_trips().into(),
        }
    }

    /// A copy of the live bytes (what reads return now).
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.to_vec()
    }

    /// A copy of the durable bytes (what survives any power loss).
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.to_vec()
    }

    /// How many operations were made since the last sync.
    pub fn pending_ops(&self) -> usize {
        self.lock().pending.len()
    }

    /// How many times `sync_data` was called.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation below completes or fails before touching the state, so a poisoned
        // lock holds a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Applies one surviving operation to a crash image; with `tear`, only a random subset of
/// the write's sectors lands.
fn apply(image: &mut Chunked, op: &PendingOp, tear: Option<&mut SplitMix64>) {
    match op {
        PendingOp::SetLen(len) => {
            // The length was valid when the operation succeeded, so it fits now.
            let _ = image.set_len(*len);
        }
        PendingOp::Punch { offset, len } => match tear {
            None => image.punch(*offset, *len),
            Some(rng) => {
                let end = offset.saturating_add(*len).min(image.len() as u64);
                for (start, stop) in sectors(*offset, end) {
                    if rng.percent(50) {
                        image.punch(start, stop - start);
                    }
                }
            }
        },
        PendingOp::Write { offset, data } => match tear {
            None => {
                let _ = image.write(data, *offset);
            }
            Some(rng) => {
                let end = *offset + data.len() as u64;
                for (start, stop) in sectors(*offset, end) {
                    if rng.percent(50) {
                        let piece = &data[(start - offset) as usize..(stop - offset) as usize];
                        let _ = image.write(piece, start);
                    }
                }
            }
        },
    }
}

/// Splits `start..end` at multiples of [`STORAGE_SECTOR`].
fn sectors(start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / STORAGE_SECTOR + 1) * STORAGE_SECTOR).min(end);
        let piece = (pos, next);
        pos = next;
        Some(piece)
    })
}

impl fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("CrashStorage")
            .field("len", &st.live.len())
            .field("pending_ops", &st.pending.len())
            .field("syncs", &st.syncs)
            .finish()
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn round_trips(&self) -> bool {
        self.round_trips.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.lock().live.read(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.live.write(buf, offset)?;
        st.pending.push(PendingOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.live.set_len(len)?;
        st.pending.push(PendingOp::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.lock();
        st.durable = st.live.clone();
        st.pending.clear();
        st.syncs += 1;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.live.punch(offset, len);
        st.pending.push(PendingOp::Punch { offset, len });
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, seedable generator; crash
/// images need reproducibility, not cryptographic quality.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u8) -> bool {
        self.below(100) < u64::from(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms() {
        super::super::conformance::check_backend(&CrashStorage::new());
    }

    #[test]
    fn synced_writes_always_survive() {
        let s = CrashStorage::new();
        s.write_all_at(&[1u8; 4096], 0).unwrap();
        s.sync_data().unwrap();
        s.write_all_at(&[2u8; 4096], 0).unwrap();
        assert_eq!(s.pending_ops(), 1);
        assert_eq!(s.sync_count(), 1);
        let dropped = s.crash_with(CrashPolicy::DropAll, 1).live_image();
        assert_eq!(dropped, vec![1u8; 4096]);
        let kept = s.crash_with(CrashPolicy::KeepAll, 1).live_image();
        assert_eq!(kept, vec![2u8; 4096]);
        for seed in 0..200 {
            let img = s.crash(seed).live_image();
            assert_eq!(img.len(), 4096);
            assert!(img.iter().all(|&b| b == 1 || b == 2));
        }
    }

    #[test]
    fn every_sector_holds_one_of_its_versions() {
        let s = CrashStorage::new();
        s.write_all_at(&[0u8; 8192], 0).unwrap();
        s.sync_data().unwrap();
        for v in 1..=5u8 {
            s.write_all_at(&vec![v; 4096], u64::from(v % 2) * 4096)
                .unwrap();
        }
        let mut seen_torn = false;
        let mut seen_mixed_versions = false;
        for seed in 0..500 {
            let img = s
                .crash_with(
                    CrashPolicy::Random {
                        survive_percent: 50,
                        tear_percent: 50,
                    },
                    seed,
                )
                .live_image();
            assert_eq!(img.len(), 8192);
            for (i, sector) in img.chunks(512).enumerate() {
                assert!(sector.iter().all(|&b| b == sector[0]), "sector {i} mixes");
                let allowed: &[u8] = if i < 8 { &[0, 2, 4] } else { &[0, 1, 3, 5] };
                assert!(allowed.contains(&sector[0]), "sector {i} = {}", sector[0]);
            }
            let first_half: std::collections::BTreeSet<u8> =
                img[..4096].chunks(512).map(|c| c[0]).collect();
            seen_torn |= first_half.len() > 1;
            seen_mixed_versions |= first_half.contains(&2) && first_half.contains(&4);
        }
        assert!(seen_torn && seen_mixed_versions);
    }

    #[test]
    fn crashes_are_deterministic_in_the_seed() {
        let s = CrashStorage::new();
        for i in 0..50u64 {
            s.write_all_at(&[i as u8; 1000], i * 700).unwrap();
        }
        for seed in 0..50 {
            assert_eq!(s.crash(seed).live_image(), s.crash(seed).live_image());
        }
        let distinct: std::collections::BTreeSet<Vec<u8>> =
            (0..50).map(|seed| s.crash(seed).live_image()).collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn unaligned_writes_tear_on_absolute_sector_boundaries() {
        let pieces: Vec<_> = sectors(500, 1100).collect();
        assert_eq!(pieces, vec![(500, 512), (512, 1024), (1024, 1100)]);
        assert_eq!(sectors(7, 7).count(), 0);
    }

    #[test]
    fn length_changes_and_punches_are_pending_too() {
        let s = CrashStorage::from_bytes(vec![9u8; 1024]);
        s.set_len(2048).unwrap();
        s.punch_hole(0, 512).unwrap();
        let kept = s.crash_with(CrashPolicy::KeepAll, 0).live_image();
        assert_eq!(kept.len(), 2048);
        assert!(kept[..512].iter().all(|&b| b == 0));
        assert!(kept[512..1024].iter().all(|&b| b == 9));
        let dropped = s.crash_with(CrashPolicy::DropAll, 0).live_image();
        assert_eq!(dropped, vec![9u8; 1024]);
    }

    #[test]
    fn process_crash_keeps_everything_but_not_durably() {
        let s = CrashStorage::new();
        s.write_all_at(b"synced", 0).unwrap();
        s.sync_data().unwrap();
        s.write_all_at(b"cached", 0).unwrap();
        let after_kill = s.process_crash();
        assert_eq!(after_kill.live_image(), b"cached");
        assert_eq!(after_kill.durable_image(), b"synced");
        let then_power_loss = after_kill.crash_with(CrashPolicy::DropAll, 0);
        assert_eq!(then_power_loss.live_image(), b"synced");
    }

    #[test]
    fn policies_from_seeds_cover_every_kind() {
        let policies: Vec<_> = (0..64).map(CrashPolicy::from_seed).collect();
        assert!(policies.contains(&CrashPolicy::KeepAll));
        assert!(policies.contains(&CrashPolicy::DropAll));
        assert!(policies
            .iter()
            .any(|p| matches!(p, CrashPolicy::Random { tear_percent, .. } if *tear_percent > 0)));
    }
}
