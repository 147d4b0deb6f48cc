//! Bad input gets a one-line error, a non-zero exit, and never a panic.

use std::io::Write;
use std::time::Duration;

use abide_tests::{abide_bin, run_abide, run_command, temp_dir, Outcome};

const TIMEOUT: Duration = Duration::from_secs(60);

fn refused(args: &[&str], needle: &str) -> Outcome {
    let out = run_abide(args, None, TIMEOUT);
    assert_eq!(out.code, Some(1), "{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "error should be one line\n{out}");
    assert!(lines[0].starts_with("abide: error: "), "{out}");
    assert!(
        lines[0].contains(needle),
        "error should mention '{needle}'\n{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert!(out.stdout.is_empty(), "no guest should have run\n{out}");
    out
}

#[test]
fn missing_kernel() {
    refused(
        &["run", "--kernel", "/nonexistent/bzImage"],
        "/nonexistent/bzImage",
    );
}

#[test]
fn unreadable_kernel() {
    // A directory opens but cannot be read as a kernel.
    refused(&["run", "--kernel", "/"], "kernel");
}

#[test]
fn not_a_kernel() {
    let dir = temp_dir("notkernel");
    let p = dir.join("junk");
    std::fs::File::create(&p)
        .and_then(|mut f| f.write_all(&[0x42; 8192]))
        .expect("write junk");
    refused(
        &["run", "--kernel", p.to_str().expect("utf8")],
        "neither a Linux bzImage nor an ELF",
    );
    // An ELF that is not a PVH kernel (checked after the CPU model, which
    // abide-v1 passes on every host).
    let ls = "/bin/ls";
    refused(&["run", "--cpu", "abide-v1", "--kernel", ls], "PVH");
}

#[test]
fn missing_initrd() {
    refused(&["run", "--initrd", "/nonexistent/initrd"], "initramfs");
}

#[test]
fn memory_bounds() {
    refused(&["run", "--memory", "1M"], "too small");
    refused(&["run", "--memory", "512G"], "too large");
    refused(&["run", "--memory", "lots"], "invalid size");
}

#[test]
fn cpu_bounds() {
    refused(&["run", "--cpus", "0"], "--cpus 0");
    refused(&["run", "--cpus", "1000"], "--cpus 1000");
}

#[test]
fn cmdline_too_long() {
    let long = "a".repeat(5000);
    // abide-v1 runs on every host, so the CPU check passes and the command
    // line is what gets refused.
    refused(
        &["run", "--cpu", "abide-v1", "--cmdline", &long],
        "command line is 5000 bytes",
    );
}

#[test]
fn bad_serial() {
    refused(&["run", "--serial", "tcp:1234"], "--serial");
    refused(
        &["run", "--serial", "file:/nonexistent/dir/log"],
        "serial output file",
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = run_abide(&["run", "--no-such-flag"], None, TIMEOUT);
    assert_eq!(out.code, Some(2), "{out}");
    let out = run_abide(&[], None, TIMEOUT);
    assert_eq!(out.code, Some(2), "{out}");
}

#[test]
fn no_permission_on_dev_kvm() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "cannot run no_permission_on_dev_kvm: it needs root to drop to an \
         unprivileged user (CI runs as root)"
    );
    // Drop to 'nobody', who cannot open /dev/kvm (mode 0600 or group kvm).
    let bin = abide_bin();
    let out = run_command(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin)
            .arg("run"),
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("permission denied opening /dev/kvm"),
        "{out}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
}
