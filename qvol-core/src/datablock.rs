//! Sealing and opening data blocks (docs/FORMAT.md §5): AEAD under `K_data[e]`, a fresh
//! random nonce per write, associated data binding the volume and the logical position.

use std::cell::RefCell;

use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::subkeys::Subkeys;
use crate::suite::{CipherSuite, MAX_NONCE_LEN};

/// `"qvol-data-v1" || volume id || u64le(lbn) || u32le(epoch)`.
pub(crate) fn data_ad(volume_id: &[u8; 16], lbn: u64, epoch: u32) -> [u8; 40] {
    let mut ad = [0u8; 40];
    ad[..12].copy_from_slice(b"qvol-data-v1");
    ad[12..28].copy_from_slice(volume_id);
    put_u64(&mut ad, 28, lbn);
    put_u32(&mut ad, 36, epoch);
    ad
}

/// Bytes of OS randomness fetched at once for the per-thread nonce pool.
const POOL_LEN: usize = 4096;

thread_local! {
    /// Random bytes from the OS CSPRNG not yet used as nonces, and how many are used.
    /// Each byte is handed out once; nonces are public, so the pool holds no secret.
    static NONCE_POOL: RefCell<(Vec<u8>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

/// Fresh random nonces for `n` blocks, `suite.nonce_len()` bytes each, all from the OS
/// CSPRNG (getrandom), drawn through a per-thread pool so that a 4 KiB write costs no
/// system call of its own.
pub(crate) fn random_nonces(suite: CipherSuite, n: usize) -> Result<Vec<u8>> {
    let need = n * suite.nonce_len();
    let mut nonces = vec![0u8; need];
    if need > POOL_LEN / 4 {
        fill_random(&mut nonces)?;
        return Ok(nonces);
    }
    NONCE_POOL.with(|cell| -> Result<()> {
        let mut pool = cell.borrow_mut();
        let (bytes, used) = &mut *pool;
        if bytes.len() != POOL_LEN || *used + need > POOL_LEN {
            bytes.resize(POOL_LEN, 0);
            fill_random(bytes)?;
            *used = 0;
        }
        nonces.copy_from_slice(&bytes[*used..*used + need]);
        // Never hand out the same bytes twice.
        bytes[*used..*used + need].fill(0);
        *used += need;
        Ok(())
    })?;
    Ok(nonces)
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("the operating system's random number generator failed: {e}"),
        )
    })
}

/// The data key of key epoch `epoch`: `Unsupported` if `keys` have none.
pub(crate) fn data_key(keys: &Subkeys, epoch: u32) -> Result<&crate::suite::SuiteCipher> {
    keys.data(epoch).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!("key epoch {epoch} has no data key"),
        )
    })
}

/// Encrypts `buf` (one block of logical block `lbn`) in place with `nonce`; returns its
/// leaf entry without a physical block yet.
/// Sealed under the current key epoch; `nonce` has the length of its suite
/// ([`Subkeys::data_suite`]).
pub(crate) fn seal_block(
    keys: &Subkeys,
    lbn: u64,
    nonce: &[u8],
    buf: &mut [u8],
) -> Result<LeafEntry> {
    let epoch = keys.epoch();
    let cipher = data_key(keys, epoch)?;
    let ad = data_ad(keys.volume_id(), lbn, epoch);
    let tag = cipher.seal(nonce, &ad, buf);
    let mut padded = [0u8; MAX_NONCE_LEN];
    padded[..nonce.len()].copy_from_slice(nonce);
    Ok(LeafEntry {
        pbn: 0,
        key_epoch: epoch,
        k: 0,
        nonce: padded,
        tag,
        birth: 0,
    })
}

/// Decrypts `buf`, the ciphertext of logical block `lbn` that `entry` points to, in place.
pub(crate) fn open_block(
    keys: &Subkeys,
    lbn: u64,
    entry: &LeafEntry,
    buf: &mut [u8],
) -> Result<()> {
    let cipher = keys.data(entry.key_epoch).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "logical block {lbn} uses key epoch {}, which this build cannot open",
                entry.key_epoch
            ),
        )
    })?;
    let ad = data_ad(keys.volume_id(), lbn, entry.key_epoch);
    cipher
        .open(
            &entry.nonce[..cipher.suite().nonce_len()],
            &ad,
            buf,
            &entry.tag,
        )
        .map_err(|_| {
            Error::integrity(format!(
                "logical block {lbn} (byte offset {}, physical block {}) fails authentication: \
                 it was changed or an older copy was put back",
                lbn * BLOCK_SIZE,
                entry.pbn
            ))
        })
}

/// Re-seals `buf`, the ciphertext of logical block `lbn` that `entry` points to, in place:
/// opened under `old` (the tag checked: a damaged block is an error, never re-sealed), sealed
/// under `new`'s key epoch with `nonce`. Returns the new entry without a physical block.
pub(crate) fn reseal_block(
    old: &Subkeys,
    new: &Subkeys,
    lbn: u64,
    entry: &LeafEntry,
    nonce: &[u8],
    buf: &mut [u8],
) -> Result<LeafEntry> {
    open_block(old, lbn, entry, buf)?;
    seal_block(new, lbn, nonce, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;

    #[test]
    fn nonces_never_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let n = random_nonces(CipherSuite::XChaCha20Poly1305, 1).unwrap();
            assert!(seen.insert(n), "a nonce repeated");
        }
        assert_eq!(
            random_nonces(CipherSuite::Aegis256, 256).unwrap().len(),
            256 * 32
        );
    }

    #[test]
    fn blocks_are_bound_to_their_position() {
        for suite in CipherSuite::ALL {
            let keys = Subkeys::derive(&VolumeKey::from_bytes([4; 32]), suite, [6; 16]);
            let nonces = random_nonces(suite, 1).unwrap();
            let mut buf = vec![0x5au8; BS];
            let entry = seal_block(&keys, 10, &nonces, &mut buf).unwrap();
            assert_ne!(buf, vec![0x5au8; BS]);
            let mut moved = buf.clone();
            assert!(open_block(&keys, 11, &entry, &mut moved).is_err());
            open_block(&keys, 10, &entry, &mut buf).unwrap();
            assert_eq!(buf, vec![0x5au8; BS]);
        }
    }
}
