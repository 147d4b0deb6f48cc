#!/usr/bin/env python3
"""Hold one idle VM open in the nested test host for as long as it runs.

resources/nested/run.sh starts this before the command. It forks a
child that creates a VM with an in-kernel irqchip and one vCPU that never
runs (its local APIC stays software-disabled), and keeps its file
descriptors (and so the VM) until the nested host powers off; the parent
exits 0 once the VM exists, so the command starts after it, or says so
and exits 1 if the VM is not there within 60 s.

Why: the nested host's kernel changes global state whenever the first VM
appears or the last goes away, and whenever the count of vCPUs whose
LAPIC is disabled moves between 0 and 1. KVM then turns AMD-V on or off
on every CPU through IPIs (kvm_usage_count), and flips static keys
(preempt notifiers, apic_sw_disabled), which patches
the kernel's text on every CPU. Under QEMU TCG those cross-CPU operations
are where the nested host's own kernel crashed (CI, 4 December 2026: a
guest's triple fault reset its vCPU, kvm_lapic_reset -> static_key_slow_inc
-> jump_label_update, then "TASK stack guard page was hit" in that vCPU
thread). With this VM held, every test's VMs come and go without any of
them: the counts never return to 0.

Exit status: 0 with the VM held; 1 (and a message) if it could not be
made, in which case the command runs anyway.
"""
import fcntl
import os
import select
import signal
import sys

KVM_CREATE_VM = 0xAE01
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_VCPU = 0xAE41
# How long the parent waits for the child's VM.
WAIT_S = 60


def make_vm():
    """The idle VM; its file descriptors stay open in this process."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)


def main():
    # The child makes the VM, so that KVM's debugfs names it after the
    # process that lives on (PID-FD; resources/bench/boot_bench.py leaves
    # it out by that PID), and tells the parent how it went.
    r, w = os.pipe()
    if os.fork() != 0:
        os.close(w)
        if select.select([r], [], [], WAIT_S)[0]:
            said = os.read(r, 4096)
            why = said.decode(errors="replace") or "the holding process died"
        else:
            said, why = b"", f"the nested host's KVM made no VM within {WAIT_S} s"
        if said == b"ok":
            return 0
        print(f"abide-nested: warning: cannot hold an idle VM open ({why}); "
              "VMs coming and going will flip the kernel's KVM state", file=sys.stderr)
        return 1
    os.close(r)
    os.setsid()
    try:
        make_vm()
    except OSError as e:
        os.write(w, str(e).encode())
        os._exit(1)
    os.write(w, b"ok")
    os.close(w)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
