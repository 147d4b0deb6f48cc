#!/usr/bin/env bash
# Download and unpack the Debian kernels used by the real-Linux tests.
#
#   host  kernel: Debian generic linux-image-6.1.0-N-amd64 (has 9p, kvm-amd as
#                 modules); boots the nested test host (resources/nested).
#   guest kernel: Debian linux-image-6.1.0-N-cloud-amd64; the Linux guest that
#                 Abide (and QEMU, for reference) boots.
#
# Outputs (stable paths, under <repo>/.cache/linux):
#   guest/vmlinuz              cloud bzImage
#   guest/vmlinux              ELF vmlinux extracted from the bzImage (PVH note checked)
#   guest/modules/*.ko         virtio modules (+ dependencies), uncompressed
#   guest/modules/load-order   the .ko files in insmod order
#   guest/release              kernel release string (uname -r)
#   host/vmlinuz               generic bzImage
#   host/vmlinux               its ELF vmlinux (PVH; boots faster under TCG:
#                              no in-guest XZ decompression)
#   host/modules/...           kvm/kvm-amd/virtio/9p modules, same layout
#   stamp                      package names and versions of the above
#
# N is the newest 6.1.0-N ABI for which both packages exist (apt-cache), unless
# ABIDE_KERNEL_ABI=6.1.0-N is set. When the stamp and outputs exist the script
# does nothing; pass --update to re-resolve the newest version, --force to
# redo everything.
#
# Usage: resources/linux/fetch-kernels.sh [--update] [--force]
set -euo pipefail

log() { printf 'fetch-kernels: %s\n' "$*" >&2; }
die() { printf 'fetch-kernels: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))
cache="$repo/.cache/linux"

update=0 force=0
for a in "$@"; do
    case $a in
        --update) update=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $a (see --help)" ;;
    esac
done

host_mods=(irqbypass kvm ccp kvm-amd virtio_ring virtio virtio_pci_legacy_dev
           virtio_pci_modern_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p overlay tun bridge)
guest_mods=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
            virtio_blk failover net_failover virtio_net rng-core virtio-rng button evdev)

outputs_present() {
    [[ -s $cache/stamp && -s $cache/guest/vmlinuz && -s $cache/guest/vmlinux &&
       -s $cache/guest/modules/load-order && -s $cache/host/vmlinuz && -s $cache/host/vmlinux &&
       -s $cache/host/modules/load-order ]]
}

mods_stamp="host-modules=${host_mods[*]}
guest-modules=${guest_mods[*]}"
if ((!update && !force)) && outputs_present && [[ $(tail -n +3 "$cache/stamp") == "$mods_stamp" ]]; then
    log "up to date ($(head -n2 "$cache/stamp" | tr '\n' ' '))"
    exit 0
fi

for t in apt-cache apt-get dpkg-deb lz4 readelf od; do
    command -v "$t" >/dev/null || die "missing tool '$t'; run resources/scripts/setup.sh"
done

apt_updated=0
apt_update() {
    ((apt_updated)) && return 0
    apt_updated=1
    log "running apt-get update"
    if ((EUID == 0)); then apt-get update -qq; else sudo apt-get update -qq; fi \
        || die "apt-get update failed"
}

# Package name for flavour ("amd64" / "cloud-amd64") of ABI; unsigned preferred.
pkg_for() {
    local abi=$1 flavour=$2 p
    for p in "linux-image-$abi-$flavour-unsigned" "linux-image-$abi-$flavour"; do
        if apt-cache show --no-all-versions "$p" 2>/dev/null | grep '^Version:' >/dev/null; then
            echo "$p"; return 0
        fi
    done
    return 1
}

newest_abi() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-(cloud-)?amd64(-unsigned)?$' 2>/dev/null |
        sed -nE 's/^linux-image-(6\.1\.0-[0-9]+)-.*/\1/p' | sort -uV -r |
        while read -r abi; do
            if pkg_for "$abi" amd64 >/dev/null && pkg_for "$abi" cloud-amd64 >/dev/null; then
                echo "$abi"; break
            fi
        done
}

if [[ -n ${ABIDE_KERNEL_ABI:-} ]]; then
    abi=$ABIDE_KERNEL_ABI
    pkg_for "$abi" amd64 >/dev/null || apt_update
