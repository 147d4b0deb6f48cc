//! The test guest on /dev/kvm: boot, SMP, e820, RTC, devices.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use abide_firmware::e820::{self, E820Type};
use abide_machines::{GIB, MIB};
use abide_tests::{run_abide, Outcome};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The default machine type's CPU model (abide-v2) needs hardware-assisted
/// KVM; these tests pin the baseline model so they also run under PVM.
const CPU: [&str; 2] = ["--cpu", "abide-v1"];

/// The machine `abide run` uses without `--machine`.
fn default_machine() -> abide_machines::MachineDescription {
    abide_machines::resolve("pc").expect("pc")
}

fn boot(args: &[&str]) -> Outcome {
    let mut all = vec!["run"];
    all.extend_from_slice(&CPU);
    all.extend_from_slice(args);
    let out = run_abide(&all, None, TIMEOUT);
    assert_eq!(out.code, Some(0), "guest should power off cleanly\n{out}");
    assert!(out.topic("panic").is_empty(), "guest panicked\n{out}");
    assert!(
        out.topic("error").is_empty(),
        "guest reported errors\n{out}"
    );
    out
}

#[test]
fn embedded_guest_boots_and_powers_off() {
    let out = boot(&[]);
    let b = out.one("boot");
    assert_eq!(b.get("version"), "1");
    out.one("done");
    assert_eq!(out.one("exit").get("how"), "poweroff");
    // Every line the guest reports is on stdout, and abide adds nothing to stderr.
    assert!(out.stderr.is_empty(), "unexpected stderr\n{out}");
}

#[test]
fn every_vcpu_checks_in() {
    for cpus in [1u64, 2, 4] {
        let n = cpus.to_string();
        let out = boot(&["--cpus", &n]);
        let summary = out.one("cpus");
        assert_eq!(summary.num("online"), cpus, "{out}");
        assert_eq!(summary.num("expected"), cpus, "{out}");
        let mut apic_ids: Vec<u64> = out.topic("cpu").iter().map(|l| l.num("apic_id")).collect();
        assert!(out.topic("cpu").iter().all(|l| l.get("online") == "1"));
        apic_ids.sort_unstable();
        assert_eq!(apic_ids, (0..cpus).collect::<Vec<_>>(), "{out}");
    }
}

fn check_e820(memory: u64, arg: &str) {
    let out = boot(&["--memory", arg]);
    let got: Vec<(u64, u64, u64)> = out
        .topic("e820")
        .iter()
        .map(|l| (l.num("addr"), l.num("size"), l.num("type")))
        .collect();
    let want: Vec<(u64, u64, u64)> = e820::build(&default_machine(), memory)
        .iter()
        .map(|e| (e.addr, e.size, e.kind as u64))
        .collect();
    assert_eq!(got, want, "guest e820 differs from the VMM's\n{out}");
    let ram: u64 = e820::build(&default_machine(), memory)
        .iter()
        .filter(|e| e.kind == E820Type::Ram)
        .map(|e| e.size)
        .sum();
    assert_eq!(out.one("memory").num("ram_bytes"), ram, "{out}");
}

#[test]
fn e820_matches_vmm_map() {
    check_e820(512 * MIB, "512M");
}

#[test]
fn e820_above_4g() {
    // 5 GiB: 3 GiB below the PCI hole, 2 GiB above 4 GiB (memfd-backed, untouched).
    check_e820(5 * GIB, "5G");
}

#[test]
fn rtc_is_near_host_time() {
    let out = boot(&[]);
    let guest = out.one("rtc").num("epoch") as i64;
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (host - guest).abs() <= 120,
        "guest RTC {guest} vs host {host}\n{out}"
    );
}

#[test]
fn platform_devices_are_found() {
    let out = boot(&[]);
    let present: Vec<String> = out
        .topic("device")
        .iter()
        .filter(|l| l.get("present") == "1")
        .map(|l| l.get("name").to_string())
        .collect();
    for dev in ["com1", "i8042", "rtc", "pm-timer", "acpi"] {
        assert!(present.iter().any(|d| d == dev), "{dev} not found\n{out}");
    }
    let tables: Vec<String> = out
        .topic("acpi")
        .iter()
        .filter(|l| l.fields.contains_key("table"))
        .map(|l| {
            assert_eq!(l.get("checksum"), "ok", "{out}");
            l.get("table").to_string()
        })
        .collect();
    for sig in ["FACP", "DSDT", "APIC"] {
        assert!(tables.iter().any(|t| t == sig), "{sig} missing\n{out}");
    }
}

#[test]
fn workload_runs_in_ring3() {
    let out = boot(&["--cmdline", "rounds=4"]);
    let u = out.one("user");
    assert_eq!(u.get("cpl"), "3", "{out}");
    assert_eq!(u.num("rounds"), 4);
    // Same input, same checksum: the workload is deterministic.
    let again = boot(&["--cmdline", "rounds=4"]);
    assert_eq!(again.one("user").get("checksum"), u.get("checksum"));
    let other = boot(&["--cmdline", "rounds=5"]);
    assert_ne!(other.one("user").get("checksum"), u.get("checksum"));
}
