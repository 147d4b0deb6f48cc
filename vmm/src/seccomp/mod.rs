//! Seccomp-BPF sandboxing: each thread of abide, once set up, may make only
//! the system calls its kind of thread needs ([`lists`] holds them, with a
//! reason for each).
//!
//! `main` chooses the [`Action`] for a forbidden call (`--seccomp`) with
//! [`configure`], which compiles every kind's filter before any is
//! installed. Each thread then installs its own filter when it starts
//! ([`enter`]): the control thread after the VM is built and before the
//! guest runs, the API, vCPU, device-worker, migration, console, INTx and
//! announce threads first thing in their own body. Without [`configure`]
//! (the library used by tests, `abide manifest`) nothing is installed.

mod lists;
mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What happens when a thread makes a system call its filter forbids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Action {
    /// No filters at all.
    Off,
    /// The call is allowed and logged by the kernel (audit log, `dmesg`):
    /// for finding what a new host or kernel needs.
    Log,
    /// SIGSYS: abide prints the thread and the system call by name and
    /// exits with status 1.
    Trap,
    /// The kernel kills the whole process at once with SIGSYS (status
    /// 128+31 in a shell); the kernel log records the call. The default.
    #[default]
    Kill,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            "trap" => Ok(Self::Trap),
            "kill" => Ok(Self::Kill),
            _ => Err(format!(
                "'{s}' is not a seccomp action: use off, log, trap or kill"
            )),
        }
    }
}

/// The kinds of abide threads; each has its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: builds, restores and controls the VM.
    Control,
    /// The API server.
    Api,
    /// A vCPU.
    Vcpu,
    /// virtio-blk's worker.
    Blk,
    /// virtio-net's worker.
    Net,
    /// virtio-rng's worker.
    Rng,
    /// An outgoing live migration.
    Migration,
    /// An incoming live migration (builds the received VM).
    Incoming,
    /// Copies stdin to the serial port.
    Console,
    /// The INTx resampler.
    Intx,
    /// Announces a migrated guest's MAC addresses.
    Announce,
    /// Loads a restored VM's memory: verifies each chunk and copies it in
    /// through the userfaultfd.
    Memory,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 12] = [
        Self::Control,
        Self::Api,
        Self::Vcpu,
        Self::Blk,
        Self::Net,
        Self::Rng,
        Self::Migration,
        Self::Incoming,
        Self::Console,
        Self::Intx,
        Self::Announce,
        Self::Memory,
    ];

    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::Api => "API",
            Self::Vcpu => "vCPU",
            Self::Blk => "virtio-blk worker",
            Self::Net => "virtio-net worker",
            Self::Rng => "virtio-rng worker",
            Self::Migration => "migration",
            Self::Incoming => "incoming migration",
            Self::Console => "stdin console",
            Self::Intx => "INTx resampler",
            Self::Announce => "announce",
            Self::Memory => "memory loader",
        }
    }

    /// The kind of a device worker, by its model's name.
    fn of_worker(model: &str) -> Option<Self> {
        match model {
            "virtio-blk" => Some(Self::Blk),
            "virtio-net" => Some(Self::Net),
            "virtio-rng" => Some(Self::Rng),
            _ => None,
        }
    }
}

/// Why the filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list names a system call this build does not know.
    #[error("the seccomp list of the {kind} thread names an unknown system call '{name}'")]
    UnknownSyscall {
        /// Thread kind.
        kind: &'static str,
        /// The name.
        name: &'static str,
    },
    /// seccompiler refused the filter.
    #[error("cannot compile the seccomp filter of the {kind} thread")]
    Compile {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {kind} thread (does this kernel have CONFIG_SECCOMP_FILTER? --seccomp=off runs without)")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler for `trap`.
    #[error("cannot install the SIGSYS handler for --seccomp=trap")]
    Handler(#[source] std::io::Error),
}

/// The action and compiled filters, set once by [`configure`].
struct Config {
    action: Action,
    filters: BTreeMap<ThreadKind, BpfProgram>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// A test binary's hook, called on every thread right after its filter
/// is in place (see [`set_test_hook`]).
static TEST_HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS handler's message.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// The system call number `n`'s name, or "" when unknown.
pub fn syscall_name(n: i64) -> &'static str {
    usize::try_from(n)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .copied()
        .unwrap_or("")
}

/// The number of the system call `name`.
pub fn syscall_number(name: &str) -> Option<i64> {
    names::NAMES
        .iter()
        .position(|n| !n.is_empty() && *n == name)
        .and_then(|i| i64::try_from(i).ok())
}

/// The allow-list of `kind`: each system call and why it is needed
/// (a call several groups need appears once, with the first reason).
pub fn allowed(kind: ThreadKind) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    let mut groups = lists::for_kind(kind);
    if crate::privileges::dropping() {
        groups.push(lists::SETID);
    }
    for group in groups {
        for e in group {
            if !out.iter().any(|(n, _)| n == &e.0) {
                out.push(*e);
            }
        }
    }
    out
}

