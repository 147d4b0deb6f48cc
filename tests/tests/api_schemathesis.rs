//! The API spec against the implementation.
//!
//! - `openapi-spec-validator` (PyPI) accepts docs/api/openapi.yaml.
//! - `schemathesis` (PyPI) sends every operation the spec's examples, random
//!   valid requests and random invalid ones (resources/api/schemathesis_run.py),
//!   first to a running VM (`abide run --api-socket`) whose guest must finish
//!   its workload afterwards, then to an `abide serve` (which creates, boots,
//!   pauses, snapshots, powers off, deletes and restores VMs on the way, and
//!   ends with `vmm.shutdown`). No response may be a 5xx the spec does not
//!   document, every response must conform to the spec, every invalid
//!   request must get a 4xx, and no request may hang.
//!
//! The Python tools come from the venv that resources/scripts/setup.sh makes
//! (`.cache/api-venv`, pinned versions); without it these tests fail and say
//! so.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use abide_tests::api::{
    finish_on_power_button, get_ok, put_ok, spec_path, venv_python, wait_for_text, workload_vm,
    Abide,
};
use abide_tests::{repo_root, run_command, temp_dir, GuestLine};
use serde_json::Value;

const T: Duration = Duration::from_secs(180);
/// Examples per operation and generation mode.
const EXAMPLES: &str = "10";
const ROUNDS: u64 = 3000;
const BLK_ITERS: u64 = 2000;

#[test]
fn the_spec_passes_openapi_spec_validator() {
    let out = Command::new(venv_python())
        .args(["-m", "openapi_spec_validator"])
        .arg(spec_path())
        .output()
        .expect("run openapi-spec-validator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("OK"), "{text}");
}

/// Runs the schemathesis driver against `socket`; returns its report.
fn schemathesis(socket: &Path, sandbox: &Path, extra: &[&str]) -> Value {
    let mut cmd = Command::new(venv_python());
    cmd.arg(repo_root().join("resources/api/schemathesis_run.py"))
        .arg("--spec")
        .arg(spec_path())
        .arg("--socket")
        .arg(socket)
        .arg("--sandbox")
        .arg(sandbox)
        .args(["--examples", EXAMPLES])
        .arg("--log")
        .arg(sandbox.with_file_name("requests.jsonl"))
        .args(extra);
    let out = run_command(&mut cmd, None, Duration::from_secs(900));
    assert!(
        !out.timed_out,
        "schemathesis did not finish (a hang?)\n{out}"
    );
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("no report from the schemathesis driver ({e})\n{out}"));
    eprintln!(
        "schemathesis: {} calls to {} operations in {} s (seed {}), {} failures",
        report["calls"],
        report["operations"],
        report["seconds"],
        report["seed"],
        report["failures"]
    );
    for (op, r) in report["report"].as_object().expect("report") {
        eprintln!("  {op}: {}", r["statuses"]);
        // Documented 5xx mean the host failed: worth seeing even when
        // allowed.
        for e in r["server_errors"].as_array().into_iter().flatten() {
            eprintln!("    {}: {} <- {}", e["status"], e["body"], e["request"]);
        }
    }
    assert_eq!(report["failures"], 0, "{report:#}");
    assert_eq!(out.code, Some(0), "{out}");
    report
}

/// Every operation of the spec but `skipped` was called.
fn covers_every_operation(report: &Value, skipped: &[&str]) {
    let spec = std::fs::read_to_string(spec_path()).expect("spec");
    let ops: Vec<String> = spec
        .lines()
        .filter_map(|l| l.strip_prefix("  /api/v1/"))
        .map(|p| p.trim_end_matches(':').to_string())
        .collect();
    assert!(ops.len() >= 19, "{ops:?}");
    let called = report["report"].as_object().expect("report");
    for op in ops {
        if skipped.iter().any(|s| *s == op) {
            continue;
        }
        let hit = called.iter().any(|(label, r)| {
            label.ends_with(&format!("/api/v1/{op}")) && r["calls"].as_u64() > Some(0)
        });
        assert!(hit, "schemathesis never called {op}: {report:#}");
    }
}

#[test]
fn schemathesis_against_a_running_vm_then_a_bare_serve() {
    let dir = temp_dir("api-schemathesis");
    let sandbox = dir.join("sandbox");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("disk");
    let disk_opt = format!("path={}", disk.display());
    let cmdline =
        format!("quiet rounds={ROUNDS} progress buf-kib=1024 blk-loop={BLK_ITERS} power-button");

    // 1. A running VM. Operations that would end it (power-off,
    // vmm.shutdown) or its workload (the power button) are left to the
    // serve run below.
    let (mut vm, log) = workload_vm(&dir, "vm", &["--disk", &disk_opt], &cmdline);
    wait_for_text(&log, "guest: progress round=1 ", T);
    let started = Instant::now();
    let report = schemathesis(
        &vm.socket,
        &sandbox,
        &["--exclude", "powerOff,powerButton,shutdown"],
    );
    covers_every_operation(
        &report,
        &["vm.power-off", "vm.power-button", "vmm.shutdown"],
    );
    eprintln!("running-VM run took {:?}", started.elapsed());
    assert!(vm.running(), "abide ended during the run\n{}", vm.output());
    // Schemathesis may have left it paused, or migrating (to nowhere: the
    // attempt fails and the guest runs on).
    let start = Instant::now();
    while get_ok(&vm.socket, "/api/v1/vm.info")["state"] == "migrating" {
        assert!(start.elapsed() < T, "the migration attempt never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = get_ok(&vm.socket, "/api/v1/vm.info");
    if info["state"] == "paused" {
        put_ok(&vm.socket, "/api/v1/vm.resume", None);
    }
    assert_eq!(get_ok(&vm.socket, "/api/v1/vm.info")["state"], "running");

    // 2. A bare serve, in the same sandbox: the snapshot the first run
    // wrote for the spec's example path is what its restore example reads.
    let mut serve = Abide::serve(&dir, "serve");
    let report = schemathesis(&serve.socket, &sandbox, &["--last", "shutdown"]);
    covers_every_operation(&report, &[]);
    let statuses = |op: &str| report["report"][op]["statuses"].clone();
    for op in [
        "PUT /api/v1/vm.create",
        "PUT /api/v1/vm.boot",
        "PUT /api/v1/vm.restore",
    ] {
        assert!(
            statuses(op).get("200").is_some(),
            "{op} never succeeded: {}",
            statuses(op)
        );
    }
    assert_eq!(
        serve.wait(T),
        Some(0),
        "vmm.shutdown ends the serve\n{}",
        serve.output()
    );

    // The first VM's guest finishes its workload, then shuts down on the
    // power button.
    let text = finish_on_power_button(&mut vm, &log, ROUNDS);
    let blk = text
        .lines()
        .filter_map(GuestLine::parse)
        .find(|l| l.topic == "blk-loop" && l.fields.contains_key("iters"))
        .unwrap_or_else(|| panic!("no blk-loop summary\n{text}"));
    assert_eq!(
        (blk.num("iters"), blk.num("errors")),
        (BLK_ITERS, 0),
        "{text}"
    );
}
