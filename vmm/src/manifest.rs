//! The guest ABI manifest: everything a guest can observe about its VM,
//! fully expanded from the machine type and the configuration, kept apart
//! from host-side settings (paths, taps, sinks) that a guest cannot see.
//!
//! [`describe`] builds the same devices a VM would get, detached from any
//! hypervisor, and reads back what the guest would see. [`diff`] compares
//! two manifests field by field.

use std::path::PathBuf;
use std::sync::Arc;

use abide_devices::pci::config::BarKind;
use abide_devices::GuestMem;
use abide_devices::{Bus, ExitSignal};
use abide_machines::{BootLayout, LegacyDevices, MachineDescription, MemoryMap};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use vm_memory::GuestAddress;

use crate::config::{KernelSource, SerialConfig, VmConfig};
use crate::devices_config::NetBackend;
use crate::pci::PciPlatform;
use crate::virtio::{attach_all, DetachedWiring, VirtioAttach};
use crate::Error;

/// Version of the manifest format.
pub const FORMAT: u32 = 1;

/// One CPUID leaf as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    /// EAX input.
    pub function: u32,
    /// ECX input.
    pub index: u32,
    /// Output registers.
    pub eax: u32,
    /// Output.
    pub ebx: u32,
    /// Output.
    pub ecx: u32,
    /// Output.
    pub edx: u32,
}

/// The CPU a guest sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuAbi {
    /// CPU model name.
    pub model: String,
    /// CPUID of each vCPU, in vCPU order.
    pub cpuid: Vec<Vec<CpuidLeaf>>,
}

/// One e820 entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Abi {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type (1 RAM, 2 reserved).
    pub kind: u32,
}

/// Guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryAbi {
    /// RAM size.
    pub bytes: u64,
    /// The machine's memory map.
    pub map: MemoryMap,
    /// The e820 map handed to the guest.
    pub e820: Vec<E820Abi>,
}

/// A BAR as programmed before the guest touches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarAbi {
    /// Index.
    pub index: usize,
    /// mem32, mem64 or io.
    pub kind: String,
    /// Size.
    pub size: u64,
    /// Address assigned by the platform.
    pub address: u64,
}

/// An expansion ROM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RomAbi {
    /// ROM BAR size: the machine's slot, or the device's `romsize=`.
    pub slot_size: u64,
    /// Whether `romsize=` set the slot size instead of the machine type.
    pub slot_overridden: bool,
    /// Address assigned by the platform.
    pub address: u64,
    /// Size of the image in the slot (0 when no image).
    pub image_size: u64,
    /// SHA-256 of the image.
    pub image_sha256: Option<String>,
}

/// The virtio facts of a function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioAbi {
    /// Virtio device type.
    pub device_type: u16,
    /// Features offered.
    pub features: u64,
    /// Maximum size of each queue.
    pub queue_sizes: Vec<u16>,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// Device configuration space, hex.
    pub config: String,
}

/// One PCI function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionAbi {
    /// Bus:device.function.
    pub bdf: String,
    /// Model name.
    pub model: String,
    /// The first 256 bytes of configuration space, hex.
    pub config: String,
    /// BARs.
    pub bars: Vec<BarAbi>,
    /// Expansion ROM.
    pub rom: Option<RomAbi>,
    /// Virtio details.
    pub virtio: Option<VirtioAbi>,
}

/// PCI bus 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciAbi {
    /// The machine's PCI layout.
    pub layout: abide_machines::PciLayout,
    /// Functions in slot order.
    pub functions: Vec<FunctionAbi>,
}

/// One ACPI table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiTableAbi {
    /// Signature (RSDP for the root pointer).
    pub signature: String,
    /// Guest physical address.
    pub address: u64,
    /// Length.
    pub length: u64,
    /// SHA-256 of the bytes.
    pub sha256: String,
}

/// The firmware a `--firmware` guest boots (absent for direct boot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareAbi {
    /// The machine type's firmware slot.
    pub slot_size: u64,
    /// Where the image is mapped (read-only, ending at 4 GiB).
    pub address: u64,
    /// Size of the image.
    pub image_size: u64,
    /// SHA-256 of the image the guest runs (after a restore, the saved one).
    pub image_sha256: String,
    /// The writable shadow copy of the image's end below 1 MiB: start.
    pub shadow_address: u64,
    /// Its size.
    pub shadow_size: u64,
    /// The fw_cfg interface and the debug port.
    pub fw_cfg: abide_machines::FwCfgPorts,
    /// The debug console port.
    pub debug_port: u16,
}

