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
            # The CPU model as Linux sees it (tests/tests/linux_guest.rs).
            say "cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
            say "cpu_flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
            # Why XSAVE is missing, when it is (the nested test host).
            say "xsave_problems=$(dmesg | grep -c 'XSAVE consistency problem')"
            dmesg | grep 'x86/fpu' | while read -r l; do say "fpu-kmsg $l"; done
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
        pci)
            # PCI and virtio as Linux sees them (tests/tests/linux_pci.rs).
            for d in /sys/bus/pci/devices/*; do
                [ -e "$d" ] || continue
                # Line 7 of `resource` is the expansion ROM: start end flags.
                rom=$(sed -n 7p "$d/resource")
                # shellcheck disable=SC2086 # split "start end flags" on purpose
                set -- $rom
                rom_size=0
                if [ "$((${1:-0}))" != 0 ]; then rom_size=$(($2 - $1 + 1)); fi
                drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
                say "pci bdf=${d##*/} vendor=$(cat "$d/vendor") device=$(cat "$d/device") class=$(cat "$d/class") rom_size=$rom_size driver=${drv:-none}"
            done
            for d in /sys/bus/virtio/devices/*; do
                [ -e "$d" ] || continue
                say "virtio dev=${d##*/} type=$(cat "$d/device")"
            done
            # virtio-blk: an ext2 file system in the first 8 MiB of vda, and a
            # raw pattern at sector 20000 that the host reads back.
            if [ -b /dev/vda ]; then
                if mke2fs -q -b 1024 /dev/vda 8192 >/dev/null 2>&1 && mkdir -p /mnt &&
                    mount -t ext2 /dev/vda /mnt && echo abide > /mnt/hello &&
                    umount /mnt; then
                    say "vda mkfs=ok"
                else
                    say "vda mkfs=failed"
                fi
                if printf 'abide-linux-blk-pattern' |
                    dd of=/dev/vda bs=512 seek=20000 conv=fsync 2>/dev/null; then
                    say "vda dd=ok"
                else
                    say "vda dd=failed"
                fi
            fi
            for q in /sys/block/vd*/mq; do
                [ -d "$q" ] || continue
                b=${q%/mq}
                set -- "$q"/*
                say "blk dev=${b##*/} queues=$# queue_size=$(cat "$b/queue/nr_requests")"
            done
            if [ -b /dev/vdb ]; then
                say "vdb ro=$(cat /sys/block/vdb/ro)"
                if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
                    say "vdb write=succeeded"
                else
                    say "vdb write=refused"
                fi
            fi
            if [ -c /dev/hwrng ]; then
                say "hwrng current=$(cat /sys/class/misc/hw_random/rng_current) bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
            fi
            if ip link show eth0 >/dev/null 2>&1; then
                ip link set eth0 up
                ip addr add 192.168.213.2/24 dev eth0
                if ping -c 2 -W 3 192.168.213.1 >/dev/null 2>&1; then
                    say "net ping=ok mac=$(cat /sys/class/net/eth0/address)"
                else
                    say "net ping=failed mac=$(cat /sys/class/net/eth0/address)"
                fi
            fi
            # Interrupts: each virtio line of /proc/interrupts, spaces squeezed.
            grep virtio /proc/interrupts | tr -s ' ' | while read -r line; do
                say "irq $line"
            done
            ;;
        blkbench)
            # Storage benchmark (resources/bench/blk.sh): QD1 O_DIRECT reads;
            # with abide.bench_qd=N (N > 1) also 4 KiB random reads at
            # queue depth N (native AIO).
            secs=5 qd=1
            # shellcheck disable=SC2013 # the command line is split into words on purpose
            for arg in $(cat /proc/cmdline); do
                case $arg in
                    abide.bench_secs=*) secs=${arg#abide.bench_secs=} ;;
                    abide.bench_qd=*) qd=${arg#abide.bench_qd=} ;;
                esac
            done
            for mode in randread seqread; do
                say "$(blkbench /dev/vda "$mode" "$secs" 2>&1)"
            done
            if [ "$qd" -gt 1 ]; then
                say "$(blkbench /dev/vda randread "$secs" "$qd" 2>&1)"
            fi
            ;;
        progress)
            # Snapshot benchmark (resources/bench/snapshot.sh): fill
            # abide.fill_mib MiB of tmpfs with random data (so guest memory
            # is not just zero pages), then print a numbered line every
            # 100 ms forever.
            fill=0
            # shellcheck disable=SC2013 # the command line is split into words on purpose
            for arg in $(cat /proc/cmdline); do
                case $arg in abide.fill_mib=*) fill=${arg#abide.fill_mib=} ;; esac
            done
            if [ "$fill" -gt 0 ]; then
                dd if=/dev/urandom of=/dev/shm/fill bs=1M count="$fill" 2>/dev/null
            fi
            say "progress-ready fill_mib=$fill"
            n=0
            while :; do
                n=$((n + 1))
                say "progress n=$n"
                usleep 100000
            done
            ;;
        power-button)
            # Soft shutdown (tests/tests/linux_api.rs): the ACPI power
            # button (button.ko, fixed-feature event) reaches busybox acpid
            # as KEY_POWER through evdev; acpid runs the handler below,
            # which shuts down cleanly and powers off.
            mkdir -p /etc/acpi/PWRF
            cat > /etc/acpi/PWRF/00000080 <<'HANDLER'
#!/bin/sh
echo "abide-linux: power-button pressed; shutting down" > /dev/console
sync
umount -a -r 2>/dev/null
echo "abide-linux: poweroff (clean)" > /dev/console
poweroff -f
HANDLER
            chmod 755 /etc/acpi/PWRF/00000080
            echo "PWRF PWRF/00000080" > /etc/acpid.conf
            acpid -c /etc/acpi -a /etc/acpid.conf -l /dev/console
            buttons=$(cat /sys/class/input/input*/name 2>/dev/null | grep -c 'Power Button')
            events=$(ls /dev/input/ 2>/dev/null | grep -c '^event')
            say "power-button-ready buttons=$buttons event_devices=$events acpid=$(pidof acpid)"
            # Wait for the button; the handler powers off.
            while :; do sleep 3600; done
            ;;
        ticker)
            # Migration benchmark (resources/bench/migrate.sh): a console
            # line every abide.tick_ms (default 10) ms, sleeping in between;
            # with abide.dirty_mib_s=R and abide.dirty_buf_mib=S it also
            # dirties R MiB/s of an S MiB buffer (resources/bench/ticker.c).
            tick=10 rate=0 buf=0
            # shellcheck disable=SC2013 # the command line is split into words on purpose
            for arg in $(cat /proc/cmdline); do
                case $arg in
                    abide.tick_ms=*) tick=${arg#abide.tick_ms=} ;;
                    abide.dirty_mib_s=*) rate=${arg#abide.dirty_mib_s=} ;;
                    abide.dirty_buf_mib=*) buf=${arg#abide.dirty_buf_mib=} ;;
                esac
            done
            if [ "$rate" -gt 0 ]; then ticker "$tick" "$rate" "$buf"; else ticker "$tick"; fi
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
