//! Live migration on /dev/kvm with the test guest: a running guest moves
//! from one `abide run` to an `abide receive` over a Unix socket or TCP on
//! loopback, mid-workload, mid-I/O, while dirtying memory; and every way a
//! migration can fail before its commit leaves the source running as if
//! nothing happened, while the destination exits non-zero without having
//! run the guest.
//!
//! The destination's deliberate deaths use the test-only fault hook
//! `ABIDE_TEST_MIGRATION_FAULT` (README, "Live migration").

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abide_tests::{
    abide_bin, check_blk_loop, progress_rounds, rom_nic, run_abide, sha256_bytes, split_snapshot,
    stable_lines, temp_dir, GuestLine, Outcome, Tap,
};
use serde_json::Value;

// Generous: only a hang waits this long, and a 2-core host shared with
// other builds slowed the 1500-round dirtying reference to 892 rounds in
// 120 s (load average 22-26).
const TIMEOUT: Duration = Duration::from_secs(400);

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// An abide process (a source `run` or a destination `receive`) with its
/// COM1 in a file (or piped, with arrival times), its stderr in a file and
/// a control socket.
struct Abide {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
    lines: Option<Lines>,
}

/// Console lines with the time each arrived.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

impl Abide {
    fn spawn(dir: &Path, tag: &str, args: &[&str], env: &[(&str, &str)], piped: bool) -> Self {
        let api = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.log"));
        let stderr = dir.join(format!("{tag}.err"));
        let mut cmd = Command::new(abide_bin());
        cmd.args(args).arg("--api-socket").arg(&api).arg("--serial");
        if piped {
            cmd.arg("stdio").stdout(Stdio::piped());
        } else {
            cmd.arg(format!("file:{}", serial.display()))
                .stdout(Stdio::null());
        }
        cmd.stdin(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start abide");
        let lines = child.stdout.take().map(|out| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            let file = serial.clone();
            std::thread::spawn(move || {
                let mut log = std::fs::File::create(file).expect("serial copy");
                let mut r = BufReader::new(out);
                let mut l = String::new();
                // A line cut by the migration ends without '\n' here and
                // is completed by the destination: it is kept as it came.
                while r.read_line(&mut l).is_ok_and(|n| n > 0) {
                    let _ = log.write_all(l.as_bytes());
                    sink.lock()
                        .expect("lines")
                        .push((Instant::now(), std::mem::take(&mut l)));
                }
            });
            lines
        });
        Self {
            child,
            api,
            serial,
            stderr,
            lines,
        }
    }

    /// `abide run ARGS` on pc-1.0.
    fn source(dir: &Path, args: &[&str]) -> Self {
        let mut all = vec!["run", "--machine", "pc-1.0"];
        all.extend_from_slice(args);
        Self::spawn(dir, "source", &all, &[], false)
    }

    /// `abide receive --listen LISTEN EXTRA`; waits until it listens and
    /// returns the address to migrate to (the real port for `tcp:...:0`).
    fn destination(
        dir: &Path,
        tag: &str,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, String) {
        let mut all = vec!["receive", "--listen", listen];
        all.extend_from_slice(extra);
        let mut d = Self::spawn(dir, tag, &all, env, false);
        let line = d.wait_stderr("abide: listening for an incoming migration on ");
        let at = line.rsplit(' ').next().expect("address").trim().to_string();
        (d, at)
    }

    fn text(&self) -> String {
        read(&self.serial)
    }

    fn err_text(&self) -> String {
        read(&self.stderr)
    }

