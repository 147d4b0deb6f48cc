#!/usr/bin/env bash
# virtio-blk benchmark: Abide against QEMU, Cloud Hypervisor and Firecracker,
# in one run, with the same Debian cloud kernel and the same initramfs.
# Workloads (resources/bench/blkbench.c), O_DIRECT on /dev/vda inside the
# guest, over a read-only image of random data:
#   randread QD1   4 KiB random reads, queue depth 1: synchronous preads (IOPS)
#   randread QD16  4 KiB random reads, queue depth 16 (--qd): Linux native AIO
#                  (io_setup/io_submit/io_getevents through raw syscall(2);
#                  blkbench is static, without libaio), 16 reads always in
#                  flight (IOPS)
#   seqread QD1    1 MiB sequential reads, synchronous preads (MiB/s)
# The same tool also runs on this host against the image with O_DIRECT: the
# limit ("host O_DIRECT").
#
# The VMMs, each RUNS times, round-robin (2 vCPUs, 512 MiB):
#   abide     $ABIDE_BIN run --kernel vmlinuz (bzImage) --disk path=IMG,readonly=on
#   qemu      qemu-system-x86_64 -M pc -kernel vmlinuz, -device
#             virtio-blk-pci,disable-legacy=on on a raw readonly=on drive
#             (default cache mode and AIO backend)
#   ch        cloud-hypervisor --kernel vmlinux (PVH) --disk
#             path=IMG,readonly=on,image_type=raw (virtio-pci; its defaults:
#             one queue, io_uring when the host has it)
#   fc        firecracker --no-api --config-file: vmlinux (PVH), one drive
#             (is_root_device false, is_read_only true; its default Sync I/O
#             engine). Its disk is virtio-mmio, which it describes in its
#             ACPI DSDT (LNRO0005) and on the command line; the Debian cloud
#             kernel has virtio_mmio as a module and no
#             CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so the guest loads
#             virtio_mmio.ko (from the kernel package) and finds it by ACPI.
#             Firecracker does not exit when the guest powers off: it is
#             killed once the guest printed "abide-linux: poweroff".
# Rows of a VMM that did not run say why (binary missing, no /dev/vda, ...).
#
# The guest: the test initramfs (resources/linux/build-guest-initramfs.sh,
# with this tree's guest-init.sh as /init and blkbench), and virtio_mmio.ko
# added to its modules, as a second cpio archive appended to it
# (.cache/bench/blk-initramfs.cpio.gz). Command line: console=ttyS0 quiet
# abide.test=blkbench abide.bench_secs=SECS abide.bench_qd=QD.
#
# Inside the nested test host (no vmx/svm here) all VMMs read a copy of the
# image from the nested host's RAM-backed root, so the numbers compare the
# VMMs' block paths; compare columns, not absolute numbers.
#
# Usage: resources/bench/blk.sh [-n RUNS] [--secs SECONDS] [--size MIB]
#                               [--qd DEPTH] [--run-timeout SECS]
# Environment:
#   ABIDE_BIN                     abide (default <repo>/target/dist/abide)
#   ABIDE_BENCH_CLOUD_HYPERVISOR  cloud-hypervisor binary
#                                 (default <repo>/.cache/peers/bin/cloud-hypervisor)
#   ABIDE_BENCH_FIRECRACKER       firecracker binary
#                                 (default <repo>/.cache/peers/bin/firecracker)
set -euo pipefail

die() { printf 'blk-bench: error: %s\n' "$*" >&2; exit 1; }
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/../.." && pwd)
runs=3 secs=5 size=256 qd=16 run_timeout=180 inner=0
while (($#)); do
    case $1 in
        -n) runs=${2:?}; shift 2 ;;
        --secs) secs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --qd) qd=${2:?}; shift 2 ;;
        --run-timeout) run_timeout=${2:?}; shift 2 ;;
        --inner) inner=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "-n needs a positive number"
if [[ ! $qd =~ ^[0-9]+$ ]] || ((qd < 2 || qd > 256)); then die "--qd needs a number from 2 to 256"; fi
[[ $run_timeout =~ ^[1-9][0-9]*$ ]] || die "--run-timeout needs a positive number"
abide=${ABIDE_BIN:-$repo/target/dist/abide}
ch_bin=${ABIDE_BENCH_CLOUD_HYPERVISOR:-$repo/.cache/peers/bin/cloud-hypervisor}
fc_bin=${ABIDE_BENCH_FIRECRACKER:-$repo/.cache/peers/bin/firecracker}
cache="$repo/.cache/bench"
img="$cache/disk-${size}m.img"
g="$repo/.cache/linux/guest"
initrd="$cache/blk-initramfs.cpio.gz"

