//! Snapshot and restore of a running real Linux guest.
//!
//! The Debian cloud kernel with the busybox initramfs (`abide.test=shell`)
//! runs on pc-1.0 with 2 vCPUs, 512 MiB, a virtio-blk disk and a virtio-net
//! tap NIC. A script types into its serial shell through a FIFO: it makes an
//! ext2 file system on the disk, writes a file, pings the host end of the
//! tap and reads the clock. Then the VM is paused, snapshotted, and Abide is
//! killed with SIGKILL. After a deliberate pause a new `abide restore`
//! process (with a host-side override: a copy of the disk image) continues
//! the same shell, which must still see the file, the clock moved on with
//! the world, a working network, and must power off cleanly.
//!
//! Where this host's CPU has vmx/svm it runs directly; otherwise (PVM, as on
//! the project's machines) inside the nested test host (QEMU TCG with
//! emulated AMD-V, where KVM is real). See tests/tests/linux_guest.rs.

use std::time::{SystemTime, UNIX_EPOCH};

use abide_tests::session::{
    assert_no_kernel_trouble, guest, host_field, run_session, section, window, word,
};
use abide_tests::{abide_bin, guest_file};
use serde_json::Value;

/// Seconds between killing the first Abide and starting the restore. The
/// guest is frozen for longer than this (the snapshot write and the restore
/// add several seconds each), and that frozen time is what a clock that is
/// not advanced on restore would lag behind by.
const DOWNTIME_S: i64 = 5;

/// How far the guest's `date +%s` may be from the host's window around it.
/// `date +%s` truncates on both sides (up to 1 s each), and the guest's wall
/// clock was set at boot from the CMOS RTC with 1 s resolution (up to 1 s
/// behind). That leaves about a second for kvmclock drifting from the host's
/// clock under TCG and for the restore's measure of the elapsed time
/// (milliseconds when correct). A clock that was not advanced by the
/// downtime lags by the whole frozen time (asserted below to be more than
/// twice this), and one advanced twice leads by as much.
const CLOCK_TOLERANCE_S: i64 = 3;

/// The guest's subnet on the tap (distinct from linux_guest.rs's).
const HOST_IP: &str = "192.168.215.1";

/// The PCI slots on pc-1.0: the host bridge is slot 0, the disk gets the
/// first free slot and the NIC the next (`abide manifest` shows them).
const DISK_SLOT: u32 = 1;
const NIC_SLOT: u32 = 2;

/// The session script, run inside the test host by `sh`. `@NAME@` are
/// replaced before it runs. Everything the Rust side checks is printed as
/// `host: key=value` lines and, at the end, the two serial logs and the
/// restore's stderr between `@@@ begin NAME` / `@@@ end NAME rc=` markers.
///
/// Commands are typed into the guest's shell through a FIFO that is the
/// stdin of both Abide processes (serial `stdio`), one at a time, each
/// waiting for its output. The guest prints results with `say`, defined in
/// the shell first, so a typed command echoed by the tty never contains the
/// `abide-linux: ` text that the waits and the Rust side look for, and the
/// waits anchor on the start of a line.
const SCRIPT: &str = r#"
A='@ABIDE@'; KERNEL='@KERNEL@'; INITRD='@INITRD@'; TOKEN='@TOKEN@'
TAP=abtapS
T=$(mktemp -d)
P='' KEEP='' RC1='' RC2=''
DEADLINE=$(($(date +%s) + @BUDGET@))
host() { echo "host: $*"; }
dump() {
    echo "@@@ begin console1"; cat "$T/out1.log" 2>/dev/null; echo "@@@ end console1 rc=$RC1"
    echo "@@@ begin console2"; cat "$T/out2.log" 2>/dev/null; echo "@@@ end console2 rc=$RC2"
    echo "@@@ begin stderr2"; cat "$T/err2.log" 2>/dev/null; echo "@@@ end stderr2 rc=$RC2"
}
cleanup() {
    [ -n "$P" ] && kill -9 "$P" 2>/dev/null
    [ -n "$KEEP" ] && kill "$KEEP" 2>/dev/null
    ip link del "$TAP" 2>/dev/null
    rm -rf "$T"
}
fail() {
    host "failed: $*"
    dump
    cleanup
    exit 1
}
# wait_for LOG NEEDLE SECS: until a line of LOG starts with NEEDLE, while
# abide ($P) runs, within SECS and the session's deadline.
wait_for() {
    end=$(($(date +%s) + $3))
    [ "$end" -le "$DEADLINE" ] || end=$DEADLINE
    while ! tr -d '\r' < "$1" | grep -q "^$2"; do
        kill -0 "$P" 2>/dev/null || fail "abide exited before the guest printed '$2'"
        [ "$(date +%s)" -lt "$end" ] || fail "no '$2' within $3 s (or the session's @BUDGET@ s)"
        sleep 0.1
    done
}
# type_wait LOG NEEDLE SECS COMMAND: type COMMAND into the guest's shell and
# wait for NEEDLE.
type_wait() {
    printf '%s\n' "$4" > "$T/in"
    wait_for "$1" "$2" "$3"
}

