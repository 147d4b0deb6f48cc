#!/usr/bin/env bash
# virtio-blk benchmark: 4 KiB random reads (IOPS) and 1 MiB sequential reads
# (MiB/s), queue depth 1, O_DIRECT inside the guest, with the same Debian
# cloud kernel and initramfs under Abide and under QEMU's virtio-blk-pci, in
# one run. The same tool (resources/bench/blkbench.c) also runs on this host
# against the image with O_DIRECT: the limit.
#
# Inside the nested test host (no vmx/svm here) both VMMs read a copy of the
# image from the nested host's RAM-backed root, so the numbers compare the
# two VMMs' block paths; compare rows, not absolute numbers.
#
# Usage: resources/bench/blk.sh [-n RUNS] [--secs SECONDS] [--size MIB]
set -euo pipefail

die() { printf 'blk-bench: error: %s\n' "$*" >&2; exit 1; }
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/../.." && pwd)
runs=3 secs=5 size=256 inner=0
while (($#)); do
    case $1 in
        -n) runs=${2:?}; shift 2 ;;
        --secs) secs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
abide=${ABIDE_BIN:-$repo/target/release/abide}
cache="$repo/.cache/bench"
img="$cache/disk-${size}m.img"
g="$repo/.cache/linux/guest"

if ((!inner)); then
    [[ -x $abide ]] || die "no abide binary at $abide (cargo build --release)"
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    mkdir -p "$cache"
    if [[ ! -s $img ]]; then
        head -c "$((size << 20))" /dev/urandom > "$img.tmp" && mv "$img.tmp" "$img"
    fi
    gcc -O2 -static -o "$cache/blkbench" "$script_dir/blkbench.c"
    log="$cache/blk-$(date +%Y%m%d-%H%M%S).log"
    {
        echo "host $("$cache/blkbench" "$img" randread "$secs")"
        echo "host $("$cache/blkbench" "$img" seqread "$secs")"
        ABIDE_BIN=$abide "$repo/resources/linux/run-direct-or-nested.sh" --timeout 1800 -- \
            "$0" --inner -n "$runs" --secs "$secs" --size "$size"
    } | tee "$log"
    # Medians per VMM and mode, and the ratios the README asks for.
    awk '
        function median(a, n,   i, j, t) {
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        / blkbench mode=/ {
            who = $1; for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            key = who SUBSEP f["mode"]
            v = f["mode"] == "randread" ? f["iops"] : f["mib_s"]
            vals[key, ++cnt[key]] = v
        }
        END {
            for (k in cnt) { n = cnt[k]; delete tmp; for (i = 1; i <= n; i++) tmp[i] = vals[k, i]; med[k] = median(tmp, n) }
            print ""
            print "| workload | Abide | QEMU | host O_DIRECT | Abide/QEMU | Abide/host |"
            print "|---|---|---|---|---|---|"
            split("randread seqread", modes, " ")
            for (m = 1; m <= 2; m++) {
                mode = modes[m]; unit = mode == "randread" ? "IOPS (4 KiB, QD1)" : "MiB/s (1 MiB, QD1)"
                a = med["abide" SUBSEP mode]; q = med["qemu" SUBSEP mode]; h = med["host" SUBSEP mode]
                printf "| %s %s | %.0f | %.0f | %.0f | %.2f | %.2f |\n", mode, unit, a, q, h, (q ? a / q : 0), (h ? a / h : 0)
            }
        }' "$log"
    exit 0
fi

work=$(mktemp -d)
cp "$img" "$work/disk.img"
cmdline="console=ttyS0 quiet abide.test=blkbench abide.bench_secs=$secs"
for ((i = 1; i <= runs; i++)); do
    "$abide" run --kernel "$g/vmlinuz" --initrd "$g/initramfs.cpio.gz" --cmdline "$cmdline" \
        --cpus 2 --memory 512M --disk "path=$work/disk.img,readonly=on" </dev/null |
        sed -n 's/^abide-linux: blkbench /abide blkbench /p'
    qemu-system-x86_64 -enable-kvm -M pc -cpu host -smp 2 -m 512 \
        -kernel "$g/vmlinuz" -initrd "$g/initramfs.cpio.gz" -append "$cmdline" \
        -nographic -nodefaults -serial stdio -no-reboot \
        -drive "file=$work/disk.img,if=none,id=d0,format=raw,readonly=on" \
        -device virtio-blk-pci,drive=d0,disable-legacy=on </dev/null |
        sed -n 's/^abide-linux: blkbench /qemu blkbench /p'
done
