//! Golden images of every format version (`tests/data/golden-v{1,2,3,4,5}*.qvol`), checked
//! into the repository: every later version of qvol-core must still open them and read back
//! their known content. The images hold a committed tree and, after it, flushed log records
//! that only a replay applies, so both paths are pinned. The version-2 and later images are
//! of a 256 MiB volume, whose log (8 MiB) is longer than version 1's; the version-3 and later
//! images also hold the durable mark of their flush (FORMAT.md §9), so zeroing their log tail
//! is detected, while the older versions keep their old semantics (the tail is dropped
//! unnoticed). The version-4 images also pin the snapshot table (FORMAT.md §8.1): their
//! committed session takes two snapshots between its writes, which must read back as they
//! were taken (read-only snapshot views), and `Volume::check` must find the images clean.
//! The version-5 images are caught in the middle of a re-encryption (FORMAT.md §17): their
//! committed session starts one to [`golden_key_v5`] and re-seals the first leaf, so they pin
//! the record, blocks of two key epochs and nodes under the new key; they are opened with
//! the old key, which finds the new one in the record.
//!
//! The version-6 images are what kill -9 leaves while a pipelined commit is in flight
//! (FORMAT.md §10.1): their second session starts one after its flushed log records, writes
//! and flushes more in the next log epoch, and dies before the commit's superblock is
//! written; opening finds the next epoch through the head of its log area.
//!
//! The images of each version were made once with
//! `QVOL_WRITE_GOLDEN=1 cargo test -p qvol-core --test golden -- --ignored write_golden_images`
//! (it writes only the current version's files, and refuses to overwrite them) and must
//! never be regenerated (bump the version and add `golden-v6*` for a new format).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use common::BlockHistory;
use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{CipherSuite, CreateOptions, OpenOptions, Volume, VolumeKey, FORMAT_VERSION};

/// The volume size of the golden image of format `version`.
fn size(version: u32) -> u64 {
    match version {
        1 => 1 << 20,
        _ => 256 << 20,
    }
}

/// Its name: `golden-v1`, `golden-v2`, ...
fn name(version: u32) -> String {
    format!("golden-v{version}")
}

/// Its volume id: `qvol-golden-v1\0\0`, ...
fn volume_id(version: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..14].copy_from_slice(format!("qvol-golden-v{version}").as_bytes());
    id
}

/// The key of the golden images: bytes 0, 1, ..., 31.
fn golden_key() -> VolumeKey {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8;
    }
    VolumeKey::from_bytes(k)
}

/// The key the version-5 images are being re-encrypted to: bytes 32, 33, ..., 63.
fn golden_key_v5() -> VolumeKey {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = 32 + i as u8;
    }
    VolumeKey::from_bytes(k)
}

fn keyslots() -> Vec<Vec<u8>> {
    vec![b"golden keyslot 0".to_vec(), vec![0xa5; 300]]
}

/// What the first session does (then closes: committed).
enum Step {
    Write(u64, usize, u64),
    Discard(u64, u64),
    Zeroes(u64, u64),
    /// `create_snapshot` (version 4 on).
    Snapshot(&'static str),
    /// A write of text that compresses (`common::text`).
    Text(u64, usize, u64),
}

/// The compressed image of version 7 (`golden-v7-compressed.qvol`, 16 KiB units, zstd 3):
/// its first session writes units, overwrites and discards blocks of some (units partly
/// referenced), unmaps a group of zeros and stores a group that does not compress plain.
const COMPRESSED_COMMITTED: &[Step] = &[
    Step::Text(0, 16 * 4096, 31),                // 4 units
    Step::Write(5 * 4096, 4096, 32),             // a plain block over unit 1's second entry
    Step::Text(64 * 4096, 4 * 4096, 33),         // a unit in the second leaf
    Step::Discard(65 * 4096, 4096),              // ... one of its entries discarded
    Step::Text(128 * 4096, 8 * 4096, 34),        // 2 units
    Step::Zeroes(128 * 4096, 4 * 4096),          // the first unmapped whole
    Step::Write(200 * 4096, 4 * 4096, 35),       // does not compress: plain
    Step::Text(250 * 4096 + 512, 12 * 4096, 36), // groups 63 and 64 whole, the ends plain
];

/// Its second session, in the log only: units replayed (kind-3 records), a partial write
/// into a unit, a unit replaced whole.
const COMPRESSED_LOGGED: &[Step] = &[
    Step::Text(300 * 4096, 8 * 4096, 37),
    Step::Write(301 * 4096 + 512, 512, 38),
    Step::Text(0, 4 * 4096, 39),
    Step::Discard(10 * 4096, 4096),
];

/// The content of the compressed image.
fn expected_compressed() -> BlockHistory {
    let mut model = BlockHistory::new(size(7));
    apply(COMPRESSED_COMMITTED, &mut model, None);
    apply(COMPRESSED_LOGGED, &mut model, None);
    model
}

fn compressed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-v7-compressed.qvol")
}

