//! The data of a read or write request as host memory, when the guest's buffers allow it:
//! reads are decrypted in place in guest memory and writes sealed straight from it, without
//! the bounce buffer of `request.rs` and its copy and zeroing (issue 15).
//!
//! A failed read leaves nothing in guest memory: the buffers are zeroed before the request
//! fails, so neither unverified plaintext nor part of a request reaches the guest.

use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{Disk, DiskError, DiskErrorKind, SECTOR_SIZE};

/// Host memory of one request's data, part by part, valid while `'m` borrows the guest
/// memory map.
pub(crate) struct GuestBuffers<'m> {
    parts: Vec<(*mut u8, usize)>,
    _mem: PhantomData<&'m GuestMemoryMmap>,
}

impl<'m> GuestBuffers<'m> {
    /// `len` bytes of `chain`'s device-writable (`writable`) or device-readable descriptors,
    /// after the first `skip` of them; `None` when a part crosses a memory region, is not a
    /// whole number of sectors, or the chain has fewer bytes.
    pub(crate) fn of<M>(
        mem: &'m GuestMemoryMmap,
        chain: &DescriptorChain<M>,
        writable: bool,
        skip: usize,
        len: usize,
    ) -> Option<Self>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let (mut skip, mut left) = (skip, len);
        let mut parts = Vec::new();
        for d in chain.clone().filter(|d| d.is_write_only() == writable) {
            if left == 0 {
                break;
            }
            let dlen = d.len() as usize;
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let take = (dlen - skip).min(left);
            let addr = d.addr().checked_add(skip as u64)?;
            skip = 0;
            if take as u64 % SECTOR_SIZE != 0 {
                return None;
            }
            let slice = mem.get_slice(addr, take).ok()?;
            parts.push((slice.ptr_guard_mut().as_ptr(), take));
            left -= take;
        }
        (left == 0).then_some(GuestBuffers {
            parts,
            _mem: PhantomData,
        })
    }

    /// Buffers of these parts (tests).
    #[cfg(test)]
    fn from_parts(parts: Vec<(*mut u8, usize)>) -> Self {
        GuestBuffers {
            parts,
            _mem: PhantomData,
        }
    }

    /// The number of bytes.
    pub(crate) fn len(&self) -> usize {
        self.parts.iter().map(|&(_, len)| len).sum()
    }

    /// The parts as the disk ranges they hold from `offset` on.
    fn pieces(&mut self, offset: u64) -> impl Iterator<Item = (u64, &mut [u8])> + '_ {
        let mut at = offset;
        self.parts.iter().map(move |&(ptr, len)| {
            let piece = at;
            at += len as u64;
            // SAFETY: `ptr` and `len` come from a `VolatileSlice` of the guest memory map
            // that `'m` keeps mapped. The guest handed these bytes to the device for this
            // request and does not own them until it is completed (one that changes them
            // anyway garbles its own buffer, as with a real disk's DMA). A guest may point
            // parts at the same memory: `read_all` then reads one part at a time, so that no
            // two slices of one disk call alias (two requests served on two threads may
            // still, as two DMA transfers may); `&mut self` keeps a part from being handed
            // out twice.
            (piece, unsafe { std::slice::from_raw_parts_mut(ptr, len) })
        })
    }

    /// Writes the buffers to `disk` from `offset`.
    pub(crate) fn write_to(&self, disk: &dyn Disk, offset: u64) -> Result<(), (u64, DiskError)> {
        let mut at = offset;
        for &(ptr, len) in &self.parts {
            // SAFETY: as in `pieces`; the engine only reads these bytes (once each: it
            // copies a block into its own buffer and seals it there).
            let buf = unsafe { std::slice::from_raw_parts(ptr, len) };
            disk.write_at(at, buf).map_err(|e| (at, e))?;
            at += len as u64;
        }
        Ok(())
    }

    /// Zeroes the buffers.
    pub(crate) fn zero(&mut self) {
        for &(ptr, len) in &self.parts {
            // SAFETY: as in `pieces`.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
        }
    }
}

