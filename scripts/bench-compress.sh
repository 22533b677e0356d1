#!/usr/bin/env bash
# Compression on a guest's filesystem (issue 16): how much host space a qvol volume with
# `--compress zstd` saves against a plain one when a guest under QEMU (TCG) writes a
# filesystem full of real files, how long the guest takes, and the daemon's CPU per GB.
#
#   scripts/bench-compress.sh                  # /usr/share, 2 runs, cp and dd, import
#                                              # (about 8.5 minutes on a 2-core host)
#   scripts/bench-compress.sh --runs 3 --source /usr/share --source /usr/bin
#   scripts/bench-compress.sh --help           # every option
#
# What it does:
#   1. `mkfs.ext4 -d` builds a source filesystem image (SRC.img) of the --source
#      directories (default /usr/share: man pages, locale data, icons, docs), sized to fit.
#      `compress_units SRC.img --units N` gives the codec's best case for it: every aligned
#      unit holding data packed as if written whole.
#   2. For each run and each volume (a plain qvol image and a `qvol create --compress` one,
#      the order flipping every run), vhost-qvol serves the volume and a TCG guest
#      (scripts/guest/run-guest.sh: the Debian kernel of scripts/setup.sh, the host root
#      over 9p for tools) gets it as a vhost-user-blk disk, and SRC.img as a read-only
#      virtio disk, and
#        cp: makes an ext4 filesystem on the qvol disk (the host's mkfs.ext4 defaults),
#            mounts it (noinit_itable: no background inode-table zeroing during the copy)
#            and copies every file with `cp -a`, then `sync`: the guest's page cache and
#            writeback decide the requests, as for any guest writing files;
#        dd: copies SRC.img block for block (`dd bs=1M oflag=direct conv=sparse`: MiBs of
#            zeros are skipped, as `qvol import` skips holes).
#      The guest then checks what it reads back (cp: `diff -r` after a remount with the
#      caches dropped; dd: `cmp` of the two disks) unless --no-verify.
#   3. With the daemon stopped: the image file's host bytes (`st_blocks` * 512) and
#      `qvol info --json` (allocated bytes, compression ratio and usage). The daemon's CPU
#      time (user + system, /proc) up to the end of the copy per GB the guest wrote to the
#      disk (its /sys/block stat, which also gives the mean request size), and after it
#      (the check's reads) per GB of the filesystem.
#   4. `qvol import --format raw SRC.img` into a plain and a compressed volume (verified
#      byte for byte by import itself): time and space.
# The table goes to target/bench/compress.md (and stdout); raw figures to compress.tsv.
#
# Needs what the guest tests need (scripts/setup.sh: qemu-system-x86, the guest kernel in
# .cache/guest, busybox-static, cpio) and mkfs.ext4 (e2fsprogs, 1.47 for `-d`).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${QVOL_BENCH_COMPRESS_RUNS:-2}
SOURCES=()
FS_MIB=
DISK_MIB=
CIPHER=xchacha20-poly1305
COMPRESS=zstd
UNIT=16K
MODES=cp,dd
IMPORT=1
VERIFY=1
KEEP=0
TIMEOUT=900
MEMORY=1G
WORK=
MKFS_OPTS=

