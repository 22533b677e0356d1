//! Snapshots (FORMAT.md §6.1, §7.1, §8.1): content, revert, delete, read-only views, and the
//! space accounting, which `Volume::check` must find exact after every step of a long random
//! sequence of writes, discards, commits, reopens and snapshot operations.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{ErrorKind, OpenOptions, Volume};

const SIZE: u64 = 8 << 20;
const BLOCKS: u64 = SIZE / 4096;

fn block(tag: u64) -> Vec<u8> {
    common::pattern(tag, 4096)
}

fn open_snapshot(st: &Arc<MemStorage>, name: &str) -> qvol_core::Result<Volume> {
    Volume::open_with(
        st.clone() as Arc<dyn Storage>,
        &common::key(1),
        OpenOptions {
            read_only: true,
            snapshot: Some(name.into()),
            ..OpenOptions::default()
        },
    )
}

fn assert_clean(vol: &Volume, what: &str) {
    let report = vol.check(&mut |_, _| {}).expect("check runs");
    assert!(report.is_clean(), "{what}: {report:#?}");
}

#[test]
fn write_snapshot_write_revert_delete() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, SIZE);
    for lbn in 0..300 {
        vol.write_at(lbn * 4096, &block(lbn)).unwrap();
    }
    vol.create_snapshot("a").unwrap();
    assert_eq!(
        vol.create_snapshot("a").unwrap_err().kind(),
        ErrorKind::InvalidInput,
        "a duplicate name"
    );
    for lbn in 0..300 {
        vol.write_at(lbn * 4096, &block(1000 + lbn)).unwrap();
    }
    assert_clean(&vol, "after overwriting");
    let usage = vol.snapshot_usage().unwrap();
    assert_eq!(usage.len(), 1);
    assert!(
        usage[0].unique_bytes >= 300 * 4096,
        "the snapshot alone holds the overwritten data: {usage:?}"
    );
    vol.close().unwrap();

    let snap = open_snapshot(&st, "a").unwrap();
    assert_eq!(common::read_block(&snap, 7).unwrap(), block(7));
    assert_eq!(
        snap.write_at(0, &block(5)).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    drop(snap);
    assert!(open_snapshot(&st, "nope").is_err());

    let vol = common::open(st.clone() as Arc<dyn Storage>).unwrap();
    assert_eq!(common::read_block(&vol, 7).unwrap(), block(1007));
    let before = vol.info().allocated_bytes;
    vol.revert_to_snapshot("a", Some("discarded")).unwrap();
    assert_eq!(common::read_block(&vol, 7).unwrap(), block(7));
    assert_eq!(
        vol.info().allocated_bytes,
        before,
        "keeping the current state frees nothing"
    );
    assert_clean(&vol, "after revert");
    let freed = vol.delete_snapshot("discarded").unwrap();
    assert!(freed >= 300 * 4096, "freed {freed}");
    assert!(vol.info().allocated_bytes < before);
    assert_clean(&vol, "after delete");
    vol.delete_snapshot("a").unwrap();
    assert_eq!(common::read_block(&vol, 7).unwrap(), block(7));
    assert_clean(&vol, "after deleting the last snapshot");
    assert!(vol.snapshots().is_empty());
    vol.close().unwrap();
}

