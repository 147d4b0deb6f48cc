#!/usr/bin/env bash
# Live-migration benchmark: total time, downtime (as each VMM reports it,
# and as the guest lived it) and bytes sent, for Abide (`abide receive` /
# `abide migrate`), QEMU (`-incoming tcp:` / QMP `migrate`) and Cloud
# Hypervisor (REST API `vm.receive-migration` / `vm.send-migration` on a
# destination started with no VM), in one run, on the same guest, over TCP
# on loopback (Cloud Hypervisor optionally over a Unix socket): the Debian
# cloud kernel and test initramfs with abide.test=ticker, which prints a
# line every 10 ms and otherwise sleeps, or also dirties memory at a fixed
# rate. 2 vCPUs; Abide machine pc-1.0, QEMU -M pc -cpu host (both PC with
# PCI and the same legacy devices), both booting the bzImage; Cloud
# Hypervisor boots the same kernel's PVH vmlinux (it has no bzImage
# loader) with its own defaults. Firecracker has no live migration.
#
# Cases (--cases NAME:MIB:RATE:BUF,...; default idle-512M:512:0:0,
# idle-2G:2048:0:0,dirty-512M:512:16:64): an idle 512 MiB guest, an idle
# 2 GiB guest, and a 512 MiB guest dirtying 16 MiB/s of a 64 MiB buffer.
# Each configuration RUNS times (default 3) round-robin, after one warm-up
# round; medians. Method: see resources/bench/migrate_bench.py.
#
# Runs directly when this machine has vmx/svm, otherwise inside the nested
# test host (resources/nested/run.sh), where the guests' KVM and both VMMs
# run under QEMU TCG: compare rows with each other, not with bare-metal
# numbers. Then (unless --no-native) Abide's own test guest, idle, 512 MiB,
# migrated on this machine's /dev/kvm (PVM here) the same way, 3 times.
#
# Usage: resources/bench/migrate.sh [-n RUNS] [--warmup N] [--cases ...]
#                                   [--only abide,qemu,ch] [--ch-transport tcp|unix]
#                                   [--timeout SECS] [--no-native]
# --only: a comma-separated subset of abide, qemu, ch (default all three;
# ch is left out, with a NOT MEASURED line, when its binary is missing).
# Exit status: 0 when every measured run migrated with consecutive ticks.
# Environment: ABIDE_BIN (default <repo>/target/dist/abide),
#   ABIDE_BENCH_CLOUD_HYPERVISOR (default <repo>/.cache/peers/bin/
#   cloud-hypervisor, built by resources/bench/peers.sh),
#   ABIDE_NESTED_MEM (default: twice the largest guest plus 3 GiB, at least
#   6 GiB), ABIDE_BENCH_VERBOSE=1 (print every step).
set -euo pipefail

die() { printf 'migrate-bench: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))

runs=3 warmup=1 cases=idle-512M:512:0:0,idle-2G:2048:0:0,dirty-512M:512:16:64 only=abide,qemu,ch
step_timeout=180 inner=0 native=1 ch_transport=tcp
while (($#)); do
    case $1 in
        -n|--runs) runs=${2:?}; shift 2 ;;
        --warmup) warmup=${2:?}; shift 2 ;;
        --cases) cases=${2:?}; shift 2 ;;
        --only) only=${2:?}; shift 2 ;;
        --ch-transport) ch_transport=${2:?}; shift 2 ;;
        --timeout) step_timeout=${2:?}; shift 2 ;;
        --no-native) native=0; shift ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "-n needs a positive number"
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup needs a number"
[[ $cases =~ ^[a-zA-Z0-9_-]+:[0-9]+:[0-9]+:[0-9]+(,[a-zA-Z0-9_-]+:[0-9]+:[0-9]+:[0-9]+)*$ ]] ||
    die "--cases takes NAME:MIB:RATE:BUF[,...]"
[[ $only =~ ^(abide|qemu|ch)(,(abide|qemu|ch))*$ ]] || die "--only takes a comma-separated subset of abide,qemu,ch"
[[ $ch_transport == tcp || $ch_transport == unix ]] || die "--ch-transport takes tcp or unix"

