#!/usr/bin/env bash
# Boot benchmark: time from VMM start to the guest's first userspace output,
# and the VMM's memory overhead, for Abide, its peers Cloud Hypervisor and
# Firecracker, and QEMU (reference), on the same Debian cloud kernel and
# test initramfs with abide.test=marker.
#
# Configurations (each RUNS times, default 5, round-robin after one warm-up):
#   abide-bzImage     $ABIDE_BIN run --kernel vmlinuz ... (Linux boot protocol)
#   abide-pvh         $ABIDE_BIN run --kernel vmlinux ... (PVH entry)
#   abide-firmware    $ABIDE_BIN run --firmware bios-256k.bin --kernel vmlinuz ...
#                     (SeaBIOS + linuxboot_dma.bin, as QEMU -M pc boots)
#   qemu-pc-bzImage   qemu -M pc (SeaBIOS) -kernel vmlinuz
#   qemu-microvm-pvh  qemu -M microvm -kernel vmlinux (PVH)
#   cloud-hypervisor-pvh  cloud-hypervisor --kernel vmlinux (PVH) --initramfs
#                     ... --serial tty --console off (its defaults otherwise)
#   firecracker       firecracker --no-api --config-file (vmlinux, which it
#                     boots through the PVH note, initrd, serial on stdout).
#                     Firecracker does not end when the guest powers off
#                     (no ACPI S5 and no other power-off device; its guests
#                     stop it by rebooting through the i8042), so its runs
#                     are killed right after the marker is sampled.
# The peers are built by resources/bench/peers.sh; their rows say NOT
# MEASURED when their binaries do not exist.
# Runs directly when this machine has vmx/svm, otherwise everything happens
# inside the nested test host (resources/nested/run.sh), where timings are
# those of KVM nested in QEMU TCG: compare rows with each other, not with
# bare-metal numbers.
#
# Method: see resources/bench/boot_bench.py (wall = spawn -> marker line on
# the serial console; peak RSS = ru_maxrss; overhead = peak RSS minus the RSS
# of the guest-RAM mapping sampled at the marker; KVM exits up to the marker
# from KVM's debugfs statistics, which the script mounts inside the nested
# test host).
#
# Usage: resources/bench/boot.sh [-n RUNS] [--warmup N] [--only NAME[,NAME...]]
#                                [--run-timeout SECS (per boot, default 60)]
# Exit status: 0 when every measured boot reached userspace and exited 0.
# Environment:
#   ABIDE_BIN           abide binary (default <repo>/target/dist/abide);
#                       its rows say NOT MEASURED when it does not exist
#   ABIDE_BENCH_CMDLINE guest command line
#                       (default "console=ttyS0 quiet abide.test=marker")
#   ABIDE_BENCH_CLOUD_HYPERVISOR  cloud-hypervisor binary
#                       (default <repo>/.cache/peers/bin/cloud-hypervisor)
#   ABIDE_BENCH_FIRECRACKER       firecracker binary
#                       (default <repo>/.cache/peers/bin/firecracker)
set -euo pipefail

die() { printf 'boot-bench: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))

runs=5 warmup=1 only='' inner=0 run_timeout=60
while (($#)); do
    case $1 in
        -n|--runs) runs=${2:?}; shift 2 ;;
        --warmup) warmup=${2:?}; shift 2 ;;
        --only) only=${2:?}; shift 2 ;;
        --run-timeout) run_timeout=${2:?}; shift 2 ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "-n needs a positive number"
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup needs a number"
[[ $run_timeout =~ ^[1-9][0-9]*$ ]] || die "--run-timeout needs a positive number"

