//! Process hardening for a daemon that holds a volume key: no core dumps, no ptrace
//! attach by other processes of the same user, and (where the allocator's pages are ours)
//! wiped plaintext. A refusal by the OS is logged, never fatal: the guarantees then rest
//! on the service manager's settings (`LimitCORE=0` in the systemd unit).

use std::path::PathBuf;

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

/// What the daemon may still reach on the filesystem once it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxPaths {
    /// The keystore directory: only its lock file and its `volumes/` directory stay
    /// reachable (the daemon records its own volume's commits there).
    pub keystore: Option<PathBuf>,
    /// The directory of the listening socket: files there may be removed (the socket, at
    /// shutdown).
    pub socket_dir: Option<PathBuf>,
}

/// How the sandbox came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxStatus {
    /// Every restriction is enforced.
    Full,
    /// The kernel enforces some of them (an older Landlock ABI).
    Partial,
    /// The kernel has no Landlock: nothing is restricted.
    None,
}

/// Restricts this thread and every thread it starts from now on (call it before the
/// serving threads start) with Landlock: no file can be opened, created or removed except
/// the keystore's lock file, the files of `keystore/volumes/` (the daemon's own volume
/// record is there) and the socket in `socket_dir`; no TCP. Files opened before (the image,
/// the listening socket, stderr) keep working. So a guest that takes over its backend
/// cannot read the keystore's `keystore.json` or the passphrase credential, even though
/// the process's user may.
pub fn sandbox(paths: &SandboxPaths) -> anyhow::Result<SandboxStatus> {
    use landlock::{
        Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let records = AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::ReadDir
        | AccessFs::MakeReg
        | AccessFs::RemoveFile
        | AccessFs::Truncate;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    if let Some(dir) = &paths.keystore {
        let lock = dir.join(qvol_keys::LOCK_FILE);
        let volumes = dir.join(qvol_keys::VOLUMES_DIR);
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                PathFd::new(&lock)?,
                AccessFs::ReadFile | AccessFs::WriteFile,
            ))?
            .add_rule(PathBeneath::new(PathFd::new(&volumes)?, records))?;
    }
    if let Some(dir) = &paths.socket_dir {
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(dir)?, AccessFs::RemoveFile))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => SandboxStatus::Full,
        RulesetStatus::PartiallyEnforced => SandboxStatus::Partial,
        RulesetStatus::NotEnforced => SandboxStatus::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keystore-like tree; the sandbox is applied on a thread of its own (Landlock
    /// restricts the calling thread and its children only).
    #[test]
    fn the_sandbox_leaves_only_the_volume_records_and_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let ks = dir.path().join("keystore");
        std::fs::create_dir_all(ks.join("volumes")).unwrap();
        std::fs::write(ks.join("keystore.json"), b"{\"seed\": \"secret\"}").unwrap();
        std::fs::write(ks.join(qvol_keys::LOCK_FILE), b"").unwrap();
        std::fs::write(ks.join("volumes/a.json"), b"old").unwrap();
        let secret_elsewhere = dir.path().join("credential");
        std::fs::write(&secret_elsewhere, b"passphrase").unwrap();
        let paths = SandboxPaths {
            keystore: Some(ks.clone()),
            socket_dir: None,
        };
        let outcome = std::thread::spawn(move || {
            let status = sandbox(&paths).unwrap();
            let denied = |p: &std::path::Path| std::fs::read(p).is_err();
            (
                status,
                denied(&ks.join("keystore.json")),
                denied(&secret_elsewhere),
                std::fs::read(ks.join("volumes/a.json")).ok(),
                std::fs::write(ks.join("volumes/.a.tmp"), b"new")
                    .and_then(|()| {
                        std::fs::rename(ks.join("volumes/.a.tmp"), ks.join("volumes/a.json"))
                    })
                    .is_ok(),
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(ks.join(qvol_keys::LOCK_FILE))
                    .is_ok(),
                std::fs::write(ks.join("keystore.json"), b"attacker").is_err(),
            )
        })
        .join()
        .unwrap();
        let (status, ks_denied, cred_denied, record, rewrote, lock_ok, ks_write_denied) = outcome;
        // The machines this project runs on have Landlock (ABI 7); without it the daemon
        // logs that it is not sandboxed, and this test must say so rather than pass.
        assert_ne!(
            status,
            SandboxStatus::None,
            "this kernel enforces no Landlock rule"
        );
        assert!(ks_denied, "keystore.json is readable in the sandbox");
        assert!(
            cred_denied,
            "a file outside the keystore is readable in the sandbox"
        );
        assert!(ks_write_denied, "keystore.json is writable in the sandbox");
        assert_eq!(
            record.as_deref(),
            Some(&b"old"[..]),
            "the volume record is unreadable"
        );
        assert!(rewrote, "the volume record cannot be replaced atomically");
        assert!(lock_ok, "the keystore lock cannot be opened");
        assert_eq!(
            std::fs::read(dir.path().join("keystore/volumes/a.json")).unwrap(),
            b"new"
        );
    }
}
