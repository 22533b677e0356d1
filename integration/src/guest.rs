//! Boots qvol's tiny test guest under QEMU (TCG) on vhost-user-blk disks.
//!
//! The guest is a Debian kernel plus a busybox initramfs (`scripts/guest/`): it loads the
//! virtio, 9p and ext4 modules, mounts the host root read-only over 9p, runs a test script
//! chrooted into it (so every host tool is there: mkfs.ext4, e2fsck, sha256sum, fio) and
//! powers off. The script's output and markers come back through the serial console.
//!
//! Nothing here skips: a missing QEMU, kernel or busybox is an error that names
//! `scripts/setup.sh`, which installs them.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub mod backend;
pub mod ext4;

/// What to tell a person when something the guest needs is missing.
pub const SETUP_HINT: &str =
    "run scripts/setup.sh to install QEMU, busybox and cpio and to fetch the guest kernel";

/// Console line the guest's init prints just before it runs the test script.
pub const BEGIN_MARKER: &str = "QVOL-GUEST-BEGIN";
/// Console line prefix the guest's init prints with the script's exit status.
pub const EXIT_MARKER: &str = "QVOL-GUEST-EXIT=";

/// Lines a Linux guest prints when a block device or a filesystem on it failed.
const IO_ERROR_PATTERNS: &[&str] = &[
    "I/O error",
    "blk_update_request",
    "Buffer I/O error",
    "EXT4-fs error",
    "QVOL-GUEST-ERROR",
];

/// A failure to prepare, boot or supervise the guest.
#[derive(Debug)]
pub struct GuestError {
    message: String,
    source: Option<io::Error>,
}

impl GuestError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    fn io(message: impl Into<String>, source: io::Error) -> Self {
        Self {
            message: message.into(),
            source: Some(source),
        }
    }
}

