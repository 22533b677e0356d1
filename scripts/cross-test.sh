#!/usr/bin/env bash
# Builds qvol-core's cipher-suite tests for aarch64-unknown-linux-gnu and runs them under
# qemu-user (`-cpu max` emulates the ARMv8 AES/PMULL crypto extensions, so libaegis takes
# its ARMv8 AES path and ring its NEON path). Proves the aarch64 code paths build and give
# the same bytes as the references and the specs' test vectors; emulated speed means nothing.
#
# Installs what it needs when missing: the rustup target, the cross linker and libc
# (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross) and qemu-user-static.
# Usage: scripts/cross-test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu

if ! rustup target list --installed | grep -qx "$TARGET"; then
    echo "== rustup target add $TARGET"
    rustup target add "$TARGET"
fi

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/include/stdio.h ] || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -cpu max -L /usr/aarch64-linux-gnu"

echo "== cargo test -p qvol-core --target $TARGET (suite tests, under qemu-user)"
cargo test -p qvol-core --target "$TARGET" --locked --lib "$@" -- suite::
cargo test -p qvol-core --target "$TARGET" --locked --test suite_equivalence --test suite_alloc "$@" -- --nocapture
