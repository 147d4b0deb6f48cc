#!/usr/bin/env bash
# Build the initramfs of the Abide Linux test guest:
#   <repo>/.cache/linux/guest/initramfs.cpio.gz
# Contents: static busybox, /init = resources/linux/guest-init.sh, the
# guest virtio modules from fetch-kernels.sh under /lib/modules/abide/, and
# the benchmark tools blkbench and ticker (resources/bench/*.c).
# Does nothing when the output is newer than all inputs (hash stamp);
# --force rebuilds.
#
# Usage: resources/linux/build-guest-initramfs.sh [--force]
set -euo pipefail

log() { printf 'build-guest-initramfs: %s\n' "$*" >&2; }
die() { printf 'build-guest-initramfs: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))
# shellcheck source-path=SCRIPTDIR
# shellcheck source=initramfs-lib.sh
source "$script_dir/initramfs-lib.sh"
guest="$repo/.cache/linux/guest"
out="$guest/initramfs.cpio.gz"

force=0
case ${1:-} in
    --force) force=1 ;;
    "") ;;
    *) die "unknown argument: $1 (usage: $0 [--force])" ;;
esac

"$script_dir/fetch-kernels.sh"
busybox=$(find_static_busybox) || die "no static busybox found; run resources/scripts/setup.sh (busybox-static)"
mapfile -t mods < "$guest/modules/load-order"
blkbench_src="$repo/resources/bench/blkbench.c"
ticker_src="$repo/resources/bench/ticker.c"
inputs=("$script_dir/guest-init.sh" "$script_dir/initramfs-lib.sh" "$busybox" "$guest/modules/load-order" "$blkbench_src" "$ticker_src")
for m in "${mods[@]}"; do inputs+=("$guest/modules/$m"); done
hash=$(inputs_hash "${inputs[@]}")
if ((!force)) && [[ -s $out && $(cat "$out.stamp" 2>/dev/null) == "$hash" ]]; then
    log "up to date: $out"
    exit 0
fi

root="$guest/initramfs-root"
initramfs_skeleton "$root" "$busybox"
install -m 755 "$script_dir/guest-init.sh" "$root/init"
mkdir -p "$root/lib/modules/abide"
cp "$guest/modules/load-order" "${mods[@]/#/$guest/modules/}" "$root/lib/modules/abide/"
# The storage benchmark tool (resources/bench/blk.sh), static so it needs no libc.
gcc -O2 -static -o "$root/bin/blkbench" "$blkbench_src" || die "cannot build blkbench (gcc with static glibc)"
# The migration benchmark's heartbeat and fixed-rate memory dirtier.
gcc -O2 -static -o "$root/bin/ticker" "$ticker_src" || die "cannot build ticker (gcc with static glibc)"
initramfs_pack "$root" "$out"
rm -rf "$root"
printf '%s\n' "$hash" > "$out.stamp"
log "built $out ($(du -k "$out" | cut -f1) KiB)"
