#!/usr/bin/env bash
# Build the initramfs of the nested test host:
#   <repo>/.cache/nested/initramfs.cpio.gz
# Contents: static busybox, /init = resources/nested/host-init.sh, and the
# kvm/kvm-amd/virtio/9p modules of the generic host kernel (fetch-kernels.sh)
# under /lib/modules/abide/. Does nothing when up to date (hash stamp);
# --force rebuilds.
#
# Usage: resources/nested/build-host-initramfs.sh [--force]
set -euo pipefail

log() { printf 'build-host-initramfs: %s\n' "$*" >&2; }
die() { printf 'build-host-initramfs: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))
lib="$script_dir/../linux/initramfs-lib.sh"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=../linux/initramfs-lib.sh
source "$lib"
host="$repo/.cache/linux/host"
outdir="$repo/.cache/nested"
out="$outdir/initramfs.cpio.gz"

force=0
case ${1:-} in
    --force) force=1 ;;
    "") ;;
    *) die "unknown argument: $1 (usage: $0 [--force])" ;;
esac

"$script_dir/../linux/fetch-kernels.sh"
busybox=$(find_static_busybox) || die "no static busybox found; run resources/scripts/setup.sh (busybox-static)"
mapfile -t mods < "$host/modules/load-order"
inputs=("$script_dir/host-init.sh" "$lib" "$busybox" "$host/modules/load-order")
for m in "${mods[@]}"; do inputs+=("$host/modules/$m"); done
hash=$(inputs_hash "${inputs[@]}")
if ((!force)) && [[ -s $out && $(cat "$out.stamp" 2>/dev/null) == "$hash" ]]; then
    log "up to date: $out"
    exit 0
fi

mkdir -p "$outdir"
root="$outdir/initramfs-root"
initramfs_skeleton "$root" "$busybox"
install -m 755 "$script_dir/host-init.sh" "$root/init"
mkdir -p "$root/lib/modules/abide"
cp "$host/modules/load-order" "${mods[@]/#/$host/modules/}" "$root/lib/modules/abide/"
initramfs_pack "$root" "$out"
rm -rf "$root"
printf '%s\n' "$hash" > "$out.stamp"
log "built $out ($(du -k "$out" | cut -f1) KiB)"
