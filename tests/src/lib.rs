//! Shared helpers for Abide's integration tests: finding the `abide` binary,
//! running it with a timeout, parsing the test guest's report lines, and
//! the release freeze's git history ([`history`]).

pub mod history;
pub mod releases;

pub mod api;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the `abide` binary for this test profile, built on first use.
///
/// `ABIDE_BIN` overrides it. Otherwise the binary next to this test
/// executable's profile directory is used, after `cargo build` brings it up
/// to date (a no-op when the README's test command already built it).
pub fn abide_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("ABIDE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test-binary>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root())
            .args(["build", "-q", "-p", "abide-vmm", "--bin", "abide"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for abide");
        assert!(status.success(), "building abide failed");
        let bin = profile_dir.join("abide");
        assert!(bin.exists(), "abide binary missing at {}", bin.display());
        bin
    })
    .clone()
}

/// What a finished `abide` process did.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (None if killed by a signal or the timeout).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// The signal that ended it (None if it exited, or the timeout killed it).
    pub signal: Option<i32>,
}

impl Outcome {
    /// Lines the guest printed (`guest: ...`), parsed.
    pub fn guest_lines(&self) -> Vec<GuestLine> {
        self.stdout.lines().filter_map(GuestLine::parse).collect()
    }

    /// Guest lines with `topic`.
    pub fn topic(&self, topic: &str) -> Vec<GuestLine> {
        self.guest_lines()
            .into_iter()
            .filter(|l| l.topic == topic)
            .collect()
    }

    /// The one guest line with `topic`; panics with the output otherwise.
    pub fn one(&self, topic: &str) -> GuestLine {
        let mut v = self.topic(topic);
        assert_eq!(v.len(), 1, "expected one '{topic}' line\n{self}");
        v.remove(0)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit={:?} signal={:?} timed_out={} elapsed={:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.signal, self.timed_out, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// One `guest: <topic> k=v k=v` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLine {
    /// First word after `guest:`.
    pub topic: String,
    /// `key=value` pairs.
    pub fields: BTreeMap<String, String>,
}

impl GuestLine {
    /// Parses a line; None if it is not a guest report line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim_end_matches('\r').strip_prefix("guest: ")?;
        let mut words = rest.split(' ');
        let topic = words.next()?.to_string();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Self { topic, fields })
    }

    /// A field's value; panics if missing.
    pub fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("field '{key}' missing in {self:?}"))
    }

    /// A decimal or 0x-hex field as u64.
    pub fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        let parsed = match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => v.parse(),
        };
        parsed.unwrap_or_else(|_| panic!("field '{key}'='{v}' is not a number"))
    }
}

/// Lines of a test guest's serial log that do not depend on time (no
/// `rtc` or `tick` lines, no `ticks=` fields): two runs of the same
/// workload, however interrupted, must give the same ones.
pub fn stable_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let Some(g) = GuestLine::parse(l) else {
                return false;
            };
            !matches!(g.topic.as_str(), "rtc" | "tick") && !l.contains("ticks=")
        })
        .map(str::to_string)
        .collect()
}

/// The round numbers of the complete `progress round=N sum=...` lines.
pub fn progress_rounds(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(GuestLine::parse)
        .filter(|l| l.topic == "progress" && l.fields.contains_key("sum"))
        .map(|l| l.num("round"))
        .collect()
}

