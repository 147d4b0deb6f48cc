#!/usr/bin/env bash
# Snapshot benchmark against the peers: save, and restore to a running
# guest, for Abide, Cloud Hypervisor and Firecracker in one run on the same
# guest: the Debian cloud kernel's PVH vmlinux and the test initramfs with
# abide.test=progress (256 MiB, 2 vCPUs, 64 MiB of random data in tmpfs by
# default). Each VMM is used its own way: Abide's CLI (`abide snapshot
# --stop`, `abide restore`), Cloud Hypervisor's API (vm.pause, vm.snapshot,
# --restore, vm.resume), Firecracker's API (PATCH /vm Paused,
# /snapshot/create, /snapshot/load with resume_vm). Method and definitions:
# resources/bench/snapshot_peers_bench.py. QEMU's figures are in
# resources/bench/snapshot.sh (bzImage, machine pc), not here.
#
# Runs inside the nested test host unless this machine has vmx/svm (see
# resources/bench/boot.sh); snapshot files go to its RAM-backed /tmp.
#
# Usage: resources/bench/snapshot_peers.sh [-n RUNS] [--warmup N]
#            [--mem MIB] [--fill MIB] [--timeout SECS (per step, default 120)]
# Environment: ABIDE_BIN, ABIDE_BENCH_CLOUD_HYPERVISOR, ABIDE_BENCH_FIRECRACKER
# as for resources/bench/boot.sh (peers built by resources/bench/peers.sh);
# ABIDE_BENCH_VERBOSE=1 prints every step with a time stamp.
set -euo pipefail

die() { printf 'snapshot-peers: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))

runs=3 warmup=1 mem=256 fill=64 step_timeout=120 inner=0
while (($#)); do
    case $1 in
        -n|--runs) runs=${2:?}; shift 2 ;;
        --warmup) warmup=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --fill) fill=${2:?}; shift 2 ;;
        --timeout) step_timeout=${2:?}; shift 2 ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
for v in "$runs" "$mem" "$fill" "$step_timeout"; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad number: $v"; done
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup needs a number"

abide_bin=${ABIDE_BIN:-$repo/target/release/abide}
ch_bin=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
fc_bin=${ABIDE_BENCH_FIRECRACKER:-$repo/.cache/peers/bin/firecracker}

if ((!inner)); then
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    export ABIDE_BIN=$abide_bin ABIDE_BENCH_CLOUD_HYPERVISOR=$ch_bin ABIDE_BENCH_FIRECRACKER=$fc_bin
    # A normal run takes well under a minute per VMM and round; this bounds
    # a hang of the nested host (seen twice, see docs/benchmarks.md).
    exec "$repo/resources/linux/run-direct-or-nested.sh" \
        --timeout $(((runs + warmup) * 3 * (step_timeout + 60) + 300)) -- \
        "${BASH_SOURCE[0]}" --inner -n "$runs" --warmup "$warmup" --mem "$mem" --fill "$fill" \
        --timeout "$step_timeout"
fi

g="$repo/.cache/linux/guest"
for f in "$g/vmlinux" "$g/initramfs.cpio.gz"; do [[ -s $f ]] || die "missing $f"; done
[[ -c /dev/kvm ]] || die "/dev/kvm missing"
args=() skips=()
for pair in "abide:$abide_bin" "cloud-hypervisor:$ch_bin" "firecracker:$fc_bin"; do
    name=${pair%%:*} bin=${pair#*:}
    if [[ -x $bin ]]; then
        args+=("--$name" "$bin")
    else
        echo "snapshot-peers: NOT MEASURED: $name: $bin missing" >&2
        skips+=(--skip "$name=binary missing ($bin)")
    fi
done
echo "snapshot-peers: kernel $(cat "$g/release" 2>/dev/null || echo '?') (PVH vmlinux); ${ABIDE_NESTED:+inside the nested test host}" >&2
python3 "$script_dir/snapshot_peers_bench.py" --kernel "$g/vmlinux" --initrd "$g/initramfs.cpio.gz" \
    --runs "$runs" --warmup "$warmup" --mem-mib "$mem" --fill-mib "$fill" --timeout "$step_timeout" \
    ${ABIDE_BENCH_VERBOSE:+--verbose} "${skips[@]}" "${args[@]}"
