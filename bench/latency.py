#!/usr/bin/env python3
"""Tail latency: from a line written to an idle file to that line in the relay's store.

Starts `soclink relay` and `soclink agent` (default batch settings, mutual TLS on
loopback), then writes N lines one at a time to an idle file, each at a random moment
0.2-0.6 s after the previous one, and watches the relay's store file: it decompresses
each gzip member the relay appends and stamps when each line became readable there.
Prints p50, p90, p99 and max, and writes a JSON copy beside the other results.

    python3 bench/latency.py [--lines 300] [--soclink PATH]

A store file is polled every 10 ms, so figures are exact to about 10 ms.
"""
import argparse, datetime as dt, json, os, random, socket, subprocess, sys, tempfile, time, zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port, proc, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"relay exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("relay did not listen")


class StoreTail:
    """Follows concatenated gzip members appended to one file."""

    def __init__(self, path: Path):
        self.path, self.offset, self.buf = path, 0, b""

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                new = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(new)
        self.buf += new
        lines = []
        while self.buf:
            d = zlib.decompressobj(wbits=31)
            try:
                out = d.decompress(self.buf)
            except zlib.error:
                break
            if not d.eof:
                break  # a member still being written
            lines += out.splitlines()
            self.buf = d.unused_data
        return lines


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--soclink", default=os.environ.get("SOCLINK_BIN") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "soclink"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="soclink-latency-") as tmp:
        d = Path(tmp)
        subprocess.run([args.soclink, "certs", "dev", "--out", str(d / "certs")], check=True,
                       capture_output=True)
        c = d / "certs"
        port = free_port()
        (d / "relay.toml").write_text(
            f'id = "lat-relay"\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "{d / "rs"}"\n'
            f'store_dir = "{d / "store"}"\ncontrol_socket = "{d / "relay.sock"}"\n'
            f'ca = "{c / "ca.pem"}"\ncert = "{c / "relay.pem"}"\nkey = "{c / "relay-key.pem"}"\n')
        log = d / "app.log"
        log.write_text("")
        # Default [spool] batch settings: the figure is what an operator gets.
        (d / "agent.toml").write_text(
            f'id = "lat-agent"\nstate_dir = "{d / "as"}"\ncontrol_socket = "{d / "agent.sock"}"\n'
            f'[[source]]\nname = "app"\ntype = "file"\ninclude = ["{log}"]\n'
            f'[upstream]\naddress = "127.0.0.1:{port}"\nserver_name = "localhost"\n'
            f'ca = "{c / "ca.pem"}"\ncert = "{c / "agent.pem"}"\nkey = "{c / "agent-key.pem"}"\n')
        env = dict(os.environ, SOCLINK_LOG="warn")
        relay = subprocess.Popen([args.soclink, "relay", "-c", str(d / "relay.toml")],
                                 stderr=open(d / "relay.err", "wb"), env=env)
        agent = None
        try:
            wait_port(port, relay)
            agent = subprocess.Popen([args.soclink, "agent", "-c", str(d / "agent.toml")],
                                     stderr=open(d / "agent.err", "wb"), env=env)
            time.sleep(2)
            day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
            tail = StoreTail(d / "store" / "demo-agent" / "app" / f"{day}.ndjson.gz")
            written, arrived = {}, {}
            next_write = time.monotonic()
            n = 0
            deadline = None
            while len(arrived) < args.lines:
                now = time.monotonic()
                if n < args.lines and now >= next_write:
                    with open(log, "a") as f:
                        f.write(f"latency probe id={n:06d} sshd[42]: Accepted publickey for ops\n")
                    written[n] = time.monotonic()
                    n += 1
                    next_write = written[n - 1] + rnd.uniform(0.2, 0.6)
                    if n == args.lines:
                        deadline = time.monotonic() + 30
                for l in tail.poll():
                    ev = json.loads(l)
                    i = int(ev["message"].split("id=")[1][:6])
                    arrived.setdefault(i, time.monotonic())
                if deadline and time.monotonic() > deadline:
                    sys.exit(f"only {len(arrived)} of {args.lines} lines arrived")
                time.sleep(0.01)
        finally:
            for p in (agent, relay):
                if p:
                    p.terminate()
                    p.wait(15)
    lat = [arrived[i] - written[i] for i in range(args.lines)]
    res = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "lines": args.lines,
        "p50_s": round(pct(lat, 50), 3),
        "p90_s": round(pct(lat, 90), 3),
        "p99_s": round(pct(lat, 99), 3),
        "max_s": round(max(lat), 3),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "command": "python3 bench/latency.py --lines %d" % args.lines,
    }
    print(f"tail latency over {args.lines} lines (write -> relay store, default batch settings):")
    print(f"  p50 {res['p50_s']:.3f} s   p90 {res['p90_s']:.3f} s   p99 {res['p99_s']:.3f} s"
          f"   max {res['max_s']:.3f} s   (target p99 <= 2 s)")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"latency-{res['date'].replace(':', '')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"  JSON: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
