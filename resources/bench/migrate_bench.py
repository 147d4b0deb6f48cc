#!/usr/bin/env python3
"""Live-migration benchmark inner loop (run by resources/bench/migrate.sh; needs KVM).

Usage: migrate_bench.py --abide BIN --kernel BZIMAGE --initrd INITRD
                        [--ch BIN --vmlinux VMLINUX] [--ch-transport tcp|unix]
                        [--runs N] [--warmup N] [--cases NAME:MIB:RATE:BUF[,...]]
                        [--only abide,qemu,ch] [--cpus N] [--timeout SECS] [--verbose]

A case is a guest of MIB MiB running the Linux test guest's `ticker`
(abide.test=ticker: a console line every 10 ms, sleeping in between); with
RATE > 0 it also dirties RATE MiB/s of a BUF MiB buffer. For every case and
every VMM, RUNS times (round-robin after WARMUP discarded rounds), one run:

  1. Boot the source (2 vCPUs, serial console on its stdout, read through a
     pipe by a thread that timestamps every line with time.monotonic()),
     wait for "ticker-ready", then 2 s.
     Cloud Hypervisor boots the PVH vmlinux instead of the bzImage (it has
     no bzImage loader): `--kernel VMLINUX --initramfs INITRD --cmdline ...
     --cpus boot=2 --memory size=MIBM --serial tty --console off` (its
     defaults otherwise, as resources/bench/boot.sh runs it), plus
     `--api-socket path=S -v` (-v: info-level log on stderr, which is
     where it reports its migration figures).
  2. Start the destination listening on TCP loopback.
       Abide: `abide receive --listen tcp:127.0.0.1:PORT --serial stdio`.
       QEMU:  the same command line plus `-incoming tcp:127.0.0.1:PORT`.
       Cloud Hypervisor: `cloud-hypervisor --api-socket path=D -v` with no
              VM, then (HTTP over the Unix socket D, in a thread: the
              request only returns once the VM has arrived)
              `PUT /api/v1/vm.receive-migration {"receiver_url":
              "tcp:127.0.0.1:PORT"}` (or "unix:PATH" with --ch-transport
              unix), until the listener is bound (/proc/net/tcp, or the
              socket file). The VM's config, serial "tty" included, comes
              with the migration: the guest's console goes on to the
              destination process's stdout.
  3. Migrate, and wait until the source has let go.
       Abide: `abide migrate --api-socket S --to tcp:127.0.0.1:PORT`
              (default limits: 300 ms downtime, no bandwidth limit). total,
              downtime and bytes come from its JSON result.
       QEMU:  (untimed set-up: capability "events" on, max-bandwidth
              unlimited, downtime-limit 300 ms, both QEMU's defaults but
              the bandwidth) `migrate tcp:...`, until the MIGRATION event
              "completed"; total-time, downtime and ram transferred from
              query-migrate.
       Cloud Hypervisor: `PUT /api/v1/vm.send-migration
              {"destination_url": "tcp:127.0.0.1:PORT"}` (defaults:
              downtime_ms 300, timeout_s 3600, one connection, precopy,
              local off). The request returns at once (v53 migrates in a
              worker thread); the end is its log line "Migration completed
              after X s with a downtime of Y ms", which gives total (0.1 s
              resolution) and downtime (from pausing the vCPUs to the
              destination's answer to "complete", which resumes the VM
              there); MiB sent is the "total" of its "Precopy complete"
              line (guest memory only, rounded up to MiB).
     wall = from sending the migrate request to its end.
  4. The guest's view: the last tick line the source completed and the
     first one the destination completed (a line cut by the switch counts
     where it was completed); guest gap = the time between them minus the
     10 ms period. Their numbers must be consecutive.
  5. Quit both.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from snapshot_bench import Fail, Lines, Qmp, reap, spawn  # noqa: E402
from snapshot_peers_bench import http as unix_http  # noqa: E402

TICK = re.compile(r"abide-linux: tick n=(\d+)")
READY = "abide-linux: ticker-ready"
PERIOD_MS = 10
# --test-guest: Abide's own test guest directly on this machine's /dev/kvm
# (its `spin` ticker, every 2 ms of guest time; idle otherwise).
TEST_GUEST = "quiet rounds=1 buf-kib=64 spin tick-us=2000"
VERBOSE = False
T0 = time.monotonic()


def step(msg):
    if VERBOSE:
        print(f"migrate-bench: [{time.monotonic() - T0:8.1f} s] {msg}", file=sys.stderr, flush=True)


def cmdline(rate, buf):
    c = f"console=ttyS0 quiet abide.test=ticker abide.tick_ms={PERIOD_MS}"
    if rate:
        c += f" abide.dirty_mib_s={rate} abide.dirty_buf_mib={buf}"
    return c


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def guest_gap(src, dst):
    """(gap ms minus the period, n before, n after) across the switch."""
    with src.cv:
        before = [(t, m) for t, ln in src.lines for m in [TICK.search(ln)] if m]
    prefix = src.rest()
    if not before:
        raise Fail("no tick at the source")
    t1, m1 = before[-1]
    first = [True]

    def pred(ln):
        if first[0]:
            first[0] = False
            ln = prefix + ln
        return TICK.search(ln)
    def seen():
        with src.cv, dst.cv:
            return (f"source's last lines {[ln for _, ln in src.lines[-2:]]} + {prefix!r}, "
                    f"destination's first lines {[ln for _, ln in dst.lines[:4]]}")
    try:
        _, t2, _, m2 = dst.wait_for(pred, time.monotonic() + 30)
    except Fail as e:
        raise Fail(f"no tick at the destination ({e}): {seen()}")
    n1, n2 = int(m1.group(1)), int(m2.group(1))
    if n2 != n1 + 1:
        raise Fail(f"ticks not consecutive across the switch: {n1} -> {n2}: {seen()}")
    return (t2 - t1) * 1000.0 - PERIOD_MS, n1, n2


def boot(cmd, log, deadline):
    p = spawn(cmd)
    con = Lines(p.stdout, log + ".console")
    err = Lines(p.stderr, log + ".stderr")
    con.wait_for(lambda ln: READY in ln, deadline)
    return p, con, err


def reap_all(procs):
    """Kill whatever a runner started and did not end itself."""
    for p in procs:
        if p.returncode is None:
            reap(p, 0)


def run_abide(a, work, mib, rate, buf, tag):
    global TICK, READY, PERIOD_MS
    s1, s2 = os.path.join(work, "src.sock"), os.path.join(work, "dst.sock")
    for f in (s1, s2):
        if os.path.exists(f):
            os.unlink(f)
    deadline = time.monotonic() + a.timeout
    procs = []
    try:
        if a.test_guest:
            TICK, READY, PERIOD_MS = re.compile(r"guest: tick n=(\d+)"), "guest: tick n=1", 2
            guest = ["--cmdline", TEST_GUEST]
        else:
            guest = ["--kernel", a.kernel, "--initrd", a.initrd, "--cmdline", cmdline(rate, buf)]
        src = [a.abide, "run"] + guest + ["--machine", "pc-1.0", "--cpus", str(a.cpus),
                                          "--memory", f"{mib}M", "--serial", "stdio", "--api-socket", s1]
        p1, con1, err1 = boot(src, os.path.join(work, f"{tag}-src"), deadline)
        procs.append(p1)
        time.sleep(2)
        port = free_port()
        p2 = spawn([a.abide, "receive", "--listen", f"tcp:127.0.0.1:{port}", "--serial", "stdio",
                    "--api-socket", s2])
        procs.append(p2)
        con2 = Lines(p2.stdout, os.path.join(work, f"{tag}-dst.console"))
        err2 = Lines(p2.stderr, os.path.join(work, f"{tag}-dst.stderr"))
        err2.wait_for(lambda ln: "listening for an incoming migration" in ln, deadline)
        step("abide migrate")
        t0 = time.monotonic()
        out = subprocess.run([a.abide, "migrate", "--api-socket", s1, "--to", f"tcp:127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=a.timeout)
        wall = (time.monotonic() - t0) * 1000.0
        if out.returncode != 0:
            raise Fail(f"abide migrate failed: {out.stdout.strip()} {out.stderr.strip()[-500:]}; "
                       f"source stderr: {' | '.join(err1.tail(5))}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        reap(p1, 30)
        con1.join()
        gap, n1, n2 = guest_gap(con1, con2)
        r = {"wall": wall, "total": res["total_ms"], "downtime": res["downtime_ms"],
             "dest_downtime": res["destination_downtime_ms"], "guest_gap": gap,
             "mib_sent": res["bytes"] / (1 << 20), "iterations": res["iterations"],
             "ticks": f"{n1}->{n2}"}
        for k, v in res.get("phases", {}).items():
            r[k] = v
        subprocess.run([a.abide, "ctl", "--api-socket", s2, "quit"], capture_output=True, timeout=30)
        reap(p2, 30)
        return r
    finally:
        reap_all(procs)


def qemu_cmd(a, mib, rate, buf, qmp):
    return [a.qemu, "-enable-kvm", "-M", "pc", "-cpu", "host", "-smp", str(a.cpus), "-m", str(mib),
            "-kernel", a.kernel, "-initrd", a.initrd, "-append", cmdline(rate, buf),
            "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-qmp", f"unix:{qmp},server=on,wait=off"]


def run_qemu(a, work, mib, rate, buf, tag):
    q1, q2 = os.path.join(work, "src.qmp"), os.path.join(work, "dst.qmp")
    for f in (q1, q2):
        if os.path.exists(f):
            os.unlink(f)
    deadline = time.monotonic() + a.timeout
    procs = []
    try:
        p1, con1, _ = boot(qemu_cmd(a, mib, rate, buf, q1), os.path.join(work, f"{tag}-src"), deadline)
        procs.append(p1)
        qmp1 = Qmp(q1, deadline)
        time.sleep(2)
        port = free_port()
        p2 = spawn(qemu_cmd(a, mib, rate, buf, q2) + ["-incoming", f"tcp:127.0.0.1:{port}"])
        procs.append(p2)
        con2 = Lines(p2.stdout, os.path.join(work, f"{tag}-dst.console"))
        Lines(p2.stderr, os.path.join(work, f"{tag}-dst.stderr"))
        qmp2 = Qmp(q2, deadline)
        qmp1.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        qmp1.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 300})
        qmp1.deadline = time.monotonic() + a.timeout
        step("qemu migrate")
        t0 = time.monotonic()
        qmp1.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        qmp1.wait_migration()
        wall = (time.monotonic() - t0) * 1000.0
        # QEMU 7.2 emits "completed" before it has filled in total-time and
        # downtime: a query right after the event can read 0 for both. Ask
        # again for up to 2 s; a run still without them has no figures
        # (None, left out of the medians), never a 0.
        info = qmp1.cmd("query-migrate")
        for _ in range(100):
            if info.get("total-time") and info.get("downtime") is not None:
                break
            time.sleep(0.02)
            info = qmp1.cmd("query-migrate")
        if not info.get("total-time"):
            info["total-time"] = info["downtime"] = None
        ram = info.get("ram", {})
        # Everything the source printed is read before the ticks are compared.
        qmp1.cmd("quit")
        reap(p1, 30)
        con1.join()
        gap, n1, n2 = guest_gap(con1, con2)
        r = {"wall": wall, "total": info.get("total-time"), "downtime": info.get("downtime"),
             "guest_gap": gap, "mib_sent": ram.get("transferred", 0) / (1 << 20),
             "iterations": ram.get("dirty-sync-count"), "ticks": f"{n1}->{n2}",
             "setup": info.get("setup-time")}
        qmp2.cmd("quit")
        reap(p2, 30)
        return r
    finally:
        reap_all(procs)


# Cloud Hypervisor's figures, from its info-level log (vmm/src/lib.rs, v53.0).
CH_DONE = re.compile(r"Migration completed after ([0-9.]+)s with a downtime of (\d+)ms")
CH_PRECOPY = re.compile(r"Precopy complete: iter=(\d+) .*?total=(\d+)MiB")
CH_FAILED = re.compile(r"Migration failed: ")


def ch_api(sock, path, body=None, method="PUT", timeout=30):
    """One request to Cloud Hypervisor's REST API on the Unix socket `sock`."""
    try:
        status, out = unix_http(sock, method, "/api/v1/" + path, body, timeout)
    except (IndexError, ValueError) as e:
        raise Fail(f"cloud-hypervisor {path}: unreadable answer ({e})") from e
    if status >= 300:
        raise Fail(f"cloud-hypervisor {path}: HTTP {status} {out[:300]}")
    return out


