#!/usr/bin/env bash
# Builds the `abide` binary of one released commit, once, and prints its
# path. The result is cached under target/releases/<commit>/abide (keyed by
# the full commit hash), so reruns cost nothing. The build happens in a
# temporary git worktree of this repository (release tags do not reach other
# clones; resources/releases.json records each release's commit), in the
# release profile, `nice`d, with one cargo target directory shared by every
# release (their dependencies are mostly the same crates).
#
# Usage: resources/releases/build-release.sh COMMIT
# Environment: ABIDE_RELEASE_CACHE  cache directory (default target/releases)
set -euo pipefail

rev=${1:?usage: build-release.sh COMMIT}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
commit=$(git -C "$repo" rev-parse --verify "$rev^{commit}")
cache=${ABIDE_RELEASE_CACHE:-$repo/target/releases}
out=$cache/$commit/abide
mkdir -p "$cache/$commit"

# One builder at a time (parallel tests ask for the same release).
exec 9>"$cache/.lock"
flock 9

if [[ -x $out ]]; then
    echo "$out"
    exit 0
fi

src=$cache/$commit/src
git -C "$repo" worktree remove --force "$src" >/dev/null 2>&1 || rm -rf "$src"
git -C "$repo" worktree prune
git -C "$repo" worktree add --detach "$src" "$commit" >/dev/null
trap 'git -C "$repo" worktree remove --force "$src" >/dev/null 2>&1 || true' EXIT
# The first release build starts from this tree's own compiled dependencies:
# releases pin mostly the same crate versions, and cargo reuses an artifact
# only when its fingerprint (version, features, profile, rustc) matches, so
# the copy saves rebuilding them (about 12 min per release on 2 cores) and
# cannot change what gets built.
if [[ ! -d $cache/build/release && -d $repo/target/release/deps ]]; then
    mkdir -p "$cache/build/release"
    for d in deps build .fingerprint; do
        [[ -d $repo/target/release/$d ]] && cp -a "$repo/target/release/$d" "$cache/build/release/"
    done
    echo "build-release: seeded $cache/build with this tree's compiled dependencies" >&2
fi
echo "build-release: building abide at $commit (release profile, cached in $cache/$commit)" >&2
(cd "$src" && CARGO_TARGET_DIR=$cache/build nice cargo build --release --bin abide >&2)
cp "$cache/build/release/abide" "$out.partial"
mv "$out.partial" "$out"
echo "$out"