abide_bin=${ABIDE_BIN:-$repo/target/dist/abide}
[[ $abide_bin == /* ]] || abide_bin="$repo/$abide_bin"
ch_bin=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
[[ $ch_bin == /* ]] || ch_bin="$repo/$ch_bin"
g="$repo/.cache/linux/guest"
verbose=${ABIDE_BENCH_VERBOSE:+--verbose}

if ((!inner)); then
    [[ -x $abide_bin ]] || die "no abide binary at $abide_bin (cargo build --profile dist -p abide-vmm --bin abide)"
    # Build outside: writes inside the nested host are discarded.
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    export ABIDE_BIN=$abide_bin ABIDE_BENCH_CLOUD_HYPERVISOR=$ch_bin
    if [[ ,$only, == *,ch,* && ! -x $ch_bin ]]; then
        echo "migrate-bench: NOT MEASURED: $ch_bin missing (resources/bench/peers.sh builds it) -> skipping Cloud Hypervisor" >&2
        only=$(tr ',' '\n' <<<"$only" | grep -vx ch | paste -sd, -)
        [[ -n $only ]] || die "nothing left to run"
    fi
    max=0
    for c in ${cases//,/ }; do m=$(cut -d: -f2 <<<"$c"); ((m > max)) && max=$m; done
    export ABIDE_NESTED_MEM=${ABIDE_NESTED_MEM:-$((max * 2 + 3072 > 6144 ? max * 2 + 3072 : 6144))}
    ncases=$(($(tr ',' '\n' <<<"$cases" | wc -l) * $(tr ',' '\n' <<<"$only" | wc -l)))
    rc=0
    "$repo/resources/linux/run-direct-or-nested.sh" \
        --timeout $(((runs + warmup) * ncases * (step_timeout + 60) + 300)) -- \
        "${BASH_SOURCE[0]}" --inner -n "$runs" --warmup "$warmup" --cases "$cases" \
        --only "$only" --ch-transport "$ch_transport" --timeout "$step_timeout" || rc=$?
    if ((native)) && [[ -c /dev/kvm ]]; then
        echo "migrate-bench: Abide's test guest on this machine's /dev/kvm (idle, 512 MiB, spin ticker every 2 ms):" >&2
        python3 "$script_dir/migrate_bench.py" --abide "$abide_bin" --test-guest --runs 3 --warmup 1 \
            --cases test-guest-idle-512M:512:0:0 --cpus 1 --timeout "$step_timeout" $verbose || rc=$?
    fi
    exit "$rc"
fi

vmlinuz=$g/vmlinuz vmlinux=$g/vmlinux initrd=$g/initramfs.cpio.gz
for f in "$vmlinuz" "$initrd" $([[ ,$only, == *,ch,* ]] && echo "$vmlinux"); do [[ -s $f ]] || die "missing $f (run ./test.sh or resources/linux/build-guest-initramfs.sh)"; done
[[ -c /dev/kvm ]] || die "/dev/kvm missing"
# The nested host's loopback starts down.
ip link set lo up 2>/dev/null || true
if [[ -n ${ABIDE_NESTED:-} ]]; then
    where="inside the nested test host (KVM on emulated AMD-V in QEMU TCG; $(nproc) CPUs, $(($(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) >> 10)) MiB)"
else
    where="directly on this machine"
fi
ch_version=
[[ ,$only, == *,ch,* ]] && ch_version="; $("$ch_bin" --version 2>&1 | head -n1)"
echo "migrate-bench: $where; kernel $(cat "$g/release" 2>/dev/null || echo '?'); $(qemu-system-x86_64 --version | head -n1)$ch_version" >&2
exec python3 "$script_dir/migrate_bench.py" --abide "$abide_bin" --kernel "$vmlinuz" --initrd "$initrd" \
    --ch "$ch_bin" --vmlinux "$vmlinux" --ch-transport "$ch_transport" \
    --runs "$runs" --warmup "$warmup" --cases "$cases" --only "$only" --timeout "$step_timeout" $verbose
