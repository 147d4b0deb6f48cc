//! How a VM ends: poweroff, reset, and guest crashes.

use std::time::Duration;

use abide_tests::run_abide;

const TIMEOUT: Duration = Duration::from_secs(120);
// `--cpu abide-v1`: the default machine type's CPU model (abide-v2) needs
// hardware-assisted KVM; the baseline model also runs under PVM.
/// `abide run`'s documented exit status for a guest reset.
const EXIT_RESET: i32 = 3;

#[test]
fn poweroff_exits_zero() {
    let out = run_abide(
        &[
            "run",
            "--cpu",
            "abide-v1",
            "--cmdline",
            "exit=poweroff quiet",
        ],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.one("exit").get("how"), "poweroff");
}

#[test]
fn reset_has_its_own_exit_code() {
    let out = run_abide(
        &["run", "--cpu", "abide-v1", "--cmdline", "exit=reset quiet"],
        None,
        TIMEOUT,
    );
    assert_eq!(out.one("exit").get("how"), "reset", "{out}");
    assert_eq!(out.code, Some(EXIT_RESET), "{out}");
    assert!(out.stderr.contains("reset"), "{out}");
}

#[test]
fn triple_fault_is_an_error_with_registers() {
    let out = run_abide(
        &[
            "run",
            "--cpu",
            "abide-v1",
            "--cmdline",
            "fault=triple quiet",
        ],
        None,
        TIMEOUT,
    );
    assert_eq!(out.one("fault").get("how"), "triple", "{out}");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("triple fault"), "{out}");
    assert!(out.stderr.contains("rip="), "register dump missing\n{out}");
    assert!(out.stderr.contains("cr3="), "register dump missing\n{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn emulation_failure_is_an_error_with_registers() {
    // `int3` in ring 0: PVM cannot emulate it (KVM_EXIT_INTERNAL_ERROR);
    // hardware KVM delivers #BP to the guest, whose handler resets.
    let out = run_abide(
        &["run", "--cpu", "abide-v1", "--cmdline", "fault=int3 quiet"],
        None,
        TIMEOUT,
    );
    assert_eq!(out.one("fault").get("how"), "int3", "{out}");
    if abide_tests::host_is_pvm() {
        assert_eq!(out.code, Some(1), "{out}");
        assert!(out.stderr.contains("KVM internal error"), "{out}");
        assert!(out.stderr.contains("rip="), "register dump missing\n{out}");
        assert!(out.stderr.contains("efer="), "register dump missing\n{out}");
    } else {
        assert_eq!(out.one("panic").num("exception"), 3, "{out}");
        assert_eq!(out.code, Some(EXIT_RESET), "{out}");
    }
    assert!(!out.stderr.contains("panicked"), "{out}");
}
