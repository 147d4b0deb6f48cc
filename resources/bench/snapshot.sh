#!/usr/bin/env bash
# Snapshot benchmark: save time, and restore time to the first guest
# instruction and to the guest's next console line, for Abide
# (`abide snapshot --stop` / `abide restore`) and QEMU (stop + migrate to a
# file / -incoming + cont), in one run, on the same guest: the Debian cloud
# kernel (bzImage) and test initramfs with abide.test=progress, which fills
# FILL MiB of tmpfs with random data and then prints a numbered line every
# 100 ms. 2 vCPUs; Abide machine pc-1.0, QEMU -M pc (both PC with PCI and
# the same legacy devices; QEMU boots through SeaBIOS).
#
# Sizes (--sizes MIB:FILL,...; default 256:64,2048:512): 256 MiB guest with
# 64 MiB of random data, 2 GiB guest with 512 MiB. Each configuration RUNS
# times (default 3) round-robin, after one warm-up round; medians.
#
# Runs directly when this machine has vmx/svm, otherwise everything happens
# inside the nested test host (resources/nested/run.sh), where the guests'
# KVM and both VMMs themselves run under QEMU TCG: compare rows with each
# other, not with bare-metal numbers. Snapshot files go to $TMPDIR (inside
# the nested host: its RAM-backed root), and are deleted after each run.
#
# Method: see resources/bench/snapshot_bench.py.
#
# When the guests run nested, Abide's restore path is also timed once on this
# machine's own /dev/kvm (PVM here), where Abide itself runs natively: a
# 2-vCPU 256 MiB guest stopped 3 s into a PVH boot of the same kernel (a
# stock kernel gets no further under PVM), restored 3 times; prints
# verify_ms/ready_ms and the file size. --no-native skips it.
#
# Usage: resources/bench/snapshot.sh [-n RUNS] [--warmup N] [--sizes MIB:FILL[,...]]
#                                    [--only abide|qemu] [--timeout SECS (per step, default 120)]
#                                    [--no-native]
# Exit status: 0 when every measured run saved, restored and resumed the
# guest at the next line.
# Environment:
#   ABIDE_BIN         abide binary (default <repo>/target/dist/abide)
#   ABIDE_NESTED_MEM  memory of the nested test host in MiB (default here:
#                     6144, or more for larger --sizes)
#   ABIDE_BENCH_VERBOSE=1  print every step with a time stamp (to find where
#                     a run hangs)
set -euo pipefail