/// Everything a guest can observe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Canonical machine type.
    pub machine: String,
    /// Whether the VM may move to another host (false for `--cpu host`).
    pub migratable: bool,
    /// vCPU count.
    pub vcpus: u32,
    /// Memory.
    pub memory: MemoryAbi,
    /// Boot structure placement.
    pub boot: BootLayout,
    /// Legacy devices.
    pub legacy: LegacyDevices,
    /// CPU.
    pub cpu: CpuAbi,
    /// PCI.
    pub pci: PciAbi,
    /// ACPI tables.
    pub acpi: Vec<AcpiTableAbi>,
    /// Firmware boot (added after 0.3.0; absent means direct boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareAbi>,
    /// A field "added after a release", in the test build only: it proves
    /// the schema evolution rule (`crate::compat::schema`): omitted at its
    /// default, and absent compares as the default.
    #[cfg(test)]
    #[serde(default, skip_serializing_if = "is_zero")]
    pub test_added_later: u32,
}

#[cfg(test)]
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Host-side settings: they can change without the guest noticing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    /// Machine type as requested (an alias stays an alias here).
    pub requested_machine: String,
    /// Kernel file (None for the embedded guest).
    pub kernel: Option<PathBuf>,
    /// initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// COM1 sink.
    pub serial: String,
    /// Disk image paths and O_DIRECT, by slot.
    pub disks: Vec<HostDisk>,
    /// Network backends, by slot.
    pub nets: Vec<HostNet>,
}

/// Host side of a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDisk {
    /// PCI slot.
    pub slot: u8,
    /// Image.
    pub path: PathBuf,
    /// O_DIRECT.
    pub direct: bool,
}

/// Host side of a NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNet {
    /// PCI slot.
    pub slot: u8,
    /// `tap:NAME` or `fd:N`.
    pub backend: String,
    /// Option ROM file.
    pub rom: Option<PathBuf>,
}

/// What `abide manifest` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// The guest ABI.
    pub abi: Manifest,
    /// Host-side settings.
    pub host: HostConfig,
}

/// SHA-256 of `bytes`, lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn bar_kind(k: BarKind) -> &'static str {
    match k {
        BarKind::Mem32 => "mem32",
        BarKind::Mem64 => "mem64",
        BarKind::Io => "io",
    }
}

/// The bus and device models a VM gets, wired to nothing: what [`describe`]
/// reads back, and what tests read the way a guest would (configuration
/// cycles on `pio`, BAR accesses on `mmio`).
pub struct DetachedPlatform {
    /// The port bus: PCI configuration mechanism #1 is on it.
    pub pio: Arc<Bus>,
    /// The MMIO bus: ECAM, and the BARs once decode is enabled.
    pub mmio: Arc<Bus>,
    /// PCI bus 0, BARs assigned.
    pub pci: PciPlatform,
    _exit: ExitSignal,
}

impl std::fmt::Debug for DetachedPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetachedPlatform")
            .field("pci", &self.pci)
            .finish_non_exhaustive()
    }
}

impl DetachedPlatform {
    /// Builds `machine`'s PCI platform with the devices of `backends` and
    /// assigns BARs, without a hypervisor.
    pub fn build(
        machine: &MachineDescription,
        backends: crate::backends::Backends,
    ) -> Result<Self, Error> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let exit = ExitSignal::new().map_err(Error::EventFd)?;
        let pci = PciPlatform::new(machine, &pio, &mmio, &exit)?;
        let scratch = GuestMem::from_ranges(&[(GuestAddress(0), 4096)]).map_err(|e| {
            Error::Memory(crate::memory::MemoryError::Map {
                addr: 0,
                size: 4096,
                reason: e.to_string(),
            })
        })?;
        attach_all(
            &VirtioAttach {
                machine,
                wiring: &DetachedWiring,
                mem: &scratch,
                pci: &pci,
            },
            backends,
        )?;
        pci.assign_resources(machine)?;
        Ok(Self {
            pio,
            mmio,
            pci,
            _exit: exit,
        })
    }
}