fn compile(kind: ThreadKind, action: Action) -> Result<BpfProgram, SeccompError> {
    let mut rules = BTreeMap::new();
    for (name, _) in allowed(kind) {
        let nr = syscall_number(name).ok_or(SeccompError::UnknownSyscall {
            kind: kind.name(),
            name,
        })?;
        rules.insert(nr, Vec::new());
    }
    let mismatch = match action {
        Action::Log => SeccompAction::Log,
        Action::Trap => SeccompAction::Trap,
        Action::Kill | Action::Off => SeccompAction::KillProcess,
    };
    let compiled = |source| SeccompError::Compile {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(compiled)?;
    filter.try_into().map_err(compiled)
}

/// Chooses what a forbidden system call does and compiles every thread
/// kind's filter. Call once, from `main`, before any thread starts; with
/// [`Action::Off`] nothing is ever installed. Device workers install
/// theirs through the devices' worker start hook.
pub fn configure(action: Action) -> Result<(), SeccompError> {
    let mut filters = BTreeMap::new();
    if action != Action::Off {
        for kind in ThreadKind::ALL {
            filters.insert(kind, compile(kind, action)?);
        }
    }
    if action == Action::Trap {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    let _ = CONFIG.set(Config { action, filters });
    abide_devices::virtio::set_worker_start_hook(worker_started);
    Ok(())
}

/// The configured action ([`Action::Off`] before [`configure`]).
pub fn action() -> Action {
    CONFIG.get().map_or(Action::Off, |c| c.action)
}

/// Installs `kind`'s filter on the calling thread (nothing when seccomp is
/// off or not configured).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    KIND.with(|k| k.set(Some(kind)));
    if let Some(program) = CONFIG.get().and_then(|c| c.filters.get(&kind)) {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })?;
    }
    if let Some(hook) = TEST_HOOK.get() {
        hook(kind);
    }
    Ok(())
}

/// [`install`] at the start of a thread that cannot report an error to
/// anyone: a thread that cannot be confined ends the process rather than
/// run unconfined.
pub fn enter(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("abide: error: {}", crate::error_chain(&e));
        // SAFETY: _exit ends the process at once; nothing is left in a
        // state that matters.
        unsafe { libc::_exit(crate::EXIT_ERROR) };
    }
}

fn worker_started(model: &'static str) {
    if let Some(kind) = ThreadKind::of_worker(model) {
        enter(kind);
    }
}

/// For test binaries only (the `abide` binary never calls it): `hook` runs
/// on every thread right after its filter is installed, so a test can make
/// a given kind of thread call a forbidden system call.
pub fn set_test_hook(hook: fn(ThreadKind)) {
    let _ = TEST_HOOK.set(hook);
}

/// Appends `s` to `buf` at `*len`, as far as it fits.
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if let Some(slot) = buf.get_mut(*len) {
            *slot = b;
            *len += 1;
        }
    }
}

