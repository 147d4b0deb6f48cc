#!/usr/bin/env bash
# Where each VMM's own memory goes: boots the benchmark guest (the Debian
# cloud kernel's PVH vmlinux and the test initramfs, console=ttyS0 quiet
# abide.test=marker, 2 vCPUs, 512 MiB, as resources/bench/boot.sh does)
# under Abide and Cloud Hypervisor, RUNS times each, and prints each
# mapping's resident size at the boot marker, summed by what it maps
# (resources/bench/rss_breakdown.py), inside the nested test host unless
# this machine has vmx/svm.
#
# Usage: resources/bench/rss_breakdown.sh [-n RUNS]
# Environment: ABIDE_BIN (default <repo>/target/dist/abide),
#   ABIDE_BENCH_CLOUD_HYPERVISOR (default .cache/peers/bin/cloud-hypervisor;
#   left out when missing).
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/../.." && pwd)
runs=2 inner=0
while (($#)); do
    case $1 in
        -n) runs=${2:?}; shift 2 ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "rss-breakdown: unknown argument $1" >&2; exit 2 ;;
    esac
done
abide=${ABIDE_BIN:-$repo/target/dist/abide}
ch=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
if ((!inner)); then
    [[ -x $abide ]] || { echo "rss-breakdown: no abide at $abide (cargo build --profile dist -p abide-vmm --bin abide)" >&2; exit 1; }
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    export ABIDE_BIN=$abide ABIDE_BENCH_CLOUD_HYPERVISOR=$ch
    exec "$repo/resources/linux/run-direct-or-nested.sh" --timeout $((runs * 2 * 200 + 300)) -- \
        "${BASH_SOURCE[0]}" --inner -n "$runs"
fi
g="$repo/.cache/linux/guest"
cmdline="console=ttyS0 quiet abide.test=marker"
echo "rss-breakdown: THP $(cat /sys/kernel/mm/transparent_hugepage/enabled), shmem THP $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)"
for ((i = 1; i <= runs; i++)); do
    python3 "$script_dir/rss_breakdown.py" abide "$abide" run --kernel "$g/vmlinux" \
        --initrd "$g/initramfs.cpio.gz" --cmdline "$cmdline" --memory 512M --cpus 2 --serial stdio
    if [[ -x $ch ]]; then
        python3 "$script_dir/rss_breakdown.py" cloud-hypervisor "$ch" --kernel "$g/vmlinux" \
            --initramfs "$g/initramfs.cpio.gz" --cmdline "$cmdline" --cpus boot=2 \
            --memory size=512M --serial tty --console off
    else
        echo "rss-breakdown: NOT MEASURED: cloud-hypervisor missing ($ch; resources/bench/peers.sh builds it)"
    fi
done
