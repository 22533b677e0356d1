#!/usr/bin/env bash
# Builds the test guest's initramfs: static busybox, the modules scripts/setup.sh extracted
# into .cache/guest/, scripts/guest/init, and the test script to run inside the guest.
# usage: build-initramfs.sh OUTPUT SCRIPT
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
guest_dir=${QVOL_GUEST_DIR:-$here/../../.cache/guest}
out=$1
script=$2
for f in "$guest_dir/vmlinuz" "$guest_dir/modules.order" /bin/busybox; do
    if [ ! -e "$f" ]; then
        echo "build-initramfs: $f is missing; run scripts/setup.sh first" >&2
        exit 1
    fi
done
if ! command -v cpio >/dev/null; then
    echo "build-initramfs: cpio is missing; run scripts/setup.sh first" >&2
    exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/modules"
cp /bin/busybox "$root/bin/busybox"
cp "$guest_dir"/modules/*.ko "$root/modules/"
cp "$guest_dir/modules.order" "$root/modules.order"
cp "$here/init" "$root/init"
cp "$script" "$root/script.sh"
chmod 0755 "$root/init" "$root/bin/busybox"
(cd "$root" && find . | cpio --quiet -o -H newc) >"$out.tmp"
mv "$out.tmp" "$out"
