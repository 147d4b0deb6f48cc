//! Released Abide binaries for the release matrix: each release since
//! snapshots came (0.2.0) is built from the commit `resources/releases.json`
//! records (tags do not reach other clones), once, by
//! `resources/releases/build-release.sh`, and cached under
//! `target/releases/<commit>/abide`, so reruns cost nothing.
//!
//! [`Proc`] runs any `abide` binary, old or new, with its console in a
//! file and a control socket: each binary is driven only through its own
//! command line, so a release's control protocol never has to match HEAD's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::repo_root;

/// A release of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// Version (`0.2.0`).
    pub version: String,
    /// Full commit hash.
    pub commit: String,
    /// Whether it has live migration (0.3.0 and later).
    pub migration: bool,
}

fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// Every release since 0.2.0 (the first with snapshots), oldest first.
pub fn matrix_releases() -> Vec<Release> {
    let path = repo_root().join(crate::history::RELEASES);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).expect("releases.json parses");
    let mut out: Vec<Release> = json["releases"]
        .as_array()
        .expect("releases")
        .iter()
        .filter_map(|r| {
            let version = r["version"].as_str()?.to_string();
            let commit = r["commit"].as_str()?.to_string();
            (version_key(&version) >= version_key("0.2.0")).then(|| Release {
                migration: version_key(&version) >= version_key("0.3.0"),
                version,
                commit,
            })
        })
        .collect();
    out.sort_by_key(|r| version_key(&r.version));
    out
}

/// The `abide` binary of `r`, built on first use (minutes) and cached by
/// commit; the error says why it could not be built.
pub fn release_binary(r: &Release) -> Result<PathBuf, String> {
    // One build at a time within this process too (the script also locks).
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let script = repo_root().join("resources/releases/build-release.sh");
    let out = Command::new(&script)
        .arg(&r.commit)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        return Err(format!(
            "building Abide {} ({}) failed ({}):\n{}",
            r.version,
            r.commit,
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let v = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let said = String::from_utf8_lossy(&v.stdout).trim().to_string();
    if said != format!("abide {}", r.version) {
        return Err(format!(
            "{} says '{said}', not 'abide {}': releases.json's commit for {} is wrong",
            bin.display(),
            r.version,
            r.version
        ));
    }
    Ok(bin)
}

/// A running `abide` (any release): console in `<tag>.log`, stderr in
/// `<tag>.err`, control socket `<tag>.sock`, all in one directory.
pub struct Proc {
    child: Child,
    /// Control socket.
    pub api: PathBuf,
    /// Console log.
    pub serial: PathBuf,
    stderr: PathBuf,
}

/// How long any one step may take.
pub const STEP: Duration = Duration::from_secs(120);

impl Proc {
    /// Starts `bin ARGS --api-socket DIR/TAG.sock --serial file:DIR/TAG.log`.
    pub fn start(bin: &Path, dir: &Path, tag: &str, args: &[&str]) -> Result<Self, String> {
        let api = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.log"));
        let stderr = dir.join(format!("{tag}.err"));
        let err = std::fs::File::create(&stderr).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(args)
            .arg("--api-socket")
            .arg(&api)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Self {
            child,
            api,
            serial,
            stderr,
        })
    }

    /// The console so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Stderr so far.
    pub fn err_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) -> Result<(), String> {
        let start = Instant::now();
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                if done(self) {
                    return Ok(());
                }
                return Err(format!(
                    "abide exited ({status}) before {what}\nstderr:\n{}\nconsole tail:\n{}",
                    self.err_text(),
                    tail(&self.text())
                ));
            }
            if start.elapsed() > STEP {
                return Err(format!("no {what} within {} s", STEP.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until the console has `needle`.
    pub fn wait_console(&mut self, needle: &str) -> Result<(), String> {
        self.wait_until(&format!("'{needle}' on the console"), |p| {
            p.text().contains(needle)
        })
    }

    /// Waits for a stderr line starting with `prefix`; returns it.
    pub fn wait_stderr(&mut self, prefix: &str) -> Result<String, String> {
        self.wait_until(&format!("'{prefix}' on stderr"), |p| {
            p.err_text().lines().any(|l| l.starts_with(prefix))
        })?;
        Ok(self
            .err_text()
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_string())
    }

    /// Waits for the process to end; its exit code.
    pub fn wait_exit(&mut self) -> Result<Option<i32>, String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status.code());
            }
            if start.elapsed() > STEP {
                return Err(format!(
                    "abide did not exit within {} s\nconsole tail:\n{}",
                    STEP.as_secs(),
                    tail(&self.text())
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log, for error messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(6)..].join("\n")
}
