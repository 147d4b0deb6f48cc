//! The release freeze, anchored in git history (see `abide_tests::history`).
//!
//! - Every release records the commit it was made at, and that commit is the
//!   first whose `resources/releases.json` lists the release.
//! - Every released golden and snapshot fixture is byte-identical to its bytes
//!   at its anchor (the first commit listing it), and its recorded hash is the
//!   one recorded there. Goldens are anchored at their release commit;
//!   fixtures may be made from the release's commit afterwards (0.2.0's were
//!   committed in f7e146b, just after the release commit ac3da70), and are
//!   anchored where they were first listed.
//! - Nothing a release listed at any earlier commit (releases, machine types,
//!   files, hashes) has disappeared, and every released machine type is still
//!   in the registry.
//!
//! Without git history these tests fail; they never skip.

use std::path::PathBuf;

use abide_tests::history::{anchor, release, revisions, show, working_releases, RELEASES};
use abide_tests::{repo_root, sha256_bytes};
use serde_json::Value;

/// What a released file is.
enum Kind {
    /// A golden of a machine type.
    Golden { machine: String, file: String },
    /// A snapshot fixture of a release.
    Fixture { file: String },
}

/// A file the working tree's `releases.json` freezes.
struct Released {
    version: String,
    kind: Kind,
    /// Path from the repository root.
    path: String,
    /// The hash the working tree's `releases.json` records.
    hash: String,
}

impl Released {
    /// The hash one `releases.json` records for this file, if it lists it.
    fn lookup(&self, releases: &Value) -> Option<String> {
        let rel = release(releases, &self.version)?;
        let v = match &self.kind {
            Kind::Golden { machine, file } => &rel["machine_types"][machine][file],
            Kind::Fixture { file } => &rel["snapshot_fixtures"][file],
        };
        v.as_str().map(str::to_string)
    }

    /// Goldens are part of their release; fixtures may follow it.
    fn at_release_commit(&self) -> bool {
        matches!(self.kind, Kind::Golden { .. })
    }
}

/// Every file the working tree's `releases.json` freezes.
fn released_files() -> Vec<Released> {
    let mut out = Vec::new();
    let r = working_releases();
    for rel in r["releases"].as_array().expect("releases") {
        let version = rel["version"].as_str().expect("version").to_string();
        for (machine, files) in rel["machine_types"].as_object().expect("machine_types") {
            for (file, hash) in files.as_object().expect("files") {
                out.push(Released {
                    version: version.clone(),
                    path: format!("resources/abi/{machine}/{file}"),
                    hash: hash.as_str().expect("hash").to_string(),
                    kind: Kind::Golden {
                        machine: machine.clone(),
                        file: file.clone(),
                    },
                });
            }
        }
        for (file, hash) in rel["snapshot_fixtures"].as_object().into_iter().flatten() {
            out.push(Released {
                version: version.clone(),
                path: format!("resources/snapshots/{version}/{file}"),
                hash: hash.as_str().expect("hash").to_string(),
                kind: Kind::Fixture { file: file.clone() },
            });
        }
    }
    out
}

/// The commit recorded for `version` in the working tree, if any.
fn recorded_commit(version: &str) -> Option<String> {
    release(&working_releases(), version)?["commit"]
        .as_str()
        .map(str::to_string)
}

fn head() -> String {
    let out = abide_tests::history::git(&["rev-parse", "HEAD"]).expect("HEAD");
    String::from_utf8_lossy(&out).trim().to_string()
}

#[test]
fn releases_record_the_commit_they_were_made_at() {
    let r = working_releases();
    let releases = r["releases"].as_array().expect("releases");
    assert!(!releases.is_empty(), "{RELEASES} lists no release");
    for rel in releases {
        let version = rel["version"].as_str().expect("version");
        let first = anchor(|rs| release(rs, version).is_some()).map(|a| a.commit.clone());
        match (rel["commit"].as_str(), first) {
            (Some(c), Some(first)) => assert_eq!(
                c, first,
                "release {version} records commit {c}, but it was first listed in {RELEASES} at {first}"
            ),
            // The release commit itself cannot name its own hash; the entry
            // gets its `commit` in a later commit.
            (None, Some(first)) => assert_eq!(
                first,
                head(),
                "release {version} (first listed at {first}) does not record its commit"
            ),
            (Some(c), None) => panic!("release {version} records commit {c} but is not committed yet"),
            (None, None) => {}
        }
        if let Some(c) = rel["commit"].as_str() {
            abide_tests::history::git(&["merge-base", "--is-ancestor", c, "HEAD"]).unwrap_or_else(
                |e| panic!("release {version}'s commit {c} is not in HEAD's history: {e}"),
            );
        }
    }
    // Anchors in use, for the record.
    for rel in releases {
        eprintln!(
            "release {} at {}",
            rel["version"].as_str().unwrap_or("?"),
            rel["commit"].as_str().unwrap_or("(not recorded yet)")
        );
    }
}

