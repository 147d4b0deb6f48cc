//! Live migration of a running real Linux guest over TCP.
//!
//! The Debian cloud kernel with the busybox initramfs (`abide.test=shell`)
//! runs on pc-1.0 with 2 vCPUs, 512 MiB, a virtio-blk disk and a
//! virtio-net NIC on a tap that is a port of a host bridge. A script types
//! into its serial shell through a FIFO: it makes an ext2 file system on
//! the disk, starts a shell loop appending a numbered line to a file there
//! every 100 ms, and the host pings the guest through the bridge every
//! 100 ms. Then the guest is migrated to an `abide receive` on loopback
//! TCP whose NIC is another tap of the same bridge (the disk is shared:
//! the same image). The shell must go on at the destination, the loop must
//! have kept writing (every number once, after a remount), ping must
//! resume within a second (the destination announces the guest's MAC with
//! RARP, so the bridge learns its new port), the guest's clock must be
//! the host's, and the kernel must not complain.
//!
//! Where this host's CPU has vmx/svm it runs directly; otherwise inside the
//! nested test host (see tests/tests/linux_guest.rs).

use std::time::{SystemTime, UNIX_EPOCH};

use abide_tests::session::{
    assert_no_kernel_trouble, guest, host_field, run_session, section, window, word,
};
use abide_tests::{abide_bin, guest_file};
use serde_json::Value;

/// How far the guest's `date +%s` may be from the host's window around it
/// (see linux_snapshot.rs: truncation on both sides and the RTC's 1 s).
const CLOCK_TOLERANCE_S: i64 = 3;

/// The session script (see linux_snapshot.rs for the conventions).
const SCRIPT: &str = r#"
A='@ABIDE@'; KERNEL='@KERNEL@'; INITRD='@INITRD@'; TOKEN='@TOKEN@'
BR=abbrM TAPA=abtapMa TAPB=abtapMb
T=$(mktemp -d)
P1='' P2='' KEEP='' PING='' RC1='' RC2=''
DEADLINE=$(($(date +%s) + @BUDGET@))
host() { echo "host: $*"; }
dump() {
    echo "@@@ begin console1"; cat "$T/out1.log" 2>/dev/null; echo "@@@ end console1 rc=$RC1"
    echo "@@@ begin console2"; cat "$T/out2.log" 2>/dev/null; echo "@@@ end console2 rc=$RC2"
    echo "@@@ begin stderr2"; cat "$T/err2.log" 2>/dev/null; echo "@@@ end stderr2 rc=$RC2"
    echo "@@@ begin migrate"; cat "$T/migrate.err" 2>/dev/null; echo "@@@ end migrate rc=0"
    echo "@@@ begin ping"; cat "$T/ping.log" 2>/dev/null; echo "@@@ end ping rc=0"
}
cleanup() {
    [ -n "$P1" ] && kill -9 "$P1" 2>/dev/null
    [ -n "$P2" ] && kill -9 "$P2" 2>/dev/null
    [ -n "$PING" ] && kill "$PING" 2>/dev/null
    [ -n "$KEEP" ] && kill "$KEEP" 2>/dev/null
    ip link del "$TAPA" 2>/dev/null; ip link del "$TAPB" 2>/dev/null; ip link del "$BR" 2>/dev/null
    rm -rf "$T"
}
fail() {
    host "failed: $*"
    dump
    cleanup
    exit 1
}
# wait_for PID LOG NEEDLE SECS: until a line of LOG starts with NEEDLE,
# while PID runs, within SECS and the session's deadline.
wait_for() {
    end=$(($(date +%s) + $4))
    [ "$end" -le "$DEADLINE" ] || end=$DEADLINE
    while ! tr -d '\r' < "$2" | grep -q "^$3"; do
        kill -0 "$1" 2>/dev/null || fail "abide exited before the guest printed '$3'"
        [ "$(date +%s)" -lt "$end" ] || fail "no '$3' within $4 s (or the session's @BUDGET@ s)"
        sleep 0.1
    done
}
type_wait() {
    printf '%s\n' "$5" > "$T/in"
    wait_for "$1" "$2" "$3" "$4"
}

truncate -s 64M "$T/disk.img"
# The nested host's loopback is down until someone brings it up.
ip link set lo up
for l in "$TAPA" "$TAPB" "$BR"; do ip link del "$l" 2>/dev/null; done
ip link add "$BR" type bridge && ip addr add @HOST_IP@/24 dev "$BR" && ip link set "$BR" up ||
    fail "cannot create the bridge $BR"
for t in "$TAPA" "$TAPB"; do
    ip tuntap add dev "$t" mode tap && ip link set "$t" master "$BR" && ip link set "$t" up ||
        fail "cannot create the tap $t"
done
mkfifo "$T/in"
sleep 1000 > "$T/in" &
KEEP=$!