abide_bin=${ABIDE_BIN:-$repo/target/dist/abide}
[[ $abide_bin == /* ]] || abide_bin="$repo/$abide_bin"
ch_bin=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
fc_bin=${ABIDE_BENCH_FIRECRACKER:-$repo/.cache/peers/bin/firecracker}
[[ $ch_bin == /* ]] || ch_bin="$repo/$ch_bin"
[[ $fc_bin == /* ]] || fc_bin="$repo/$fc_bin"

if ((!inner)); then
    # Build outside: writes inside the nested host are discarded.
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    # ABIDE_* variables reach the nested test host; the binaries are files
    # of this machine, which it sees at the same paths.
    export ABIDE_BIN=$abide_bin ABIDE_BENCH_CLOUD_HYPERVISOR=$ch_bin ABIDE_BENCH_FIRECRACKER=$fc_bin
    # Worst case: every boot of every configuration (7) hits the per-run timeout.
    exec "$repo/resources/linux/run-direct-or-nested.sh" \
        --timeout $(((runs + warmup) * 7 * (run_timeout + 5) + 300)) -- \
        "${BASH_SOURCE[0]}" --inner -n "$runs" --warmup "$warmup" --run-timeout "$run_timeout" \
        ${only:+--only "$only"}
fi

g="$repo/.cache/linux/guest"
vmlinuz=$g/vmlinuz vmlinux=$g/vmlinux initrd=$g/initramfs.cpio.gz
for f in "$vmlinuz" "$vmlinux" "$initrd"; do [[ -s $f ]] || die "missing $f"; done
[[ -c /dev/kvm ]] || die "/dev/kvm missing"
cmdline=${ABIDE_BENCH_CMDLINE:-console=ttyS0 quiet abide.test=marker}
mem=512 cpus=2

selected() { [[ -z $only || ,$only, == *",$1,"* ]]; }
args=() skips=()
for kind in bzImage pvh; do
    name=abide-$kind
    selected "$name" || continue
    if [[ $kind == bzImage ]]; then k=$vmlinuz; else k=$vmlinux; fi
    if [[ -x $abide_bin ]]; then
        args+=(:: "$name" "$abide_bin" run --kernel "$k" --initrd "$initrd"
               --cmdline "$cmdline" --memory "${mem}M" --cpus "$cpus" --serial stdio)
    else
        echo "boot-bench: NOT MEASURED: abide binary missing ($abide_bin; cargo build --profile dist -p abide-vmm --bin abide builds it) -> skipping $name" >&2
        skips+=(--skip "$name=abide binary missing ($abide_bin)")
    fi
done
# Through firmware: the SeaBIOS image QEMU -M pc loads by default
# (bios-256k.bin), the kernel through fw_cfg and linuxboot_dma.bin.
if selected abide-firmware; then
    if [[ -x $abide_bin ]]; then
        args+=(:: abide-firmware "$abide_bin" run --firmware /usr/share/seabios/bios-256k.bin
               --kernel "$vmlinuz" --initrd "$initrd"
               --cmdline "$cmdline" --memory "${mem}M" --cpus "$cpus" --serial stdio)
    else
        skips+=(--skip "abide-firmware=abide binary missing ($abide_bin)")
    fi
fi
if selected qemu-pc-bzImage; then
    args+=(:: qemu-pc-bzImage qemu-system-x86_64 -enable-kvm -M pc -cpu host -m "$mem" -smp "$cpus"
           -kernel "$vmlinuz" -initrd "$initrd" -append "$cmdline"
           -nographic -nodefaults -serial stdio -no-reboot)
fi
if selected qemu-microvm-pvh; then
    # rtc=on: with ACPI on (the default) microvm leaves out the CMOS RTC, and
    # Linux then spends ~7 s probing for it (rtc_cmos "broken or not
    # accessible"); measured 15.7 s vs 9.3 s inside the nested host.
    # shellcheck disable=SC2054 # the commas are part of QEMU options
    args+=(:: qemu-microvm-pvh qemu-system-x86_64 -enable-kvm -M microvm,rtc=on -cpu host -m "$mem" -smp "$cpus"
           -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline"
           -nodefaults -no-user-config -nographic -serial stdio -no-reboot)
fi
if selected cloud-hypervisor-pvh; then
    if [[ -x $ch_bin ]]; then
        # Its defaults otherwise (virtio-pci; a virtio-rng device).
        args+=(:: cloud-hypervisor-pvh "$ch_bin" --kernel "$vmlinux" --initramfs "$initrd"
               --cmdline "$cmdline" --cpus "boot=$cpus" --memory "size=${mem}M"
               --serial tty --console off)
    else
        echo "boot-bench: NOT MEASURED: $ch_bin missing (resources/bench/peers.sh builds it) -> skipping cloud-hypervisor-pvh" >&2
        skips+=(--skip "cloud-hypervisor-pvh=binary missing ($ch_bin; resources/bench/peers.sh builds it)")
    fi
fi
kills=()
if selected firecracker; then
    if [[ -x $fc_bin ]]; then
        fc_config=${TMPDIR:-/tmp}/boot-bench-firecracker.json
        python3 - "$fc_config" "$vmlinux" "$initrd" "$cmdline" "$cpus" "$mem" <<'EOF'
import json, sys
path, kernel, initrd, cmdline, cpus, mem = sys.argv[1:]
with open(path, "w") as f:
    json.dump({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": cmdline},
        "machine-config": {"vcpu_count": int(cpus), "mem_size_mib": int(mem)},
        "drives": [],
    }, f, indent=1)
EOF
        args+=(:: firecracker "$fc_bin" --no-api --config-file "$fc_config")
        kills+=(--kill-after-marker "firecracker=it does not exit when the guest powers off")
    else
        echo "boot-bench: NOT MEASURED: $fc_bin missing (resources/bench/peers.sh builds it) -> skipping firecracker" >&2
        skips+=(--skip "firecracker=binary missing ($fc_bin; resources/bench/peers.sh builds it)")
    fi
fi
# KVM's per-VM exit counters (boot_bench.py reads them at the marker). Only
# mounted inside the nested test host, which is thrown away afterwards.
if [[ -n ${ABIDE_NESTED:-} && ! -d /sys/kernel/debug/kvm ]]; then
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null ||
        echo "boot-bench: cannot mount debugfs: KVM exits not counted" >&2
fi
if [[ -r /proc/cpuinfo ]] && grep -qw -e vmx -e svm /proc/cpuinfo && [[ -n ${ABIDE_NESTED:-} ]]; then
    where="inside the nested test host (KVM on emulated AMD-V in QEMU TCG)"
else
    where="directly on this machine"
fi
echo "boot-bench: $where; kernel $(cat "$g/release" 2>/dev/null || echo '?'); cmdline: $cmdline" >&2
python3 "$script_dir/boot_bench.py" --runs "$runs" --warmup "$warmup" --mem-mib "$mem" \
    --timeout "$run_timeout" \
    "${skips[@]}" "${kills[@]}" "${args[@]}"