/// Builds the guest ABI manifest for `cfg` on `machine` without starting a
/// VM. `cpuid` gives each vCPU's CPUID and whether the CPU is migratable.
pub fn describe(
    machine: &MachineDescription,
    cfg: &VmConfig,
    cpu: CpuAbi,
    migratable: bool,
) -> Result<Description, Error> {
    cfg.validate(machine)?;
    crate::irq::check_irqchip(machine)?;
    let backends = crate::backends::open_for(machine, cfg, crate::backends::Purpose::Describe)?;
    let host = host_config(cfg, &backends);
    let overridden: Vec<u8> = backends
        .nets
        .iter()
        .filter(|n| n.rom_slot_overridden)
        .map(|n| n.slot)
        .collect();

    let platform = DetachedPlatform::build(machine, backends)?;
    let pci = &platform.pci;

    let virtio = pci.virtio.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let slots = pci.root.lock().unwrap_or_else(|e| e.into_inner()).slots();
    let mut functions = Vec::new();
    for slot in slots {
        let (bars, rom) = pci
            .root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resources(slot);
        let (model, virtio, image) = match virtio.iter().find(|f| f.slot == slot) {
            Some(f) => {
                let func = f.function.lock().unwrap_or_else(|e| e.into_inner());
                let d = func.describe();
                let image = abide_devices::pci::PciFunction::rom(&*func).map(<[u8]>::to_vec);
                let abi = VirtioAbi {
                    device_type: d.device_type,
                    features: d.features,
                    queue_sizes: d.queue_sizes,
                    msix_vectors: d.msix_vectors,
                    config: hex::encode(&d.config),
                };
                (f.model.to_string(), Some(abi), image)
            }
            None => ("host-bridge".to_string(), None, None),
        };
        functions.push(FunctionAbi {
            bdf: format!("00:{slot:02x}.0"),
            model,
            config: hex::encode(pci.config_space(slot)),
            bars: bars
                .into_iter()
                .map(|(index, spec, address)| BarAbi {
                    index,
                    kind: bar_kind(spec.kind).to_string(),
                    size: spec.size,
                    address,
                })
                .collect(),
            rom: rom.map(|(slot_size, address)| RomAbi {
                slot_size,
                slot_overridden: overridden.contains(&slot),
                address,
                image_size: image.as_ref().map_or(0, |i| i.len() as u64),
                image_sha256: image.as_deref().map(sha256_hex),
            }),
            virtio,
        });
    }

    let tables = abide_firmware::acpi::build(machine, cfg.cpus)?;
    let acpi = tables
        .blobs
        .iter()
        .map(|(addr, blob)| AcpiTableAbi {
            signature: if *addr == tables.rsdp_addr {
                "RSDP".to_string()
            } else {
                String::from_utf8_lossy(&blob[..4.min(blob.len())]).into_owned()
            },
            address: *addr,
            length: blob.len() as u64,
            sha256: sha256_hex(blob),
        })
        .collect();
    let firmware = match &cfg.firmware {
        Some(f) => {
            let image = crate::firmware::image(machine, f)?;
            let l = &machine.firmware;
            Some(FirmwareAbi {
                slot_size: l.slot_size,
                address: l.image_addr(image.len() as u64),
                image_size: image.len() as u64,
                image_sha256: sha256_hex(&image),
                shadow_address: l.low_alias_addr(image.len() as u64),
                shadow_size: l.low_alias_len(image.len() as u64),
                fw_cfg: l.fw_cfg,
                debug_port: l.debug_port,
            })
        }
        None => None,
    };
    let e820 = abide_firmware::e820::build(machine, cfg.memory)
        .iter()
        .map(|e| E820Abi {
            addr: e.addr,
            size: e.size,
            kind: e.kind as u32,
        })
        .collect();

    Ok(Description {
        abi: Manifest {
            format: FORMAT,
            machine: machine.name.clone(),
            migratable,
            vcpus: cfg.cpus,
            memory: MemoryAbi {
                bytes: cfg.memory,
                map: machine.memory.clone(),
                e820,
            },
            boot: machine.boot,
            legacy: machine.legacy.clone(),
            cpu,
            pci: PciAbi {
                layout: machine.pci.clone(),
                functions,
            },
            acpi,
            firmware,
            #[cfg(test)]
            test_added_later: 0,
        },
        host,
    })
}

