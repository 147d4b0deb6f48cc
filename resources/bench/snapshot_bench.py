#!/usr/bin/env python3
"""Snapshot save/restore benchmark inner loop (run by resources/bench/snapshot.sh; needs KVM).

Usage: snapshot_bench.py --abide BIN --kernel BZIMAGE --initrd INITRD
                         [--runs N] [--warmup N] [--sizes MIB:FILL[,MIB:FILL...]]
                         [--only abide,qemu] [--cpus N] [--timeout SECS] [--workdir DIR]
                         [--keep-logs] [--verbose]

For every guest size (MiB of RAM : MiB of random data the guest writes to
its tmpfs) and every VMM, RUNS times (round-robin after WARMUP discarded
rounds), one run is:

  1. Boot the Linux test guest with
     "console=ttyS0 quiet abide.test=progress abide.fill_mib=FILL"
     (2 vCPUs, serial console on the VMM's stdout, read through a pipe by a
     thread that timestamps every line with time.monotonic()). Wait for
     "progress-ready" and three "progress n=" lines after it.
  2. Save, and stop the VM.
       Abide: `abide snapshot --api-socket SOCK --stop FILE`; save wall =
              wall time of that command (CLI start to its JSON reply; the
              file is written, fsync'd and renamed by then). Its save_ms and
              pause_ms are recorded too.
       QEMU:  (untimed set-up: migration capability "events" on,
              max-bandwidth unlimited as `virsh save` does, the open FILE
              passed with getfd.) save wall = QMP `stop` sent -> `migrate
              fd:` -> MIGRATION event "completed" received. QEMU 7.2 has no
              file: URI; fd: on a regular file is the same thing.
  3. Restore in a new process, with the same serial pipe arrangement.
       Abide: ABIDE_RESTORE_TIMINGS=1 `abide restore FILE --serial stdio
              --api-socket SOCK2`. first instruction = spawn -> its stderr
              line "abide: restore verify_ms=.. ready_ms=.." read (printed
              just before the vCPU threads start). Also recorded: verify_ms,
              abi_ms, load_ms, ready_ms (in-process, from main()).
       QEMU:  the boot command line plus `-incoming defer`; over QMP:
              events on, getfd FILE, `migrate-incoming fd:`, wait for the
              MIGRATION event "completed", `cont`. first instruction =
              spawn -> `cont` reply (the vCPUs run before QEMU replies).
              Also recorded: spawn -> "completed" event.
     next progress line = spawn -> the first "progress n=K" line completed
     on the new console. It includes the rest of the guest's 100 ms sleep
     and its fork/exec of usleep, so it is first instruction + up to
     ~100 ms + whatever the guest waits for (page faults on lazily mapped
     memory, timers). K must be the number after the last one printed
     before the save ("continuity").
  4. Quit the restored VM, delete FILE.
"""
import argparse
import faulthandler
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_qmp  # noqa: E402
from qemu_qmp import Fail, Qmp  # noqa: E402  (Fail and Qmp also for migrate_bench.py)

PROGRESS = re.compile(r"abide-linux: progress n=(\d+)")
READY = "abide-linux: progress-ready"


VERBOSE = False
T_START = time.monotonic()


def step(msg):
    if VERBOSE:
        print(f"snapshot-bench: [{time.monotonic() - T_START:8.1f} s] {msg}", file=sys.stderr, flush=True)


