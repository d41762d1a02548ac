#!/usr/bin/env python3
"""soclink throughput benchmark, with rsyslog on the same job in the same run.

Owns: corpus generation (cached), the scenarios (soclink tail->spool, soclink end to
end over mutual TLS, rsyslog over TLS and over zlib/TCP, a compression baseline), the
measurements, the verification of every delivered line, and the report (markdown table
on stdout, JSON copy in bench/results/).

Invariant it keeps: a figure is printed only for a run whose output was verified
(every sequence id present exactly once, content exact); a run that lost, duplicated
or altered lines is reported as FAILED with what went wrong, never as a number.

Only the Python standard library is used. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import array
import base64
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
ID_RE = re.compile(rb"bseq=(\d{10})")
GB = 1e9
MB = 1e6


# --------------------------------------------------------------------------- corpus


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 1GiB, 256MiB, 500MB)")
    n = float(m.group(1))
    unit = (m.group(2) or "").lower().rstrip("b")
    mult = {
        "": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
        "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40,
    }.get(unit)
    if mult is None:
        raise argparse.ArgumentTypeError(f"bad size unit in {s!r}")
    return int(n * mult)


HOSTS = ["web-01", "web-02", "web-03", "db-01", "db-02", "fw-edge", "mail-01", "ad-dc1",
         "k8s-node-4", "vpn-gw"]
USERS = ["admin", "root", "deploy", "backup", "alice", "bob", "chen.wei", "lin.yu",
         "oracle", "postgres", "www-data", "svc-monitor"]
PATHS = ["/", "/index.html", "/api/v1/items/{n}", "/api/v1/users/{n}/profile",
         "/login", "/logout", "/static/js/app.{h}.js", "/static/css/main.{h}.css",
         "/wp-login.php", "/.env", "/search?q=%E8%B3%87%E5%AE%89&page={n}",
         "/api/v2/orders?status=open&limit=50", "/healthz", "/favicon.ico",
         "/cgi-bin/luci/;stok=/locale", "/download/report-{n}.pdf"]
AGENTS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36",
          "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
          "curl/8.4.0", "python-requests/2.31.0", "Go-http-client/1.1",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15",
          "kube-probe/1.28", "Mozilla/5.0 zgrab/0.x"]
UNITS = ["nginx.service", "postgresql@15-main.service", "logrotate.service",
         "apt-daily.service", "docker.service", "ssh.service", "certbot.timer",
         "fstrim.service", "systemd-tmpfiles-clean.service"]
CMDS = ["/usr/bin/systemctl restart nginx", "/usr/bin/apt-get update",
        "/usr/bin/journalctl -u ssh --since today", "/bin/cat /etc/shadow",
        "/usr/bin/docker ps -a", "/usr/sbin/iptables -L -n", "/usr/bin/vim /etc/hosts"]
SVCS = ["billing", "auth", "gateway", "search", "notify", "report"]
APP_MSGS = ["login ok", "login failed: bad password", "token refreshed",
            "payment authorised", "rate limit exceeded", "upstream timeout",
            "使用者登入成功", "查詢公文系統逾時", "cache miss", "user profile updated"]
DOMAINS = ["example.gov.tw", "moe.edu.tw", "update.microsoft.com", "cdn.jsdelivr.net",
           "x3f9k2.badguy.top", "time.stdtime.gov.tw", "api.github.com"]


def _ts(t: int) -> tuple[str, str, str]:
    """(RFC 3164 timestamp, nginx timestamp, ISO 8601) for second `t` of the day."""
    h, m, s = (t // 3600) % 24, (t // 60) % 60, t % 60
    return (f"Nov 26 {h:02}:{m:02}:{s:02}", f"26/Nov/2026:{h:02}:{m:02}:{s:02} +0800",
            f"2026-11-26T{h:02}:{m:02}:{s:02}")


def gen_line(n: int, r: random.Random) -> str:
    """One realistic line; carries `bseq=<10 digits>` so verification is exact."""
    t = n // 400  # ~400 lines a second of simulated time
    ts, nts, iso = _ts(t)
    host = r.choice(HOSTS)
    ip = f"{r.choice((10, 172, 192, 203, 61, 114))}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"
    sid = f"bseq={n:010d}"
    k = r.randrange(100)
    if k < 22:
        path = r.choice(PATHS).format(n=r.randrange(100000), h=f"{r.getrandbits(32):08x}")
        meth = "GET" if r.random() < 0.8 else r.choice(("POST", "PUT", "HEAD", "DELETE"))
        st = r.choice((200, 200, 200, 200, 301, 304, 403, 404, 500, 502))
        return (f'{ip} - - [{nts}] "{meth} {path} HTTP/1.1" {st} {r.randrange(0, 250000)} '
                f'"{r.choice(("-", "https://www.example.gov.tw/", "https://www.google.com/"))}" '
                f'"{r.choice(AGENTS)}" rt={r.random() * 2:.3f} {sid}')
    if k < 34:
        pid = r.randrange(1000, 65000)
        port = r.randrange(1024, 65535)
        v = r.randrange(5)
        if v == 0:
            return (f"{ts} {host} sshd[{pid}]: Accepted publickey for {r.choice(USERS)} from {ip} "
                    f"port {port} ssh2: ED25519 SHA256:{r.getrandbits(128):032x} {sid}")
        if v in (1, 2):
            return (f"{ts} {host} sshd[{pid}]: Failed password for invalid user "
                    f"{r.choice(USERS)}{r.randrange(100)} from {ip} port {port} ssh2 {sid}")
        if v == 3:
            return (f"{ts} {host} sshd[{pid}]: Connection closed by authenticating user "
                    f"{r.choice(USERS)} {ip} port {port} [preauth] {sid}")
        return (f"{ts} {host} sshd[{pid}]: pam_unix(sshd:session): session opened for user "
                f"{r.choice(USERS)}(uid={r.randrange(1000, 5000)}) by (uid=0) {sid}")
    if k < 46:
        return (f"{ts} {host} kernel: [{n / 97:.6f}] [UFW BLOCK] IN=eth0 OUT= "
                f"MAC=52:54:00:{r.randrange(256):02x}:{r.randrange(256):02x}:{r.randrange(256):02x}:08:00 SRC={ip} DST=192.0.2.{r.randrange(1, 255)} "
                f"LEN={r.randrange(40, 1500)} TOS=0x00 PREC=0x00 TTL={r.randrange(30, 128)} "
                f"ID={r.randrange(65536)} PROTO={r.choice(('TCP', 'TCP', 'UDP'))} SPT={r.randrange(1024, 65535)} "
                f"DPT={r.choice((22, 23, 80, 443, 445, 3389, 5900, 8080))} WINDOW={r.randrange(1024, 65535)} "
                f"RES=0x00 SYN URGP=0 {sid}")
    if k < 52:
        return (f"{ts} {host} CRON[{r.randrange(2000, 90000)}]: ({r.choice(USERS)}) CMD "
                f"({r.choice(('/usr/local/bin/backup.sh --full', 'run-parts /etc/cron.hourly', '/usr/lib/php/sessionclean', 'test -x /usr/sbin/anacron'))}) {sid}")
    if k < 60:
        qid = f"{r.getrandbits(40):010X}"
        v = r.randrange(3)
        if v == 0:
            return (f"{ts} {host} postfix/smtpd[{r.randrange(3000, 9000)}]: NOQUEUE: reject: RCPT from "
                    f"unknown[{ip}]: 554 5.7.1 <user{r.randrange(999)}@{r.choice(DOMAINS)}>: Relay access "
                    f"denied; from=<spam{r.randrange(99)}@mail.{r.choice(DOMAINS)}> to=<user@example.gov.tw> "
                    f"proto=ESMTP helo=<{r.choice(DOMAINS)}> {sid}")
        if v == 1:
            return (f"{ts} {host} postfix/qmgr[{r.randrange(3000, 9000)}]: {qid}: from=<{r.choice(USERS)}@"
                    f"{r.choice(DOMAINS)}>, size={r.randrange(500, 90000)}, nrcpt={r.randrange(1, 5)} (queue active) {sid}")
        return (f"{ts} {host} postfix/smtp[{r.randrange(3000, 9000)}]: {qid}: to=<{r.choice(USERS)}@"
                f"{r.choice(DOMAINS)}>, relay={r.choice(DOMAINS)}[{ip}]:25, delay={r.random() * 5:.2f}, "
                f"dsn=2.0.0, status=sent (250 2.0.0 Ok: queued) {sid}")
    if k < 69:
        u = r.choice(UNITS)
        v = r.randrange(3)
        verb = ("Started", "Stopping", "Finished")[v]
        return f"{ts} {host} systemd[1]: {verb} {u} - {u.split('.')[0]} job {r.randrange(90000)}. {sid}"
    if k < 74:
        return (f"{ts} {host} sudo: {r.choice(USERS)} : TTY=pts/{r.randrange(8)} ; PWD=/home/"
                f"{r.choice(USERS)} ; USER=root ; COMMAND={r.choice(CMDS)} {sid}")
    if k < 88:
        lvl = r.choice(("info", "info", "info", "warn", "error", "debug"))
        return json.dumps({
            "ts": f"{iso}.{r.randrange(1000):03}+08:00", "level": lvl, "svc": r.choice(SVCS),
            "msg": r.choice(APP_MSGS), "user_id": r.randrange(10 ** 6), "client_ip": ip,
            "latency_ms": round(r.random() * 900, 2), "status": r.choice((200, 201, 400, 401, 500)),
            "trace": f"{r.getrandbits(64):016x}", "req": sid,
        }, ensure_ascii=False, separators=(",", ":"))
    if k < 94:
        return (f"{ts} {host} named[{r.randrange(500, 900)}]: client @0x7f{r.getrandbits(40):010x} "
                f"{ip}#{r.randrange(1024, 65535)} ({r.choice(DOMAINS)}): query: {r.choice(DOMAINS)} IN "
                f"{r.choice(('A', 'AAAA', 'TXT', 'MX'))} + ({'192.0.2.53'}) {sid}")
    if k < 99:
        return (f"{ts} {host} audit: type=SYSCALL msg=audit({1764115200 + t}.{r.randrange(1000):03}:"
                f"{r.randrange(10 ** 6)}): arch=c000003e syscall=59 success=yes exit=0 a0=55d{r.getrandbits(24):06x} "
                f"ppid={r.randrange(1, 9000)} pid={r.randrange(9000, 99999)} auid={r.randrange(1000, 1100)} uid=0 "
                f"comm=\"{r.choice(('bash', 'curl', 'wget', 'nc', 'python3'))}\" exe=\"/usr/bin/x\" key=\"exec\" {sid}")
    # Rare long line: a Java stack trace folded into one line.
    frames = " ".join(
        f"at gov.example.{r.choice(SVCS)}.Handler{r.randrange(40)}.process(Handler.java:{r.randrange(900)})"
        for _ in range(r.randrange(10, 40)))
    return (f"{ts} {host} java[{r.randrange(900, 9000)}]: ERROR [main] java.lang.IllegalStateException: "
            f"connection pool exhausted {frames} {sid}")


def ensure_corpus(work: Path, size: int) -> tuple[Path, int, array.array]:
    """The corpus file, its line count and the CRC32 of each line (by id). Cached."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{size}.log"
    index = work / f"corpus-{size}.crc32"
    if corpus.exists() and index.exists():
        crcs = array.array("I")
        crcs.frombytes(index.read_bytes())
        return corpus, len(crcs), crcs
    print(f"generating the corpus ({size / MB:.0f} MB) in {corpus} ...", file=sys.stderr)
    t0 = time.monotonic()
    r = random.Random(20261126)
    crcs = array.array("I")
    written = 0
    n = 0
    tmp = corpus.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        buf: list[bytes] = []
        bl = 0
        while written < size:
            line = gen_line(n, r).encode() + b"\n"
            if written + len(line) > size and n > 0:
                break
            crcs.append(zlib.crc32(line[:-1]))
            buf.append(line)
            bl += len(line)
            written += len(line)
            n += 1
            if bl >= 1 << 20:
                f.write(b"".join(buf))
                buf, bl = [], 0
        f.write(b"".join(buf))
    tmp.rename(corpus)
    index.write_bytes(crcs.tobytes())
    print(f"  {n} lines, {written} bytes in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return corpus, n, crcs


# --------------------------------------------------------------------------- processes


def proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a live process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rel(p: Path) -> str:
    """A path as recorded in the results: relative to the repository when inside it."""
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """True when something listens on TCP `port` (read from /proc/net/tcp, so the probe
    does not open a connection that the server would log as a failed handshake)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 3 and cols[1].endswith(want) and cols[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def tcp_bytes(port: int) -> int | None:
    """Payload bytes received on established TCP connections to local `port` (ss -ti)."""
    try:
        out = subprocess.run(["ss", "-Htin", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    vals = [int(m) for m in re.findall(r"bytes_received:(\d+)", out)]
    return sum(vals) if vals else None


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Stall(Exception):
    pass


def wait_done(check, procs: dict[str, subprocess.Popen], poll: float, stall_after: float,
              progress) -> float:
    """Polls `check()` -> (done, progress_value) until done; returns the monotonic time
    at which done was first seen. Raises Stall when progress stops for `stall_after`
    seconds or a process dies."""
    last_val, last_change = None, time.monotonic()
    while True:
        done, val = check()
        now = time.monotonic()
        if done:
            return now
        if val != last_val:
            last_val, last_change = val, now
            progress(val)
        elif now - last_change > stall_after:
            raise Stall(f"no progress for {stall_after:.0f}s (last: {val})")
        for name, p in procs.items():
            if p.poll() is not None:
                raise Stall(f"{name} exited with code {p.returncode} (last progress: {val})")
        time.sleep(poll)


# --------------------------------------------------------------------------- verification


class Verifier:
    """Checks that a stream of delivered lines holds every corpus line exactly once.

    While lines arrive in corpus order each is compared byte for byte with the corpus;
    lines out of order are checked against the CRC32 recorded for their id."""

    def __init__(self, corpus: Path, crcs: array.array):
        self.crcs = crcs
        self.seen = bytearray(len(crcs))
        self.corpus = open(corpus, "rb")
        self.next_id = 0
        self.in_order = True
        self.bad: list[str] = []
        self.count = 0
        self.byte_compared = 0

    def add(self, line: bytes) -> None:
        self.count += 1
        m = ID_RE.search(line)
        if not m:
            self._bad(f"line without id: {line[:120]!r}")
            return
        i = int(m.group(1))
        if i >= len(self.crcs):
            self._bad(f"unknown id {i}")
            return
        if self.in_order and i == self.next_id:
            want = self.corpus.readline()[:-1]
            self.next_id += 1
            self.byte_compared += 1
            if want != line:
                self._bad(f"id {i} differs: got {line[:160]!r} want {want[:160]!r}")
        else:
            self.in_order = False
            if zlib.crc32(line) != self.crcs[i]:
                self._bad(f"id {i} differs (crc): got {line[:160]!r}")
        s = self.seen[i]
        if s == 1:
            self._bad(f"id {i} delivered twice")
        if s < 255:
            self.seen[i] = s + 1

    def _bad(self, why: str) -> None:
        if len(self.bad) < 20:
            self.bad.append(why)
        elif len(self.bad) == 20:
            self.bad.append("... (more)")

    def result(self) -> dict:
        self.corpus.close()
        missing = self.seen.count(0)
        dup = len(self.seen) - missing - self.seen.count(1)
        ok = missing == 0 and dup == 0 and not self.bad and self.count == len(self.crcs)
        r = {"ok": ok, "lines_expected": len(self.crcs), "lines_received": self.count,
             "missing": missing, "duplicated_ids": dup,
             "byte_compared": self.byte_compared,
             "method": "byte-for-byte (in corpus order)" if self.in_order
             else "byte-for-byte until first reordering, then CRC32 per id"}
        if missing:
            r["first_missing_ids"] = [i for i, v in enumerate(self.seen) if v == 0][:10]
        if self.bad:
            r["problems"] = self.bad
        return r


def verify_ndjson_stream(cmd: list[str], corpus: Path, crcs) -> dict:
    """Feeds the events printed by `cmd` (NDJSON, one event a line) to a Verifier."""
    v = Verifier(corpus, crcs)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          bufsize=1 << 20) as p:
        assert p.stdout is not None
        for raw in p.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                v._bad(f"not JSON: {raw[:120]!r}")
                v.count += 1
                continue
            msg = ev.get("message")
            if msg is not None:
                v.add(msg.encode())
            elif "message_base64" in ev:
                v.add(base64.b64decode(ev["message_base64"]))
            else:
                v._bad(f"event without message: {raw[:120]!r}")
    return v.result()


def verify_plain_file(path: Path, corpus: Path, crcs) -> dict:
    v = Verifier(corpus, crcs)
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            v.add(line[:-1] if line.endswith(b"\n") else line)
    return v.result()


# --------------------------------------------------------------------------- soclink


class SpoolWatcher:
    """Reads the agent's spool incrementally (record headers and metadata only, never
    the payload) to learn the newest record's file cursor and the acknowledged seq."""

    def __init__(self, state_dir: Path, corpus: Path):
        self.dir = state_dir / "spool"
        self.corpus = str(corpus)
        self.pos: dict[str, int] = {}
        self.last_seq = 0
        self.offset = 0
        self.events = 0
        self.gzip_bytes = 0

    def scan(self) -> None:
        try:
            names = sorted((n for n in os.listdir(self.dir) if n.endswith(".seg")),
                           key=lambda n: int(n[:-4]))
        except (FileNotFoundError, ValueError):
            return
        for name in names:
            path = self.dir / name
            pos = self.pos.get(name, 32)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    while pos + 32 <= size:
                        f.seek(pos)
                        h = f.read(32)
                        if len(h) < 32 or h[:4] != b"SLR\xa7":
                            break
                        seq = int.from_bytes(h[8:16], "little")
                        mlen = int.from_bytes(h[24:28], "little")
                        plen = int.from_bytes(h[28:32], "little")
                        if pos + 32 + mlen + plen > size:
                            break
                        meta = json.loads(f.read(mlen))
                        self.events += meta.get("events", 0)
                        self.gzip_bytes += plen
                        if seq > self.last_seq:
                            self.last_seq = seq
                            for c in meta.get("cursor") or []:
                                if c.get("path") == self.corpus:
                                    self.offset = c.get("offset", 0)
                        pos += 32 + mlen + plen
            except FileNotFoundError:
                pass
            self.pos[name] = pos

    def acked(self) -> int:
        try:
            b = (self.dir / "acked").read_bytes()
        except FileNotFoundError:
            return 0
        return int.from_bytes(b[16:24], "little") if len(b) == 40 else 0


