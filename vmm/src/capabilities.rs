//! What this host offers and what Abide can give a guest: `abide capabilities`
//! (JSON) and `abide machines` (a table).
//!
//! Host facts come from the host's own CPUID, `/proc/cpuinfo`, `/sys/module`
//! and `/dev/kvm`; guest facts come from the machine-type and CPU-model
//! registries in `abide_machines`. A host without a usable `/dev/kvm` still
//! gets a report, with `kvm.available` false and every CPU model unusable.

use std::fmt::Write as _;

use abide_devices::virtio::device_type::{BLOCK, NET, RNG};
use abide_machines::{CpuModel, MachineDescription, VirtioModel};
use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
use serde_json::{json, Value};

use crate::vcpu::cpuid;

/// What this host's KVM supports, or why it cannot be asked.
pub struct HostKvm {
    kvm: Result<Kvm, String>,
    supported: Vec<kvm_cpuid_entry2>,
}

impl HostKvm {
    /// Opens `/dev/kvm` and reads the supported CPUID; errors are recorded,
    /// not returned.
    pub fn probe() -> Self {
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"));
        let supported = match &kvm {
            Ok(k) => k
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map(|c| c.as_slice().to_vec())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        Self { kvm, supported }
    }

    /// KVM's supported CPUID table (empty without KVM).
    pub fn supported(&self) -> &[kvm_cpuid_entry2] {
        &self.supported
    }

    /// What `model` lacks here; everything it needs when there is no KVM.
    pub fn missing(&self, model: &CpuModel) -> Vec<String> {
        if self.kvm.is_err() {
            return vec!["/dev/kvm".to_string()];
        }
        cpuid::missing_features(model, &self.supported)
    }
}

fn host_cpuid(leaf: u32) -> [u32; 4] {
    // SAFETY: CPUID is available on every x86_64 CPU and has no side effects.
    // (`__cpuid` is a safe function on newer toolchains.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid(leaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn words_to_string(words: &[u32]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_matches(char::from(0))
        .trim()
        .to_string()
}

fn host_cpu() -> Value {
    let l0 = host_cpuid(0);
    let vendor = words_to_string(&[l0[1], l0[3], l0[2]]);
    let sig = host_cpuid(1)[0];
    let base_family = (sig >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((sig >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        ((sig >> 4) & 0xf) | (((sig >> 16) & 0xf) << 4)
    } else {
        (sig >> 4) & 0xf
    };
    let brand = if host_cpuid(0x8000_0000)[0] >= 0x8000_0004 {
        let words: Vec<u32> = (0x8000_0002..=0x8000_0004).flat_map(host_cpuid).collect();
        words_to_string(&words)
    } else {
        String::new()
    };
    json!({
        "vendor": vendor,
        "family": family,
        "model": model,
        "stepping": sig & 0xf,
        "brand": brand,
    })
}

fn cpuinfo_has_flag(names: &[&str]) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| names.contains(&f)))
        })
        .unwrap_or(false)
}

/// Whether the host CPU has VT-x or AMD-V.
pub fn hardware_assisted() -> bool {
    cpuinfo_has_flag(&["vmx", "svm"])
}

/// Whether KVM here is PVM (software virtualization).
pub fn pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

const CAPS: &[(&str, Cap)] = &[
    ("irqchip", Cap::Irqchip),
    ("pit2", Cap::Pit2),
    ("irq_routing", Cap::IrqRouting),
    ("irqfd", Cap::Irqfd),
    ("irqfd_resample", Cap::IrqfdResample),
    ("ioeventfd", Cap::Ioeventfd),
    ("signal_msi", Cap::SignalMsi),
    ("immediate_exit", Cap::ImmediateExit),
    ("tsc_deadline", Cap::TscDeadlineTimer),
    ("tsc_control", Cap::TscControl),
    ("get_tsc_khz", Cap::GetTscKhz),
    ("adjust_clock", Cap::AdjustClock),
    ("kvmclock_ctrl", Cap::KvmclockCtrl),
    ("xsave", Cap::Xsave),
    ("xcrs", Cap::Xcrs),
    ("vcpu_events", Cap::VcpuEvents),
    ("debugregs", Cap::Debugregs),
    ("mp_state", Cap::MpState),
    ("split_irqchip", Cap::SplitIrqchip),
    ("x2apic_api", Cap::X2ApicApi),
    ("readonly_mem", Cap::ReadonlyMem),
    ("user_memory2", Cap::UserMemory2),
    ("guest_memfd", Cap::GuestMemfd),
    ("nested_state", Cap::NestedState),
    ("msr_filter", Cap::X86MsrFilter),
    ("dirty_log_ring", Cap::DirtyLogRing),
];

