#!/usr/bin/env python3
"""Boot benchmark inner loop (run by resources/bench/boot.sh; needs KVM).

Usage: boot_bench.py [--runs N] [--warmup N] [--mem-mib M] [--skip NAME=REASON]...
                     [--kill-after-marker NAME=REASON]...
                     :: NAME COMMAND [ARGS...] [:: NAME COMMAND [ARGS...]]...

Boots the guest kernel + initramfs with abide.test=marker under each VMM
configuration RUNS times (round-robin, after WARMUP discarded rounds) and
prints a Markdown table.

Per run:
  wall      time from just before the VMM process is spawned to the moment
            the console line "abide-linux: userspace" is read from its stdout
            (time.monotonic()).
  peak RSS  ru_maxrss of the VMM process from wait4() (its VmHWM; KiB).
  guest RAM RSS of the guest-RAM mappings in /proc/PID/smaps, sampled as
            soon as the marker is seen: the largest anonymous or memfd
            mappings whose sizes add up to the guest memory size (QEMU: the
            one pc.ram / microvm.ram mapping; Abide: its "abide-guest-ram"
            memfd). The guest hardly touches memory between
            the marker and power-off, so
  overhead  = peak RSS - guest RAM RSS  approximates the VMM's own memory.
  KVM exits the VM's exit count up to the marker, read at the same moment
            from KVM's debugfs statistics (/sys/kernel/debug/kvm/PID-FD/exits,
            the sum over the VM's vCPUs; also io_exits and mmio_exits) when
            debugfs is mounted and exactly one VM exists then; otherwise
            not counted (the table says in how many runs it was).

A run succeeds when the marker was seen and the VMM exited with status 0
after the guest powered off. Configurations named with --kill-after-marker
are VMMs that do not end when the guest powers off: they are killed
(SIGKILL) right after the marker's sample, and succeed when the marker was
seen; their "exit" time is that of the kill.
"""
import argparse
import glob
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

MARKER = b"abide-linux: userspace"


def guest_ram_rss_kib(pid, mem_kib):
    """Rss (KiB) of the largest anonymous mappings covering mem_kib."""
    maps = []
    cur = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
                    # Guest RAM is anonymous memory (QEMU) or a memfd (Abide).
                    anon = path == "" or path.startswith("[anon") or path.startswith("/memfd:")
                    cur = {"anon": anon, "size": 0, "rss": 0}
                    maps.append(cur)
                elif cur is not None and line.startswith("Size:"):
                    cur["size"] = int(line.split()[1])
                elif cur is not None and line.startswith("Rss:"):
                    cur["rss"] = int(line.split()[1])
    except OSError:
        return None
    total_size = total_rss = 0
    for m in sorted((m for m in maps if m["anon"]), key=lambda m: -m["size"]):
        if total_size >= mem_kib * 0.98:
            break
        total_size += m["size"]
        total_rss += m["rss"]
    return total_rss


KVM_DEBUGFS = "/sys/kernel/debug/kvm"
EXIT_STATS = ("exits", "io_exits", "mmio_exits")
# Printed per run when present, to see where the exits come from.
EXTRA_STATS = ("halt_exits", "irq_exits", "irq_window_exits", "request_irq_exits",
               "signal_exits", "insn_emulation", "hypercalls")


def held_by_nested_host(vm_dir):
    """Whether the VM is the idle one the nested test host holds open
    (resources/nested/hold-kvm.py): debugfs names each VM PID-FD."""
    pid = os.path.basename(vm_dir).split("-")[0]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hold-kvm.py" in f.read()
    except OSError:
        return False


def kvm_exit_counts():
    """{stat: count} of the one VM in KVM's debugfs (besides the nested
    host's idle one), or None."""
    vms = [d for d in glob.glob(os.path.join(KVM_DEBUGFS, "*-*"))
           if os.path.isdir(d) and not held_by_nested_host(d)]
    if len(vms) != 1:
        return None
    counts = {}
    for stat in EXIT_STATS:
        try:
            with open(os.path.join(vms[0], stat)) as f:
                counts[stat] = int(f.read().strip())
        except (OSError, ValueError):
            return None
    for stat in EXTRA_STATS:
        try:
            with open(os.path.join(vms[0], stat)) as f:
                counts[stat] = int(f.read().strip())
        except (OSError, ValueError):
            pass
    return counts


