#!/usr/bin/env bash
# Sets up a fresh machine (apt packages, Rust target, Debian kernels,
# initramfs images), checks formatting and lints, builds, and runs every
# test: unit tests, the test guest on /dev/kvm, and real Linux guests
# (directly where the CPU has vmx/svm, otherwise inside the nested test host).
set -euo pipefail
cd "$(dirname "$0")"
step() { printf '\n==> %s\n' "$*" >&2; }

step "setup: packages and Rust target"
resources/scripts/setup.sh
step "Debian kernels"
resources/linux/fetch-kernels.sh
step "guest initramfs"
resources/linux/build-guest-initramfs.sh
step "nested test host initramfs"
resources/nested/build-host-initramfs.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
step "test guest: fmt and clippy (x86_64-unknown-none)"
(cd resources/guest && cargo fmt -- --check &&
    cargo clippy --release --target x86_64-unknown-none \
        --target-dir "$PWD/../../target/guest-clippy" -- -D warnings)
step "build"
cargo build --release --workspace
step "the README's run command: the shipped build (profile dist) boots the test guest"
./run.sh
step "tests"
cargo test --release --workspace
step "fuzz smoke: every fuzz target for 3 s (docs/fuzzing.md)"
fuzz/run.sh 3
