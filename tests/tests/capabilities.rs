//! `abide capabilities`, `abide machines` and CPU models: what the host
//! offers, which machine types and CPU models exist, and how `abide run`
//! refuses a CPU model the host cannot run.

use std::time::Duration;

use abide_tests::{host_has_hw_virt, run_abide, Outcome};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

fn capabilities() -> Value {
    let out = run_abide(&["capabilities"], None, TIMEOUT);
    assert_eq!(out.code, Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{out}"))
}

fn cpu_model<'a>(caps: &'a Value, name: &str) -> &'a Value {
    caps["guest"]["cpu_models"]
        .as_array()
        .expect("cpu_models")
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no CPU model {name}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

fn refused(args: &[&str], needles: &[&str]) -> Outcome {
    let out = run_abide(args, None, TIMEOUT);
    assert_eq!(out.code, Some(1), "{out}");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line\n{out}");
    assert!(err.starts_with("abide: error: "), "{out}");
    for n in needles {
        assert!(err.contains(n), "error should mention '{n}'\n{out}");
    }
    assert!(out.stdout.is_empty(), "no guest should have run\n{out}");
    out
}

#[test]
fn capabilities_describe_host_and_guest() {
    let caps = capabilities();
    let host = &caps["host"];
    assert_eq!(host["arch"], "x86_64");
    for key in ["vendor", "family", "model", "stepping", "brand"] {
        assert!(!host["cpu"][key].is_null(), "host cpu {key}\n{caps:#}");
    }
    let kvm = &host["kvm"];
    assert_eq!(kvm["available"], true, "{caps:#}");
    assert_eq!(kvm["hardware_assisted"], host_has_hw_virt(), "{caps:#}");
    assert_eq!(kvm["pvm"], abide_tests::host_is_pvm(), "{caps:#}");
    assert_eq!(kvm["api_version"], 12);
    assert!(kvm["max_vcpus"].as_u64().expect("max_vcpus") >= 1);
    for cap in ["irqchip", "pit2", "irq_routing", "irqfd", "ioeventfd"] {
        assert_eq!(kvm["caps"][cap], true, "Abide needs {cap}\n{caps:#}");
    }
    assert!(kvm["caps"]["immediate_exit"].is_boolean());
    let features = strings(&kvm["supported_features"]);
    for f in ["fpu", "sse2", "lm", "nx"] {
        assert!(features.contains(&f), "{f} in {features:?}");
    }

    let guest = &caps["guest"];
    assert_eq!(guest["arch"], "x86_64");
    let types = guest["machine_types"].as_array().expect("machine_types");
    let names: Vec<&str> = types
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["pc-2.0", "pc-1.0"], "newest (default) first");
    assert_eq!(types[0]["default"], true);
    assert_eq!(types[1]["default"], false);
    assert_eq!(strings(&types[0]["aliases"]), ["pc"]);
    assert_eq!(types[0]["default_cpu_model"], "abide-v2");
    assert_eq!(types[1]["default_cpu_model"], "abide-v1");
    for (t, rom) in types.iter().zip([256 << 10, 128 << 10]) {
        let m = abide_machines::resolve(t["name"].as_str().expect("name")).expect("machine");
        assert_eq!(t["max_vcpus"], m.max_vcpus);
        assert_eq!(t["max_memory_bytes"], m.max_memory);
        assert_eq!(t["deprecated"], false);
        let devs = t["devices"].as_array().expect("devices");
        let net = devs
            .iter()
            .find(|d| d["model"] == "virtio-net")
            .expect("virtio-net");
        assert_eq!(net["rom_slot_bytes"], rom);
        let blk = devs
            .iter()
            .find(|d| d["model"] == "virtio-blk")
            .expect("virtio-blk");
        assert_eq!(blk["queues"], m.virtio.blk.num_queues);
        assert_eq!(blk["msix_vectors"], m.virtio.blk.msix_vectors);
        assert_eq!(blk["device_id"], m.virtio.blk.pci.device);
        assert!(t["legacy_devices"]
            .as_array()
            .expect("legacy")
            .iter()
            .any(|d| d["name"] == "com1" && d["port"] == 0x3f8));
    }

    let v1 = cpu_model(&caps, "abide-v1");
    assert_eq!(v1["usable"], true, "abide-v1 runs everywhere\n{caps:#}");
    assert_eq!(v1["migratable"], true);
    assert!(v1["missing_features"]
        .as_array()
        .expect("missing")
        .is_empty());
    let v2 = cpu_model(&caps, "abide-v2");
    assert_eq!(v2["migratable"], true);
    assert_eq!(
        v2["usable"],
        v2["missing_features"]
            .as_array()
            .expect("missing")
            .is_empty()
    );
    // Every missing feature is one KVM does not offer.
    for f in strings(&v2["missing_features"]) {
        assert!(!features.contains(&f), "{f} is supported");
    }
    let host_model = cpu_model(&caps, "host");
    assert_eq!(host_model["migratable"], false);
    assert_eq!(host_model["usable"], true);
}

