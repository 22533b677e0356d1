//! Recognisable, position-dependent data: a block's content says where it was written
//! and by which generation of a test, so misplaced or stale data is caught.

/// Fills `buf` with the pattern for (`offset`, `seed`): 8-byte words mixing both with the
/// word index, so no two blocks or seeds share content and no word is all zeros.
pub fn fill(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = mix(offset.wrapping_add(i as u64 * 8) ^ seed.rotate_left(17));
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// The pattern as a new vector.
pub fn make(len: usize, offset: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(&mut v, offset, seed);
    v
}

/// splitmix64's finaliser, with the low bit forced so a word is never zero.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns_differ_by_offset_and_seed() {
        assert_ne!(super::make(512, 0, 1), super::make(512, 512, 1));
        assert_ne!(super::make(512, 0, 1), super::make(512, 0, 2));
        assert_eq!(super::make(512, 4096, 3), super::make(512, 4096, 3));
    }
}
