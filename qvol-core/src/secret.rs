//! Memory for secrets (the volume key and its subkeys): a page of its own, locked in RAM
//! (`mlock`, kept out of swap) and left out of core dumps (`MADV_DONTDUMP`) where the OS
//! allows; what it holds zeroizes itself on drop.
//!
//! The `unsafe` of qvol-core lives here (and one OS call in `storage/file.rs`). A refusal (RLIMIT_MEMLOCK, a platform without
//! these calls) is a warning logged once per process, never an error.
#![allow(unsafe_code)]

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

static WARNED: AtomicBool = AtomicBool::new(false);

/// The alignment (and least size) of a secret's allocation: one 4 KiB page.
const PAGE: usize = 4096;

#[repr(C, align(4096))]
struct Page<T>(T);

/// `T` alone on its own page(s), locked and excluded from core dumps. `Debug` prints
/// `[REDACTED]`. `T` must zeroize itself on drop (e.g. `Zeroizing` fields).
pub(crate) struct Secret<T> {
    page: Box<Page<T>>,
    /// Whether `mlock` succeeded (then `munlock` on drop: nothing else shares the pages).
    locked: bool,
}

impl<T> Secret<T> {
    pub(crate) fn new(value: T) -> Self {
        let page = Box::new(Page(value));
        let len = std::mem::size_of::<Page<T>>();
        let addr = (&*page as *const Page<T>).cast::<libc::c_void>();
        let locked = protect(addr, len);
        Secret { page, locked }
    }
}

impl<T> Deref for Secret<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.page.0
    }
}

impl<T> DerefMut for Secret<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.page.0
    }
}

impl<T> Drop for Secret<T> {
    fn drop(&mut self) {
        if self.locked && page_size() == Some(PAGE) {
            let len = std::mem::size_of::<Page<T>>();
            let addr = (&*self.page as *const Page<T>).cast::<libc::c_void>();
            // SAFETY: `addr..addr + len` is the live allocation of `self.page`, page-aligned
            // and a whole number of 4 KiB pages (the system's page size, checked above), so
            // munlock affects only these pages, which hold nothing but this secret. It does
            // not read or write the memory. `T` is dropped (and zeroizes itself) afterwards.
            unsafe {
                libc::munlock(addr, len);
            }
        }
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

fn page_size() -> Option<usize> {
    // SAFETY: sysconf reads a system constant; it has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok()
}

/// Locks `addr..addr + len` and marks it not to be dumped; warns once if the OS refuses.
/// Returns whether the lock succeeded.
fn protect(addr: *const libc::c_void, len: usize) -> bool {
    // SAFETY: the range is a live, page-aligned allocation owned by the caller; mlock only
    // changes the residency of the pages containing it and neither reads nor writes them.
    let locked = unsafe { libc::mlock(addr, len) } == 0;
    let lock_err = (!locked).then(std::io::Error::last_os_error);
    let dump_err = dont_dump(addr, len).err();
    if (lock_err.is_some() || dump_err.is_some()) && !WARNED.swap(true, Ordering::Relaxed) {
        let what: Vec<String> = [("mlock", lock_err), ("madvise(MADV_DONTDUMP)", dump_err)]
            .into_iter()
            .filter_map(|(call, e)| e.map(|e| format!("{call}: {e}")))
            .collect();
        log::warn!(
            "cannot fully protect volume key memory ({}); secrets may reach swap or core \
             dumps (they are still zeroized on drop)",
            what.join(", ")
        );
    }
    locked
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn dont_dump(addr: *const libc::c_void, len: usize) -> std::io::Result<()> {
    // SAFETY: madvise(MADV_DONTDUMP) only changes whether these pages go into a core dump;
    // the range is page-aligned (4 KiB; on systems with larger pages the call fails with
    // EINVAL, which the caller reports) and mapped for the whole call.
    if unsafe { libc::madvise(addr.cast_mut(), len, libc::MADV_DONTDUMP) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn dont_dump(_addr: *const libc::c_void, _len: usize) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "MADV_DONTDUMP is Linux-only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_page_aligned_redacted_and_usable() {
        let mut s = Secret::new([7u8; 32]);
        assert_eq!((&*s as *const [u8; 32] as usize) % PAGE, 0);
        s[0] = 1;
        assert_eq!(s[..2], [1, 7]);
        assert_eq!(format!("{s:?}"), "[REDACTED]");
    }
}