fn host_config(cfg: &VmConfig, b: &crate::backends::Backends) -> HostConfig {
    HostConfig {
        requested_machine: cfg.machine.clone(),
        kernel: match &cfg.kernel {
            KernelSource::Path(p) => Some(p.clone()),
            KernelSource::Embedded => None,
        },
        initrd: cfg.initrd.clone(),
        cmdline: cfg.cmdline.clone(),
        serial: match &cfg.serial {
            SerialConfig::Stdio => "stdio".to_string(),
            SerialConfig::Null => "null".to_string(),
            SerialConfig::File(p) => format!("file:{}", p.display()),
        },
        disks: b
            .disks
            .iter()
            .map(|d| HostDisk {
                slot: d.slot,
                path: d.config.path.clone(),
                direct: d.config.direct,
            })
            .collect(),
        nets: b
            .nets
            .iter()
            .map(|n| HostNet {
                slot: n.slot,
                backend: match &n.config.backend {
                    NetBackend::Tap(t) => format!("tap:{t}"),
                    NetBackend::Fd(fd) => format!("fd:{fd}"),
                },
                rom: n.config.rom.clone(),
            })
            .collect(),
    }
}

/// One field that differs between two manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// Path of the field, e.g. `pci.functions[1].rom.slot_size`.
    pub path: String,
    /// Value on the left (`None`: absent).
    pub left: Option<String>,
    /// Value on the right.
    pub right: Option<String>,
    /// What changes for the guest, in words, when the field is one a
    /// person knows by name (`crate::compat::words`).
    pub words: Option<String>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".to_string());
        let raw = format!(
            "{}: {} -> {}",
            self.path,
            show(&self.left),
            show(&self.right)
        );
        match &self.words {
            Some(w) => write!(f, "{w} [{raw}]"),
            None => f.write_str(&raw),
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 48 => format!("\"{}…\" ({} chars)", &s[..40], s.len()),
        Value::Array(a) => format!("[{} entries]", a.len()),
        Value::Object(_) => "{…}".to_string(),
        other => other.to_string(),
    }
}

/// The two whole manifests a walk compares (for the words of a difference).
struct Roots<'a> {
    a: &'a Value,
    b: &'a Value,
}

fn difference(roots: &Roots<'_>, path: String, l: Option<&Value>, r: Option<&Value>) -> Difference {
    Difference {
        words: crate::compat::words::explain(&path, roots.a, roots.b, l, r),
        left: l.map(show),
        right: r.map(show),
        path,
    }
}

fn walk(roots: &Roots<'_>, path: &str, a: &Value, b: &Value, out: &mut Vec<Difference>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(l), Some(r)) => walk(roots, &p, l, r, out),
                    (l, r) => out.push(difference(roots, p, l, r)),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let p = format!("{path}[{i}]");
                match (x.get(i), y.get(i)) {
                    (Some(l), Some(r)) => walk(roots, &p, l, r, out),
                    (l, r) => out.push(difference(roots, p, l, r)),
                }
            }
        }
        _ if a != b => out.push(difference(roots, path.to_string(), Some(a), Some(b))),
        _ => {}
    }
}

/// Every field that differs between `a` and `b`, in a stable order.
pub fn diff(a: &Manifest, b: &Manifest) -> Vec<Difference> {
    let (Ok(x), Ok(y)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return vec![Difference {
            path: String::new(),
            left: Some("(unserializable)".into()),
            right: Some("(unserializable)".into()),
            words: None,
        }];
    };
    diff_values(&x, &y)
}