def soclink_configs(d: Path, corpus: Path, level: int, certs: Path, port: int | None,
                    batch_delay: str) -> Path:
    agent = d / "agent.toml"
    text = (f'id = "bench-agent"\nstate_dir = "{d / "agent-state"}"\n'
            f'control_socket = "{d / "agent.sock"}"\n\n'
            f'[[source]]\nname = "bench"\ntype = "file"\ninclude = ["{corpus}"]\n'
            f'start_at = "beginning"\n\n'
            f'[spool]\ncompression_level = {level}\nmax_size = "20GiB"\n'
            f'batch_max_delay = "{batch_delay}"\n')
    if port is not None:
        text += (f'\n[upstream]\naddress = "127.0.0.1:{port}"\nserver_name = "localhost"\n'
                 f'ca = "{certs / "ca.pem"}"\ncert = "{certs / "agent.pem"}"\n'
                 f'key = "{certs / "agent-key.pem"}"\n')
        (d / "relay.toml").write_text(
            f'id = "bench-relay"\nlisten = ["127.0.0.1:{port}"]\n'
            f'state_dir = "{d / "relay-state"}"\nstore_dir = "{d / "store"}"\n'
            f'control_socket = "{d / "relay.sock"}"\n'
            f'ca = "{certs / "ca.pem"}"\ncert = "{certs / "relay.pem"}"\n'
            f'key = "{certs / "relay-key.pem"}"\n')
    agent.write_text(text)
    return agent


