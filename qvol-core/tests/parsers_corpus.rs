//! Every parser of the on-disk format against a corpus of random and mutated inputs, so that
//! CI exercises them without a nightly toolchain (the cargo-fuzz targets in `../fuzz` do
//! the same, open-ended). A parser may reject anything, but must never panic, and must
//! accept the real structures of a real image.

mod common;

use std::sync::Arc;

use common::layout::{self, Layout};
use qvol_core::header::{decode_header, decode_keyslots};
use qvol_core::node::decode_map_node;
use qvol_core::storage::MemStorage;
use qvol_core::superblock::Superblock;
use qvol_core::wal::LogRecord;

/// A real image with committed nodes and live log records.
fn real_image() -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let vol = common::create(mem.clone(), 1 << 20);
    for lbn in [0u64, 1, 70, 255] {
        vol.write_at(lbn * 4096, &common::pattern(lbn, 4096))
            .expect("write");
    }
    vol.close().expect("close");
    let vol = common::open(mem.clone()).expect("open");
    vol.write_at(5 * 4096, &common::pattern(5, 8192))
        .expect("write");
    vol.discard(70 * 4096, 4096).expect("discard");
    vol.flush().expect("flush");
    vol.write_at(9 * 4096, &common::pattern(9, 4096))
        .expect("write");
    let image = mem.to_vec();
    drop(vol);
    image
}

/// Inputs derived from `seed`: random bytes, truncations and mutations of `valid`.
fn corpus(valid: &[u8], seed: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let r = common::pattern(seed, 64 * 1024);
    let mut at = 0usize;
    let mut next = |n: usize| {
        let v = r[at % (r.len() - 8)..][..n.min(8)]
            .iter()
            .fold(0usize, |a, &b| a << 8 | b as usize);
        at += 8;
        v
    };
    for len in [
        0, 1, 7, 8, 64, 127, 128, 511, 512, 4095, 4096, 4097, 36864, 40000,
    ] {
        out.push(common::pattern(seed ^ len as u64, len));
        out.push(vec![0u8; len]);
        out.push(vec![0xffu8; len]);
    }
    for cut in [
        0,
        1,
        8,
        16,
        100,
        valid.len() / 2,
        valid.len().saturating_sub(1),
    ] {
        out.push(valid[..cut.min(valid.len())].to_vec());
    }
    for _ in 0..300 {
        let mut m = valid.to_vec();
        for _ in 0..1 + next(1) % 4 {
            let pos = next(4) % m.len().max(1);
            if m.is_empty() {
                break;
            }
            match next(1) % 4 {
                0 => m[pos] ^= 1 << (next(1) % 8),
                1 => m[pos] = 0,
                2 => m[pos] = 0xff,
                _ => m[pos] = next(1) as u8,
            }
        }
        out.push(m);
    }
    // Each u64 field set to extremes.
    for off in (0..valid.len().min(512)).step_by(8) {
        for v in [u64::MAX, 1 << 63, 0] {
            let mut m = valid.to_vec();
            if off + 8 <= m.len() {
                m[off..off + 8].copy_from_slice(&v.to_le_bytes());
            }
            out.push(m);
        }
    }
    out
}

#[test]
fn header_parser() {
    let image = real_image();
    let valid = &image[layout::HEADER];
    let h = decode_header(valid).expect("the real header decodes");
    assert_eq!(h.size, 1 << 20);
    assert_eq!(h.volume_id, [0x42; 16]);
    let mut rejected = 0;
    for input in corpus(valid, 1) {
        if input.as_slice() != valid && decode_header(&input).is_err() {
            rejected += 1;
        }
    }
    assert!(
        rejected > 300,
        "the checksum rejects mutated headers ({rejected})"
    );
}

#[test]
fn keyslot_area_parser() {
    let image = real_image();
    let valid = &image[layout::KEYSLOTS];
    let slots = decode_keyslots(valid).expect("the real keyslot area decodes");
    assert_eq!(slots[0], b"an opaque keyslot blob".to_vec());
    assert_eq!(slots.len(), qvol_core::MAX_KEYSLOTS);
    assert!(
        slots[1..].iter().all(Vec::is_empty),
        "the other slots are free"
    );
    for input in corpus(valid, 2) {
        let _ = decode_keyslots(&input);
    }
}

#[test]
fn superblock_parser() {
    let image = real_image();
    let l = Layout::read(&image);
    let valid = &image[l.newest_superblock..][..layout::BLOCK];
    let sb = Superblock::decode(valid).expect("the real superblock decodes");
    assert_eq!(sb.generation, l.generation);
    for input in corpus(valid, 3) {
        let _ = Superblock::decode(&input);
    }
}

