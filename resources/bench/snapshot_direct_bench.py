#!/usr/bin/env python3
"""Restore to running directly on this machine's /dev/kvm (run by
resources/bench/snapshot_peers.sh --direct).

Usage: snapshot_direct_bench.py --kernel VMLINUX --initrd INITRD --abide BIN
           [--abide-before BIN] [--firecracker BIN] [--runs N] [--warmup N]
           [--mem-mib M] [--boot-secs S] [--timeout SECS] [--workdir DIR]

On PVM (this project's /dev/kvm) a stock kernel never reaches userspace,
so the guest is the PVH vmlinux stopped BOOT_SECS (default 3) into its
boot, 2 vCPUs, M MiB (default 256): the same guest for every VMM, as in
resources/bench/snapshot.sh's native reference. Each round, for each VMM:
boot, wait, pause and save, kill, restore in a new process.

  save wall     Abide: `abide snapshot --api-socket S --stop FILE`;
                Firecracker: PATCH /vm Paused then PUT /snapshot/create
                (Full).
  restore -> running
                from spawning the restoring process to: Abide's
                "abide: restore ... ready_ms=" line on stderr (printed just
                before the vCPU threads start; ABIDE_RESTORE_TIMINGS=1);
                Firecracker: the reply to PUT /snapshot/load (File memory
                backend, resume_vm=true), after its API socket appeared.
  ready_ms      Abide's own figure: from main() to that line.
  all verified  Abide with memory.chunks: from spawn to the memory loader's
                "restore memory verified" line (every chunk checked and in
                guest RAM). Before it, a chunk is verified when first
                touched; the guest runs meanwhile.
  alive         the restored process still runs 300 ms after "running"
                (its vCPUs were resumed; the guest cannot print anything
                this early in its boot).

VMMs: abide (HEAD: chunk hashes, lazy), abide-eager (HEAD with
ABIDE_RESTORE_EAGER=1: every chunk verified on both cores before the
start), abide-before (--abide-before: a build without chunk hashes, which
hashes all of memory before the start), firecracker (verifies nothing).
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from snapshot_peers_bench import alloc_mib, http, kill, ok, wait_socket  # noqa: E402


class Abide:
    def __init__(self, a, work, binary, env=None):
        self.a, self.work, self.bin, self.env = a, work, binary, env or {}

    def boot(self):
        self.sock = os.path.join(self.work, "boot.sock")
        self.snap = os.path.join(self.work, "snap")
        return subprocess.Popen(
            [self.bin, "run", "--kernel", self.a.kernel, "--initrd", self.a.initrd,
             "--cmdline", "console=ttyS0 quiet", "--machine", "pc-1.0", "--cpus", "2",
             "--memory", f"{self.a.mem_mib}M", "--serial", "null", "--api-socket", self.sock],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def save(self, p):
        wait_socket(self.sock, self.a.timeout, poll=0.0002)
        r = subprocess.run([self.bin, "snapshot", "--api-socket", self.sock, "--stop", self.snap],
                           capture_output=True, text=True, timeout=self.a.timeout)
        if r.returncode != 0:
            raise RuntimeError(f"abide snapshot: {r.stderr.strip()[-300:]}")
        p.wait(timeout=self.a.timeout)
        return [self.snap]

    def restore(self):
        self.err = os.path.join(self.work, "restore.err")
        env = dict(os.environ, ABIDE_RESTORE_TIMINGS="1", **self.env)
        t0 = time.monotonic()
        q = subprocess.Popen([self.bin, "restore", self.snap, "--serial", "null",
                              "--api-socket", os.path.join(self.work, "restore.sock")],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(self.err, "wb"), env=env)
        deadline = t0 + self.a.timeout
        while time.monotonic() < deadline:
            with open(self.err, "rb") as f:
                err = f.read()
            if b"ready_ms=" in err:
                t_run = time.monotonic()
                # The line is written in pieces: read it once it is whole.
                while b"\n" not in err[err.index(b"ready_ms="):] and time.monotonic() < deadline:
                    time.sleep(0.0002)
                    with open(self.err, "rb") as f:
                        err = f.read()
                m = re.search(rb"restore (verify_ms=[^\n]*)\n", err)
                self.detail = m.group(1).decode(errors="replace") if m else ""
                ready = re.search(rb"ready_ms=([0-9.]+)", err)
                self.ready_ms = float(ready.group(1)) if ready else None
                break
            if q.poll() is not None:
                raise RuntimeError(f"abide restore exited: {err.decode(errors='replace')[-300:]}")
            time.sleep(0.0002)
        else:
            raise RuntimeError("no restore timing line from abide")
        # The memory loader's line, when there is one.
        self.verified_ms = None
        self.loader = ""
        if "memory=lazy" in self.detail:
            while time.monotonic() < deadline:
                with open(self.err, "rb") as f:
                    err = f.read()
                m = re.search(rb"abide: restore memory verified: ([^\n]*)\n", err)
                if m:
                    self.verified_ms = (time.monotonic() - t0) * 1e3
                    self.loader = m.group(1).decode(errors="replace")
                    break
                if q.poll() is not None:
                    raise RuntimeError(f"abide restore exited: {err.decode(errors='replace')[-300:]}")
                time.sleep(0.0005)
        return q, t0, t_run


class Firecracker:
    def __init__(self, a, work):
        self.a, self.work = a, work
        self.ready_ms = None
        self.verified_ms = None
        self.detail = ""
        self.loader = ""

    def boot(self):
        self.sock = os.path.join(self.work, "boot.sock")
        self.state = os.path.join(self.work, "vmstate")
        self.mem = os.path.join(self.work, "memory")
        cfg = os.path.join(self.work, "config.json")
        with open(cfg, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": self.a.kernel, "initrd_path": self.a.initrd,
                                       "boot_args": "console=ttyS0 quiet"},
                       "machine-config": {"vcpu_count": 2, "mem_size_mib": self.a.mem_mib},
                       "drives": []}, f)
        self.log = open(os.path.join(self.work, "boot.log"), "wb")
        return subprocess.Popen([self.a.firecracker, "--api-sock", self.sock, "--config-file", cfg],
                                stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def save(self, p):
        if p.poll() is not None:
            raise RuntimeError(f"firecracker exited during boot (status {p.returncode}; "
                               f"log {self.work}/boot.log)")
        ok(*http(self.sock, "PATCH", "/vm", {"state": "Paused"}, timeout=self.a.timeout), "PATCH /vm")
        ok(*http(self.sock, "PUT", "/snapshot/create",
                 {"snapshot_type": "Full", "snapshot_path": self.state, "mem_file_path": self.mem},
                 timeout=self.a.timeout), "snapshot/create")
        kill(p)
        return [self.state, self.mem]

    def restore(self):
        rsock = os.path.join(self.work, "restore.sock")
        self.rlog = open(os.path.join(self.work, "restore.log"), "wb")
        t0 = time.monotonic()
        q = subprocess.Popen([self.a.firecracker, "--api-sock", rsock],
                             stdin=subprocess.DEVNULL, stdout=self.rlog, stderr=subprocess.STDOUT)
        wait_socket(rsock, self.a.timeout, poll=0.0002)
        ok(*http(rsock, "PUT", "/snapshot/load",
                 {"snapshot_path": self.state,
                  "mem_backend": {"backend_path": self.mem, "backend_type": "File"},
                  "resume_vm": True}, timeout=self.a.timeout), "snapshot/load")
        return q, t0, time.monotonic()


def one_run(name, a, rnd):
    work = os.path.join(a.workdir, f"snapshot-direct-{name}-{rnd}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if name == "firecracker":
        v = Firecracker(a, work)
    elif name == "abide-before":
        v = Abide(a, work, a.abide_before)
    elif name == "abide-eager":
        v = Abide(a, work, a.abide, {"ABIDE_RESTORE_EAGER": "1"})
    else:
        v = Abide(a, work, a.abide)
    p = q = None
    try:
        p = v.boot()
        time.sleep(a.boot_secs)
        t = time.monotonic()
        files = v.save(p)
        save_ms = (time.monotonic() - t) * 1e3
        kill(p)
        size = alloc_mib(files)
        # The file in the page cache, as after a save (and for every VMM).
        q, t0, t_run = v.restore()
        time.sleep(0.3)
        alive = q.poll() is None
        return {"save_ms": save_ms, "run_ms": (t_run - t0) * 1e3, "ready_ms": v.ready_ms,
                "verified_ms": v.verified_ms, "file_mib": size, "alive": alive,
                "detail": v.detail, "loader": v.loader}
    finally:
        kill(p)
        kill(q)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--abide", required=True)
    ap.add_argument("--abide-before")
    ap.add_argument("--firecracker")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--boot-secs", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--keep", action="store_true", help="keep each run's files")
    a = ap.parse_args()
    names = ["abide", "abide-eager"]
    if a.abide_before:
        names.append("abide-before")
    if a.firecracker:
        names.append("firecracker")
    results = {n: [] for n in names}
    bad = False
    for rnd in range(a.warmup + a.runs):
        warm = rnd < a.warmup
        tag = "warmup" if warm else f"run {rnd - a.warmup + 1}/{a.runs}"
        for name in names:
            try:
                r = one_run(name, a, rnd)
            except Exception as e:
                print(f"snapshot-direct: {name} {tag}: FAILED: {e}", file=sys.stderr, flush=True)
                bad = bad or not warm
                continue
            extra = f"; ready_ms {r['ready_ms']:.1f}" if r["ready_ms"] is not None else ""
            if r["verified_ms"] is not None:
                extra += f"; all verified at {r['verified_ms']:.1f} ms ({r['loader']})"
            print(f"snapshot-direct: {name} {tag}: save {r['save_ms']:.0f} ms, restore -> running "
                  f"{r['run_ms']:.1f} ms, alive {r['alive']}, files {r['file_mib']:.1f} MiB{extra}"
                  + (f"; {r['detail']}" if r["detail"] else ""), file=sys.stderr, flush=True)
            if not warm:
                results[name].append(r)
    print()
    print(f"Restore to running directly on /dev/kvm: PVH vmlinux stopped {a.boot_secs:g} s into its boot, "
          f"{a.mem_mib} MiB, 2 vCPUs; {a.runs} runs each (+{a.warmup} warm-up), medians (min-max).")
    print()
    print("| VMM | ok runs | save wall (ms) | restore → running (ms) | Abide ready_ms | all memory verified (ms from spawn) "
          "| files (MiB allocated) | alive 300 ms later |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        rs = results[name]
        if not rs:
            print(f"| {name} | 0/{a.runs} (all failed) | | | | | | |")
            continue

        def med(k):
            xs = [r[k] for r in rs if r[k] is not None]
            if not xs:
                return ""
            return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"
        print(f"| {name} | {len(rs)}/{a.runs} | {statistics.median(r['save_ms'] for r in rs):.0f} | "
              f"{med('run_ms')} | {med('ready_ms')} | {med('verified_ms')} | "
              f"{statistics.median(r['file_mib'] for r in rs):.1f} | {sum(r['alive'] for r in rs)}/{len(rs)} |")
    if a.firecracker and results["firecracker"] and results["abide"]:
        fc = statistics.median(r["run_ms"] for r in results["firecracker"])
        ab = statistics.median(r["run_ms"] for r in results["abide"])
        print()
        print(f"abide / firecracker (restore → running, medians): {ab / fc:.2f}x")
    return 1 if bad else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