#[test]
fn pvm_host_is_reported_as_such() {
    let caps = capabilities();
    let kvm = &caps["host"]["kvm"];
    if host_has_hw_virt() {
        assert_eq!(kvm["hardware_assisted"], true);
        return;
    }
    // No vmx/svm: the only KVM that works is PVM, and it lacks SSE3 and
    // later in leaf 1, so abide-v2 cannot run.
    assert_eq!(kvm["pvm"], true, "{kvm:#}");
    assert_eq!(kvm["hardware_assisted"], false);
    let v2 = cpu_model(&caps, "abide-v2");
    assert_eq!(v2["usable"], false, "{v2:#}");
}

#[test]
fn default_machine_boots_or_is_refused_by_cpu_model() {
    let caps = capabilities();
    let v2 = cpu_model(&caps, "abide-v2");
    for machine in ["pc-2.0", "pc"] {
        let args = ["run", "--machine", machine, "--serial", "null"];
        if v2["usable"] == true {
            let out = run_abide(&args, None, TIMEOUT);
            assert_eq!(out.code, Some(0), "abide-v2 is usable here\n{out}");
            continue;
        }
        let missing = strings(&v2["missing_features"]);
        let mut needles = vec![
            "CPU model 'abide-v2'",
            "default of machine type 'pc-2.0'",
            "--machine pc-1.0",
            "--cpu abide-v1",
        ];
        needles.extend(missing.iter().copied());
        refused(&args, &needles);
    }
    // Choosing the model explicitly names only the model.
    if v2["usable"] != true {
        let out = refused(
            &["run", "--machine", "pc-1.0", "--cpu", "abide-v2"],
            &["CPU model 'abide-v2' needs", "--cpu abide-v1"],
        );
        assert!(!out.stderr.contains("default of"), "{out}");
    }
}

#[test]
fn unknown_names_list_the_valid_ones() {
    refused(
        &["run", "--cpu", "pentium4"],
        &[
            "unknown CPU model 'pentium4'",
            "abide-v1",
            "abide-v2",
            "host",
        ],
    );
    refused(
        &["run", "--machine", "pc-0.5"],
        &["unknown machine type 'pc-0.5'", "pc-1.0", "pc-2.0", "pc"],
    );
}

#[test]
fn explicit_cpu_models_boot_the_test_guest() {
    for (machine, cpu) in [
        ("pc-2.0", "host"),
        ("pc-1.0", "abide-v1"),
        ("pc-2.0", "abide-v1"),
    ] {
        let out = run_abide(
            &["run", "--machine", machine, "--cpu", cpu, "--cpus", "2"],
            None,
            TIMEOUT,
        );
        assert_eq!(out.code, Some(0), "{machine} --cpu {cpu}\n{out}");
        assert_eq!(out.one("cpus").num("online"), 2, "{out}");
        out.one("done");
    }
}

#[test]
fn machines_table_lists_both_types() {
    let out = run_abide(&["machines"], None, TIMEOUT);
    assert_eq!(out.code, Some(0), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("MACHINE"), "{out}");
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let pc2 = row("pc-2.0");
    assert_eq!(pc2[1..5], ["pc", "yes", "no", "abide-v2"], "{out}");
    let pc1 = row("pc-1.0");
    assert_eq!(pc1[1..6], ["-", "no", "no", "abide-v1", "yes"], "{out}");
    assert!(
        out.stdout.contains("256 KiB") && out.stdout.contains("128 KiB"),
        "{out}"
    );
    let v2_usable = cpu_model(&capabilities(), "abide-v2")["usable"] == true;
    assert_eq!(pc2[5], if v2_usable { "yes" } else { "no" }, "{out}");
    if !v2_usable {
        assert!(
            out.stdout.contains("pc-2.0: CPU model abide-v2 needs "),
            "{out}"
        );
    }
}