def wait_api(sock, p, deadline):
    while True:
        if os.path.exists(sock):
            try:
                return ch_api(sock, "vmm.ping", method="GET", timeout=5)
            except (Fail, OSError):
                pass
        if p.poll() is not None:
            raise Fail(f"cloud-hypervisor exited ({p.returncode}) before its API socket answered")
        if time.monotonic() > deadline:
            raise Fail("timed out waiting for cloud-hypervisor's API socket")
        time.sleep(0.02)


def tcp_listening(port):
    want = f":{port:04X}"
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(f) as fh:
                next(fh)
                for ln in fh:
                    x = ln.split()
                    if x[1].endswith(want) and x[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def run_ch(a, work, mib, rate, buf, tag):
    import threading
    s1, s2, ms = (os.path.join(work, n) for n in ("ch-src.sock", "ch-dst.sock", "ch-mig.sock"))
    for f in (s1, s2, ms):
        if os.path.exists(f):
            os.unlink(f)
    deadline = time.monotonic() + a.timeout
    procs = []
    try:
        src = [a.ch, "--api-socket", f"path={s1}", "--kernel", a.vmlinux, "--initramfs", a.initrd,
               "--cmdline", cmdline(rate, buf), "--cpus", f"boot={a.cpus}", "--memory", f"size={mib}M",
               "--serial", "tty", "--console", "off", "-v"]
        p1, con1, err1 = boot(src, os.path.join(work, f"{tag}-src"), deadline)
        procs.append(p1)
        wait_api(s1, p1, deadline)
        time.sleep(2)
        p2 = spawn([a.ch, "--api-socket", f"path={s2}", "-v"])
        procs.append(p2)
        con2 = Lines(p2.stdout, os.path.join(work, f"{tag}-dst.console"))
        err2 = Lines(p2.stderr, os.path.join(work, f"{tag}-dst.stderr"))
        wait_api(s2, p2, deadline)
        if a.ch_transport == "unix":
            url = f"unix:{ms}"
            bound = lambda: os.path.exists(ms)  # noqa: E731
        else:
            port = free_port()
            url = f"tcp:127.0.0.1:{port}"
            bound = lambda: tcp_listening(port)  # noqa: E731
        recv = {}

        def receive():
            try:
                ch_api(s2, "vm.receive-migration", {"receiver_url": url}, timeout=a.timeout)
                recv["ok"] = True
            except (Fail, OSError) as e:
                recv["error"] = e
        th = threading.Thread(target=receive, daemon=True)
        th.start()
        while not bound():
            if "error" in recv or p2.poll() is not None:
                raise Fail(f"destination did not listen: {recv.get('error')}; "
                           f"stderr: {' | '.join(err2.tail(5))}")
            if time.monotonic() > deadline:
                raise Fail("timed out waiting for the destination's listener")
            time.sleep(0.005)
        step("cloud-hypervisor send-migration")
        with err1.cv:
            start = len(err1.lines)
        t0 = time.monotonic()
        ch_api(s1, "vm.send-migration", {"destination_url": url}, timeout=a.timeout)
        try:
            _, t1, _, m = err1.wait_for(lambda ln: CH_DONE.search(ln) or CH_FAILED.search(ln),
                                        time.monotonic() + a.timeout, start)
        except Fail as e:
            raise Fail(f"{e}; source stderr: {' | '.join(err1.tail(5))}")
        if m.re is CH_FAILED:
            raise Fail(f"cloud-hypervisor: {m.string.strip()[-300:]}")
        wall = (t1 - t0) * 1000.0
        with err1.cv:
            pre = [m2 for _, ln in err1.lines for m2 in [CH_PRECOPY.search(ln)] if m2]
        # The source shuts its VM down and exits by itself after a migration.
        reap(p1, 30)
        con1.join()
        th.join(30)
        if "ok" not in recv:
            raise Fail(f"vm.receive-migration: {recv.get('error', 'no answer')}")
        try:
            gap, n1, n2 = guest_gap(con1, con2)
        except Fail as e:
            raise Fail(f"{e}; destination stderr: {' | '.join(err2.tail(4))}")
        r = {"wall": wall, "total": float(m.group(1)) * 1000.0, "downtime": float(m.group(2)),
             "guest_gap": gap, "mib_sent": float(pre[-1].group(2)) if pre else None,
             "iterations": int(pre[-1].group(1)) if pre else None, "ticks": f"{n1}->{n2}"}
        try:
            ch_api(s2, "vmm.shutdown")
        except (Fail, OSError):
            pass
        reap(p2, 30)
        return r
    finally:
        reap_all(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--abide", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel")
    ap.add_argument("--ch", help="cloud-hypervisor binary (for --only ...,ch)")
    ap.add_argument("--vmlinux", help="the PVH vmlinux of --kernel, for Cloud Hypervisor")
    ap.add_argument("--ch-transport", choices=("tcp", "unix"), default="tcp")
    ap.add_argument("--initrd")
    ap.add_argument("--test-guest", action="store_true",
                    help="Abide only: its embedded test guest, idle (spin ticker) instead of Linux")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cases", default="idle-512M:512:0:0,idle-2G:2048:0:0,dirty-512M:512:16:64")
    ap.add_argument("--only", default="abide,qemu")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    global VERBOSE
    VERBOSE = a.verbose
    cases = []
    for c in a.cases.split(","):
        name, mib, rate, buf = c.split(":")
        cases.append((name, int(mib), int(rate), int(buf)))
    vmms = [v for v in a.only.split(",") if v]
    if a.test_guest:
        vmms = ["abide"]
    elif not (a.kernel and a.initrd):
        ap.error("--kernel and --initrd are required (or --test-guest)")
    for v in vmms:
        if v not in ("abide", "qemu", "ch"):
            ap.error(f"--only: unknown VMM {v} (abide, qemu, ch)")
    if "ch" in vmms and not (a.ch and a.vmlinux):
        ap.error("--only ...,ch needs --ch and --vmlinux")
    work = tempfile.mkdtemp(prefix="abide-migbench.")
    runners = {"abide": run_abide, "qemu": run_qemu, "ch": run_ch}
    configs = [(c, v) for c in cases for v in vmms]
    results = {(c[0], v): [] for c, v in configs}
    failed = 0
    for rnd in range(a.warmup + a.runs):
        warm = rnd < a.warmup
        label = "warmup" if warm else f"run {rnd - a.warmup + 1}/{a.runs}"
        for (name, mib, rate, buf), v in configs:
            step(f"{v} {name} {label}")
            try:
                r = runners[v](a, work, mib, rate, buf, f"{v}-{name}-{rnd}")
            except (Fail, OSError, subprocess.SubprocessError, json.JSONDecodeError, KeyError) as e:
                print(f"migrate-bench: {v} {name} {label}: FAILED: {e}", file=sys.stderr, flush=True)
                if not warm:
                    failed += 1
                continue
            print(f"migrate-bench: {v} {name} {label}: " +
                  " ".join(f"{k}={x:.1f}" if isinstance(x, float) else f"{k}={x}" for k, x in r.items()),
                  file=sys.stderr, flush=True)
            if not warm:
                results[(name, v)].append(r)

    def med(rs, k):
        xs = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
        return statistics.median(xs) if xs else None

    def f(x, d=1):
        return "n/a" if x is None else f"{x:.{d}f}"

    names = {"abide": "Abide", "qemu": "QEMU", "ch": "Cloud Hypervisor"}
    transport = {"abide": "TCP loopback", "qemu": "TCP loopback",
                 "ch": "TCP loopback" if a.ch_transport == "tcp" else "Unix socket"}
    print("| case | VMM | transport | ok runs | total (ms) | downtime, VMM's report (ms) | "
          "downtime, guest's view (ms) | wall (ms) | MiB sent |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, mib, rate, buf), v in configs:
        rs = results[(name, v)]
        print(f"| {name} | {names[v]} | {transport[v]} | {len(rs)}/{a.runs} | {f(med(rs, 'total'), 0)} | "
              f"{f(med(rs, 'downtime'))} | {f(med(rs, 'guest_gap'))} | {f(med(rs, 'wall'), 0)} | "
              f"{f(med(rs, 'mib_sent'))} |")
    if not a.test_guest:
        print("| all | Firecracker | - | - | not measured: Firecracker has no live migration "
              "(snapshot and restore only) | | | | |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
