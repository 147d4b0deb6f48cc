"""QEMU over QMP: the client and its migrate-to-a-file save and restore.

Shared by snapshot_bench.py, snapshot_peers_bench.py and (through
snapshot_bench) migrate_bench.py.

QEMU 7.2 has no file: migration URI (it came in 8.2), so the snapshot file
is opened here and passed to QEMU with getfd; `migrate fd:` / `migrate-incoming
fd:` on a regular file is the same thing, without an extra process.
"""
import array
import json
import os
import socket
import time


class Fail(Exception):
    pass


class Qmp:
    def __init__(self, path, deadline):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise Fail(f"cannot connect to QMP at {path}")
                time.sleep(0.002)
        self.s = s
        self.deadline = deadline
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Fail("QMP timed out")
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                raise Fail("QMP timed out") from None
            if not chunk:
                raise Fail("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, fd=None, **args):
        data = (json.dumps({"execute": name, "arguments": args}) + "\n").encode()
        if fd is None:
            self.s.sendall(data)
        else:
            self.s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        while True:
            m = self._read()
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise Fail(f"QMP {name}: {m['error'].get('desc', m['error'])}")
            return m.get("return")

    def wait_migration(self):
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e.get("event") == "MIGRATION":
                    st = e.get("data", {}).get("status")
                    if st == "completed":
                        return
                    if st in ("failed", "cancelled"):
                        raise Fail(f"migration {st}")
            seen = len(self.events)
            m = self._read()
            if "event" in m:
                self.events.append(m)

    def close(self):
        self.s.close()


def save_setup(qmp, path):
    """What a management tool does before saving (not timed): migration
    events on, max-bandwidth unlimited as `virsh save` does, and `path`
    (created or truncated) passed to QEMU as fd "mig"."""
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        qmp.cmd("getfd", fd=fd, fdname="mig")
    finally:
        os.close(fd)


def save(qmp):
    """The save itself: `stop`, `migrate fd:mig`, until the MIGRATION event
    says completed (save_setup first)."""
    qmp.cmd("stop")
    qmp.cmd("migrate", uri="fd:mig")
    qmp.wait_migration()


def incoming(qmp, path):
    """Restore into a QEMU started with `-incoming defer`: events on, `path`
    passed as fd "mig", `migrate-incoming fd:mig`, until the MIGRATION event
    says completed. The VM is then paused; `cont` runs it."""
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    fd = os.open(path, os.O_RDONLY)
    try:
        qmp.cmd("getfd", fd=fd, fdname="mig")
    finally:
        os.close(fd)
    qmp.cmd("migrate-incoming", uri="fd:mig")
    qmp.wait_migration()
