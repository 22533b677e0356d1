//! Process hardening for a daemon that holds a volume key: no core dumps, no ptrace
//! attach by other processes of the same user, and (where the allocator's pages are ours)
//! wiped plaintext. A refusal by the OS is logged, never fatal: the guarantees then rest
//! on the service manager's settings (`LimitCORE=0` in the systemd unit).

use log::warn;

/// `prctl(PR_SET_DUMPABLE, 0)`: the kernel writes no core file for this process, and
/// `/proc/PID/mem` and ptrace are refused to unprivileged processes of the same uid.
/// Also sets the core size limit to 0, so a later `PR_SET_DUMPABLE` by a library cannot
/// bring dumps back.
pub fn forbid_core_dumps() {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        warn!(
            "cannot mark the process undumpable: {}",
            std::io::Error::last_os_error()
        );
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    if rc != 0 {
        warn!(
            "cannot set the core size limit to 0: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether this process is marked undumpable (for tests and `--print-capabilities`-like
/// diagnostics).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer argument.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}
