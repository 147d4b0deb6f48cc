//! Soft shutdown of a real Linux guest through the API: the Debian cloud
//! kernel with the busybox initramfs (`abide.test=power-button`) runs
//! busybox `acpid`; `PUT /api/v1/vm.power-button` (here via `abide ctl
//! power-button`) sets PWRBTN_STS and raises the SCI, Linux's ACPI button
//! driver reports KEY_POWER, acpid runs the guest's shutdown handler, which
//! syncs, unmounts and powers off: abide exits 0 (ACPI S5). The event
//! stream shows the press and the guest's power-off.
//!
//! Where this host's CPU has vmx/svm it runs directly; otherwise (PVM, as on
//! the project's machines) inside the nested test host. See
//! tests/tests/linux_guest.rs.

use abide_tests::session::{assert_no_kernel_trouble, host_field, run_session, section};
use abide_tests::{abide_bin, guest_file};
use serde_json::Value;

/// The session, run inside the test host by `sh`; `@NAME@` are replaced.
const SCRIPT: &str = r#"
A='@ABIDE@'; KERNEL='@KERNEL@'; INITRD='@INITRD@'
T=$(mktemp -d)
DEADLINE=$(($(date +%s) + @BUDGET@))
host() { echo "host: $*"; }
dump() {
    echo "@@@ begin console"; cat "$T/console.log" 2>/dev/null; echo "@@@ end console rc=$RC"
    echo "@@@ begin abide"; cat "$T/abide.log" 2>/dev/null; echo "@@@ end abide rc=$RC"
    echo "@@@ begin events"; cat "$T/events" 2>/dev/null; echo "@@@ end events rc=$RC"
}
RC=''
"$A" run --kernel "$KERNEL" --initrd "$INITRD" --cmdline 'console=ttyS0 quiet abide.test=power-button' \
    --machine pc-1.0 --cpus 2 --memory 512M --serial "file:$T/console.log" --api-socket "$T/api" \
    > "$T/abide.log" 2>&1 &
P=$!
while ! grep -q '^abide-linux: power-button-ready' "$T/console.log" 2>/dev/null; do
    if ! kill -0 "$P" 2>/dev/null || [ "$(date +%s)" -ge "$DEADLINE" ]; then
        host "failed: the guest never got ready"; kill -9 "$P" 2>/dev/null; dump; exit 1
    fi
    sleep 0.2
done
# The event stream, from the start.
curl -sSN --unix-socket "$T/api" 'http://localhost/api/v1/events?since=0' > "$T/events" 2> "$T/curl.err" &
E=$!
while ! grep -q '"state":"running"' "$T/events" 2>/dev/null; do
    if ! kill -0 "$E" 2>/dev/null || [ "$(date +%s)" -ge "$DEADLINE" ]; then
        host "failed: no event stream: $(cat "$T/curl.err")"; kill -9 "$P"; dump; exit 1
    fi
    sleep 0.1
done
host "press=$("$A" ctl --api-socket "$T/api" power-button 2>&1)"
host "pressed-at=$(date +%s)"
while kill -0 "$P" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$DEADLINE" ]; then
        host "failed: the guest did not power off"; kill -9 "$P"; break
    fi
    sleep 0.2
done
wait "$P"
RC=$?
host "exited-at=$(date +%s)"
host "rc=$RC"
sleep 0.3
kill "$E" 2>/dev/null
dump
"#;

#[test]
fn linux_guest_shuts_down_cleanly_on_the_power_button() {
    let budget = 240;
    let script = SCRIPT
        .replace("@ABIDE@", &abide_bin().display().to_string())
        .replace("@KERNEL@", &guest_file("vmlinuz").display().to_string())
        .replace(
            "@INITRD@",
            &guest_file("initramfs.cpio.gz").display().to_string(),
        )
        .replace("@BUDGET@", &budget.to_string());
    let out = run_session(&script, budget, "power-button");
    let text = out.stdout.as_str();
    let (console, rc) = section(text, "console");
    let (events, _) = section(text, "events");

    // Linux enabled the fixed power button before the press.
    let press: Value = serde_json::from_str(host_field(text, "press"))
        .unwrap_or_else(|e| panic!("press reply ({e})\n{text}"));
    assert_eq!(press["guest_listening"], true, "{press}");
    let ready = console
        .lines()
        .find(|l| l.starts_with("abide-linux: power-button-ready"))
        .expect("ready line");
    assert!(
        !ready.contains("buttons=0"),
        "no ACPI power button in the guest: {ready}"
    );
    assert!(
        !ready.contains("event_devices=0"),
        "no evdev devices: {ready}"
    );

    // The guest's own shutdown ran, in order, and it powered off (S5).
    let pressed = console
        .find("abide-linux: power-button pressed; shutting down")
        .unwrap_or_else(|| panic!("acpid did not run the handler\n{console}"));
    let clean = console
        .find("abide-linux: poweroff (clean)")
        .unwrap_or_else(|| panic!("the handler did not finish\n{console}"));
    assert!(pressed < clean);
    assert!(console.contains("reboot: Power down"), "{console}");
    assert_eq!(rc, "0", "abide's exit status for a guest poweroff\n{text}");
    assert_no_kernel_trouble("power-button", console);
    let (pressed_at, exited_at): (i64, i64) = (
        host_field(text, "pressed-at").parse().expect("time"),
        host_field(text, "exited-at").parse().expect("time"),
    );
    eprintln!("power button to exit: {} s", exited_at - pressed_at);

    // The events, in order.
    let kinds: Vec<String> = events
        .lines()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap_or_else(|err| panic!("{err}: {l}"));
            match e["state"].as_str() {
                Some(s) if e["event"] == "state" => format!("state:{s}"),
                _ => e["event"].as_str().unwrap_or("?").to_string(),
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "state:running",
            "power-button",
            "guest-poweroff",
            "state:shutdown"
        ],
        "{events}"
    );
}