/// Writes `golden-v7-compressed.qvol` (once, with the other version-7 images).
fn write_compressed_golden() {
    let p = compressed_path();
    assert!(
        !p.exists(),
        "{} exists: golden images are never regenerated",
        p.display()
    );
    let mem = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        key_epoch: 0,
        size: size(7),
        suite: CipherSuite::XChaCha20Poly1305,
        name: "golden-v7-compressed".into(),
        volume_id: volume_id(7),
        keyslots: keyslots(),
        compression: Some(qvol_core::Compression {
            unit_log2: 2,
            level: Some(3),
        }),
    };
    let mut model = BlockHistory::new(size(7));
    let vol = Volume::create(mem.clone(), opts, &golden_key()).expect("create");
    apply(COMPRESSED_COMMITTED, &mut model, Some(&vol));
    vol.close().expect("close");
    let vol = Volume::open(mem.clone(), &golden_key(), false).expect("open");
    apply(COMPRESSED_LOGGED, &mut model, Some(&vol));
    vol.flush().expect("flush");
    std::mem::forget(vol); // kill -9: the second session lives in the log only
    std::fs::write(&p, mem.to_vec()).expect("write the golden image");
}

/// The compressed version-7 image opens, replays its units and reads back its content,
/// read-only and writable, and checks clean.
#[test]
fn golden_v7_compressed_image_reads_back() {
    for read_only in [true, false] {
        let bytes = std::fs::read(compressed_path()).expect("golden-v7-compressed.qvol");
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
        let info = qvol_core::read_header(&*storage).expect("header");
        assert_eq!((info.format_version, info.unit_bytes), (7, 16384));
        let vol = Volume::open(storage.clone(), &golden_key(), read_only).expect("open");
        assert_eq!(vol.compress_level(), Some(3));
        expected_compressed()
            .check_current(&vol)
            .unwrap_or_else(|m| panic!("compressed golden image, read_only {read_only}: {m}"));
        let usage = vol.compression_usage().expect("usage");
        assert!(usage.unit_lbns >= 20 && usage.ratio() > 1.5, "{usage:?}");
        let report = vol.check(&mut |_, _| {}).expect("check");
        assert!(report.is_clean(), "{report:#?}");
        if !read_only {
            vol.write_at(3 * 4096, &common::pattern(99, 4096))
                .expect("write");
            vol.close().expect("close");
        }
    }
}

const COMMITTED: &[Step] = &[
    Step::Write(0, 4096, 1),
    Step::Write(4096 + 512, 1024, 2),
    Step::Write(64 * 4096 - 512, 1024, 3), // straddles two map leaves
    Step::Write(100 * 4096, 4 * 4096, 4),
    Step::Write(255 * 4096, 4096, 5), // the last block
    Step::Discard(101 * 4096, 4096),
    Step::Zeroes(1024, 512),
];

/// What the first session of version 4 and later does next: snapshots between writes that
/// overwrite, discard and extend what the snapshots hold (data blocks and map leaves shared
/// and not).
const SNAPSHOTTED: &[Step] = &[
    Step::Snapshot("first"),
    Step::Write(0, 4096, 10),              // block 0, held by "first"
    Step::Write(100 * 4096, 2 * 4096, 11), // 100 (held) and 101 (discarded before)
    Step::Discard(64 * 4096, 4096),        // held by "first", in its second leaf
    Step::Write(1000 * 4096, 4096, 12),    // a leaf "first" does not have
    Step::Snapshot("second: ünïcode, spaces"),
    Step::Write(1000 * 4096 + 512, 512, 13),
    Step::Zeroes(100 * 4096, 4096),
    Step::Write(5000 * 4096, 4096, 14),
];

