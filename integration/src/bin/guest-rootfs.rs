//! Writes the guest that `qvol vm`'s tests boot (`integration::rootfs`) to a directory, for
//! scripts that boot it outside the tests (`scripts/bench-boot.sh`): `initrd.cpio` (loads
//! the guest kernel's virtio and ext4 modules, mounts `root=` and switches into it) and
//! `root.qcow2` (a 16 MiB ext4 root whose `/sbin/init` prints MARKER and powers off).
//! Prints the guest kernel's path.
//!
//! Usage: `guest-rootfs OUTDIR MARKER`

use std::path::Path;

use integration::rootfs::RootKit;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, marker] = &args[..] else {
        eprintln!("usage: guest-rootfs OUTDIR MARKER");
        std::process::exit(2);
    };
    if marker.is_empty()
        || !marker
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        eprintln!("guest-rootfs: MARKER is letters, digits and '-'");
        std::process::exit(2);
    }
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| {
        eprintln!("guest-rootfs: cannot create {}: {e}", dir.display());
        std::process::exit(1);
    });
    let kit = RootKit::locate();
    kit.initramfs(&dir.join("initrd.cpio"));
    kit.root_disk(marker, &dir.join("root.qcow2"));
    println!("{}", kit.kernel.display());
}