truncate -s 64M "$T/disk.img"
ip link del "$TAP" 2>/dev/null
ip tuntap add dev "$TAP" mode tap && ip addr add @HOST_IP@/24 dev "$TAP" && ip link set "$TAP" up ||
    fail "cannot create the tap $TAP"
mkfifo "$T/in"
# Holds the FIFO's write end open, so that neither abide sees EOF on stdin.
sleep 1000 > "$T/in" &
KEEP=$!

# --- the first abide: boot, and prepare state in the guest ---
"$A" run --kernel "$KERNEL" --initrd "$INITRD" --cmdline 'console=ttyS0 quiet abide.test=shell' \
    --machine pc-1.0 --cpus 2 --memory 512M --disk "path=$T/disk.img" \
    --net "tap=$TAP,mac=52:54:00:ab:cd:21" --api-socket "$T/api" \
    < "$T/in" > "$T/out1.log" 2>&1 &
P=$!
host "pid1=$P"
L=$T/out1.log
wait_for "$L" 'abide-linux: interactive shell' 120
type_wait "$L" 'abide-linux: shell-ok' 30 'say() { echo "abide-linux: $*"; }; say shell-ok'
type_wait "$L" 'abide-linux: before-fs=' 60 "mke2fs -q -b 1024 /dev/vda 16384 && mkdir -p /mnt/d && mount -t ext2 /dev/vda /mnt/d && echo $TOKEN > /mnt/d/f && sync && say before-fs=ok || say before-fs=failed"
type_wait "$L" 'abide-linux: before-file=' 30 'say before-file=$(cat /mnt/d/f)'
type_wait "$L" 'abide-linux: before-ping=' 60 'ip link set eth0 up; ip addr add @GUEST_IP@/24 dev eth0; ping -c 1 -W 10 @HOST_IP@ >/dev/null && say before-ping=ok || say before-ping=failed'
# Kernel messages so far: the restored guest prints the ones after these.
type_wait "$L" 'abide-linux: kmsg-count=' 30 'N=$(dmesg | wc -l); say kmsg-count=$N'
h0=$(date +%s)
type_wait "$L" 'abide-linux: before-clock ' 30 'say before-clock epoch=$(date +%s) uptime=$(cut -d" " -f1 /proc/uptime)'
h1=$(date +%s)
host "before-window=$h0..$h1"

# --- pause, snapshot, kill ---
host "pause-reply=$("$A" ctl --api-socket "$T/api" pause 2>&1)"
host "snapshot-reply=$("$A" snapshot --api-socket "$T/api" "$T/vm.snap" 2>&1)"
host "snapshot-file=$(stat -c %s "$T/vm.snap") allocated_kib=$(du -k "$T/vm.snap" | cut -f1)"
kill -9 "$P"
wait "$P"
RC1=$?
P=''
host "killed=$(date +%s) rc=$RC1"
sleep @DOWNTIME@
# The restored VM gets a copy of the disk, made after the kill.
cp "$T/disk.img" "$T/disk2.img"

# --- the second abide: restore and continue ---
hr=$(date +%s)
ABIDE_RESTORE_TIMINGS=1 "$A" restore "$T/vm.snap" --disk-path "@DISK_SLOT@=$T/disk2.img" --tap "@NIC_SLOT@=$TAP" \
    < "$T/in" > "$T/out2.log" 2> "$T/err2.log" &
