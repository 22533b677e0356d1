#!/bin/sh
# QEMU with one qvol disk whose bytes live in a Ceph RBD image: vhost-qvol serves
# rbd:POOL/IMAGE (encrypting on this host: Ceph only ever stores ciphertext), then QEMU
# connects to it exactly as to a file-backed qvol disk (qemu-vhost-qvol.sh, this directory).
#
# Once, to make the volume (thin RBD image, formatted):
#   qvol create rbd:vms/vm1 --size 20G --key "$(qvol key new vm1)"
# then, on whichever host runs the VM:
#   QVOL_IMAGE=rbd:vms/vm1 ./qemu-vhost-qvol-rbd.sh -drive file=cdrom.iso,media=cdrom ...
#
# Settings (environment):
#   QVOL_IMAGE       rbd:POOL/IMAGE (required)
#   CEPH_CONF        the cluster's configuration [default: /etc/ceph/ceph.conf]
#   QVOL_CEPH_ID     the Ceph client id, client.ID [default: admin]; it needs the
#                    "profile rbd" caps on the pool
#   QVOL_BREAK_LOCK  set to 1 to take the volume over from a host that died while serving it
#                    (Ceph blocklists the old holder); without it a volume another daemon
#                    holds is refused, naming that daemon's address
#   QVOL_RUN_DIR     where the socket goes [default: $XDG_RUNTIME_DIR or /run/qvol]
# plus QEMU's settings of qemu-vhost-qvol.sh (QVOL_MEM, QVOL_QUEUES, QVOL_ACCEL, QEMU).
#
# The backend runs as a child of this script and stops (committing) when QEMU exits.
# Tried: integration/tests/rbd_guest.rs boots the test guest (TCG) with this script on a
# throwaway single-node cluster (scripts/ceph-cluster.sh). Not tried: a multi-host cluster,
# live migration between hosts.
set -eu
: "${QVOL_IMAGE:?set QVOL_IMAGE to rbd:POOL/IMAGE}"
here=$(cd "$(dirname "$0")" && pwd)
VHOST_QVOL=${VHOST_QVOL:-vhost-qvol}
QVOL=${QVOL:-qvol}
run_dir=${QVOL_RUN_DIR:-${XDG_RUNTIME_DIR:-/run/qvol}}
mkdir -p "$run_dir"
socket="$run_dir/$(echo "$QVOL_IMAGE" | tr ':/' '__').sock"
ceph_id=${QVOL_CEPH_ID:-admin}
volume_id=$("$QVOL" info "$QVOL_IMAGE" --ceph-id "$ceph_id" --json |
    sed -n 's/.*"volume_id": *"\([0-9a-f]*\)".*/\1/p')
break_lock=
[ "${QVOL_BREAK_LOCK:-0}" = 1 ] && break_lock=--break-lock
rm -f "$socket"
"$VHOST_QVOL" --socket-path "$socket" --blk-file "$QVOL_IMAGE" --volume-id "$volume_id" \
    --ceph-id "$ceph_id" $break_lock &
backend=$!
trap 'kill -TERM "$backend" 2>/dev/null; wait "$backend"' EXIT INT TERM
i=0
while [ ! -S "$socket" ]; do
    kill -0 "$backend" 2>/dev/null || { wait "$backend"; exit 1; }
    i=$((i + 1)); [ "$i" -lt 600 ] || { echo "vhost-qvol did not listen" >&2; exit 1; }
    sleep 0.1
done
QVOL_SOCKET=$socket "$here/qemu-vhost-qvol.sh" "$@"