# The bench guest: the test initramfs (this tree's /init and blkbench) plus
# an overlay archive with virtio_mmio.ko for Firecracker.
# shellcheck source=../linux/initramfs-lib.sh
source "$repo/resources/linux/initramfs-lib.sh"
build_initrd() {
    "$repo/resources/linux/build-guest-initramfs.sh" >&2
    local release deb over
    release=$(cat "$g/release")
    deb=$(find "$repo/.cache/linux/debs" -name "linux-image-${release}-unsigned_*.deb" | head -n1)
    [[ -n $deb ]] || die "no package of the guest kernel $release in .cache/linux/debs (resources/linux/fetch-kernels.sh)"
    over=$(mktemp -d)
    mkdir -p "$over/root/lib/modules/abide"
    dpkg-deb --fsys-tarfile "$deb" |
        tar -xO "./lib/modules/$release/kernel/drivers/virtio/virtio_mmio.ko" \
            > "$over/root/lib/modules/abide/virtio_mmio.ko"
    # virtio_mmio depends on virtio and virtio_ring, which come first.
    { cat "$g/modules/load-order"; echo virtio_mmio.ko; } > "$over/root/lib/modules/abide/load-order"
    initramfs_pack "$over/root" "$over/overlay.cpio.gz"
    cat "$g/initramfs.cpio.gz" "$over/overlay.cpio.gz" > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$over"
}

