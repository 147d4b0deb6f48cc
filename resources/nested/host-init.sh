#!/bin/sh
# /init of the nested test host (busybox; see build-host-initramfs.sh).
#
# Loads kvm/kvm-amd and 9p, mounts the machine's root file system (shared
# read-only by QEMU as 9p tag "host") at /mnt with a RAM-backed writable
# layer (see below), and runs the script named by abide.cmd=PATH in a chroot of
# /mnt with bash. The command's output goes to the console (ttyS0); the lines
#   ABIDE-NESTED-BEGIN-<token>
#   ABIDE-NESTED-EXIT-<token>=<exit status>
# (token from abide.token=) frame it for resources/nested/run.sh.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

# The command talks on the first serial port (ttyS0), whatever the kernel's
# console is (run.sh sends the kernel log to ttyS1 unless debugging).
mount -t devtmpfs devtmpfs /dev
exec </dev/ttyS0 >/dev/ttyS0 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

cmd='' token=none cache=loose root=overlay
# shellcheck disable=SC2013 # the command line is split into words on purpose
for arg in $(cat /proc/cmdline); do
    case $arg in
        abide.cmd=*) cmd=${arg#abide.cmd=} ;;
        abide.token=*) token=${arg#abide.token=} ;;
        abide.9pcache=*) cache=${arg#abide.9pcache=} ;;
        abide.root=*) root=${arg#abide.root=} ;;
    esac
done

say() { echo "abide-nested: $*"; }
finish() {
    echo "ABIDE-NESTED-EXIT-$token=$1"
    poweroff -f
    sleep 5
    halt -f
    while :; do sleep 3600; done
}

if [ -f /lib/modules/abide/load-order ]; then
    while read -r m; do
        err=$(insmod "/lib/modules/abide/$m" 2>&1) || say "insmod $m failed: $err"
    done < /lib/modules/abide/load-order
fi
[ -c /dev/kvm ] || say "error: /dev/kvm does not exist (kvm-amd did not load?)"

# Host tuning Abide documents (README, "Supported hosts"): guest RAM is a
# memfd, which gets transparent huge pages only when shmem THP is allowed.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null ||
    say "warning: cannot allow shmem THP; guest RAM uses 4 KiB pages"

# The machine's root, read-only over 9p, at /rom. By default (abide.root=
# overlay) /mnt is an overlay of it with a tmpfs on top: everything looks
# writable, writes are kept in RAM and dropped at power-off. With
# abide.root=ro (or if overlayfs fails) /mnt is the read-only share with
# fresh tmpfs on /tmp, /var/tmp and /run.
mkdir -p /rom /rw
mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=$cache" host /rom \
    || { say "error: cannot mount the 9p share 'host'"; finish 125; }
if [ "$root" = overlay ]; then
    mount -t tmpfs -o mode=755 tmpfs /rw
    mkdir -p /rw/upper /rw/work
    if ! mount -t overlay -o lowerdir=/rom,upperdir=/rw/upper,workdir=/rw/work overlay /mnt; then
        say "warning: overlay root failed; using the read-only root"
        root=ro
    fi
fi
if [ "$root" != overlay ]; then
    mount -o bind /rom /mnt
    for d in tmp var/tmp run; do
        [ -d "/mnt/$d" ] && mount -t tmpfs -o mode=1777 tmpfs "/mnt/$d"
    done
fi
mount -t proc proc /mnt/proc
mount -t sysfs sysfs /mnt/sys
mount -o bind /dev /mnt/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /mnt/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /mnt/dev/shm

if [ -z "$cmd" ]; then
    say "error: no abide.cmd= on the kernel command line"
    finish 125
fi
echo "ABIDE-NESTED-BEGIN-$token"
chroot /mnt /bin/bash "$cmd"
finish $?
