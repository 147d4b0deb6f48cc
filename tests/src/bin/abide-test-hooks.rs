//! `abide` with a test hook, for the seccomp tests only: the same command
//! (vmm/src/main.rs is included as a module), plus, when
//! `ABIDE_TEST_FORBIDDEN_IN` names a thread kind (`vCPU`,
//! `virtio-rng worker`, ...), that kind of thread calls `getpgid(0)`, a
//! system call no abide filter allows, right after installing its filter.
//! The release `abide` binary has neither the hook nor the variable.

#[allow(dead_code)]
#[path = "../../../vmm/src/main.rs"]
mod abide_main;

use abide_vmm::seccomp::ThreadKind;

fn forbidden_call(kind: ThreadKind) {
    let Ok(target) = std::env::var("ABIDE_TEST_FORBIDDEN_IN") else {
        return;
    };
    if target != kind.name() {
        return;
    }
    // SAFETY: getpgid(0) takes no pointers and changes nothing.
    let r = unsafe { libc::syscall(libc::SYS_getpgid, 0) };
    // Reached only when the filter let the call through (log, off).
    eprintln!(
        "abide-test-hooks: the {} thread's getpgid(0) returned {r}",
        kind.name()
    );
}

fn main() -> std::process::ExitCode {
    abide_vmm::seccomp::set_test_hook(forbidden_call);
    abide_main::main()
}