/// Reads each `(offset, buffers)` from `disk`, all in one [`Disk::read_many`] call (one
/// part at a time where the guest made parts overlap); one result a read, in order, with the
/// offset of the first part that failed. The buffers of a read that fails are zeroed.
pub(crate) fn read_all(
    disk: &dyn Disk,
    reads: &mut [(u64, &mut GuestBuffers<'_>)],
) -> Vec<Result<(), (u64, DiskError)>> {
    // One read in one part, what a queue's thread serves most: a plain `read_at`, without
    // the lists a batch needs.
    if let [(offset, buffers)] = reads {
        if let [(ptr, len)] = buffers.parts[..] {
            let at = *offset;
            // SAFETY: as in `pieces`; the only slice of these bytes while it lives.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            let read = catch_unwind(AssertUnwindSafe(|| disk.read_at(at, buf)))
                .unwrap_or_else(|_| Err(panicked()));
            if read.is_err() {
                buffers.zero();
            }
            return vec![read.map_err(|e| (at, e))];
        }
    }
    let mut counts = Vec::with_capacity(reads.len());
    let mut starts = Vec::new();
    for (offset, buffers) in reads.iter() {
        let mut at = *offset;
        for &(_, len) in &buffers.parts {
            starts.push(at);
            at += len as u64;
        }
        counts.push(buffers.parts.len());
    }
    let spans = reads.iter().flat_map(|(_, b)| b.parts.iter().copied());
    let overlap = overlapping(spans);
    // A bug that panics below (in the engine, in librbd's bindings) fails every read here,
    // its buffers zeroed below, rather than leaving what was read so far in guest memory.
    let outcomes = catch_unwind(AssertUnwindSafe(|| {
        let mut outcomes = Vec::with_capacity(starts.len());
        if overlap {
            // A guest that points two buffers at the same memory has them read one at a
            // time, so that no two slices of this call alias (what lands in the shared
            // bytes, and whether a failed read's zeroing wipes another's, is the guest's own
            // doing).
            for (offset, buffers) in reads.iter_mut() {
                for piece in buffers.pieces(*offset) {
                    outcomes.extend(answered(1, disk.read_many(&mut [piece])));
                }
            }
        } else {
            let mut pieces: Vec<_> = reads
                .iter_mut()
                .flat_map(|(offset, buffers)| buffers.pieces(*offset))
                .collect();
            // A guest may split a request into thousands of sub-block parts, each read
            // through a block of its own: at most MAX_PIECES of them at once bounds that
            // memory.
            for group in pieces.chunks_mut(MAX_PIECES) {
                let n = group.len();
                outcomes.extend(answered(n, disk.read_many(group)));
            }
        }
        outcomes
    }))
    .unwrap_or_else(|_| starts.iter().map(|_| Err(panicked())).collect());
    let mut outcomes = outcomes.into_iter();
    let mut results = Vec::with_capacity(reads.len());
    let mut at = 0;
    for ((_, buffers), n) in reads.iter_mut().zip(counts) {
        let mut result = Ok(());
        for (k, outcome) in (&mut outcomes).take(n).enumerate() {
            if let (Err(e), Ok(())) = (outcome, &result) {
                result = Err((starts[at + k], e));
            }
        }
        at += n;
        if result.is_err() {
            buffers.zero();
        }
        results.push(result);
    }
    results
}

/// The error of a read whose disk call panicked.
fn panicked() -> DiskError {
    DiskError::new(
        DiskErrorKind::Io,
        "reading panicked (a bug; the panic message is in the log)",
    )
}

/// The most parts of guest memory read in one [`Disk::read_many`] call.
const MAX_PIECES: usize = 256;

/// `outcomes` of a `read_many` call given `n` reads, or an error for each if the disk
/// answered for another number.
fn answered(
    n: usize,
    outcomes: Vec<Result<(), DiskError>>,
) -> impl Iterator<Item = Result<(), DiskError>> {
    let right = outcomes.len() == n;
    let lost = (!right).then(|| {
        (0..n).map(|_| {
            Err(DiskError::new(
                DiskErrorKind::Io,
                "the disk answered for another number of reads than asked",
            ))
        })
    });
    outcomes
        .into_iter()
        .filter(move |_| right)
        .chain(lost.into_iter().flatten())
}

/// Whether any two of the memory ranges `(start, len)` overlap.
fn overlapping(spans: impl Iterator<Item = (*mut u8, usize)>) -> bool {
    let mut spans: Vec<(usize, usize)> = spans
        .map(|(ptr, len)| (ptr as usize, ptr as usize + len))
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[1].0 < w[0].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::disk::testing::Batches;

    /// A request split into 600 parts of 512 bytes (a hostile guest's way to make each part
    /// a block read on the side) is read at most MAX_PIECES parts a call, and reads right.
    #[test]
    fn many_small_parts_are_read_a_bounded_number_at_a_time() {
        let disk = Batches::new(1 << 20, u64::MAX);
        let content: Vec<u8> = (0..600 * 512).map(|i| (i / 512 % 251) as u8).collect();
        disk.inner.write_at(4096, &content).unwrap();
        let mut memory = vec![0xeeu8; 600 * 512];
        let base = memory.as_mut_ptr();
        // The parts in reverse order in memory: none overlaps another, none is a whole block.
        let parts = (0..600)
            .map(|k| (base.wrapping_add((599 - k) * 512), 512))
            .collect();
        let mut buffers = GuestBuffers::from_parts(parts);
        let results = read_all(&disk, &mut [(4096, &mut buffers)]);
        assert!(matches!(results[..], [Ok(())]));
        let calls: Vec<usize> = disk.calls.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(calls, [256, 256, 88]);
        for k in 0..600 {
            let got = &memory[(599 - k) * 512..(600 - k) * 512];
            assert_eq!(got, &content[k * 512..(k + 1) * 512], "part {k}");
        }
    }

    /// A panic below a read (a bug) fails it and leaves its buffer zeroed, not holding what
    /// was read before the panic: on the queue's thread as in a batch.
    #[test]
    fn a_panic_under_a_read_fails_it_with_its_buffers_zeroed() {
        const BS: usize = 4096;
        let disk = Batches::new(1 << 20, 4096);
        disk.inner.write_at(0, &[0x42; 2 * BS]).unwrap();
        disk.panics.store(true, std::sync::atomic::Ordering::SeqCst);
        // Two parts (the lists of a batch), then one part at the failing block (the plain
        // read of a queue's thread).
        for (offset, parts) in [(0, 2), (4096, 1)] {
            let mut memory = vec![0xeeu8; parts * BS];
            let base = memory.as_mut_ptr();
            let parts = (0..parts)
                .map(|p| (base.wrapping_add(p * BS), BS))
                .collect();
            let mut buffers = GuestBuffers::from_parts(parts);
            let results = read_all(&disk, &mut [(offset, &mut buffers)]);
            assert!(matches!(results[..], [Err(_)]));
            assert!(
                memory.iter().all(|&b| b == 0),
                "the guest's buffer is zeroed"
            );
        }
    }

    #[test]
    fn a_disk_that_answers_for_another_number_of_reads_fails_them_all() {
        let ok = || Ok(());
        assert!(answered(1, vec![ok()]).all(|r| r.is_ok()));
        let short: Vec<_> = answered(2, vec![ok()]).collect();
        assert_eq!(short.len(), 2);
        assert!(short.iter().all(Result::is_err));
        let long: Vec<_> = answered(1, vec![ok(), ok()]).collect();
        assert!(matches!(long[..], [Err(_)]));
    }

    #[test]
    fn overlapping_ranges_are_found_touching_ones_are_not() {
        let p = |at: usize| at as *mut u8;
        assert!(!overlapping(
            [(p(4096), 512), (p(0), 4096), (p(4608), 1)].into_iter()
        ));
        assert!(overlapping(
            [(p(0), 4096), (p(8192), 512), (p(4095), 2)].into_iter()
        ));
        assert!(overlapping([(p(100), 8), (p(100), 8)].into_iter()));
        assert!(!overlapping(std::iter::empty()));
    }
}
