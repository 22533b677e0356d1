//! Compressed units (docs/FORMAT.md §18, format version 7): an aligned group of `N` logical
//! blocks compressed with zstd and sealed as one AEAD message into `k < N` blocks. This is
//! the codec and the normative checks that open a unit; the engine does not write
//! version-7 volumes yet (§18 says where the design stands).

use std::cell::RefCell;

use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::suite::{SuiteCipher, Tag};

/// The smallest and largest `log2 N` (units of 8 to 64 KiB).
pub const LOG2_N_RANGE: std::ops::RangeInclusive<u8> = 1..=4;

thread_local! {
    /// Each thread's zstd contexts, made once (a context costs more than a unit to make).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// The magic number that starts a zstd frame (RFC 8878, 3.1.1), little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Where a unit belongs, which its associated data binds it to.
#[derive(Clone, Copy, Debug)]
pub struct UnitPlace<'a> {
    /// The volume's id.
    pub volume_id: &'a [u8; 16],
    /// The group's first logical block (a multiple of `N`).
    pub first_lbn: u64,
    /// The key epoch it is sealed under.
    pub epoch: u32,
    /// `log2 N`, the volume's unit size.
    pub log2_n: u8,
}

impl UnitPlace<'_> {
    /// `"qvol-unit-v7" || volume id || u64le(first lbn) || u32le(e) || u8(k) || u8(log2 N)
    /// || u16 0` for a unit of `k` blocks (FORMAT.md §18.2).
    pub fn ad(&self, k: u8) -> [u8; 44] {
        let mut ad = [0u8; 44];
        ad[..12].copy_from_slice(b"qvol-unit-v7");
        ad[12..28].copy_from_slice(self.volume_id);
        put_u64(&mut ad, 28, self.first_lbn);
        put_u32(&mut ad, 36, self.epoch);
        ad[40] = k;
        ad[41] = self.log2_n;
        ad
    }
}

/// The unit's plaintext before sealing: `u32le(C) || zstd frame || zeros` to `k` blocks.
#[derive(Debug)]
pub struct Packed {
    /// `k * 4096` bytes; wiped when dropped.
    pub bytes: Zeroizing<Vec<u8>>,
    /// Blocks it fills.
    pub k: u8,
}

/// Compresses `group` (the `N * 4096` bytes of an aligned group) at zstd `level`; `None`
/// when that would not save at least one block, and the group is stored plain (§18.3).
pub fn pack(group: &[u8], level: i32) -> Result<Option<Packed>> {
    let n = group.len() / BS;
    let log2_n = n.trailing_zeros();
    if group.len() % BS != 0
        || !n.is_power_of_two()
        || !LOG2_N_RANGE.contains(&(log2_n.min(255) as u8))
    {
        return Err(Error::corrupt(format!(
            "internal: a compression unit of {} bytes (8 to 64 KiB, a power of two)",
            group.len()
        )));
    }
    // Room for anything worth storing: at most N - 1 blocks, less the length. zstd may
    // leave scratch past its frame in what it writes to (a block it tried to compress, then
    // stored raw): only the frame's `c` bytes are copied out, so the padding is zero.
    let mut frame = Zeroizing::new(Vec::with_capacity((n - 1) * BS - 4));
    let compressed = COMPRESSOR.with(|cell| -> Result<_> {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let compressor = zstd::bulk::Compressor::new(level)
                .map_err(|e| Error::corrupt(format!("cannot start zstd at level {level}: {e}")))?;
            *slot = Some((level, compressor));
        }
        let (_, compressor) = slot.as_mut().expect("set above");
        Ok(compressor.compress_to_buffer(group, &mut *frame))
    })?;
    // A frame that does not fit saves nothing: zstd says so by running out of room, which is
    // not an error here. (Any other failure to compress stores the group plain too, which is
    // always a valid way to store it.)
    let Ok(c) = compressed else {
        return Ok(None);
    };
    let k = (4 + c).div_ceil(BS);
    if k >= n {
        return Ok(None);
    }
    let (Ok(k8), Ok(c32)) = (u8::try_from(k), u32::try_from(c)) else {
        return Ok(None);
    };
    let mut bytes = Zeroizing::new(vec![0u8; k * BS]);
    put_u32(&mut bytes, 0, c32);
    bytes[4..4 + c].copy_from_slice(&frame[..c]);
    Ok(Some(Packed { bytes, k: k8 }))
}

