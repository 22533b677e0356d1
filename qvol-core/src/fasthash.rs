//! A fast hasher for the engine's `u64`-keyed maps (block numbers, leaf indices). The keys
//! are not chosen by an attacker in a way that matters: they are block numbers the engine
//! itself allocates or logical blocks a guest may address anyway, so HashDoS resistance
//! (SipHash, the std default) buys nothing here and costs time on every write.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Folded 128-bit multiply of the key by a 64-bit odd constant (good high and low bits).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let m = u128::from(x ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    fn write_u8(&mut self, x: u8) {
        self.write_u64(u64::from(x));
    }
}

/// A `HashMap` keyed by `u64` with [`U64Hasher`].
pub(crate) type U64Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;
/// A `HashSet` of `u64` with [`U64Hasher`].
pub(crate) type U64Set = HashSet<u64, BuildHasherDefault<U64Hasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_hash_apart() {
        let mut set = U64Set::default();
        for i in 0..10_000u64 {
            set.insert(i);
        }
        assert_eq!(set.len(), 10_000);
        let h = |x: u64| {
            let mut h = U64Hasher::default();
            h.write_u64(x);
            h.finish()
        };
        assert_ne!(h(1) >> 57, h(2) >> 57);
    }
}
