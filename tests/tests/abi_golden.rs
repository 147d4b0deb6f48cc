//! Frozen guest ABI: for a reference configuration of each machine type, the
//! manifest (`abide manifest`) and the in-guest fingerprint (what the test
//! guest observes: CPUID, e820, ACPI, PCI config spaces, virtio) must equal
//! the goldens under resources/abi/<machine>/.
//!
//! The machine types come from the registry: a new machine type fails here
//! until it has goldens. A released machine type is frozen: resources/
//! releases.json records each golden's SHA-256 at release, and
//! `released_goldens_are_untouched` fails if a golden changes (and
//! tests/release_freeze.rs compares each with its bytes at the release
//! commit). If a comparison fails, the code is wrong, or the change belongs
//! in a new machine type.
//!
//! The CPU models take the host's vendor string, so the vendor registers of
//! CPUID leaves 0 and 0x80000000 are normalized before comparing. Where
//! /dev/kvm is PVM, CPUID leaf 1 ECX/EDX and leaves 7 and 0xD come from the
//! physical host whatever the VMM sets; those registers are compared only
//! where KVM is hardware-assisted (directly, or inside the nested test host).
//!
//! `ABIDE_BLESS=1 cargo test --release --test abi_golden` writes missing or
//! changed goldens of machine types that no commit's releases.json ever
//! listed (see `abide_tests::history`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use abide_tests::session::run_where_linux_runs;
use abide_tests::{abide_bin, repo_root, sha256_file, temp_dir};
use serde_json::Value;

/// Every machine type in the registry, oldest first.
fn machines() -> Vec<String> {
    let mut names: Vec<String> = abide_machines::machine_types()
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.reverse();
    names
}

fn golden_dir(machine: &str) -> PathBuf {
    repo_root().join("resources/abi").join(machine)
}

