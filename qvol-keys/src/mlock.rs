//! The operating-system calls qvol-keys needs beyond std: `mlock(2)` and
//! `madvise(MADV_DONTDUMP)` on the pages that hold secrets, and `flock(2)` on the keystore's
//! lock file.
//!
//! The only `unsafe` of qvol-keys lives here. A failure to lock or to exclude from core dumps
//! (RLIMIT_MEMLOCK, a platform without the call) is a warning logged once per process, never
//! an error: the secret is still zeroized on drop. Pages are never unlocked on drop: `munlock`
//! would also unlock other secrets sharing the page, and a locked page costs nothing once its
//! secret is zeroized.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

static WARNED: AtomicBool = AtomicBool::new(false);
static WARNED_DUMP: AtomicBool = AtomicBool::new(false);

/// Locks the pages spanning `bytes` in RAM and excludes them from core dumps (Linux), or
/// logs a warning (once) if the OS refuses.
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
    if let Err(err) = dont_dump(bytes) {
        if !WARNED_DUMP.swap(true, Ordering::Relaxed) {
            log::debug!("cannot exclude secret key memory from core dumps ({err})");
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

/// `madvise(MADV_DONTDUMP)` on the whole pages spanning `bytes`: a core dump of the process
/// leaves them out. Other data sharing those pages is left out too, which is harmless.
#[cfg(target_os = "linux")]
fn dont_dump(bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: sysconf has no memory effects.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    let start = bytes.as_ptr() as usize & !(page - 1);
    let end = (bytes.as_ptr() as usize + bytes.len() + page - 1) & !(page - 1);
    // SAFETY: MADV_DONTDUMP only sets a flag on the mappings covering the page-aligned range,
    // which contains the live borrow `bytes` and so is mapped; it neither reads nor writes
    // the memory and does not change its contents or protection.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn dont_dump(_bytes: &[u8]) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "MADV_DONTDUMP is not available",
    ))
}

/// `flock(2)` with `LOCK_NB`: `Ok(true)` when the lock was taken, `Ok(false)` when another
/// open file holds a conflicting lock.
#[cfg(unix)]
pub(crate) fn try_flock(file: &std::fs::File, exclusive: bool) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock takes a file descriptor that `file` keeps open for the whole call and
        // touches no memory of ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(err),
        }
    }
}

#[cfg(not(unix))]
pub(crate) fn try_flock(_file: &std::fs::File, _exclusive: bool) -> std::io::Result<bool> {
    Ok(true)
}