/// The block the guest writes in iteration `i` of `blk-loop` (the guest's
/// xorshift64 pattern).
pub fn blk_loop_block(i: u64) -> Vec<u8> {
    let mut x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(4096);
    for _ in 0..512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Checks a `blk-loop=ITERS` run whose serial output (of one or more
/// processes, joined) is `joined` and whose disk ended up in `image`:
/// every iteration ran exactly once, in order, and verified; the loop
/// ended with errors=0; every block holds what the guest wrote last.
pub fn check_blk_loop(joined: &str, iters: u64, image: &Path) {
    let mut seen: Vec<u64> = joined
        .lines()
        .filter_map(GuestLine::parse)
        .filter(|l| l.topic == "blk-loop" && l.fields.contains_key("iter"))
        .map(|l| {
            assert_eq!(l.get("ok"), "1", "iteration failed: {l:?}");
            l.num("iter")
        })
        .collect();
    let n = seen.len();
    seen.dedup();
    assert_eq!(n, seen.len(), "an iteration ran twice");
    assert_eq!(seen, (0..iters).collect::<Vec<_>>(), "iterations lost");
    assert!(
        joined.contains(&format!("guest: blk-loop done iters={iters} errors=0")),
        "{joined}"
    );
    let image = std::fs::read(image).expect("image");
    for block in 0..64u64 {
        let last = (0..iters).rev().find(|i| i % 64 == block).expect("written");
        let at = (block * 4096) as usize;
        assert!(
            image[at..at + 4096] == blk_loop_block(last)[..],
            "block {block} does not hold iteration {last}'s data"
        );
    }
}

/// Runs `abide` with `args`, feeding `stdin`, killing it after `timeout`.
pub fn run_abide(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Outcome {
    run_command(Command::new(abide_bin()).args(args), stdin, timeout)
}

/// `abide snapshot --stop` of the abide whose control socket is `api`,
/// to `path`.
pub fn snapshot_and_stop(api: &Path, path: &Path) -> Outcome {
    let (api, path) = (api.display().to_string(), path.display().to_string());
    run_abide(
        &["snapshot", "--stop", "--api-socket", &api, &path],
        None,
        Duration::from_secs(120),
    )
}

/// Runs a command with a timeout, capturing output.
pub fn run_command(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn process");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            timed_out = true;
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Outcome {
        code: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        stdout,
        stderr,
        elapsed: start.elapsed(),
        timed_out,
        signal: if timed_out {
            None
        } else {
            status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s))
        },
    }
}

/// A fresh temporary directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("abide-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Says `what` on stderr past the test harness's output capture, so that
/// `./test.sh` shows it even when the test passes: for what a test could not
/// check here and why.
pub fn report(what: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "abide-tests: {what}");
}

/// Whether /dev/kvm here is PVM (software virtualization; kvm_pvm loaded).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Whether this host has hardware virtualization (vmx or svm).
pub fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Host wall-clock time, seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A file of the Linux test guest (`.cache/linux/guest/NAME`), which
/// `./test.sh` builds.
pub fn guest_file(name: &str) -> PathBuf {
    let p = repo_root().join(".cache/linux/guest").join(name);
    assert!(
        p.exists(),
        "{} is missing: run resources/linux/fetch-kernels.sh and \
         resources/linux/build-guest-initramfs.sh (./test.sh does both)",
        p.display()
    );
    p
}

/// SHA-256 of `bytes`, lowercase hex (coreutils' `sha256sum`).
pub fn sha256_bytes(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(bytes)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    first_word(&out.stdout)
}

/// SHA-256 of the file at `path`, lowercase hex; panics naming the file
/// when it cannot be read.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(
        out.status.success(),
        "cannot hash {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    first_word(&out.stdout)
}

fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .expect("sha256sum printed a hash")
        .to_string()
}

