//! SIGTERM and SIGINT: the vhost-user backend conventions ask for a prompt exit. The
//! signals are blocked in every thread (block them before any thread starts, so all
//! inherit the mask) and received synchronously by one thread with `sigwait`, which then
//! runs ordinary Rust code: no async-signal-safety constraints.

use std::io;
use std::thread::{self, JoinHandle};

const SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn signal_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for sig in SIGNALS {
        // SAFETY: `set` was initialised by sigemptyset; `sig` is a valid signal number.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Blocks SIGTERM and SIGINT in the calling thread and in every thread it starts later.
/// Call it before starting any thread.
pub fn block_termination_signals() -> io::Result<()> {
    let set = signal_set()?;
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts a thread that waits for SIGTERM or SIGINT and then calls `on_signal` with the
/// signal number. Requires [`block_termination_signals`] to have run first.
pub fn on_termination<F>(on_signal: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce(libc::c_int) + Send + 'static,
{
    let set = signal_set()?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            loop {
                // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc == 0 {
                    break;
                }
                // EINTR cannot happen for sigwait on Linux; retry on anything else.
            }
            on_signal(sig);
        })
}
