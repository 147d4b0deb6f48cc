//! Snapshots written by released Abide versions restore on this build.
//!
//! Every release adds `resources/snapshots/<version>/` (made from that
//! release's own commit by `resources/snapshots/make-fixtures.sh`): the
//! test guest snapshotted mid-workload, with `fixtures.json` saying what the
//! guest must print once restored. Each fixture is restored here and must
//! run to its expected end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use abide_tests::{repo_root, run_abide, sha256_file, temp_dir};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

fn releases() -> Vec<PathBuf> {
    let dir = repo_root().join("resources/snapshots");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("fixtures.json").exists())
        .collect();
    out.sort();
    out
}

fn restore_fixture(release: &Path, f: &Value, scratch: &Path) -> String {
    let name = f["snapshot"].as_str().expect("snapshot name");
    let snap = release.join(name);
    assert!(snap.exists(), "{} is missing", snap.display());
    let log = scratch.join(format!("{name}.log"));
    let mut args: Vec<String> = vec![
        "restore".into(),
        snap.display().to_string(),
        "--serial".into(),
        format!("file:{}", log.display()),
    ];
    // Disks are copied: the fixture's image must stay as released.
    for d in f["disks"].as_array().expect("disks") {
        let slot = d["slot"].as_u64().expect("slot");
        let image = release.join(d["image"].as_str().expect("image"));
        let copy = scratch.join(format!("{name}.slot{slot}.img"));
        std::fs::copy(&image, &copy).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        args.push("--disk-path".into());
        args.push(format!("{slot}={}", copy.display()));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_abide(&argv, None, TIMEOUT);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        out.code,
        Some(0),
        "{}/{name} did not restore and run to poweroff\n{out}\nguest output:\n{text}",
        release.display()
    );
    for e in f["expect"].as_array().expect("expect") {
        let e = e.as_str().expect("string");
        assert!(
            text.lines().any(|l| l.starts_with(e)),
            "{}/{name}: the restored guest did not print '{e}'\n{text}",
            release.display()
        );
    }
    text
}

/// Fixtures are frozen like released goldens: `resources/releases.json`
/// records their hashes.
#[test]
fn released_fixtures_are_untouched() {
    let text = std::fs::read_to_string(repo_root().join("resources/releases.json"))
        .expect("releases.json");
    let releases: Value = serde_json::from_str(&text).expect("parses");
    let mut checked = 0;
    for rel in releases["releases"].as_array().expect("releases") {
        let version = rel["version"].as_str().expect("version");
        let Some(files) = rel["snapshot_fixtures"].as_object() else {
            continue;
        };
        let dir = repo_root().join("resources/snapshots").join(version);
        for (file, want) in files {
            assert_eq!(
                Some(sha256_file(&dir.join(file)).as_str()),
                want.as_str(),
                "{version}/{file} changed after its release: fixtures are frozen"
            );
            checked += 1;
        }
        // Every fixture directory file is recorded.
        let present = std::fs::read_dir(&dir).expect("fixture dir").count();
        assert_eq!(present, files.len(), "{version}: unrecorded fixture files");
    }
    assert!(checked > 0, "no fixture hashes in resources/releases.json");
}

#[test]
fn every_released_fixture_restores() {
    let releases = releases();
    assert!(
        !releases.is_empty(),
        "no snapshot fixtures under resources/snapshots/"
    );
    let scratch = temp_dir("fixtures");
    let mut restored = 0;
    for release in &releases {
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(release.join("fixtures.json")).expect("fixtures.json"),
        )
        .expect("fixtures.json parses");
        let version = release.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(meta["abide_version"], version, "{}", release.display());
        for f in meta["fixtures"].as_array().expect("fixtures") {
            let text = restore_fixture(release, f, &scratch);
            // The guest continued mid-workload: it did not start over.
            assert!(
                !text.contains("guest: boot "),
                "{version}/{}: the guest booted again instead of continuing\n{text}",
                f["snapshot"]
            );
            restored += 1;
        }
    }
    eprintln!(
        "restored {restored} fixtures from {} release(s)",
        releases.len()
    );
}
