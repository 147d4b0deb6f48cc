#!/usr/bin/env bash
# Build the peers Abide is benchmarked against, Cloud Hypervisor and
# Firecracker, from their public sources at a pinned release tag, with this
# machine's stable Rust. The binaries are cached outside git:
#   <repo>/.cache/peers/bin/cloud-hypervisor
#   <repo>/.cache/peers/bin/firecracker
# each with a .version file beside it (tag, commit, toolchain, target).
# A binary whose .version matches what would be built is not built again.
# Prints the two binary paths on stdout (one per line) when done.
#
# Sources. No machine here reaches the internet except the crate registry,
# so the sources are given by path: a git repository (bare or a checkout)
# holding the pinned tag. On a machine with internet access, get them with
#   git clone --bare https://github.com/cloud-hypervisor/cloud-hypervisor
#   git clone --bare https://github.com/firecracker-microvm/firecracker
#   git clone --bare https://github.com/firecracker-microvm/micro-http
#   git clone --bare https://github.com/rust-vmm/rust-vmm-ci
# and copy them over. Both peers' Cargo.lock pin one git dependency,
# micro-http (the HTTP server of their APIs), and cargo also fetches
# micro-http's submodule rust-vmm-ci; the script points cargo's git fetches
# of those two URLs at the local copies (git's url.<local>.insteadOf), so
# the locked commits are built unchanged. Everything else comes from
# crates.io through cargo as usual (--locked).
#
# Toolchain. `cargo +stable`, whatever rust-toolchain file the peer pins
# (Firecracker pins a channel; Cloud Hypervisor only has a rust-version).
# Firecracker is built for x86_64-unknown-linux-musl, its release target,
# when rustup has that target and a musl C compiler is installed (musl-gcc,
# Debian's musl-tools: aws-lc-sys compiles C; the kernel UAPI headers of
# linux-libc-dev are put after musl's); otherwise for the host's gnu target,
# for which Firecracker's build falls back to an empty default seccomp
# filter (its build.rs has filters for musl only): the .version file says
# which. Either way Firecracker needs libclang for bindgen (userfaultfd-sys;
# Debian 12: libclang1-14 and libclang-common-14-dev) and libseccomp's
# development library (its build script links -lseccomp; libseccomp-dev).
# Release profiles are the peers' own ([profile.release] in their Cargo.toml).
#
# Usage: resources/bench/peers.sh [--only cloud-hypervisor|firecracker]
# Environment:
#   CLOUD_HYPERVISOR_SRC  cloud-hypervisor git repository (required for it)
#   FIRECRACKER_SRC       firecracker git repository (required for it)
#   MICRO_HTTP_SRC        micro-http git repository (required unless cargo
#                         already has the locked commit in its git cache)
#   RUST_VMM_CI_SRC       rust-vmm-ci git repository (idem)
#   CLOUD_HYPERVISOR_REF  tag or commit to build (default v53.0)
#   FIRECRACKER_REF       tag or commit to build (default v1.16.1)
#   FIRECRACKER_TARGET    Rust target for Firecracker (default: see above)
#   PEERS_CACHE           cache directory (default <repo>/.cache/peers)
# Builds run under `nice -n 10`.
set -euo pipefail

die() { printf 'peers: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'peers: %s\n' "$*" >&2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || (cd "$script_dir/../.." && pwd))

only=''
while (($#)); do
    case $1 in
        --only) only=${2:?--only needs cloud-hypervisor or firecracker}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case $only in ''|cloud-hypervisor|firecracker) ;; *) die "--only: cloud-hypervisor or firecracker, not '$only'" ;; esac

