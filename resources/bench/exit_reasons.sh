#!/usr/bin/env bash
# KVM exit reasons per boot: boots the boot benchmark's guest (PVH vmlinux,
# initramfs, "console=ttyS0 quiet abide.test=marker", 2 vCPUs, 512 MiB)
# under Abide, Cloud Hypervisor and Firecracker, ROUNDS times each, with the
# kvm:kvm_exit tracepoint on from spawn to the marker line, and prints the
# count of each exit reason. A diagnostic for resources/bench/boot.sh's
# "KVM exits to marker" column, not a timing benchmark (the tracepoint
# slows every exit down). Inside the nested test host unless this machine
# has vmx/svm; needs root (tracefs).
#
# Usage: resources/bench/exit_reasons.sh [ROUNDS (default 2)]
# Environment: ABIDE_BIN, ABIDE_BENCH_CLOUD_HYPERVISOR, ABIDE_BENCH_FIRECRACKER
# as for resources/bench/boot.sh.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))
rounds=${1:-2}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [ROUNDS]" >&2; exit 2; }
abide_bin=${ABIDE_BIN:-$repo/target/dist/abide}
ch_bin=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
fc_bin=${ABIDE_BENCH_FIRECRACKER:-$repo/.cache/peers/bin/firecracker}

if [[ -z ${ABIDE_NESTED:-} ]]; then
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    export ABIDE_BIN=$abide_bin ABIDE_BENCH_CLOUD_HYPERVISOR=$ch_bin ABIDE_BENCH_FIRECRACKER=$fc_bin
    exec "$repo/resources/linux/run-direct-or-nested.sh" --timeout $((rounds * 3 * 40 + 300)) -- \
        env ABIDE_NESTED=direct "${BASH_SOURCE[0]}" "$rounds"
fi

g="$repo/.cache/linux/guest"
cmdline="console=ttyS0 quiet abide.test=marker"
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
t=/sys/kernel/tracing
[[ -d $t/events/kvm ]] || mount -t tracefs tracefs "$t" 2>/dev/null || true
[[ -d $t/events/kvm ]] || t=/sys/kernel/debug/tracing
[[ -d $t/events/kvm/kvm_exit ]] || { echo "exit-reasons: no kvm:kvm_exit tracepoint (tracefs)" >&2; exit 1; }
echo 32768 > "$t/buffer_size_kb"
work=$(mktemp -d)
trap 'echo 0 > "$t/events/kvm/kvm_exit/enable"; rm -rf "$work"' EXIT
cat > "$work/fc.json" <<EOF
{"boot-source": {"kernel_image_path": "$g/vmlinux", "initrd_path": "$g/initramfs.cpio.gz",
                 "boot_args": "$cmdline"},
 "machine-config": {"vcpu_count": 2, "mem_size_mib": 512}, "drives": []}
EOF

one() { # NAME COMMAND...
    local name=$1 pid i
    shift
    echo > "$t/trace"
    echo 1 > "$t/events/kvm/kvm_exit/enable"
    timeout 60 "$@" > "$work/$name.out" 2>&1 &
    pid=$!
    for ((i = 0; i < 600; i++)); do
        grep -q "abide-linux: userspace" "$work/$name.out" && break
        sleep 0.1
    done
    echo 0 > "$t/events/kvm/kvm_exit/enable"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    grep -q "abide-linux: userspace" "$work/$name.out" || echo "exit-reasons: $name: no marker within 60 s"
    echo "== $name: $(grep -c kvm_exit "$t/trace") kvm_exit events (ring buffer overruns: $(grep -h '^overrun' "$t"/per_cpu/cpu*/stats | awk '{s += $2} END {print s}'))"
    grep -o 'reason [A-Za-z_0-9]*' "$t/trace" | sort | uniq -c | sort -rn | head -n 10
}

for ((r = 1; r <= rounds; r++)); do
    if [[ -x $abide_bin ]]; then one abide-pvh "$abide_bin" run --kernel "$g/vmlinux" --initrd "$g/initramfs.cpio.gz" \
        --cmdline "$cmdline" --memory 512M --cpus 2 --serial stdio; fi
    if [[ -x $ch_bin ]]; then one cloud-hypervisor-pvh "$ch_bin" --kernel "$g/vmlinux" --initramfs "$g/initramfs.cpio.gz" \
        --cmdline "$cmdline" --cpus boot=2 --memory size=512M --serial tty --console off; fi
    if [[ -x $fc_bin ]]; then one firecracker "$fc_bin" --no-api --config-file "$work/fc.json"; fi
done
exit 0
