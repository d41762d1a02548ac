#!/usr/bin/env python3
"""A/B CPU cost and perf profiles of one soclink scenario (see bench/profiles/README.md).

Runs bench.py's tail->spool or end-to-end scenario on its cached corpus with one or more
binaries, alternating them, and prints the agent's and relay's CPU seconds per GB (user +
system from /proc, robust on a shared machine where MB/s is not) next to
`soclink bench-compress` of the same corpus. With --perf DIR it attaches
`perf record` to the agent and the relay and writes DIR/<name>-{agent,relay}.perf.data.

    python3 bench/profile.py --size 256MiB --e2e --runs 3 A=path/to/old B=path/to/new
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def one(binary: str, ctx: dict, e2e: bool, level: int, perf: Path | None, name: str,
        verify: bool) -> dict:
    d = ctx["work"] / "runs" / f"profile-{name}"
    bench.shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    port = bench.free_port() if e2e else None
    cfg = bench.soclink_configs(d, ctx["corpus"], level, ctx["certs"], port, "100ms")
    env = dict(os.environ, SOCLINK_LOG="warn")
    relay = agent = None
    perfs = []
    try:
        if e2e:
            relay = subprocess.Popen([binary, "relay", "-c", str(d / "relay.toml")],
                                     stdout=subprocess.DEVNULL, stderr=open(d / "relay.err", "wb"),
                                     env=env)
            bench.wait_port(port, relay)
        w = bench.SpoolWatcher(d / "agent-state", ctx["corpus"])
        t0 = time.monotonic()
        agent = subprocess.Popen([binary, "agent", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                 stderr=open(d / "agent.err", "wb"), env=env)
        if perf:
            # The agent re-executes itself once at start (malloc tunables): attach after.
            time.sleep(0.2)
            for who, p in (("agent", agent), ("relay", relay)):
                if p:
                    perfs.append(subprocess.Popen(
                        ["perf", "record", "-e", "cpu-clock", "-F", "997", "--call-graph",
                         "dwarf,16384", "-p", str(p.pid), "-o",
                         str(perf / f"{name}-{who}.perf.data")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        size = ctx["size"]

        def check():
            w.scan()
            if not e2e:
                return w.offset >= size, w.offset
            return w.offset >= size and w.acked() >= w.last_seq, (w.offset, w.acked())

        t1 = bench.wait_done(check, {"agent": agent, **({"relay": relay} if relay else {})},
                             0.2, 60, lambda v: None)
        r = {"seconds": t1 - t0, "agent": bench.proc_cpu(agent.pid) / size * 1e9}
        if relay:
            r["relay"] = bench.proc_cpu(relay.pid) / size * 1e9
    finally:
        for p in perfs:
            p.send_signal(signal.SIGINT)
            p.wait()
        bench.stop(agent)
        bench.stop(relay)
    if verify:
        if e2e:
            files = sorted((d / "store").rglob("*.ndjson.gz"))
            v = bench.verify_ndjson_stream(["zcat", *map(str, files)], ctx["corpus"], ctx["crcs"])
        else:
            v = bench.verify_ndjson_stream(
                [binary, "spool", "dump", "--state-dir", str(d / "agent-state"), "--all"],
                ctx["corpus"], ctx["crcs"])
        r["verified"] = v.get("ok")
    bench.shutil.rmtree(d, ignore_errors=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binaries", nargs="+", help="NAME=PATH of each soclink binary")
    ap.add_argument("--size", type=bench.parse_size, default=bench.parse_size("256MiB"))
    ap.add_argument("--e2e", action="store_true", help="end to end (default: tail->spool)")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--perf", type=Path, help="write perf.data files here")
    ap.add_argument("--verify", action="store_true", help="verify every line after each run")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work")
    args = ap.parse_args()
    bins = dict(b.split("=", 1) for b in args.binaries)
    corpus, nlines, crcs = bench.ensure_corpus(args.work.resolve(), args.size)
    certs = args.work.resolve() / "certs"
    if not (certs / "agent.pem").exists():
        subprocess.run([next(iter(bins.values())), "certs", "dev", "--out", str(certs)], check=True,
                       capture_output=True)
    ctx = {"work": args.work.resolve(), "corpus": corpus, "size": corpus.stat().st_size,
           "lines": nlines, "crcs": crcs, "certs": certs}
    if args.perf:
        args.perf.mkdir(parents=True, exist_ok=True)
    res: dict[str, list[dict]] = {n: [] for n in bins}
    base: dict[str, list[float]] = {n: [] for n in bins}
    for i in range(args.runs):
        for n, b in bins.items():
            r = one(b, ctx, args.e2e, args.level, args.perf, n, args.verify)
            res[n].append(r)
            print(f"run {i + 1} {n}: " + " ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
                + f"  load={open('/proc/loadavg').read().split()[0]}", file=sys.stderr)
            # The baseline with the same binary (its own zlib-rs build), in the same run.
            before = os.times()
            subprocess.run([b, "bench-compress", str(corpus), "--level", str(args.level)],
                           capture_output=True, check=True)
            after = os.times()
            cpu = (after.children_user - before.children_user) + (
                after.children_system - before.children_system)
            base[n].append(cpu / ctx["size"] * 1e9)
    for n, rs in res.items():
        bc = statistics.median(base[n])
        a = statistics.median(r["agent"] for r in rs)
        line = (f"{n}: agent {a:.2f} CPU s/GB, bench-compress gzip-{args.level} {bc:.2f} "
                f"({a / bc:.2f}x)")
        if args.e2e:
            line += f", relay {statistics.median(r['relay'] for r in rs):.2f}"
        line += f", {statistics.median(r['seconds'] for r in rs):.1f} s (medians of {len(rs)})"
        if args.verify:
            line += f", verified {all(r.get('verified') for r in rs)}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
