#!/usr/bin/env bash
# VM boot time (TCG): one VM booted from the same root filesystem as a plain qcow2 disk and
# as an encrypted qvol disk, N times each, timed from `qvol vm start` to the marker line the
# root's /sbin/init prints on the serial console.
#
#   scripts/bench-boot.sh                 # 3 timed boots per backend (under a minute here)
#   scripts/bench-boot.sh --runs 5
#   scripts/bench-boot.sh --passphrase    # adds a row: the qvol VM with a keystore sealed by
#                                         # a passphrase (argon2id at the default parameters,
#                                         # paid by vhost-qvol at every start)
#   scripts/bench-boot.sh --help          # every option
#
# The guest is the one `qvol vm`'s tests boot (integration/src/rootfs.rs, written out by
# integration/src/bin/guest-rootfs.rs): the Debian kernel from scripts/setup.sh, an initramfs
# that loads the virtio and ext4 modules and switches into root=/dev/vda, and a 16 MiB ext4
# root whose /sbin/init echoes a marker and powers off. Both VMs are made by `qvol vm new`
# with the same kernel, initrd, command line, CPUs and memory and started by
# `qvol vm start --wait` (QVOL_VM_ACCEL=tcg); they differ only in the disk:
#   qcow2: `--no-encrypt`, QEMU opens disk.qcow2 itself
#          (-blockdev driver=qcow2,... -device virtio-blk-pci);
#   qvol:  the same qcow2 file turned into disk.qvol by `qvol vm migrate` (qvol import
#          through NBD, compared byte for byte), served by vhost-qvol
#          (-device vhost-user-blk-pci).
# Boots alternate between the backends (the order flips every run), after one untimed
# warm-up boot of each. The table also goes to target/bench/boot.md.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${QVOL_BENCH_BOOT_RUNS:-3}
CPUS=1
MEMORY=256
CIPHER=
PASSPHRASE=0
KEEP=0
TIMEOUT=240
CMDLINE_BASE="console=ttyS0 loglevel=4 mitigations=off"

usage() {
    cat <<EOF
usage: scripts/bench-boot.sh [--runs N] [--cpus N] [--memory MIB] [--cipher SUITE]
                             [--passphrase] [--keep] [--timeout SECS]
  --runs N         timed boots per backend (default 3; \$QVOL_BENCH_BOOT_RUNS)
  --cpus N         vCPUs of the VM (default $CPUS; also the qvol disk's queues)
  --memory MIB     guest memory (default $MEMORY)
  --cipher SUITE   the qvol disk's cipher (qvol vm migrate --cipher; default: qvol's)
  --passphrase     also time the qvol VM with a passphrase-sealed keystore (real argon2id)
  --keep           keep the work directory (printed) instead of removing it
  --timeout SECS   give up on a boot after SECS (default $TIMEOUT)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --cpus) CPUS=$2; shift 2 ;;
        --memory) MEMORY=$2; shift 2 ;;
        --cipher) CIPHER=$2; shift 2 ;;
        --passphrase) PASSPHRASE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench-boot.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
for n in "$RUNS" "$CPUS" "$MEMORY" "$TIMEOUT"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-boot.sh: $n is not a positive number" >&2; exit 2; }
done

log() { printf 'bench-boot: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

for tool in qemu-system-x86_64 qemu-img mke2fs cpio; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] \
        || die "$tool is not installed; run scripts/setup.sh"
done
if [ ! -f .cache/guest/vmlinuz ] || [ ! -f .cache/guest/modules.order ]; then
    die "no guest kernel in .cache/guest; run scripts/setup.sh"
fi
[ -x /bin/busybox ] || die "/bin/busybox (busybox-static) is missing; run scripts/setup.sh"

log "cargo build --release -p vhost-qvol --bins; cargo build -p integration --bin guest-rootfs"
cargo build --release --locked -q -p vhost-qvol --bins >&2
cargo build --locked -q -p integration --bin guest-rootfs >&2
QVOL=$PWD/target/release/qvol

