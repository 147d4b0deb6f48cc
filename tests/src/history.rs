//! The release freeze, anchored in git history.
//!
//! `resources/releases.json` lists what each release froze (goldens per
//! machine type, snapshot fixtures) with hashes, and each release's commit.
//! Hashes kept in the same tree as the files prove nothing on their own: one
//! commit could change a golden and its hash together. So a released file is
//! compared with its bytes at its *anchor*: the first commit whose
//! `releases.json` listed it. History cannot be edited by a later commit, so
//! neither can the anchor. A machine type is *released* when any commit's
//! `releases.json` listed it.
//!
//! Without git history (no `git`, no repository, a shallow clone) nothing
//! here can be proved, and every function panics saying so: the freeze is
//! never silently skipped.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use crate::repo_root;

/// Path of the release list, from the repository root.
pub const RELEASES: &str = "resources/releases.json";

fn no_history(why: &str) -> ! {
    panic!(
        "the release freeze needs this repository's git history, and {why}. \
         Run the tests in a full clone (a plain `git clone`, not `--depth`), \
         with `git` installed: released goldens and fixtures are compared with \
         their bytes at their release commits."
    )
}

/// Runs `git ARGS` in the repository; its stdout, or the error text.
pub fn git(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn git_text(args: &[&str]) -> String {
    match git(args) {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(e) => no_history(&e),
    }
}

/// Checks that full history is here; panics loudly otherwise.
pub fn require_history() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        if let Err(e) = git(&["rev-parse", "--git-dir"]) {
            no_history(&format!("this is not a git checkout ({e})"));
        }
        if git_text(&["rev-parse", "--is-shallow-repository"]) != "false" {
            no_history("this clone is shallow");
        }
    });
}

/// A file's bytes at `commit`, or None if it did not exist there.
pub fn show(commit: &str, path: &str) -> Option<Vec<u8>> {
    require_history();
    git(&["show", &format!("{commit}:{path}")]).ok()
}

/// One commit that changed `releases.json`, with the file's contents then.
#[derive(Debug, Clone)]
pub struct Revision {
    /// Full commit hash.
    pub commit: String,
    /// `releases.json` at that commit.
    pub releases: Value,
}

/// Every commit in HEAD's history that changed `releases.json`, oldest
/// first, with the file as it was.
pub fn revisions() -> &'static [Revision] {
    static REVS: OnceLock<Vec<Revision>> = OnceLock::new();
    REVS.get_or_init(|| {
        require_history();
        let log = git_text(&["log", "--reverse", "--format=%H", "--", RELEASES]);
        let revs: Vec<Revision> = log
            .lines()
            .map(|commit| {
                let bytes = show(commit, RELEASES)
                    .unwrap_or_else(|| no_history(&format!("{RELEASES} is missing at {commit}")));
                let releases = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{RELEASES} at {commit} does not parse: {e}"));
                Revision {
                    commit: commit.to_string(),
                    releases,
                }
            })
            .collect();
        if revs.is_empty() {
            no_history(&format!("no commit in HEAD's history touches {RELEASES}"));
        }
        revs
    })
}

/// `releases.json` in the working tree.
pub fn working_releases() -> Value {
    let text = std::fs::read_to_string(repo_root().join(RELEASES)).expect(RELEASES);
    serde_json::from_str(&text).expect("releases.json parses")
}

/// The release entry for `version` in a `releases.json` value.
pub fn release<'a>(releases: &'a Value, version: &str) -> Option<&'a Value> {
    releases["releases"]
        .as_array()?
        .iter()
        .find(|r| r["version"] == version)
}

/// The first revision for which `listed` holds: the anchor of whatever it
/// looks for.
pub fn anchor(listed: impl Fn(&Value) -> bool) -> Option<&'static Revision> {
    revisions().iter().find(|r| listed(&r.releases))
}

/// Machine types any release lists, at any commit or in the working tree.
pub fn released_machine_types() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let working = working_releases();
    let all = revisions()
        .iter()
        .map(|r| &r.releases)
        .chain(std::iter::once(&working));
    for releases in all {
        for rel in releases["releases"].as_array().into_iter().flatten() {
            if let Some(types) = rel["machine_types"].as_object() {
                out.extend(types.keys().cloned());
            }
        }
    }
    out
}
