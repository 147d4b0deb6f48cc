# shellcheck shell=bash
# Helpers shared by resources/linux/build-guest-initramfs.sh and
# resources/nested/build-host-initramfs.sh. Source it; it does nothing itself.

# find_static_busybox: print the path of a statically linked busybox.
find_static_busybox() {
    local b
    for b in ${ABIDE_BUSYBOX:-} /bin/busybox /usr/bin/busybox; do
        [[ -x $b ]] || continue
        if ! readelf -l "$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
            echo "$b"; return 0
        fi
    done
    return 1
}

# initramfs_skeleton <dir> <busybox>: a fresh busybox root in <dir>.
initramfs_skeleton() {
    local dir=$1 busybox=$2 applet
    rm -rf "$dir"
    mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,root,etc,run}
    chmod 1777 "$dir/tmp"
    cp "$busybox" "$dir/bin/busybox"
    while IFS= read -r applet; do
        applet=${applet#/}
        [[ $applet == bin/busybox || -e $dir/$applet ]] && continue
        mkdir -p "$dir/$(dirname "$applet")"
        ln -s /bin/busybox "$dir/$applet"
    done < <("$busybox" --list-full)
    # The kernel opens /dev/console before running /init; without the node
    # (mknod needs root) /init starts without stdio and fixes it up itself.
    mknod -m 600 "$dir/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$dir/dev/null" c 1 3 2>/dev/null || true
}

# initramfs_pack <dir> <out.cpio.gz>: newc cpio, owned by root, gzip.
initramfs_pack() {
    local dir=$1 out=$2
    (cd "$dir" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n > "$out.tmp"
    mv "$out.tmp" "$out"
}

# inputs_hash <files...>: one hash over the names and contents of files.
inputs_hash() {
    local f
    for f in "$@"; do printf '%s\n' "$f"; cat "$f"; done | sha256sum | cut -d' ' -f1
}
