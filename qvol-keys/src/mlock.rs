//! Keeping secrets out of swap: `mlock(2)` on the pages that hold them.
//!
//! The only `unsafe` of qvol-keys lives here. A failure to lock (RLIMIT_MEMLOCK, a platform
//! without mlock) is a warning logged once per process, never an error: the secret is still
//! zeroized on drop. Pages are never unlocked on drop: `munlock` would also unlock other
//! secrets sharing the page, and a locked page costs nothing once its secret is zeroized.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

static WARNED: AtomicBool = AtomicBool::new(false);

/// Locks the pages spanning `bytes` in RAM, or logs a warning (once) if the OS refuses.
pub(crate) fn lock(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if let Err(err) = lock_pages(bytes) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            log::warn!(
                "cannot lock secret key memory in RAM ({err}); secrets may be written to swap"
            );
        }
    }
}

#[cfg(unix)]
fn lock_pages(bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: mlock only changes the residency of the pages containing the range; the range
    // is a live borrow of `bytes.len()` readable bytes, so it is mapped for the whole call.
    // mlock neither reads nor writes the memory.
    let rc = unsafe { libc::mlock(bytes.as_ptr().cast::<libc::c_void>(), bytes.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn lock_pages(_bytes: &[u8]) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "mlock is not available",
    ))
}
