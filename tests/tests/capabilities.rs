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
    let registry = abide_machines::machine_types();
    let want: Vec<&str> = registry.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, want, "the registry, newest (default) first");
    for (t, info) in types.iter().zip(&registry) {
        let m = abide_machines::resolve(&info.name).expect("machine");
        assert_eq!(t["default"], info.default, "{}", info.name);
        assert_eq!(t["default"], info.name == abide_machines::newest());
        assert_eq!(strings(&t["aliases"]), info.aliases, "{}", info.name);
        assert_eq!(t["default_cpu_model"], m.default_cpu_model.as_str());
        assert_eq!(t["max_vcpus"], m.max_vcpus);
        assert_eq!(t["max_memory_bytes"], m.max_memory);
        assert_eq!(t["deprecated"], info.deprecated);
        let devs = t["devices"].as_array().expect("devices");
        let net = devs
            .iter()
            .find(|d| d["model"] == "virtio-net")
            .expect("virtio-net");
        assert_eq!(
            net["rom_slot_bytes"],
            serde_json::to_value(m.virtio.net.rom_slot).expect("json")
        );
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
            .any(|d| d["name"] == "com1" && d["port"] == m.legacy.com1.port));
    }
    // (tests/declared_offered.rs compares every reported device field.)

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

/// Named, migratable CPU models usable here, in registry order.
fn usable_models(caps: &Value) -> Vec<String> {
    abide_machines::cpu_models()
        .into_iter()
        .filter(|m| m.migratable() && cpu_model(caps, &m.name)["usable"] == true)
        .map(|m| m.name)
        .collect()
}

#[test]
fn default_machine_boots_or_is_refused_by_cpu_model() {
    let caps = capabilities();
    let default = abide_machines::newest();
    let model = abide_machines::resolve(default)
        .expect("newest")
        .default_cpu_model;
    let entry = cpu_model(&caps, &model);
    let usable = usable_models(&caps);
    // The hint names another machine type whose default model runs here,
    // and a model that runs here.
    let other_machine = abide_machines::machine_types()
        .into_iter()
        .filter(|t| t.name != default)
        .find(|t| {
            let m = abide_machines::resolve(&t.name).expect("machine");
            usable.contains(&m.default_cpu_model)
        })
        .map(|t| t.name);
    let other_model = usable.iter().rfind(|m| **m != model).cloned();
    for machine in [default, abide_machines::types_alias()] {
        let args = ["run", "--machine", machine, "--serial", "null"];
        if entry["usable"] == true {
            let out = run_abide(&args, None, TIMEOUT);
            assert_eq!(out.code, Some(0), "{model} is usable here\n{out}");
            continue;
        }
        let mut needles = vec![
            format!("CPU model '{model}'"),
            format!("default of machine type '{default}'"),
        ];
        needles.extend(other_machine.iter().map(|m| format!("--machine {m}")));
        needles.extend(other_model.iter().map(|m| format!("--cpu {m}")));
        needles.extend(
            strings(&entry["missing_features"])
                .iter()
                .map(|f| f.to_string()),
        );
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        refused(&args, &needles);
    }
    // Choosing the model explicitly names only the model.
    if entry["usable"] != true {
        let oldest = abide_machines::machine_types()
            .last()
            .map(|t| t.name.clone())
            .expect("a machine type");
        let args = ["run", "--machine", oldest.as_str(), "--cpu", model.as_str()];
        let needs = format!("CPU model '{model}' needs");
        let mut needles = vec![needs.as_str()];
        let hint = other_model.as_ref().map(|m| format!("--cpu {m}"));
        needles.extend(hint.as_deref());
        let out = refused(&args, &needles);
        assert!(!out.stderr.contains("default of"), "{out}");
    }
}

#[test]
fn unknown_names_list_the_valid_ones() {
    let models: Vec<String> = abide_machines::cpu_models()
        .into_iter()
        .map(|m| m.name)
        .collect();
    let mut needles = vec!["unknown CPU model 'pentium4'"];
    needles.extend(models.iter().map(String::as_str));
    refused(&["run", "--cpu", "pentium4"], &needles);
    let types: Vec<String> = abide_machines::machine_types()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let mut needles = vec![
        "unknown machine type 'pc-0.5'",
        abide_machines::types_alias(),
    ];
    needles.extend(types.iter().map(String::as_str));
    refused(&["run", "--machine", "pc-0.5"], &needles);
}

#[test]
fn explicit_cpu_models_boot_the_test_guest() {
    // abide-v1 runs everywhere: every machine type boots with it; `host`
    // too, on the newest.
    let mut runs: Vec<(String, &str)> = abide_machines::machine_types()
        .into_iter()
        .map(|t| (t.name, "abide-v1"))
        .collect();
    runs.push((abide_machines::newest().to_string(), "host"));
    for (machine, cpu) in &runs {
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
fn machines_table_lists_every_type() {
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
    let caps = capabilities();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    for t in abide_machines::machine_types() {
        let m = abide_machines::resolve(&t.name).expect("machine");
        let r = row(&t.name);
        let aliases = if t.aliases.is_empty() {
            "-".to_string()
        } else {
            t.aliases.join(",")
        };
        let usable = cpu_model(&caps, &m.default_cpu_model)["usable"] == true;
        assert_eq!(
            r[1..6],
            [
                aliases.as_str(),
                yes_no(t.default),
                yes_no(t.deprecated),
                m.default_cpu_model.as_str(),
                yes_no(usable),
            ],
            "{out}"
        );
        assert_eq!(r[6], m.max_vcpus.to_string(), "{out}");
        if let Some(slot) = m.virtio.net.rom_slot {
            assert_eq!(
                r[r.len() - 2..],
                [(slot >> 10).to_string().as_str(), "KiB"],
                "{out}"
            );
        }
        if !usable {
            assert!(
                out.stdout.contains(&format!(
                    "{}: CPU model {} needs ",
                    t.name, m.default_cpu_model
                )),
                "{out}"
            );
        }
    }
}