class Lines:
    """Reads a pipe in a thread; keeps (monotonic time, line) pairs."""

    def __init__(self, stream, log_path):
        self.lines = []
        self.partial = b""
        self.eof = False
        self.cv = threading.Condition()
        self.log = open(log_path, "wb")
        self.fd = stream.fileno()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            now = time.monotonic()
            if not chunk:
                break
            self.log.write(chunk)
            buf += chunk
            *done, buf = buf.split(b"\n")
            if done:
                with self.cv:
                    self.lines.extend((now, ln.decode(errors="replace").rstrip("\r")) for ln in done)
                    self.cv.notify_all()
        with self.cv:
            self.partial = buf
            self.eof = True
            self.cv.notify_all()
        self.log.close()

    def wait_for(self, pred, deadline, start=0):
        """First (index, time, line, match) at or after index `start` where
        pred(line) is truthy; Fail on EOF or at the deadline."""
        i = start
        with self.cv:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    m = pred(line)
                    if m:
                        return i, t, line, m
                    i += 1
                if self.eof:
                    raise Fail("console closed before the expected line")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fail("timed out waiting on the console")
                self.cv.wait(min(left, 1.0))

    def join(self, timeout=10):
        self.t.join(timeout)

    def rest(self):
        with self.cv:
            return self.partial.decode(errors="replace")

    def last_progress(self):
        with self.cv:
            ns = [int(m.group(1)) for _, ln in self.lines for m in [PROGRESS.search(ln)] if m]
        return max(ns) if ns else None

    def tail(self, n=15):
        with self.cv:
            out = [ln for _, ln in self.lines[-n:]]
            if self.partial:
                out.append(self.partial.decode(errors="replace") + "  (no newline)")
        return out


def spawn(cmd, env=None):
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)


def reap(p, timeout=20):
    """Exit status and rusage (wait4) of p; killed after `timeout` s. Never
    blocks for good: a process that does not die within 30 s of SIGKILL
    (stuck in the kernel) is reported and left behind."""
    if p.returncode is not None:
        return p.returncode, None
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p.returncode, ru
        if time.monotonic() > deadline:
            if killed:
                raise Fail(f"pid {p.pid} ({p.args[0]}) does not die after SIGKILL")
            step(f"killing pid {p.pid}")
            p.kill()
            killed = True
            deadline = time.monotonic() + 30
        time.sleep(0.01)


def wait_booted(con, deadline):
    i, _, _, _ = con.wait_for(lambda ln: READY in ln, deadline)
    # Three progress lines after "ready": the guest is in its steady loop.
    con.wait_for(lambda ln: (m := PROGRESS.search(ln)) and int(m.group(1)) >= 3, deadline, i)


def wait_resumed(con, deadline, prefix):
    """The first progress line on the restored console. The saved VM may
    have stopped in the middle of a line (the UART sends one character per
    exit): `prefix`, what the old console had after its last newline, is
    put in front of the first line."""
    first = [True]

    def pred(ln):
        if first[0]:
            first[0] = False
            ln = prefix + ln
        return PROGRESS.search(ln)
    i, t, _, m = con.wait_for(pred, deadline)
    # Diagnostic: the gap to the line after it (steady state is ~100 ms).
    _, t2, _, _ = con.wait_for(lambda ln: PROGRESS.search(ln), deadline, i + 1)
    return t, int(m.group(1)), (t2 - t) * 1000.0


def ms(a, b):
    return (b - a) * 1000.0


class Ctx:
    def __init__(self, a, work):
        self.a = a
        self.work = work
        self.logs = []

    def log(self, name):
        p = os.path.join(self.work, name)
        self.logs.append(p)
        return p