die() { printf 'snapshot-bench: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))

runs=3 warmup=1 sizes=256:64,2048:512 only=abide,qemu step_timeout=120 inner=0 native=1
while (($#)); do
    case $1 in
        -n|--runs) runs=${2:?}; shift 2 ;;
        --warmup) warmup=${2:?}; shift 2 ;;
        --sizes) sizes=${2:?}; shift 2 ;;
        --only) only=${2:?}; shift 2 ;;
        --timeout) step_timeout=${2:?}; shift 2 ;;
        --no-native) native=0; shift ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "-n needs a positive number"
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup needs a number"
[[ $step_timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout needs a positive number"
[[ $sizes =~ ^[0-9]+:[0-9]+(,[0-9]+:[0-9]+)*$ ]] || die "--sizes takes MIB:FILL[,MIB:FILL...]"

abide_bin=${ABIDE_BIN:-$repo/target/dist/abide}
[[ $abide_bin == /* ]] || abide_bin="$repo/$abide_bin"
g="$repo/.cache/linux/guest"

# Abide's restore path on this machine's /dev/kvm (see the header).
native_ref() {
    local w pid i rpid line
    w=$(mktemp -d)
    "$abide_bin" run --kernel "$g/vmlinux" --initrd "$g/initramfs.cpio.gz" --cmdline "console=ttyS0 quiet" \
        --machine pc-1.0 --cpus 2 --memory 256M --serial null --api-socket "$w/run.sock" 2>"$w/run.err" &
    pid=$!
    sleep 3
    if ! line=$("$abide_bin" snapshot --api-socket "$w/run.sock" --stop "$w/snap" 2>&1); then
        echo "snapshot-bench: native reference NOT MEASURED: abide snapshot failed: $line" >&2
        kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$w"; return 0
    fi
    wait "$pid" || true
    echo "snapshot-bench: native reference (this machine's /dev/kvm, PVH boot stopped at 3 s, 256 MiB): save $line" >&2
    for i in 1 2 3; do
        ABIDE_RESTORE_TIMINGS=1 "$abide_bin" restore "$w/snap" --serial null --api-socket "$w/r$i.sock" 2>"$w/r$i.err" &
        rpid=$!
        for _ in $(seq 100); do grep -q 'restore verify_ms' "$w/r$i.err" && break; sleep 0.05; done
        "$abide_bin" ctl --api-socket "$w/r$i.sock" quit >/dev/null 2>&1 || kill "$rpid" 2>/dev/null
        wait "$rpid" 2>/dev/null || true
        echo "snapshot-bench: native reference restore $i: $(grep -m1 'restore verify_ms' "$w/r$i.err" || echo "no timing line: $(tail -n2 "$w/r$i.err")")" >&2
    done
    rm -rf "$w"
}

if ((!inner)); then
    [[ -x $abide_bin ]] || die "no abide binary at $abide_bin (cargo build --profile dist -p abide-vmm --bin abide)"
    # Build outside: writes inside the nested host are discarded.
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    export ABIDE_BIN=$abide_bin
    # The largest guest's RAM (QEMU touches what the guest used, Abide's
    # restored memory is the file's page cache) plus its snapshot file, twice
    # over, plus the nested host's own needs.
    max=0
    for s in ${sizes//,/ }; do ((${s%%:*} > max)) && max=${s%%:*}; done
    export ABIDE_NESTED_MEM=${ABIDE_NESTED_MEM:-$((max * 2 + 2048 > 6144 ? max * 2 + 2048 : 6144))}
    # SHA-256 throughput here, for comparison with the same measurement
    # inside (Abide verifies every snapshot section before restoring).
    python3 -c 'import hashlib, os, time; b = os.urandom(64 << 20); t = time.monotonic(); hashlib.sha256(b).digest(); print(f"snapshot-bench: python hashlib SHA-256 on this machine: {len(b) / (time.monotonic() - t) / 1e6:.0f} MB/s")' >&2
    if ((native)) && [[ -c /dev/kvm ]] && { ! grep -qw -e vmx -e svm /proc/cpuinfo || [[ ${ABIDE_FORCE_NESTED:-0} == 1 ]]; }; then
        native_ref
    fi
    nconf=$(($(tr ',' '\n' <<<"$sizes" | wc -l) * $(tr ',' '\n' <<<"$only" | wc -l)))
    # Generous: a normal run takes well under a minute, a failing one about
    # one step time-out.
    exec "$repo/resources/linux/run-direct-or-nested.sh" \
        --timeout $(((runs + warmup) * nconf * (step_timeout + 60) + 300)) -- \
        "${BASH_SOURCE[0]}" --inner -n "$runs" --warmup "$warmup" --sizes "$sizes" \
        --only "$only" --timeout "$step_timeout"
fi

vmlinuz=$g/vmlinuz initrd=$g/initramfs.cpio.gz
for f in "$vmlinuz" "$initrd"; do [[ -s $f ]] || die "missing $f (run ./test.sh or resources/linux/build-guest-initramfs.sh)"; done
[[ -c /dev/kvm ]] || die "/dev/kvm missing"
[[ -x $abide_bin ]] || die "no abide binary at $abide_bin"
if grep -qw -e vmx -e svm /proc/cpuinfo && [[ -n ${ABIDE_NESTED:-} ]]; then
    where="inside the nested test host (KVM on emulated AMD-V in QEMU TCG; $(nproc) CPUs, $(($(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) >> 10)) MiB)"
else
    where="directly on this machine"
fi
echo "snapshot-bench: $where; kernel $(cat "$g/release" 2>/dev/null || echo '?'); $(qemu-system-x86_64 --version | head -n1)" >&2
python3 -c 'import hashlib, os, time; b = os.urandom(64 << 20); t = time.monotonic(); hashlib.sha256(b).digest(); print(f"snapshot-bench: python hashlib SHA-256 here: {len(b) / (time.monotonic() - t) / 1e6:.0f} MB/s")' >&2
python3 "$script_dir/snapshot_bench.py" --abide "$abide_bin" --kernel "$vmlinuz" --initrd "$initrd" \
    --runs "$runs" --warmup "$warmup" --sizes "$sizes" --only "$only" --timeout "$step_timeout" \
    ${ABIDE_BENCH_VERBOSE:+--verbose}