#[test]
fn released_files_are_their_bytes_at_release() {
    let files = released_files();
    assert!(!files.is_empty(), "{RELEASES} freezes no file");
    for f in &files {
        let here = std::fs::read(repo_root().join(&f.path))
            .unwrap_or_else(|e| panic!("released {} is missing: {e}", f.path));
        let Some(a) = anchor(|rs| f.lookup(rs).is_some()) else {
            // Listed only in the uncommitted working tree: not released yet.
            eprintln!("{}: not committed yet, nothing to anchor", f.path);
            continue;
        };
        if f.at_release_commit() {
            if let Some(c) = recorded_commit(&f.version) {
                assert_eq!(
                    a.commit, c,
                    "{} was first listed at {}, not at release {}'s commit",
                    f.path, a.commit, f.version
                );
            }
        }
        let then = show(&a.commit, &f.path).unwrap_or_else(|| {
            panic!(
                "{} is listed at {} but the file is not in that commit",
                f.path, a.commit
            )
        });
        assert!(
            here == then,
            "{} differs from its bytes at {} (release {}): released files are frozen; \
             fix the code, or put the change in a new machine type",
            f.path,
            a.commit,
            f.version
        );
        let hash_then = f.lookup(&a.releases).expect("listed at its anchor");
        assert_eq!(
            f.hash, hash_then,
            "{}: {RELEASES} records another hash than at {}",
            f.path, a.commit
        );
        assert_eq!(
            sha256_bytes(&here),
            f.hash,
            "{}: the recorded hash is not the file's",
            f.path
        );
        eprintln!(
            "{}: identical to {} ({})",
            f.path,
            &a.commit[..12],
            f.version
        );
    }
}

/// Hashes recorded in `entry` under `key`, by name; a string-valued
/// `snapshot_fixtures` (a directory announced before its files) has none.
fn hashes(entry: &Value, key: &str) -> Vec<(String, Value)> {
    entry[key]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

#[test]
fn nothing_released_disappeared() {
    let now = working_releases();
    let revs = revisions();
    for rev in revs {
        let short = &rev.commit[..12];
        for rel in rev.releases["releases"].as_array().into_iter().flatten() {
            let version = rel["version"].as_str().expect("version");
            let here = release(&now, version).unwrap_or_else(|| {
                panic!("release {version} (listed at {short}) disappeared from {RELEASES}")
            });
            for (machine, files) in hashes(rel, "machine_types") {
                abide_machines::resolve(&machine).unwrap_or_else(|e| {
                    panic!("machine type {machine} (released in {version}) left the registry: {e}")
                });
                for (file, hash) in files.as_object().into_iter().flatten() {
                    assert_eq!(
                        &here["machine_types"][&machine][file], hash,
                        "{version}: {machine}/{file} as listed at {short} disappeared or changed"
                    );
                }
            }
            if !rel["snapshot_fixtures"].is_null() {
                assert!(
                    !here["snapshot_fixtures"].is_null(),
                    "{version}: snapshot fixtures listed at {short} disappeared"
                );
            }
            for (file, hash) in hashes(rel, "snapshot_fixtures") {
                assert_eq!(
                    here["snapshot_fixtures"][&file], hash,
                    "{version}: fixture {file} as listed at {short} disappeared or changed"
                );
            }
        }
    }
    eprintln!("checked {} revisions of {RELEASES}", revs.len());
}

#[test]
fn released_machine_types_keep_their_goldens() {
    // `released` is what ABIDE_BLESS refuses to write (tests/abi_golden.rs):
    // every machine type any commit's releases.json listed, so deleting an
    // entry does not unfreeze one.
    let released = abide_tests::history::released_machine_types();
    assert!(!released.is_empty(), "no released machine type in history");
    for m in &released {
        abide_machines::resolve(m)
            .unwrap_or_else(|e| panic!("released {m} left the registry: {e}"));
        for file in ["manifest.json", "fingerprint.txt"] {
            let p: PathBuf = repo_root().join("resources/abi").join(m).join(file);
            assert!(p.is_file(), "released {m} lost {}", p.display());
        }
    }
    eprintln!("released machine types: {released:?}");
}
