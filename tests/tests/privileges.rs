//! `--user`/`--group`: abide drops to another user after opening its
//! devices, in every thread, keeps no capability, sets NO_NEW_PRIVS, and
//! the guest runs on. Every thread also runs under a seccomp filter.
//! Needs root (to have something to drop); says so loudly otherwise.

use std::path::Path;
use std::time::Duration;

use abide_tests::api::{finish_on_power_button, wait_for_text, workload_vm};
use abide_tests::temp_dir;

const ROUNDS: u64 = 40;
const NOBODY: u32 = 65534;

/// `Key:` field of a /proc status file.
fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
}

fn task_statuses(pid: u32) -> Vec<(String, String)> {
    let tasks = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for t in std::fs::read_dir(&tasks).expect("task dir") {
        let t = t.expect("task").path();
        let status = std::fs::read_to_string(t.join("status")).expect("status");
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        out.push((comm.trim().to_string(), status));
    }
    out
}

#[test]
fn abide_drops_to_nobody_and_the_guest_runs_on() {
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 {
        panic!("NOT RUN: this test drops root to nobody and needs to run as root");
    }
    let dir = temp_dir("privileges");
    let cmdline = format!("quiet rounds={ROUNDS} progress power-button");
    let (mut vm, log) = workload_vm(&dir, "vm", &["--user", "nobody", "--rng"], &cmdline);
    wait_for_text(&log, "guest: progress round=2 ", Duration::from_secs(120));
    let tasks = task_statuses(vm.pid());
    let names: Vec<&str> = tasks.iter().map(|(c, _)| c.as_str()).collect();
    assert!(
        names.contains(&"vcpu0") && names.contains(&"abide-api"),
        "{names:?}"
    );
    for (comm, status) in &tasks {
        let ids = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
        assert_eq!(field(status, "Uid"), ids, "thread {comm}");
        assert_eq!(field(status, "Gid"), ids, "thread {comm} (nobody's group)");
        assert_eq!(field(status, "Groups"), "", "thread {comm}");
        assert_eq!(field(status, "CapEff"), "0000000000000000", "thread {comm}");
        assert_eq!(field(status, "CapPrm"), "0000000000000000", "thread {comm}");
        assert_eq!(field(status, "NoNewPrivs"), "1", "thread {comm}");
        // 2 = SECCOMP_MODE_FILTER.
        assert_eq!(field(status, "Seccomp"), "2", "thread {comm}");
    }
    let text = finish_on_power_button(&mut vm, &log, ROUNDS);
    assert!(text.contains("guest: exit how=poweroff"), "{text}");
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

#[test]
fn an_unknown_user_is_refused_before_anything_starts() {
    let out = abide_tests::run_abide(
        &["run", "--cpu", "abide-v1", "--user", "no-such-user-abide"],
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("--user 'no-such-user-abide': no such user"),
        "{out}"
    );
    assert!(!out.stdout.contains("guest:"), "{out}");
}