# The build's own Debian packages (see above), installed when missing, and
# the musl target for Firecracker's release build.
apt_missing=()
for pkg in musl-tools libclang1-14 libclang-common-14-dev libseccomp-dev; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || apt_missing+=("$pkg")
done
if ((${#apt_missing[@]})); then
    say "installing ${apt_missing[*]}"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"; } ||
        say "could not install ${apt_missing[*]}; Firecracker may fall back to the gnu target or fail"
fi
rustup +stable target add x86_64-unknown-linux-musl >/dev/null 2>&1 ||
    say "rustup could not add x86_64-unknown-linux-musl; Firecracker builds for the gnu target"

cache=${PEERS_CACHE:-$repo/.cache/peers}
mkdir -p "$cache/bin" "$cache/src" "$cache/build" "$cache/logs"
command -v cargo >/dev/null || die "cargo not found"
rustc_version=$(rustc +stable --version) || die "no stable Rust toolchain (rustup toolchain install stable)"
host_target=$(rustc +stable -vV | sed -n 's/^host: //p')

# Point cargo's git fetches of the locked git dependencies at local copies.
git_env=(CARGO_NET_GIT_FETCH_WITH_CLI=true)
n=0
add_insteadof() { # LOCAL-REPO URL...
    local local_repo=$1 url
    shift
    local_repo=$(cd "$local_repo" && pwd -P)
    for url in "$@"; do
        git_env+=("GIT_CONFIG_KEY_$n=url.file://$local_repo.insteadOf" "GIT_CONFIG_VALUE_$n=$url")
        n=$((n + 1))
    done
}
[[ -n ${MICRO_HTTP_SRC:-} ]] && add_insteadof "$MICRO_HTTP_SRC" \
    https://github.com/firecracker-microvm/micro-http https://github.com/firecracker-microvm/micro-http.git
# Longest match wins in git, so the .git spelling gets its own rule.
[[ -n ${RUST_VMM_CI_SRC:-} ]] && add_insteadof "$RUST_VMM_CI_SRC" \
    https://github.com/rust-vmm/rust-vmm-ci https://github.com/rust-vmm/rust-vmm-ci.git
git_env+=("GIT_CONFIG_COUNT=$n")

# Export REF of the git repository SRC into DEST, leaving out files whose
# blobs the repository does not hold (a partial mirror may lack large test
# binaries; they are listed on stderr). Prints the commit id.
export_tree() { # SRC REF DEST
    local src=$1 ref=$2 dest=$3 commit missing=() path
    git -C "$src" rev-parse --git-dir >/dev/null 2>&1 || die "$src is not a git repository"
    commit=$(git -C "$src" rev-parse --verify --quiet "$ref^{commit}") ||
        die "$src has no tag or commit '$ref' (git -C $src tag lists its tags)"
    # One line per blob (gitlinks are not archived anyway): "OID<TAB>PATH";
    # batch-check answers "OID" or "OID missing", in the same order.
    local list
    list=$(git -C "$src" ls-tree -r --format='%(objecttype) %(objectname)%x09%(path)' "$commit" |
               sed -n 's/^blob //p')
    while IFS= read -r path; do
        missing+=(":(exclude)$path")
        say "note: $src lacks the blob of $path at $ref; left out of the build tree (git archive may still print 'invalid object' for it)"
    done < <(paste <(cut -f1 <<< "$list" | git -C "$src" cat-file --batch-check='%(objectname)') \
                   <(cut -f2- <<< "$list") |
                 awk -F'\t' '$1 ~ / missing$/ { print $2 }')
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    git -C "$src" archive "$commit" -- . "${missing[@]}" | tar -x -C "$dest.tmp"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    printf '%s\n' "$commit"
}

build_peer() { # NAME SHORT SRC REF TARGET CARGO-ARGS...
    local name=$1 short=$2 src=$3 ref=$4 target=$5
    shift 5
    local out="$cache/bin/$name" commit tree log want bin target_args=() cc_env=() hdrs
    [[ -n $src ]] || die "$name: no source given (see --help for CLOUD_HYPERVISOR_SRC / FIRECRACKER_SRC)"
    commit=$(git -C "$src" rev-parse --verify --quiet "$ref^{commit}") ||
        die "$src has no tag or commit '$ref' (git -C $src tag lists its tags)"
    want="$name $ref $commit; $rustc_version; target $target; profile release; cargo build ${*}"
    if [[ -x $out && -f $out.version && $(head -n1 "$out.version") == "$want" ]]; then
        say "$name: up to date ($want)"
        return 0
    fi
    tree="$cache/src/$short-$ref"
    log="$cache/logs/$short-build.log"
    # Export once: a fresh tree would make cargo rebuild every local crate.
    if [[ $(cat "$tree/.peers-commit" 2>/dev/null) != "$commit" ]]; then
        say "$name: exporting $ref ($commit) from $src"
        export_tree "$src" "$ref" "$tree" >/dev/null
        printf '%s\n' "$commit" > "$tree/.peers-commit"
    fi
    # The host target without --target: the peers' own build setup.
    bin="$cache/build/$short/release/$name"
    if [[ $target != "$host_target" ]]; then
        target_args=(--target "$target")
        bin="$cache/build/$short/$target/release/$name"
    fi
    if [[ $target == *-linux-musl ]]; then
        # musl-gcc sees musl's headers only; C code in the crates (e.g.
        # userfaultfd-sys) also includes the kernel's UAPI headers, which
        # come after musl's, as in Firecracker's own build container.
        hdrs="$cache/musl-kernel-headers"
        mkdir -p "$hdrs"
        ln -sfn /usr/include/linux "$hdrs/linux"
        ln -sfn "/usr/include/${host_target%%-*}-linux-gnu/asm" "$hdrs/asm"
        ln -sfn /usr/include/asm-generic "$hdrs/asm-generic"
        cc_env=("CFLAGS_${target//-/_}=-idirafter $hdrs")
    fi
    say "$name: building (cargo build $*; log: $log); this takes a while on 2 cores"
    if ! (cd "$tree" && env "${git_env[@]}" nice -n 10 cargo +stable fetch --locked &&
          env "${git_env[@]}" "${cc_env[@]}" nice -n 10 cargo +stable build --locked --release "${target_args[@]}" \
              --target-dir "$cache/build/$short" "$@") > "$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "$name: build failed (log: $log)"
    fi
    cp "$bin" "$out.tmp"
    mv "$out.tmp" "$out"
    {
        printf '%s\n' "$want"
        if [[ $name == firecracker && $target != *musl ]]; then
            echo "note: built for $target: Firecracker's build installs an empty default seccomp filter for non-musl targets"
        fi
    } > "$out.version"
    say "$name: built $out"
}

if [[ -z $only || $only == cloud-hypervisor ]]; then
    # Default features (kvm) and the cloud-hypervisor binary only.
    build_peer cloud-hypervisor ch "${CLOUD_HYPERVISOR_SRC:-}" "${CLOUD_HYPERVISOR_REF:-v53.0}" "$host_target" \
        --bin cloud-hypervisor
fi
if [[ -z $only || $only == firecracker ]]; then
    fc_target=${FIRECRACKER_TARGET:-}
    if [[ -z $fc_target ]]; then
        if [[ $host_target == x86_64-* ]] &&
           rustup +stable target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl &&
           command -v x86_64-linux-musl-gcc >/dev/null; then
            fc_target=x86_64-unknown-linux-musl
        else
            fc_target=$host_target
            say "firecracker: no musl target or musl-gcc here; building for $fc_target (empty default seccomp filter)"
        fi
    fi
    build_peer firecracker fc "${FIRECRACKER_SRC:-}" "${FIRECRACKER_REF:-v1.16.1}" "$fc_target" \
        -p firecracker --bin firecracker
fi
[[ -z $only || $only == cloud-hypervisor ]] && printf '%s\n' "$cache/bin/cloud-hypervisor"
[[ -z $only || $only == firecracker ]] && printf '%s\n' "$cache/bin/firecracker"
exit 0
