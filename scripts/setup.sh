#!/usr/bin/env bash
# Installs what qvol's demo and tests need on Debian bookworm (run as root), and skips what
# is already there:
#   - QEMU 7.2 (qemu-system-x86; qemu-storage-daemon comes with qemu-system-common), then
#     qemu-utils again: installing qemu-system-x86 removes a preinstalled qemu-utils 10.x
#     backport, so the matching 7.2 one is reinstalled afterwards;
#   - busybox-static and cpio (the guest's initramfs), e2fsprogs (mkfs.ext4/e2fsck used inside
#     the guest through the 9p-shared host root), fio, libxml2-utils (xmllint), libnbd-bin
#     (nbdinfo and nbdcopy, the NBD clients of integration/tests/nbd_clients.rs);
#   - Ceph's monitor, OSD and client tools (ceph-mon, ceph-osd, ceph-common, which brings
#     librados2 and librbd1): the rbd_* tests start a throwaway cluster of their own
#     (scripts/ceph-cluster.sh); qvol loads librbd at run time only for rbd: images;
#   - a Debian guest kernel, fetched with `apt-get download` and unpacked with `dpkg -x` into
#     .cache/guest/ (only vmlinuz and the modules the guest loads are kept).
# Safe with no stdin and CI=true. Re-running it does nothing when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin"

GUEST_DIR=.cache/guest
APT_UPDATED=0

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq </dev/null
        APT_UPDATED=1
    fi
}

apt_install() {
    apt_update_once
    log "apt-get install $*"
    as_root apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

# --- Debian packages -------------------------------------------------------------------
if ! pkg_installed qemu-system-x86 || ! command -v qemu-system-x86_64 >/dev/null; then
    apt_install qemu-system-x86
fi
# qemu-system-x86 may have removed qemu-utils (qemu-img); put the matching version back.
if ! pkg_installed qemu-utils || ! command -v qemu-img >/dev/null; then
    apt_install qemu-utils
fi
if ! command -v qemu-storage-daemon >/dev/null; then
    apt_install qemu-system-common
fi

missing=()
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null || missing+=(e2fsprogs)
command -v fio >/dev/null || missing+=(fio)
command -v xmllint >/dev/null || missing+=(libxml2-utils)
command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null || missing+=(libnbd-bin)
command -v virt-xml-validate >/dev/null || missing+=(libvirt-clients)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v xz >/dev/null || missing+=(xz-utils)
command -v depmod >/dev/null || [ -x /sbin/depmod ] || missing+=(kmod)
command -v ceph-mon >/dev/null || [ -x /usr/bin/ceph-mon ] || missing+=(ceph-mon)
command -v ceph-osd >/dev/null || [ -x /usr/bin/ceph-osd ] || missing+=(ceph-osd)
command -v rbd >/dev/null && command -v rados >/dev/null || missing+=(ceph-common)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
# busybox-static ships /bin/busybox; a dynamically linked busybox would not run in the
# initramfs, so insist on the static one.
if ! pkg_installed busybox-static; then
    apt_install busybox-static
fi

# --- Guest kernel ----------------------------------------------------------------------
# Modules the guest loads (their dependencies are resolved from modules.dep).
GUEST_MODULES="virtio_pci virtio_blk 9p 9pnet_virtio ext4 crc32c_generic"

if [ ! -f "$GUEST_DIR/vmlinuz" ] || [ ! -f "$GUEST_DIR/modules.order" ]; then
    apt_update_once
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$kpkg" ]; then
        log "cannot find the kernel package linux-image-amd64 depends on"
        exit 1
    fi
    log "fetching guest kernel $kpkg"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" </dev/null)
    dpkg -x "$work"/"$kpkg"_*.deb "$work/root"
    kver=${kpkg#linux-image-}
    moddir="$work/root/lib/modules/$kver"
    [ -d "$moddir" ] || { log "no modules directory for $kver in $kpkg"; exit 1; }
    # The package does not ship modules.dep (the postinst runs depmod): build it here.
    depmod -b "$work/root" "$kver"

    rm -rf "$GUEST_DIR.new"
    mkdir -p "$GUEST_DIR.new/modules"
    cp "$work/root/boot/vmlinuz-$kver" "$GUEST_DIR.new/vmlinuz"
    echo "$kver" >"$GUEST_DIR.new/kernel-version"

    # Resolve dependencies depth first so each module comes after what it needs.
    declare -A seen=()
    order=()
    resolve() {
        local name=$1 line path deps dep
        name=${name//-/_}
        line=$(grep -E "(^|/)${name//_/[_-]}\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" | head -n1 || true)
        if [ -z "$line" ]; then
            # Built into the kernel: nothing to load.
            grep -qE "/${name//_/[_-]}\.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
            log "module $name is neither in modules.dep nor built in"
            exit 1
        fi
        path=${line%%:*}
        [ -n "${seen[$path]:-}" ] && return 0
        seen[$path]=1
        deps=${line#*:}
        for dep in $deps; do
            dep=$(basename "$dep")
            resolve "${dep%%.ko*}"
        done
        order+=("$path")
    }
    for m in $GUEST_MODULES; do resolve "$m"; done
    : >"$GUEST_DIR.new/modules.order"
    for path in "${order[@]}"; do
        base=$(basename "$path")
        case "$base" in
            *.ko.xz) xz -dc "$moddir/$path" >"$GUEST_DIR.new/modules/${base%.xz}"; base=${base%.xz} ;;
            *.ko.zst) zstd -qdc "$moddir/$path" >"$GUEST_DIR.new/modules/${base%.zst}"; base=${base%.zst} ;;
            *.ko.gz) gzip -dc "$moddir/$path" >"$GUEST_DIR.new/modules/${base%.gz}"; base=${base%.gz} ;;
            *) cp "$moddir/$path" "$GUEST_DIR.new/modules/$base" ;;
        esac
        echo "$base" >>"$GUEST_DIR.new/modules.order"
    done
    rm -rf "$GUEST_DIR"
    mv "$GUEST_DIR.new" "$GUEST_DIR"
    log "guest kernel $kver in $GUEST_DIR ($(wc -l <"$GUEST_DIR/modules.order") modules)"
fi

log "ready: $(qemu-system-x86_64 --version | head -n1); guest kernel $(cat "$GUEST_DIR/kernel-version")"