/// Checks the opened plaintext of a unit (`k * 4096` bytes) and decompresses it into `out`
/// (`N * 4096` bytes), by the rules of FORMAT.md §18.2 ("Opening a unit"), in their order.
/// Any failure is an `Integrity` error naming the group's first block; `out` may then hold
/// part of the output ([`open_unit`] zeroes it).
fn unpack(opened: &[u8], out: &mut [u8], first_lbn: u64) -> Result<()> {
    let bad = |why: &str| {
        Error::integrity(format!(
            "the compressed unit of logical blocks from {first_lbn} is malformed: {why}"
        ))
    };
    if opened.len() < BS || opened.len() % BS != 0 || out.is_empty() {
        return Err(bad("its length is not whole blocks"));
    }
    let c = get_u32(opened, 0) as usize;
    if c > opened.len() - 4 {
        return Err(bad("its frame is longer than its blocks"));
    }
    if (4 + c).div_ceil(BS) != opened.len() / BS {
        return Err(bad("it takes more blocks than its frame needs"));
    }
    let (frame, padding) = opened[4..].split_at(c);
    if padding.iter().any(|&b| b != 0) {
        return Err(bad("the bytes after its frame are not zero"));
    }
    if frame.len() < 4 || frame[..4] != ZSTD_MAGIC {
        return Err(bad("it does not start with a zstd frame"));
    }
    if zstd::zstd_safe::find_frame_compressed_size(frame) != Ok(c) {
        return Err(bad("it is not exactly one zstd frame"));
    }
    if zstd::zstd_safe::get_dict_id_from_frame(frame).is_some() {
        return Err(bad("its frame names a dictionary"));
    }
    let decompressed = DECOMPRESSOR.with(|cell| -> Result<_> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| Error::new(ErrorKind::Io, format!("cannot start zstd: {e}")))?,
            );
        }
        let decompressor = slot.as_mut().expect("set above");
        Ok(decompressor.decompress_to_buffer(frame, out))
    })?;
    match decompressed {
        Ok(len) if len == out.len() => Ok(()),
        Ok(len) => Err(bad(&format!(
            "it decompresses to {len} bytes, not {}",
            out.len()
        ))),
        Err(e) => Err(bad(&format!("zstd refuses its frame: {e}"))),
    }
}

/// Seals `packed` (its bytes, in place) as the unit at `place`, under `cipher` (the key of
/// `place.epoch`), with `nonce`; returns the tag.
pub fn seal_unit(
    cipher: &SuiteCipher,
    place: &UnitPlace<'_>,
    nonce: &[u8],
    packed: &mut Packed,
) -> Tag {
    cipher.seal(nonce, &place.ad(packed.k), &mut packed.bytes)
}

/// Opens `sealed` (the unit's `k` blocks, in place) and decompresses it into `out`
/// (`N * 4096` bytes). On failure both are zeroed: nothing of a unit that does not open
/// reaches the caller (FORMAT.md §18.2). On success `sealed` holds the unit's plaintext,
/// which the caller wipes when done.
pub fn open_unit(
    cipher: &SuiteCipher,
    place: &UnitPlace<'_>,
    (nonce, tag): (&[u8], &Tag),
    sealed: &mut [u8],
    out: &mut [u8],
) -> Result<()> {
    let opened = open_into(cipher, place, (nonce, tag), sealed, out);
    if opened.is_err() {
        sealed.fill(0);
        out.fill(0);
    }
    opened
}

