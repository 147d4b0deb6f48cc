#!/usr/bin/env bash
# Builds Abide and boots the small guest built into it: it reports the vCPUs,
# memory (from e820) and devices it finds, then powers off.
# Extra arguments go to `abide run`, e.g. ./run.sh --cpus 4 --memory 1G
set -euo pipefail
cd "$(dirname "$0")"
resources/scripts/setup.sh --rust-only >&2
# The build Abide ships (Cargo.toml, profile dist: one LTO unit).
cargo build --profile dist -q -p abide-vmm --bin abide
# pc-1.0's CPU model (abide-v1) runs on every x86-64 KVM, including PVM; the
# default machine type's (abide-v2) needs hardware-assisted KVM.
if [ "$#" -eq 0 ]; then
    set -- --machine pc-1.0 --cpus 2
fi
exec target/dist/abide run "$@"
