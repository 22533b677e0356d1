#!/bin/sh
# cloud-hypervisor with one qvol disk served by vhost-qvol.
#
# cloud-hypervisor connects to the backend's socket as a vhost-user frontend:
#   --memory ...,shared=on     guest RAM the backend can map (required for vhost-user);
#   --disk vhost_user=true,socket=...,num_queues=N,queue_size=256
#                              (num_queues <= vhost-qvol's --num-queues).
# Start the backend first:
#   vhost-qvol --socket-path "$QVOL_SOCKET" --blk-file IMAGE --volume-id ID --num-queues 2 --control-socket CTL
# (ID: the volume id `qvol info IMAGE` prints; the daemon refuses any other image.)
#
# Tried: nothing beyond `sh -n` (integration/tests/guest_configs.rs). cloud-hypervisor runs
# guests only with KVM, which does not work on the test machines, and it is not packaged for
# Debian bookworm. The options follow cloud-hypervisor's docs/vhost-user-blk-testing.md.
set -eu
: "${QVOL_SOCKET:?set QVOL_SOCKET to the vhost-qvol socket}"
: "${KERNEL:?set KERNEL to a vmlinux/bzImage (or use --firmware)}"
exec "${CLOUD_HYPERVISOR:-cloud-hypervisor}" \
    --cpus boot=2 \
    --memory size=2G,shared=on \
    --kernel "$KERNEL" \
    --cmdline "console=hvc0 root=/dev/vda rw" \
    --disk vhost_user=true,socket="$QVOL_SOCKET",num_queues=2,queue_size=256 \
    "$@"
