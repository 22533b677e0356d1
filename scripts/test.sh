#!/usr/bin/env bash
# The whole test suite (README command 2; .ci/run execs it): installs what the tests need
# (scripts/setup.sh: QEMU, busybox, the guest kernel, Ceph's monitor and OSD for the rbd_*
# tests, ...), builds the binaries the end-to-end tests drive, then runs every test, the QEMU
# guest tests included (integration/tests/guest_*, rbd_guest).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "== installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
echo "== cargo build --bins"
cargo build --workspace --bins --locked
# The end-to-end tests use these binaries as they are instead of each test process running
# cargo build again (integration/src/bins.rs).
export QVOL_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
echo "== cargo nextest run"
cargo nextest run --workspace --locked --no-tests=pass
# The cipher suites on aarch64, under qemu-user (the ARMv8 crypto paths of docs/SECURITY.md, "Decisions").
echo "== scripts/cross-test.sh"
./scripts/cross-test.sh