#[test]
fn map_node_parser() {
    let image = real_image();
    let l = Layout::read(&image);
    assert!(!l.map_nodes.is_empty());
    for (i, node) in l.map_nodes.iter().enumerate() {
        let valid = &image[node.pbn as usize * layout::BLOCK..][..layout::BLOCK];
        decode_map_node(valid, node.level).expect("a real node decodes");
        for input in corpus(valid, 4 + i as u64) {
            for level in [0u8, 1, 2, 255] {
                let _ = decode_map_node(&input, level);
            }
        }
    }
}

#[test]
fn log_record_parser() {
    let image = real_image();
    let l = Layout::read(&image);
    assert!(l.records.len() >= 3, "{:?}", l.records);
    for r in &l.records {
        let valid = &image[l.slot_offset(r.slot)..][..layout::RECORD_LEN];
        let rec = LogRecord::decode(valid).expect("a real record decodes");
        assert_eq!(rec.seq, r.slot as u64);
        for input in corpus(valid, 100 + r.slot as u64) {
            let _ = LogRecord::decode(&input);
        }
    }
}

/// Whole images built from mutated structures must open or fail cleanly: the parsers are
/// reached through `Volume::open` too.
#[test]
fn open_survives_garbage_images() {
    for (i, len) in [0usize, 4096, 0x410000, 0x411000].into_iter().enumerate() {
        let storage = Arc::new(MemStorage::from_bytes(common::pattern(i as u64, len)));
        assert!(
            common::open(storage.clone()).is_err(),
            "random bytes opened as a volume"
        );
        assert!(qvol_core::read_header(&*storage).is_err());
    }
}

/// A real image with two snapshots, and the full stream of the second.
fn image_with_snapshots() -> (Vec<u8>, Vec<u8>) {
    let mem = Arc::new(MemStorage::new());
    let vol = common::create(mem.clone(), 1 << 20);
    vol.write_at(0, &common::pattern(1, 8192)).expect("write");
    vol.create_snapshot("first").expect("snapshot");
    vol.write_at(4096 * 70, &common::pattern(2, 4096))
        .expect("write");
    vol.create_snapshot("sëcond").expect("snapshot");
    vol.close().expect("close");
    let mut stream = Vec::new();
    qvol_core::send_snapshot(&*mem, "sëcond", None, &mut stream, &mut |_| {}).expect("send");
    (mem.to_vec(), stream)
}

/// Every bit of `valid[range]` flipped in turn, then each byte set to 0 and 0xff.
fn flips(valid: &[u8], range: std::ops::Range<usize>) -> impl Iterator<Item = Vec<u8>> + '_ {
    range.flat_map(move |i| {
        (0..10).map(move |k| {
            let mut m = valid.to_vec();
            match k {
                8 => m[i] = 0,
                9 => m[i] = 0xff,
                bit => m[i] ^= 1 << bit,
            }
            m
        })
    })
}

#[test]
fn snapshot_table_block_parser() {
    let (image, _) = image_with_snapshots();
    let l = Layout::read(&image);
    let sb = Superblock::decode(&image[l.newest_superblock..][..layout::BLOCK]).unwrap();
    assert_ne!(sb.snapshots.pbn, 0, "the image has a snapshot table");
    let valid = &image[sb.snapshots.pbn as usize * layout::BLOCK..][..layout::BLOCK];
    let (list, next) = qvol_core::decode_snapshot_table_block(valid).expect("the real table");
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].name, "sëcond");
    assert_eq!(next, 0);
    for input in corpus(valid, 20)
        .into_iter()
        .chain(flips(valid, 0..64 + 2 * 400))
    {
        let _ = qvol_core::decode_snapshot_table_block(&input);
    }
    // A name length past the name's bytes, a height out of range, a count past the block.
    for (at, v) in [
        (64 + 37, 255u8),
        (64 + 36, 0),
        (64 + 36, 9),
        (8, 11),
        (8, 0),
    ] {
        let mut m = valid.to_vec();
        m[at] = v;
        assert!(
            qvol_core::decode_snapshot_table_block(&m).is_err(),
            "byte {at} = {v}"
        );
    }
}

#[test]
fn send_stream_head_parser() {
    let (_, stream) = image_with_snapshots();
    const HEAD: usize = 32 + 36_864 + 400;
    let valid = &stream[..HEAD];
    let (head, _) = qvol_core::read_stream_head(&mut &stream[..]).expect("the real head");
    assert_eq!(head.snapshot.name, "sëcond");
    assert!(head.base.is_none());
    let parse = |input: &[u8]| {
        if let Ok((head, _)) = qvol_core::read_stream_head(&mut &input[..]) {
            let _ = head.header_info();
            let _ = head.create_options();
        }
    };
    for input in corpus(valid, 21)
        .into_iter()
        .chain(flips(valid, 0..32 + 512))
        .chain(flips(valid, HEAD - 400..HEAD))
    {
        parse(&input);
    }
    for cut in [0, 1, 31, 32, 33, 4096, HEAD - 401, HEAD - 1] {
        assert!(
            qvol_core::read_stream_head(&mut &valid[..cut]).is_err(),
            "cut at {cut}"
        );
    }
}