/// The steps of the first session of `version`.
fn committed(version: u32) -> Vec<&'static Step> {
    let extra = if version >= 4 { SNAPSHOTTED } else { &[] };
    COMMITTED.iter().chain(extra).collect()
}

/// What the second session does: flushed, never committed (lives in the log only).
const LOGGED: &[Step] = &[
    Step::Write(8 * 4096, 4096, 6),
    Step::Write(100 * 4096 + 2048, 512, 7),
    Step::Discard(255 * 4096, 4096),
];

/// What the second session of version 6 and later does after starting a commit whose
/// superblock never reaches the image: flushed, in the next log epoch.
const LOGGED_NEXT: &[Step] = &[
    Step::Write(9 * 4096, 4096, 8),
    Step::Write(0, 512, 9),
    Step::Discard(4 * 4096, 4096),
];

/// The steps of the second session of `version`, in the log epoch of its superblock and
/// (version 6 on) the next one.
fn logged(version: u32) -> (Vec<&'static Step>, Vec<&'static Step>) {
    let next = if version >= 6 { LOGGED_NEXT } else { &[] };
    (LOGGED.iter().collect(), next.iter().collect())
}

/// The content of a snapshot: its blocks that are not zeros.
type SnapContent = BTreeMap<u64, Vec<u8>>;

/// The blocks of `model` that are not zeros now.
fn sparse(model: &BlockHistory) -> SnapContent {
    (0..model.len())
        .filter(|&lbn| model.current(lbn).iter().any(|&b| b != 0))
        .map(|lbn| (lbn as u64, model.current(lbn).to_vec()))
        .collect()
}

/// Applies `steps` to `model` (and `vol`); returns the snapshots taken, with their content.
fn apply<'a>(
    steps: impl IntoIterator<Item = &'a Step>,
    model: &mut BlockHistory,
    vol: Option<&Volume>,
) -> Vec<(String, SnapContent)> {
    let mut snaps = Vec::new();
    for step in steps {
        match *step {
            Step::Write(off, len, tag) => {
                let data = common::pattern(tag, len);
                model.apply(off, &data);
                if let Some(v) = vol {
                    v.write_at(off, &data).expect("write");
                }
            }
            Step::Discard(off, len) => {
                model.apply(off, &vec![0u8; len as usize]);
                if let Some(v) = vol {
                    v.discard(off, len).expect("discard");
                }
            }
            Step::Zeroes(off, len) => {
                model.apply(off, &vec![0u8; len as usize]);
                if let Some(v) = vol {
                    v.write_zeroes(off, len, false).expect("write_zeroes");
                }
            }
            Step::Text(off, len, tag) => {
                let data = common::text(tag, len);
                model.apply(off, &data);
                if let Some(v) = vol {
                    v.write_at(off, &data).expect("write");
                }
            }
            Step::Snapshot(name) => {
                if let Some(v) = vol {
                    v.create_snapshot(name).expect("create_snapshot");
                }
                snaps.push((name.to_string(), sparse(model)));
            }
        }
    }
    snaps
}

fn expected(version: u32) -> BlockHistory {
    let mut model = BlockHistory::new(size(version));
    apply(committed(version), &mut model, None);
    let (this, next) = logged(version);
    apply(this, &mut model, None);
    apply(next, &mut model, None);
    model
}

/// The snapshots of the golden image of `version`, oldest first, with their content.
fn expected_snapshots(version: u32) -> Vec<(String, SnapContent)> {
    let mut model = BlockHistory::new(size(version));
    apply(committed(version), &mut model, None)
}

fn path(version: u32, suite: CipherSuite) -> PathBuf {
    let file = match suite {
        CipherSuite::XChaCha20Poly1305 => format!("golden-v{version}.qvol"),
        CipherSuite::Aegis256 => format!("golden-v{version}-aegis-256.qvol"),
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file)
}

fn load(version: u32, suite: CipherSuite) -> Vec<u8> {
    let p = path(version, suite);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "the golden image {} is missing ({e}); it is part of the repository",
            p.display()
        )
    })
}

