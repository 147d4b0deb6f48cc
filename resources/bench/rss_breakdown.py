#!/usr/bin/env python3
"""Where a VMM's memory goes (run by resources/bench/rss_breakdown.sh).

Usage: rss_breakdown.py NAME COMMAND [ARGS...]

Boots the guest with COMMAND until its console prints the boot marker
("abide-linux: userspace"), then reads /proc/PID/smaps and prints every
mapping's resident size, summed by what is mapped (the binary, each shared
library, the heap, thread stacks and other anonymous memory, the guest's
RAM), and the total without guest RAM. It then waits for the VMM to exit
(it is killed after 60 s) and prints ru_maxrss from wait4().

The per-mapping sum is what to read: the kernel's VmRSS/VmHWM counters in
/proc/PID/status are per-thread batched and lag behind by up to 64 pages
per thread, while ru_maxrss is taken at exit, after they are folded in.
"""
import os
import re
import select
import subprocess
import sys
import time

MARKER = b"abide-linux: userspace"


def mappings(pid):
    out, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                p = line.split()
                cur = {"perm": p[1], "path": p[5] if len(p) > 5 else "", "size": 0, "rss": 0}
                out.append(cur)
            elif line.startswith("Size:"):
                cur["size"] = int(line.split()[1])
            elif line.startswith("Rss:"):
                cur["rss"] = int(line.split()[1])
    return out


def kind(m, guest_kib):
    path = m["path"]
    if path.startswith("/memfd:abide-guest-ram") or (not path and m["size"] == guest_kib):
        return "guest RAM"
    if path.startswith("/"):
        return os.path.basename(path)
    if path in ("[heap]", "[stack]"):
        return path
    if path.startswith("["):
        return path
    if path.startswith("anon_inode:"):
        return path.split("[")[0]
    # glibc thread stacks: one anonymous rw mapping of the stack size each.
    if m["perm"] == "rw-p" and m["size"] in (1024, 1028, 1036, 2048, 2052, 2060, 8192):
        return f"anonymous {m['size']} KiB (thread stacks)"
    return "other anonymous"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    name, cmd = sys.argv[1], sys.argv[2:]
    guest_kib = int(os.environ.get("RSS_GUEST_MIB", "512")) * 1024
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    seen = b""
    while MARKER not in seen:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        data = os.read(p.stdout.fileno(), 65536) if ready else b""
        if not data:
            p.kill()
            p.wait()
            sys.exit(f"rss-breakdown: {name}: no marker")
        seen = seen[-4096:] + data
    at = time.monotonic() - t0
    maps = mappings(p.pid)
    threads = len(os.listdir(f"/proc/{p.pid}/task"))
    deadline = time.monotonic() + 60
    closed = False
    while not closed and time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 1)
        closed = bool(ready) and not os.read(p.stdout.fileno(), 65536)
    if not closed:
        p.kill()
    # wait4 (not Popen.wait) for the child's ru_maxrss.
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    sums = {}
    for m in maps:
        k = kind(m, guest_kib)
        sums[k] = sums.get(k, 0) + m["rss"]
    guest = sums.pop("guest RAM", 0)
    own = sum(sums.values())
    print(f"== {name}: marker at {at:.2f} s, {threads} threads; resident at the marker: "
          f"guest RAM {guest / 1024:.1f} MiB, the rest {own / 1024:.2f} MiB; "
          f"ru_maxrss {ru.ru_maxrss / 1024:.1f} MiB (minus guest RAM: {(ru.ru_maxrss - guest) / 1024:.2f} MiB)")
    for k, v in sorted(sums.items(), key=lambda kv: -kv[1]):
        if v:
            print(f"   {v:6d} KiB  {k}")


if __name__ == "__main__":
    main()
