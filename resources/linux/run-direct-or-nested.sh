#!/usr/bin/env bash
# Run COMMAND where it has a usable hardware-virtualisation KVM:
#   - directly, when /proc/cpuinfo shows vmx or svm;
#   - otherwise inside the nested test host (resources/nested/run.sh: QEMU
#     TCG + emulated AMD-V, where kvm-amd gives a real /dev/kvm).
# Prints one line to stderr saying which. Exits with COMMAND's status (125
# when the nested host itself failed).
#
# Usage: resources/linux/run-direct-or-nested.sh [--timeout SECS] -- COMMAND [ARGS...]
#   --timeout is passed to resources/nested/run.sh (ignored when direct).
# ABIDE_FORCE_NESTED=1 uses the nested host even when vmx/svm is present.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nested_args=()
while (($#)); do
    case $1 in
        --timeout) nested_args+=(--timeout "${2:?--timeout needs a value}"); shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if (($# == 0)); then
    echo "usage: $0 [--timeout SECS] -- COMMAND [ARGS...]" >&2
    exit 2
fi

virt=$(grep -m1 -owE 'vmx|svm' /proc/cpuinfo || true)
if [[ -n $virt && ${ABIDE_FORCE_NESTED:-0} != 1 ]]; then
    echo "abide-linux-tests: running directly ($virt)" >&2
    exec "$@"
fi
echo "abide-linux-tests: running inside the nested test host (QEMU TCG + emulated AMD-V) because this host has no vmx/svm" >&2
exec "$script_dir/../nested/run.sh" "${nested_args[@]}" -- "$@"
