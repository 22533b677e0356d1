//! The ext4 workload of the guest tests: the first boot makes a filesystem and writes
//! files, a later boot (after the backend restarted) checks it clean and every checksum
//! unchanged. `tests/guest_disk.rs` runs it on a file-backed volume, `tests/rbd_guest.rs` on
//! one in Ceph RBD.

use std::collections::BTreeMap;

use super::GuestOutcome;

/// What the file `canary` of [`WRITE_FS`] repeats: plaintext that must never reach the
/// image.
pub const CANARY: &[u8] = b"QVOL-PLAINTEXT-CANARY";

/// First boot: a fresh ext4 filesystem with eight random files, a plaintext canary and the
/// checksums of all of them; each checksum is also printed as `QVOL-SUM name sum`.
pub const WRITE_FS: &str = r#"
dev=/dev/vda
test -b $dev
mkfs.ext4 -q -F $dev
mkdir -p /run/qvol/mnt
mount -t ext4 $dev /run/qvol/mnt
cd /run/qvol/mnt
for i in 0 1 2 3 4 5 6 7; do head -c 1048576 /dev/urandom > file$i; done
yes QVOL-PLAINTEXT-CANARY | head -c 1048576 > canary
sha256sum file* canary > SUMS
for f in file* canary; do echo "QVOL-SUM $f $(sha256sum < $f | cut -d' ' -f1)"; done
cd /
umount /run/qvol/mnt
echo QVOL-WRITE-DONE
"#;

/// Second boot: `e2fsck -fn` must find the filesystem clean, then every checksum must match.
pub const VERIFY_FS: &str = r#"
dev=/dev/vda
e2fsck -fn $dev
mkdir -p /run/qvol/mnt
mount -t ext4 -o ro $dev /run/qvol/mnt
cd /run/qvol/mnt
sha256sum -c SUMS
for f in file* canary; do echo "QVOL-SUM $f $(sha256sum < $f | cut -d' ' -f1)"; done
cd /
umount /run/qvol/mnt
echo QVOL-VERIFY-DONE
"#;

/// The `QVOL-SUM name sum` lines a boot printed, as a map.
pub fn sums(outcome: &GuestOutcome) -> BTreeMap<String, String> {
    outcome
        .lines_with_prefix("QVOL-SUM ")
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}
