#!/usr/bin/env python3
"""Snapshot save/restore against the peers (run by resources/bench/snapshot_peers.sh).

Usage: snapshot_peers_bench.py --kernel VMLINUX --initrd INITRD [--abide BIN]
           [--cloud-hypervisor BIN] [--firecracker BIN] [--qemu BIN]
           [--qemu-machine M] [--runs N] [--warmup N]
           [--mem-mib M] [--fill-mib F] [--timeout SECS] [--workdir DIR]

Each VMM boots the same PVH vmlinux and initramfs with
abide.test=progress (the guest fills F MiB of tmpfs with random data, says
"progress-ready", then prints "progress n=K" every 100 ms). After three
progress lines the guest is paused and snapshotted, the VMM is killed, and
the snapshot is restored in a new VMM process. Every console line is
timestamped (time.monotonic()) as it is read.

QEMU boots the PVH vmlinux with `-M microvm,rtc=on` (--qemu-machine), as
resources/bench/boot.sh's qemu-microvm-pvh does, so that the guest is the
same as the other VMMs': `-enable-kvm -cpu host -m M -smp 2 -kernel
VMLINUX -initrd INITRD -append CMDLINE -nodefaults -no-user-config
-nographic -serial stdio -no-reboot -qmp unix:S,server=on,wait=off`. QEMU
7.2 has no file: migration URI, so the snapshot file is passed to it with
QMP getfd and used as `fd:mig` (resources/bench/qemu_qmp.py, shared with
snapshot_bench.py).

  save wall     Abide: `abide snapshot --api-socket S --stop FILE` (pause +
                save, file fsync'd); Cloud Hypervisor: API vm.pause then
                vm.snapshot (destination_url=file://DIR); Firecracker: API
                PATCH /vm Paused then PUT /snapshot/create (Full); QEMU:
                QMP `stop`, `migrate fd:mig`, until the MIGRATION event
                "completed" (set up first, not timed: QMP connected,
                migration events on, max-bandwidth unlimited as `virsh
                save` does, the file passed with getfd).
  restore -> running
                from spawning the restoring process to: Abide's
                "abide: restore ... ready_ms=" line on stderr (printed just
                before the vCPU threads start; ABIDE_RESTORE_TIMINGS=1);
                Cloud Hypervisor (--restore source_url=file://DIR, its
                default memory_restore_mode=copy) the reply to vm.resume,
                retried until the restored VM accepts it; Firecracker the
                reply to PUT /snapshot/load with resume_vm=true (memory file
                backend, mapped privately); QEMU (the boot command line
                plus `-incoming defer`) the reply to QMP `cont`, sent after
                connecting, events on, getfd of the file,
                `migrate-incoming fd:mig` and its MIGRATION "completed"
                event (QEMU resumes the vCPUs before it replies).
  restore -> next line
                from the same spawn to the first complete "progress n=K"
                line on the new process's console.
  files         allocated size (st_blocks) of the snapshot files, MiB.
  resumed       the first progress line after the restore is K+1, K being
                the last complete one before the save (K+2 when the guest
                was paused in the middle of printing line K+1).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_qmp  # noqa: E402

PROGRESS = re.compile(rb"progress n=(\d+)")


class Console:
    """Reads a process's stdout in a thread; keeps (time, line) pairs."""

    def __init__(self, stream, log_path):
        self.lines = []
        self.partial = b""  # an unfinished last line, once the stream ended
        self.cond = threading.Condition()
        self.log = open(log_path, "ab")
        self.t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.t.start()

    def _run(self, stream):
        buf = b""
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            now = time.monotonic()
            self.log.write(chunk)
            self.log.flush()
            buf += chunk
            *complete, buf = buf.split(b"\n")
            with self.cond:
                for line in complete:
                    self.lines.append((now, line.replace(b"\r", b"")))
                self.cond.notify_all()
        with self.cond:
            self.partial = buf.replace(b"\r", b"")
            self.lines.append((time.monotonic(), None))
            self.cond.notify_all()

    def wait_for(self, pred, timeout, start=0):
        """First (index, time, line) from index `start` with pred(line)."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if line is None:
                        raise RuntimeError("console closed (process exited)")
                    if pred(line):
                        return i, t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("timed out waiting on the console")
                self.cond.wait(left)


def http(sock_path, method, path, body=None, timeout=60):
    """One HTTP/1.1 request over a Unix socket; returns (status, body)."""
    data = b"" if body is None else json.dumps(body).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        req = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
        s.sendall(req)
        resp = b""
        while b"\r\n\r\n" not in resp:
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
        head, _, rest = resp.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for h in lines[1:]:
            k, _, v = h.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest.decode(errors="replace")
    finally:
        s.close()


def wait_socket(path, timeout, poll=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(poll)
    raise RuntimeError(f"API socket {path} did not appear")


def ok(status, body, what):
    if not 200 <= status < 300:
        raise RuntimeError(f"{what}: HTTP {status} {body.strip()[:300]}")


def alloc_mib(paths):
    total = 0
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                total += sum(os.stat(os.path.join(root, f)).st_blocks * 512 for f in files)
        elif os.path.exists(p):
            total += os.stat(p).st_blocks * 512
    return total / (1 << 20)


def kill(p):
    if p is None:
        return
    if p.poll() is None:
        p.kill()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # A VMM stuck in the kernel (seen with nested KVM): say so, go on.
        print(f"snapshot-peers: pid {p.pid} ({p.args[0]}) did not die within 30 s of SIGKILL",
              file=sys.stderr, flush=True)


class Vmm:
    """One VMM's boot, save and restore commands."""

    def __init__(self, name, a, work):
        self.name, self.a, self.work = name, a, work
        self.cmdline = (f"console=ttyS0 quiet abide.test=progress abide.fill_mib={a.fill_mib}")

    def prepare(self, p):
        """Untimed set-up right before the save."""


