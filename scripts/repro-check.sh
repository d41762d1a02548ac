#!/usr/bin/env bash
# Reproducible-build check: exports the committed tree (HEAD) twice, into two temporary
# directories of different names and depths, builds each with scripts/release.sh and its
# own target dir, and compares the SHA-256 of the binaries and of the .deb packages
# (not the SBOM: cargo-cyclonedx writes the build directory into its bom-refs).
# Exit 0 only if they are equal.
# Takes two full release builds (several minutes). Set KEEP=1 to keep the directories.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$work"' EXIT
a=$work/a
b=$work/build-two/nested/soclink-copy
mkdir -p "$a" "$b"
# Resolve HEAD once: a commit made while the first build runs must not reach the second.
rev=$(git rev-parse HEAD)
# The commit time must come from the repository: the exports carry no .git.
epoch=$(git log -1 --format=%ct "$rev")
# Both builds must use the same tool even if cargo-auditable is installed meanwhile.
auditable=no
cargo auditable --version >/dev/null 2>&1 && auditable=yes
echo "cargo-auditable: $auditable" >&2
for dir in "$a" "$b"; do
    git archive --format=tar "$rev" | tar -x -C "$dir"
    echo "== building in $dir" >&2
    (cd "$dir" && AUDITABLE=$auditable SOURCE_DATE_EPOCH=$epoch CARGO_TARGET_DIR="$dir/target" scripts/release.sh >/dev/null)
done
sum() { sha256sum "$1" | cut -d' ' -f1; }
status=0
for f in soclink $(cd "$a/dist" && ls ./*.deb 2>/dev/null | sed 's|^\./||'); do
    ha=$(sum "$a/dist/$f"); hb=$(sum "$b/dist/$f")
    if [ "$ha" = "$hb" ]; then
        echo "reproducible: $f $ha"
    else
        echo "DIFFERENT: $f $ha vs $hb" >&2
        status=1
    fi
done
exit $status