def run_abide(ctx, mib, fill, tag):
    a = ctx.a
    w = ctx.work
    snap = os.path.join(w, "abide.snap")
    sock1, sock2 = os.path.join(w, "abide-run.sock"), os.path.join(w, "abide-restore.sock")
    for f in (snap, sock1, sock2):
        if os.path.exists(f):
            os.unlink(f)
    cmdline = f"{a.cmdline} abide.fill_mib={fill}"
    r = {}
    procs = []
    try:
        deadline = time.monotonic() + a.timeout
        p = spawn([a.abide, "run", "--kernel", a.kernel, "--initrd", a.initrd, "--cmdline", cmdline,
                   "--machine", a.machine, "--cpus", str(a.cpus), "--memory", f"{mib}M",
                   "--serial", "stdio", "--api-socket", sock1])
        procs.append(p)
        con = Lines(p.stdout, ctx.log(f"{tag}-boot.console"))
        err = Lines(p.stderr, ctx.log(f"{tag}-boot.stderr"))
        ctx.cur = (con, err)
        wait_booted(con, deadline)
        step("booted; abide snapshot --stop")

        t0 = time.monotonic()
        s = subprocess.run([a.abide, "snapshot", "--api-socket", sock1, "--stop", snap],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=a.timeout)
        t1 = time.monotonic()
        if s.returncode != 0:
            raise Fail(f"abide snapshot exited {s.returncode}: {s.stderr.decode(errors='replace').strip()}")
        rep = json.loads(s.stdout)
        r["save_wall"] = ms(t0, t1)
        r["save_ms"] = rep.get("save_ms")
        r["pause_ms"] = rep.get("pause_ms")
        step("saved; waiting for abide run to exit")
        rc, _ = reap(p)
        con.join()
        if rc != 0:
            raise Fail(f"abide run exited {rc} after snapshot --stop")
        last, prefix = con.last_progress(), con.rest()
        r["file_mib"] = os.path.getsize(snap) / (1 << 20)

        step("abide restore")
        env = dict(os.environ, ABIDE_RESTORE_TIMINGS="1")
        deadline = time.monotonic() + a.timeout
        t0 = time.monotonic()
        p = spawn([a.abide, "restore", snap, "--serial", "stdio", "--api-socket", sock2], env=env)
        procs.append(p)
        con = Lines(p.stdout, ctx.log(f"{tag}-restore.console"))
        err = Lines(p.stderr, ctx.log(f"{tag}-restore.stderr"))
        ctx.cur = (con, err)
        _, t_ready, line, _ = err.wait_for(lambda ln: "abide: restore verify_ms=" in ln, deadline)
        r["first_insn"] = ms(t0, t_ready)
        for k, v in re.findall(r"(\w+_ms)=([0-9.]+)", line):
            r[k] = float(v)
        t_prog, n, gap = wait_resumed(con, deadline, prefix)
        r["next_line"] = ms(t0, t_prog)
        r["insn_to_line"] = r["next_line"] - r["first_insn"]
        r["gap_after"] = gap
        r["continuity"] = last is not None and n == last + 1
        r["resumed"] = f"{last}->{n}"
        step("resumed; abide ctl quit")
        subprocess.run([a.abide, "ctl", "--api-socket", sock2, "quit"], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
        rc, ru = reap(p)
        r["minflt"] = ru.ru_minflt
        if rc != 0:
            raise Fail(f"abide restore exited {rc} after ctl quit")
        return r
    finally:
        for p in procs:
            if p.returncode is None:
                try:
                    reap(p, 0)
                except Fail as e:
                    print(f"snapshot-bench: warning: {e}", file=sys.stderr, flush=True)
        if os.path.exists(snap):
            os.unlink(snap)


def qemu_cmd(a, mib, fill, qmp):
    cmdline = f"{a.cmdline} abide.fill_mib={fill}"
    return [a.qemu, "-enable-kvm", "-M", "pc", "-cpu", "host", "-smp", str(a.cpus), "-m", str(mib),
            "-kernel", a.kernel, "-initrd", a.initrd, "-append", cmdline,
            "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-qmp", f"unix:{qmp},server=on,wait=off"]


def run_qemu(ctx, mib, fill, tag):
    a = ctx.a
    w = ctx.work
    snap = os.path.join(w, "qemu.mig")
    q1, q2 = os.path.join(w, "qemu-run.qmp"), os.path.join(w, "qemu-restore.qmp")
    for f in (snap, q1, q2):
        if os.path.exists(f):
            os.unlink(f)
    r = {}
    procs = []
    try:
        deadline = time.monotonic() + a.timeout
        p = spawn(qemu_cmd(a, mib, fill, q1))
        procs.append(p)
        con = Lines(p.stdout, ctx.log(f"{tag}-boot.console"))
        err = Lines(p.stderr, ctx.log(f"{tag}-boot.stderr"))
        ctx.cur = (con, err)
        qmp = Qmp(q1, deadline)
        wait_booted(con, deadline)
        step("booted; migrate set-up")
        qemu_qmp.save_setup(qmp, snap)  # not timed
        qmp.deadline = time.monotonic() + a.timeout
        t0 = time.monotonic()
        qemu_qmp.save(qmp)
        t1 = time.monotonic()
        r["save_wall"] = ms(t0, t1)
        info = qmp.cmd("query-migrate")
        r["total_time"] = info.get("total-time")
        step("saved; quit")
        qmp.cmd("quit")
        qmp.close()
        reap(p)
        con.join()
        last, prefix = con.last_progress(), con.rest()
        r["file_mib"] = os.path.getsize(snap) / (1 << 20)

        step("qemu -incoming")
        deadline = time.monotonic() + a.timeout
        t0 = time.monotonic()
        p = spawn(qemu_cmd(a, mib, fill, q2) + ["-incoming", "defer"])
        procs.append(p)
        con = Lines(p.stdout, ctx.log(f"{tag}-restore.console"))
        err = Lines(p.stderr, ctx.log(f"{tag}-restore.stderr"))
        ctx.cur = (con, err)
        qmp = Qmp(q2, deadline)
        qemu_qmp.incoming(qmp, snap)
        r["incoming_done"] = ms(t0, time.monotonic())
        qmp.cmd("cont")
        r["first_insn"] = ms(t0, time.monotonic())
        t_prog, n, gap = wait_resumed(con, deadline, prefix)
        r["next_line"] = ms(t0, t_prog)
        r["insn_to_line"] = r["next_line"] - r["first_insn"]
        r["gap_after"] = gap
        r["continuity"] = last is not None and n == last + 1
        r["resumed"] = f"{last}->{n}"
        step("resumed; quit")
        qmp.cmd("quit")
        qmp.close()
        _, ru = reap(p)
        r["minflt"] = ru.ru_minflt
        return r
    finally:
        for p in procs:
            if p.returncode is None:
                try:
                    reap(p, 0)
                except Fail as e:
                    print(f"snapshot-bench: warning: {e}", file=sys.stderr, flush=True)
        if os.path.exists(snap):
            os.unlink(snap)


def fmt_mem(mib):
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def med(rs, key):
    v = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(v) if v else None


def f0(x):
    return "" if x is None else f"{x:.0f}"


def f1(x):
    return "" if x is None else f"{x:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--abide", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--cmdline", default="console=ttyS0 quiet abide.test=progress")
    ap.add_argument("--machine", default="pc-1.0")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sizes", default="256:64,2048:512")
    ap.add_argument("--only", default="abide,qemu")
    ap.add_argument("--timeout", type=float, default=120, help="per step (boot, save, restore)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print each step with a time stamp")
    a = ap.parse_args()
    global VERBOSE
    VERBOSE = a.verbose
    sizes = []
    for s in a.sizes.split(","):
        mib, _, fill = s.partition(":")
        sizes.append((int(mib), int(fill or 0)))
    vmms = [v for v in a.only.split(",") if v]
    for v in vmms:
        if v not in ("abide", "qemu"):
            ap.error(f"--only: unknown VMM {v}")
    work = a.workdir or tempfile.mkdtemp(prefix="abide-snapbench.")
    os.makedirs(work, exist_ok=True)
    ctx = Ctx(a, work)
    runners = {"abide": run_abide, "qemu": run_qemu}
    configs = [(v, mib, fill) for mib, fill in sizes for v in vmms]
    results = {c: [] for c in configs}
    failures = {c: 0 for c in configs}
    for rnd in range(a.warmup + a.runs):
        warm = rnd < a.warmup
        tag = "warmup" if warm else f"run {rnd - a.warmup + 1}/{a.runs}"
        for c in configs:
            v, mib, fill = c
            name = f"{v}-{fmt_mem(mib).replace(' ', '')}"
            ctx.cur = None
            # Should a step hang past its own time-outs, say where.
            faulthandler.dump_traceback_later(a.timeout * 4, repeat=True)
            step(f"{name} {tag}")
            try:
                r = runners[v](ctx, mib, fill, f"{name}-{rnd}")
            except (Fail, OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
                print(f"snapshot-bench: {name} {tag}: FAILED: {e}", file=sys.stderr, flush=True)
                if ctx.cur:
                    for label, l in zip(("console", "stderr"), ctx.cur):
                        for line in l.tail():
                            print(f"    {label}: {line}", file=sys.stderr)
                if not warm:
                    failures[c] += 1
                continue
            extra = " ".join(f"{k}={x:.1f}" if isinstance(x, float) else f"{k}={x}"
                             for k, x in r.items()
                             if k not in ("save_wall", "first_insn", "next_line", "file_mib"))
            print(f"snapshot-bench: {name} {tag}: save {r['save_wall']:.0f} ms, file "
                  f"{r['file_mib']:.1f} MiB, restore: first instruction {r['first_insn']:.0f} ms, "
                  f"next progress line {r['next_line']:.0f} ms ({extra})", file=sys.stderr, flush=True)
            if not warm:
                results[c].append(r)
    faulthandler.cancel_dump_traceback_later()
    if not a.keep_logs and a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"Snapshot save and restore: median of {a.runs} runs (+{a.warmup} warm-up round), "
          f"{a.cpus} vCPUs, guest `{a.cmdline} abide.fill_mib=FILL`. "
          "Times in ms from the start of the step (see snapshot_bench.py).")
    print()
    print("| config | memory (fill) | ok runs | save wall (ms) | restore → first instruction (ms) "
          "| restore → next progress line (ms) | file (MiB) | resumed at n+1 |")
    print("|---|---|---|---|---|---|---|---|")
    bad = False
    for c in configs:
        v, mib, fill = c
        rs = results[c]
        label = "Abide" if v == "abide" else "QEMU"
        mem = f"{fmt_mem(mib)} ({fill} MiB)"
        if failures[c]:
            bad = True
        if not rs:
            print(f"| {label} | {mem} | 0/{a.runs} | | | | | |")
            continue
        cont = sum(1 for r in rs if r["continuity"])
        if cont != len(rs):
            bad = True
        print(f"| {label} | {mem} | {len(rs)}/{a.runs} | {f0(med(rs, 'save_wall'))} | "
              f"{f0(med(rs, 'first_insn'))} | {f0(med(rs, 'next_line'))} | {f1(med(rs, 'file_mib'))} | "
              f"{cont}/{len(rs)} |")
    print()
    print("Breakdown (medians, ms). Abide: save_ms/pause_ms from `abide snapshot`; verify_ms, abi_ms, "
          "load_ms, ready_ms from ABIDE_RESTORE_TIMINGS. QEMU: query-migrate total-time of the save; "
          "restore spawn -> incoming MIGRATION completed. "
          "Both: first instruction -> next progress line.")
    print()
    print("| config | memory | Abide save_ms | Abide pause_ms | verify_ms | abi_ms | load_ms | ready_ms "
          "| QEMU save total-time | QEMU incoming completed | first instruction → line |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        v, mib, fill = c
        rs = results[c]
        if not rs:
            continue
        label = "Abide" if v == "abide" else "QEMU"
        if v == "abide":
            cells = [f1(med(rs, "save_ms")), f1(med(rs, "pause_ms")), f1(med(rs, "verify_ms")),
                     f1(med(rs, "abi_ms")), f1(med(rs, "load_ms")), f1(med(rs, "ready_ms")), "", ""]
        else:
            cells = ["", "", "", "", "", "", f0(med(rs, "total_time")), f0(med(rs, "incoming_done"))]
        cells.append(f0(med(rs, "insn_to_line")))
        print(f"| {label} | {fmt_mem(mib)} | " + " | ".join(cells) + " |")
    return 1 if bad else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