/// `{}` prints this error's sentence; `{:#}` adds its source (what tests panic with).
impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match &self.source {
            Some(source) if f.alternate() => write!(f, ": {source}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The repository root (the workspace directory holding `scripts/` and `.cache/`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Finds an executable named `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Finds a tool on `PATH` or fails with a sentence naming `scripts/setup.sh`.
pub fn require_tool(name: &str) -> Result<PathBuf, GuestError> {
    find_in_path(name)
        .ok_or_else(|| GuestError::new(format!("{name} is not installed; {SETUP_HINT}")))
}

/// Everything needed to boot the test guest, found on this machine.
#[derive(Debug, Clone)]
pub struct GuestKit {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The guest kernel that `scripts/setup.sh` unpacked.
    pub kernel: PathBuf,
    /// `scripts/guest/build-initramfs.sh`.
    pub initramfs_builder: PathBuf,
}

impl GuestKit {
    /// Finds QEMU, the guest kernel and the initramfs builder; every missing piece is an error
    /// that says how to install it.
    pub fn locate() -> Result<Self, GuestError> {
        let guest_dir = std::env::var_os("QVOL_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".cache/guest"));
        Self::locate_in(&guest_dir)
    }

    /// As [`GuestKit::locate`], with the kernel and modules in `guest_dir`.
    pub fn locate_in(guest_dir: &Path) -> Result<Self, GuestError> {
        let root = repo_root();
        let kernel = guest_dir.join("vmlinuz");
        for needed in [kernel.clone(), guest_dir.join("modules.order")] {
            if !needed.is_file() {
                return Err(GuestError::new(format!(
                    "the guest kernel file {} is missing; {SETUP_HINT}",
                    needed.display()
                )));
            }
        }
        if !Path::new("/bin/busybox").is_file() {
            return Err(GuestError::new(format!(
                "/bin/busybox (busybox-static) is missing; {SETUP_HINT}"
            )));
        }
        require_tool("cpio")?;
        Ok(Self {
            qemu: require_tool("qemu-system-x86_64")?,
            kernel,
            initramfs_builder: root.join("scripts/guest/build-initramfs.sh"),
        })
    }

    /// Builds an initramfs that runs `script` (a POSIX shell script, run with `sh -e` in the
    /// host root) and writes it to `output`.
    pub fn build_initramfs(&self, script: &str, output: &Path) -> Result<(), GuestError> {
        let script_path = output.with_extension("script.sh");
        fs::write(&script_path, script).map_err(|e| {
            GuestError::io(
                format!("cannot write the guest script {}", script_path.display()),
                e,
            )
        })?;
        let out = Command::new(&self.initramfs_builder)
            .arg(output)
            .arg(&script_path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                GuestError::io(
                    format!("cannot run {}", self.initramfs_builder.display()),
                    e,
                )
            })?;
        if !out.status.success() {
            return Err(GuestError::new(format!(
                "building the guest initramfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// A vhost-user-blk disk for the guest: the backend's listening socket.
#[derive(Debug, Clone)]
pub struct VhostUserDisk {
    /// The UNIX socket the backend (vhost-qvol, qemu-storage-daemon) listens on.
    pub socket: PathBuf,
    /// Number of virtqueues QEMU asks for.
    pub num_queues: u16,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Shell script run inside the guest (chrooted into the host root, `sh -e`).
    pub script: String,
    /// vhost-user-blk disks, in order: the first is `/dev/vda`.
    pub disks: Vec<VhostUserDisk>,
    /// Guest RAM in MiB (shared memfd, as vhost-user requires).
    pub memory_mib: u32,
    /// The guest is killed when it runs longer than this.
    pub timeout: Duration,
}

impl GuestSpec {
    /// A guest with 512 MiB, a five-minute limit and one single-queue disk per socket.
    pub fn new(script: impl Into<String>, sockets: &[&Path]) -> Self {
        Self {
            script: script.into(),
            disks: sockets
                .iter()
                .map(|s| VhostUserDisk {
                    socket: s.to_path_buf(),
                    num_queues: 1,
                })
                .collect(),
            memory_mib: 512,
            timeout: Duration::from_secs(300),
        }
    }
}

/// QEMU's option syntax doubles commas inside values.
fn qemu_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The part of the QEMU command line that makes the test guest, whatever the machine: no
/// default devices, the serial console to a file, the kernel and initramfs, and the host
/// root shared read-only over 9p.
pub fn guest_args(kit: &GuestKit, initramfs: &Path, console: &Path) -> Vec<OsString> {
    let args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", qemu_escape(console)),
        "-kernel".into(),
        kit.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        initramfs.to_string_lossy().into_owned(),
        "-append".into(),
        "console=ttyS0 loglevel=4 panic=-1 mitigations=off".into(),
        "-virtfs".into(),
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap".into(),
    ];
    args.into_iter().map(OsString::from).collect()
}

/// The machine and disk part of the QEMU command line for `spec`: TCG, memfd shared memory
/// (vhost-user needs guest RAM the backend can map), one `vhost-user-blk-pci` per disk on a
/// chardev with `reconnect=1`.
pub fn machine_args(spec: &GuestSpec) -> Vec<OsString> {
    let mem = spec.memory_mib;
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-machine".into(),
        "q35,memory-backend=mem".into(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-smp".into(),
        "1".into(),
    ];
    for (i, disk) in spec.disks.iter().enumerate() {
        args.push("-chardev".into());
        args.push(format!(
            "socket,id=disk{i},path={},reconnect=1",
            qemu_escape(&disk.socket)
        ));
        args.push("-device".into());
        args.push(format!(
            "vhost-user-blk-pci,chardev=disk{i},num-queues={}",
            disk.num_queues
        ));
    }
    args.into_iter().map(OsString::from).collect()
}

/// A guest that is running (or has stopped but was not waited for yet). Dropping it kills
/// QEMU.
#[derive(Debug)]
pub struct RunningGuest {
    child: Option<Child>,
    console: PathBuf,
    qemu_log: PathBuf,
    deadline: Instant,
}

/// How a guest run ended.
#[derive(Debug)]
pub struct GuestOutcome {
    /// Everything the guest printed on its serial console.
    pub console: String,
    /// QEMU's own stdout and stderr.
    pub qemu_log: String,
    /// The test script's exit status, when the guest got as far as reporting it.
    pub script_status: Option<i32>,
    /// QEMU's exit status (`None` when it was killed at the deadline).
    pub qemu_status: Option<ExitStatus>,
}

impl GuestOutcome {
    /// Whether the script ran to its end with status 0 and QEMU exited by itself.
    pub fn succeeded(&self) -> bool {
        self.script_status == Some(0) && self.qemu_status.is_some_and(|s| s.success())
    }

    /// Console lines that report a block-layer or filesystem error in the guest.
    pub fn io_error_lines(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter(|line| IO_ERROR_PATTERNS.iter().any(|p| line.contains(p)))
            .collect()
    }

    /// Console lines of the form `KEY value...` for a marker `KEY`.
    pub fn lines_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .filter_map(move |l| l.trim_end_matches('\r').strip_prefix(prefix))
    }

    /// The single value of a `PREFIX value` marker line (panics unless there is exactly one).
    pub fn marker(&self, prefix: &str) -> String {
        let values: Vec<&str> = self.lines_with_prefix(prefix).collect();
        assert_eq!(
            values.len(),
            1,
            "expected one {prefix:?} line\n{}",
            self.report()
        );
        values[0].trim().to_string()
    }

    /// `PREFIX name value` lines as a map.
    pub fn pairs(&self, prefix: &str) -> std::collections::BTreeMap<String, String> {
        self.lines_with_prefix(prefix)
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect()
    }

    /// A readable report for assertion messages: statuses, the console and QEMU's log.
    pub fn report(&self) -> String {
        format!(
            "script status {:?}, qemu status {:?}\n--- guest console ---\n{}\n--- qemu ---\n{}",
            self.script_status, self.qemu_status, self.console, self.qemu_log
        )
    }
}

/// Boots the guest described by `spec`, with its files (initramfs, console log) in `workdir`.
pub fn boot(kit: &GuestKit, spec: &GuestSpec, workdir: &Path) -> Result<RunningGuest, GuestError> {
    let mut qemu = Command::new(&kit.qemu);
    qemu.args(machine_args(spec));
    boot_with(kit, qemu, &spec.script, spec.timeout, workdir)
}

/// Boots the guest with a caller-made `launcher` (QEMU itself, or a script such as
/// `qemu-configs/qemu-vhost-qvol.sh`) that supplies the machine, memory and disks; the
/// [`guest_args`] are appended to it.
pub fn boot_with(
    kit: &GuestKit,
    mut launcher: Command,
    script: &str,
    timeout: Duration,
    workdir: &Path,
) -> Result<RunningGuest, GuestError> {
    fs::create_dir_all(workdir)
        .map_err(|e| GuestError::io(format!("cannot create {}", workdir.display()), e))?;
    let initramfs = workdir.join("initramfs.cpio");
    kit.build_initramfs(script, &initramfs)?;
    let console = workdir.join("console.log");
    let qemu_log = workdir.join("qemu.log");
    fs::write(&console, b"")
        .map_err(|e| GuestError::io(format!("cannot create {}", console.display()), e))?;
    let log = fs::File::create(&qemu_log)
        .map_err(|e| GuestError::io(format!("cannot create {}", qemu_log.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| GuestError::io("cannot duplicate the QEMU log handle", e))?;
    let child = launcher
        .args(guest_args(kit, &initramfs, &console))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| {
            GuestError::io(
                format!("cannot start {}", launcher.get_program().to_string_lossy()),
                e,
            )
        })?;
    Ok(RunningGuest {
        child: Some(child),
        console,
        qemu_log,
        deadline: Instant::now() + timeout,
    })
}

/// Boots the guest and waits for it to power off.
pub fn run(kit: &GuestKit, spec: &GuestSpec, workdir: &Path) -> Result<GuestOutcome, GuestError> {
    boot(kit, spec, workdir)?.wait()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl RunningGuest {
    /// What the guest has printed on its console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console)
    }

    /// Waits until the console shows a line containing `needle`. Fails when QEMU exits or
    /// `timeout` (or the guest's own deadline) passes first; the error holds the console.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Result<(), GuestError> {
        let until = (Instant::now() + timeout).min(self.deadline);
        loop {
            let console = self.console();
            if console.contains(needle) {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .map_err(|e| GuestError::io("cannot poll QEMU", e))?,
                None => None,
            };
            if exited.is_some() || Instant::now() >= until {
                let why = match exited {
                    Some(status) => format!("QEMU exited ({status})"),
                    None => "timed out".to_string(),
                };
                return Err(GuestError::new(format!(
                    "the guest never printed {needle:?}: {why}\n--- guest console ---\n{console}\n--- qemu ---\n{}",
                    read_lossy(&self.qemu_log)
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit (killing it at the deadline) and collects the outcome.
    pub fn wait(mut self) -> Result<GuestOutcome, GuestError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| GuestError::new("the guest was already waited for"))?;
        let qemu_status = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| GuestError::io("cannot poll QEMU", e))?
            {
                break Some(status);
            }
            if Instant::now() >= self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let console = self.console();
        let script_status = script_status(&console);
        Ok(GuestOutcome {
            console,
            qemu_log: read_lossy(&self.qemu_log),
            script_status,
            qemu_status,
        })
    }
}

/// The status the guest's init reported for the test script (the last `QVOL-GUEST-EXIT=`).
fn script_status(console: &str) -> Option<i32> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(EXIT_MARKER))
        .filter_map(|s| s.trim().parse().ok())
        .next_back()
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_fails_and_names_the_setup_script() {
        let empty = std::env::temp_dir().join(format!("qvol-no-kernel-{}", std::process::id()));
        let err = GuestKit::locate_in(&empty).expect_err("no kernel there");
        let text = err.to_string();
        assert!(text.contains("vmlinuz"), "{text}");
        assert!(text.contains("scripts/setup.sh"), "{text}");
    }

    #[test]
    fn a_missing_tool_fails_and_names_the_setup_script() {
        let err = require_tool("qvol-no-such-tool").expect_err("not on PATH");
        assert!(err.to_string().contains("scripts/setup.sh"), "{err}");
    }

    #[test]
    fn qemu_options_double_commas_in_paths() {
        assert_eq!(qemu_escape(Path::new("/tmp/a,b.sock")), "/tmp/a,,b.sock");
    }

    #[test]
    fn the_script_status_and_io_errors_come_from_the_console() {
        let console =
            "QVOL-GUEST-BEGIN\r\n[ 1.0] I/O error, dev vda, sector 8\r\nQVOL-GUEST-EXIT=3\r\n";
        assert_eq!(script_status(console), Some(3));
        assert_eq!(script_status("QVOL-GUEST-BEGIN\n"), None);
        let outcome = GuestOutcome {
            console: console.to_string(),
            qemu_log: String::new(),
            script_status: script_status(console),
            qemu_status: None,
        };
        assert_eq!(outcome.io_error_lines().len(), 1);
        assert!(!outcome.succeeded());
    }
}