/// The text of a guest's serial log file so far (empty if none yet).
pub fn read_serial(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Waits until the serial log `serial` of the abide process `child`
/// contains `needle`. Panics, showing the log (and abide's stderr when it
/// exited), if abide exits first or `timeout` passes.
pub fn wait_for_serial(child: &mut Child, serial: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while !read_serial(serial).contains(needle) {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "abide exited ({status}) before the guest printed '{needle}'\n{}\n{err}",
                read_serial(serial)
            );
        }
        assert!(
            start.elapsed() < timeout,
            "no '{needle}' within {timeout:?}\n{}",
            read_serial(serial)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reading the output of a Linux guest session script (tests/tests/linux_*.rs):
/// `host: key=value` lines, `@@@ begin NAME` ... `@@@ end NAME rc=` sections
/// and the guest's `abide-linux: ` lines.
pub mod session {
    use std::io::Write;
    use std::process::Command;
    use std::time::Duration;

    use super::{now, repo_root, run_command, Outcome};

    /// Runs a session script with `sh -c` where Linux guests run (directly
    /// or in the nested test host), within `budget` seconds plus margins;
    /// asserts that it succeeded and shows its `host:` lines. 125 means the
    /// nested host itself failed (its reason is on stderr); 1 a step of the
    /// script (`host: failed: ...`, logs follow).
    pub fn run_session(script: &str, budget: u64, what: &str) -> Outcome {
        run_session_runs(script, budget, what, RUNS)
    }

    /// [`run_session`] with at most `runs` runs ([`run_where_linux_runs_runs`]).
    pub fn run_session_runs(script: &str, budget: u64, what: &str, runs: u32) -> Outcome {
        let start = now();
        let out = run_where_linux_runs_runs(&["sh", "-c", script], budget + 40, what, runs);
        eprintln!(
            "{} (session {} s)",
            out.stderr.lines().next().unwrap_or(""),
            now() - start
        );
        assert_eq!(out.code, Some(0), "the {what} session failed\n{out}");
        for l in out.stdout.lines().filter(|l| l.starts_with("host: ")) {
            eprintln!("{l}");
        }
        out
    }

    /// Runs `command` where Linux guests run (`resources/linux/run-direct-or-nested.sh`:
    /// directly with vmx/svm, otherwise in the nested test host), with a
    /// timeout of `timeout_s` seconds inside and 20 s more outside.
    ///
    /// The command runs once more, with the first run's output printed in
    /// full, after one of the nested test host's known defects, and only
    /// then:
    /// - the nested host itself crashed (its kernel panicked or it
    ///   triple-faulted: `run.sh` says `TEST HOST CRASHED` after showing
    ///   the evidence; seen twice in CI on 3 December 2026, the host
    ///   stopped 11-14 s in, during a guest's boot), or hung (its kernel
    ///   reported a CPU stuck for a minute or more, and `run.sh`'s
    ///   watchdog stopped it; CI on 4 December 2026);
    /// - in the nested host, a guest's vCPU triple-faulted ([`NESTED_GUEST_CRASH`]):
    ///   QEMU TCG's emulated AMD-V does that to multi-vCPU Linux guests
    ///   now and then (resources/linux/README.md, "The nested test host").
    ///
    /// - in the nested host, a guest hung: its kernel reported a stall
    ///   ([`NESTED_GUEST_STALL`]; CI on 4 December 2026: "rcu_preempt
    ///   kthread timer wakeup didn't happen" on a 2-vCPU guest), or the
    ///   session timed out waiting for it (the nested host's own timeout
    ///   included, and a case that waited in vain and killed its VMM:
    ///   `host: NAME found=no exited=no ...`), or a VMM got stuck in the
    ///   nested host's kernel so that SIGKILL did not end it
    ///   (`host: NAME unkillable: ...`).
    ///
    /// If the second run ends with the test host crashed again, a third
    /// and last run follows; no other failure gets a third.
    /// ([`run_where_linux_runs_runs`] sets how many runs.)
    ///
    /// A real fault of Abide repeats and fails the second run too. Any other
    /// failure, and anything where Linux runs directly, counts at once.
    pub fn run_where_linux_runs(command: &[&str], timeout_s: u64, what: &str) -> Outcome {
        run_where_linux_runs_runs(command, timeout_s, what, RUNS)
    }

    /// How many runs a session gets at most by default
    /// ([`run_where_linux_runs_runs`]).
    pub const RUNS: u32 = 3;

    /// What `resources/nested/run.sh` says when the nested host itself
    /// crashed or hung (after showing the evidence).
    pub const NESTED_HOST_CRASHED: &str = "abide-nested: TEST HOST CRASHED";

    /// [`run_where_linux_runs`] with at most `runs` runs in all: a crash of
    /// the test host itself gets another run up to the last, a guest's
    /// crash or stall in the nested host up to the one before (with
    /// [`RUNS`], as [`run_where_linux_runs`]: one more run for a guest,
    /// two more for the host).
    pub fn run_where_linux_runs_runs(
        command: &[&str],
        timeout_s: u64,
        what: &str,
        runs: u32,
    ) -> Outcome {
        let attempt = || {
            run_command(
                Command::new(repo_root().join("resources/linux/run-direct-or-nested.sh"))
                    .args(["--timeout", &timeout_s.to_string(), "--"])
                    .args(command)
                    .current_dir(repo_root()),
                None,
                Duration::from_secs(timeout_s + 20),
            )
        };
        let mut out = attempt();
        // The last run only after the test host itself crashed (twice in a
        // row in one CI run on 4 December 2026: a hang, then a panic);
        // the host's watchdog ends such a run within about a minute.
        for run in 2..=runs {
            let host_crashed = out.code == Some(125) && out.stderr.contains(NESTED_HOST_CRASHED);
            let why = if host_crashed {
                "the nested test host crashed (not the command)"
            } else if run == runs {
                return out;
            } else if !crate::host_has_hw_virt() && nested_guest_crashed(&out) {
                "a guest's vCPU triple-faulted in the nested test host, a known defect of its \
                 emulated AMD-V (see resources/linux/README.md)"
            } else if !crate::host_has_hw_virt() && nested_guest_stalled(&out) {
                "a guest stopped making progress in the nested test host (its kernel reported \
                 a stall, or the session waited in vain), a known defect of its emulated AMD-V \
                 (see resources/linux/README.md)"
            } else {
                return out;
            };
            eprintln!(
                "RUNNING THE {what} SESSION ONCE MORE (run {run} of at most {runs}): {why}; \
                 the previous run's output:\n{out}"
            );
            // The test harness keeps what eprintln! writes to itself unless
            // the test fails; this goes straight to stderr, so that a CI log
            // shows every rerun, of passing tests too, with its evidence.
            let _ = writeln!(
                std::io::stderr(),
                "abide-tests: RERUN of the {what} session (run {run} of at most {runs}): {why}\n{}",
                rerun_evidence(&out, what, run - 1)
            );
            out = attempt();
        }
        out
    }

    /// The lines of a failed run that say what happened (Abide's errors and
    /// the registers of a crashed vCPU, the session's `host:` lines, the
    /// nested host's verdict, a guest kernel's stall reports), at most 24,
    /// and where the whole output is kept (`target/nested-reruns/`).
    fn rerun_evidence(out: &Outcome, what: &str, run: u32) -> String {
        const SAYS: &[&str] = &[
            "error",
            "triple fault",
            "rip=",
            "host: ",
            NESTED_HOST_CRASHED,
        ];
        let says = |l: &str| SAYS.iter().chain(NESTED_GUEST_STALL).any(|w| l.contains(w));
        let mut lines: Vec<String> = out
            .stderr
            .lines()
            .chain(out.stdout.lines())
            .filter(|l| says(l))
            .take(24)
            .map(|l| format!("  | {l}"))
            .collect();
        let name: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = repo_root()
            .join("target/nested-reruns")
            .join(format!("{name}-run{run}.log"));
        let kept = std::fs::create_dir_all(path.parent().expect("has a parent"))
            .and_then(|()| std::fs::write(&path, out.to_string()));
        lines.push(match kept {
            Ok(()) => format!("  the whole output of run {run}: {}", path.display()),
            Err(e) => format!(
                "  (could not keep run {run}'s output in {}: {e})",
                path.display()
            ),
        });
        lines.join("\n")
    }

    #[test]
    fn a_rerun_shows_its_evidence_and_keeps_the_whole_output() {
        let out = Outcome {
            code: Some(1),
            stdout: "chatter\nhost: net found=no exited=yes rc=1 seconds=40\n".into(),
            stderr: format!(
                "Error: vCPU 0 {NESTED_GUEST_CRASH}\n  rip=0x000000000000fff0 rsp=0x0\nnoise\n"
            ),
            elapsed: Duration::from_secs(40),
            timed_out: false,
            signal: None,
        };
        let said = rerun_evidence(&out, "unit test: evidence", 1);
        assert!(
            said.contains("  | Error: vCPU 0 shut down (triple fault)"),
            "{said}"
        );
        assert!(said.contains("  | host: net found=no"), "{said}");
        assert!(said.contains("rip=0x000000000000fff0"), "{said}");
        assert!(
            !said.contains("chatter") && !said.contains("noise"),
            "{said}"
        );
        let path = repo_root().join("target/nested-reruns/unit-test--evidence-run1.log");
        assert!(said.contains(&path.display().to_string()), "{said}");
        let kept = std::fs::read_to_string(&path).expect("the whole output is kept");
        assert_eq!(kept, out.to_string());
        let _ = std::fs::remove_file(&path);
    }

    /// What Abide prints when a guest's vCPU triple-faulted.
    pub const NESTED_GUEST_CRASH: &str = "shut down (triple fault): the guest crashed";

    fn nested_guest_crashed(out: &Outcome) -> bool {
        out.stdout.contains(NESTED_GUEST_CRASH) || out.stderr.contains(NESTED_GUEST_CRASH)
    }

    /// What a guest kernel prints when a CPU's timer or IPIs stopped
    /// arriving (RCU and lockup detectors).
    pub const NESTED_GUEST_STALL: &[&str] = &[
        "rcu: INFO: rcu_",
        "detected stalls on CPUs",
        "self-detected stall",
        "soft lockup",
        "hard LOCKUP",
    ];

    /// A guest that hung: its kernel says so (whatever the session's exit
    /// code, as the console is asserted on afterwards), a session case
    /// waited in vain for it and killed it, its VMM could not be killed,
    /// or the session failed waiting for the guest (`host: failed: no
    /// '...' within`) or ran out of time.
    fn nested_guest_stalled(out: &Outcome) -> bool {
        let said = |s: &str| NESTED_GUEST_STALL.iter().any(|w| s.contains(w));
        let host_line = |p: &dyn Fn(&str) -> bool| {
            out.stdout
                .lines()
                .filter_map(|l| l.strip_prefix("host: "))
                .any(p)
        };
        said(&out.stdout)
            || said(&out.stderr)
            // A VMM stuck in the nested host's kernel: SIGKILL does not end
            // it (a session script's `host: NAME unkillable: ...`).
            || host_line(&|l| l.contains(" unkillable: "))
            // A case of a session that waited in vain for its guest and
            // then killed it (`run_case` in tests/tests/linux_firmware.rs).
            || host_line(&|l| l.contains(" found=no exited=no "))
            || (out.code != Some(0)
                && (out.timed_out
                    || out.stderr.contains(NESTED_HOST_TIMEOUT)
                    || host_line(&|l| l.starts_with("failed: no '"))))
    }

    /// What `resources/nested/run.sh` says when the command inside did not
    /// finish within its `--timeout`.
    pub const NESTED_HOST_TIMEOUT: &str = "abide-nested: error: timed out after";

    /// Asserts that no line of the guest console `log` shows kernel
    /// trouble ([`KERNEL_TROUBLE`]).
    pub fn assert_no_kernel_trouble(name: &str, log: &str) {
        for l in log.lines() {
            assert!(
                !KERNEL_TROUBLE.iter().any(|w| l.contains(w)),
                "kernel trouble on the {name} console: {l}\n{log}"
            );
        }
    }
    /// The text between `@@@ begin NAME` and `@@@ end NAME rc=`, and the rc.
    pub fn section<'a>(out: &'a str, name: &str) -> (&'a str, String) {
        let begin = format!("@@@ begin {name}\n");
        let end = format!("@@@ end {name} rc=");
        let from = out
            .find(&begin)
            .unwrap_or_else(|| panic!("no section {name} in the session's output\n{out}"))
            + begin.len();
        let rest = &out[from..];
        let to = rest
            .find(&end)
            .unwrap_or_else(|| panic!("section {name} has no end\n{out}"));
        let rc = rest[to + end.len()..].lines().next().unwrap_or("").trim();
        (&rest[..to], rc.to_string())
    }

    /// The value of the session's `host: KEY=value` line.
    pub fn host_field<'a>(out: &'a str, key: &str) -> &'a str {
        let prefix = format!("host: {key}=");
        out.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("the session did not report {key}\n{out}"))
    }

    /// `A..B` from a host window line.
    pub fn window(out: &str, key: &str) -> (i64, i64) {
        let w = host_field(out, key);
        let (a, b) = w
            .split_once("..")
            .unwrap_or_else(|| panic!("{key}={w} is not A..B"));
        (
            a.parse().expect("window start"),
            b.parse().expect("window end"),
        )
    }

    /// The rest of the guest's `abide-linux: PREFIX` line (one of them; the
    /// echoed command lines start with the shell prompt, not with this).
    pub fn guest<'a>(log: &'a str, prefix: &str) -> &'a str {
        let prefix = format!("abide-linux: {prefix}");
        log.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("the guest did not print '{prefix}'\n{log}"))
    }

    /// `key=value` from a line of space-separated pairs.
    pub fn word<'a>(line: &'a str, key: &str) -> &'a str {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
    }

    /// Kernel messages that mean something went wrong in the guest.
    pub const KERNEL_TROUBLE: &[&str] = &[
        "WARNING:",
        "BUG:",
        "soft lockup",
        "hard LOCKUP",
        "rcu: INFO",
        "detected stall",
        "self-detected stall",
        "blocked for more than",
        "Call Trace",
        "Oops",
        "Kernel panic",
        "clocksource: timekeeping watchdog",
        "Marking clocksource",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let l = GuestLine::parse("guest: cpu index=1 apic_id=0x2 online=1").expect("line");
        assert_eq!(l.topic, "cpu");
        assert_eq!(l.num("index"), 1);
        assert_eq!(l.num("apic_id"), 2);
        assert!(GuestLine::parse("Linux version 6.1").is_none());
    }
}