usage() {
    cat <<EOF
usage: scripts/bench-compress.sh [--source DIR]... [--runs N] [--fs-mib N] [--disk-mib N]
                                 [--cipher SUITE] [--compress zstd[:LEVEL]] [--unit SIZE]
                                 [--modes cp,dd] [--no-import] [--no-verify] [--keep]
                                 [--work DIR] [--timeout SECS] [--memory SIZE]
                                 [--mkfs-opts OPTS]
  --source DIR     a directory to put in the source filesystem (repeatable; default
                   /usr/share)
  --runs N         guest copies per volume and mode, alternating (default $RUNS)
  --fs-mib N       size of the source filesystem (default: what the files take × 1.25
                   + 64 MiB)
  --disk-mib N     size of the qvol disks (default: the source filesystem + 25 %)
  --cipher SUITE   the volumes' cipher suite (default $CIPHER)
  --compress SPEC  qvol create --compress of the compressed volume (default $COMPRESS)
  --unit SIZE      qvol create --compress-unit (default $UNIT)
  --modes LIST     cp (mkfs + cp -a in the guest), dd (block copy), or both (default)
  --no-import      skip the qvol import of the source image
  --no-verify      skip the guest's read-back check
  --keep           keep the work directory
  --work DIR       work directory (default: a new one under target/bench)
  --timeout SECS   give up on a guest after SECS (default $TIMEOUT)
  --memory SIZE    guest memory (default $MEMORY)
  --mkfs-opts OPTS more mkfs.ext4 options for the guest's filesystem (cp mode), e.g.
                   "-E stride=4,stripe_width=4" to align ext4's allocations to 16 KiB units
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCES+=("$2"); shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --fs-mib) FS_MIB=$2; shift 2 ;;
        --disk-mib) DISK_MIB=$2; shift 2 ;;
        --cipher) CIPHER=$2; shift 2 ;;
        --compress) COMPRESS=$2; shift 2 ;;
        --unit) UNIT=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --no-import) IMPORT=0; shift ;;
        --no-verify) VERIFY=0; shift ;;
        --keep) KEEP=1; shift ;;
        --work) WORK=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --memory) MEMORY=$2; shift 2 ;;
        --mkfs-opts) MKFS_OPTS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench-compress.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ ${#SOURCES[@]} -gt 0 ] || SOURCES=(/usr/share)
for n in "$RUNS" "$TIMEOUT" ${FS_MIB:+"$FS_MIB"} ${DISK_MIB:+"$DISK_MIB"}; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-compress.sh: $n is not a positive number" >&2; exit 2; }
done
IFS=, read -r -a modes <<<"$MODES"
for m in "${modes[@]}"; do
    [[ "$m" == cp || "$m" == dd ]] || { echo "bench-compress.sh: unknown mode $m (cp, dd)" >&2; exit 2; }
done

log() { printf 'bench-compress: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

for tool in qemu-system-x86_64 mkfs.ext4 cpio; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] \
        || die "$tool is not installed; run scripts/setup.sh"
done
[ -f .cache/guest/vmlinuz ] || die "no guest kernel in .cache/guest; run scripts/setup.sh"
[ -x /bin/busybox ] || die "/bin/busybox (busybox-static) is missing; run scripts/setup.sh"
for s in "${SOURCES[@]}"; do [ -d "$s" ] || die "--source $s is not a directory"; done

log "cargo build --release (qvol, vhost-qvol, compress_units)"
cargo build --release --locked -p vhost-qvol --bins >&2
cargo build --release --locked -p benches --bin compress_units >&2
bin=$PWD/target/release

if [ -z "$WORK" ]; then
    mkdir -p target/bench
    WORK=$(mktemp -d "$PWD/target/bench/compress.XXXXXX")
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
daemon=
cleanup() {
    if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
export QVOL_KEYSTORE=$WORK/keystore
"$bin/qvol" keystore init --no-passphrase >/dev/null 2>&1
key=$("$bin/qvol" key new bench-compress 2>/dev/null | tail -n1)

# 1. The source filesystem.
src=$WORK/src.img
files_kib=$(du -skc "${SOURCES[@]}" | tail -n1 | cut -f1)
files_apparent_kib=$(du -skc --apparent-size "${SOURCES[@]}" | tail -n1 | cut -f1)
nfiles=$(find "${SOURCES[@]}" -xdev -type f | wc -l)
# Inodes for every entry, with room (the guest's filesystem gets as many).
inodes=$(( $(find "${SOURCES[@]}" -xdev | wc -l) * 3 / 2 + 4096 ))
[ -n "$FS_MIB" ] || FS_MIB=$(( files_kib * 5 / 4 / 1024 + 64 ))
[ -n "$DISK_MIB" ] || DISK_MIB=$(( FS_MIB * 5 / 4 ))
[ "$DISK_MIB" != "$FS_MIB" ] || DISK_MIB=$((DISK_MIB + 1))
stage=$WORK/stage
mkdir -p "$stage"
if [ ${#SOURCES[@]} -eq 1 ]; then
    tree=${SOURCES[0]}
else
    # Several directories: one tree of hard links (same filesystem) or copies.
    tree=$stage
    for s in "${SOURCES[@]}"; do
        mkdir -p "$stage$(dirname "$s")"
        cp -al "$s" "$stage$s" 2>/dev/null || cp -a "$s" "$stage$s"
    done
fi
log "source: ${SOURCES[*]}: $nfiles files, $((files_apparent_kib / 1024)) MiB apparent, $((files_kib / 1024)) MiB on disk; building a ${FS_MIB} MiB ext4 image"
mkfs.ext4 -q -F -L qvolsrc -b 4096 -N "$inodes" -d "$tree" "$src" "${FS_MIB}M"
rm -rf "$stage"
src_used_kib=$(dumpe2fs -h "$src" 2>/dev/null | awk -F: '
    /^Block count/ {bc=$2} /^Free blocks/ {fb=$2} /^Block size/ {bs=$2}
    END {printf "%d", (bc - fb) * bs / 1024}')
src_alloc=$(( $(stat -c %b "$src") * $(stat -c %B "$src") ))
log "source image: ${FS_MIB} MiB, $((src_used_kib / 1024)) MiB in use by ext4, $((src_alloc >> 20)) MiB allocated on the host"

level=3
case "$COMPRESS" in zstd:*) level=${COMPRESS#zstd:} ;; esac
unit_blocks=$(( ${UNIT%K} / 4 ))
log "compress_units $src --units $unit_blocks --level $level"
units_table=$("$bin/compress_units" "$src" --units "$unit_blocks" --level "$level" | tail -n3)
echo "$units_table" >&2

# One volume: create, serve, boot the guest with `mode`, stop, measure.
# Appends a line to $WORK/results.tsv.
printf 'mode\tvolume\trun\tcopy_s\tboot_s\tguest_written_mib\tfs_used_mib\tdaemon_cpu_s\thost_alloc\tfile_bytes\tqvol_alloc\tratio\tunit_lbns\tunit_blocks\tplain_blocks\tverify\twrite_ios\tverify_s\tdaemon_read_cpu_s\n' >"$WORK/results.tsv"
json_num() { sed -n "s/^ *\"$1\": *\\([0-9.e+-]*\\).*/\\1/p" | head -n1; }

measure_image() { # IMAGE -> "host_alloc file_bytes qvol_alloc ratio unit_lbns unit_blocks plain_blocks"
    local img=$1 info
    info=$("$bin/qvol" info --json "$img" 2>/dev/null)
    printf '%s %s %s %s %s %s %s' \
        $(( $(stat -c %b "$img") * $(stat -c %B "$img") )) "$(stat -c %s "$img")" \
        "$(json_num allocated_bytes <<<"$info")" "$(json_num compression_ratio <<<"$info")" \
        "$(json_num unit_lbns <<<"$info")" "$(json_num unit_blocks <<<"$info")" \
        "$(json_num plain_blocks <<<"$info")"
}

src_sectors=$(( FS_MIB * 2048 ))
dst_sectors=$(( DISK_MIB * 2048 ))
guest_script() { # MODE -> the guest's script on stdout
    cat <<GUEST
dev_of() { for d in /sys/block/vd*; do [ "\$(cat \$d/size)" = "\$1" ] && { echo /dev/\${d##*/}; return 0; }; done; return 1; }
written() { set -- \$(cat /sys/block/\${1#/dev/}/stat); echo \$7; }
write_ios() { set -- \$(cat /sys/block/\${1#/dev/}/stat); echo \$5; }
now() { date +%s.%N; }
src=\$(dev_of $src_sectors)
dst=\$(dev_of $dst_sectors)
echo "QVOL-BENCH src=\$src dst=\$dst scheduler=\$(cat /sys/block/\${dst#/dev/}/queue/scheduler)"
mkdir -p /run/qvol/src /run/qvol/dst
GUEST
    case "$1" in
        cp) cat <<GUEST
mkfs.ext4 -q -F -N $inodes $MKFS_OPTS \$dst
mount -t ext4 -o ro,noload \$src /run/qvol/src
mount -t ext4 -o noinit_itable \$dst /run/qvol/dst
w0=\$(written \$dst); i0=\$(write_ios \$dst); t0=\$(now)
cp -a /run/qvol/src/. /run/qvol/dst/
sync
t1=\$(now); w1=\$(written \$dst); i1=\$(write_ios \$dst)
echo "QVOL-BENCH copy_s=\$(echo "\$t1 \$t0" | awk '{printf "%.2f", \$1 - \$2}')"
echo "QVOL-BENCH written_mib=\$(( (w1 - w0) / 2048 )) total_written_mib=\$(( w1 / 2048 ))"
echo "QVOL-BENCH write_ios=\$(( i1 - i0 ))"
echo "QVOL-BENCH fs_used_mib=\$(df -m /run/qvol/dst | awk 'NR==2 {print \$3}')"
umount /run/qvol/dst
GUEST
            if [ "$VERIFY" = 1 ]; then cat <<GUEST
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro,noload \$dst /run/qvol/dst
t0=\$(now)
if diff -r --no-dereference /run/qvol/src /run/qvol/dst >/run/qvol/diff.txt 2>&1; then
    echo "QVOL-BENCH verify=ok"
else
    echo "QVOL-BENCH verify=FAILED"; head -n 20 /run/qvol/diff.txt
fi
echo "QVOL-BENCH verify_s=\$(echo "\$(now) \$t0" | awk '{printf "%.2f", \$1 - \$2}')"
umount /run/qvol/dst
GUEST
            fi ;;
        dd) cat <<GUEST
w0=\$(written \$dst); i0=\$(write_ios \$dst); t0=\$(now)
dd if=\$src of=\$dst bs=1M count=$FS_MIB oflag=direct conv=sparse,fsync status=none
t1=\$(now); w1=\$(written \$dst); i1=\$(write_ios \$dst)
echo "QVOL-BENCH copy_s=\$(echo "\$t1 \$t0" | awk '{printf "%.2f", \$1 - \$2}')"
echo "QVOL-BENCH written_mib=\$(( (w1 - w0) / 2048 )) total_written_mib=\$(( w1 / 2048 ))"
echo "QVOL-BENCH write_ios=\$(( i1 - i0 ))"
echo "QVOL-BENCH fs_used_mib=$((src_used_kib / 1024))"
GUEST
            if [ "$VERIFY" = 1 ]; then cat <<GUEST
echo 3 > /proc/sys/vm/drop_caches
t0=\$(now)
if cmp -n $((FS_MIB << 20)) \$src \$dst; then echo "QVOL-BENCH verify=ok"; else echo "QVOL-BENCH verify=FAILED"; fi
echo "QVOL-BENCH verify_s=\$(echo "\$(now) \$t0" | awk '{printf "%.2f", \$1 - \$2}')"
GUEST
            fi ;;
    esac
    [ "$1" != cp ] || echo 'umount /run/qvol/src'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

one() { # MODE VOLUME RUN
    local mode=$1 vol=$2 run=$3 img=$WORK/$2-$1.qvol sock=$WORK/vq.sock console=$WORK/console-$1-$2-$3.log
    rm -f "$img" "$sock"
    local args=(create "$img" --size "${DISK_MIB}M" --key "$key" --cipher "$CIPHER")
    [ "$vol" = plain ] || args+=(--compress "$COMPRESS" --compress-unit "$UNIT")
    "$bin/qvol" "${args[@]}" >/dev/null 2>&1 || die "qvol ${args[*]} failed"
    local vid
    vid=$("$bin/qvol" info --json "$img" 2>/dev/null | sed -n 's/^ *"volume_id": *"\([0-9a-f]*\)".*/\1/p')
    "$bin/vhost-qvol" --socket-path "$sock" --blk-file "$img" --volume-id "$vid" \
        --num-queues 1 >"$WORK/vhost-qvol-$mode-$vol-$run.log" 2>&1 &
    daemon=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    [ -S "$sock" ] || die "vhost-qvol did not listen: $(tail -n5 "$WORK/vhost-qvol-$mode-$vol-$run.log")"
    guest_script "$mode" >"$WORK/guest-$mode.sh"
    local t0 t1 rc=0 cpu0 cpu1 cpu_copied='' guest
    cpu0=$(cpu_ticks "$daemon")
    t0=$(date +%s.%N)
    QVOL_GUEST_MEM=$MEMORY \
    QVOL_GUEST_QEMU_ARGS="-drive file=$src,format=raw,if=none,id=src,readonly=on -device virtio-blk-pci,drive=src" \
        scripts/guest/run-guest.sh "$sock" "$WORK/guest-$mode.sh" "$console" "$TIMEOUT" 1 &
    guest=$!
    # The daemon's CPU when the copy is done (the console says so), apart from the read-back.
    while kill -0 "$guest" 2>/dev/null; do
        if [ -z "$cpu_copied" ] && grep -q '^QVOL-BENCH copy_s=' "$console" 2>/dev/null; then
            cpu_copied=$(cpu_ticks "$daemon")
        fi
        sleep 0.2
    done
    wait "$guest" || rc=$?
    t1=$(date +%s.%N)
    cpu1=$(cpu_ticks "$daemon")
    [ -n "$cpu_copied" ] || cpu_copied=$cpu1
    kill -TERM "$daemon"
    wait "$daemon" || log "vhost-qvol exited with status $? ($mode $vol run $run)"
    daemon=
    if [ "$rc" != 0 ] || grep -qE 'I/O error|EXT4-fs error|blk_update_request' "$console"; then
        log "the guest failed ($mode $vol run $run, status $rc); console $console:"
        grep -vE '^\[' "$console" | tail -n 30 >&2
        KEEP=1
        die "stopping"
    fi
    local copy written used verify ios vs
    copy=$(sed -n 's/^QVOL-BENCH copy_s=\([0-9.]*\).*/\1/p' "$console")
    written=$(sed -n 's/^QVOL-BENCH written_mib=\([0-9]*\).*/\1/p' "$console")
    used=$(sed -n 's/^QVOL-BENCH fs_used_mib=\([0-9]*\).*/\1/p' "$console")
    verify=$(sed -n 's/^QVOL-BENCH verify=\([A-Za-z]*\).*/\1/p' "$console")
    ios=$(sed -n 's/^QVOL-BENCH write_ios=\([0-9]*\).*/\1/p' "$console")
    vs=$(sed -n 's/^QVOL-BENCH verify_s=\([0-9.]*\).*/\1/p' "$console")
    [ "$verify" != FAILED ] || { log "READ-BACK CHECK FAILED ($mode $vol run $run): $console"; KEEP=1; }
    local space
    space=$(measure_image "$img")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$vol" "$run" "$copy" \
        "$(awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.1f", a - b}')" "$written" "$used" \
        "$(awk -v c="$((cpu_copied - cpu0))" -v t="$tck" 'BEGIN {printf "%.2f", c / t}')" \
        "$(tr ' ' '\t' <<<"$space")" "${verify:-skipped}" "$ios" "$vs" \
        "$(awk -v c="$((cpu1 - cpu_copied))" -v t="$tck" 'BEGIN {printf "%.2f", c / t}')" \
        >>"$WORK/results.tsv"
    log "$mode $vol run $run: copy ${copy} s, guest wrote ${written} MiB, host $(( $(cut -d' ' -f1 <<<"$space") >> 20 )) MiB, check ${verify:-skipped}"
    [ "$KEEP" = 1 ] || rm -f "$img"
}

log "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
    for mode in "${modes[@]}"; do
        if (( run % 2 )); then order=(plain zstd); else order=(zstd plain); fi
        for vol in "${order[@]}"; do one "$mode" "$vol" "$run"; done
    done
done
log "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

# 4. qvol import of the same image.
if [ "$IMPORT" = 1 ]; then
    for vol in plain zstd; do
        img=$WORK/$vol-import.qvol
        rm -f "$img"
        args=(import --format raw --key "$key" --cipher "$CIPHER")
        [ "$vol" = plain ] || args+=(--compress "$COMPRESS" --compress-unit "$UNIT")
        t0=$(date +%s.%N)
        "$bin/qvol" "${args[@]}" "$src" "$img" >"$WORK/import-$vol.log" 2>&1 \
            || { cat "$WORK/import-$vol.log" >&2; die "qvol import ($vol) failed"; }
        t1=$(date +%s.%N)
        space=$(measure_image "$img")
        printf 'import\t%s\t1\t%s\t\t\t%s\t\t%s\tverified\t\t\t\n' "$vol" \
            "$(awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.2f", a - b}')" "$((src_used_kib / 1024))" \
            "$(tr ' ' '\t' <<<"$space")" >>"$WORK/results.tsv"
        log "import $vol: $(awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.1f", a - b}') s, host $(( $(cut -d' ' -f1 <<<"$space") >> 20 )) MiB"
        [ "$KEEP" = 1 ] || rm -f "$img"
    done
fi

# The report.
out=target/bench/compress.md
mkdir -p target/bench
cp "$WORK/results.tsv" target/bench/compress.tsv
{
    echo "# Compression on a guest's filesystem ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Tree: $(git describe --always --dirty 2>/dev/null || echo unknown) (the binaries were built from it at the start)."
    echo
    echo "Source: ${SOURCES[*]} ($nfiles files, $((files_apparent_kib / 1024)) MiB apparent size) in a ${FS_MIB} MiB ext4 image (\`mkfs.ext4 -d\`, $((src_used_kib / 1024)) MiB in use); qvol disks of ${DISK_MIB} MiB, $CIPHER; compressed: \`--compress $COMPRESS --compress-unit $UNIT\`. Guest filesystem (cp): \`mkfs.ext4 -N $inodes${MKFS_OPTS:+ $MKFS_OPTS}\`. Guest: TCG, 1 vCPU, $MEMORY, one queue; kernel $(cat .cache/guest/kernel-version 2>/dev/null || echo '?'). Host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) at the end."
    echo
    echo "The codec's best case for this filesystem (\`compress_units SRC.img --units $unit_blocks --level $level\`: every aligned unit holding data packed as if written whole, blocks of zeros as holes):"
    echo
    echo "$units_table"
    echo
    echo "Host bytes = the image file's \`st_blocks\` × 512 after the daemon stopped; qvol allocated = \`qvol info --json\` allocated_bytes; units = logical blocks in compressed units / the blocks they take; saving = plain host bytes / compressed host bytes (mean of the runs). CPU = vhost-qvol's user + system seconds from the guest's start to the end of the copy, per GB the guest wrote to the disk (its /sys/block stat); read-back CPU = the daemon's seconds after the copy (the check's reads; cp: the filesystem's used bytes, dd: the image), per GB of the filesystem's used size."
    echo
    echo "| mode | volume | runs | copy s (each run) | read-back s (each run) | guest wrote MiB | mean write KiB | fs used MiB | host MiB | qvol allocated MiB | ratio | units (lbns / blocks) | plain blocks | daemon CPU s (copy) | CPU s/GB written | read-back CPU s/GB | check |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    awk -F'\t' 'NR > 1 {
        k = $1 "\t" $2; if (!(k in n)) order[++m] = k
        n[k]++; copy[k] = copy[k] (copy[k] == "" ? "" : ", ") $4; rb[k] = rb[k] (rb[k] == "" ? "" : ", ") $18
        w[k] += $6; ios[k] += $17; rcpu[k] += $19; used[k] = $7; cpu[k] += $8; host[k] += $9; qa[k] += $11; ratio[k] = $12
        ul[k] = $13; ub[k] = $14; pb[k] = $15; if (chk[k] != "FAILED") chk[k] = $16
    }
    END {
        for (i = 1; i <= m; i++) {
            k = order[i]; split(k, p, "\t"); c = n[k]
            cpugb = (w[k] > 0) ? sprintf("%.2f", cpu[k] / (w[k] * 1048576 / 1e9)) : "—"
            avg = (ios[k] > 0) ? sprintf("%.0f", w[k] * 1024 / ios[k]) : "—"
            rgb = (rcpu[k] > 0 && used[k] > 0) ? sprintf("%.2f", rcpu[k] / c / (used[k] * 1048576 / 1e9)) : "—"
            printf "| %s | %s | %d | %s | %s | %s | %s | %s | %.1f | %.1f | %s | %s / %s | %s | %s | %s | %s | %s |\n", p[1], p[2], c, copy[k], (rb[k] ~ /[0-9]/ ? rb[k] : "—"), (w[k] > 0 ? sprintf("%.0f", w[k] / c) : "—"), avg, used[k], host[k] / c / 1048576, qa[k] / c / 1048576, (ratio[k] == "" ? "—" : sprintf("%.2f", ratio[k])), (ul[k] == "" ? "—" : ul[k]), (ub[k] == "" ? "—" : ub[k]), (pb[k] == "" ? "—" : pb[k]), (cpu[k] > 0 ? sprintf("%.1f", cpu[k] / c) : "—"), cpugb, rgb, chk[k]
        }
        print ""
        for (i = 1; i <= m; i++) {
            k = order[i]; split(k, p, "\t")
            if (p[2] != "zstd") continue
            pk = p[1] "\tplain"
            if (!(pk in n)) continue
            printf "- %s: %.2f× less host space compressed (%.1f → %.1f MiB); qvol allocated %.2f×\n", p[1], (host[pk] / n[pk]) / (host[k] / n[k]), host[pk] / n[pk] / 1048576, host[k] / n[k] / 1048576, (qa[pk] / n[pk]) / (qa[k] / n[k])
        }
    }' "$WORK/results.tsv"
    echo
    echo "Raw figures: target/bench/compress.tsv. Reproduce: \`scripts/bench-compress.sh --runs $RUNS --modes $MODES${FS_MIB:+ --fs-mib $FS_MIB} --disk-mib $DISK_MIB${MKFS_OPTS:+ --mkfs-opts \"$MKFS_OPTS\"}$(for s in "${SOURCES[@]}"; do printf ' --source %s' "$s"; done)\`."
} >"$out"
cat "$out"
