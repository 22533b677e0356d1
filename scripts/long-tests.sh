#!/usr/bin/env bash
# The long runs kept out of the default suite (scripts/test.sh): the crash-model property test
# (writes, flushes, discards, commits, snapshot create/delete/revert, send/recv, re-encryption,
# resize, power losses and kill -9) with 10,000 cases in release mode (QVOL_MODEL_CASES
# overrides), the concurrent crash test (writers, flushes and pipelined commits, power loss and
# kill -9) with 2,000 crashes (QVOL_CRASH_ITERS overrides), then the re-encryption crash test
# with every power-loss seed.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${QVOL_MODEL_CASES:-10000}"
echo "== qvol-core model test, $cases cases (release)"
QVOL_MODEL_CASES="$cases" cargo test --release --locked -p qvol-core --test model
crashes="${QVOL_CRASH_ITERS:-2000}"
echo "== qvol-core concurrent crash test, $crashes crashes (release)"
QVOL_CRASH_ITERS="$crashes" cargo test --release --locked -p qvol-core --lib concurrent_crash
echo "== qvol-core re-encryption crash test, every power-loss seed (release)"
QVOL_REENCRYPT_CRASH_ALL=1 cargo test --release --locked -p qvol-core --test reencrypt_crash
