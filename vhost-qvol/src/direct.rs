//! The data of a read or write request as host memory, when the guest's buffers allow it:
//! reads are decrypted in place in guest memory and writes sealed straight from it, without
//! the bounce buffer of `request.rs` and its copy and zeroing (issue 15).
//!
//! A failed read leaves nothing in guest memory: the buffers are zeroed before the request
//! fails, so neither unverified plaintext nor part of a request reaches the guest.

use std::marker::PhantomData;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{Disk, DiskError, SECTOR_SIZE};

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

    /// Reads `disk` from `offset` into the buffers. On failure they are zeroed.
    pub(crate) fn read_from(&self, disk: &dyn Disk, offset: u64) -> Result<(), (u64, DiskError)> {
        let mut at = offset;
        for &(ptr, len) in &self.parts {
            // SAFETY: `ptr` and `len` come from a `VolatileSlice` of the guest memory map that
            // `'m` keeps mapped; the guest handed these bytes to the device for this request
            // and does not own them until it is completed. A guest that writes them anyway
            // can only garble its own buffer (as with a real disk's DMA).
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            if let Err(e) = disk.read_at(at, buf) {
                self.zero();
                return Err((at, e));
            }
            at += len as u64;
        }
        Ok(())
    }

    /// Writes the buffers to `disk` from `offset`.
    pub(crate) fn write_to(&self, disk: &dyn Disk, offset: u64) -> Result<(), (u64, DiskError)> {
        let mut at = offset;
        for &(ptr, len) in &self.parts {
            // SAFETY: as in `read_from`; the engine only reads these bytes (once each: it
            // copies a block into its own buffer and seals it there).
            let buf = unsafe { std::slice::from_raw_parts(ptr, len) };
            disk.write_at(at, buf).map_err(|e| (at, e))?;
            at += len as u64;
        }
        Ok(())
    }

    fn zero(&self) {
        for &(ptr, len) in &self.parts {
            // SAFETY: as in `read_from`.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
        }
    }
}