fn check(version: u32, suite: CipherSuite, read_only: bool) {
    let bytes = load(version, suite);
    // Header bytes 88..96: the log length (FORMAT.md §2).
    let log_len = u64::from_le_bytes(bytes[88..96].try_into().expect("8 bytes"));
    assert_eq!(log_len, if version == 1 { 4 << 20 } else { 8 << 20 });
    let records = common::layout::Layout::read(&bytes).records.len();
    assert!(
        records >= 3,
        "the golden image keeps its second session in the log ({records})"
    );
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
    let info = qvol_core::read_header(&*storage).expect("read the golden header");
    assert_eq!(info.format_version, version);
    assert_eq!(info.volume_id, volume_id(version));
    assert_eq!(info.suite, suite);
    assert_eq!(info.size, size(version));
    assert_eq!(info.name, name(version));
    // Slot i holds blob i; the rest of the 8 are free.
    let mut all = keyslots();
    all.resize(qvol_core::MAX_KEYSLOTS, Vec::new());
    assert_eq!(info.keyslots, all);
    let vol =
        Volume::open(storage.clone(), &golden_key(), read_only).expect("open the golden image");
    assert_eq!(vol.size(), size(version));
    assert_eq!(
        vol.info().format_version,
        version,
        "an image keeps its version"
    );
    expected(version).check_current(&vol).unwrap_or_else(|m| {
        panic!("version {version} {suite} golden image, read_only {read_only}: {m}")
    });
    let names: Vec<String> = vol.snapshots().into_iter().map(|s| s.name).collect();
    let snaps = expected_snapshots(version);
    let want: Vec<&String> = snaps.iter().map(|(n, _)| n).collect();
    assert!(
        want.iter().copied().eq(names.iter()),
        "version {version} {suite}: snapshots {names:?}"
    );
    if version >= 4 {
        let report = vol.check(&mut |_, _| {}).expect("check the golden image");
        assert!(
            report.is_clean() && report.snapshots == snaps.len(),
            "version {version} {suite}, read_only {read_only}: {report:#?}"
        );
        for (name, content) in &snaps {
            check_snapshot(&storage, version, name, content);
        }
    }
    if !read_only {
        // The replayed state commits and stays.
        vol.write_at(3 * 4096, &common::pattern(99, 4096))
            .expect("write");
        vol.close().expect("close");
    }
}

