#!/usr/bin/env bash
# The long runs kept out of the default suite (scripts/test.sh): the crash-model property test
# (writes, flushes, discards, commits, snapshot create/delete/revert, power losses and kill -9)
# with 10,000 cases in release mode (about 6 minutes on 2 cores, 1.5 of them building).
# QVOL_MODEL_CASES overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${QVOL_MODEL_CASES:-10000}"
echo "== qvol-core model test, $cases cases (release)"
QVOL_MODEL_CASES="$cases" cargo test --release --locked -p qvol-core --test model
