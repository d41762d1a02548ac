#!/usr/bin/env python3
"""Fill in `[unknown]` frames of `perf script` output from a binary's symbol table.

perf 6.1 (Debian 12) does not resolve symbols in soclink's release binary, although its
.symtab is there; its frames print as `7d061c [unknown] (/path/soclink)`. This reads
`nm -n --demangle` of the binary once and names each frame by the symbol that contains it
(inlined functions count towards their caller: release builds carry no debug info).
perf prints file offsets; the executable segment sits at a different virtual address
(`readelf -l`), which is presumably what trips perf itself.

    perf script -i agent.perf.data | bench/profiles/symbolize.py BINARY | inferno-collapse-perf
"""
import bisect
import re
import subprocess
import sys

binary = sys.argv[1]
addrs, names = [], []
nm = subprocess.run(["nm", "-n", "--demangle", binary], capture_output=True, text=True, check=True)
for line in nm.stdout.splitlines():
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[0] and parts[1] in ("t", "T", "w", "W"):
        name = re.sub(r"::h[0-9a-f]{16}$", "", parts[2])
        addrs.append(int(parts[0], 16))
        names.append(name)
shift = 0
for line in subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True,
                           check=True).stdout.splitlines():
    f = line.split()
    if f and f[0] == "LOAD" and "E" in f[6:-1]:
        shift = int(f[2], 16) - int(f[1], 16)
frame = re.compile(r"^(\s+)([0-9a-f]+) \[unknown\] \((.*)\)$")
for line in sys.stdin:
    m = frame.match(line)
    if m and m.group(3).endswith(binary.rsplit("/", 1)[-1]):
        i = bisect.bisect_right(addrs, int(m.group(2), 16) + shift) - 1
        if i >= 0:
            line = f"{m.group(1)}{m.group(2)} {names[i]} ({m.group(3)})\n"
    sys.stdout.write(line)