class Abide(Vmm):
    def boot(self):
        self.sock = os.path.join(self.work, "boot.sock")
        self.snap = os.path.join(self.work, "snap")
        return [self.a.abide, "run", "--kernel", self.a.kernel, "--initrd", self.a.initrd,
                "--cmdline", self.cmdline, "--memory", f"{self.a.mem_mib}M", "--cpus", "2",
                "--serial", "stdio", "--api-socket", self.sock], None

    def save(self, p):
        r = subprocess.run([self.a.abide, "snapshot", "--api-socket", self.sock, "--stop", self.snap],
                           capture_output=True, text=True, timeout=self.a.timeout)
        if r.returncode != 0:
            raise RuntimeError(f"abide snapshot: {r.stderr.strip()[-300:]}")
        return [self.snap]

    def restore(self):
        env = dict(os.environ, ABIDE_RESTORE_TIMINGS="1")
        self.err = os.path.join(self.work, "restore.err")
        return [self.a.abide, "restore", self.snap, "--serial", "stdio",
                "--api-socket", os.path.join(self.work, "restore.sock")], env

    def running(self, p, t0):
        deadline = t0 + self.a.timeout
        while time.monotonic() < deadline:
            with open(self.err, "rb") as f:
                err = f.read()
            if b"ready_ms=" in err:
                now = time.monotonic()
                m = re.search(rb"restore (verify_ms=.*ready_ms=\S+)", err)
                self.detail = m.group(1).decode(errors="replace") if m else ""
                return now
            if p.poll() is not None:
                raise RuntimeError("abide restore exited")
            time.sleep(0.001)
        raise RuntimeError("no restore timing line from abide")


class CloudHypervisor(Vmm):
    def boot(self):
        self.sock = os.path.join(self.work, "boot.sock")
        self.snap = os.path.join(self.work, "snap")
        os.makedirs(self.snap, exist_ok=True)
        return [self.a.cloud_hypervisor, "--api-socket", f"path={self.sock}",
                "--kernel", self.a.kernel, "--initramfs", self.a.initrd, "--cmdline", self.cmdline,
                "--cpus", "boot=2", "--memory", f"size={self.a.mem_mib}M",
                "--serial", "tty", "--console", "off"], None

    def save(self, p):
        ok(*http(self.sock, "PUT", "/api/v1/vm.pause", timeout=self.a.timeout), "vm.pause")
        ok(*http(self.sock, "PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{self.snap}"},
                 timeout=self.a.timeout), "vm.snapshot")
        return [self.snap]

    def restore(self):
        self.rsock = os.path.join(self.work, "restore.sock")
        return [self.a.cloud_hypervisor, "--api-socket", f"path={self.rsock}",
                "--restore", f"source_url=file://{self.snap}"], None

    def running(self, p, t0):
        wait_socket(self.rsock, self.a.timeout)
        deadline = t0 + self.a.timeout
        last = None
        while time.monotonic() < deadline:
            status, body = http(self.rsock, "PUT", "/api/v1/vm.resume", timeout=self.a.timeout)
            if 200 <= status < 300:
                return time.monotonic()
            last = (status, body)
            if p.poll() is not None:
                raise RuntimeError("cloud-hypervisor exited during restore")
            time.sleep(0.001)
        raise RuntimeError(f"vm.resume never accepted: {last}")


