//! Raw send and receive (FORMAT.md §15): a full stream and two incrementals rebuild every
//! snapshot on another image; a stream with a flipped byte, a dropped record, the wrong base
//! or another volume's key is refused, and a refused receive leaves nothing reachable.

mod common;

use std::sync::Arc;

use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{read_stream_head, send_snapshot, ErrorKind, OpenOptions, Volume};

const SIZE: u64 = 16 << 20;

fn block(tag: u64) -> Vec<u8> {
    common::pattern(tag, 4096)
}

fn send(st: &Arc<MemStorage>, name: &str, from: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    send_snapshot(&**st, name, from, &mut out, &mut |_| {}).expect("send");
    out
}

/// Receives `stream` into the image on `st` (created from the stream if empty).
fn receive(st: &Arc<MemStorage>, stream: &[u8]) -> qvol_core::Result<()> {
    let mut r: &[u8] = stream;
    let (head, hash) = read_stream_head(&mut r)?;
    let vol = if st.to_vec().is_empty() {
        Volume::create(
            st.clone() as Arc<dyn Storage>,
            head.create_options()?,
            &common::key(1),
        )?
    } else {
        common::open(st.clone() as Arc<dyn Storage>)?
    };
    vol.receive(&head, hash, &mut r, false, &mut |_| {})?;
    vol.close()
}