fn kvm_json(host: &HostKvm) -> Value {
    let mut v = json!({
        "hardware_assisted": hardware_assisted(),
        "pvm": pvm(),
        "available": host.kvm.is_ok(),
    });
    match &host.kvm {
        Ok(k) => {
            let caps: serde_json::Map<String, Value> = CAPS
                .iter()
                .map(|(name, cap)| ((*name).to_string(), Value::Bool(k.check_extension(*cap))))
                .collect();
            v["api_version"] = json!(k.get_api_version());
            v["max_vcpus"] = json!(k.get_max_vcpus());
            v["nr_vcpus"] = json!(k.get_nr_vcpus());
            v["nr_memslots"] = json!(k.get_nr_memslots());
            v["caps"] = Value::Object(caps);
            let have = cpuid::supported_features(&host.supported);
            let names = |kvm: bool| -> Vec<&str> {
                abide_machines::KNOWN_FEATURES
                    .iter()
                    .filter(|f| (f.reg == abide_machines::FeatureReg::KvmEax) == kvm)
                    .filter(|f| have.mask(f.reg) & (1 << f.bit) != 0)
                    .map(|f| f.name)
                    .collect()
            };
            v["supported_features"] = json!(names(false));
            v["supported_kvm_features"] = json!(names(true));
            v["phys_bits"] = json!(host
                .supported
                .iter()
                .find(|e| e.function == 0x8000_0008)
                .map_or(0, |e| e.eax & 0xff));
        }
        Err(e) => v["error"] = json!(e),
    }
    v
}

fn virtio_json(name: &str, device_type: u16, m: &VirtioModel, default: bool) -> Value {
    json!({
        "model": name,
        "virtio_device_type": device_type,
        "bus": "pci",
        "vendor_id": m.pci.vendor,
        "device_id": m.pci.device,
        "subsystem_vendor_id": m.pci.subsystem_vendor,
        "subsystem_id": m.pci.subsystem,
        "revision": m.pci.revision,
        "class": m.pci.class,
        "intx_pin": m.intx_pin,
        "queues": m.num_queues,
        "queue_size": m.queue_size,
        "msix_vectors": m.msix_vectors,
        "rom_slot_bytes": m.rom_slot,
        "features": m.features,
        "feature_names": abide_machines::virtio_feature_names(device_type, m.features),
        "config_len": m.config_len,
        "default": default,
    })
}

fn machine_json(info: &abide_machines::MachineTypeInfo, m: &MachineDescription) -> Value {
    let l = &m.legacy;
    let pio = |name: &str, d: &abide_machines::PioDevice| json!({"name": name, "port": d.port, "ports": d.len, "irq": d.irq});
    json!({
        "name": info.name,
        "aliases": info.aliases,
        "default": info.default,
        "deprecated": info.deprecated,
        "max_vcpus": m.max_vcpus,
        "min_memory_bytes": m.min_memory,
        "max_memory_bytes": m.max_memory,
        "default_cpu_model": m.default_cpu_model,
        "pci_host_bridge": {
            "vendor_id": m.pci.host_bridge.vendor,
            "device_id": m.pci.host_bridge.device,
        },
        "devices": [
            virtio_json("virtio-blk", BLOCK, &m.virtio.blk, false),
            virtio_json("virtio-net", NET, &m.virtio.net, false),
            virtio_json("virtio-rng", RNG, &m.virtio.rng, m.default_devices.rng),
        ],
        "legacy_devices": [
            pio("com1", &l.com1),
            pio("i8042", &l.i8042),
            pio("rtc", &l.rtc),
            {"name": "acpi-pm", "port": l.pm.base, "ports": l.pm.len, "irq": l.pm.sci_irq},
            {"name": "acpi-reset", "port": l.reset.port, "ports": 1, "irq": null},
        ],
    })
}

fn machines() -> Vec<(abide_machines::MachineTypeInfo, MachineDescription)> {
    abide_machines::machine_types()
        .into_iter()
        .filter_map(|t| abide_machines::resolve(&t.name).ok().map(|m| (t, m)))
        .collect()
}

/// The warning `abide run` (and restore, receive) prints for a deprecated
/// machine type `name` among `types`; `None` for a supported one. The
/// support policy is in the README ("Compatibility and support policy").
pub fn deprecation_warning(
    types: &[abide_machines::MachineTypeInfo],
    name: &str,
) -> Option<String> {
    let t = types.iter().find(|t| t.name == name && t.deprecated)?;
    let newest = types
        .iter()
        .find(|t| t.default)
        .map_or("pc", |t| t.name.as_str());
    Some(format!(
        "machine type '{}' is deprecated: it stays supported (run, restore, migrate, both directions) for at least two more releases and then may be removed; move guests to '{newest}' at their next cold boot (README, \"Compatibility and support policy\")",
        t.name
    ))
}