/// A tap device made for one test and removed when dropped.
pub struct Tap(pub String);

impl Tap {
    /// Creates tap `name` (needs root and /dev/net/tun); panics saying
    /// which test case cannot run otherwise.
    pub fn create(name: &str, case: &str) -> Self {
        let ok = Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", "tap"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "cannot create tap device {name} (needs root and /dev/net/tun): {case} cannot run here"
        );
        Self(name.to_string())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
            .status();
    }
}

/// The header of a snapshot file (not checked) and its section payloads,
/// for tests that look inside or edit snapshots.
#[derive(Clone, Debug)]
pub struct SnapshotParts {
    /// The header JSON.
    pub header: serde_json::Value,
    /// Each section's payload, in section table order.
    pub payloads: Vec<Vec<u8>>,
}

impl SnapshotParts {
    /// The payload of the first section whose name starts with `prefix`,
    /// with its table entry.
    pub fn section(&self, prefix: &str) -> Option<(&serde_json::Value, &[u8])> {
        let sections = self.header["sections"].as_array()?;
        let i = sections
            .iter()
            .position(|s| s["name"].as_str().is_some_and(|n| n.starts_with(prefix)))?;
        Some((&sections[i], &self.payloads[i]))
    }
}

/// A 64 KiB option ROM written to `DIR/pxe.rom` for a NIC on `tap`:
/// (the file, its bytes, the `--net` argument).
pub fn rom_nic(dir: &Path, tap: &str, fill: u8) -> (PathBuf, Vec<u8>, String) {
    let rom = dir.join("pxe.rom");
    let image = rom_image(64 << 10, fill);
    std::fs::write(&rom, &image).expect("write the ROM file");
    let net = format!("tap={tap},rom={}", rom.display());
    (rom, image, net)
}

/// A PCI option ROM image of `len` bytes: the 0x55 0xAA signature, then
/// `fill`.
pub fn rom_image(len: usize, fill: u8) -> Vec<u8> {
    let mut image = vec![fill; len];
    image[0] = 0x55;
    image[1] = 0xaa;
    image
}

/// Splits a snapshot file into its header and section payloads.
pub fn split_snapshot(bytes: &[u8]) -> SnapshotParts {
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("len")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[12..12 + len]).expect("header");
    let payloads = header["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .map(|s| {
            let o = s["offset"].as_u64().expect("offset") as usize;
            let l = s["length"].as_u64().expect("length") as usize;
            bytes[o..o + l].to_vec()
        })
        .collect();
    SnapshotParts { header, payloads }
}