# --- the source ---
"$A" run --kernel "$KERNEL" --initrd "$INITRD" --cmdline 'console=ttyS0 quiet abide.test=shell' \
    --machine pc-1.0 --cpus 2 --memory 512M --disk "path=$T/disk.img" \
    --net "tap=$TAPA,mac=@MAC@" --api-socket "$T/api1" \
    < "$T/in" > "$T/out1.log" 2>&1 &
P1=$!
L=$T/out1.log
wait_for "$P1" "$L" 'abide-linux: interactive shell' 120
type_wait "$P1" "$L" 'abide-linux: shell-ok' 30 'say() { echo "abide-linux: $*"; }; say shell-ok'
type_wait "$P1" "$L" 'abide-linux: fs=' 60 "mke2fs -q -b 1024 /dev/vda 16384 && mkdir -p /mnt/d && mount -t ext2 /dev/vda /mnt/d && echo $TOKEN > /mnt/d/f && sync && say fs=ok || say fs=failed"
type_wait "$P1" "$L" 'abide-linux: net=' 60 'ip link set eth0 up; ip addr add @GUEST_IP@/24 dev eth0; ping -c 1 -W 10 @HOST_IP@ >/dev/null && say net=ok || say net=failed'
# The writer: a numbered line every 100 ms, synced, in the background.
type_wait "$P1" "$L" 'abide-linux: loop-started' 30 '(i=0; while :; do i=$((i + 1)); echo "line $i" >> /mnt/d/log; sync; usleep 100000; done) > /dev/null 2>&1 & LOOP=$!; say loop-started'
type_wait "$P1" "$L" 'abide-linux: kmsg-count=' 30 'N=$(dmesg | wc -l); say kmsg-count=$N'
# The host pings the guest through the bridge every 100 ms.
busybox ping -i 0.1 @GUEST_IP@ > "$T/ping.log" 2>&1 &
PING=$!
sleep 3

# --- the destination, and the migration ---
"$A" receive --listen tcp:127.0.0.1:0 --tap "@NIC_SLOT@=$TAPB" --api-socket "$T/api2" \
    < "$T/in" > "$T/out2.log" 2> "$T/err2.log" &
P2=$!
end=$(($(date +%s) + 60))
while ! grep -q 'listening for an incoming migration on tcp:' "$T/err2.log"; do
    kill -0 "$P2" 2>/dev/null || fail "abide receive exited"
    [ "$(date +%s)" -lt "$end" ] || fail "abide receive does not listen"
    sleep 0.1
done
TO=$(sed -n 's/.*incoming migration on //p' "$T/err2.log" | head -n1)
host "migrate-to=$TO"
R=$("$A" migrate --api-socket "$T/api1" --to "$TO" 2> "$T/migrate.err")
RC=$?
host "migrate-result=$R"
host "migrate-rc=$RC"
end=$(($(date +%s) + 30))
while kill -0 "$P1" 2>/dev/null; do
    [ "$(date +%s)" -lt "$end" ] || fail "the source did not exit after the migration"
    sleep 0.1
done
wait "$P1"
RC1=$?
P1=''
host "source-exit=$RC1"
sleep 2
host "fdb=$(bridge fdb show br "$BR" 2>/dev/null | grep -i '@MAC@' | tr '\n' ';')"

# --- after the switch: the same shell, at the destination ---
L=$T/out2.log
h0=$(date +%s)
type_wait "$P2" "$L" 'abide-linux: after-shell=ok' 60 'say after-shell=ok'
type_wait "$P2" "$L" 'abide-linux: clock ' 30 'say clock epoch=$(date +%s)'
h1=$(date +%s)
host "clock-window=$h0..$h1"
type_wait "$P2" "$L" 'abide-linux: loop-a=' 30 'say loop-a=$(tail -n 1 /mnt/d/log | cut -d" " -f2)'
sleep 2
type_wait "$P2" "$L" 'abide-linux: loop-b=' 30 'say loop-b=$(tail -n 1 /mnt/d/log | cut -d" " -f2)'
kill "$PING" 2>/dev/null
PING=''
# Stop the writer, remount (dropping caches), and check every line.
type_wait "$P2" "$L" 'abide-linux: check=' 60 'kill $LOOP; wait $LOOP 2>/dev/null; umount /mnt/d && echo 3 > /proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt/d && say check=$(awk "{ if (\$2 != NR) bad = NR } END { print (bad ? \"bad-at-\" bad : \"ok\") \"-\" NR }" /mnt/d/log) file=$(cat /mnt/d/f) || say check=remount-failed'
type_wait "$P2" "$L" 'abide-linux: kmsg-end' 60 'dmesg | tail -n +$((N + 1)) | while read -r l; do say "kmsg $l"; done; say kmsg-end'
printf 'poweroff -f\n' > "$T/in"
end=$(($(date +%s) + 60))
while kill -0 "$P2" 2>/dev/null; do
    [ "$(date +%s)" -lt "$end" ] || fail "abide did not exit within 60 s of poweroff -f"
    sleep 0.1
done
wait "$P2"
RC2=$?
P2=''
dump
cleanup
exit 0
"#;

