#!/bin/sh
# crosvm with one qvol disk served by vhost-qvol.
#
# crosvm is a vhost-user frontend with --vhost-user block,socket=PATH (crosvm's book,
# devices/vhost_user.md); its guest memory is always memfd-backed and shareable, so no
# extra memory option is needed. Older crosvm releases spell it --vhost-user-blk PATH.
# Start the backend first: vhost-qvol --socket-path "$QVOL_SOCKET" --blk-file IMAGE --volume-id ID --control-socket CTL
# (ID: the volume id `qvol info IMAGE` prints; the daemon refuses any other image.)
#
# Tried: nothing beyond `sh -n` (integration/tests/guest_configs.rs). crosvm runs guests
# only with KVM, which does not work on the test machines, and it is not packaged for
# Debian bookworm.
set -eu
: "${QVOL_SOCKET:?set QVOL_SOCKET to the vhost-qvol socket}"
: "${KERNEL:?set KERNEL to a bzImage}"
exec "${CROSVM:-crosvm}" run \
    --cpus 2 \
    --mem 2048 \
    --vhost-user block,socket="$QVOL_SOCKET" \
    --params "console=ttyS0 root=/dev/vda rw" \
    --serial type=stdout,hardware=serial,num=1 \
    "$KERNEL" \
    "$@"