fn snapshot_reads(st: &Arc<MemStorage>, name: &str, blocks: &[(u64, u64)]) {
    let vol = Volume::open_with(
        st.clone() as Arc<dyn Storage>,
        &common::key(1),
        OpenOptions {
            read_only: true,
            snapshot: Some(name.into()),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    for &(lbn, tag) in blocks {
        let want = if tag == 0 { vec![0; 4096] } else { block(tag) };
        assert!(
            common::read_block(&vol, lbn).unwrap() == want,
            "{name}: block {lbn}"
        );
    }
}

/// The sending side: three snapshots with overwrites, discards and untouched data between.
fn source() -> Arc<MemStorage> {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, SIZE);
    for lbn in 0..500 {
        vol.write_at(lbn * 4096, &block(lbn + 1)).unwrap();
    }
    vol.create_snapshot("mon").unwrap();
    for lbn in 100..150 {
        vol.write_at(lbn * 4096, &block(10_000 + lbn)).unwrap();
    }
    vol.discard(300 * 4096, 20 * 4096).unwrap();
    vol.create_snapshot("tue").unwrap();
    vol.write_at(3000 * 4096, &block(77)).unwrap();
    vol.create_snapshot("wed").unwrap();
    vol.write_at(0, &block(99)).unwrap();
    vol.close().unwrap();
    st
}

#[test]
fn full_and_incremental_streams_rebuild_every_snapshot() {
    let src = source();
    let full = send(&src, "mon", None);
    let inc1 = send(&src, "tue", Some("mon"));
    let inc2 = send(&src, "wed", Some("tue"));
    assert!(
        inc1.len() < full.len() / 4,
        "an incremental stream carries only what changed ({} vs {})",
        inc1.len(),
        full.len()
    );
    let dst = Arc::new(MemStorage::new());
    receive(&dst, &full).unwrap();
    receive(&dst, &inc1).unwrap();
    receive(&dst, &inc2).unwrap();
    snapshot_reads(&dst, "mon", &[(0, 1), (120, 121), (310, 311), (3000, 0)]);
    snapshot_reads(&dst, "tue", &[(0, 1), (120, 10_120), (310, 0), (3000, 0)]);
    snapshot_reads(&dst, "wed", &[(0, 1), (120, 10_120), (310, 0), (3000, 77)]);
    let vol = common::open(dst.clone() as Arc<dyn Storage>).unwrap();
    assert_eq!(common::read_block(&vol, 3000).unwrap(), block(77));
    let report = vol.check(&mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(vol.snapshots().len(), 3);
    // Receiving the same stream twice is refused.
    drop(vol);
    assert_eq!(
        receive(&dst, &inc2).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn damaged_reordered_and_foreign_streams_are_refused() {
    let src = source();
    let full = send(&src, "mon", None);
    let inc1 = send(&src, "tue", Some("mon"));
    let inc2 = send(&src, "wed", Some("tue"));

    // Out of order: an incremental before its base.
    let dst = Arc::new(MemStorage::new());
    receive(&dst, &full).unwrap();
    let before = dst.to_vec();
    assert_eq!(receive(&dst, &inc2).unwrap_err().kind(), ErrorKind::Refused);
    let vol = common::open(dst.clone() as Arc<dyn Storage>).unwrap();
    assert_eq!(vol.snapshots().len(), 1, "a refused stream adds nothing");
    assert!(vol.check(&mut |_, _| {}).unwrap().is_clean());
    drop(vol);

    // A flipped byte anywhere in the records, the head or the checksum.
    let head_len = 32 + 36_864 + 400;
    for at in [
        head_len + 5,
        head_len + 4000,
        inc1.len() / 2,
        inc1.len() - 40,
        inc1.len() - 1,
        40,
        head_len - 300,
    ] {
        let mut bad = inc1.clone();
        bad[at] ^= 0x20;
        let dst2 = Arc::new(MemStorage::from_bytes(before.clone()));
        let err = receive(&dst2, &bad).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                ErrorKind::Integrity
                    | ErrorKind::Corrupt
                    | ErrorKind::Refused
                    | ErrorKind::Unsupported
            ),
            "flip at {at}: {err}"
        );
        let vol = common::open(dst2.clone() as Arc<dyn Storage>).unwrap();
        assert_eq!(vol.snapshots().len(), 1, "flip at {at}: nothing received");
        assert!(
            vol.check(&mut |_, _| {}).unwrap().is_clean(),
            "flip at {at}"
        );
    }

    // A dropped data record (4105 bytes) and a truncated stream.
    let rec = 9 + 4096;
    let mut dropped = inc1.clone();
    dropped.drain(inc1.len() - 49 - rec..inc1.len() - 49);
    let dst3 = Arc::new(MemStorage::from_bytes(before.clone()));
    assert!(receive(&dst3, &dropped).is_err());
    let dst4 = Arc::new(MemStorage::from_bytes(before.clone()));
    assert!(receive(&dst4, &inc1[..inc1.len() - 10]).is_err());

    // Another volume's image refuses the stream; another key cannot open it.
    let other = Arc::new(MemStorage::new());
    let mut opts = common::options(SIZE, qvol_core::CipherSuite::XChaCha20Poly1305);
    opts.volume_id = [0x55; 16];
    let vol = Volume::create(other.clone() as Arc<dyn Storage>, opts, &common::key(1)).unwrap();
    vol.close().unwrap();
    assert_eq!(
        receive(&other, &full).unwrap_err().kind(),
        ErrorKind::Refused
    );
    let mut r: &[u8] = &full;
    let (head, _) = read_stream_head(&mut r).unwrap();
    let wrong = Arc::new(MemStorage::new());
    let err = Volume::create(
        wrong as Arc<dyn Storage>,
        head.create_options().unwrap(),
        &common::key(2),
    )
    .and_then(|v| {
        let mut r: &[u8] = &full;
        let (head, hash) = read_stream_head(&mut r)?;
        v.receive(&head, hash, &mut r, false, &mut |_| {})
            .map(|_| ())
    })
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");

    // Garbage is not a stream.
    assert!(read_stream_head(&mut &b"hello"[..]).is_err());
    assert!(read_stream_head(&mut &vec![0u8; 50_000][..]).is_err());
}

/// A writer that fails once `limit` bytes went through it.
struct Capped {
    written: usize,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        if self.written > self.limit {
            return Err(std::io::Error::other("the stream is longer than the disk"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Points every entry of the map node at `pbn` to `pbn` itself, and gives the first
/// snapshot's entry map height `height` (keyless edits: `send` does not verify MACs).
fn looping_image(height: u8) -> Arc<MemStorage> {
    let st = Arc::new(MemStorage::new());
    let vol = common::create(st.clone() as Arc<dyn Storage>, SIZE);
    vol.write_at(0, &block(1)).unwrap();
    vol.create_snapshot("s").unwrap();
    vol.close().unwrap();
    let mut img = st.to_vec();
    let sb = [9usize, 10]
        .iter()
        .filter_map(|&b| qvol_core::Superblock::decode(&img[b * 4096..b * 4096 + 512]).ok())
        .max_by_key(|sb| sb.generation)
        .unwrap();
    let table = sb.snapshots.pbn as usize * 4096;
    let root = u64::from_le_bytes(img[table + 64 + 40..][..8].try_into().unwrap());
    img[table + 64 + 36] = height;
    let node = root as usize * 4096;
    img[node..node + 4096].fill(0);
    for e in 0..64 {
        img[node + e * 64..][..8].copy_from_slice(&root.to_le_bytes());
    }
    Arc::new(MemStorage::from_bytes(img))
}

#[test]
fn a_hostile_image_cannot_make_send_walk_forever() {
    // A snapshot whose map claims height 8 over a node that points to itself: a walk of
    // 64^9 entries. The stream of a 16 MiB disk is never much more than 16 MiB.
    for height in [8u8, 1] {
        let st = looping_image(height);
        let mut out = Capped {
            written: 0,
            limit: 2 * SIZE as usize,
        };
        let result = send_snapshot(&*st, "s", None, &mut out, &mut |_| {});
        if let Err(e) = &result {
            assert_ne!(
                e.kind(),
                ErrorKind::Io,
                "height {height}: send walked past the disk's size: {e}"
            );
        }
        assert!(out.written <= 2 * SIZE as usize, "height {height}");
    }
}

#[test]
fn a_receive_into_a_full_table_is_refused_and_the_image_still_opens() {
    let src = source();
    let full = send(&src, "mon", None);
    let inc1 = send(&src, "tue", Some("mon"));
    let dst = Arc::new(MemStorage::new());
    receive(&dst, &full).unwrap();
    let vol = common::open(dst.clone() as Arc<dyn Storage>).unwrap();
    for i in 1..qvol_core::MAX_SNAPSHOTS {
        vol.create_snapshot(&format!("n{i}")).unwrap();
    }
    vol.revert_to_snapshot("mon", None).unwrap();
    vol.close().unwrap();
    let before = dst.to_vec();
    let mut r: &[u8] = &inc1;
    let (head, hash) = read_stream_head(&mut r).unwrap();
    let vol = common::open(dst.clone() as Arc<dyn Storage>).unwrap();
    let err = vol
        .receive(&head, hash, &mut r, false, &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    drop(vol);
    let vol = common::open(dst.clone() as Arc<dyn Storage>).expect("the image still opens");
    assert_eq!(vol.snapshots().len(), qvol_core::MAX_SNAPSHOTS);
    // Judged read-only first, a refused stream changes nothing.
    drop(vol);
    let st = Arc::new(MemStorage::from_bytes(before.clone()));
    let ro = Volume::open_with(
        st.clone() as Arc<dyn Storage>,
        &common::key(1),
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        ro.check_stream(&head, false).unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    drop(ro);
    assert!(st.to_vec() == before);
}

/// A snapshot of a disk nothing was written to (an empty map) is sent and received, and
/// serves as the base of an incremental.
#[test]
fn a_snapshot_of_an_empty_disk_round_trips() {
    let src = Arc::new(MemStorage::new());
    let vol = common::create(src.clone() as Arc<dyn Storage>, SIZE);
    vol.create_snapshot("empty").unwrap();
    vol.write_at(4096, &block(8)).unwrap();
    vol.create_snapshot("one").unwrap();
    vol.close().unwrap();
    let dst = Arc::new(MemStorage::new());
    receive(&dst, &send(&src, "empty", None)).unwrap();
    receive(&dst, &send(&src, "one", Some("empty"))).unwrap();
    snapshot_reads(&dst, "empty", &[(1, 0)]);
    snapshot_reads(&dst, "one", &[(1, 8), (0, 0)]);
}

/// Snapshots of a disk before and after it grew (maps of different heights) are sent, full
/// and incremental, and received into an image of either size (a smaller one must grow
/// first, FORMAT.md §16).
#[test]
fn snapshots_across_a_resize_are_sent_and_received() {
    let src = Arc::new(MemStorage::new());
    let vol = common::create(src.clone() as Arc<dyn Storage>, 8 << 20);
    for lbn in 0..50 {
        vol.write_at(lbn * 4096, &block(lbn + 1)).unwrap();
    }
    vol.create_snapshot("small").unwrap();
    vol.close().unwrap();
    let early = send(&src, "small", None);
    let vol = common::open(src.clone() as Arc<dyn Storage>).unwrap();
    vol.resize(1 << 30).unwrap();
    vol.write_at(5 * 4096, &block(500)).unwrap();
    vol.write_at((1 << 30) - 4096, &block(600)).unwrap();
    vol.create_snapshot("big").unwrap();
    vol.write_at(6 * 4096, &block(700)).unwrap();
    vol.create_snapshot("bigger").unwrap();
    vol.close().unwrap();
    let last = (1u64 << 18) - 1;

    // Received into an image of the current size, from the start.
    let dst = Arc::new(MemStorage::new());
    receive(&dst, &send(&src, "small", None)).unwrap();
    receive(&dst, &send(&src, "big", Some("small"))).unwrap();
    receive(&dst, &send(&src, "bigger", Some("big"))).unwrap();
    snapshot_reads(&dst, "small", &[(5, 6), (6, 7)]);
    snapshot_reads(&dst, "big", &[(5, 500), (6, 7), (last, 600)]);
    snapshot_reads(&dst, "bigger", &[(5, 500), (6, 700), (last, 600)]);
    let vol = common::open(dst.clone() as Arc<dyn Storage>).unwrap();
    assert!(vol.check(&mut |_, _| {}).unwrap().is_clean());
    drop(vol);

    // Received into an image made while the disk was small: it must grow first.
    let old = Arc::new(MemStorage::new());
    receive(&old, &early).unwrap();
    let inc = send(&src, "big", Some("small"));
    assert_eq!(receive(&old, &inc).unwrap_err().kind(), ErrorKind::Refused);
    let vol = common::open(old.clone() as Arc<dyn Storage>).unwrap();
    vol.resize(1 << 30).unwrap();
    vol.close().unwrap();
    receive(&old, &inc).unwrap();
    snapshot_reads(&old, "big", &[(5, 500), (last, 600)]);
    let vol = common::open(old.clone() as Arc<dyn Storage>).unwrap();
    assert_eq!(common::read_block(&vol, last).unwrap(), block(600));
    assert!(vol.check(&mut |_, _| {}).unwrap().is_clean());
}
