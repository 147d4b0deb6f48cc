#!/usr/bin/env bash
# Install the host tools that the real-Linux test plumbing needs.
#
# Idempotent and fast when everything is present: each Debian package is
# checked with `dpkg -s`; `apt-get update` runs at most once, and only when
# something is missing. Also makes sure the `x86_64-unknown-none` Rust target
# is installed.
#
# Usage: resources/scripts/setup.sh
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Packages and why they are needed:
#   qemu-system-x86 seabios ipxe-qemu  nested test host + reference VMM
#   busybox-static cpio                initramfs contents and packing; httpd for the network boot
#   lz4                                extract the PVH vmlinux from the bzImage
#   binutils                           readelf (PVH note check)
#   xz-utils zstd                      decompress kernel modules if compressed
#   python3                            timing helper of resources/bench
#   time                               /usr/bin/time for ad-hoc RSS checks
#   e2fsprogs iproute2                 debugfs and ip (tuntap) in the snapshot tests
#   python3-venv                       the API test tools' venv (below)
#   curl                               the API's event stream in linux_api.rs (and the README's examples)
#   qemu-system-data                   linuxboot_dma.bin for --firmware with --kernel (linux_firmware.rs)
#   syslinux syslinux-common mtools dosfstools
#                                      the boot disk linux_firmware.rs builds (FAT + SYSLINUX, no mount)
#   dnsmasq-base                       DHCP and TFTP (the boot script) for the network boot in linux_firmware.rs
#   g++                                libFuzzer, built by libfuzzer-sys for the fuzz smoke run (fuzz/)
packages=(qemu-system-x86 seabios ipxe-qemu busybox-static cpio lz4 binutils
          xz-utils zstd python3 python3-venv time gcc g++ libc6-dev e2fsprogs iproute2 curl
          qemu-system-data syslinux syslinux-common mtools dosfstools dnsmasq-base)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    log "apt packages: all present (${packages[*]})"
else
    log "apt packages missing: ${missing[*]}"
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "not root and no sudo; install manually: apt-get install -y ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "running apt-get update"
    "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
    log "running apt-get install -y ${missing[*]}"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
    log "installed: ${missing[*]}"
fi

if command -v rustup >/dev/null 2>&1; then
    if rustup target list --installed 2>/dev/null | grep -qx 'x86_64-unknown-none'; then
        log "rust target x86_64-unknown-none: present"
    else
        log "adding rust target x86_64-unknown-none"
        rustup target add x86_64-unknown-none || die "rustup target add x86_64-unknown-none failed"
    fi
    # The fuzz targets (fuzz/run.sh) need a nightly toolchain (SanitizerCoverage flags).
    if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        log "rust nightly toolchain: present"
    else
        log "installing the rust nightly toolchain (minimal profile) for fuzz/"
        rustup toolchain install nightly --profile minimal || die "rustup toolchain install nightly failed"
    fi
else
    log "warning: rustup not found; cannot add target x86_64-unknown-none"
fi

# The API test tools from PyPI, pinned, in a venv under .cache (gitignored):
# openapi-spec-validator checks docs/api/openapi.yaml, schemathesis sends the
# API generated requests (tests/tests/api_schemathesis.rs), jsonschema (a
# dependency of both) checks VM configurations (tests/tests/api_config.rs).
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv="$repo/.cache/api-venv"
reqs="$repo/resources/api/requirements.txt"
api_stamp="$venv/.requirements"
if [[ -x $venv/bin/python ]] && cmp -s "$reqs" "$api_stamp"; then
    log "API test tools: present ($(grep -E '^(schemathesis|openapi-spec-validator)==' "$reqs" | tr '\n' ' '))"
else
    log "installing the API test tools into $venv (resources/api/requirements.txt, all pinned)"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs" ||
        die "pip install -r $reqs failed"
    cp "$reqs" "$api_stamp"
fi

log "done"
