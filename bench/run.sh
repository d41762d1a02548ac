#!/bin/sh
# soclink benchmark: builds the release binary, then runs every scenario.
# Usage: bench/run.sh [--size 256MiB] [--runs 3] [--only spool,e2e,rsyslog,compress] ...
# (all options: bench/run.sh --help)
set -eu
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
if [ -z "${SOCLINK_BIN:-}" ]; then
    cargo build --release --quiet
    SOCLINK_BIN="$target/release/soclink"
fi
export BENCH_CMD="bench/run.sh $*"
exec python3 bench/bench.py --soclink "$SOCLINK_BIN" "$@"