/// The `abide capabilities` report.
pub fn report(host: &HostKvm) -> Value {
    let cpu_models: Vec<Value> = abide_machines::cpu_models()
        .iter()
        .map(|m| {
            let missing = host.missing(m);
            json!({
                "name": m.name,
                "description": m.description,
                "usable": missing.is_empty(),
                "missing_features": missing,
                "migratable": m.migratable(),
                "vendor": m.vendor,
                "features": m.features,
                "kvm_features": m.kvm_features,
            })
        })
        .collect();
    json!({
        "host": {
            "arch": std::env::consts::ARCH,
            "cpu": host_cpu(),
            "kvm": kvm_json(host),
        },
        "guest": {
            "arch": "x86_64",
            "machine_types": machines().iter().map(|(i, m)| machine_json(i, m)).collect::<Vec<_>>(),
            "cpu_models": cpu_models,
        },
    })
}

fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if b >= size && b.is_multiple_of(size) {
            return format!("{} {name}", b / size);
        }
    }
    format!("{b} B")
}

/// The `abide machines` table.
pub fn machines_table(host: &HostKvm) -> String {
    let mut rows = vec![[
        "MACHINE".to_string(),
        "ALIASES".to_string(),
        "DEFAULT".to_string(),
        "DEPRECATED".to_string(),
        "CPU MODEL".to_string(),
        "USABLE HERE".to_string(),
        "MAX VCPUS".to_string(),
        "MAX MEMORY".to_string(),
        "NET ROM SLOT".to_string(),
    ]];
    let mut notes = Vec::new();
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    for (info, m) in machines() {
        let missing = abide_machines::cpu_model(&m.default_cpu_model)
            .map(|c| host.missing(&c))
            .unwrap_or_else(|e| vec![e.to_string()]);
        if !missing.is_empty() {
            notes.push(format!(
                "{}: CPU model {} needs {}",
                info.name,
                m.default_cpu_model,
                missing.join(", ")
            ));
        }
        rows.push([
            info.name.clone(),
            if info.aliases.is_empty() {
                "-".to_string()
            } else {
                info.aliases.join(",")
            },
            yes_no(info.default),
            yes_no(info.deprecated),
            m.default_cpu_model.clone(),
            yes_no(missing.is_empty()),
            m.max_vcpus.to_string(),
            human_bytes(m.max_memory),
            m.virtio.net.rom_slot.map_or("-".to_string(), human_bytes),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
        let usable: Vec<String> = abide_machines::cpu_models()
            .into_iter()
            .filter(|c| c.migratable() && host.missing(c).is_empty())
            .map(|c| c.name)
            .collect();
        if !usable.is_empty() {
            let _ = writeln!(
                out,
                "CPU models usable on this host: {} (choose one with --cpu)",
                usable.join(", ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(256 << 30), "256 GiB");
        assert_eq!(human_bytes(128 << 10), "128 KiB");
        assert_eq!(human_bytes(1000), "1000 B");
    }

    #[test]
    fn report_lists_every_machine_and_model_without_kvm() {
        let host = HostKvm {
            kvm: Err("no kvm".to_string()),
            supported: Vec::new(),
        };
        let r = report(&host);
        let types = r["guest"]["machine_types"].as_array().expect("array");
        // Nothing is deprecated yet; a deprecated type would be said so.
        let list = abide_machines::machine_types();
        assert!(list
            .iter()
            .all(|t| deprecation_warning(&list, &t.name).is_none()));
        let mut old = list.clone();
        let last = old.len() - 1;
        old[last].deprecated = true;
        let name = old[last].name.clone();
        let w = deprecation_warning(&old, &name).expect("warning");
        assert!(
            w.contains(&format!("machine type '{name}' is deprecated")),
            "{w}"
        );
        assert!(w.contains("at least two more releases"), "{w}");
        assert_eq!(types.len(), abide_machines::machine_types().len());
        assert_eq!(types[0]["default"], json!(true));
        let models = r["guest"]["cpu_models"].as_array().expect("array");
        assert!(models.iter().all(|m| m["usable"] == json!(false)));
        assert_eq!(r["host"]["kvm"]["available"], json!(false));
        let t = machines_table(&host);
        assert!(t.starts_with("MACHINE"), "{t}");
        assert!(t.contains("pc-1.0"), "{t}");
    }
}
