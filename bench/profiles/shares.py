#!/usr/bin/env python3
"""Share of CPU samples per cost category, from inferno-collapse-perf output (folded
stacks). Each sample goes to the category of its innermost frame that matches a rule
(frames searched from the leaf towards the root); memcpy and malloc count as their own
categories wherever they are called from.

    bench/profiles/shares.py agent.folded [relay.folded ...]
"""
import re
import sys

# (category, regex on one frame), in priority order per frame.
RULES = [
    ("compression (zlib-rs deflate)", r"zlib_rs::deflate|flate2::mem::Compress|soclink::pool::gzip_into"),
    ("inflate (zlib-rs, relay verification)", r"zlib_rs::inflate|flate2::gz::bufread::GzDecoder|flate2::mem::Decompress"),
    ("CRC32", r"crc32|flate2::crc"),
    ("JSON check of each line (serde_json, relay)", r"serde_json|serde_core|IgnoredAny|soclink::protocol::check_line"),
    ("JSON encoding of events (agent)", r"soclink::event::|core::str::converts::from_utf8|itoa"),
    ("line splitting (memchr)", r"memchr::|soclink::sources::file::split_lines"),
    ("TLS (ring AES-GCM, rustls)", r"^ring_|ring::|rustls::|tokio_rustls"),
    ("spool/store record framing", r"soclink::spool::format|soclink::relay::store"),
    ("fsync / fdatasync", r"__x64_sys_fsync|__x64_sys_fdatasync|file_write_and_wait|blkdev_issue_flush"),
    ("file read (syscall)", r"__x64_sys_read$|__x64_sys_pread64|ksys_read|ksys_pread64|filemap_read"),
    ("file/socket write (syscall)", r"__x64_sys_write$|__x64_sys_pwrite64|ksys_write|__x64_sys_sendto|__x64_sys_writev|tcp_sendmsg"),
    ("socket receive (syscall)", r"__x64_sys_recvfrom|tcp_recvmsg|__x64_sys_read"),
    ("allocation, mmap/munmap, page faults", r"^malloc|^free$|^_int_|^tcache|^__libc_|^cfree|realloc|__x64_sys_munmap|__x64_sys_mmap|exc_page_fault|asm_exc_page_fault|clear_page"),
    ("threads: futex, scheduling, epoll", r"__x64_sys_futex|__x64_sys_sched_yield|__x64_sys_epoll|finish_task_switch|schedule$|__schedule|irqentry_exit|asm_sysvec"),
    ("other syscalls (open, rename, stat ...)", r"^__x64_sys_|entry_SYSCALL"),
    ("memcpy (elsewhere)", r"memmove|memcpy"),
]
RULES = [(c, re.compile(r)) for c, r in RULES]


def categorize(stack: list[str]) -> str:
    for frame in reversed(stack):
        for cat, rx in RULES:
            if rx.search(frame):
                return cat
    return "other (tokio, std, soclink glue)"


for path in sys.argv[1:]:
    totals: dict[str, int] = {}
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        cat = categorize(stack.split(";"))
        totals[cat] = totals.get(cat, 0) + int(n)
    all_ = sum(totals.values()) or 1
    print(f"{path}:")
    for cat, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * n / all_:5.1f}%  {cat}")
