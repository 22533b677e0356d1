//! A bootable guest made at test time for `qvol vm`: a tiny ext4 root filesystem (static
//! busybox and an `/sbin/init` that prints a marker and powers off) turned into a qcow2
//! disk, and an initramfs that loads the guest kernel's virtio and ext4 modules and
//! either switches into the root on `root=` or, given `qvol.mark=TEXT`, writes TEXT over
//! the first MiB of `/dev/vda` and then idles (a guest that ignores ACPI power-down).
//!
//! The kernel and its modules are those `scripts/setup.sh` puts in `.cache/guest/` (see
//! [`crate::guest`]); a missing tool or file is an error naming `scripts/setup.sh`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::guest::{find_in_path, GuestKit, SETUP_HINT};

/// Console line the initramfs prints after it wrote its `qvol.mark=` text to the disk.
pub const MARK_WRITTEN: &str = "QVOL-MARK-WRITTEN";
/// Console line prefix the initramfs prints when something failed (then it powers off).
pub const INITRD_ERROR: &str = "QVOL-INITRD-ERROR";

/// `/init` of the initramfs.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "QVOL-INITRD-ERROR $*"; poweroff -f; }
for m in $(cat /modules.order); do
    insmod "/modules/$m" || echo "QVOL-INITRD-ERROR insmod $m failed"
done
root=
mark=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        qvol.mark=*) mark=${arg#qvol.mark=} ;;
    esac
done
dev=${root:-/dev/vda}
i=0
while [ ! -b "$dev" ]; do
    [ $i -lt 300 ] || fail "no block device $dev"
    usleep 100000
    i=$((i + 1))
done
if [ -n "$mark" ]; then
    yes "$mark" | head -c 1048576 | dd of="$dev" bs=65536 conv=fsync 2>/dev/null \
        || fail "cannot write $dev"
    echo "QVOL-MARK-WRITTEN $mark"
    # No acpid: an ACPI power-down request goes unanswered; the VM runs until stopped.
    while :; do sleep 3600; done
fi
[ -n "$root" ] || fail "no root= on the kernel command line"
mount -t ext4 "$root" /newroot || fail "cannot mount $root"
umount /proc /sys
umount /dev
exec switch_root /newroot /sbin/init
"#;

/// The kernel modules the initramfs loads, in `modules.order` order (9p is not needed).
fn wanted_module(name: &str) -> bool {
    !(name.starts_with("9p") || name.starts_with("netfs") || name.starts_with("fscache"))
}

/// The guest kernel and what the initramfs and the root image are made of.
#[derive(Debug, Clone)]
pub struct RootKit {
    /// The guest kernel (`.cache/guest/vmlinuz`).
    pub kernel: PathBuf,
    guest_dir: PathBuf,
    mke2fs: PathBuf,
}

impl RootKit {
    /// Finds the kernel, its modules, QEMU, busybox, cpio, mke2fs and qemu-img, or panics
    /// with a sentence naming `scripts/setup.sh`.
    pub fn locate() -> Self {
        let kit = GuestKit::locate().unwrap_or_else(|e| panic!("cannot boot a test VM: {e:#}"));
        let guest_dir = kit
            .kernel
            .parent()
            .expect("the kernel lives in a directory")
            .to_path_buf();
        let mke2fs = find_in_path("mke2fs")
            .or_else(|| {
                ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| panic!("mke2fs (e2fsprogs) is not installed; {SETUP_HINT}"));
        for tool in ["qemu-img", "qemu-io"] {
            if find_in_path(tool).is_none() {
                panic!("{tool} (qemu-utils) is not installed; {SETUP_HINT}");
            }
        }
        Self {
            kernel: kit.kernel,
            guest_dir,
            mke2fs,
        }
    }

    /// Writes the initramfs (uncompressed newc cpio) to `out`.
    pub fn initramfs(&self, out: &Path) {
        let root = out.with_extension("tree");
        let _ = fs::remove_dir_all(&root);
        for dir in ["bin", "modules", "newroot", "proc", "sys", "dev"] {
            fs::create_dir_all(root.join(dir)).expect("create the initramfs tree");
        }
        copy_executable(Path::new("/bin/busybox"), &root.join("bin/busybox"));
        let order = fs::read_to_string(self.guest_dir.join("modules.order")).unwrap_or_else(|e| {
            panic!("cannot read the guest's modules.order ({e}); {SETUP_HINT}")
        });
        let mut loaded = String::new();
        for module in order.lines().map(str::trim).filter(|m| wanted_module(m)) {
            if module.is_empty() {
                continue;
            }
            let from = self.guest_dir.join("modules").join(module);
            fs::copy(&from, root.join("modules").join(module)).unwrap_or_else(|e| {
                panic!(
                    "cannot copy the module {} ({e}); {SETUP_HINT}",
                    from.display()
                )
            });
            loaded.push_str(module);
            loaded.push('\n');
        }
        fs::write(root.join("modules.order"), loaded).expect("write modules.order");
        write_executable(&root.join("init"), INIT);
        cpio(&root, out);
        fs::remove_dir_all(&root).expect("remove the initramfs tree");
    }

    /// Makes a 16 MiB qcow2 disk `out` holding an ext4 root filesystem whose `/sbin/init`
    /// prints `marker` on the console and powers off.
    pub fn root_disk(&self, marker: &str, out: &Path) {
        let tree = out.with_extension("tree");
        let _ = fs::remove_dir_all(&tree);
        for dir in ["bin", "sbin", "proc", "sys", "dev", "tmp"] {
            fs::create_dir_all(tree.join(dir)).expect("create the root tree");
        }
        copy_executable(Path::new("/bin/busybox"), &tree.join("bin/busybox"));
        write_executable(
            &tree.join("sbin/init"),
            &format!(
                "#!/bin/busybox sh\necho {marker}\n/bin/busybox sync\n/bin/busybox poweroff -f\n"
            ),
        );
        let raw = out.with_extension("raw");
        run(
            Command::new(&self.mke2fs)
                .args(["-q", "-F", "-t", "ext4", "-d"])
                .arg(&tree)
                .arg(&raw)
                .arg("16M"),
            "mke2fs",
        );
        run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(out),
            "qemu-img convert",
        );
        fs::remove_file(&raw).expect("remove the raw root image");
        fs::remove_dir_all(&tree).expect("remove the root tree");
    }
}

/// A fresh marker: `prefix` and 16 random hex digits, so that it can only come from where
/// this test put it.
pub fn unique_marker(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Whether the file at `path` holds `needle` anywhere.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    contains(&bytes, needle)
}

/// Whether `haystack` holds `needle` anywhere.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, _)) = needle.split_first() else {
        return true;
    };
    haystack
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == first)
        .any(|(i, _)| haystack[i..].starts_with(needle))
}