else
    abi=$(newest_abi)
    if [[ -z $abi || $update == 1 ]]; then
        apt_update
        abi=$(newest_abi)
    fi
fi
[[ -n $abi ]] || die "no linux-image-6.1.0-N-{amd64,cloud-amd64} packages known to apt (is a Debian bookworm source configured?)"
host_pkg=$(pkg_for "$abi" amd64) || die "package linux-image-$abi-amd64 not found"
guest_pkg=$(pkg_for "$abi" cloud-amd64) || die "package linux-image-$abi-cloud-amd64 not found"
ver() { apt-cache show --no-all-versions "$1" | sed -n 's/^Version: //p' | head -n1; }
stamp_new="host=$host_pkg $(ver "$host_pkg")
guest=$guest_pkg $(ver "$guest_pkg")
$mods_stamp"

if ((!force)) && outputs_present && [[ $(cat "$cache/stamp") == "$stamp_new" ]]; then
    log "up to date ($(head -n2 <<< "$stamp_new" | tr '\n' ' '))"
    exit 0
fi
log "kernels: $(head -n2 <<< "$stamp_new" | tr '\n' ' ')"

mkdir -p "$cache/debs"
# As root, apt downloads as user _apt, which may not be able to write here.
apt_opts=()
((EUID == 0)) && apt_opts=(-o APT::Sandbox::User=root)
download() {
    local pkg=$1 v f
    v=$(ver "$pkg")
    # apt-get download names files <pkg>_<version with ':' as %3a>_<arch>.deb
    f=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_${v//:/%3a}_*.deb" | head -n1)
    if [[ -n $f ]]; then log "have $(basename "$f")"; echo "$f"; return; fi
    log "downloading $pkg $v"
    if ! (cd "$cache/debs" && apt-get download -q "${apt_opts[@]}" "$pkg=$v" >&2); then
        apt_update
        (cd "$cache/debs" && apt-get download -q "${apt_opts[@]}" "$pkg" >&2) || die "apt-get download $pkg failed"
        v=$(ver "$pkg")
    fi
    f=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_${v//:/%3a}_*.deb" | head -n1)
    [[ -n $f ]] || die "downloaded $pkg but cannot find its .deb in $cache/debs"
    echo "$f"
}
host_deb=$(download "$host_pkg")
guest_deb=$(download "$guest_pkg")

work="$cache/extract"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# State for copy_modules/add_module (bash has no nested scopes).
declare -A mod_path=() mod_builtin=() mod_seen=()
mod_dest=

# add_module <name>: copy module <name> (after its dependencies, from the
# .modinfo depends= field) uncompressed into $mod_dest and append it to
# $mod_dest/load-order. Built-in modules (modules.builtin) are skipped.
add_module() {
    local name=${1//-/_} src out dep deps
    [[ -n ${mod_seen[$name]:-} ]] && return 0
    mod_seen[$name]=1
    if [[ -n ${mod_builtin[$name]:-} ]]; then log "  $name: built-in"; return 0; fi
    src=${mod_path[$name]:-}
    if [[ -z $src ]]; then log "  $name: WARNING: not found (neither module nor built-in), skipped"; return 0; fi
    out="$mod_dest/$(basename "${src%%.ko*}").ko"
    case $src in
        *.ko) cp "$src" "$out" ;;
        *.ko.xz) xz -dc "$src" > "$out" ;;
        *.ko.zst) zstd -qdc "$src" > "$out" ;;
        *.ko.gz) gzip -dc "$src" > "$out" ;;
        *) die "unknown module compression: $src" ;;
    esac
    deps=$(tr '\0' '\n' < "$out" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    basename "$out" >> "$mod_dest/load-order"
}

