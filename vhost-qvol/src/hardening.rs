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

/// Closes every file descriptor this process inherited except stdin, stdout, stderr and
/// `keep` (the `--fd` socket): the sandbox restricts what can be opened, not what is open
/// already, so nothing the parent left open may stay within reach.
pub fn close_inherited_fds(keep: Option<i32>) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        warn!("cannot list /proc/self/fd; inherited descriptors stay open");
        return;
    };
    // Collect first: the directory handle is itself a descriptor.
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && Some(fd) != keep {
            // SAFETY: closing a descriptor number this process owns (inherited, unused by
            // any Rust object yet: nothing has been opened before this runs); EBADF for the
            // one read_dir used, already closed, is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// What the daemon may still reach on the filesystem once it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxPaths {
    /// The keystore directory: only its lock file and its `volumes/` directory stay
    /// reachable (the daemon records its own volume's commits there).
    pub keystore: Option<PathBuf>,
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
/// serving threads start):
/// - Landlock: no file can be opened, created or removed except the keystore's lock file
///   and the files of `keystore/volumes/` (the daemon's own volume record is there); no TCP;
///   no signals to, and no ptrace of, processes outside the sandbox. Files opened before
///   (the image, the listening socket, stderr) keep working.
/// - seccomp: no new sockets, no `connect` (so no other daemon's socket either, whatever the
///   Landlock ABI), no chmod/chown, no exec, no ptrace.
///
/// So a guest that takes over its backend cannot read the keystore's `keystore.json` or the
/// passphrase credential, reach another VM's backend, or loosen a file's permissions, even
/// though the process's user may. Directories are opened without following symbolic links:
/// a `volumes` link planted in the keystore cannot widen the sandbox.
pub fn sandbox(paths: &SandboxPaths) -> anyhow::Result<SandboxStatus> {
    use landlock::{
        Access, AccessFs, AccessNet, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
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
        let lock = open_path(&dir.join(qvol_keys::LOCK_FILE), false)?;
        let volumes = open_path(&dir.join(qvol_keys::VOLUMES_DIR), true)?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                lock,
                AccessFs::ReadFile | AccessFs::WriteFile,
            ))?
            .add_rule(PathBeneath::new(volumes, records))?;
    }
    let status = ruleset.restrict_self()?;
    deny_syscalls()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => SandboxStatus::Full,
        RulesetStatus::PartiallyEnforced => SandboxStatus::Partial,
        RulesetStatus::NotEnforced => SandboxStatus::None,
    })
}

/// `O_PATH | O_NOFOLLOW` (and `O_DIRECTORY` for a directory): the object itself, never
/// what a symbolic link in its place points to.
fn open_path(path: &std::path::Path, directory: bool) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if directory {
        flags |= libc::O_DIRECTORY;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open {} for the sandbox (it must be a {}, not a symbolic link): {e}",
                path.display(),
                if directory { "directory" } else { "file" }
            )
        })
}

/// The system calls a serving daemon never makes and an attacker inside it would want:
/// they fail with `EPERM`.
fn denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        // fchmodat2 (Linux 6.6), the same number on every architecture.
        452,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_chmod, libc::SYS_chown, libc::SYS_lchown]);
    calls
}

fn deny_syscalls() -> anyhow::Result<()> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| anyhow::anyhow!("no seccomp filter for this architecture: {e:?}"))?;
    let rules = denied_syscalls()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let program: BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
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
        };
        let socket = dir.path().join("other-daemon.sock");
        let _other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
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
                std::os::unix::net::UnixStream::connect(&socket).is_err(),
                std::os::unix::fs::chown(ks.join("volumes/a.json"), Some(0), Some(0)).is_err()
                    && std::fs::set_permissions(
                        ks.join("volumes/a.json"),
                        std::os::unix::fs::PermissionsExt::from_mode(0o666),
                    )
                    .is_err(),
            )
        })
        .join()
        .unwrap();
        let (
            status,
            ks_denied,
            cred_denied,
            record,
            rewrote,
            lock_ok,
            ks_write_denied,
            connect_denied,
            chmod_denied,
        ) = outcome;
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
        assert!(
            connect_denied,
            "another daemon's socket is reachable from the sandbox"
        );
        assert!(chmod_denied, "chmod or chown works in the sandbox");
        assert_eq!(
            std::fs::read(dir.path().join("keystore/volumes/a.json")).unwrap(),
            b"new"
        );
    }
}