class Firecracker(Vmm):
    def boot(self):
        self.sock = os.path.join(self.work, "boot.sock")
        self.state = os.path.join(self.work, "vmstate")
        self.mem = os.path.join(self.work, "memory")
        cfg = os.path.join(self.work, "config.json")
        with open(cfg, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": self.a.kernel, "initrd_path": self.a.initrd,
                                       "boot_args": self.cmdline},
                       "machine-config": {"vcpu_count": 2, "mem_size_mib": self.a.mem_mib},
                       "drives": []}, f)
        return [self.a.firecracker, "--api-sock", self.sock, "--config-file", cfg], None

    def save(self, p):
        ok(*http(self.sock, "PATCH", "/vm", {"state": "Paused"}, timeout=self.a.timeout), "PATCH /vm")
        ok(*http(self.sock, "PUT", "/snapshot/create",
                 {"snapshot_type": "Full", "snapshot_path": self.state, "mem_file_path": self.mem},
                 timeout=self.a.timeout), "snapshot/create")
        return [self.state, self.mem]

    def restore(self):
        self.rsock = os.path.join(self.work, "restore.sock")
        return [self.a.firecracker, "--api-sock", self.rsock], None

    def running(self, p, t0):
        wait_socket(self.rsock, self.a.timeout)
        ok(*http(self.rsock, "PUT", "/snapshot/load",
                 {"snapshot_path": self.state,
                  "mem_backend": {"backend_path": self.mem, "backend_type": "File"},
                  "resume_vm": True}, timeout=self.a.timeout), "snapshot/load")
        return time.monotonic()


class Qemu(Vmm):
    def cmd(self, qmp):
        return [self.a.qemu, "-enable-kvm", "-M", self.a.qemu_machine, "-cpu", "host",
                "-m", str(self.a.mem_mib), "-smp", "2", "-kernel", self.a.kernel, "-initrd", self.a.initrd,
                "-append", self.cmdline, "-nodefaults", "-no-user-config", "-nographic",
                "-serial", "stdio", "-no-reboot", "-qmp", f"unix:{qmp},server=on,wait=off"]

    def boot(self):
        self.sock = os.path.join(self.work, "boot.qmp")
        self.snap = os.path.join(self.work, "qemu.mig")
        return self.cmd(self.sock), None

    def prepare(self, p):
        self.qmp = qemu_qmp.Qmp(self.sock, time.monotonic() + self.a.timeout)
        qemu_qmp.save_setup(self.qmp, self.snap)
        self.qmp.deadline = time.monotonic() + self.a.timeout

    def save(self, p):
        qemu_qmp.save(self.qmp)
        self.qmp.close()
        return [self.snap]

    def restore(self):
        self.rsock = os.path.join(self.work, "restore.qmp")
        return self.cmd(self.rsock) + ["-incoming", "defer"], None

    def running(self, p, t0):
        qmp = qemu_qmp.Qmp(self.rsock, t0 + self.a.timeout)
        try:
            qemu_qmp.incoming(qmp, self.snap)
            t_in = time.monotonic()
            qmp.cmd("cont")
            now = time.monotonic()
        finally:
            qmp.close()
        self.detail = f"incoming completed {(t_in - t0) * 1e3:.0f} ms after spawn"
        return now


VERBOSE = False


def step(name, msg):
    if VERBOSE:
        print(f"snapshot-peers: [{time.monotonic():.3f}] {name}: {msg}", file=sys.stderr, flush=True)