# copy_modules <extracted deb root> <dest dir> <module names...>
copy_modules() {
    local root=$1 moddir f n
    mod_dest=$2; shift 2
    moddir=$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
    [[ -d $moddir ]] || die "no lib/modules in $root"
    mkdir -p "$mod_dest"
    cp "$moddir/modules.builtin" "$mod_dest/" 2>/dev/null || : > "$mod_dest/modules.builtin"
    mod_path=() mod_builtin=() mod_seen=()
    while IFS= read -r f; do
        n=${f##*/}; n=${n%%.ko*}; mod_path[${n//-/_}]=$f
    done < <(find "$moddir/kernel" -name '*.ko*' -type f)
    while IFS= read -r f; do
        n=${f##*/}; n=${n%%.ko*}; mod_builtin[${n//-/_}]=1
    done < "$mod_dest/modules.builtin"
    : > "$mod_dest/load-order"
    for n in "$@"; do add_module "$n"; done
    log "  load order: $(tr '\n' ' ' < "$mod_dest/load-order")"
}

# extract_vmlinux <bzImage> <out>: decompress the ELF vmlinux inside a
# bzImage and check that it has a PVH entry point. The payload is located via
# the boot protocol header (setup_sects at 0x1f1, payload_offset/length at
# 0x248/0x24c) and its format recognised by magic: legacy LZ4 (02 21 4c 18;
# the Debian cloud kernel), XZ (fd 37 7a 58 5a 00; the generic kernel), gzip,
# zstd. If the header does not lead to a known magic, scan for the LZ4 magic.
extract_vmlinux() {
    local bz=$1 out=$2 setup_sects off len magic dec
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    ((setup_sects == 0)) && setup_sects=4
    off=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    len=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
    off=$(((setup_sects + 1) * 512 + off))
    magic=$(od -An -tx1 -j "$off" -N6 "$bz" | tr -d ' ')
    case $magic in
        02214c18*) dec=(lz4 -dc) ;;
        fd377a585a00) dec=(xz -dc) ;;
        1f8b*) dec=(gzip -dc) ;;
        28b52ffd*) dec=(zstd -qdc) ;;
        *)
            log "  payload at $off has unknown magic $magic; scanning for the LZ4 magic"
            off=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -n1 | cut -d: -f1)
            [[ -n $off ]] || die "cannot find the compressed vmlinux in $bz"
            len=$(($(stat -c %s "$bz") - off))
            dec=(lz4 -dc)
            ;;
    esac
    # The payload ends with the 4-byte decompressed size, which the
    # decompressors take for a truncated or bad next frame: they complain and
    # exit non-zero after writing the full output. Judge by the result.
    tail -c +$((off + 1)) "$bz" | head -c "$len" | "${dec[@]}" > "$out" 2> "$out.log" || true
    if ! readelf -h "$out" >/dev/null 2>&1; then
        cat "$out.log" >&2
        die "vmlinux extracted from $bz with ${dec[0]} is not an ELF file"
    fi
    rm -f "$out.log"
    # PVH entry: ELF note owner "Xen", type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
    readelf -n "$out" | grep -Eq '^[[:space:]]*Xen[[:space:]].*(\(0x00000012\)|PHYS32)' \
        || die "vmlinux extracted from $bz has no PVH entry point (Xen ELF note 0x12)"
    log "  $out: ELF with PVH note (${dec[0]}-compressed payload)"
}

for kind in host guest; do
    if [[ $kind == host ]]; then deb=$host_deb mods=("${host_mods[@]}")
    else deb=$guest_deb mods=("${guest_mods[@]}"); fi
    log "extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$work/$kind"
    # Only what this script makes: initramfs builds live beside it.
    rm -rf "${cache:?}/$kind/"{vmlinuz,vmlinux,release,modules}
    mkdir -p "$cache/$kind"
    vmlinuz=$(find "$work/$kind/boot" -name 'vmlinuz-*' -type f | head -n1)
    [[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in $deb"
    cp "$vmlinuz" "$cache/$kind/vmlinuz"
    basename "$vmlinuz" | sed 's/^vmlinuz-//' > "$cache/$kind/release"
    log "$kind modules:"
    copy_modules "$work/$kind" "$cache/$kind/modules" "${mods[@]}"
    log "extracting the $kind vmlinux (PVH ELF) from the bzImage"
    extract_vmlinux "$cache/$kind/vmlinuz" "$cache/$kind/vmlinux"
    rm -rf "${work:?}/$kind"
done

printf '%s\n' "$stamp_new" > "$cache/stamp"
log "done: $cache/{guest,host} ($(head -n2 <<< "$stamp_new" | tr '\n' ' '))"
