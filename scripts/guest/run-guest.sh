#!/usr/bin/env bash
# Boots the tiny test guest (TCG) on a vhost-user-blk disk and runs SCRIPT inside it, through
# qemu-configs/qemu-vhost-qvol.sh (the shipped QEMU command line). The guest's console goes
# to CONSOLE; the exit status is the script's (125 when the guest never reported one).
# usage: run-guest.sh SOCKET SCRIPT CONSOLE [TIMEOUT_SECONDS] [NUM_QUEUES]
# QVOL_GUEST_QEMU_ARGS adds QEMU options (split at spaces), e.g. a second disk:
#   QVOL_GUEST_QEMU_ARGS="-drive file=src.img,format=raw,if=virtio,readonly=on"
# QVOL_GUEST_MEM sets the guest's memory (default 512M).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
socket=$1 script=$2 console=$3 limit=${4:-180} queues=${5:-1}
kernel=${QVOL_GUEST_DIR:-$root/.cache/guest}/vmlinuz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
read -r -a extra <<<"${QVOL_GUEST_QEMU_ARGS:-}"
"$here/build-initramfs.sh" "$work/initramfs.cpio" "$script"
: >"$console"
set +e
QVOL_SOCKET=$socket QVOL_ACCEL=tcg QVOL_MEM=${QVOL_GUEST_MEM:-512M} QVOL_QUEUES=$queues \
    timeout --kill-after=5 "$limit" "$root/qemu-configs/qemu-vhost-qvol.sh" \
    -smp 1 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$console" -kernel "$kernel" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 loglevel=4 panic=-1 mitigations=off" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    ${extra[@]+"${extra[@]}"} \
    >"$work/qemu.log" 2>&1
qemu_rc=$?
set -e
if [ "$qemu_rc" -ne 0 ]; then
    echo "run-guest: QEMU exited with status $qemu_rc:" >&2
    cat "$work/qemu.log" >&2
fi
rc=$(sed -n 's/^QVOL-GUEST-EXIT=\([0-9]*\).*/\1/p' "$console" | tail -n1)
exit "${rc:-125}"