def one_run(cls, name, a, rnd):
    work = os.path.join(a.workdir, f"{name}-{rnd}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    v = cls(name, a, work)
    log = os.path.join(a.workdir, f"snapshot-peers-{name}-{rnd}.log")
    cmd, env = v.boot()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=env)
    q = None
    step(name, f"spawned {' '.join(cmd)}")
    try:
        con = Console(p.stdout, log)
        i, _, _ = con.wait_for(lambda l: b"progress-ready" in l, a.timeout)
        step(name, "progress-ready")
        for _ in range(3):
            i, _, _ = con.wait_for(lambda l: PROGRESS.search(l) is not None, a.timeout, i + 1)
        step(name, "three progress lines; saving")
        v.prepare(p)
        t0 = time.monotonic()
        files = v.save(p)
        save_s = time.monotonic() - t0
        step(name, f"saved in {save_s:.3f} s")
        # The last line the guest printed before it was paused.
        last = max(int(m.group(1)) for _, l in con.lines if l and (m := PROGRESS.search(l)))
        kill(p)
        con.t.join(timeout=10)
        # Paused in the middle of "progress n=K": the restored guest first
        # finishes that line, so its first complete progress line is K+1.
        midline = bool(con.partial.strip())
        size = alloc_mib(files)
        rcmd, renv = v.restore()
        if renv is None:
            renv = dict(os.environ)
        t1 = time.monotonic()
        if isinstance(v, Abide):
            q = subprocess.Popen(rcmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=open(v.err, "wb"), env=renv)
        else:
            q = subprocess.Popen(rcmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=renv)
        step(name, f"restoring: {' '.join(rcmd)}")
        rcon = Console(q.stdout, log)
        t_run = v.running(q, t1)
        step(name, "running")
        _, t_line, line = rcon.wait_for(lambda l: PROGRESS.search(l) is not None, a.timeout)
        n = int(PROGRESS.search(line).group(1))
        detail = getattr(v, "detail", "")
        return {"detail": detail, "save_ms": save_s * 1e3, "run_ms": (t_run - t1) * 1e3,
                "line_ms": (t_line - t1) * 1e3, "file_mib": size,
                "next": n == last + 1 or (midline and n == last + 2), "midline": midline,
                "n": n, "last": last}
    finally:
        kill(p)
        if q is not None:
            kill(q)
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--abide")
    ap.add_argument("--cloud-hypervisor")
    ap.add_argument("--firecracker")
    ap.add_argument("--qemu")
    ap.add_argument("--qemu-machine", default="microvm,rtc=on")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--fill-mib", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--skip", action="append", default=[], metavar="NAME=REASON")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    global VERBOSE
    VERBOSE = a.verbose
    configs = [(n, c) for n, c, b in (("abide", Abide, a.abide),
                                      ("cloud-hypervisor", CloudHypervisor, a.cloud_hypervisor),
                                      ("firecracker", Firecracker, a.firecracker),
                                      ("qemu", Qemu, a.qemu)) if b]
    results = {n: [] for n, _ in configs}
    bad = False
    for rnd in range(a.warmup + a.runs):
        warm = rnd < a.warmup
        tag = "warmup" if warm else f"run {rnd - a.warmup + 1}/{a.runs}"
        for name, cls in configs:
            try:
                r = one_run(cls, name, a, rnd)
            except Exception as e:  # one failed run must not hide the others
                print(f"snapshot-peers: {name} {tag}: FAILED: {e} "
                      f"(console: {a.workdir}/snapshot-peers-{name}-{rnd}.log)", file=sys.stderr, flush=True)
                if not warm:
                    bad = True
                continue
            print(f"snapshot-peers: {name} {tag}: save {r['save_ms']:.0f} ms, "
                  f"restore -> running {r['run_ms']:.0f} ms, -> next line {r['line_ms']:.0f} ms "
                  f"(n={r['n']} after {r['last']}{', paused mid-line' if r['midline'] else ''}), files {r['file_mib']:.1f} MiB"
                  + (f"; {r['detail']}" if r["detail"] else ""),
                  file=sys.stderr, flush=True)
            if not warm:
                results[name].append(r)
    print()
    print(f"Snapshot of a {a.mem_mib} MiB, 2-vCPU guest ({a.fill_mib} MiB of random data in tmpfs): "
          f"{a.runs} runs each (+{a.warmup} warm-up), medians.")
    print()
    print("| VMM | ok runs | save wall (ms) | restore → running (ms) | restore → next progress line (ms) "
          "| files (MiB allocated) | resumed at the next line |")
    print("|---|---|---|---|---|---|---|")
    for s in a.skip:
        name, _, reason = s.partition("=")
        print(f"| {name} | NOT MEASURED: {reason} | | | | | |")
    for name, _ in configs:
        rs = results[name]
        if not rs:
            print(f"| {name} | 0/{a.runs} (all failed) | | | | | |")
            continue
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"| {name} | {len(rs)}/{a.runs} | {med('save_ms'):.0f} | {med('run_ms'):.0f} | "
              f"{med('line_ms'):.0f} | {med('file_mib'):.1f} | {sum(r['next'] for r in rs)}/{len(rs)} |")
    return 1 if bad else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
