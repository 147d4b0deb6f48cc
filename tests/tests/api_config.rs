//! One VM configuration schema for the command line and the API.
//!
//! `abide config FLAGS` prints the JSON a set of flags stands for; that
//! JSON must conform to the spec's `VmConfig`, the flags and the schema
//! must have the same fields, `--config FILE` must take it back, and
//! `vm.create` with it must build the VM the flags build (same
//! configuration reported, same guest ABI manifest). Bad values are refused
//! alike on both sides.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use abide_tests::api::{get_ok, put, put_ok, spec_path, venv_python, Abide};
use abide_tests::{repo_root, run_abide, temp_dir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn abide_json(args: &[&str]) -> Value {
    let out = run_abide(args, None, T);
    assert_eq!(out.code, Some(0), "abide {args:?}\n{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).expect("write");
    p
}

fn check_schema(args: &[String]) -> Value {
    let out = Command::new(venv_python())
        .arg(repo_root().join("resources/api/check_config_schema.py"))
        .arg(spec_path())
        .args(args)
        .output()
        .expect("run check_config_schema.py");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{report:#}");
    report
}

#[test]
fn flags_and_the_spec_have_the_same_fields_and_configs_conform() {
    let dir = temp_dir("api-config-schema");
    let full_tap: Vec<&str> = vec![
        "config",
        "--machine",
        "pc-1.0",
        "--cpu",
        "abide-v1",
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--cmdline",
        "console=ttyS0",
        "--firmware",
        "/f.bin",
        "--firmware-log",
        "/f.log",
        "--memory",
        "1G",
        "--cpus",
        "3",
        "--serial",
        "file:/tmp/x.log",
        "--disk",
        "path=/d.img,readonly=on,serial=abc,direct=on,addr=5",
        "--net",
        "tap=tap0,mac=52:54:00:00:00:01,addr=6,rom=/r.rom,romsize=256K",
        "--rng",
        "addr=7",
    ];
    let full_fd: Vec<&str> = vec!["config", "--net", "fd=3"];
    let sets: Vec<Vec<&str>> = vec![
        vec!["config"],
        vec![
            "config",
            "--machine",
            "pc-1.0",
            "--memory",
            "256",
            "--serial",
            "null",
        ],
        vec![
            "config",
            "--disk",
            "path=/a.img",
            "--disk",
            "path=/b.img,addr=0x9",
            "--rng",
        ],
    ];
    // `abide config` of each set of flags, in a file.
    let files = |prefix: &str, sets: &[Vec<&str>]| -> Vec<String> {
        sets.iter()
            .enumerate()
            .map(|(i, set)| {
                let p = write_json(&dir, &format!("{prefix}{i}.json"), &abide_json(set));
                p.display().to_string()
            })
            .collect()
    };
    let mut args = vec!["--valid".to_string()];
    args.extend(files("valid", &sets));
    args.push("--full".into());
    args.extend(files("full", &[full_tap, full_fd]));
    args.push("--invalid".into());
    let bad = [
        json!({"cpus": "two"}),
        json!({"bogus": 1}),
        json!({"disks": [{"readonly": true}]}),
        json!({"disks": [{"path": "/x", "bogus": 1}]}),
        json!({"memory": -5}),
        json!({"rng": []}),
        json!([]),
    ];
    for (i, b) in bad.iter().enumerate() {
        let p = write_json(&dir, &format!("bad{i}.json"), b);
        // The command line refuses what the schema refuses.
        let out = run_abide(&["config", "--config", p.to_str().expect("utf-8")], None, T);
        assert_eq!(out.code, Some(1), "--config {b} accepted\n{out}");
        assert!(out.stderr.contains("invalid VM configuration"), "{out}");
        args.push(p.display().to_string());
    }
    let report = check_schema(&args);
    assert_eq!(report["checked"], 3 + 2 + bad.len(), "{report}");
}

#[test]
fn the_api_builds_what_the_flags_build() {
    let dir = temp_dir("api-config-same");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let disk_opt = format!("path={},serial=vol1,addr=4", disk.display());
    let flags = [
        "--machine",
        "pc-1.0",
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--serial",
        "null",
        "--cmdline",
        "quiet",
        "--disk",
        &disk_opt,
        "--rng",
    ];
    fn with<'a>(cmd: &'a str, flags: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![cmd];
        v.extend_from_slice(flags);
        v
    }
    let config = abide_json(&with("config", &flags));
    let manifest = abide_json(&with("manifest", &flags));
    // --config takes back what `abide config` printed.
    let file = write_json(&dir, "vm.json", &config);
    let f = file.to_str().expect("utf-8");
    assert_eq!(abide_json(&["config", "--config", f]), config);
    assert_eq!(abide_json(&["manifest", "--config", f]), manifest);
    // Flags override the file's fields.
    let over = abide_json(&["config", "--config", f, "--cpus", "3"]);
    assert_eq!(over["cpus"], 3);
    assert_eq!(over["disks"], config["disks"]);

    let a = Abide::serve(&dir, "serve");
    let info = put_ok(&a.socket, "/api/v1/vm.create", Some(&config.to_string()));
    assert_eq!(
        info["config"], config,
        "the API reports the configuration it was given"
    );
    assert_eq!(
        get_ok(&a.socket, "/api/v1/vm.manifest"),
        manifest,
        "vm.create with `abide config`'s JSON gives the guest what the flags give it"
    );
}

#[test]
fn bad_values_are_refused_alike() {
    let dir = temp_dir("api-config-refusals");
    let a = Abide::serve(&dir, "serve");
    let cases: [(&[&str], Value, &str); 6] = [
        (
            &["--disk", "path=/x,bogus=1"],
            json!({"disks": [{"path": "/x", "bogus": 1}]}),
            "bogus",
        ),
        (&["--cpus", "0"], json!({"cpus": 0}), "--cpus 0"),
        (
            &["--memory", "lots"],
            json!({"memory": "lots"}),
            "invalid size 'lots'",
        ),
        (
            &["--net", "tap=t0,mac=01:00:00:00:00:00"],
            json!({"nets": [{"tap": "t0", "mac": "01:00:00:00:00:00"}]}),
            "invalid mac",
        ),
        (
            &["--disk", "path=/x,addr=40"],
            json!({"disks": [{"path": "/x", "addr": 40}]}),
            "invalid addr",
        ),
        (
            &["--machine", "pc-9.9"],
            json!({"machine": "pc-9.9"}),
            "pc-9.9",
        ),
    ];
    for (flags, body, needle) in cases {
        let mut args = vec!["manifest"];
        if !flags.contains(&"--machine") {
            args.extend_from_slice(&["--machine", "pc-1.0"]);
        }
        args.extend_from_slice(flags);
        let out = run_abide(&args, None, T);
        assert_eq!(out.code, Some(1), "{args:?}\n{out}");
        assert!(
            out.stderr.contains(needle),
            "CLI {args:?}: '{needle}' not in\n{out}"
        );
        let mut body = body;
        if body.get("machine").is_none() {
            body["machine"] = json!("pc-1.0");
        }
        let r = put(&a.socket, "/api/v1/vm.create", Some(&body.to_string()));
        assert_eq!(r.status, 400, "API {body}: {r}");
        assert!(
            r.error().contains(needle),
            "API {body}: '{needle}' not in {r}"
        );
    }
    assert_eq!(get_ok(&a.socket, "/api/v1/vm.info")["state"], "not-created");
}
