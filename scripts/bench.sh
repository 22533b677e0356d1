#!/usr/bin/env bash
# End-to-end comparison (issue 6): qemu-storage-daemon raw and LUKS against vhost-qvol
# (xchacha20-poly1305, aegis-256), all through one libblkio client. Writes
# target/bench/compare.md and target/bench/compare.json and prints the table.
#
#   scripts/bench.sh            # full run (5 s per workload, 1 GiB images, 1 and N queues)
#   scripts/bench.sh --quick    # under two minutes
#   scripts/bench.sh --help     # every option (also settable as QVOL_BENCH_* variables)
#   scripts/bench.sh --sustained --size-mib 2048 --queues 1
#                               # adds sustained-write-1M-qd8 (issue 15): 60 s of sequential
#                               # 1 MiB QD8 writes (--sustained-seconds), with p99, p99.9 and
#                               # max latency, against qsd LUKS and the disk's own fdatasync
#                               # bandwidth (measured before and after the backends, --sync-mib);
#                               # not part of the default run or of --quick
#   QVOL_WRITEBACK_MIB=0 scripts/bench.sh ...
#                               # vhost-qvol inherits the environment: this turns its early
#                               # writeback off (default: a kick every 32 MiB written); the
#                               # value is printed with the figures
#   QVOL_BENCH_POLL_US=50 scripts/bench.sh ...
#                               # runs vhost-qvol with --poll-us 50 (queue polling)
#   scripts/bench.sh --rbd [--quick ...]
#                               # the same comparison with every image in Ceph RBD (issue 17):
#                               # qemu-storage-daemon with QEMU's rbd driver (raw, and LUKS on
#                               # top) against vhost-qvol on rbd:, on a throwaway single-node
#                               # cluster (scripts/ceph-cluster.sh; needs ceph-mon, ceph-osd,
#                               # ceph-common and qemu-block-extra), or on the cluster of
#                               # $CEPH_CONF if QVOL_BENCH_CEPH_CONF=existing;
#                               # QVOL_BENCH_RBD_CACHE=off runs qsd's rbd driver with librbd's
#                               # cache off (cache.direct=on), the guarantee qvol gives
#   scripts/bench.sh --compress [--quick ...]
#                               # compression (issue 16): vhost-qvol on plain volumes and on
#                               # `qvol create --compress zstd` ones (xchacha, xchacha-zstd,
#                               # aegis, aegis-zstd) with compressible data (--data text: log
#                               # lines, 2 blocks per 16 KiB unit), 1 queue; a table of each
#                               # compressed backend beside its plain twin (zstd / plain, CPU
#                               # per GB), the images' host bytes after the prefill and after
#                               # the workloads, and issue 16's goals. Random reads run before
#                               # random writes, so that they read the units the sequential
#                               # writes stored (what 4 KiB writes leave depends on the engine:
#                               # plain blocks, or units rewritten by read-modify-write).
#                               # --data random shows what incompressible data costs;
#                               # --compress zstd:1 / --compress-unit 32K change the volumes;
#                               # QVOL_BENCH_* variables or options override every default
#                               # here. The guest-filesystem figures: scripts/bench-compress.sh
#   scripts/bench.sh --reencrypt [--size-mib 1024] [--rates 0,32,64] [--suites xchacha,aegis]
#                               # re-encryption (issue 13): `qvol reencrypt` of a filled image
#                               # offline, then served, with a libblkio client's 4 KiB QD1
#                               # read and write latency before and during (benches/src/bin/
#                               # reencrypt.rs; --help for its options)
#
# Needs qemu-storage-daemon and qemu-img (Debian: apt-get install qemu-system-common qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in qemu-storage-daemon qemu-img; do
    if ! command -v "$tool" >/dev/null; then
        echo "bench.sh: $tool is not installed; install it with" \
             "\`apt-get install qemu-system-common qemu-utils\` (Debian/Ubuntu)" >&2
        exit 1
    fi
done

if [[ "${1:-}" == "--reencrypt" ]]; then
    shift
    echo "== cargo build --release (vhost-qvol, qvol, reencrypt)" >&2
    cargo build --release --locked -p vhost-qvol --bins >&2
    cargo build --release --locked -p benches --bin reencrypt >&2
    exec target/release/reencrypt "$@"
fi

if [[ "${1:-}" == "--compress" ]]; then
    shift
    # Defaults of the compression run; an option on the command line wins over these.
    export QVOL_BENCH_BACKENDS=${QVOL_BENCH_BACKENDS:-xchacha,xchacha-zstd,aegis,aegis-zstd}
    export QVOL_BENCH_DATA=${QVOL_BENCH_DATA:-text}
    export QVOL_BENCH_QUEUES=${QVOL_BENCH_QUEUES:-1}
    export QVOL_BENCH_SYNC_MIB=${QVOL_BENCH_SYNC_MIB:-0}
    export QVOL_BENCH_WORKLOADS=${QVOL_BENCH_WORKLOADS:-seq-write-1M-qd8,seq-read-1M-qd8,rand-read-4K-qd32,lat-read-4K-qd1,rand-write-4K-qd32,lat-write-4K-qd1}
fi

rbd=0
if [[ "${1:-}" == "--rbd" ]]; then
    shift
    rbd=1
fi

echo "== cargo build --release (vhost-qvol, qvol, compare)" >&2
cargo build --release --locked -p vhost-qvol --bins >&2 || \
    echo "bench.sh: vhost-qvol did not build; its rows will be skipped" >&2
cargo build --release --locked -p benches --bin compare >&2
if [[ $rbd == 0 ]]; then
    exec target/release/compare "$@"
fi
if [[ "${QVOL_BENCH_CEPH_CONF:-}" != existing ]]; then
    cluster=$(mktemp -d /tmp/qvol-bench-ceph.XXXXXX)
    trap 'scripts/ceph-cluster.sh stop "$cluster"; rm -rf "$cluster"' EXIT
    scripts/ceph-cluster.sh start "$cluster" >/dev/null
    export CEPH_CONF=$cluster/ceph.conf
fi
target/release/compare --backends rbd-raw,rbd-luks,rbd-xchacha,rbd-aegis "$@"