WORK=$(mktemp -d "${TMPDIR:-/tmp}/qvol-bench-boot.XXXXXX")
VMS=$WORK/vms
BG_PID=
cleanup() {
    if [ -n "$BG_PID" ] && kill -0 "$BG_PID" 2>/dev/null; then
        for vm in "$VMS"/*/; do
            "$QVOL" vm --vms-dir "$VMS" stop "$(basename "$vm")" --force >/dev/null 2>&1 || true
        done
        wait "$BG_PID" 2>/dev/null || true
    fi
    if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Every qvol command runs with this environment; the keystore is chosen per VM.
export QVOL_VM_ACCEL=tcg XDG_DATA_HOME=$WORK/xdg
unset QVOL_PASSPHRASE_FILE CREDENTIALS_DIRECTORY QVOL_TEST_WEAK_KDF
qv() { # qv KEYSTORE [PASSFILE] -- ARGS...
    local ks=$1 pass=$2
    shift 3
    if [ -n "$pass" ]; then
        QVOL_KEYSTORE=$ks QVOL_PASSPHRASE_FILE=$pass "$QVOL" "$@"
    else
        QVOL_KEYSTORE=$ks "$QVOL" "$@"
    fi
}

MARKER=QVOL-BOOT-BENCH-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
log "writing the test guest (initrd, 16 MiB ext4 root as qcow2) to $WORK/guest"
KERNEL=$(target/debug/guest-rootfs "$WORK/guest" "$MARKER")
INITRD=$WORK/guest/initrd.cpio
ROOT=$WORK/guest/root.qcow2

# VMs: name, keystore, passphrase file, label.
NAMES=(boot-qcow2 boot-qvol)
LABELS=("qcow2 (QEMU virtio-blk)" "qvol (vhost-qvol)")
KEYSTORES=("$WORK/ks" "$WORK/ks")
PASSFILES=("" "")
# (It warns that the seed is stored unencrypted: that is the point of this keystore.)
qv "$WORK/ks" "" -- keystore init --no-passphrase >/dev/null 2>&1
if [ "$PASSPHRASE" = 1 ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/passphrase"
    qv "$WORK/ks-pass" "$WORK/passphrase" -- keystore init --passphrase-file "$WORK/passphrase" >/dev/null
    NAMES+=(boot-qvol-pass)
    LABELS+=("qvol, passphrase keystore")
    KEYSTORES+=("$WORK/ks-pass")
    PASSFILES+=("$WORK/passphrase")
fi

for i in "${!NAMES[@]}"; do
    vm=${NAMES[$i]}
    qv "${KEYSTORES[$i]}" "${PASSFILES[$i]}" -- vm --vms-dir "$VMS" new "$vm" --no-encrypt \
        --cpus "$CPUS" --memory "$MEMORY" --disk-size 16M \
        --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE_BASE root=/dev/vda" >/dev/null
    cp "$ROOT" "$VMS/$vm/disk.qcow2"
    if [ "$vm" != boot-qcow2 ]; then
        log "qvol vm migrate $vm (qvol import of the qcow2 root, verified)"
        args=(vm --vms-dir "$VMS" migrate "$vm" --no-backup)
        [ -n "$CIPHER" ] && args+=(--cipher "$CIPHER")
        qv "${KEYSTORES[$i]}" "${PASSFILES[$i]}" -- "${args[@]}" >"$WORK/$vm.migrate.log" 2>&1 \
            || { cat "$WORK/$vm.migrate.log" >&2; die "migrating $vm failed"; }
        rm -f "$VMS/$vm/disk.qcow2"
    fi
done
SUITE=$(awk '/^ *algorithm:/ {print $2; exit}' "$VMS/boot-qvol/config.yaml")

# boot INDEX: sets B_MARK and B_EXIT (seconds from the start command to the marker, and
# to `qvol vm start --wait` returning after the guest powered off) and B_UPTIME (the guest
# kernel's clock at "reboot: Power down"); exits on a failure.
boot() {
    local i=$1 vm=${NAMES[$1]} run t0 t1='' now pid stopped=0
    run=$VMS/$vm/run
    rm -f "$run/serial.log"
    t0=$EPOCHREALTIME
    qv "${KEYSTORES[$i]}" "${PASSFILES[$i]}" -- vm --vms-dir "$VMS" start "$vm" --wait \
        >"$WORK/$vm.start.log" 2>&1 &
    BG_PID=$!
    while :; do
        if [ -z "$t1" ] && [ -f "$run/serial.log" ] && grep -qF "$MARKER" "$run/serial.log"; then
            t1=$EPOCHREALTIME
        fi
        if [ ! -f "$WORK/$vm.qemu-argv" ] && [ -s "$run/qemu.pid" ]; then
            pid=$(cat "$run/qemu.pid")
            tr '\0' '\n' <"/proc/$pid/cmdline" >"$WORK/$vm.qemu-argv" 2>/dev/null || true
        fi
        kill -0 "$BG_PID" 2>/dev/null || break
        now=$EPOCHREALTIME
        if [ "$stopped" = 0 ] && awk -v a="$t0" -v b="$now" -v t="$TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
            stopped=1
            log "$vm: no marker within $TIMEOUT s; stopping it"
            qv "${KEYSTORES[$i]}" "${PASSFILES[$i]}" -- vm --vms-dir "$VMS" stop "$vm" --force >&2 || true
        fi
        sleep 0.02
    done
    local status=0
    wait "$BG_PID" || status=$?
    BG_PID=
    now=$EPOCHREALTIME
    if [ -z "$t1" ] || [ "$status" != 0 ]; then
        log "$vm: boot failed (qvol exit $status, marker ${t1:+seen}${t1:-not seen})"
        sed 's/^/  start: /' "$WORK/$vm.start.log" >&2
        [ -f "$run/serial.log" ] && tail -n 20 "$run/serial.log" | sed 's/^/  console: /' >&2
        [ -f "$run/qemu.log" ] && sed 's/^/  qemu: /' "$run/qemu.log" >&2
        exit 1
    fi
    B_MARK=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    B_EXIT=$(awk -v a="$t0" -v c="$now" 'BEGIN { printf "%.3f", c - a }')
    B_UPTIME=$(sed -n 's/^\[ *\([0-9.]*\)\] reboot: Power down.*/\1/p' "$run/serial.log" | head -n1)
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "warm-up: one untimed boot per VM"
for i in "${!NAMES[@]}"; do boot "$i"; done

declare -A MARK=() EXIT=() UPTIME=()
for ((r = 1; r <= RUNS; r++)); do
    order=("${!NAMES[@]}")
    if ((r % 2 == 0)); then
        order=()
        for ((j = ${#NAMES[@]} - 1; j >= 0; j--)); do order+=("$j"); done
    fi
    for i in "${order[@]}"; do
        boot "$i"
        MARK[$i]+="$B_MARK "
        EXIT[$i]+="$B_EXIT "
        UPTIME[$i]+="${B_UPTIME:-0} "
        log "run $r/$RUNS ${NAMES[$i]}: marker after $B_MARK s, qvol vm start returned after $B_EXIT s"
    done
done

# stats "v1 v2 ..." -> "min median max"
stats() {
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '
        { v[NR] = $1 }
        END {
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.2f %.2f %.2f\n", v[1], med, v[NR]
        }'
}

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
qemu_version=$(qemu-system-x86_64 --version | head -n1)
guest_kernel=$(cat .cache/guest/kernel-version)
root_size=$(du -k --apparent-size "$ROOT" | cut -f1)
qvol_size=$(du -k "$VMS/boot-qvol/disk.qvol" | cut -f1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

mkdir -p target/bench
{
    echo "VM boot time, \`qvol vm start\` to the guest userspace marker (TCG, $CPUS vCPU, $MEMORY MiB), $RUNS runs per backend"
    echo
    echo "| backend | runs | min s | median s | max s | median to power-off s | median guest clock at power-off s |"
    echo "|---|---|---|---|---|---|---|"
    diffs=
    for i in "${!NAMES[@]}"; do
        read -r mn md mx < <(stats "${MARK[$i]}")
        read -r _ emd _ < <(stats "${EXIT[$i]}")
        read -r _ umd _ < <(stats "${UPTIME[$i]}")
        label=${LABELS[$i]}
        [ "$i" -gt 0 ] && label="$label, $SUITE"
        echo "| $label | $RUNS | $mn | $md | $mx | $emd | $umd |"
        if [ "$i" -eq 0 ]; then
            base_med=$md base_spread=$(awk -v lo="$mn" -v hi="$mx" 'BEGIN { printf "%.2f", hi - lo }')
        else
            diffs+=$(awk -v a="$base_med" -v b="$md" -v l="${LABELS[$i]}" 'BEGIN {
                printf "\n- %s minus qcow2, medians: %+.2f s (%+.1f %%)", l, b - a, 100 * (b - a) / a }')
        fi
    done
    echo "$diffs"
    echo "- spread of the qcow2 runs themselves (max - min): $base_spread s"
    echo
    echo "- machine: $cpu, $(nproc) CPUs, Linux $(uname -r), $qemu_version; load average before/after the boots: $LOAD_BEFORE / $LOAD_AFTER (a TCG boot keeps one CPU busy: anything else running shows in the spread)"
    echo "- guest: Debian kernel $guest_kernel (.cache/guest), initramfs and root from integration/src/rootfs.rs (16 MiB ext4, busybox; ${root_size} KiB as qcow2, ${qvol_size} KiB as qvol)"
    echo "- kernel command line: $CMDLINE_BASE root=/dev/vda; qvol $commit"
    echo "- QEMU disk arguments: qcow2: $(grep -E '^(driver=qcow2|virtio-blk-pci)' "$WORK/boot-qcow2.qemu-argv" | paste -sd' ' | sed "s|$WORK/|WORK/|g")"
    echo "  qvol: $(grep -E '^(socket,id=chr|vhost-user-blk-pci)' "$WORK/boot-qvol.qemu-argv" | paste -sd' ' | sed "s|$WORK/|WORK/|g")"
} | tee target/bench/boot.md