/// Snapshot `name` of the image on `storage` reads as `content` (zeros elsewhere).
fn check_snapshot(storage: &Arc<dyn Storage>, version: u32, name: &str, content: &SnapContent) {
    let view = Volume::open_with(
        storage.clone(),
        &golden_key(),
        OpenOptions {
            read_only: true,
            snapshot: Some(name.to_string()),
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("version {version}: open snapshot {name:?}: {e:?}"));
    let zeros = vec![0u8; 4096];
    let mut buf = vec![0u8; 1 << 20];
    for (chunk, off) in (0..size(version)).step_by(buf.len()).enumerate() {
        view.read_at(off, &mut buf)
            .unwrap_or_else(|e| panic!("version {version}: read snapshot {name:?}: {e:?}"));
        for (i, got) in buf.chunks(4096).enumerate() {
            let lbn = (chunk * 256 + i) as u64;
            let want = content.get(&lbn).unwrap_or(&zeros);
            assert!(
                got == &want[..],
                "version {version}: snapshot {name:?} block {lbn}"
            );
        }
    }
    assert!(
        view.write_at(0, &zeros).is_err(),
        "a snapshot view is read-only"
    );
}

#[test]
fn golden_v1_xchacha20_poly1305_image_reads_back() {
    check(1, CipherSuite::XChaCha20Poly1305, true);
    check(1, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v1_aegis_256_image_reads_back() {
    check(1, CipherSuite::Aegis256, true);
    check(1, CipherSuite::Aegis256, false);
}

#[test]
fn golden_v2_xchacha20_poly1305_image_reads_back() {
    check(2, CipherSuite::XChaCha20Poly1305, true);
    check(2, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v2_aegis_256_image_reads_back() {
    check(2, CipherSuite::Aegis256, true);
    check(2, CipherSuite::Aegis256, false);
}

#[test]
fn golden_v3_xchacha20_poly1305_image_reads_back() {
    check(3, CipherSuite::XChaCha20Poly1305, true);
    check(3, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v3_aegis_256_image_reads_back() {
    check(3, CipherSuite::Aegis256, true);
    check(3, CipherSuite::Aegis256, false);
}

#[test]
fn golden_v4_xchacha20_poly1305_image_reads_back() {
    check(4, CipherSuite::XChaCha20Poly1305, true);
    check(4, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v4_aegis_256_image_reads_back() {
    check(4, CipherSuite::Aegis256, true);
    check(4, CipherSuite::Aegis256, false);
}

/// The snapshots of the version-4 images keep working: a revert to the first brings its
/// content back (keeping the current state as a third snapshot), deleting snapshots frees
/// exactly what only they held, and `check` stays clean throughout.
#[test]
fn golden_v5_xchacha20_poly1305_image_reads_back() {
    check(5, CipherSuite::XChaCha20Poly1305, true);
    check(5, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v5_aegis_256_image_reads_back() {
    check(5, CipherSuite::Aegis256, true);
    check(5, CipherSuite::Aegis256, false);
}

#[test]
fn golden_v7_xchacha20_poly1305_image_reads_back() {
    check(7, CipherSuite::XChaCha20Poly1305, true);
    check(7, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v7_aegis_256_image_reads_back() {
    check(7, CipherSuite::Aegis256, true);
    check(7, CipherSuite::Aegis256, false);
}

#[test]
fn golden_v6_xchacha20_poly1305_image_reads_back() {
    check(6, CipherSuite::XChaCha20Poly1305, true);
    check(6, CipherSuite::XChaCha20Poly1305, false);
}

#[test]
fn golden_v6_aegis_256_image_reads_back() {
    check(6, CipherSuite::Aegis256, true);
    check(6, CipherSuite::Aegis256, false);
}

/// The version-6 images hold a log epoch that only the head of its area names (FORMAT.md
/// §9.1): the head and the next epoch's durable mark are there; removing the head, or
/// records of the epoch before that the head says the commit covered, is refused, never
/// read as an older state.
#[test]
fn golden_v6_heads_name_the_next_epoch_and_are_not_removable() {
    for suite in CipherSuite::ALL {
        let bytes = load(6, suite);
        let l = common::layout::Layout::read(&bytes);
        let next_head = [0xD000, 0xE000][((l.log_epoch + 1) % 2) as usize];
        assert_eq!(
            &bytes[next_head..next_head + 8],
            b"QVOLLOG6",
            "{suite}: head"
        );
        let mark = 0xB000 + 512 * ((l.log_epoch + 1) % 2) as usize;
        assert!(
            [mark, mark + 0x1000]
                .iter()
                .any(|&o| &bytes[o..o + 8] == b"QVOLMRK3"),
            "{suite}: the next epoch was flushed"
        );
        let mut no_head = bytes.clone();
        no_head[next_head..next_head + 512].fill(0);
        let r = Volume::open(
            Arc::new(MemStorage::from_bytes(no_head)),
            &golden_key(),
            true,
        );
        common::assert_kind(r.map(|_| ()), qvol_core::ErrorKind::Integrity, "no head");
        let mut no_record = bytes.clone();
        let first = l.slot_offset(0);
        no_record[first..first + 128].fill(0);
        let r = Volume::open(
            Arc::new(MemStorage::from_bytes(no_record)),
            &golden_key(),
            true,
        );
        common::assert_kind(
            r.map(|_| ()),
            qvol_core::ErrorKind::Integrity,
            "a record the commit covered removed",
        );
    }
}

/// The version-5 images are mid-way through a re-encryption: the new key opens them too, and
/// resuming finishes it, after which only the new key opens them and they read the same.
#[test]
fn golden_v5_reencryption_opens_with_either_key_and_finishes() {
    for suite in CipherSuite::ALL {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(load(5, suite)));
        let ro = Volume::open(storage.clone(), &golden_key_v5(), true).expect("the new key");
        let r = ro.reencryption().expect("mid-way");
        assert_eq!((r.from_epoch, r.to_epoch), (0, 1));
        expected(5)
            .check_current(&ro)
            .expect("reads with the new key");
        drop(ro);
        let vol = Volume::open(storage.clone(), &golden_key(), false).expect("the old key");
        while vol.reencrypt_step(2).expect("resume").is_some() {}
        expected(5).check_current(&vol).expect("reads after");
        assert!(vol.check(&mut |_, _| {}).expect("check").is_clean());
        vol.close().expect("close");
        common::assert_kind(
            Volume::open(storage.clone(), &golden_key(), true).map(|_| ()),
            qvol_core::ErrorKind::WrongKey,
            "the old key after the re-encryption",
        );
        let vol = Volume::open(storage.clone(), &golden_key_v5(), true).expect("new key");
        expected(5)
            .check_current(&vol)
            .expect("reads with the new key");
        for (name, content) in &expected_snapshots(5) {
            let view = Volume::open_with(
                storage.clone(),
                &golden_key_v5(),
                OpenOptions {
                    read_only: true,
                    snapshot: Some(name.clone()),
                    ..OpenOptions::default()
                },
            )
            .expect("open a snapshot");
            for (&lbn, want) in content {
                assert!(
                    common::read_block(&view, lbn).expect("read") == *want,
                    "{name} {lbn}"
                );
            }
        }
    }
}

#[test]
fn golden_v4_snapshots_revert_and_delete_cleanly() {
    for suite in CipherSuite::ALL {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(load(4, suite)));
        let snaps = expected_snapshots(4);
        let vol = Volume::open(storage.clone(), &golden_key(), false).expect("open");
        let clean = |vol: &Volume, what: &str| {
            let report = vol.check(&mut |_, _| {}).expect("check");
            assert!(report.is_clean(), "{suite} {what}: {report:#?}");
        };
        vol.revert_to_snapshot(&snaps[0].0, Some("before revert"))
            .expect("revert");
        clean(&vol, "after the revert");
        let zeros = vec![0u8; 4096];
        for lbn in (0..size(4) / 4096)
            .step_by(7)
            .chain([0, 100, 101, 255, 1000, 5000])
        {
            let want = snaps[0].1.get(&lbn).unwrap_or(&zeros);
            assert!(
                &common::read_block(&vol, lbn).expect("read") == want,
                "{suite}: reverted block {lbn}"
            );
        }
        for (name, _) in &snaps {
            vol.delete_snapshot(name).expect("delete");
            clean(&vol, &format!("after deleting {name:?}"));
        }
        vol.close().expect("close");
        // The kept state: the live disk as the image opened (its log replayed).
        check_snapshot(&storage, 4, "before revert", &sparse(&expected(4)));
        let vol = Volume::open(storage, &golden_key(), false).expect("reopen");
        vol.delete_snapshot("before revert")
            .expect("delete the last one");
        clean(&vol, "without snapshots");
        assert!(vol.snapshots().is_empty());
    }
}

/// The golden images are what kill -9 after a flush leaves. Zeroing their log region (the
/// attack of FORMAT.md §12) is refused from version 3 on (version 4 too), thanks to the
/// durable mark of blocks 11 and 12; versions 1 and 2 open at their last commit, as they
/// always did.
#[test]
fn zeroing_the_golden_log_tail_is_detected_from_version_3() {
    for version in [1, 2, 3, 4, 5, 6, 7] {
        for suite in CipherSuite::ALL {
            let mut bytes = load(version, suite);
            let log_len = u64::from_le_bytes(bytes[88..96].try_into().expect("8 bytes")) as usize;
            // FORMAT.md §1: the log starts at 0x10000; the marks are at 0xB000 and 0xC000.
            let marked = [0xB000, 0xC000]
                .iter()
                .any(|&o| &bytes[o..o + 8] == b"QVOLMRK3");
            assert_eq!(
                marked,
                version >= 3,
                "version {version} {suite}: durable mark"
            );
            bytes[0x10000..0x10000 + log_len].fill(0);
            let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
            let r = Volume::open(storage, &golden_key(), true);
            if version >= 3 {
                common::assert_kind(
                    r.map(|_| ()),
                    qvol_core::ErrorKind::Integrity,
                    "a zeroed log below the durable mark",
                );
            } else {
                let vol = r.unwrap_or_else(|e| panic!("version {version} {suite}: {e:?}"));
                let mut model = BlockHistory::new(size(version));
                apply(committed(version), &mut model, None);
                model
                    .check_current(&vol)
                    .unwrap_or_else(|m| panic!("version {version} {suite}: {m}"));
            }
        }
    }
}

#[test]
fn golden_images_refuse_another_key() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(load(
        1,
        CipherSuite::XChaCha20Poly1305,
    )));
    let r = Volume::open(storage, &common::key(9), true).map(|_| ());
    common::assert_kind(r, qvol_core::ErrorKind::WrongKey, "golden image, wrong key");
}

/// Writes the golden images of the current format version. Run once per format version,
/// see the module documentation.
#[test]
#[ignore = "writes tests/data/golden-v<current>*.qvol; run by hand, once per version"]
fn write_golden_images() {
    assert_eq!(
        std::env::var("QVOL_WRITE_GOLDEN").as_deref(),
        Ok("1"),
        "set QVOL_WRITE_GOLDEN=1 to overwrite the golden images"
    );
    for suite in CipherSuite::ALL {
        let version = FORMAT_VERSION;
        let p = path(version, suite);
        assert!(
            !p.exists(),
            "{} exists: golden images are never regenerated",
            p.display()
        );
        let mem = Arc::new(MemStorage::new());
        let opts = CreateOptions {
            key_epoch: 0,
            size: size(version),
            suite,
            name: name(version),
            volume_id: volume_id(version),
            keyslots: keyslots(),
            compression: None,
        };
        let mut model = BlockHistory::new(size(version));
        let vol = Volume::create(mem.clone(), opts, &golden_key()).expect("create");
        apply(committed(version), &mut model, Some(&vol));
        if version >= 5 {
            let slots = vol.keyslots();
            vol.start_reencryption(&golden_key_v5(), suite, &slots, &vol.keyslots_hash())
                .expect("start a re-encryption");
            let r = vol.reencrypt_step(1).expect("step").expect("not done");
            assert!(r.done > 0 && r.done < r.total);
        }
        vol.close().expect("close");
        // The second session; its commit's superblock never reaches the image.
        let (sink, dropping) = common::no_superblocks(mem.clone());
        let vol = Volume::open(sink.clone(), &golden_key(), false).expect("open");
        let (this, next) = logged(version);
        apply(this, &mut model, Some(&vol));
        vol.flush().expect("flush");
        if !next.is_empty() {
            dropping.store(true, std::sync::atomic::Ordering::SeqCst);
            vol.commit_async().expect("start a commit");
            apply(next, &mut model, Some(&vol));
            vol.flush().expect("flush");
        }
        drop(vol); // waits for the commit's thread, whose superblock write is dropped
        let image = mem.to_vec(); // as a kill -9 leaves it: the log is not committed
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir tests/data");
        std::fs::write(&p, image).expect("write the golden image");
    }
    write_compressed_golden();
}

/// Keyslot changes (FORMAT.md §3.1) work on every version's images, keep their version and
/// their data.
#[test]
fn golden_images_of_every_version_take_keyslot_changes() {
    for version in [1, 2, 3, 4, 5, 6, 7] {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(load(
            version,
            CipherSuite::XChaCha20Poly1305,
        )));
        let vol = Volume::open(storage.clone(), &golden_key(), false).expect("open");
        let mut slots = vol.keyslots();
        slots[0].clear();
        slots[5] = b"a new slot".to_vec();
        vol.set_keyslots(&slots).expect("change the keyslots");
        vol.close().expect("close");
        let vol = Volume::open(storage.clone(), &golden_key(), true).expect("reopen");
        assert_eq!(vol.keyslots(), slots, "version {version}");
        assert_eq!(
            vol.info().format_version,
            version,
            "an image keeps its version"
        );
        expected(version)
            .check_current(&vol)
            .unwrap_or_else(|m| panic!("version {version}: {m}"));
    }
}

/// `Volume::upgrade_format` turns a version-1, 2 or 3 image into a current one in
/// place; cut after any number of storage operations (kill -9: every write kept; power
/// loss: any unsynced subset, torn at 512 bytes), the image opens with its old version or
/// the new one, its data intact, and a writable open settles on that same version.
#[test]
fn golden_images_upgrade_crash_safely() {
    use qvol_core::storage::{CrashStorage, FaultConfig, FaultStorage, OpKinds};
    for version in [1, 2, 3, 5, 6] {
        let bytes = load(version, CipherSuite::XChaCha20Poly1305);
        let mut n = 0u64;
        loop {
            let crash = Arc::new(CrashStorage::from_bytes(bytes.clone()));
            let fault = Arc::new(FaultStorage::new(crash.clone(), FaultConfig::never()));
            let vol = Volume::open(fault.clone() as Arc<dyn Storage>, &golden_key(), false)
                .expect("open writable");
            fault.set_config(FaultConfig {
                fail_after: n,
                count: OpKinds::MUTATIONS,
                fail: OpKinds::ALL,
                tear_failed_writes: true,
            });
            let done = vol.upgrade_format().is_ok();
            drop(vol);
            let images = std::iter::once(crash.process_crash().live_image())
                .chain((0..3).map(|seed| crash.crash(seed).durable_image()));
            for (i, image) in images.enumerate() {
                let what = format!("v{version} cut after {n} operations, image {i}");
                let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
                let header = qvol_core::read_header(&*st).expect("read the header");
                let ro = Volume::open(st.clone(), &golden_key(), true)
                    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
                let seen = ro.info().format_version;
                assert!(
                    seen == version || seen == FORMAT_VERSION,
                    "{what}: version {seen}"
                );
                assert_eq!(
                    header.format_version, seen,
                    "{what}: the keyless read agrees"
                );
                expected(version)
                    .check_current(&ro)
                    .unwrap_or_else(|m| panic!("{what}: {m}"));
                drop(ro);
                let rw = Volume::open(st.clone(), &golden_key(), false).expect("writable");
                assert_eq!(rw.info().format_version, seen, "{what}: settled elsewhere");
                rw.close().expect("close");
                let again = Volume::open(st, &golden_key(), true).expect("reopen");
                assert_eq!(again.info().format_version, seen, "{what}: did not stick");
                expected(version)
                    .check_current(&again)
                    .unwrap_or_else(|m| panic!("{what}: {m}"));
                if done && i == 0 {
                    assert_eq!(
                        seen, FORMAT_VERSION,
                        "{what}: a finished upgrade is current"
                    );
                }
            }
            if done {
                break;
            }
            n += 1;
            assert!(n < 100, "the upgrade never finished");
        }
    }
}

/// Writes acknowledged after an upgrade to version 6, in the same session, survive kill -9:
/// the log moves to the two areas of version 6 (and, from versions 1 and 2, to records bound
/// to their superblock) with the commit that makes the new header count (FORMAT.md §9.1).
#[test]
fn writes_after_an_upgrade_in_the_same_session_survive_kill_9() {
    // Both parities of the log epoch: epoch e writes area e % 2.
    // Versions 1 and 2 also start binding records to their superblock (version 3).
    for (version, commits) in [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (5, 0), (5, 1)] {
        let mem = Arc::new(MemStorage::from_bytes(load(
            version,
            CipherSuite::XChaCha20Poly1305,
        )));
        let vol = Volume::open(mem.clone(), &golden_key(), false).expect("open");
        vol.upgrade_format().expect("upgrade");
        let mut model = expected(version);
        for c in 0..commits {
            let data = common::pattern(190 + c, 4096);
            model.apply(20 * 4096, &data);
            vol.write_at(20 * 4096, &data).expect("write");
            vol.commit().expect("commit");
        }
        for (i, lbn) in [7u64, 30, 31, 7].into_iter().enumerate() {
            let data = common::pattern(200 + i as u64, 4096);
            model.apply(lbn * 4096, &data);
            vol.write_at(lbn * 4096, &data).expect("write");
        }
        std::mem::forget(vol); // kill -9: the page cache (here: memory) keeps every write
        let image = mem.to_vec();
        let vol = Volume::open(Arc::new(MemStorage::from_bytes(image)), &golden_key(), true)
            .expect("reopen");
        assert_eq!(vol.info().format_version, FORMAT_VERSION);
        model
            .check_current(&vol)
            .unwrap_or_else(|m| panic!("version {version}: {m}"));
    }
}

#[test]
fn a_current_image_refuses_an_upgrade() {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(load(
        FORMAT_VERSION,
        CipherSuite::XChaCha20Poly1305,
    )));
    let vol = Volume::open(st, &golden_key(), false).unwrap();
    assert_eq!(
        vol.upgrade_format().unwrap_err().kind(),
        qvol_core::ErrorKind::Unsupported
    );
}
