#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a set time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, all)
#
# Builds with plain `cargo +nightly` and the flags cargo-fuzz passes
# (SanitizerCoverage for libFuzzer, --cfg fuzzing, debug assertions), so
# cargo-fuzz itself is not needed; `cargo fuzz run TARGET` works as well
# where it is installed. No AddressSanitizer: the targets are safe Rust
# over safe-Rust parsers (see docs/fuzzing.md).
#
# Corpora: fuzz/seed.sh writes the seeds to fuzz/target/seeds/TARGET (the
# release snapshot fixtures and what is derived from them, recorded API
# requests and VM configurations); what a run finds goes to
# fuzz/target/corpus/TARGET and is kept for the next run. A crash leaves
# its input in fuzz/artifacts/TARGET/ and fails the script.
#
# FUZZ_ARGS adds libFuzzer options to every target's run (for example
# FUZZ_ARGS=-max_len=8192 for a long snapshot_reader run; docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
all=(snapshot_reader migration_stream api_request vm_config pci_config_msix persist_decoders
     virtqueue_chains)
targets=("${@:-${all[@]}}")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
start=$(date +%s)
cargo +nightly build --release --bins --target x86_64-unknown-linux-gnu
echo "fuzz: build took $(( $(date +%s) - start )) s" >&2

./seed.sh

fail=0
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "target/seeds/$t" ] && seeds=("target/seeds/$t")
    log="target/$t.log"
    # shellcheck disable=SC2086 # FUZZ_ARGS is split into options on purpose
    if ! "target/x86_64-unknown-linux-gnu/release/$t" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" -rss_limit_mb=2048 -timeout=10 \
        ${FUZZ_ARGS:-} "target/corpus/$t" "${seeds[@]}" >"$log" 2>&1; then
        echo "fuzz: $t FAILED; input in fuzz/artifacts/$t/, log in fuzz/$log" >&2
        tail -40 "$log" >&2
        fail=1
        continue
    fi
    runs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -a -o 'cov: [0-9]*' "$log" | tail -1 || true)
    echo "fuzz: $t ok: $runs executions in ${secs} s, $cov" >&2
done
exit $fail