/// Every field that differs between two manifests in JSON form. Fields
/// added after a release compare equal when one side lacks them and the
/// other holds their default (`crate::compat::schema`).
pub fn diff_values(a: &Value, b: &Value) -> Vec<Difference> {
    let (mut a, mut b) = (a.clone(), b.clone());
    crate::compat::schema::normalize(&mut a);
    crate::compat::schema::normalize(&mut b);
    let mut out = Vec::new();
    walk(&Roots { a: &a, b: &b }, "", &a, &b, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> CpuAbi {
        CpuAbi {
            model: "test".into(),
            cpuid: vec![vec![CpuidLeaf {
                function: 1,
                index: 0,
                eax: 0x806f0,
                ebx: 0,
                ecx: 0x8000_0000,
                edx: 0x178b_fbff,
            }]],
        }
    }

    fn manifest(machine: &str, cfg: &VmConfig) -> Manifest {
        let m = abide_machines::resolve(machine).expect("machine");
        describe(&m, cfg, cpu(), true).expect("describe").abi
    }

    #[test]
    fn identical_configs_have_no_differences() {
        let cfg = VmConfig::default();
        let a = manifest("pc-1.0", &cfg);
        let b = manifest("pc-1.0", &cfg);
        assert!(diff(&a, &b).is_empty());
        // Deterministic serialization too.
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            serde_json::to_string(&b).expect("json")
        );
    }

    #[test]
    fn machine_types_differ_field_by_field() {
        let cfg = VmConfig::default();
        let a = manifest("pc-1.0", &cfg);
        let b = manifest("pc-2.0", &cfg);
        let d = diff(&a, &b);
        let paths: Vec<&str> = d.iter().map(|x| x.path.as_str()).collect();
        assert!(paths.contains(&"machine"), "{paths:?}");
        // pc-2.0 has a default rng: one more PCI function.
        assert!(paths.contains(&"pci.functions[1]"), "{paths:?}");
        let text: Vec<String> = d.iter().map(ToString::to_string).collect();
        // In words, with the raw field kept.
        assert!(
            text.contains(
                &"machine type: pc-1.0 -> pc-2.0 [machine: \"pc-1.0\" -> \"pc-2.0\"]".to_string()
            ),
            "{text:?}"
        );
    }

    #[test]
    fn host_side_settings_stay_out_of_the_abi() {
        let a = VmConfig::default();
        let b = VmConfig {
            cmdline: "other".into(),
            serial: SerialConfig::Null,
            ..VmConfig::default()
        };
        let m = abide_machines::pc_1_0();
        let da = describe(&m, &a, cpu(), true).expect("a");
        let db = describe(&m, &b, cpu(), true).expect("b");
        assert!(diff(&da.abi, &db.abi).is_empty());
        assert_ne!(da.host, db.host);
    }

    /// The schema evolution rule, with a field the test build adds: at its
    /// default it is left out (an older reader sees the manifest it knows),
    /// an older manifest without it compares equal, and a guest that uses
    /// it differs from an older one in a way the diff names.
    #[test]
    fn a_field_added_later_is_omitted_at_its_default_and_absent_means_default() {
        let cfg = VmConfig::default();
        let new = manifest("pc-1.0", &cfg);
        let json = serde_json::to_value(&new).expect("json");
        assert!(
            json.get("test_added_later").is_none(),
            "omitted at its default"
        );
        // An "older" manifest: as a release before the field wrote it.
        let mut old = json.clone();
        old.as_object_mut()
            .expect("object")
            .remove("test_added_later");
        assert!(diff_values(&old, &json).is_empty());
        // Spelled out at its default, it still compares equal to absent.
        let mut explicit = json.clone();
        explicit["test_added_later"] = serde_json::json!(0);
        assert!(diff_values(&old, &explicit).is_empty());
        assert!(diff_values(&explicit, &old).is_empty());
        // An older manifest parses into this build's schema as the default.
        let parsed: Manifest = serde_json::from_value(old.clone()).expect("parses");
        assert_eq!(parsed.test_added_later, 0);
        assert_eq!(parsed, new);
        // A guest that uses the field differs, both ways.
        let mut used = new.clone();
        used.test_added_later = 7;
        let used = serde_json::to_value(&used).expect("json");
        let d = diff_values(&old, &used);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_string(), "test_added_later: (absent) -> 7");
        assert_eq!(diff_values(&used, &old).len(), 1);
    }

    #[test]
    fn changed_cpuid_bit_is_reported() {
        let cfg = VmConfig::default();
        let a = manifest("pc-1.0", &cfg);
        let mut b = a.clone();
        b.cpu.cpuid[0][0].ecx ^= 1 << 19;
        let d = diff(&a, &b);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].path, "cpu.cpuid[0][0].ecx");
    }
}
