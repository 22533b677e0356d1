#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for the RBD tests: one monitor and one OSD (BlueStore
# on a sparse file), everything under DIR, no systemd, no mgr.
#
#   scripts/ceph-cluster.sh start DIR   # prints "CEPH_CONF=DIR/ceph.conf" when it is ready
#   scripts/ceph-cluster.sh stop DIR    # stops the daemons (DIR stays; remove it yourself)
#
# Clients reach it with CEPH_CONF=DIR/ceph.conf (client.admin's keyring is named there); the
# pool "rbd" is created and initialised. Needs Debian's ceph-mon, ceph-osd and ceph-common
# (scripts/setup.sh installs them). Run as root (the daemons run as root, in DIR).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
conf=$dir/ceph.conf
export CEPH_CONF=$conf

log() { printf 'ceph-cluster: %s\n' "$*" >&2; }

stop() {
    local pidfile pid
    for pidfile in "$dir"/run/*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        # A second for a clean exit; the cluster is throwaway (BlueStore and the monitor's
        # store survive SIGKILL anyway).
        for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

# A free TCP port for the monitor (several clusters may run at once, one per test binary).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    for tool in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd; do
        command -v "$tool" >/dev/null || {
            log "$tool not found: install ceph-mon ceph-osd ceph-common (scripts/setup.sh)"
            exit 1
        }
    done
    [ ! -e "$conf" ] || { log "$conf exists: stop and remove $dir first"; exit 1; }
    mkdir -p "$dir/run" "$dir/log" "$dir/mon" "$dir/osd"
    local fsid port
    fsid=$(cat /proc/sys/kernel/random/uuid)
    port=$(free_port)
    cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 0
[mon]
mon data = $dir/mon/\$name
keyring = $dir/mon/keyring
[osd]
osd data = $dir/osd/\$name
keyring = $dir/osd/\$name/keyring
osd objectstore = bluestore
bluestore block path = $dir/osd/\$name.block
bluestore block create = true
bluestore block size = 10737418240
bluestore fsck on mount = false
osd memory target = 536870912
[client]
keyring = $dir/client.admin.keyring
CONF
    local t0=$SECONDS
    ceph-authtool --create-keyring "$dir/mon/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/mon/keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
    monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
    ceph-mon --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon/keyring"
    # ceph-mon refuses to start (exit 28, ENOSPC) on a disk fuller than "mon data avail
    # crit" percent; 0 above turns that off for a throwaway cluster.
    ceph-mon -i a 2>>"$dir/log/mon.stderr" || {
        log "ceph-mon did not start (exit $?; see $dir/log)"
        stop
        exit 1
    }
    local uuid id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(ceph osd new "$uuid")
    mkdir -p "$dir/osd/osd.$id"
    ceph auth get-or-create "osd.$id" mon 'allow profile osd' osd 'allow *' mgr 'allow profile osd' \
        -o "$dir/osd/osd.$id/keyring"
    ceph-osd -i "$id" --mkfs --osd-uuid "$uuid" 2>/dev/null || { log "ceph-osd --mkfs failed (see $dir/log)"; stop; exit 1; }
    ceph-osd -i "$id" 2>>"$dir/log/osd.stderr" || {
        log "ceph-osd did not start (exit $?; see $dir/log)"
        stop
        exit 1
    }
    # Wait until the OSD is up and in, then make the pool.
    for _ in $(seq 120); do
        ceph osd stat 2>/dev/null | grep -q "1 up.*1 in" && break
        sleep 0.5
    done
    ceph osd stat | grep -q "1 up.*1 in" || { log "the OSD did not come up (see $dir/log)"; stop; exit 1; }
    ceph osd pool create rbd 8 8 >/dev/null 2>&1
    rbd pool init rbd
    log "cluster up in $((SECONDS - t0)) s"
    echo "CEPH_CONF=$conf"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
