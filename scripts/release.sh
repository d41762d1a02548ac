#!/usr/bin/env bash
# Release build: the binary (with its dependency list embedded by cargo-auditable), the
# Debian package, a CycloneDX SBOM and SHA256SUMS, all in dist/.
# Tools: cargo install --locked cargo-auditable cargo-cyclonedx cargo-deb
# Paths are remapped and SOURCE_DATE_EPOCH is the last commit's time, so two builds of
# the same commit in different directories give the same binary (scripts/repro-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
dist=$root/dist

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
# Absolute paths end up in panic messages and debug sections; remap them to fixed names
# (the last matching prefix wins, so the target dir may sit inside the tree).
export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$cargo_home=/cargo --remap-path-prefix=$root=/soclink --remap-path-prefix=$target=/target"

# AUDITABLE=yes|no forces the choice (repro-check.sh decides once for both builds).
auditable=${AUDITABLE:-auto}
if [ "$auditable" = auto ]; then
    cargo auditable --version >/dev/null 2>&1 && auditable=yes || auditable=no
fi
if [ "$auditable" = yes ]; then
    cargo auditable build --release --locked
else
    echo "WARNING: cargo-auditable is not installed (cargo install --locked cargo-auditable):" >&2
    echo "WARNING: building WITHOUT the embedded dependency list; 'cargo audit bin' cannot scan this binary." >&2
    cargo build --release --locked
fi

rm -rf "$dist"
mkdir -p "$dist"
cp "$target/release/soclink" "$dist/soclink"

if cargo deb --version >/dev/null 2>&1; then
    # --no-build: package exactly the binary built above.
    cargo deb --no-build --locked --output "$dist/" >/dev/null
else
    echo "WARNING: cargo-deb is not installed (cargo install --locked cargo-deb): no .deb in dist/" >&2
fi

if cargo cyclonedx --version >/dev/null 2>&1; then
    # Runtime dependencies of the shipped binary, for this host's target only.
    cargo cyclonedx --format json --spec-version 1.5 --no-build-deps \
        --target "$(rustc -vV | sed -n 's/^host: //p')" >/dev/null
    mv soclink.cdx.json "$dist/"
else
    echo "WARNING: cargo-cyclonedx is not installed (cargo install --locked cargo-cyclonedx): no SBOM in dist/" >&2
fi

(cd "$dist" && find . -maxdepth 1 -type f ! -name SHA256SUMS -printf '%P\n' | sort | xargs sha256sum > SHA256SUMS)
echo "dist/:"
cat "$dist/SHA256SUMS"