/// [`open_unit`] without the wiping on failure.
fn open_into(
    cipher: &SuiteCipher,
    place: &UnitPlace<'_>,
    (nonce, tag): (&[u8], &Tag),
    sealed: &mut [u8],
    out: &mut [u8],
) -> Result<()> {
    let (first_lbn, log2_n) = (place.first_lbn, place.log2_n);
    let k = sealed.len() / BS;
    let n = 1usize << log2_n.min(16);
    if !LOG2_N_RANGE.contains(&log2_n) || k == 0 || k >= n || sealed.len() % BS != 0 {
        return Err(Error::corrupt(format!(
            "the compressed unit of logical blocks from {first_lbn} has {k} blocks for a unit \
             of {n}"
        )));
    }
    if out.len() != n * BS {
        return Err(Error::corrupt("internal: a unit's output is not its size"));
    }
    cipher
        .open(nonce, &place.ad(k as u8), sealed, tag)
        .map_err(|_| {
            Error::integrity(format!(
                "the compressed unit of logical blocks from {first_lbn} fails authentication: it \
             was changed or an older copy was put back"
            ))
        })?;
    unpack(sealed, out, first_lbn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::CipherSuite;
    use crate::ErrorKind;

    const ID: [u8; 16] = [7; 16];

    /// Text-like content that compresses: lines of a small vocabulary.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let words = [
            &b"virtio "[..],
            b"block ",
            b"queue ",
            b"sealed ",
            b"unit\n",
            b"qvol ",
        ];
        let mut x = seed;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(x >> 33) as usize % words.len()]);
        }
        out.truncate(len);
        out
    }

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        getrandom::getrandom(&mut v).unwrap();
        v
    }

    fn suites() -> [SuiteCipher; 2] {
        [
            CipherSuite::XChaCha20Poly1305.cipher(&[3; 32]),
            CipherSuite::Aegis256.cipher(&[3; 32]),
        ]
    }

    #[test]
    fn a_compressible_group_round_trips_through_fewer_blocks() {
        for cipher in suites() {
            for log2_n in LOG2_N_RANGE {
                let group = text(BS << log2_n, u64::from(log2_n));
                let mut packed = pack(&group, 3).unwrap().expect("text compresses");
                assert!(usize::from(packed.k) < 1 << log2_n);
                assert_eq!(packed.bytes.len(), usize::from(packed.k) * BS);
                let nonce = crate::suite::random_nonce(cipher.suite());
                let nonce = &nonce[..cipher.suite().nonce_len()];
                let place = UnitPlace {
                    volume_id: &ID,
                    first_lbn: 64,
                    epoch: 2,
                    log2_n,
                };
                let tag = seal_unit(&cipher, &place, nonce, &mut packed);
                let mut out = vec![0u8; group.len()];
                open_unit(&cipher, &place, (nonce, &tag), &mut packed.bytes, &mut out).unwrap();
                assert_eq!(out, group);
            }
        }
    }

    /// Groups whose blocks zstd first tries to compress and then stores raw leave scratch in
    /// the output buffer past the frame; the padding must still come out zero.
    #[test]
    fn the_padding_is_zero_whatever_zstd_left_in_the_buffer() {
        // Sparse tables of 24-byte records (a random u16, then 0x12 at byte 4) in 8 KiB
        // groups: what made it happen on an ext4 image of /usr.
        for seed in 0..64u64 {
            let mut group = vec![0u8; 2 * BS];
            let noise = random(2 * BS);
            for (r, record) in group.chunks_mut(24).enumerate() {
                if record.len() == 24 && (r as u64 + seed) % 3 != 0 {
                    record[..2].copy_from_slice(&noise[r * 2..r * 2 + 2]);
                    record[4] = 0x12;
                }
            }
            if let Some(p) = pack(&group, 3).unwrap() {
                let c = get_u32(&p.bytes, 0) as usize;
                assert!(p.bytes[4 + c..].iter().all(|&b| b == 0), "seed {seed}");
                let mut out = vec![0u8; 2 * BS];
                unpack(&p.bytes, &mut out, 0).unwrap();
                assert_eq!(out, group);
            }
        }
    }

    #[test]
    fn incompressible_data_is_left_plain() {
        assert!(pack(&random(4 * BS), 3).unwrap().is_none());
        // Half random: 2 of 4 blocks would need at least 3 with the frame's overhead.
        let mut group = random(2 * BS + 100);
        group.resize(4 * BS, 0);
        let packed = pack(&group, 3).unwrap();
        assert!(packed.is_none_or(|p| p.k == 3));
    }

    #[test]
    fn a_unit_opens_only_where_and_as_it_was_sealed() {
        let cipher = &suites()[0];
        let group = text(4 * BS, 9);
        let mut packed = pack(&group, 3).unwrap().unwrap();
        let nonce = [5u8; 24];
        let place = |volume_id, first_lbn, epoch, log2_n| UnitPlace {
            volume_id,
            first_lbn,
            epoch,
            log2_n,
        };
        let tag = seal_unit(cipher, &place(&ID, 128, 0, 2), &nonce, &mut packed);
        let sealed = packed.bytes.to_vec();
        let try_open = |id: &'static [u8; 16], lbn: u64, epoch: u32, log2_n: u8, bytes: &[u8]| {
            let mut b = bytes.to_vec();
            let mut out = vec![0xaa; BS << log2_n];
            let at = place(id, lbn, epoch, log2_n);
            let r = open_unit(cipher, &at, (&nonce, &tag), &mut b, &mut out);
            (r, out)
        };
        assert!(try_open(&ID, 128, 0, 2, &sealed).0.is_ok());
        for (r, _) in [
            try_open(&[8; 16], 128, 0, 2, &sealed),
            try_open(&ID, 132, 0, 2, &sealed),
            try_open(&ID, 128, 1, 2, &sealed),
            try_open(&ID, 128, 0, 3, &sealed),
        ] {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Integrity);
        }
        let mut flipped = sealed.clone();
        flipped[100] ^= 1;
        let (r, out) = try_open(&ID, 128, 0, 2, &flipped);
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Integrity);
        assert!(
            out.iter().all(|&b| b == 0),
            "a unit that does not open leaves zeros"
        );
        // One block more than sealed, or a unit as large as its group: refused before opening.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&[0; BS]);
        assert!(try_open(&ID, 128, 0, 2, &longer).0.is_err());
        assert!(try_open(&ID, 128, 0, 1, &random(2 * BS)).0.is_err());
        // Unit sizes outside 8 to 64 KiB, and an output of the wrong size.
        for log2_n in [0, 5, 200] {
            let at = place(&ID, 128, 0, log2_n);
            let mut out = vec![0xaa; 4 * BS];
            let r = open_unit(cipher, &at, (&nonce, &tag), &mut sealed.clone(), &mut out);
            assert!(r.is_err() && out.iter().all(|&b| b == 0), "log2 N {log2_n}");
        }
        let mut short = vec![0xaa; 3 * BS];
        let r = open_unit(
            cipher,
            &place(&ID, 128, 0, 2),
            (&nonce, &tag),
            &mut sealed.clone(),
            &mut short,
        );
        assert!(r.is_err() && short.iter().all(|&b| b == 0));
    }

    #[test]
    fn pack_refuses_unit_sizes_outside_the_format() {
        for blocks in [1, 3, 32, 512] {
            assert!(pack(&text(blocks * BS, 1), 3).is_err(), "{blocks} blocks");
        }
        assert!(pack(&text(BS + 7, 1), 3).is_err());
    }

    /// What a key holder's bug or a malformed stream could put under a valid tag: every rule
    /// of "Opening a unit" refuses it with `Integrity`, none panics.
    #[test]
    fn malformed_plaintext_is_refused_rule_by_rule() {
        let group = text(4 * BS, 3);
        let good = pack(&group, 3).unwrap().unwrap().bytes.to_vec();
        let c = get_u32(&good, 0) as usize;
        let check = |bytes: &[u8], why: &str, rule: &str| {
            let mut out = vec![0u8; 4 * BS];
            let e = unpack(bytes, &mut out, 0).expect_err(why);
            assert_eq!(e.kind(), ErrorKind::Integrity, "{why}");
            assert!(e.to_string().contains(rule), "{why}: {e}");
        };
        let mut out = vec![0u8; 4 * BS];
        unpack(&good, &mut out, 0).unwrap();
        assert_eq!(out, group);

        let mut b = good.clone();
        let past = (b.len() - 3) as u32;
        put_u32(&mut b, 0, past);
        check(&b, "a length past the blocks", "longer than its blocks");
        let mut b = good.clone();
        b.extend_from_slice(&[0; BS]);
        check(&b, "a block more than the frame needs", "more blocks than");
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] = 1;
        check(&b, "padding that is not zero", "not zero");
        let mut b = good.clone();
        b[4] ^= 0xff;
        check(&b, "no frame magic", "start with a zstd frame");
        // A skippable frame (magic 0x184D2A50) in front.
        let mut b = vec![0u8; good.len()];
        b[4..8].copy_from_slice(&[0x50, 0x2a, 0x4d, 0x18]);
        put_u32(&mut b, 0, 8);
        check(&b, "a skippable frame", "start with a zstd frame");
        // The frame shortened: not one whole frame.
        let mut b = good.clone();
        put_u32(&mut b, 0, (c - 1) as u32);
        b[4 + c - 1] = 0;
        check(&b, "a truncated frame", "exactly one zstd frame");
        // A frame of the wrong size: a unit of 2 blocks where 4 are expected.
        let small = pack(&text(2 * BS, 3), 3).unwrap().unwrap().bytes.to_vec();
        check(
            &small,
            "a frame of another size",
            "decompresses to 8192 bytes",
        );
        // A frame that decompresses to more than the unit (a decompression bomb): refused
        // without growing the output.
        let big = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        let mut b = vec![0u8; (4 + big.len()).div_ceil(BS) * BS];
        put_u32(&mut b, 0, big.len() as u32);
        b[4..4 + big.len()].copy_from_slice(&big);
        check(&b, "a frame larger than the unit", "zstd refuses");
        // A skippable frame after the unit's frame.
        let one = zstd::bulk::compress(&group, 3).unwrap();
        let skip = [&[0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0][..], &[0; 4]].concat();
        let both = [one, skip].concat();
        let mut b = vec![0u8; (4 + both.len()).div_ceil(BS) * BS];
        put_u32(&mut b, 0, both.len() as u32);
        b[4..4 + both.len()].copy_from_slice(&both);
        check(&b, "a trailing skippable frame", "exactly one zstd frame");
        // Two frames back to back.
        let one = zstd::bulk::compress(&text(2 * BS, 1), 3).unwrap();
        let two = [one.clone(), one].concat();
        let mut b = vec![0u8; (4 + two.len()).div_ceil(BS) * BS];
        put_u32(&mut b, 0, two.len() as u32);
        b[4..4 + two.len()].copy_from_slice(&two);
        check(&b, "two frames", "exactly one zstd frame");
        check(&[0u8; 100], "not whole blocks", "whole blocks");
    }
}
