#!/usr/bin/env bash
# Makes the cross-version snapshot fixtures of an Abide release:
# builds the release's own commit (not today's code) in a git worktree
# (resources/releases/build-release.sh, cached by commit), runs the embedded test guest mid-workload, snapshots it with
# that build, and writes resources/snapshots/<version>/ with fixtures.json
# describing how to restore each fixture and what the guest must print
# afterwards. tests/tests/snapshot_fixtures.rs restores every fixture of
# every release on every commit.
#
# Usage: resources/snapshots/make-fixtures.sh VERSION [REV]
#   VERSION  release version, e.g. 0.2.0 (its Cargo.toml must say so)
#   REV      commit to build (default: tag vVERSION; tags do not reach other
#            clones, so give the commit resources/releases.json records)
set -euo pipefail

version=${1:?usage: make-fixtures.sh VERSION [REV]}
rev=${2:-v$version}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
commit=$(git -C "$repo" rev-parse --verify "$rev^{commit}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

built_version=$(git -C "$repo" show "$commit:Cargo.toml" | sed -n 's/^version = "\(.*\)"/\1/p' | head -n1)
if [[ $built_version != "$version" ]]; then
    echo "make-fixtures: $rev is version $built_version, not $version" >&2
    exit 1
fi
# The release's own abide, built from its commit in a git worktree and
# cached by commit under target/releases/ (shared with the release matrix).
abide=$("$repo/resources/releases/build-release.sh" "$commit")
[[ $("$abide" --version) == "abide $version" ]] || { echo "make-fixtures: built $("$abide" --version)" >&2; exit 1; }

# ABIDE_FIXTURE_OUT: write elsewhere (trying the script on an unreleased commit).
out=${ABIDE_FIXTURE_OUT:-$repo/resources/snapshots/$version}
rm -rf "$out"
mkdir -p "$out"

# wait_for FILE TEXT: until FILE contains TEXT (60 s at most).
wait_for() {
    local i
    for ((i = 0; i < 3000; i++)); do
        grep -qF -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.02
    done
    echo "make-fixtures: no '$2' in $1" >&2
    cat "$1" >&2
    exit 1
}

# fixture NAME WAIT_FOR RUN_ARGS...: snapshots the guest once WAIT_FOR shows.
fixture() {
    local name=$1 marker=$2
    shift 2
    local sock=$work/$name.sock log=$work/$name.log
    "$abide" run "$@" --serial "file:$log" --api-socket "$sock" </dev/null >&2 &
    local pid=$!
    wait_for "$log" "$marker"
    "$abide" snapshot --stop --api-socket "$sock" "$out/$name.snap" >&2
    wait "$pid"
}

# reference RUN_ARGS...: the same guest uninterrupted; prints its output.
reference() {
    "$abide" run "$@" --serial stdio </dev/null
}

workload="quiet rounds=400 progress buf-kib=256"
fixture pc-1.0-workload "guest: progress round=120 " \
    --machine pc-1.0 --cpus 2 --memory 128M --cmdline "$workload"
sum_v1=$(reference --machine pc-1.0 --cpus 2 --memory 128M --cmdline "$workload" |
    sed -n 's/^guest: user cpl=3 rounds=400 checksum=\(0x[0-9a-f]*\).*/\1/p')

fixture pc-2.0-workload "guest: progress round=120 " \
    --machine pc-2.0 --cpu abide-v1 --cpus 2 --memory 128M --cmdline "$workload"
sum_v2=$(reference --machine pc-2.0 --cpu abide-v1 --cpus 2 --memory 128M --cmdline "$workload" |
    sed -n 's/^guest: user cpl=3 rounds=400 checksum=\(0x[0-9a-f]*\).*/\1/p')

# virtio-blk mid-I/O: the disk as it was at the snapshot goes with it.
truncate -s 1M "$work/blk.img"
fixture pc-1.0-blk "guest: blk-loop iter=200 " \
    --machine pc-1.0 --cpus 1 --memory 128M --disk "path=$work/blk.img" --rng \
    --cmdline "quiet rounds=0 buf-kib=64 blk-loop=1500"
cp "$work/blk.img" "$out/pc-1.0-blk.disk"

[[ -n $sum_v1 && -n $sum_v2 ]] || { echo "make-fixtures: no reference checksum" >&2; exit 1; }
cat >"$out/fixtures.json" <<JSON
{
  "abide_version": "$version",
  "commit": "$commit",
  "made_by": "resources/snapshots/make-fixtures.sh $version $rev",
  "fixtures": [
    {
      "snapshot": "pc-1.0-workload.snap",
      "machine": "pc-1.0",
      "what": "test guest, 2 vCPUs, ring-3 checksum workload at round ~120 of 400",
      "disks": [],
      "expect": ["guest: user cpl=3 rounds=400 checksum=$sum_v1", "guest: exit how=poweroff"]
    },
    {
      "snapshot": "pc-2.0-workload.snap",
      "machine": "pc-2.0",
      "what": "test guest, 2 vCPUs, CPU model abide-v1, ring-3 checksum workload at round ~120 of 400",
      "disks": [],
      "expect": ["guest: user cpl=3 rounds=400 checksum=$sum_v2", "guest: exit how=poweroff"]
    },
    {
      "snapshot": "pc-1.0-blk.snap",
      "machine": "pc-1.0",
      "what": "test guest, virtio-blk write/verify loop at iteration ~200 of 1500, virtio-rng present",
      "disks": [{"slot": 1, "image": "pc-1.0-blk.disk"}],
      "expect": ["guest: blk-loop done iters=1500 errors=0", "guest: exit how=poweroff"]
    }
  ]
}
JSON
ls -l "$out" >&2
echo "make-fixtures: wrote $out" >&2
