#!/usr/bin/env python3
"""Syslog TCP ingest benchmark: messages/s from one TCP connection into the agent's spool.

Starts `soclink agent` with a syslog source on a free 127.0.0.1 port, sends N
octet-counted RFC 5424 messages (pre-built, so the sender is not the bottleneck) over
one or more TCP connections, and stops the clock when the spool holds every message.
Prints messages/s, MB/s, the agent's CPU seconds per million messages and its peak RSS.

    python3 bench/syslog_ingest.py [--messages 2000000] [--connections 1] [--soclink PATH]
"""
import argparse, json, os, socket, subprocess, sys, tempfile, threading, time


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / tck


def proc_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmHWM:"):
                return int(l.split()[1])
    return 0


def spooled_events(soclink, state):
    out = subprocess.run([soclink, "spool", "dump", "--batches", "--all", "--state-dir", state],
                         capture_output=True, check=True).stdout
    return sum(json.loads(l)["meta"]["events"] for l in out.splitlines() if l.strip())


def build_payload(n, conn, templates):
    parts = []
    for i in range(n):
        t = templates[i % len(templates)]
        msg = (f"<{134 + i % 8}>1 2026-11-26T01:02:{i % 60:02d}.{i % 1000:03d}Z fw-{i % 50:02d} "
               f"{t[0]} {1000 + i % 5000} {t[1]} - {t[2]} id={conn}-{i}").encode()
        parts.append(b"%d %s" % (len(msg), msg))
    return b"".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2_000_000, help="total messages (default 2,000,000)")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--soclink", default=os.environ.get("SOCLINK_BIN", "target/release/soclink"))
    ap.add_argument("--level", type=int, default=1, help="gzip level of the spool (default 1)")
    a = ap.parse_args()
    templates = [
        ("sshd", "AUTH", "Failed password for invalid user admin from 203.0.113.7 port 52344 ssh2"),
        ("kernel", "FW", "UFW BLOCK IN=eth0 OUT= SRC=198.51.100.23 DST=192.0.2.10 LEN=60 PROTO=TCP SPT=51234 DPT=445"),
        ("nginx", "ACCESS", '10.1.2.3 - - "GET /api/v1/items/42 HTTP/1.1" 200 512 "-" "curl/8.0"'),
        ("FGT60F", "traffic", 'date=2026-11-26 time=01:02:03 devname="FGT" type="traffic" srcip=10.0.0.5 dstip=8.8.8.8 action="accept"'),
        ("postfix", "SMTP", "NOQUEUE: reject: RCPT from unknown[192.0.2.77]: 554 5.7.1 Relay access denied"),
    ]
    per = a.messages // a.connections
    payloads = [build_payload(per, c, templates) for c in range(a.connections)]
    total_bytes = sum(len(p) for p in payloads)
    with tempfile.TemporaryDirectory(prefix="soclink-syslog-bench-") as d:
        port = free_port()
        cfg = os.path.join(d, "agent.toml")
        state = os.path.join(d, "state")
        with open(cfg, "w") as f:
            f.write(f'id = "bench"\nstate_dir = "{state}"\ncontrol_socket = "{d}/c.sock"\n'
                    f'[[source]]\nname = "devices"\ntype = "syslog"\nlisten = ["tcp://127.0.0.1:{port}"]\n'
                    f'[spool]\ncompression_level = {a.level}\nbatch_max_delay = "100ms"\n')
        agent = subprocess.Popen([a.soclink, "agent", "-c", cfg], stderr=open(os.path.join(d, "agent.log"), "w"))
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port)).close(); break
                except OSError:
                    time.sleep(0.05)
            cpu0 = proc_cpu(agent.pid)
            t0 = time.monotonic()

            def send(p):
                s = socket.create_connection(("127.0.0.1", port)); s.sendall(p); s.close()

            ths = [threading.Thread(target=send, args=(p,)) for p in payloads]
            for t in ths: t.start()
            for t in ths: t.join()
            want = per * a.connections
            while True:
                n = spooled_events(a.soclink, state)
                if n >= want:
                    break
                if time.monotonic() - t0 > 600:
                    sys.exit(f"timed out: {n} of {want} spooled")
                time.sleep(0.2)
            wall = time.monotonic() - t0
            cpu = proc_cpu(agent.pid) - cpu0
            hwm = proc_hwm_kib(agent.pid)
        finally:
            agent.terminate(); agent.wait()
        print(f"| messages | connections | wall s | messages/s | MB/s | agent CPU s per 1M msgs | agent peak RSS |")
        print(f"|---|---|---|---|---|---|---|")
        print(f"| {want:,} | {a.connections} | {wall:.2f} | {want / wall:,.0f} | {total_bytes / wall / 1e6:.1f} | "
              f"{cpu / want * 1e6:.2f} | {hwm / 1024:.1f} MiB |")


if __name__ == "__main__":
    main()
