//! Which ranges of a volume hold data: for NBD block status and for copies that skip holes.
//! Answered from the block map alone (no data block is read or decrypted).

use crate::error::{Error, ErrorKind, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::volume::Volume;

/// A run of blocks that are all allocated or all unallocated (reading as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Its length in bytes.
    pub len: u64,
    /// Whether it holds data; `false` reads as zeros and takes no space.
    pub allocated: bool,
}

impl Volume {
    /// The allocation of `len` bytes at `offset` (both within the volume; `offset` and
    /// `len` need not be block-aligned: partial blocks count as their block), as runs of
    /// alternating kind that cover the range exactly. Stops early, with a shorter cover,
    /// after `max_extents` runs.
    pub fn allocation(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{len} bytes at offset {offset} go past the end of the {}-byte volume",
                    self.size()
                ),
            ));
        }
        self.check_usable()?;
        let _gate = self.shared();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, len: u64, allocated: bool| match out.last_mut() {
            Some(last) if last.allocated == allocated => last.len += len,
            _ => out.push(Extent { len, allocated }),
        };
        let mut pos = offset;
        let mut entries = [LeafEntry::default(); FANOUT as usize];
        while pos < end && out.len() <= max_extents {
            let lbn = pos / BLOCK_SIZE;
            let leaf = lbn / FANOUT;
            let skip = self.map.absent_leaves(&*self.storage, &self.keys(), leaf)?;
            if skip > 0 {
                let next = ((leaf + skip) * FANOUT * BLOCK_SIZE).min(end);
                push(&mut out, next - pos, false);
                pos = next;
                continue;
            }
            let first = (lbn % FANOUT) as usize;
            let n = FANOUT as usize - first;
            self.map
                .lookup(&*self.storage, &self.keys(), lbn, &mut entries[..n])?;
            for (i, e) in entries[..n].iter().enumerate() {
                if pos >= end {
                    break;
                }
                let block_end = ((lbn + i as u64 + 1) * BLOCK_SIZE).min(end);
                push(&mut out, block_end - pos, e.pbn != 0);
                pos = block_end;
            }
        }
        if out.len() > max_extents {
            out.truncate(max_extents.max(1));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::MemStorage;
    use crate::{CipherSuite, CreateOptions, VolumeKey};

    #[test]
    fn allocation_follows_writes_and_discards() {
        let key = VolumeKey::from_bytes([5; 32]);
        let vol = Volume::create(
            Arc::new(MemStorage::new()),
            CreateOptions {
                key_epoch: 0,
                size: 64 << 20,
                suite: CipherSuite::XChaCha20Poly1305,
                name: "x".into(),
                volume_id: [1; 16],
                keyslots: vec![],
                compression: None,
            },
            &key,
        )
        .unwrap();
        let size = vol.size();
        let all = |v: &Volume| v.allocation(0, size, usize::MAX).unwrap();
        assert_eq!(
            all(&vol),
            vec![Extent {
                len: size,
                allocated: false
            }]
        );
        vol.write_at(8192, &[1u8; 8192]).unwrap();
        vol.write_at(40 << 20, &[2u8; 4096]).unwrap();
        let ext = all(&vol);
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: 8192,
                    allocated: false
                },
                Extent {
                    len: 8192,
                    allocated: true
                },
                Extent {
                    len: (40 << 20) - 16384,
                    allocated: false
                },
                Extent {
                    len: 4096,
                    allocated: true
                },
                Extent {
                    len: size - (40 << 20) - 4096,
                    allocated: false
                },
            ]
        );
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), size);
        // Unaligned queries count partial blocks; a cap shortens the cover.
        assert_eq!(
            vol.allocation(9000, 100, 8).unwrap(),
            vec![Extent {
                len: 100,
                allocated: true
            }]
        );
        assert_eq!(vol.allocation(0, size, 2).unwrap().len(), 2);
        vol.discard(8192, 8192).unwrap();
        vol.commit().unwrap();
        assert_eq!(all(&vol).len(), 3);
        assert!(vol.allocation(size - 512, 1024, 4).is_err());
    }
}
