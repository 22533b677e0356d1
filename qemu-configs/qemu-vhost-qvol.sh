#!/bin/sh
# QEMU with one qvol disk, served by vhost-qvol over vhost-user-blk.
#
# Start the backend first (one per disk), e.g. from the systemd unit in this directory:
#   vhost-qvol --socket-path /run/vhost-qvol/vm1.sock --blk-file /var/lib/qvol/vm1.qvol \
#       --volume-id "$(qvol info /var/lib/qvol/vm1.qvol --json | jq -r .volume_id)" \
#       --control-socket /run/vhost-qvol/vm1.ctl
# then run this script with the rest of your VM's options:
#   QVOL_SOCKET=/run/vhost-qvol/vm1.sock ./qemu-vhost-qvol.sh -drive file=cdrom.iso,media=cdrom ...
#
# What vhost-user needs:
#   - guest RAM the backend can map: a shared memfd memory backend (size = -m);
#   - a chardev socket to the backend; reconnect=1 makes QEMU reconnect when the backend
#     restarts (requests in flight are resubmitted; the guest sees a pause, not an error);
#   - vhost-user-blk-pci with num-queues (<= the backend's --num-queues; one per vCPU is
#     a good default).
#
# Tried: booted under TCG by integration/tests/guest_configs.rs (QVOL_ACCEL=tcg, QEMU 7.2,
# Debian 6.1 guest kernel, 2 queues, ext4 on the disk) against vhost-qvol. Not tried here:
# KVM (it does not work on the test machines), boot from the qvol disk via firmware
# (bootindex=1 is set for that), hot-plug.
set -eu
: "${QVOL_SOCKET:?set QVOL_SOCKET to the vhost-qvol socket}"
QVOL_MEM=${QVOL_MEM:-2G}
QVOL_QUEUES=${QVOL_QUEUES:-2}
QVOL_ACCEL=${QVOL_ACCEL:-kvm}
QEMU=${QEMU:-qemu-system-x86_64}

exec "$QEMU" \
    -accel "$QVOL_ACCEL" \
    -machine q35,memory-backend=mem \
    -m "$QVOL_MEM" \
    -object memory-backend-memfd,id=mem,size="$QVOL_MEM",share=on \
    -chardev socket,id=qvol0,path="$QVOL_SOCKET",reconnect=1 \
    -device vhost-user-blk-pci,chardev=qvol0,num-queues="$QVOL_QUEUES",bootindex=1 \
    "$@"
