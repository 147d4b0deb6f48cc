//! Serial console: output sinks and input.

use std::time::Duration;

use abide_tests::{run_abide, temp_dir};

const TIMEOUT: Duration = Duration::from_secs(120);
// `--cpu abide-v1`: the default machine type's CPU model (abide-v2) needs
// hardware-assisted KVM; the baseline model also runs under PVM.

#[test]
fn serial_input_reaches_the_guest() {
    let out = run_abide(
        &["run", "--cpu", "abide-v1", "--cmdline", "echo=2 quiet"],
        Some(b"hello-abide\nsecond-line\n"),
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{out}");
    let echoed: Vec<String> = out
        .topic("echo")
        .iter()
        .map(|l| l.get("line").to_string())
        .collect();
    assert_eq!(echoed, ["hello-abide", "second-line"], "{out}");
}

#[test]
fn serial_to_file() {
    let dir = temp_dir("serial");
    let path = dir.join("console.log");
    let arg = format!("file:{}", path.display());
    let out = run_abide(
        &["run", "--cpu", "abide-v1", "--serial", &arg],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        !out.stdout.contains("guest: "),
        "guest output leaked to stdout\n{out}"
    );
    let log = std::fs::read_to_string(&path).expect("serial log written");
    assert!(log.contains("guest: boot "), "{log}");
    assert!(log.contains("guest: done"), "{log}");
}

#[test]
fn serial_null_discards_output() {
    let out = run_abide(
        &["run", "--cpu", "abide-v1", "--serial", "null"],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}
