//! The release matrix: guests move both ways between this build (HEAD) and
//! every release since 0.2.0, built from its recorded commit
//! (`abide_tests::releases`). For each release R and for pc-1.0 and pc-2.0
//! with the test guest mid-workload:
//! - HEAD restores R's snapshot (R's fixture, made by R itself);
//! - R restores HEAD's snapshot (written by default, and written with
//!   `--target-version R`);
//! - where R has live migration, HEAD -> R and R -> HEAD migrations end
//!   with the checksum of an uninterrupted run, every round exactly once.
//!
//! The table (release x direction x machine type) is printed on every run
//! and recorded in docs/releases.md. A row that cannot run says why; only
//! a documented impossibility (live migration before 0.3.0) passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use abide_tests::releases::{matrix_releases, release_binary, tail, Proc, Release, STEP};
use abide_tests::{abide_bin, progress_rounds, repo_root, run_command, temp_dir};
use serde_json::Value;

/// The fixtures' workload (make-fixtures.sh): 400 rounds, a 256 KiB buffer.
const WORKLOAD: &str = "quiet rounds=400 progress buf-kib=256";
const ROUNDS: u64 = 400;
/// The round after which the guest is saved or moved.
const AT: &str = "guest: progress round=60 ";

/// A machine type with the configuration the fixtures use.
struct Machine {
    name: &'static str,
    extra: &'static [&'static str],
}

const MACHINES: [Machine; 2] = [
    Machine {
        name: "pc-1.0",
        extra: &[],
    },
    Machine {
        name: "pc-2.0",
        extra: &["--cpu", "abide-v1"],
    },
];

impl Machine {
    fn run_args(&self) -> Vec<&'static str> {
        let mut a = vec!["run", "--machine", self.name];
        a.extend_from_slice(self.extra);
        a.extend_from_slice(&["--cpus", "2", "--memory", "128M", "--cmdline", WORKLOAD]);
        a
    }
}

/// What a row ended as.
enum Outcome {
    Pass(String),
    /// Cannot run, for a reason the docs state (not a failure).
    Impossible(String),
    Fail(String),
}

struct Row {
    release: String,
    direction: &'static str,
    machine: &'static str,
    outcome: Outcome,
}