P=$!
host "pid2=$P restore-start=$hr"
L=$T/out2.log
type_wait "$L" 'abide-linux: after-shell=ok' 60 'say after-shell=ok'
h2=$(date +%s)
type_wait "$L" 'abide-linux: after-clock ' 30 'say after-clock epoch=$(date +%s) uptime=$(cut -d" " -f1 /proc/uptime)'
h3=$(date +%s)
host "after-window=$h2..$h3"
type_wait "$L" 'abide-linux: after-file=' 30 'say after-file=$(cat /mnt/d/f)'
# Unmounting drops the file system's caches and, as the last opener goes,
# the block device's page cache; drop_caches on top. The file comes back
# from the (overridden) disk image.
type_wait "$L" 'abide-linux: remount-file=' 60 'umount /mnt/d && echo 3 > /proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt/d && say remount-file=$(cat /mnt/d/f) || say remount-file=failed'
type_wait "$L" 'abide-linux: after-ping=' 60 'ping -c 1 -W 10 @HOST_IP@ >/dev/null && say after-ping=ok || say after-ping=failed'
# Raw data past the file system, for the host to find in the copy only.
type_wait "$L" 'abide-linux: after-dd=' 60 "umount /mnt/d; printf $TOKEN-raw | dd of=/dev/vda bs=512 seek=65536 conv=fsync 2>/dev/null && say after-dd=ok || say after-dd=failed"
type_wait "$L" 'abide-linux: kmsg-end' 60 'dmesg | tail -n +$((N + 1)) | while read -r l; do say "kmsg $l"; done; say kmsg-end watchdog=$(cat /proc/sys/kernel/watchdog 2>/dev/null) thresh=$(cat /proc/sys/kernel/watchdog_thresh 2>/dev/null)'
printf 'poweroff -f\n' > "$T/in"
end=$(($(date +%s) + 60))
while kill -0 "$P" 2>/dev/null; do
    [ "$(date +%s)" -lt "$end" ] || fail "abide did not exit within 60 s of poweroff -f"
    sleep 0.1
done
wait "$P"
RC2=$?
P=''
host "restore-exit=$RC2"
host "copy-raw=$(dd if="$T/disk2.img" bs=512 skip=65536 count=1 2>/dev/null | tr -d '\000' | head -c 100)"
host "original-raw=$(dd if="$T/disk.img" bs=512 skip=65536 count=1 2>/dev/null | tr -d '\000' | head -c 100)"
host "original-file=$(debugfs -R 'cat /f' "$T/disk.img" 2>/dev/null)"
dump
cleanup
exit 0
"#;

