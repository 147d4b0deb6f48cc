#!/usr/bin/env bash
# Builds Abide and boots the small guest built into it: it reports the vCPUs,
# memory (from e820) and devices it finds, then powers off.
# Extra arguments go to `abide run`, e.g. ./run.sh --cpus 4 --memory 1G
set -euo pipefail
cd "$(dirname "$0")"
resources/scripts/setup.sh --rust-only >&2
cargo build --release -q -p abide-vmm --bin abide
if [ "$#" -eq 0 ]; then
    set -- --cpus 2
fi
exec target/release/abide run "$@"
