#!/bin/sh
# /init of the Abide Linux test guest (busybox; see build-guest-initramfs.sh).
#
# Prints "abide-linux: userspace" first, then runs the test named by
# abide.test=<name> on the kernel command line (default: basic). Every line
# meant for the test harness starts with "abide-linux: ".
#
# To add a test: add a branch to the `case` in run_test below. Tests end by
# falling through to poweroff (or call `finish` themselves).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

dev_mounted=0
if [ ! -c /dev/console ]; then
    mount -t devtmpfs devtmpfs /dev
    dev_mounted=1
    exec </dev/console >/dev/console 2>&1
fi
echo "abide-linux: userspace"

say() { echo "abide-linux: $*"; }
finish() {
    say poweroff
    poweroff -f
    sleep 5
    say "poweroff -f returned; halting"
    halt -f
    while :; do sleep 3600; done
}

[ $dev_mounted = 1 ] || mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
test=basic
# shellcheck disable=SC2013 # the command line is split into words on purpose
for arg in $(cat /proc/cmdline); do
    case $arg in
        abide.test=*) test=${arg#abide.test=} ;;
    esac
done

# Boot benchmark: nothing but the marker above.
if [ "$test" = marker ]; then poweroff -f; finish; fi

mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm

# Virtio drivers are modules in the Debian cloud kernel.
if [ -f /lib/modules/abide/load-order ]; then
    while read -r m; do
        insmod "/lib/modules/abide/$m" 2>/dev/null || say "insmod $m failed"
    done < /lib/modules/abide/load-order
fi

run_test() {
    case $1 in
        basic)
            say "nproc=$(grep -c '^processor' /proc/cpuinfo)"
            say "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
            say "epoch=$(date +%s)"
            say "uptime=$(cut -d' ' -f1 /proc/uptime)"
            ;;
        devices)
            # What the VMM exposes: PCI functions and virtio devices.
            for d in /sys/bus/pci/devices/*; do
                [ -e "$d" ] || continue
                say "pci ${d##*/} $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class")"
            done
            for d in /sys/bus/virtio/devices/*; do
                [ -e "$d" ] || continue
                say "virtio ${d##*/} device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)"
            done
            ;;
        shell)
            say "interactive shell; exit it to power off"
            setsid cttyhack sh -l || sh
            ;;
        *)
            say "error: unknown test '$1'"
            ;;
    esac
}

say "test=$test"
run_test "$test"
finish