#[test]
fn bad_names_and_unknown_snapshots_change_nothing() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, SIZE);
    vol.write_at(0, &block(1)).unwrap();
    vol.create_snapshot("one").unwrap();
    vol.commit().unwrap();
    let before = st.to_vec();
    for bad in ["", "tab\there", &"x".repeat(256)] {
        assert_eq!(
            vol.create_snapshot(bad).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    assert!(vol.delete_snapshot("two").is_err());
    assert!(vol.revert_to_snapshot("two", None).is_err());
    assert!(vol.revert_to_snapshot("one", Some("one")).is_err());
    assert_eq!(st.to_vec(), before, "refused requests write nothing");
}

/// A small deterministic generator (the test must not depend on a crate's RNG API).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The model: the live disk and every snapshot, block by block (absent = zeros).
#[derive(Clone, Default)]
struct Model {
    live: HashMap<u64, u64>,
    snaps: Vec<(String, HashMap<u64, u64>)>,
}

fn verify(vol: &Volume, st: &Arc<MemStorage>, m: &Model, what: &str) {
    for lbn in 0..BLOCKS / 8 {
        let want = m.live.get(&lbn).map_or(vec![0u8; 4096], |&t| block(t));
        assert!(
            common::read_block(vol, lbn).unwrap() == want,
            "{what}: live block {lbn}"
        );
    }
    assert_clean(vol, what);
    let _ = st;
}

fn verify_snapshots(st: &Arc<MemStorage>, m: &Model, what: &str) {
    for (name, content) in &m.snaps {
        let snap = open_snapshot(st, name).unwrap();
        for lbn in 0..BLOCKS / 8 {
            let want = content.get(&lbn).map_or(vec![0u8; 4096], |&t| block(t));
            assert!(
                common::read_block(&snap, lbn).unwrap() == want,
                "{what}: snapshot {name} block {lbn}"
            );
        }
    }
}

/// Random writes, discards, commits, reopens and snapshot creates, deletes and reverts:
/// every snapshot and the live disk keep their content and `check` finds the accounting
/// exact (no leak, nothing in use marked free) after every step.
#[test]
fn random_snapshot_histories_keep_content_and_exact_accounting() {
    for seed in 1..=12u64 {
        let mut rng = Lcg(seed);
        let st = Arc::new(MemStorage::new());
        let mut vol = common::create(st.clone() as Arc<dyn Storage>, SIZE);
        let mut m = Model::default();
        let mut tag = seed * 1_000_000;
        let mut names = 0;
        for step in 0..120 {
            let what = format!("seed {seed} step {step}");
            match rng.next(10) {
                0..=3 => {
                    let lbn = rng.next(BLOCKS / 8);
                    let n = 1 + rng.next(70);
                    for k in 0..n.min(BLOCKS / 8 - lbn) {
                        tag += 1;
                        vol.write_at((lbn + k) * 4096, &block(tag)).unwrap();
                        m.live.insert(lbn + k, tag);
                    }
                }
                4 => {
                    let lbn = rng.next(BLOCKS / 8);
                    let n = 1 + rng.next(100).min(BLOCKS / 8 - lbn - 1);
                    vol.discard(lbn * 4096, n * 4096).unwrap();
                    for k in 0..n {
                        m.live.remove(&(lbn + k));
                    }
                }
                5 => {
                    names += 1;
                    let name = format!("s{names}");
                    vol.create_snapshot(&name).unwrap();
                    m.snaps.push((name, m.live.clone()));
                }
                6 if !m.snaps.is_empty() => {
                    let i = rng.next(m.snaps.len() as u64) as usize;
                    let (name, _) = m.snaps.remove(i);
                    vol.delete_snapshot(&name).unwrap();
                }
                7 if !m.snaps.is_empty() => {
                    let i = rng.next(m.snaps.len() as u64) as usize;
                    let (name, content) = m.snaps[i].clone();
                    if rng.next(2) == 0 {
                        names += 1;
                        let keep = format!("s{names}");
                        vol.revert_to_snapshot(&name, Some(&keep)).unwrap();
                        m.snaps.push((keep, m.live.clone()));
                    } else {
                        vol.revert_to_snapshot(&name, None).unwrap();
                    }
                    m.live = content;
                }
                8 => vol.commit().unwrap(),
                _ => {
                    vol.close().unwrap();
                    verify_snapshots(&st, &m, &what);
                    vol = common::open(st.clone() as Arc<dyn Storage>).unwrap();
                }
            }
            verify(&vol, &st, &m, &what);
        }
        let names: Vec<String> = m.snaps.iter().map(|(n, _)| n.clone()).collect();
        for name in names {
            vol.delete_snapshot(&name).unwrap();
        }
        verify(
            &vol,
            &st,
            &Model {
                live: m.live.clone(),
                snaps: vec![],
            },
            "all deleted",
        );
        let live_blocks = m.live.len() as u64;
        vol.close().unwrap();
        let vol = common::open(st.clone() as Arc<dyn Storage>).unwrap();
        let used = vol.info().allocated_bytes / 4096;
        // Data plus the map nodes (a leaf per 64 blocks and the interior nodes above them),
        // plus the space tree: nothing a deleted snapshot held stays allocated.
        assert!(
            used <= live_blocks + live_blocks / 16 + 16,
            "seed {seed}: {used} blocks in use for {live_blocks} live data blocks"
        );
    }
}

/// Damage in a node the live disk and a snapshot share is listed for both.
#[test]
fn check_names_every_tree_that_shares_a_damaged_node() {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, SIZE);
    for lbn in 0..10 {
        vol.write_at(lbn * 4096, &block(lbn)).unwrap();
    }
    vol.create_snapshot("a").unwrap();
    vol.close().unwrap();
    let mut image = st.to_vec();
    let layout = common::layout::Layout::read(&image);
    let leaf = layout
        .map_nodes
        .iter()
        .find(|n| n.level == 0)
        .expect("a map leaf");
    image[leaf.pbn as usize * 4096 + 100] ^= 1;
    let st = Arc::new(MemStorage::from_bytes(image));
    let vol = Volume::open(st as Arc<dyn Storage>, &common::key(1), true).unwrap();
    let report = vol.check(&mut |_, _| {}).unwrap();
    let trees: Vec<&str> = report.damage.iter().map(|d| d.tree.as_str()).collect();
    assert!(
        trees.contains(&"live") && trees.contains(&"snapshot a"),
        "{report:#?}"
    );
    assert!(report
        .damage
        .iter()
        .all(|d| d.first_lbn == Some(0) && d.blocks == 64));
}
