#!/usr/bin/env bash
# Snapshot benchmark against the peers: save, and restore to a running
# guest, for Abide, Cloud Hypervisor, Firecracker and QEMU in one run on the same
# guest: the Debian cloud kernel's PVH vmlinux and the test initramfs with
# abide.test=progress (256 MiB, 2 vCPUs, 64 MiB of random data in tmpfs by
# default). Each VMM is used its own way: Abide's CLI (`abide snapshot
# --stop`, `abide restore`), Cloud Hypervisor's API (vm.pause, vm.snapshot,
# --restore, vm.resume), Firecracker's API (PATCH /vm Paused,
# /snapshot/create, /snapshot/load with resume_vm), QEMU's QMP (stop,
# migrate fd: to a file; a new QEMU with -incoming defer, migrate-incoming,
# cont; `-M microvm,rtc=on` with the same PVH vmlinux, as boot.sh's
# qemu-microvm-pvh). Method and definitions:
# resources/bench/snapshot_peers_bench.py. resources/bench/snapshot.sh has
# QEMU against Abide with a bzImage and machine pc.
#
# Runs inside the nested test host unless this machine has vmx/svm (see
# resources/bench/boot.sh); snapshot files go to its RAM-backed /tmp.
#
# --direct: instead, restore to running directly on this machine's
# /dev/kvm, never in the nested host (resources/bench/snapshot_direct_bench.py):
# on PVM a stock kernel never reaches userspace, so the guest is the PVH
# vmlinux stopped --boot-secs (default 3) into its boot, 256 MiB, 2 vCPUs.
# Rows: Abide (chunk hashes, lazy), Abide eager (ABIDE_RESTORE_EAGER=1),
# Abide before (ABIDE_BIN_BEFORE, a build without chunk hashes, if given)
# and Firecracker, if its binary is there. Cloud Hypervisor is left out
# (its restore copies all of memory; see the nested table).
#
# Usage: resources/bench/snapshot_peers.sh [-n RUNS] [--warmup N]
#            [--mem MIB] [--fill MIB] [--timeout SECS (per step, default 120)]
#            [--qemu-machine M (default microvm,rtc=on)]
#            [--direct [--boot-secs S]]
# Environment: ABIDE_BIN, ABIDE_BENCH_CLOUD_HYPERVISOR, ABIDE_BENCH_FIRECRACKER
# as for resources/bench/boot.sh (peers built by resources/bench/peers.sh);
# ABIDE_BENCH_QEMU (default: qemu-system-x86_64 on PATH);
# ABIDE_BIN_BEFORE (--direct only); ABIDE_BENCH_VERBOSE=1 prints every step
# with a time stamp.
set -euo pipefail

die() { printf 'snapshot-peers: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))

runs=3 warmup=1 mem=256 fill=64 step_timeout=120 inner=0 direct=0 boot_secs=3
qemu_machine=microvm,rtc=on
while (($#)); do
    case $1 in
        -n|--runs) runs=${2:?}; shift 2 ;;
        --warmup) warmup=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --fill) fill=${2:?}; shift 2 ;;
        --timeout) step_timeout=${2:?}; shift 2 ;;
        --inner) inner=1; shift ;;
        --direct) direct=1; shift ;;
        --boot-secs) boot_secs=${2:?}; shift 2 ;;
        --qemu-machine) qemu_machine=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
for v in "$runs" "$mem" "$fill" "$step_timeout"; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad number: $v"; done
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup needs a number"

abide_bin=${ABIDE_BIN:-$repo/target/dist/abide}
ch_bin=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
fc_bin=${ABIDE_BENCH_FIRECRACKER:-$repo/.cache/peers/bin/firecracker}
qemu_bin=${ABIDE_BENCH_QEMU:-$(command -v qemu-system-x86_64 || echo qemu-system-x86_64)}

if ((direct)); then
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    g="$repo/.cache/linux/guest"
    [[ -c /dev/kvm ]] || die "/dev/kvm missing"
    [[ -x $abide_bin ]] || die "no abide binary at $abide_bin (cargo build --profile dist -p abide-vmm --bin abide)"
    extra=()
    if [[ -n ${ABIDE_BIN_BEFORE:-} ]]; then
        [[ -x $ABIDE_BIN_BEFORE ]] || die "ABIDE_BIN_BEFORE=$ABIDE_BIN_BEFORE is not executable"
        extra+=(--abide-before "$ABIDE_BIN_BEFORE")
    fi
    if [[ -x $fc_bin ]]; then
        extra+=(--firecracker "$fc_bin")
    else
        echo "snapshot-peers: NOT MEASURED: firecracker: $fc_bin missing" >&2
    fi
    echo "snapshot-peers: directly on this machine's /dev/kvm ($(grep -qw -e vmx -e svm /proc/cpuinfo && echo 'hardware virtualization' || echo 'PVM')); kernel $(cat "$g/release" 2>/dev/null || echo '?') (PVH vmlinux); abide $("$abide_bin" --version 2>/dev/null | head -n1)" >&2
    exec python3 "$script_dir/snapshot_direct_bench.py" --kernel "$g/vmlinux" --initrd "$g/initramfs.cpio.gz" \
        --abide "$abide_bin" --runs "$runs" --warmup "$warmup" --mem-mib "$mem" --boot-secs "$boot_secs" \
        --timeout "$step_timeout" "${extra[@]}"
fi

if ((!inner)); then
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    export ABIDE_BIN=$abide_bin ABIDE_BENCH_CLOUD_HYPERVISOR=$ch_bin ABIDE_BENCH_FIRECRACKER=$fc_bin \
        ABIDE_BENCH_QEMU=$qemu_bin
    # A normal run takes well under a minute per VMM and round; this bounds
    # a hang of the nested host (seen twice, see docs/benchmarks.md).
    exec "$repo/resources/linux/run-direct-or-nested.sh" \
        --timeout $(((runs + warmup) * 4 * (step_timeout + 60) + 300)) -- \
        "${BASH_SOURCE[0]}" --inner -n "$runs" --warmup "$warmup" --mem "$mem" --fill "$fill" \
        --timeout "$step_timeout" --qemu-machine "$qemu_machine"
fi

g="$repo/.cache/linux/guest"
for f in "$g/vmlinux" "$g/initramfs.cpio.gz"; do [[ -s $f ]] || die "missing $f"; done
[[ -c /dev/kvm ]] || die "/dev/kvm missing"
args=() skips=()
for pair in "abide:$abide_bin" "cloud-hypervisor:$ch_bin" "firecracker:$fc_bin" "qemu:$qemu_bin"; do
    name=${pair%%:*} bin=${pair#*:}
    if [[ -x $bin ]]; then
        args+=("--$name" "$bin")
    else
        echo "snapshot-peers: NOT MEASURED: $name: $bin missing" >&2
        skips+=(--skip "$name=binary missing ($bin)")
    fi
done
echo "snapshot-peers: kernel $(cat "$g/release" 2>/dev/null || echo '?') (PVH vmlinux); ${ABIDE_NESTED:+inside the nested test host; }qemu -M $qemu_machine ($("$qemu_bin" --version 2>/dev/null | head -n1))" >&2
python3 "$script_dir/snapshot_peers_bench.py" --kernel "$g/vmlinux" --initrd "$g/initramfs.cpio.gz" \
    --runs "$runs" --warmup "$warmup" --mem-mib "$mem" --fill-mib "$fill" --timeout "$step_timeout" \
    --qemu-machine "$qemu_machine" \
    ${ABIDE_BENCH_VERBOSE:+--verbose} "${skips[@]}" "${args[@]}"