fn push_number(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The trap handler's message for system call `nr` made by a `kind` thread.
fn trap_message(buf: &mut [u8], kind: Option<ThreadKind>, nr: i32) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"abide: error: seccomp: the ");
    push(
        buf,
        &mut len,
        kind.map_or("unknown", ThreadKind::name).as_bytes(),
    );
    push(buf, &mut len, b" thread made system call ");
    push_number(buf, &mut len, u64::from(nr.unsigned_abs()));
    let name = syscall_name(i64::from(nr));
    if !name.is_empty() {
        push(buf, &mut len, b" (");
        push(buf, &mut len, name.as_bytes());
        push(buf, &mut len, b")");
    }
    push(
        buf,
        &mut len,
        b", which its filter does not allow; stopping abide\n",
    );
    len
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: after
/// si_signo, si_errno, si_code and padding (16 bytes) comes the
/// `_sigsys` member: `_call_addr` (8 bytes), then `_syscall` (int).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: no allocation, no locks.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passed a valid siginfo for SIGSYS, whose
        // `_sigsys._syscall` int lies at SI_SYSCALL_OFFSET.
        unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<libc::c_int>()
                .read_unaligned()
        }
    };
    let kind = KIND.try_with(Cell::get).ok().flatten();
    let mut buf = [0u8; 256];
    let len = trap_message(&mut buf, kind, nr);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` is valid
    // for `len` bytes. Both calls are on every allow-list.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(crate::EXIT_ERROR);
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is
    // an `extern "C"` function with the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_call_is_known_and_has_a_reason() {
        for kind in ThreadKind::ALL {
            for (name, why) in allowed(kind) {
                assert!(syscall_number(name).is_some(), "{kind:?}: unknown {name}");
                assert!(!why.is_empty(), "{kind:?}: {name} has no reason");
            }
        }
    }

    #[test]
    fn names_match_libc_numbers() {
        assert_eq!(syscall_number("read"), Some(libc::SYS_read));
        assert_eq!(syscall_number("ioctl"), Some(libc::SYS_ioctl));
        assert_eq!(syscall_number("clone3"), Some(libc::SYS_clone3));
        assert_eq!(syscall_number("getpgid"), Some(libc::SYS_getpgid));
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(100_000), "");
    }

    /// A child thread keeps its parent's filter, so a parent must allow
    /// whatever its children need.
    #[test]
    fn children_lists_are_within_their_parents() {
        use ThreadKind::*;
        let starts = [
            (
                Control,
                vec![
                    Api, Vcpu, Blk, Net, Rng, Migration, Incoming, Console, Intx, Announce, Memory,
                ],
            ),
            (Incoming, vec![Vcpu, Blk, Net, Rng, Intx, Console]),
            (Vcpu, vec![Blk, Net, Rng]),
            (Migration, vec![Blk, Net, Rng]),
        ];
        for (parent, children) in starts {
            let p = allowed(parent);
            for child in children {
                for (name, _) in allowed(child) {
                    assert!(
                        p.iter().any(|(n, _)| *n == name),
                        "{child:?} needs {name}, which its parent {parent:?} does not allow"
                    );
                }
            }
        }
    }

    #[test]
    fn dangerous_calls_are_never_allowed() {
        for kind in ThreadKind::ALL {
            let list = allowed(kind);
            for bad in [
                "execve",
                "execveat",
                "ptrace",
                "mount",
                "init_module",
                "kexec_load",
                "getpgid",
                "bpf",
            ] {
                assert!(
                    !list.iter().any(|(n, _)| *n == bad),
                    "{kind:?} allows {bad}"
                );
            }
        }
    }

    #[test]
    fn every_kind_compiles_for_every_action() {
        for action in [Action::Log, Action::Trap, Action::Kill] {
            for kind in ThreadKind::ALL {
                assert!(!compile(kind, action).expect("compiles").is_empty());
            }
        }
    }

    #[test]
    fn trap_message_names_the_call() {
        let mut buf = [0u8; 256];
        let n = trap_message(&mut buf, Some(ThreadKind::Vcpu), libc::SYS_getpgid as i32);
        let text = std::str::from_utf8(&buf[..n]).expect("utf8");
        assert_eq!(
            text,
            "abide: error: seccomp: the vCPU thread made system call 121 (getpgid), which its filter does not allow; stopping abide\n"
        );
    }

    #[test]
    fn actions_parse() {
        assert_eq!("kill".parse::<Action>(), Ok(Action::Kill));
        assert_eq!("off".parse::<Action>(), Ok(Action::Off));
        assert!("allow".parse::<Action>().is_err());
    }
}