fn copy_executable(from: &Path, to: &Path) {
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("cannot copy {} ({e}); {SETUP_HINT}", from.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).expect("make it executable");
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).expect("write a script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("make it executable");
}

/// `find . | cpio -o -H newc` in `tree`, into `out`.
fn cpio(tree: &Path, out: &Path) {
    let list = Command::new("find")
        .arg(".")
        .current_dir(tree)
        .output()
        .expect("run find");
    assert!(list.status.success(), "find failed");
    let mut child = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(tree)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out).expect("create the initramfs"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run cpio ({e}); {SETUP_HINT}"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("cpio's stdin");
        stdin.write_all(&list.stdout).expect("feed cpio");
    }
    let done = child.wait_with_output().expect("wait for cpio");
    assert!(
        done.status.success(),
        "cpio failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}); {SETUP_HINT}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_finds_a_needle_anywhere_and_only_there() {
        assert!(contains(b"xxQVOL-MARKyy", b"QVOL-MARK"));
        assert!(contains(b"QVOL-MARK", b"QVOL-MARK"));
        assert!(!contains(b"QVOL-MAR", b"QVOL-MARK"));
        assert!(!contains(b"QQVOL-MARQVOL-MAR", b"QVOL-MARK"));
    }

    #[test]
    fn markers_are_unique() {
        assert_ne!(unique_marker("A"), unique_marker("A"));
        assert!(unique_marker("QVOL-X").starts_with("QVOL-X-"));
    }
}
