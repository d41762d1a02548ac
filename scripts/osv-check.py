#!/usr/bin/env python3
"""Check Cargo.lock against RustSec advisories in OSV JSON form (stdlib only).

This reruns docs/ADVISORIES.md mechanically where `cargo deny check advisories`
cannot fetch the advisory database but the OSV export can be downloaded, e.g. the
osv.dev crates.io export (https://osv-vulnerabilities.storage.googleapis.com/crates.io/all.zip)
or the `osv` branch of rustsec/advisory-db (its `crates/` directory).

Usage:
    scripts/osv-check.py ADVISORIES Cargo.lock [--all]

ADVISORIES is a directory (searched recursively for *.json) or a .zip of OSV files.
Prints one line per advisory that affects a locked package; with --all, also the
advisories that name a locked package but not its version. Withdrawn advisories are
listed with --all but never count.

Exit status: 0 nothing affected, 1 something affected, 2 bad input (the message
names the file and field at fault).
"""

import json
import os
import re
import sys
import tomllib
import zipfile

_SEMVER = re.compile(
    r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)


class BadInput(Exception):
    pass


def parse_version(text, where):
    """Semver precedence key; build metadata (Cargo.lock's `+spec-1.1.0`) is ignored."""
    m = _SEMVER.match(text.strip())
    if not m:
        raise BadInput(f"{where}: {text!r} is not a semver version")
    major, minor, patch, pre = m.groups()
    if pre is None:
        # A release sorts after every pre-release of the same version.
        pre_key = (1,)
    else:
        ids = []
        for part in pre.split("."):
            # Numeric identifiers sort below alphanumeric ones (semver 11.4.3).
            ids.append((0, int(part), "") if part.isdigit() else (1, 0, part))
        pre_key = (0, tuple(ids))
    return (int(major), int(minor), int(patch), pre_key)


def range_affects(events, version, where):
    """OSV SEMVER range: each "introduced" opens an interval that the next
    "fixed"/"last_affected"/"limit" closes, in list order. Reading pairs rather than
    sorting events keeps an empty pair such as RUSTSEC-2024-0399's
    introduced 0.23.0 / fixed 0.23.0 empty."""
    intervals = []
    start = None
    for i, ev in enumerate(events):
        if len(ev) != 1:
            raise BadInput(f"{where}.events[{i}]: expected one key, got {sorted(ev)}")
        (kind, value), = ev.items()
        field = f"{where}.events[{i}].{kind}"
        if kind == "introduced":
            if start is None:
                start = parse_version("0.0.0-0" if value == "0" else value, field)
        elif kind in ("fixed", "last_affected", "limit"):
            if start is None:
                raise BadInput(f"{field}: {kind} without an open introduced")
            if kind == "limit" and value == "*":
                end = None
            else:
                end = parse_version(value, field)
            intervals.append((start, end, kind == "last_affected"))
            start = None
        else:
            raise BadInput(f"{field}: unknown event {kind!r}")
    if start is not None:
        intervals.append((start, None, False))
    for lo, hi, inclusive in intervals:
        if version < lo:
            continue
        if hi is None or version < hi or (inclusive and version == hi):
            return True
    return False


def fixed_versions(affected_entry):
    out = []
    for r in affected_entry.get("ranges", []):
        for ev in r.get("events", []):
            if "fixed" in ev:
                out.append(ev["fixed"])
    return out


def load_advisories(source):
    """Yields (name, parsed JSON) for every OSV file in a directory or zip."""
    if os.path.isdir(source):
        for root, _dirs, files in os.walk(source):
            for f in sorted(files):
                if f.endswith(".json"):
                    path = os.path.join(root, f)
                    with open(path, "rb") as fh:
                        yield path, fh.read()
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                if info.filename.endswith(".json"):
                    yield f"{source}:{info.filename}", z.read(info)
    else:
        raise BadInput(f"{source}: neither a directory nor a zip file")


def locked_packages(lock_path):
    try:
        with open(lock_path, "rb") as fh:
            lock = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"{lock_path}: {e}") from e
    pkgs = {}
    for i, p in enumerate(lock.get("package", [])):
        # Only crates.io packages can match a crates.io advisory; path and git
        # dependencies (soclink itself) are ours to check.
        if not str(p.get("source", "")).startswith("registry+"):
            continue
        where = f"{lock_path}: package[{i}] ({p.get('name')})"
        pkgs.setdefault(p["name"], []).append(
            (p["version"], parse_version(p["version"], where + ".version"))
        )
    if not pkgs:
        raise BadInput(f"{lock_path}: no registry packages found")
    return pkgs


def main(argv):
    args = [a for a in argv[1:] if a != "--all"]
    show_all = "--all" in argv[1:]
    if len(args) != 2:
        print("usage: scripts/osv-check.py ADVISORIES Cargo.lock [--all]", file=sys.stderr)
        return 2
    source, lock_path = args
    try:
        pkgs = locked_packages(lock_path)
        n_files = 0
        n_affected = 0
        rows = []
        for name, raw in load_advisories(source):
            n_files += 1
            try:
                adv = json.loads(raw)
            except json.JSONDecodeError as e:
                raise BadInput(f"{name}: invalid JSON: {e}") from e
            adv_id = adv.get("id", "?")
            for j, aff in enumerate(adv.get("affected", [])):
                pkg = aff.get("package", {})
                if pkg.get("ecosystem") != "crates.io" or pkg.get("name") not in pkgs:
                    continue
                info = (aff.get("database_specific") or {}).get("informational")
                kind = info or "vulnerability"
                for ver_text, ver in pkgs[pkg["name"]]:
                    where = f"{name}: affected[{j}]"
                    hit = ver_text in aff.get("versions", [])
                    for k, r in enumerate(aff.get("ranges", [])):
                        if r.get("type") != "SEMVER":
                            continue
                        if range_affects(r.get("events", []), ver, f"{where}.ranges[{k}]"):
                            hit = True
                    withdrawn = adv.get("withdrawn")
                    if withdrawn:
                        status = f"withdrawn {withdrawn[:10]}"
                    else:
                        status = "AFFECTED" if hit else "not affected"
                    if hit and not withdrawn:
                        n_affected += 1
                    if (hit and not withdrawn) or show_all:
                        fixed = ", ".join(fixed_versions(aff)) or "none"
                        rows.append(
                            f"{adv_id}\t{pkg['name']} {ver_text}\t{status}\t{kind}"
                            f"\tfixed: {fixed}\t{adv.get('summary', '')}"
                        )
        for row in sorted(rows):
            print(row)
        print(
            f"{n_files} advisory files, {sum(len(v) for v in pkgs.values())} locked "
            f"packages, {n_affected} affected",
            file=sys.stderr,
        )
        return 1 if n_affected else 0
    except BadInput as e:
        print(f"osv-check: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