if ((!inner)); then
    [[ -x $abide ]] || die "no abide binary at $abide (cargo build --profile dist -p abide-vmm --bin abide)"
    mkdir -p "$cache"
    build_initrd
    if [[ ! -s $img ]]; then
        head -c "$((size << 20))" /dev/urandom > "$img.tmp" && mv "$img.tmp" "$img"
    fi
    gcc -O2 -static -o "$cache/blkbench" "$script_dir/blkbench.c"
    log="$cache/blk-$(date +%Y%m%d-%H%M%S).log"
    # ABIDE_* variables reach the nested test host; the binaries are files
    # of this machine, which it sees at the same paths.
    export ABIDE_BIN=$abide ABIDE_BENCH_CLOUD_HYPERVISOR=$ch_bin ABIDE_BENCH_FIRECRACKER=$fc_bin
    {
        echo "start $(date -u +%Y-%m-%dT%H:%M:%SZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "host $("$cache/blkbench" "$img" randread "$secs")"
        echo "host $("$cache/blkbench" "$img" randread "$secs" "$qd")"
        echo "host $("$cache/blkbench" "$img" seqread "$secs")"
        "$repo/resources/linux/run-direct-or-nested.sh" \
            --timeout $((runs * 4 * (run_timeout + 10) + 300)) -- \
            "$0" --inner -n "$runs" --secs "$secs" --size "$size" --qd "$qd" \
            --run-timeout "$run_timeout" || echo "all note the nested run exited with status $?"
        echo "end $(date -u +%Y-%m-%dT%H:%M:%SZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    } | tee "$log"
    # Medians per VMM and workload, and the ratios Abide/peer.
    awk -v qd="$qd" -v runs="$runs" '
        function median(a, n,   i, j, t) {
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        # A whole result line only: the nested host relays the output through
        # its serial console, and a line cut short there is left out (noted).
        / blkbench mode=/ && !/^[a-z]+ blkbench mode=[a-z]+ qd=[0-9]+ ops=[0-9]+ bytes=[0-9]+ secs=[0-9.]+ iops=[0-9]+ mib_s=[0-9.]+$/ {
            bad[++nbad] = $0; next
        }
        / blkbench mode=/ {
            who = $1; delete f
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            key = who SUBSEP f["mode"] SUBSEP f["qd"]
            vals[key, ++cnt[key]] = f["mode"] == "randread" ? f["iops"] : f["mib_s"]
        }
        # "<vmm> note <why>": why a VMM (or the nested run) gave no numbers.
        $2 == "note" {
            who = $1; why = $0; sub(/^[^ ]+ note /, "", why)
            if (!(who in note)) note[who] = why; else if (index(note[who], why) == 0) note[who] = note[who] "; " why
        }
        function cell(v, k,   n) {
            n = cnt[v SUBSEP k]
            if (n) return sprintf("%.0f", med[v SUBSEP k]) (v != "host" && n < runs ? " (" n " of " runs " runs)" : "")
            return "not run: " (v in note ? note[v] : (("all" in note) ? note["all"] : "no result"))
        }
        function ratio(a, b, k) {
            return cnt[a SUBSEP k] && cnt[b SUBSEP k] && med[b SUBSEP k] ? sprintf("%.2f", med[a SUBSEP k] / med[b SUBSEP k]) : "n/a"
        }
        END {
            for (k in cnt) { n = cnt[k]; delete tmp; for (i = 1; i <= n; i++) tmp[i] = vals[k, i]; med[k] = median(tmp, n) }
            nv = split("abide qemu ch fc host", vm, " ")
            print ""
            print "| workload | Abide | QEMU | Cloud Hypervisor | Firecracker | host O_DIRECT | Abide/QEMU | Abide/CH | Abide/FC | Abide/host |"
            print "|---|---|---|---|---|---|---|---|---|---|"
            nw = split("randread 1|randread " qd "|seqread 1", wl, "|")
            for (w = 1; w <= nw; w++) {
                split(wl[w], p, " "); k = p[1] SUBSEP p[2]
                label = p[1] == "randread" ? "randread IOPS (4 KiB, QD" p[2] ")" : "seqread MiB/s (1 MiB, QD1)"
                line = "| " label
                for (v = 1; v <= nv; v++) line = line " | " cell(vm[v], k)
                for (v = 2; v <= nv; v++) line = line " | " ratio("abide", vm[v], k)
                print line " |"
            }
            print ""
            print "Medians of " runs " runs (host: 1 run)."
            for (v in note) print "note: " v ": " note[v]
            for (i = 1; i <= nbad; i++) print "note: garbled result line left out: " bad[i]
        }' "$log"
    exit 0
fi

# Inside the nested test host (or directly on a host with vmx/svm).
work=$(mktemp -d)
cp "$img" "$work/disk.img"
cmdline="console=ttyS0 quiet abide.test=blkbench abide.bench_secs=$secs abide.bench_qd=$qd"
[[ -s $initrd ]] || die "missing $initrd"

# run_vm NAME COMMAND...: boot one guest and print its results as
# "NAME blkbench ..." lines, or "NAME note WHY" lines when it gave none.
run_vm() {
    local name=$1 out="$work/$1.out" pid rc=0 ticks=0 killed=''
    shift
    "$@" </dev/null >"$out" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [[ $name == fc ]] && grep -q '^abide-linux: poweroff' "$out"; then
            kill "$pid"; killed=yes; break
        fi
        if ((ticks >= run_timeout * 5)); then
            kill "$pid"; echo "$name note timed out after ${run_timeout}s"; break
        fi
        sleep 0.2; ticks=$((ticks + 1))
    done
    wait "$pid" || rc=$?
    tr -d '\r' < "$out" | sed -n "s/^abide-linux: blkbench /$name blkbench /p"
    if ! grep -q '^abide-linux: blkbench mode=' "$out"; then
        # Why: the guest's blkbench error, or the VMM's last words.
        local why
        why=$(tr -d '\r' < "$out" | sed -n 's/^abide-linux: blkbench: //p' | head -n1)
        [[ -n $why ]] || why="no results, exit status $rc; last output: $(tr -d '\r' < "$out" | grep -v '^ *$' | tail -n1 | cut -c1-160)"
        echo "$name note $why"
        tr -d '\r' < "$out" | tail -n 15 | sed "s/^/$name log: /" >&2
    elif [[ -z $killed && $rc != 0 ]]; then
        echo "$name exit status $rc" >&2
    fi
}

fc_config="$work/fc.json"
python3 - "$fc_config" "$g/vmlinux" "$initrd" "$cmdline" "$work/disk.img" <<'EOF'
import json, sys
path, kernel, initrd, cmdline, disk = sys.argv[1:]
with open(path, "w") as f:
    json.dump({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": cmdline},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
        "drives": [{"drive_id": "vda", "path_on_host": disk,
                    "is_root_device": False, "is_read_only": True}],
    }, f, indent=1)
EOF
echo "blk-bench: kernel $(cat "$g/release"); cmdline: $cmdline; $(nproc) CPUs" >&2
for ((i = 1; i <= runs; i++)); do
    run_vm abide "$abide" run --kernel "$g/vmlinuz" --initrd "$initrd" --cmdline "$cmdline" \
        --cpus 2 --memory 512M --disk "path=$work/disk.img,readonly=on"
    run_vm qemu qemu-system-x86_64 -enable-kvm -M pc -cpu host -smp 2 -m 512 \
        -kernel "$g/vmlinuz" -initrd "$initrd" -append "$cmdline" \
        -nographic -nodefaults -serial stdio -no-reboot \
        -drive "file=$work/disk.img,if=none,id=d0,format=raw,readonly=on" \
        -device virtio-blk-pci,drive=d0,disable-legacy=on
    if [[ -x $ch_bin ]]; then
        run_vm ch "$ch_bin" --kernel "$g/vmlinux" --initramfs "$initrd" --cmdline "$cmdline" \
            --cpus boot=2 --memory size=512M --serial tty --console off \
            --disk "path=$work/disk.img,readonly=on,image_type=raw"
    else
        echo "ch note binary missing ($ch_bin; resources/bench/peers.sh builds it)"
    fi
    if [[ -x $fc_bin ]]; then
        run_vm fc "$fc_bin" --no-api --config-file "$fc_config"
    else
        echo "fc note binary missing ($fc_bin; resources/bench/peers.sh builds it)"
    fi
done