/// R's workload fixture for `machine` and the lines the guest must print.
fn fixture(r: &Release, machine: &str) -> Result<(PathBuf, Vec<String>), String> {
    let dir = repo_root().join("resources/snapshots").join(&r.version);
    let meta = std::fs::read_to_string(dir.join("fixtures.json")).map_err(|e| {
        format!(
            "{} has no fixtures.json ({e}); run resources/snapshots/make-fixtures.sh {}",
            dir.display(),
            r.version
        )
    })?;
    let meta: Value = serde_json::from_str(&meta).map_err(|e| e.to_string())?;
    let name = format!("{machine}-workload.snap");
    let f = meta["fixtures"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["snapshot"] == name.as_str())
        .ok_or_else(|| format!("{}: no fixture {name}", dir.display()))?;
    let expect = f["expect"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    Ok((dir.join(name), expect))
}

/// Checks that a guest continued mid-workload to the end: it printed every
/// expected line, did not boot again, and the console(s) hold every round
/// exactly once.
fn check_end(before: &str, after: &str, expect: &[String]) -> Result<String, String> {
    for e in expect {
        if !after.lines().any(|l| l.starts_with(e.as_str())) {
            return Err(format!("the guest did not print '{e}'\n{}", tail(after)));
        }
    }
    if after.contains("guest: boot ") {
        return Err("the guest booted again instead of continuing".into());
    }
    let rounds = progress_rounds(&format!("{before}{after}"));
    if !before.is_empty() && rounds != (0..ROUNDS).collect::<Vec<_>>() {
        return Err(format!(
            "rounds are not 0..{ROUNDS} exactly once: {} rounds, first {:?}",
            rounds.len(),
            rounds.first()
        ));
    }
    let checksum = expect.first().cloned().unwrap_or_default();
    Ok(format!(
        "{} rounds after the move; {}",
        progress_rounds(after).len(),
        checksum.trim_start_matches("guest: user cpl=3 rounds=400 ")
    ))
}

/// `bin restore SNAP`, run to the end; its console.
fn restore(bin: &Path, snap: &Path, log: &Path) -> Result<String, String> {
    let out = run_command(
        Command::new(bin)
            .arg("restore")
            .arg(snap)
            .arg("--serial")
            .arg(format!("file:{}", log.display())),
        None,
        STEP,
    );
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if out.code != Some(0) {
        return Err(format!(
            "{} restore failed ({:?}):\n{}",
            bin.display(),
            out.code,
            out.stderr.trim()
        ));
    }
    Ok(text)
}

/// HEAD restores R's fixture.
fn head_restores(r: &Release, m: &Machine, dir: &Path) -> Result<String, String> {
    let (snap, expect) = fixture(r, m.name)?;
    let text = restore(&abide_bin(), &snap, &dir.join("head-restore.log"))?;
    check_end("", &text, &expect)
}

/// `writer` snapshots the guest mid-workload (once with `--target-version
/// R`, once by default, both mid-run); `reader` restores both.
fn release_restores(r: &Release, rbin: &Path, m: &Machine, dir: &Path) -> Result<String, String> {
    let (_, expect) = fixture(r, m.name)?;
    let head = abide_bin();
    let mut src = Proc::start(&head, dir, "src", &m.run_args())?;
    src.wait_console(AT)?;
    let api = src.api.to_str().unwrap_or_default().to_string();
    let targeted = dir.join("targeted.snap");
    let snap = |extra: &[&str], file: &Path| -> Result<(), String> {
        let mut args = vec!["snapshot", "--api-socket", &api];
        args.extend_from_slice(extra);
        let out = run_command(Command::new(&head).args(&args).arg(file), None, STEP);
        if out.code != Some(0) {
            return Err(format!(
                "HEAD snapshot {extra:?} failed:\n{}",
                out.stderr.trim()
            ));
        }
        Ok(())
    };
    snap(&["--target-version", &r.version], &targeted)?;
    let plain = dir.join("plain.snap");
    snap(&["--stop"], &plain)?;
    if src.wait_exit()? != Some(0) {
        return Err(format!("the source did not exit 0:\n{}", src.err_text()));
    }
    let before = src.text();
    let text = restore(rbin, &plain, &dir.join("plain.log"))?;
    let done = check_end(&before, &text, &expect)?;
    let t = restore(rbin, &targeted, &dir.join("targeted.log"))?;
    check_end("", &t, &expect).map_err(|e| format!("--target-version snapshot: {e}"))?;
    Ok(done)
}

/// `from` migrates the guest mid-workload to `to` (`abide receive`).
fn migrates(
    from: &Path,
    to: &Path,
    r: &Release,
    m: &Machine,
    dir: &Path,
) -> Result<String, String> {
    let (_, expect) = fixture(r, m.name)?;
    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Proc::start(to, dir, "dst", &["receive", "--listen", &listen])?;
    let line = dst.wait_stderr("abide: listening for an incoming migration on ")?;
    let at = line
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut src = Proc::start(from, dir, "src", &m.run_args())?;
    src.wait_console(AT)?;
    let out = run_command(
        Command::new(from)
            .args(["migrate", "--api-socket"])
            .arg(&src.api)
            .args(["--to", &at]),
        None,
        STEP,
    );
    if out.code != Some(0) {
        return Err(format!(
            "{} migrate failed ({:?}):\n{}\ndestination stderr:\n{}",
            from.display(),
            out.code,
            out.stderr.trim(),
            dst.err_text()
        ));
    }
    if src.wait_exit()? != Some(0) {
        return Err(format!("the source did not exit 0:\n{}", src.err_text()));
    }
    if dst.wait_exit()? != Some(0) {
        return Err(format!(
            "the destination did not exit 0:\n{}",
            dst.err_text()
        ));
    }
    check_end(&src.text(), &dst.text(), &expect)
}

fn row(release: &Release, direction: &'static str, m: &Machine, outcome: Outcome) -> Row {
    Row {
        release: release.version.clone(),
        direction,
        machine: m.name,
        outcome,
    }
}

fn result(r: Result<String, String>) -> Outcome {
    match r {
        Ok(s) => Outcome::Pass(s),
        Err(e) => Outcome::Fail(e),
    }
}

fn print_table(rows: &[Row]) -> String {
    let mut t = String::from("| release | direction | machine | result |\n|---|---|---|---|\n");
    for r in rows {
        let (word, detail) = match &r.outcome {
            Outcome::Pass(d) => ("pass", d.clone()),
            Outcome::Impossible(d) => ("n/a", d.clone()),
            Outcome::Fail(d) => {
                // One line: the reason usually follows the command's name.
                let flat: Vec<&str> = d.split_whitespace().collect();
                let line = flat.join(" ");
                let short: String = line.chars().take(400).collect();
                let more = if short.len() < line.len() { "…" } else { "" };
                ("FAIL", format!("{short}{more}"))
            }
        };
        t.push_str(&format!(
            "| {} | {} | {} | {word}: {detail} |\n",
            r.release, r.direction, r.machine
        ));
    }
    t
}

#[test]
fn guests_move_both_ways_between_head_and_every_release() {
    let releases = matrix_releases();
    assert!(
        releases.iter().any(|r| r.version == "0.2.0"),
        "releases.json lists no 0.2.0"
    );
    let mut rows = Vec::new();
    for r in &releases {
        let bin = release_binary(r);
        for m in &MACHINES {
            let dir = temp_dir(&format!("matrix-{}-{}", r.version, m.name));
            let sub = |name: &str| {
                let d = dir.join(name);
                let _ = std::fs::create_dir_all(&d);
                d
            };
            rows.push(row(
                r,
                "HEAD restores R's snapshot",
                m,
                result(head_restores(r, m, &sub("a"))),
            ));
            let Ok(rbin) = &bin else {
                let why = bin.clone().err().unwrap_or_default();
                for d in [
                    "R restores HEAD's snapshot",
                    "HEAD -> R migration",
                    "R -> HEAD migration",
                ] {
                    rows.push(row(
                        r,
                        d,
                        m,
                        Outcome::Fail(format!("cannot build {}: {why}", r.version)),
                    ));
                }
                continue;
            };
            rows.push(row(
                r,
                "R restores HEAD's snapshot",
                m,
                result(release_restores(r, rbin, m, &sub("b"))),
            ));
            if r.migration {
                rows.push(row(
                    r,
                    "HEAD -> R migration",
                    m,
                    result(migrates(&abide_bin(), rbin, r, m, &sub("c"))),
                ));
                rows.push(row(
                    r,
                    "R -> HEAD migration",
                    m,
                    result(migrates(rbin, &abide_bin(), r, m, &sub("d"))),
                ));
            } else {
                for d in ["HEAD -> R migration", "R -> HEAD migration"] {
                    rows.push(row(
                        r,
                        d,
                        m,
                        Outcome::Impossible(format!(
                            "{} has no live migration (it came with 0.3.0)",
                            r.version
                        )),
                    ));
                }
            }
        }
    }
    let table = print_table(&rows);
    abide_tests::report(&format!(
        "release matrix (HEAD = {}):\n{table}",
        env!("CARGO_PKG_VERSION")
    ));
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Fail(e) => Some(format!(
                "{} / {} / {}: {e}",
                r.release, r.direction, r.machine
            )),
            _ => None,
        })
        .collect();
    assert!(
        failures.is_empty(),
        "release matrix rows failed:\n{}",
        failures.join("\n\n")
    );
}