    /// Waits until the serial log has a line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "abide exited ({status}) before the guest printed '{needle}'\n{}\n{}",
                    self.text(),
                    self.err_text()
                );
            }
            assert!(start.elapsed() < TIMEOUT, "no '{needle}'\n{}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a whole console line (its newline written) starts
    /// with `prefix`: the guest writes a line byte by byte, so text that
    /// merely contains the prefix may end in the middle of it.
    fn wait_for_line(&mut self, prefix: &str) {
        self.wait_for(prefix);
        let start = Instant::now();
        while !self
            .text()
            .split_inclusive('\n')
            .any(|l| l.starts_with(prefix) && l.ends_with('\n'))
        {
            assert!(
                start.elapsed() < TIMEOUT,
                "no whole line '{prefix}...'\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a stderr line starting with `prefix`; returns it.
    fn wait_stderr(&mut self, prefix: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.err_text().lines().find(|l| l.starts_with(prefix)) {
                return l.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "abide exited ({status}) before '{prefix}'\n{}",
                    self.err_text()
                );
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "no '{prefix}'\n{}",
                self.err_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end; its exit code (None: a signal).
    fn wait_exit(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "abide did not exit\n{}\n{}",
                self.text(),
                self.err_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn ctl(&self, request: &str) -> Value {
        let out = run_abide(
            &[
                "ctl",
                "--api-socket",
                self.api.to_str().expect("utf-8"),
                request,
            ],
            None,
            TIMEOUT,
        );
        if out.code != Some(0) {
            let text = self.text();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            panic!(
                "ctl {request}\n{out}\nthis abide's stderr:\n{}\nits last console lines: {tail:?}",
                self.err_text()
            );
        }
        serde_json::from_str(out.stdout.trim()).expect("JSON reply")
    }

    /// Number of complete progress rounds in the serial log.
    fn rounds(&self) -> usize {
        progress_rounds(&self.text()).len()
    }
}

impl Drop for Abide {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `abide migrate` of the abide at `api` to `to`.
fn migrate(api: &Path, to: &str, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "migrate",
        "--api-socket",
        api.to_str().expect("utf-8"),
        "--to",
        to,
    ];
    args.extend_from_slice(extra);
    run_abide(&args, None, TIMEOUT)
}

/// The JSON result `abide migrate` printed.
fn result(out: &Outcome) -> Value {
    let last = out.stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON result ({e})\n{out}"))
}

/// The serial log of an uninterrupted run of `cmdline`.
fn reference(dir: &Path, cmdline: &str, extra: &[&str]) -> String {
    let log = dir.join("reference.log");
    let ser = format!("file:{}", log.display());
    let mut args = vec!["run", "--machine", "pc-1.0", "--serial", &ser];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", cmdline]);
    let out = run_abide(&args, None, TIMEOUT);
    assert_eq!(out.code, Some(0), "reference run\n{out}");
    read(&log)
}

const BASE: [&str; 4] = ["--cpus", "2", "--memory", "256M"];

/// Migrates the checksum workload mid-run to `listen`; the joined output
/// of the two processes must be the uninterrupted run's, every round
/// exactly once.
fn checksum_workload_moves(tag: &str, listen: &str) {
    let dir = temp_dir(tag);
    let workload = "quiet rounds=1500 progress buf-kib=4096";
    let want = reference(&dir, workload, &BASE);
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--cmdline", workload]);
    let mut src = Abide::source(&dir, &args);
    let listen = listen.replace("@DIR@", &dir.display().to_string());
    let (mut dst, to) = Abide::destination(&dir, "dest", &listen, &[], &[]);
    src.wait_for("guest: progress round=40 ");
    let out = migrate(&src.api, &to, &[]);
    assert_eq!(out.code, Some(0), "abide migrate\n{out}");
    let r = result(&out);
    eprintln!("{tag}: {r}");
    assert_eq!(r["status"], "migrated", "{r}");
    for key in ["downtime_ms", "destination_downtime_ms", "total_ms"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    assert!(r["downtime_ms"].as_f64() <= r["total_ms"].as_f64(), "{r}");
    for key in ["iterations", "bytes", "pages_resent"] {
        assert!(r[key].is_u64(), "{key}: {r}");
    }
    // The first pass carries the 4 MiB workload buffer; the untouched rest
    // of the 256 MiB is never sent.
    let bytes = r["bytes"].as_u64().expect("bytes");
    assert!(bytes > 4 << 20 && bytes < 64 << 20, "{bytes} bytes sent");
    assert!(
        out.stderr.contains("abide: migration pass 0: "),
        "progress lines on stderr\n{out}"
    );
    assert_eq!(
        src.wait_exit(),
        Some(0),
        "the source exits 0 after moving\n{}",
        src.err_text()
    );
    assert!(!src.api.exists(), "the source's API socket is removed");
    assert_eq!(
        dst.wait_exit(),
        Some(0),
        "the guest powers off at the destination\n{}",
        dst.err_text()
    );
    assert!(
        dst.err_text().contains("the guest runs here"),
        "{}",
        dst.err_text()
    );
    let joined = format!("{}{}", src.text(), dst.text());
    assert_eq!(progress_rounds(&joined), (0..1500).collect::<Vec<_>>());
    assert!(
        progress_rounds(&dst.text()).len() > 100,
        "the destination ran the rest"
    );
    assert_eq!(
        stable_lines(&joined),
        stable_lines(&want),
        "migrated output must equal the uninterrupted run's"
    );
}

/// The guest keeps the option ROM it booted with across a migration: the
/// host's ROM file changes before the migration, the destination serves the
/// image the source sent (a snapshot taken there carries it).
#[test]
fn the_option_rom_travels_with_the_migration() {
    let dir = temp_dir("mig-rom");
    let pid = std::process::id() % 10_000;
    let (t1, t2) = (format!("abms{pid}"), format!("abmd{pid}"));
    let _t1 = Tap::create(&t1, "the option-ROM migration case");
    let _t2 = Tap::create(&t2, "the option-ROM migration case");
    let (rom, booted, net) = rom_nic(&dir, &t1, 0x33);
    let mut src = Abide::source(
        &dir,
        &[
            "--memory",
            "128M",
            "--net",
            &net,
            "--cmdline",
            "quiet rounds=1 buf-kib=64 spin",
        ],
    );
    src.wait_for("guest: tick n=1");
    let mut updated = booted.clone();
    updated[4000] ^= 0xff;
    std::fs::write(&rom, &updated).expect("rom");
    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let tap = format!("1={t2}");
    let (mut dst, to) = Abide::destination(&dir, "dest", &listen, &["--tap", &tap], &[]);
    let out = migrate(&src.api, &to, &[]);
    assert_eq!(
        out.code,
        Some(0),
        "abide migrate\n{out}\n{}",
        dst.err_text()
    );
    assert_eq!(src.wait_exit(), Some(0), "{}", src.err_text());
    dst.wait_for("guest: tick n=");
    let snap = dir.join("dest.snap");
    let out = abide_tests::snapshot_and_stop(&dst.api, &snap);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(dst.wait_exit(), Some(0), "{}", dst.err_text());
    let parts = split_snapshot(&std::fs::read(&snap).expect("read"));
    let (_, image) = parts.section("rom.").expect("rom section");
    assert!(
        image == booted.as_slice(),
        "the destination serves the source's image"
    );
    let manifest = parts.header["manifest"].to_string();
    assert!(
        manifest.contains(&sha256_bytes(&booted)),
        "the manifest describes it"
    );
    assert!(!manifest.contains(&sha256_bytes(&updated)));
}

#[test]
fn checksum_workload_migrates_over_a_unix_socket() {
    checksum_workload_moves("mig-unix", "unix:@DIR@/mig.sock");
}

#[test]
fn checksum_workload_migrates_over_tcp_loopback() {
    checksum_workload_moves("mig-tcp", "tcp:127.0.0.1:0");
}

/// The guest's own view of the downtime: its `spin` ticker (every 2 ms of
/// guest time) goes on at the destination with the next number, and the
/// gap between the last tick at the source and the first at the
/// destination is the pause as the guest lived it.
#[test]
fn downtime_is_reported_by_both_sides_and_seen_by_the_guest() {
    let dir = temp_dir("mig-downtime");
    let mut args = vec!["run", "--machine", "pc-1.0", "--memory", "256M"];
    args.extend_from_slice(&["--cmdline", "quiet rounds=1 buf-kib=64 spin tick-us=2000"]);
    let mut src = Abide::spawn(&dir, "source", &args, &[], true);
    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Abide::spawn(&dir, "dest", &["receive", "--listen", &listen], &[], true);
    dst.wait_stderr("abide: listening");
    src.wait_for("guest: tick n=200");
    let out = migrate(&src.api, &listen, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    let r = result(&out);
    dst.wait_for("guest: tick n=");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.wait_exit(), Some(0));
    // The two consoles as one: a line the migration cut is completed by
    // the destination's first piece, and counts when it was completed.
    let lines = |a: &Abide| {
        a.lines
            .as_ref()
            .expect("piped")
            .lock()
            .expect("lines")
            .clone()
    };
    let mut joined: Vec<(Instant, String)> = Vec::new();
    let mut from_source = 0;
    for (i, part) in [lines(&src), lines(&dst)].into_iter().enumerate() {
        for (t, l) in part {
            match joined.last_mut() {
                Some((lt, last)) if !last.ends_with('\n') => {
                    last.push_str(&l);
                    *lt = t;
                }
                _ => joined.push((t, l)),
            }
        }
        if i == 0 {
            // Lines the source completed itself.
            from_source = joined.iter().filter(|(_, l)| l.ends_with('\n')).count();
        }
    }
    let ticks: Vec<(Instant, u64, usize)> = joined
        .iter()
        .enumerate()
        .filter_map(|(i, (t, l))| {
            GuestLine::parse(l.trim_end())
                .filter(|g| g.topic == "tick")
                .map(|g| (*t, g.num("n"), i))
        })
        .collect();
    let numbers: Vec<u64> = ticks.iter().map(|(_, n, _)| *n).collect();
    assert!(
        numbers == (1..=numbers.len() as u64).collect::<Vec<_>>(),
        "tick numbers across the two processes are not 1, 2, 3, ...: {numbers:?}"
    );
    // The last tick the source completed, and the next one.
    let last_src = ticks
        .iter()
        .rposition(|(_, _, i)| *i < from_source)
        .expect("ticks at the source");
    let (t1, n1, _) = ticks[last_src];
    let (t2, n2, _) = *ticks.get(last_src + 1).expect("ticks at the destination");
    assert_eq!(n2, n1 + 1);
    let gap_ms = (t2 - t1).as_secs_f64() * 1000.0;
    eprintln!(
        "downtime: source {} ms, destination {} ms; guest ticker gap {gap_ms:.1} ms (period 2 ms); total {} ms",
        r["downtime_ms"], r["destination_downtime_ms"], r["total_ms"]
    );
    dst.ctl("quit");
    assert_eq!(dst.wait_exit(), Some(0));
}

/// A guest that rewrites a 16 MiB buffer every round. With the default
/// limits it may converge or not; either way the result is consistent.
/// Throttled to 8 MiB/s with a 5 ms downtime limit it cannot converge:
/// the migration fails within --timeout, says why (dirty rate and
/// bandwidth), the API answered meanwhile, and the guest finishes its
/// workload correctly at the source.
#[test]
fn dirtying_guest_converges_or_fails_cleanly() {
    let dir = temp_dir("mig-dirty");
    // The workload must outlast the forced failure (6 s of --timeout) on
    // an idle host too: 400 rounds took 3.5 s there, and the guest then
    // powered off mid-migration. 1500 rounds take about 13 s idle, and
    // longer under load, when the guest slows down as well.
    let workload = "quiet rounds=1500 progress buf-kib=16384 dirty";
    // The reference runs meanwhile, in its own directory.
    let want = {
        let rdir = temp_dir("mig-dirty-ref");
        std::thread::spawn(move || reference(&rdir, workload, &BASE))
    };
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--cmdline", workload]);

    // Forced failure.
    let mut src = Abide::source(&dir, &args);
    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let (mut dst, to) = Abide::destination(&dir, "dest", &listen, &[], &[]);
    src.wait_for("guest: progress round=5 ");
    let api = src.api.clone();
    let t = Instant::now();
    let m = std::thread::spawn(move || {
        migrate(
            &api,
            &to,
            &[
                "--max-bandwidth",
                "8",
                "--max-downtime-ms",
                "5",
                "--timeout",
                "6",
            ],
        )
    });
    // The control API keeps answering during the migration.
    let mut seen_migrating = false;
    while !m.is_finished() {
        let s = src.ctl("status");
        if s["state"] == "migrating" {
            assert_eq!(s["migration"]["state"], "active", "{s}");
            seen_migrating = true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = m.join().expect("migrate thread");
    let elapsed = t.elapsed();
    assert!(seen_migrating, "status never showed the migration");
    assert_eq!(out.code, Some(1), "{out}");
    let r = result(&out);
    assert_eq!(r["status"], "failed", "{r}");
    let e = r["error"].as_str().expect("error");
    assert!(e.contains("dirty rate") && e.contains("bandwidth"), "{e}");
    assert!(e.contains("keeps running here"), "{e}");
    assert!(
        elapsed < Duration::from_secs(6 + 30),
        "bounded: {elapsed:?}"
    );
    assert_eq!(dst.wait_exit(), Some(1));
    assert!(
        dst.err_text()
            .contains("the source abandoned the migration"),
        "{}",
        dst.err_text()
    );
    assert!(dst.text().is_empty(), "the destination ran the guest");
    let s = src.ctl("status");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["migration"]["state"], "failed", "{s}");
    assert_eq!(src.wait_exit(), Some(0), "{}", src.err_text());
    let want = want.join().expect("reference run");
    assert_eq!(stable_lines(&src.text()), stable_lines(&want));

    // Default limits: converges or fails; either way the workload ends
    // right exactly once.
    let dir = temp_dir("mig-dirty-default");
    let mut src = Abide::source(&dir, &args);
    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let (mut dst, to) = Abide::destination(&dir, "dest", &listen, &[], &[]);
    src.wait_for("guest: progress round=5 ");
    let out = migrate(&src.api, &to, &[]);
    let r = result(&out);
    eprintln!("dirtying guest, default limits: {r}");
    assert_eq!(src.wait_exit(), Some(0));
    let joined = if r["status"] == "migrated" {
        assert_eq!(out.code, Some(0), "{out}");
        assert_eq!(dst.wait_exit(), Some(0));
        format!("{}{}", src.text(), dst.text())
    } else {
        assert_eq!(out.code, Some(1), "{out}");
        let e = r["error"].as_str().expect("error");
        assert!(e.contains("dirty rate") && e.contains("bandwidth"), "{e}");
        assert_eq!(dst.wait_exit(), Some(1));
        src.text()
    };
    assert_eq!(progress_rounds(&joined), (0..1500).collect::<Vec<_>>());
    assert_eq!(stable_lines(&joined), stable_lines(&want));
}

/// The virtio-blk write/verify loop moves mid-I/O to a destination that
/// opens the same image (shared storage): every iteration exactly once and
/// verified, errors=0, and the image holds each block's last write.
#[test]
fn virtio_blk_loop_migrates_mid_io() {
    let dir = temp_dir("mig-blk");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    // 3000 iterations took 4 s on an idle host, close to what the
    // migration itself may take under load: the guest must still be
    // doing I/O when the migration ends.
    let iters = 10000u64;
    let cmdline = format!("quiet rounds=0 blk-loop={iters}");
    let d = format!("path={}", disk.display());
    let args = ["--memory", "256M", "--disk", &d, "--cmdline", &cmdline];
    let mut src = Abide::source(&dir, &args);
    let (mut dst, to) = Abide::destination(&dir, "dest", "tcp:127.0.0.1:0", &[], &[]);
    src.wait_for("guest: blk-loop iter=300 ");
    let out = migrate(&src.api, &to, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(src.wait_exit(), Some(0));
    assert_eq!(dst.wait_exit(), Some(0), "{}", dst.err_text());
    let joined = format!("{}{}", src.text(), dst.text());
    assert!(
        dst.text().contains("guest: blk-loop iter="),
        "the destination did I/O"
    );
    check_blk_loop(&joined, iters, &disk);
}

/// Forwards `from` to `to` (both ways) until `limit` bytes went from the
/// source, then drops both connections: a link that dies mid-memory.
fn dropping_proxy(
    listener: UnixListener,
    to: PathBuf,
    limit: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut a, _)) = listener.accept() else {
            return;
        };
        let Ok(mut b) = UnixStream::connect(&to) else {
            return;
        };
        let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut buf = vec![0u8; 65536];
        let mut sent = 0;
        while sent < limit {
            match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let n = n.min(limit - sent);
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
            }
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    })
}

/// One source survives every way a migration can fail before commit, and
/// a link that dies after commit, then finishes its workload with the
/// uninterrupted run's output and finally moves for real.
#[test]
fn failed_migrations_leave_the_source_running() {
    let dir = temp_dir("mig-fail");
    let workload = "quiet rounds=2000 progress buf-kib=4096 spin";
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let d = format!("path={}", disk.display());
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--disk", &d]);
    let want = reference(&dir, "quiet rounds=2000 progress buf-kib=4096", &args);
    args.extend_from_slice(&["--cmdline", workload]);
    let mut src = Abide::source(&dir, &args);
    src.wait_for("guest: progress round=20 ");
    let sock = |name: &str| dir.join(name).display().to_string();

    // After each failure: the migrate command failed with `needle`, the
    // source runs and its guest makes progress.
    let check = |src: &mut Abide, case: &str, out: &Outcome, needle: &str| {
        assert_eq!(out.code, Some(1), "{case}: migrate must fail\n{out}");
        assert!(
            out.stdout.contains(needle) || out.stderr.contains(needle),
            "{case}: expected '{needle}'\n{out}"
        );
        assert!(src.running(), "{case}: the source died\n{}", src.err_text());
        let s = src.ctl("status");
        assert_eq!(s["state"], "running", "{case}: {s}");
        let (r0, t0) = (src.rounds(), src.text().matches("guest: tick").count());
        let start = Instant::now();
        while src.rounds() == r0 && src.text().matches("guest: tick").count() == t0 {
            assert!(start.elapsed() < TIMEOUT, "{case}: the guest stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{case}: ok ({})", out.stderr.lines().last().unwrap_or(""));
    };

    // Nobody listens.
    let out = migrate(&src.api, &format!("unix:{}", sock("nobody.sock")), &[]);
    check(
        &mut src,
        "not listening (unix)",
        &out,
        "cannot connect to the destination",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = migrate(&src.api, &format!("tcp:127.0.0.1:{port}"), &[]);
    check(
        &mut src,
        "not listening (tcp)",
        &out,
        "cannot connect to the destination",
    );

    // Something that is not an abide answers with garbage.
    let l = UnixListener::bind(sock("garbage.sock")).expect("bind");
    let g = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
            let _ = s.read(&mut [0u8; 4096]);
        }
    });
    let out = migrate(&src.api, &format!("unix:{}", sock("garbage.sock")), &[]);
    check(
        &mut src,
        "garbage answer",
        &out,
        "malformed migration stream",
    );
    g.join().expect("garbage server");

    // A destination that reads an older layout of the device sections
    // (what it says in its accept): the source refuses before pausing the
    // guest, naming the section.
    let l = UnixListener::bind(sock("older.sock")).expect("bind");
    let o = std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else {
            return;
        };
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("header start");
        assert_eq!(&head[..8], b"ABIDEMIG");
        let len = u32::from_le_bytes(head[8..12].try_into().expect("len")) as usize;
        let mut rest = vec![0u8; len + 32];
        s.read_exact(&mut rest).expect("header");
        let reads = serde_json::json!({"abide_version": "0.0.9", "reads": {
            "abide_version": "0.0.9", "format": 1,
            "sections": {"vm": 1, "vcpu.": 1, "device.": 0, "pci.": 1, "memory.map": 1, "memory": 1}}});
        let body = serde_json::to_vec(&reads).expect("json");
        let mut frame = vec![b'K'];
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        s.write_all(&frame).expect("accept");
        let _ = s.read_to_end(&mut Vec::new());
    });
    let out = migrate(&src.api, &format!("unix:{}", sock("older.sock")), &[]);
    check(
        &mut src,
        "destination reads older sections",
        &out,
        "the destination cannot take this guest: Abide 0.0.9 reads section 'device.",
    );
    o.join().expect("older destination");

    // Garbage sent to a destination: it refuses and exits.
    let (mut dst, to) = Abide::destination(
        &dir,
        "d-garbage",
        &format!("unix:{}", sock("d1.sock")),
        &[],
        &[],
    );
    let mut c = UnixStream::connect(to.trim_start_matches("unix:")).expect("connect");
    let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(dst.wait_exit(), Some(1));
    assert!(
        dst.err_text().contains("not an Abide migration stream"),
        "{}",
        dst.err_text()
    );
    assert!(dst.text().is_empty());
    drop(c);

    // The destination refuses: its disk has another size.
    let big = dir.join("big.img");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(4 << 20))
        .expect("disk");
    let bigp = format!("1={}", big.display());
    let (mut dst, to) = Abide::destination(
        &dir,
        "d-refuse",
        &format!("unix:{}", sock("d2.sock")),
        &["--disk-path", &bigp],
        &[],
    );
    let out = migrate(&src.api, &to, &[]);
    check(
        &mut src,
        "refusal",
        &out,
        "the destination refused the migration",
    );
    assert!(
        out.stdout.contains(".virtio.config: "),
        "the source shows the diff\n{out}"
    );
    assert_eq!(dst.wait_exit(), Some(1));
    assert!(
        dst.err_text().contains("guest's ABI differs"),
        "{}",
        dst.err_text()
    );
    assert!(
        dst.err_text().contains(".virtio.config: "),
        "{}",
        dst.err_text()
    );

    // The destination dies while memory moves, and while state moves.
    for (n, fault, needle) in [
        (3, "kill-during-memory", "memory"),
        (4, "kill-during-state", "state"),
    ] {
        let (mut dst, to) = Abide::destination(
            &dir,
            fault,
            &format!("unix:{}", sock(&format!("d{n}.sock"))),
            &[],
            &[("ABIDE_TEST_MIGRATION_FAULT", fault)],
        );
        let out = migrate(&src.api, &to, &[]);
        check(&mut src, fault, &out, needle);
        assert_eq!(dst.wait_exit(), None, "{fault}: killed by its signal");
        assert!(
            dst.err_text().contains("test fault hook"),
            "{}",
            dst.err_text()
        );
        assert!(
            dst.text().is_empty(),
            "{fault}: the destination ran the guest"
        );
    }

    // The link drops mid-memory.
    let (mut dst, to) = Abide::destination(
        &dir,
        "d-drop",
        &format!("unix:{}", sock("d5.sock")),
        &[],
        &[],
    );
    let proxy = UnixListener::bind(sock("proxy.sock")).expect("proxy");
    let p = dropping_proxy(
        proxy,
        PathBuf::from(to.trim_start_matches("unix:")),
        1 << 20,
    );
    let out = migrate(&src.api, &format!("unix:{}", sock("proxy.sock")), &[]);
    check(
        &mut src,
        "connection dropped",
        &out,
        "migration stream failed",
    );
    p.join().expect("proxy");
    assert_eq!(dst.wait_exit(), Some(1));
    assert!(
        dst.err_text().contains("the peer closed the connection"),
        "{}",
        dst.err_text()
    );
    assert!(dst.text().is_empty());

    // The link dies after commit: the source stays paused and says so; the
    // operator (here: seeing the destination gone) resumes it.
    let (mut dst, to) = Abide::destination(
        &dir,
        "d-commit",
        &format!("unix:{}", sock("d6.sock")),
        &[],
        &[("ABIDE_TEST_MIGRATION_FAULT", "kill-after-commit")],
    );
    let out = migrate(&src.api, &to, &[]);
    assert_eq!(out.code, Some(1), "{out}");
    let r = result(&out);
    assert_eq!(r["status"], "unconfirmed", "{r}");
    assert_eq!(dst.wait_exit(), None);
    let s = src.ctl("status");
    assert_eq!(
        s["state"], "paused",
        "the source must not resume by itself: {s}"
    );
    assert_eq!(s["migration"]["state"], "unconfirmed", "{s}");
    assert!(
        s["migration"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("abide ctl resume")),
        "{s}"
    );
    let r0 = src.rounds();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(src.rounds(), r0, "a paused guest made progress");
    assert_eq!(src.ctl("resume")["state"], "running");

    // The workload ends with the uninterrupted run's rounds and checksum.
    src.wait_for_line("guest: user cpl=3");
    let work = |t: &str| -> Vec<String> {
        stable_lines(t)
            .into_iter()
            .filter(|l| l.starts_with("guest: progress ") || l.starts_with("guest: user "))
            .collect()
    };
    let (got, want) = (work(&src.text()), work(&want));
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        got == want,
        "the source's workload differs from the uninterrupted run's: {} lines vs {}, first difference at {first_diff:?}: {:?} vs {:?}",
        got.len(),
        want.len(),
        first_diff.map(|i| &got[i]),
        first_diff.map(|i| &want[i]),
    );

    // And it still moves.
    let (mut dst, to) = Abide::destination(
        &dir,
        "d-final",
        &format!("unix:{}", sock("d7.sock")),
        &[],
        &[],
    );
    let out = migrate(&src.api, &to, &[]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(src.wait_exit(), Some(0));
    dst.wait_for("guest: tick n=");
    dst.ctl("quit");
    assert_eq!(dst.wait_exit(), Some(0));
}

#[test]
fn bad_migrate_and_receive_input_is_refused() {
    let dir = temp_dir("mig-input");
    let out = run_abide(&["receive"], None, TIMEOUT);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("give --listen"), "{out}");
    let out = run_abide(&["receive", "--listen", "udp:1.2.3.4:5"], None, TIMEOUT);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("tcp:HOST:PORT or unix:PATH"), "{out}");
    let out = migrate(&dir.join("nobody.sock"), "tcp:127.0.0.1:1", &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("cannot talk to abide"), "{out}");
    // A receive request on the API of a waiting destination.
    let mut d = Abide::spawn(&dir, "waiting", &["receive"], &[], false);
    let start = Instant::now();
    while !d.api.exists() {
        assert!(start.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = d.ctl("status");
    assert_eq!(s["state"], "incoming", "{s}");
    let out = run_abide(
        &[
            "ctl",
            "--api-socket",
            d.api.to_str().expect("utf-8"),
            "pause",
        ],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no guest runs here yet"), "{out}");
    d.ctl("quit");
    assert_eq!(d.wait_exit(), Some(0));
}