#[test]
fn linux_guest_survives_snapshot_kill_and_restore() {
    let abide = abide_bin();
    let token = format!(
        "abide-snap-{:x}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
        std::process::id()
    );
    // The script's own deadline comes before the nested host's timeout, so
    // a guest that stops answering still gets its logs printed.
    let budget = 180;
    let script = SCRIPT
        .replace("@ABIDE@", &abide.display().to_string())
        .replace("@KERNEL@", &guest_file("vmlinuz").display().to_string())
        .replace(
            "@INITRD@",
            &guest_file("initramfs.cpio.gz").display().to_string(),
        )
        .replace("@TOKEN@", &token)
        .replace("@BUDGET@", &budget.to_string())
        .replace("@DOWNTIME@", &DOWNTIME_S.to_string())
        .replace("@HOST_IP@", HOST_IP)
        .replace("@GUEST_IP@", "192.168.215.2")
        .replace("@DISK_SLOT@", &DISK_SLOT.to_string())
        .replace("@NIC_SLOT@", &NIC_SLOT.to_string());
    let out = run_session(&script, budget, "snapshot");
    let text = out.stdout.as_str();
    let (before, rc1) = section(text, "console1");
    let (after, rc2) = section(text, "console2");
    let (stderr2, _) = section(text, "stderr2");

    // Before the snapshot: the guest set up its state.
    assert_eq!(guest(before, "before-fs="), "ok", "{before}");
    assert_eq!(guest(before, "before-file="), token, "{before}");
    assert_eq!(guest(before, "before-ping="), "ok", "{before}");
    let clock = guest(before, "before-clock ");
    let before_epoch: i64 = word(clock, "epoch").parse().expect("epoch");
    let before_uptime: f64 = word(clock, "uptime").parse().expect("uptime");
    let (h0, h1) = window(text, "before-window");
    assert!(
        before_epoch >= h0 - CLOCK_TOLERANCE_S && before_epoch <= h1 + CLOCK_TOLERANCE_S,
        "the booted guest's clock {before_epoch} is not the host's {h0}..{h1}\n{before}"
    );

    // Pause, snapshot, kill.
    let pause: Value =
        serde_json::from_str(host_field(text, "pause-reply")).expect("pause reply is JSON");
    // The REST reply (`abide ctl` prints the error instead of JSON when
    // the request fails).
    assert_eq!(pause["state"], "paused", "{pause}");
    assert!(pause["pause_ms"].as_f64().is_some(), "{pause}");
    let reply: Value =
        serde_json::from_str(host_field(text, "snapshot-reply")).expect("snapshot reply is JSON");
    eprintln!("snapshot reply: {reply}");
    assert!(
        reply["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/vm.snap")),
        "{reply}"
    );
    // A paused VM stays paused while it is saved.
    assert_eq!(reply["state"], "paused", "{reply}");
    let bytes = reply["bytes"].as_u64().expect("bytes");
    let save_ms = reply["save_ms"].as_f64().expect("save_ms");
    let file = host_field(text, "snapshot-file");
    let file_bytes: u64 = file
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .expect("snapshot file size");
    assert_eq!(bytes, file_bytes, "reply vs file size: {file}");
    // 512 MiB of RAM, of which a booted busybox guest touches a fraction.
    assert!(
        bytes > 1 << 20 && bytes < 512 << 20,
        "snapshot of {bytes} bytes"
    );
    assert_eq!(
        rc1, "137",
        "the first abide should die by SIGKILL\n{before}"
    );
    let killed: i64 = host_field(text, "killed")
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .expect("kill time");

    // The restore: its timing line.
    let timing = stderr2
        .lines()
        .find(|l| l.starts_with("abide: restore "))
        .unwrap_or_else(|| panic!("no ABIDE_RESTORE_TIMINGS line\n{stderr2}"));
    eprintln!("{timing}");
    let ready_ms: f64 = word(timing, "ready_ms").parse().expect("ready_ms");
    assert!(ready_ms > 0.0, "{timing}");

    // After the restore: the same shell goes on.
    assert_eq!(guest(after, "after-shell="), "ok", "{after}");
    assert!(
        !after.contains("abide-linux: interactive shell"),
        "the guest booted again instead of continuing\n{after}"
    );
    // The clock moved on with the host's, by the downtime.
    let clock = guest(after, "after-clock ");
    let after_epoch: i64 = word(clock, "epoch").parse().expect("epoch");
    let after_uptime: f64 = word(clock, "uptime").parse().expect("uptime");
    let (h2, h3) = window(text, "after-window");
    let frozen = h2 - h1;
    eprintln!(
        "clock: before guest={before_epoch} host={h0}..{h1} uptime={before_uptime}; \
         killed={killed}; after guest={after_epoch} host={h2}..{h3} uptime={after_uptime}; \
         guest frozen for about {frozen} s (snapshot {save_ms} ms, downtime {DOWNTIME_S} s)"
    );
    assert!(
        frozen > 2 * CLOCK_TOLERANCE_S,
        "the guest was frozen only {frozen} s: too short to tell an advanced clock from one that was not"
    );
    assert!(
        after_epoch >= before_epoch,
        "guest time went back: {before_epoch} -> {after_epoch}"
    );
    assert!(
        after_epoch >= h2 - CLOCK_TOLERANCE_S && after_epoch <= h3 + CLOCK_TOLERANCE_S,
        "after the restore the guest's clock {after_epoch} is not the host's {h2}..{h3} \
         (±{CLOCK_TOLERANCE_S} s): it lags by {} s (frozen for {frozen} s)\n{after}",
        h2 - after_epoch
    );
    assert!(
        after_uptime > before_uptime,
        "uptime went back: {before_uptime} -> {after_uptime}"
    );

    // The file, from the still-mounted file system and after a remount
    // (read again from the copied disk image).
    assert_eq!(guest(after, "after-file="), token, "{after}");
    assert_eq!(guest(after, "remount-file="), token, "{after}");
    // The network.
    assert_eq!(guest(after, "after-ping="), "ok", "{after}");
    // The restored VM wrote to the copy given by --disk-path, not to the
    // original, which holds the file synced before the snapshot.
    assert_eq!(guest(after, "after-dd="), "ok", "{after}");
    assert_eq!(
        host_field(text, "copy-raw"),
        format!("{token}-raw"),
        "the restored guest's write is not in the --disk-path image"
    );
    assert_eq!(
        host_field(text, "original-raw"),
        "",
        "the restored guest wrote to the original image despite --disk-path"
    );
    assert_eq!(host_field(text, "original-file"), token);

    // Kernel messages since the snapshot (dmesg in the guest) and the
    // consoles: nothing alarming.
    let kmsg: Vec<&str> = after
        .lines()
        .filter_map(|l| l.strip_prefix("abide-linux: kmsg "))
        .collect();
    eprintln!(
        "kernel messages after the snapshot ({}), {}:",
        kmsg.len(),
        guest(after, "kmsg-end").trim()
    );
    for l in &kmsg {
        eprintln!("  {l}");
    }
    for (name, log) in [("before", before), ("after", after)] {
        for l in log.lines() {
            let l = l.trim_end();
            if ["WARNING", "BUG", "lockup", "rcu"]
                .iter()
                .any(|w| l.contains(w))
            {
                eprintln!("console {name}: {l}");
            }
        }
        assert_no_kernel_trouble(name, log);
    }

    // poweroff -f ends the restored abide with 0.
    assert_eq!(
        rc2, "0",
        "the restored abide should exit 0\n{after}\n{stderr2}"
    );
    assert!(
        !stderr2.contains("abide: error"),
        "the restore reported an error\n{stderr2}"
    );
    eprintln!(
        "snapshot: bytes={bytes} memory_bytes={} save_ms={save_ms}; restore: {timing}",
        reply["memory_bytes"]
    );
}
