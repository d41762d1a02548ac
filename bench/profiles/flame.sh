#!/bin/sh
# Flamegraph (SVG), folded stacks and cost shares of each perf.data that bench/profile.py
# --perf wrote. Needs inferno on PATH (`cargo install inferno`, a tool, not a dependency).
# Usage: bench/profiles/flame.sh BINARY OUT_DIR FILE.perf.data...
set -eu
here="$(dirname "$0")"
bin="$1"; out="$2"; shift 2
mkdir -p "$out"
for data in "$@"; do
    name="$(basename "$data" .perf.data)"
    perf script -i "$data" 2>/dev/null | python3 "$here/symbolize.py" "$bin" \
        | inferno-collapse-perf > "$out/$name.folded"
    inferno-flamegraph --title "$name" --width 1600 < "$out/$name.folded" > "$out/$name.svg"
    python3 "$here/shares.py" "$out/$name.folded"
done