def run_soclink(args, ctx, level: int, e2e: bool) -> dict:
    name = f"soclink {'end-to-end' if e2e else 'tail->spool'} gzip-{level}"
    d = ctx["work"] / "runs" / f"soclink-{'e2e' if e2e else 'spool'}-{level}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    corpus, size, nlines = ctx["corpus"], ctx["size"], ctx["lines"]
    port = free_port() if e2e else None
    cfg = soclink_configs(d, corpus, level, ctx["certs"], port, args.batch_delay)
    relay = agent = None
    res: dict = {"scenario": name, "input_bytes": size, "lines": nlines}
    env = dict(os.environ, SOCLINK_LOG="warn")
    try:
        if e2e:
            relay = subprocess.Popen([args.soclink, "relay", "-c", str(d / "relay.toml")],
                                     stdout=open(d / "relay.out", "wb"),
                                     stderr=open(d / "relay.err", "wb"), env=env)
            wait_port(port, relay)
        w = SpoolWatcher(d / "agent-state", corpus)
        t0 = time.monotonic()
        agent = subprocess.Popen([args.soclink, "agent", "-c", str(cfg)],
                                 stdout=open(d / "agent.out", "wb"),
                                 stderr=open(d / "agent.err", "wb"), env=env)
        procs = {"agent": agent}
        if relay:
            procs["relay"] = relay

        def check():
            w.scan()
            spooled = w.offset >= size
            if not e2e:
                return spooled, w.offset
            acked = w.acked()
            return spooled and acked >= w.last_seq, (w.offset, acked)

        t1 = wait_done(check, procs, args.poll, args.stall, lambda v: None)
        res["seconds"] = t1 - t0
        res["cpu_agent"] = proc_cpu(agent.pid)
        res["rss_agent"] = proc_hwm(agent.pid)
        if relay:
            res["cpu_relay"] = proc_cpu(relay.pid)
            res["rss_relay"] = proc_hwm(relay.pid)
            res["tcp_bytes"] = tcp_bytes(port)
        res["batches"] = w.last_seq
    except (Stall, RuntimeError) as e:
        res["error"] = str(e)
    finally:
        stop(agent)
        stop(relay)
    res["logs"] = rel(d)
    if "error" in res:
        res["verify"] = {"ok": False}
        return res
    # Verification after the clock stopped.
    if e2e:
        files = sorted((d / "store").rglob("*.ndjson.gz"))
        res["store_gzip_bytes"] = sum(f.stat().st_size for f in files)
        res["wire_per_input"] = res["store_gzip_bytes"] / size
        res["verify"] = verify_ndjson_stream(["zcat", *map(str, files)], corpus, ctx["crcs"])
    else:
        res["spool_gzip_bytes"] = w.gzip_bytes
        res["wire_per_input"] = w.gzip_bytes / size
        res["verify"] = verify_ndjson_stream(
            [args.soclink, "spool", "dump", "--state-dir", str(d / "agent-state"), "--all"],
            corpus, ctx["crcs"])
    if not args.keep:
        for sub in ("store", "agent-state", "relay-state"):
            shutil.rmtree(d / sub, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- rsyslog

RSYSLOG_QUEUE = 'queue.type="LinkedList" queue.size="200000" queue.dequeueBatchSize="4096"'


def rsyslog_configs(d: Path, corpus: Path, certs: Path, port: int, mode: str) -> tuple[Path, Path]:
    """mode: "tls" (gtls, mutual x509 auth) or "zlib1"/"zlib6" (stream compression, plain TCP)."""
    out = d / "received.log"
    (d / "recv-work").mkdir()
    (d / "send-work").mkdir()
    tls_globals = lambda cert, key: (  # noqa: E731
        f'global(defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{certs / "ca.pem"}" '
        f'defaultNetstreamDriverCertFile="{certs / cert}" defaultNetstreamDriverKeyFile="{certs / key}")\n')
    recv = (f'global(workDirectory="{d / "recv-work"}" maxMessageSize="64k")\n'
            f'main_queue({RSYSLOG_QUEUE} queue.workerThreads="1")\n'
            'template(name="msgonly" type="string" string="%msg%\\n")\n')
    send = (f'global(workDirectory="{d / "send-work"}" maxMessageSize="64k")\n'
            f'main_queue({RSYSLOG_QUEUE})\n'
            'module(load="imfile" mode="inotify")\n'
            f'input(type="imfile" file="{corpus}" tag="bench" readMode="0" '
            'freshStartTail="off" maxSubmitAtOnce="4096" persistStateInterval="0")\n')
    if mode == "tls":
        recv += tls_globals("relay.pem", "relay-key.pem")
        recv += ('module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" '
                 'streamDriver.authMode="x509/certvalid" maxSessions="10")\n'
                 f'input(type="imtcp" port="{port}")\n')
        send += tls_globals("agent.pem", "agent-key.pem")
        send += (f'if $inputname == "imfile" then action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" '
                 'streamDriver="gtls" streamDriverMode="1" streamDriverAuthMode="x509/name" '
                 'streamDriverPermittedPeers="localhost" template="RSYSLOG_SyslogProtocol23Format")\n')
    else:
        level = int(mode[4:])
        recv += ('module(load="imptcp")\n'
                 f'input(type="imptcp" port="{port}" address="127.0.0.1" compression.mode="stream:always")\n')
        send += (f'if $inputname == "imfile" then action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" '
                 f'compression.mode="stream:always" ziplevel="{level}" '
                 'template="RSYSLOG_SyslogProtocol23Format")\n')
    # Only the benchmark's lines go to the output file; rsyslog's own messages (start,
    # connection notices) go to a side file so they can neither fail nor pad the check.
    recv += (f'if $app-name == "bench" then {{\n  action(type="omfile" file="{out}" template="msgonly" '
             'ioBufferSize="256k" flushOnTXEnd="on")\n} else {\n'
             f'  action(type="omfile" file="{d / "receiver-internal.log"}")\n}}\n')
    send += f'if $inputname != "imfile" then action(type="omfile" file="{d / "sender-internal.log"}")\n'
    rc, sc = d / "receiver.conf", d / "sender.conf"
    rc.write_text(recv)
    sc.write_text(send)
    return rc, sc


def run_rsyslog(args, ctx, mode: str) -> dict:
    label = {"tls": "rsyslog TLS (gtls, no compression)",
             "zlib1": "rsyslog zlib-1 stream, plain TCP",
             "zlib6": "rsyslog zlib-6 stream, plain TCP"}[mode]
    d = ctx["work"] / "runs" / f"rsyslog-{mode}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    corpus, size, nlines = ctx["corpus"], ctx["size"], ctx["lines"]
    port = free_port()
    rc, sc = rsyslog_configs(d, corpus, ctx["certs"], port, mode)
    out = d / "received.log"
    res: dict = {"scenario": label, "input_bytes": size, "lines": nlines}
    recv = send = None
    try:
        for conf in (rc, sc):
            chk = subprocess.run([args.rsyslogd, "-N1", "-f", str(conf)], capture_output=True,
                                 text=True)
            if chk.returncode != 0:
                raise RuntimeError(f"rsyslogd -N1 rejects {conf.name}: {chk.stderr.strip()[-800:]}")
        recv = subprocess.Popen([args.rsyslogd, "-n", "-f", str(rc), "-i", str(d / "receiver.pid")],
                                stdout=open(d / "receiver.out", "wb"), stderr=subprocess.STDOUT)
        wait_port(port, recv)
        t0 = time.monotonic()
        send = subprocess.Popen([args.rsyslogd, "-n", "-f", str(sc), "-i", str(d / "sender.pid")],
                                stdout=open(d / "sender.out", "wb"), stderr=subprocess.STDOUT)

        def check():
            try:
                n = out.stat().st_size
            except FileNotFoundError:
                n = 0
            return n >= size, n

        t1 = wait_done(check, {"receiver": recv, "sender": send}, args.poll, args.stall,
                       lambda v: None)
        res["seconds"] = t1 - t0
        res["cpu_agent"] = proc_cpu(send.pid)
        res["rss_agent"] = proc_hwm(send.pid)
        res["cpu_relay"] = proc_cpu(recv.pid)
        res["rss_relay"] = proc_hwm(recv.pid)
        res["tcp_bytes"] = tcp_bytes(port)
    except (Stall, RuntimeError) as e:
        res["error"] = str(e)
    finally:
        stop(send)
        stop(recv)
    res["logs"] = rel(d)
    if res.get("tcp_bytes"):
        res["wire_per_input"] = res["tcp_bytes"] / size
    if out.exists():
        res["verify"] = verify_plain_file(out, corpus, ctx["crcs"])
    else:
        res["verify"] = {"ok": False, "problems": ["no output file"]}
    if not args.keep:
        out.unlink(missing_ok=True)
    return res


# --------------------------------------------------------------------------- compression


def compress_baseline(args, ctx, level: int) -> dict:
    """CPU seconds per GB to gzip the corpus in 1 MiB batches (soclink's default batch).
    Uses `soclink bench-compress` when the binary has it (same library as the agent),
    else Python's zlib (the C zlib: an approximation of soclink's zlib-rs)."""
    corpus, size = ctx["corpus"], ctx["size"]
    r = {"scenario": f"gzip-{level} of the corpus, 1 MiB batches", "input_bytes": size}
    if ctx["has_bench_compress"]:
        before = os.times()
        p = subprocess.run([args.soclink, "bench-compress", str(corpus), "--level", str(level)],
                           capture_output=True, text=True)
        after = os.times()
        if p.returncode == 0:
            cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            r.update(tool="soclink bench-compress", cpu=cpu, output=p.stdout.strip()[-500:])
            return r
        r["bench_compress_error"] = p.stderr.strip()[-300:]
    t0 = time.process_time()
    out = 0
    with open(corpus, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            c = zlib.compressobj(level, zlib.DEFLATED, 31)
            out += len(c.compress(chunk)) + len(c.flush())
    r.update(tool=f"python zlib {zlib.ZLIB_RUNTIME_VERSION}", cpu=time.process_time() - t0,
             gzip_bytes=out, ratio=out / size)
    return r


# --------------------------------------------------------------------------- report


def median_run(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("verify", {}).get("ok")]
    if not ok:
        return runs[-1]
    m = dict(ok[0])
    for k in ("seconds", "cpu_agent", "cpu_relay", "rss_agent", "rss_relay", "tcp_bytes",
              "wire_per_input", "cpu"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            m[k] = statistics.median(vals)
    m["runs"] = len(runs)
    m["runs_ok"] = len(ok)
    if len(runs) > 1:
        m["seconds_all"] = [r.get("seconds") for r in runs]
        m["loadavg_before_all"] = [r.get("loadavg_before") for r in runs]
    return m


def fmt_table(results: list[dict], size: int) -> str:
    gb = size / GB
    hdr = ("| scenario | MB/s | lines/s | CPU s/GB agent/sender | CPU s/GB relay/receiver "
           "| peak RSS agent/sender | peak RSS relay/receiver | wire B per input B | verified |")
    rows = [hdr, "|" + "---|" * 9]
    for r in results:
        if "cpu" in r and "seconds" not in r:
            continue
        if not r.get("verify", {}).get("ok") or "seconds" not in r:
            why = r.get("error") or "; ".join(r.get("verify", {}).get("problems", [])[:2]) or \
                f"missing {r.get('verify', {}).get('missing')}, dup {r.get('verify', {}).get('duplicated_ids')}"
            rows.append(f"| {r['scenario']} | FAILED: {why} | | | | | | | no |")
            continue
        s = r["seconds"]
        relay_cpu = f"{r['cpu_relay'] / gb:.2f}" if "cpu_relay" in r else "–"
        relay_rss = f"{r['rss_relay'] / 2**20:.0f} MiB" if "rss_relay" in r else "–"
        wire = f"{r['wire_per_input']:.3f}" if r.get("wire_per_input") else "–"
        if r.get("tcp_bytes") and "store_gzip_bytes" in r:
            wire += f" (TCP {r['tcp_bytes'] / size:.3f})"
        rows.append(f"| {r['scenario']} | {size / MB / s:.1f} | {r['lines'] / s:,.0f} | "
                    f"{r['cpu_agent'] / gb:.2f} | {relay_cpu} | {r['rss_agent'] / 2**20:.0f} MiB | "
                    f"{relay_rss} | {wire} | yes |")
    return "\n".join(rows)


def fmt_ratios(by: dict[str, dict], size: int) -> str:
    gb = size / GB
    lines = []
    pairs = [("soclink end-to-end gzip-1", "rsyslog TLS (gtls, no compression)"),
             ("soclink end-to-end gzip-6", "rsyslog TLS (gtls, no compression)"),
             ("soclink end-to-end gzip-1", "rsyslog zlib-1 stream, plain TCP"),
             ("soclink end-to-end gzip-6", "rsyslog zlib-6 stream, plain TCP")]
    for a, b in pairs:
        ra, rb = by.get(a), by.get(b)
        if not (ra and rb and ra.get("verify", {}).get("ok") and rb.get("verify", {}).get("ok")
                and "seconds" in ra and "seconds" in rb):
            continue
        thr = rb["seconds"] / ra["seconds"]
        cpu_a = (ra["cpu_agent"] + ra["cpu_relay"]) / gb
        cpu_b = (rb["cpu_agent"] + rb["cpu_relay"]) / gb
        lines.append(f"| {a} vs {b} | {thr:.2f}x | {ra['cpu_agent'] / rb['cpu_agent']:.2f}x | "
                     f"{ra['cpu_relay'] / rb['cpu_relay']:.2f}x | {cpu_a / cpu_b:.2f}x |")
    if not lines:
        return ""
    return ("| soclink / rsyslog | throughput | CPU per GB, agent/sender | CPU per GB, relay/receiver "
            "| CPU per GB, both |\n|---|---|---|---|---|\n" + "\n".join(lines))


def machine_info(args) -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    mem = 0
    try:
        mem = int(open("/proc/meminfo").readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "mem_bytes": mem, "python": platform.python_version(),
            "soclink_version": out([args.soclink, "--version"]),
            "rsyslog_version": (out([args.rsyslogd, "-v"]) or "").splitlines()[0:1],
            "git_commit": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "loadavg_at_start": open("/proc/loadavg").read().split()[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                    help="corpus size (default 1GiB; e.g. 256MiB for a quick run)")
    ap.add_argument("--runs", type=int, default=1,
                    help="runs per scenario; figures are the median of the verified runs")
    ap.add_argument("--levels", default="1,6", help="soclink gzip levels (default 1,6)")
    ap.add_argument("--only", default="",
                    help="comma list of scenario groups: spool,e2e,rsyslog,compress (default all)")
    ap.add_argument("--soclink", default=os.environ.get("SOCLINK_BIN")
                    or str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "soclink"))
    ap.add_argument("--rsyslogd", default=shutil.which("rsyslogd") or "/usr/sbin/rsyslogd")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="corpus cache and run dirs")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--poll", type=float, default=0.2, help="completion poll interval (s)")
    ap.add_argument("--stall", type=float, default=60, help="give up after this long without progress (s)")
    ap.add_argument("--batch-delay", default="100ms",
                    help="soclink [spool] batch_max_delay (default 100ms, so the last partial "
                         "batch of the finite corpus is not held for the default 1s)")
    ap.add_argument("--keep", action="store_true", help="keep stores, spools and rsyslog output")
    args = ap.parse_args()
    # The agent's config needs absolute paths (and the watcher matches them exactly).
    args.work = args.work.resolve()
    args.results = args.results.resolve()

    if not os.access(args.soclink, os.X_OK):
        print(f"no soclink binary at {args.soclink} (cargo build --release, or --soclink PATH)",
              file=sys.stderr)
        return 2
    groups = set(filter(None, args.only.split(","))) or {"spool", "e2e", "rsyslog", "compress"}
    levels = [int(x) for x in args.levels.split(",") if x]
    started = dt.datetime.now(dt.timezone.utc)
    info = machine_info(args)

    corpus, nlines, crcs = ensure_corpus(args.work, args.size)
    size = corpus.stat().st_size
    certs = args.work / "certs"
    if not (certs / "agent.pem").exists():
        subprocess.run([args.soclink, "certs", "dev", "--out", str(certs)], check=True,
                       capture_output=True)
    helptext = subprocess.run([args.soclink, "--help"], capture_output=True, text=True).stdout
    ctx = {"work": args.work, "corpus": corpus, "size": size, "lines": nlines, "crcs": crcs,
           "certs": certs, "has_bench_compress": "bench-compress" in helptext}
    # Warm the page cache so every scenario reads the corpus from memory alike.
    with open(corpus, "rb") as f:
        while f.read(1 << 24):
            pass

    plan: list[tuple[str, callable]] = []
    if "spool" in groups:
        plan += [(f"spool-{l}", lambda l=l: run_soclink(args, ctx, l, False)) for l in levels]
    if "e2e" in groups:
        plan += [(f"e2e-{l}", lambda l=l: run_soclink(args, ctx, l, True)) for l in levels]
    if "rsyslog" in groups:
        if not os.access(args.rsyslogd, os.X_OK):
            print("rsyslogd not found: install rsyslog rsyslog-gnutls; skipping it", file=sys.stderr)
        else:
            plan += [(f"rsyslog-{m}", lambda m=m: run_rsyslog(args, ctx, m))
                     for m in ("tls", "zlib1", "zlib6")]
    if "compress" in groups:
        plan += [(f"gzip-{l}", lambda l=l: compress_baseline(args, ctx, l)) for l in levels]

    results = []
    for key, fn in plan:
        runs = []
        for i in range(args.runs):
            print(f"[{time.strftime('%H:%M:%S')}] {key} run {i + 1}/{args.runs} ...", file=sys.stderr)
            load = open("/proc/loadavg").read().split()[:3]
            r = fn()
            r["loadavg_before"] = load
            v = r.get("verify", {})
            print(f"    {r.get('seconds', 0):.1f}s  verified={v.get('ok')}"
                  + (f"  error={r['error']}" if "error" in r else "")
                  + (f"  problems={v.get('problems', [])[:3]} missing={v.get('missing')}"
                     if v and not v.get("ok") else ""), file=sys.stderr)
            runs.append(r)
        results.append(median_run(runs))

    by = {r["scenario"]: r for r in results}
    table = fmt_table(results, size)
    ratios = fmt_ratios(by, size)
    comp = [r for r in results if "cpu" in r]
    comp_txt = "\n".join(
        f"- {r['scenario']}: {r['cpu'] / (size / GB):.2f} CPU s/GB ({r['tool']}"
        + (f", ratio {r['ratio']:.3f}" if "ratio" in r else "") + ")" for r in comp)
    # run.sh passes its own command line: that is what a reader can repeat.
    cmd = os.environ.get("BENCH_CMD") or " ".join(["python3 bench/bench.py", *sys.argv[1:]])
    report = (f"soclink benchmark {started:%Y-%m-%d %H:%M} UTC — corpus {size:,} bytes, "
              f"{nlines:,} lines; {info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}; "
              f"runs per scenario: {args.runs}\n\n{table}\n")
    if ratios:
        report += f"\n{ratios}\n"
    if comp_txt:
        report += f"\nCompression baseline (CPU to gzip the corpus, no I/O):\n{comp_txt}\n"
    print(report)

    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{started:%Y-%m-%dT%H%MZ}.json"
    out.write_text(json.dumps({
        "started": started.isoformat(), "command": cmd, "machine": info,
        "corpus": {"bytes": size, "lines": nlines, "path": rel(corpus)},
        "units": {"MB": "1e6 bytes", "GB": "1e9 bytes", "cpu": "user+system seconds of the process",
                  "rss": "VmHWM bytes"},
        "runs": args.runs, "results": results, "table_markdown": table, "ratios_markdown": ratios,
    }, indent=2, default=str))
    print(f"JSON: {rel(out)}", file=sys.stderr)
    failed = [r["scenario"] for r in results if "verify" in r and not r["verify"].get("ok")]
    if failed:
        print(f"FAILED scenarios: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