/// The reference option ROM: generated, so its bytes never depend on a
/// distribution package. 40 KiB, PCI ROM signature, a fixed pattern.
fn reference_rom(dir: &Path) -> PathBuf {
    let mut rom: Vec<u8> = (0..40 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    rom[0] = 0x55;
    rom[1] = 0xaa;
    rom[2] = (rom.len() / 512) as u8;
    let p = dir.join("reference.rom");
    std::fs::write(&p, rom).expect("write ROM");
    p
}

/// The reference configuration's flags, minus the command.
fn reference_args(machine: &str, dir: &Path) -> Vec<String> {
    let disk = dir.join("reference.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk image");
    vec![
        "--machine".into(),
        machine.into(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "512M".into(),
        "--disk".into(),
        format!("path={},serial=abide-reference", disk.display()),
        "--net".into(),
        format!(
            "tap=abref0,mac=52:54:00:ab:1d:00,rom={}",
            reference_rom(dir).display()
        ),
        "--rng".into(),
    ]
}

/// Zeroes the vendor registers of leaves 0 and 0x80000000.
fn normalize_manifest(mut abi: Value) -> Value {
    if let Some(cpus) = abi["cpu"]["cpuid"].as_array_mut() {
        for leaves in cpus {
            for l in leaves.as_array_mut().into_iter().flatten() {
                let f = l["function"].as_u64();
                if f == Some(0) || f == Some(0x8000_0000) {
                    for r in ["ebx", "ecx", "edx"] {
                        l[r] = Value::from(0);
                    }
                }
            }
        }
    }
    abi
}

/// The fingerprint lines, vendor registers normalized; `fp-done` dropped
/// (its checksum covers the raw vendor).
fn normalize_fingerprint(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("guest: "))
        .filter(|l| l.starts_with("fp-") && !l.starts_with("fp-done"))
        .map(|l| {
            if l.starts_with("fp-cpuid leaf=0x00000000 ")
                || l.starts_with("fp-cpuid leaf=0x80000000 ")
            {
                l.split(' ')
                    .map(|w| match w.split_once('=') {
                        Some((k @ ("ebx" | "ecx" | "edx"), _)) => format!("{k}=0x00000000"),
                        _ => w.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// Registers PVM answers from the host: leaf 1 ECX/EDX, leaves 7 and 0xD.
fn pvm_overridden(line: &str) -> bool {
    line.starts_with("fp-cpuid leaf=0x00000007 ")
        || line.starts_with("fp-cpuid leaf=0x0000000d ")
        || line.starts_with("fp-cpuid leaf=0x00000001 ")
}

struct Observed {
    manifest: Value,
    fingerprint: Vec<String>,
    /// Where it ran: "direct" or "nested".
    place: &'static str,
}

fn parse_session(stdout: &str, place: &'static str) -> BTreeMap<String, Observed> {
    let mut out = BTreeMap::new();
    for m in machines() {
        let section = |what: &str| {
            let begin = format!("@@@ begin {what} {m}\n");
            let end = format!("@@@ end {what} {m}");
            let from = stdout
                .find(&begin)
                .unwrap_or_else(|| panic!("no {what} for {m}\n{stdout}"))
                + begin.len();
            let to = stdout[from..]
                .find(&end)
                .unwrap_or_else(|| panic!("{what} for {m} unfinished\n{stdout}"));
            stdout[from..from + to].to_string()
        };
        let json: Value = serde_json::from_str(&section("manifest"))
            .unwrap_or_else(|e| panic!("{m}: manifest is not JSON ({e})\n{stdout}"));
        out.insert(
            m.to_string(),
            Observed {
                manifest: normalize_manifest(json["abi"].clone()),
                fingerprint: normalize_fingerprint(&section("fingerprint")),
                place,
            },
        );
    }
    out
}

/// Runs the reference configuration of every machine type once: directly
/// where every default CPU model is usable, otherwise in the nested host.
fn observed() -> &'static BTreeMap<String, Observed> {
    static OBS: OnceLock<BTreeMap<String, Observed>> = OnceLock::new();
    OBS.get_or_init(|| {
        let dir = temp_dir("abi");
        let abide = abide_bin();
        let mut script = String::from("set -u\n");
        for m in machines() {
            let args: Vec<String> = reference_args(&m, &dir)
                .into_iter()
                .map(|a| format!("'{a}'"))
                .collect();
            let args = args.join(" ");
            let a = abide.display();
            script.push_str(&format!(
                "echo '@@@ begin manifest {m}'; '{a}' manifest {args}; echo '@@@ end manifest {m}'\n\
                 echo '@@@ begin fingerprint {m}'; '{a}' run {args} --serial stdio \
                 --cmdline 'fingerprint quiet' </dev/null; echo '@@@ end fingerprint {m}'\n"
            ));
        }
        let out = run_where_linux_runs(&["sh", "-c", &script], 600, "reference");
        assert_eq!(out.code, Some(0), "reference session failed\n{out}");
        let place = if out.stderr.contains("running directly") {
            "direct"
        } else {
            "nested"
        };
        parse_session(&out.stdout, place)
    })
}

fn released() -> Value {
    abide_tests::history::working_releases()
}

/// Released: listed by releases.json at any commit, or in the working tree.
/// Deleting a machine type's entry does not make it blessable again.
fn is_released(machine: &str) -> bool {
    abide_tests::history::released_machine_types().contains(machine)
}

fn bless() -> bool {
    std::env::var("ABIDE_BLESS").is_ok_and(|v| v == "1")
}

fn check_or_bless(machine: &str, file: &str, actual: &str) {
    let path = golden_dir(machine).join(file);
    let golden = std::fs::read_to_string(&path).ok();
    if golden.as_deref() == Some(actual) {
        return;
    }
    if bless() && !is_released(machine) {
        std::fs::create_dir_all(golden_dir(machine)).expect("mkdir");
        std::fs::write(&path, actual).expect("write golden");
        eprintln!("BLESSED {}", path.display());
        return;
    }
    let Some(golden) = golden else {
        panic!(
            "{} is missing; generate it with ABIDE_BLESS=1 (only for unreleased machine types)",
            path.display()
        );
    };
    let diff: Vec<String> = golden
        .lines()
        .zip(actual.lines())
        .filter(|(g, a)| g != a)
        .take(20)
        .map(|(g, a)| format!("- {g}\n+ {a}"))
        .collect();
    panic!(
        "{machine}: {file} differs from the golden (first differences below; \
         {} vs {} lines). A released machine type is frozen: fix the code, or put \
         the change in a new machine type.\n{}",
        golden.lines().count(),
        actual.lines().count(),
        diff.join("\n")
    );
}

/// Fields of `golden` missing from, or different in, `actual`. Fields a later
/// Abide adds to the manifest format are not ABI changes by themselves, so
/// only what the golden records is compared.
fn missing_or_different(path: &str, golden: &Value, actual: &Value, out: &mut Vec<String>) {
    match (golden, actual) {
        (Value::Object(g), Value::Object(a)) => {
            for (k, gv) in g {
                let p = format!("{path}.{k}");
                match a.get(k) {
                    Some(av) => missing_or_different(&p, gv, av, out),
                    None => out.push(format!("{p}: missing (golden {gv})")),
                }
            }
        }
        (Value::Array(g), Value::Array(a)) if g.len() == a.len() => {
            for (i, (gv, av)) in g.iter().zip(a).enumerate() {
                missing_or_different(&format!("{path}[{i}]"), gv, av, out);
            }
        }
        _ if golden != actual => out.push(format!("{path}: golden {golden} -> now {actual}")),
        _ => {}
    }
}

#[test]
fn manifests_match_goldens() {
    for (m, o) in observed() {
        let path = golden_dir(m).join("manifest.json");
        let golden: Option<Value> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let mut diffs = Vec::new();
        if let Some(g) = &golden {
            missing_or_different("abi", g, &o.manifest, &mut diffs);
            if diffs.is_empty() {
                continue;
            }
        }
        if bless() && !is_released(m) {
            let text = serde_json::to_string_pretty(&o.manifest).expect("json") + "\n";
            check_or_bless(m, "manifest.json", &text);
            continue;
        }
        assert!(
            golden.is_some(),
            "{} is missing; generate it with ABIDE_BLESS=1 (unreleased machine types only)",
            path.display()
        );
        panic!(
            "{m}: the guest ABI differs from the golden manifest. A released machine \
             type is frozen: fix the code, or put the change in a new machine type.\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn fingerprints_match_goldens() {
    for (m, o) in observed() {
        assert!(o.fingerprint.len() > 50, "{m}: short fingerprint");
        let text = o.fingerprint.join("\n") + "\n";
        check_or_bless(m, "fingerprint.txt", &text);
        eprintln!("{m}: fingerprint compared exactly ({} run)", o.place);
    }
}

/// On a PVM host the pc-1.0 reference also runs directly; everything except
/// the registers PVM overrides must match the golden taken on real KVM.
#[test]
fn pc_1_0_fingerprint_on_this_host() {
    if !abide_tests::host_is_pvm() {
        eprintln!("pc_1_0_fingerprint_on_this_host: not PVM; covered exactly by fingerprints_match_goldens");
        return;
    }
    let dir = temp_dir("abi-pvm");
    let mut args = vec!["run".to_string()];
    args.extend(reference_args("pc-1.0", &dir));
    args.extend(["--cmdline".into(), "fingerprint quiet".into()]);
    let out = abide_tests::run_abide(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
        Duration::from_secs(120),
    );
    assert_eq!(out.code, Some(0), "{out}");
    let here = normalize_fingerprint(&out.stdout);
    let golden = std::fs::read_to_string(golden_dir("pc-1.0").join("fingerprint.txt"))
        .expect("pc-1.0 golden fingerprint");
    // PVM adds subleaves of its own leaf 0xD, so drop overridden lines on
    // both sides, then compare everything else line by line.
    let golden: Vec<&str> = golden.lines().filter(|l| !pvm_overridden(l)).collect();
    let here: Vec<&str> = here
        .iter()
        .map(String::as_str)
        .filter(|l| !pvm_overridden(l))
        .collect();
    abide_tests::report(
        "NOT CHECKED on this PVM host: pc-1.0 fingerprint's CPUID leaf 1 and leaves 7 \
         and 0xD (PVM answers them from the host; fingerprints_match_goldens compares \
         them in the nested host)",
    );
    assert_eq!(here, golden, "pc-1.0 fingerprint on this host");
}

#[test]
fn released_goldens_are_untouched() {
    let r = released();
    let releases = r["releases"].as_array().expect("releases");
    for rel in releases {
        let version = rel["version"].as_str().expect("version");
        for (machine, files) in rel["machine_types"].as_object().expect("machine_types") {
            abide_machines::resolve(machine)
                .unwrap_or_else(|e| panic!("released {machine} ({version}) vanished: {e}"));
            for (file, want) in files.as_object().expect("files") {
                assert_eq!(
                    Some(sha256_file(&golden_dir(machine).join(file)).as_str()),
                    want.as_str(),
                    "{machine}/{file} changed after release {version}: released goldens are frozen"
                );
            }
        }
    }
}