#[test]
fn linux_guest_migrates_live_over_tcp() {
    let token = format!(
        "abide-mig-{:x}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
        std::process::id()
    );
    let budget = 240;
    let mac = "52:54:00:ab:cd:31";
    let script = SCRIPT
        .replace("@ABIDE@", &abide_bin().display().to_string())
        .replace("@KERNEL@", &guest_file("vmlinuz").display().to_string())
        .replace(
            "@INITRD@",
            &guest_file("initramfs.cpio.gz").display().to_string(),
        )
        .replace("@TOKEN@", &token)
        .replace("@BUDGET@", &budget.to_string())
        .replace("@HOST_IP@", "192.168.216.1")
        .replace("@GUEST_IP@", "192.168.216.2")
        .replace("@MAC@", mac)
        // pc-1.0: host bridge at 0, the disk at 1, the NIC at 2.
        .replace("@NIC_SLOT@", "2");
    let out = run_session(&script, budget, "migration");
    let text = out.stdout.as_str();
    let (before, _) = section(text, "console1");
    let (after, rc2) = section(text, "console2");
    let (stderr2, _) = section(text, "stderr2");
    let (migrate_err, _) = section(text, "migrate");
    let (ping, _) = section(text, "ping");
    for l in migrate_err.lines() {
        eprintln!("migrate: {l}");
    }

    assert_eq!(guest(before, "fs="), "ok", "{before}");
    assert_eq!(guest(before, "net="), "ok", "{before}");

    // The migration itself.
    assert_eq!(host_field(text, "migrate-rc"), "0", "{migrate_err}");
    let r: Value =
        serde_json::from_str(host_field(text, "migrate-result")).expect("migrate prints JSON");
    eprintln!("migration: {r}");
    assert_eq!(r["status"], "migrated", "{r}");
    assert!(r["downtime_ms"].as_f64().is_some_and(|d| d > 0.0), "{r}");
    assert!(
        migrate_err.contains("abide: migration pass 0: "),
        "{migrate_err}"
    );
    assert_eq!(host_field(text, "source-exit"), "0");
    assert!(stderr2.contains("the guest runs here"), "{stderr2}");

    // The same shell goes on, and the writer kept writing.
    assert_eq!(guest(after, "after-shell="), "ok", "{after}");
    assert!(
        !after.contains("abide-linux: interactive shell"),
        "the guest booted again instead of continuing\n{after}"
    );
    let a: u64 = guest(after, "loop-a=").trim().parse().expect("loop-a");
    let b: u64 = guest(after, "loop-b=").trim().parse().expect("loop-b");
    assert!(
        b > a,
        "the shell loop stopped writing after the switch: {a} -> {b}"
    );
    let check = guest(after, "check=");
    assert!(
        check.starts_with("ok-") && check.contains(&format!("file={token}")),
        "the file on virtio-blk after a remount: {check}"
    );
    let lines: u64 = check
        .split_whitespace()
        .next()
        .and_then(|c| c.strip_prefix("ok-"))
        .and_then(|n| n.parse().ok())
        .expect("line count");
    assert!(lines >= b, "{check} vs loop-b={b}");

    // The clock is the host's.
    let clock = guest(after, "clock ");
    let epoch: i64 = word(clock, "epoch").parse().expect("epoch");
    let (h0, h1) = window(text, "clock-window");
    assert!(
        epoch >= h0 - CLOCK_TOLERANCE_S && epoch <= h1 + CLOCK_TOLERANCE_S,
        "after the migration the guest's clock {epoch} is not the host's {h0}..{h1}"
    );

    // Ping resumed within a second: the longest run of lost replies
    // (busybox ping numbers its requests; one every 100 ms).
    let seqs: Vec<u64> = ping
        .lines()
        .filter_map(|l| l.split("seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(seqs.len() > 20, "too few ping replies\n{ping}");
    let longest = seqs
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    eprintln!(
        "ping: {} replies, longest gap {} requests ({} ms)",
        seqs.len(),
        longest,
        longest * 100
    );
    assert!(
        longest <= 10,
        "ping did not resume within a second: {longest} requests lost in a row"
    );
    // The bridge learned the guest's new port (the RARP announcement or
    // the guest's own traffic).
    let fdb = host_field(text, "fdb");
    assert!(
        fdb.contains("abtapMb"),
        "the guest's MAC is not on the new tap: {fdb}"
    );

    // No kernel trouble.
    let kmsg: Vec<&str> = after
        .lines()
        .filter_map(|l| l.strip_prefix("abide-linux: kmsg "))
        .collect();
    eprintln!("kernel messages after the setup ({}):", kmsg.len());
    for l in &kmsg {
        eprintln!("  {l}");
    }
    assert_no_kernel_trouble("before", before);
    assert_no_kernel_trouble("after", after);
    assert_eq!(
        rc2, "0",
        "the destination abide should exit 0\n{after}\n{stderr2}"
    );
}