def one_run(cmd, mem_kib, timeout, log_path, kill_after_marker=False):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    fd = p.stdout.fileno()
    buf = b""
    t_marker = None
    guest_rss = None
    exits = None
    killed = False
    deadline = t0 + timeout
    timed_out = False
    with open(log_path, "wb") as log:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                p.kill()
                break
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            log.write(chunk)
            if t_marker is None:
                buf += chunk
                if MARKER in buf:
                    t_marker = time.monotonic()
                    guest_rss = guest_ram_rss_kib(p.pid, mem_kib)
                    exits = kvm_exit_counts()
                    if kill_after_marker:
                        p.kill()
                        killed = True
                else:
                    buf = buf[-len(MARKER):]
    # Bounded: a VMM stuck in the kernel (seen inside the nested test host)
    # may not die even on SIGKILL; report it instead of hanging the bench.
    wait_end = time.monotonic() + (30 if (timed_out or killed) else timeout)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > wait_end:
            if not timed_out and not killed:
                p.kill()
                timed_out = True
                wait_end = time.monotonic() + 30
                continue
            print(f"boot-bench: pid {p.pid} ({cmd[0]}) did not die within 30 s of SIGKILL; "
                  "abandoning it", file=sys.stderr, flush=True)
            return {"wall": None, "total": time.monotonic() - t0, "rc": None,
                    "timed_out": True, "killed": killed, "exits": exits,
                    "peak_kib": 0, "guest_kib": guest_rss}
        time.sleep(0.01)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall": None if t_marker is None else t_marker - t0,
        "total": time.monotonic() - t0,
        "rc": p.returncode,
        "timed_out": timed_out,
        "killed": killed,
        "exits": exits,
        "peak_kib": ru.ru_maxrss,
        "guest_kib": guest_rss,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-mib", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--logdir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--skip", action="append", default=[], metavar="NAME=REASON")
    ap.add_argument("--kill-after-marker", action="append", default=[], metavar="NAME=REASON")
    # Configurations follow the options: ":: NAME COMMAND [ARGS...]" each.
    argv = sys.argv[1:]
    first = argv.index("::") if "::" in argv else len(argv)
    a = ap.parse_args(argv[:first])
    configs = []
    for tok in argv[first:]:
        if tok == "::":
            configs.append([])
        else:
            configs[-1].append(tok)
    configs = [(c[0], c[1:]) for c in configs if c]
    results = {name: [] for name, _ in configs}
    failures = {name: [] for name, _ in configs}
    kill = dict(k.partition("=")[::2] for k in a.kill_after_marker)
    mem_kib = a.mem_mib * 1024
    total_rounds = a.warmup + a.runs
    for rnd in range(total_rounds):
        warm = rnd < a.warmup
        for name, cmd in configs:
            log = os.path.join(a.logdir, f"boot-{name}-{rnd}.log")
            r = one_run(cmd, mem_kib, a.timeout, log, kill_after_marker=name in kill)
            ok = r["wall"] is not None and not r["timed_out"] and (r["rc"] == 0 or r["killed"])
            tag = "warmup" if warm else f"run {rnd - a.warmup + 1}/{a.runs}"
            if ok:
                ex = r["exits"]
                ex_s = ("KVM exits not counted" if ex is None else
                        f"KVM exits {ex['exits']} (io {ex['io_exits']}, mmio {ex['mmio_exits']}"
                        + "".join(f", {k} {ex[k]}" for k in EXTRA_STATS if k in ex) + ")")
                end = "killed" if r["killed"] else "exit"
                print(f"boot-bench: {name} {tag}: userspace after {r['wall']:.3f} s, "
                      f"{end} after {r['total']:.3f} s, peak RSS {r['peak_kib'] / 1024:.1f} MiB, "
                      f"guest RAM RSS {((r['guest_kib'] or 0) / 1024):.1f} MiB, {ex_s}",
                      file=sys.stderr, flush=True)
            else:
                why = "timed out" if r["timed_out"] else (
                    f"exit status {r['rc']}" + ("" if r["wall"] is not None else ", no userspace marker"))
                print(f"boot-bench: {name} {tag}: FAILED ({why}); console log tail ({log}):",
                      file=sys.stderr, flush=True)
                with open(log, "rb") as f:
                    tail = f.read().decode(errors="replace").replace("\r", "").splitlines()[-15:]
                for line in tail:
                    print(f"    {line}", file=sys.stderr)
            if warm:
                continue
            (results if ok else failures)[name].append(r)

    print()
    print(f"Boot to `abide-linux: userspace`: {a.runs} runs each (+{a.warmup} warm-up), "
          f"guest RAM {a.mem_mib} MiB, 2 vCPUs.")
    print()
    print("| config | ok runs | median wall (s) | min (s) | max (s) | median peak RSS (MiB) "
          "| median overhead RSS (MiB) | median KVM exits to marker (io / mmio) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in a.skip:
        name, _, reason = s.partition("=")
        print(f"| {name} | NOT MEASURED: {reason} | | | | | | |")
    bad = False
    for name, _ in configs:
        rs = results[name]
        nf = len(failures[name])
        if nf:
            bad = True
        if not rs:
            print(f"| {name} | 0/{a.runs} (all failed) | | | | | | |")
            continue
        walls = [r["wall"] for r in rs]
        peaks = [r["peak_kib"] / 1024 for r in rs]
        over = [(r["peak_kib"] - r["guest_kib"]) / 1024 for r in rs if r["guest_kib"] is not None]
        exs = [r["exits"] for r in rs if r["exits"] is not None]
        if exs:
            med = {k: statistics.median(e[k] for e in exs) for k in EXIT_STATS}
            ex_s = f"{med['exits']:.0f} ({med['io_exits']:.0f} / {med['mmio_exits']:.0f})"
            if len(exs) < len(rs):
                ex_s += f", {len(exs)} of {len(rs)} runs counted"
        else:
            ex_s = "not counted"
        print(f"| {name} | {len(rs)}/{a.runs} | {statistics.median(walls):.3f} | {min(walls):.3f} | "
              f"{max(walls):.3f} | {statistics.median(peaks):.1f} | "
              f"{(statistics.median(over) if over else float('nan')):.1f} | {ex_s} |")
    for name, reason in kill.items():
        if results.get(name):
            print(f"\n{name}: killed right after the marker ({reason}); "
                  "its peak RSS is the peak up to then.")
    return 1 if bad else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
