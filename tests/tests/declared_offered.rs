//! Declared equals offered: for every machine type in the registry, build the
//! devices a VM gets (every virtio model the machine describes, the host
//! bridge), read back what each offers the way a guest does — configuration
//! cycles through CONFIG_ADDRESS/CONFIG_DATA, then BAR 0 with memory decode
//! on: the virtio common configuration (feature words, `num_queues`, each
//! queue's size) and the device configuration — and compare field by field
//! with the machine description. `abide capabilities` must report the same.
//!
//! No KVM is needed: the platform is built detached (as `abide manifest`
//! does), and the buses are driven directly.

use std::path::Path;
use std::time::Duration;

use abide_machines::{MachineDescription, PciIdentity, VirtioCap, VirtioModel};
use abide_tests::{run_abide, temp_dir};
use abide_vmm::backends::{open_for, Purpose};
use abide_vmm::config::VmConfig;
use abide_vmm::devices_config::{parse_disk, parse_net, parse_rng};
use abide_vmm::manifest::DetachedPlatform;
use serde_json::Value;

/// Disk size: 3 MiB and one sector.
const DISK_BYTES: u64 = (3 << 20) + 512;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// virtio device type of each model the machine describes, by name.
const DEVICE_TYPES: [(&str, u16); 3] = [("virtio-blk", 2), ("virtio-net", 1), ("virtio-rng", 4)];

/// A guest's view of the platform: config cycles and MMIO.
struct Guest<'a> {
    p: &'a DetachedPlatform,
    config_port: u64,
}

impl Guest<'_> {
    fn cfg_addr(&self, slot: u8, off: usize) {
        let a = 0x8000_0000u32 | u32::from(slot) << 11 | (off as u32 & 0xfc);
        assert!(self.p.pio.write(self.config_port, &a.to_le_bytes()));
    }

    fn cfg_read(&self, slot: u8, off: usize, len: usize) -> u32 {
        self.cfg_addr(slot, off);
        let mut b = [0u8; 4];
        let port = self.config_port + 4 + (off % 4) as u64;
        assert!(self.p.pio.read(port, &mut b[..len]));
        u32::from_le_bytes(b)
    }

    fn cfg_write(&self, slot: u8, off: usize, len: usize, v: u32) {
        self.cfg_addr(slot, off);
        let port = self.config_port + 4 + (off % 4) as u64;
        assert!(self.p.pio.write(port, &v.to_le_bytes()[..len]));
    }

    fn mmio_read(&self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(
            self.p.mmio.read(addr, &mut b[..len]),
            "nothing at {addr:#x}"
        );
        u64::from_le_bytes(b)
    }

    fn mmio_write(&self, addr: u64, len: usize, v: u64) {
        assert!(self.p.mmio.write(addr, &v.to_le_bytes()[..len]));
    }

    /// Size of a 32-bit register's decoder: write all-ones, read the mask
    /// back, restore.
    fn sized(&self, slot: u8, off: usize) -> u32 {
        let old = self.cfg_read(slot, off, 4);
        self.cfg_write(slot, off, 4, 0xffff_ffff);
        let mask = self.cfg_read(slot, off, 4);
        self.cfg_write(slot, off, 4, old);
        mask
    }

    fn identity(&self, slot: u8) -> PciIdentity {
        let id = self.cfg_read(slot, 0, 4);
        let class_rev = self.cfg_read(slot, 8, 4);
        let sub = self.cfg_read(slot, 0x2c, 4);
        PciIdentity {
            vendor: id as u16,
            device: (id >> 16) as u16,
            subsystem_vendor: sub as u16,
            subsystem: (sub >> 16) as u16,
            revision: class_rev as u8,
            class: class_rev >> 8,
        }
    }

    /// Capabilities in list order: (ID, offset).
    fn capabilities(&self, slot: u8) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut p = self.cfg_read(slot, 0x34, 1) as usize;
        while p != 0 {
            assert!(out.len() < 48, "capability loop");
            out.push((self.cfg_read(slot, p, 1) as u8, p));
            p = self.cfg_read(slot, p + 1, 1) as usize;
        }
        out
    }
}

/// What a virtio vendor capability says: (cfg_type, BAR, offset, length,
/// extra dword).
fn vendor_cap(g: &Guest, slot: u8, at: usize) -> (u8, u8, u32, u32, u32) {
    (
        g.cfg_read(slot, at + 3, 1) as u8,
        g.cfg_read(slot, at + 4, 1) as u8,
        g.cfg_read(slot, at + 8, 4),
        g.cfg_read(slot, at + 12, 4),
        g.cfg_read(slot, at + 16, 4),
    )
}

/// The device configuration the machine declares for `name`, from the
/// virtio specification's layouts.
fn declared_config(m: &MachineDescription, name: &str, model: &VirtioModel) -> Vec<u8> {
    let mut c = vec![0u8; 0x40];
    match name {
        "virtio-blk" => {
            c[0..8].copy_from_slice(&(DISK_BYTES / 512).to_le_bytes());
            c[0x0c..0x10].copy_from_slice(&m.virtio.blk_config.seg_max.to_le_bytes());
            c[0x14..0x18].copy_from_slice(&m.virtio.blk_config.blk_size.to_le_bytes());
            c[0x22..0x24].copy_from_slice(&model.num_queues.to_le_bytes());
        }
        "virtio-net" => {
            let n = &m.virtio.net_config;
            c[0..6].copy_from_slice(&MAC);
            c[6..8].copy_from_slice(&n.status.to_le_bytes());
            c[8..10].copy_from_slice(&n.max_virtqueue_pairs.to_le_bytes());
        }
        _ => {}
    }
    c.truncate(model.config_len as usize);
    c
}

/// Reads one virtio function as a driver would and compares it with the
/// model; returns a description of every difference.
fn check_virtio(g: &Guest, m: &MachineDescription, slot: u8, name: &str, model: &VirtioModel) {
    let at = |what: &str| format!("{} {name} at 00:{slot:02x}.0: {what}", m.name);
    let l = &m.virtio.layout;
    assert_eq!(g.identity(slot), model.pci, "{}", at("PCI identity"));
    assert_eq!(
        g.cfg_read(slot, 0x3d, 1),
        u32::from(model.intx_pin),
        "{}",
        at("interrupt pin")
    );

    // Capabilities: order, regions, MSI-X table size.
    let caps = g.capabilities(slot);
    let expected: Vec<VirtioCap> = l
        .cap_order
        .iter()
        .copied()
        .filter(|c| *c != VirtioCap::Device || model.config_len > 0)
        .collect();
    assert_eq!(
        caps.len(),
        expected.len() + usize::from(l.pci_cfg_window),
        "{}: {caps:x?}",
        at("capabilities")
    );
    if l.pci_cfg_window {
        // VIRTIO_PCI_CAP_PCI_CFG ends the list: a 20-byte window whose
        // bar, offset and length the driver sets.
        let &(id, off) = caps.last().expect("a capability");
        assert_eq!(id, 0x09, "{}", at("PCI_CFG window capability"));
        assert_eq!(g.cfg_read(slot, off + 2, 1), 20, "{}", at("PCI_CFG length"));
        assert_eq!(g.cfg_read(slot, off + 3, 1), 5, "{}", at("PCI_CFG type"));
    }
    for (&(id, off), want) in caps.iter().zip(&expected) {
        if *want == VirtioCap::Msix {
            assert_eq!(id, 0x11, "{}", at("MSI-X capability"));
            let ctrl = g.cfg_read(slot, off + 2, 2);
            assert_eq!(
                (ctrl & 0x7ff) + 1,
                u32::from(model.msix_vectors),
                "{}",
                at("MSI-X vectors")
            );
            assert_eq!(
                g.cfg_read(slot, off + 4, 4),
                l.msix_table,
                "{}",
                at("MSI-X table")
            );
            assert_eq!(
                g.cfg_read(slot, off + 8, 4),
                l.msix_pba,
                "{}",
                at("MSI-X PBA")
            );
            continue;
        }
        assert_eq!(id, 0x09, "{}", at("vendor capability"));
        let (kind, bar, offset, length, extra) = vendor_cap(g, slot, off);
        assert_eq!(bar, 0, "{}", at("capability BAR"));
        let nq = u32::from(model.num_queues);
        let (want_kind, want_off, want_len) = match want {
            VirtioCap::Common => (1, l.common, l.common_len),
            VirtioCap::Notify => (2, l.notify, nq * l.notify_multiplier),
            VirtioCap::Isr => (3, l.isr, 1),
            VirtioCap::Device => (4, l.device, model.config_len),
            VirtioCap::Msix => unreachable!("handled above"),
        };
        assert_eq!(
            (kind, offset, length),
            (want_kind, want_off, want_len),
            "{}",
            at(&format!("{want:?} capability"))
        );
        if *want == VirtioCap::Notify {
            assert_eq!(extra, l.notify_multiplier, "{}", at("notify multiplier"));
        }
    }

    // BAR 0 and the ROM BAR, sized as firmware does.
    let bar_lo = g.sized(slot, 0x10) & !0xf;
    let bar_hi = g.sized(slot, 0x14);
    let size = !(u64::from(bar_hi) << 32 | u64::from(bar_lo)) + 1;
    assert_eq!(size, l.bar_size, "{}", at("BAR 0 size"));
    let rom = g.sized(slot, 0x30) & !0x7ff;
    let rom_slot = (rom != 0).then(|| u64::from(!rom) + 1);
    assert_eq!(rom_slot, model.rom_slot, "{}", at("ROM slot"));

    // The common configuration, with memory decode on.
    let bar =
        u64::from(g.cfg_read(slot, 0x10, 4) & !0xf) | u64::from(g.cfg_read(slot, 0x14, 4)) << 32;
    let cmd = g.cfg_read(slot, 4, 2);
    g.cfg_write(slot, 4, 2, cmd | 0x2);
    let common = bar + u64::from(l.common);
    let mut offered = 0u64;
    for word in 0..2u64 {
        g.mmio_write(common, 4, word);
        offered |= g.mmio_read(common + 4, 4) << (32 * word);
    }
    let device_type = DEVICE_TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .expect("device type");
    assert_eq!(
        offered,
        model.features,
        "{}: offered {:?}, declared {:?}",
        at("features"),
        abide_machines::virtio_feature_names(device_type, offered),
        abide_machines::virtio_feature_names(device_type, model.features)
    );
    assert_eq!(
        g.mmio_read(common + 0x12, 2),
        u64::from(model.num_queues),
        "{}",
        at("num_queues")
    );
    for q in 0..model.num_queues {
        g.mmio_write(common + 0x16, 2, u64::from(q));
        assert_eq!(
            g.mmio_read(common + 0x18, 2),
            u64::from(model.queue_size),
            "{}",
            at(&format!("queue {q} size"))
        );
    }
    // One past the last queue reads as absent (size 0).
    g.mmio_write(common + 0x16, 2, u64::from(model.num_queues));
    assert_eq!(
        g.mmio_read(common + 0x18, 2),
        0,
        "{}",
        at("queue past the last")
    );

    // The device configuration, byte by byte.
    let read: Vec<u8> = (0..u64::from(model.config_len))
        .map(|i| g.mmio_read(bar + u64::from(l.device) + i, 1) as u8)
        .collect();
    assert_eq!(
        read,
        declared_config(m, name, model),
        "{}",
        at("device configuration")
    );
    g.cfg_write(slot, 4, 2, cmd);
}

fn reference_rom(dir: &Path) -> String {
    let mut rom = vec![0u8; 2048];
    rom[0] = 0x55;
    rom[1] = 0xaa;
    let p = dir.join("x.rom");
    std::fs::write(&p, rom).expect("rom");
    p.display().to_string()
}

/// Every virtio model `m` describes, on a detached platform.
fn platform(m: &MachineDescription, dir: &Path) -> DetachedPlatform {
    let disk = dir.join(format!("{}.img", m.name));
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("disk");
    let mac = MAC.map(|b| format!("{b:02x}")).join(":");
    let net = match m.virtio.net.rom_slot {
        Some(_) => format!("tap=unused0,mac={mac},rom={}", reference_rom(dir)),
        None => format!("tap=unused0,mac={mac}"),
    };
    let cfg = VmConfig {
        machine: m.name.clone(),
        disks: vec![parse_disk(&format!("path={}", disk.display())).expect("disk")],
        nets: vec![parse_net(&net).expect("net")],
        rng: Some(parse_rng("").expect("rng")),
        ..VmConfig::default()
    };
    let backends = open_for(m, &cfg, Purpose::Describe).expect("backends");
    DetachedPlatform::build(m, backends)
        .unwrap_or_else(|e| panic!("{}: the machine's devices refuse to build: {e:?}", m.name))
}

#[test]
fn every_machine_type_offers_what_it_declares() {
    let dir = temp_dir("declared");
    let types = abide_machines::machine_types();
    assert!(!types.is_empty());
    for t in types {
        let m = abide_machines::resolve(&t.name).expect("registered machine resolves");
        let p = platform(&m, &dir);
        let g = Guest {
            p: &p,
            config_port: u64::from(m.pci.config_io_port),
        };
        assert_eq!(g.identity(0), m.pci.host_bridge, "{}: host bridge", m.name);
        assert_eq!(g.cfg_read(0, 0x3d, 1), 0, "{}: host bridge pin", m.name);
        let mut found = Vec::new();
        for slot in 1..32u8 {
            if g.cfg_read(slot, 0, 2) == 0xffff {
                continue;
            }
            let device = g.cfg_read(slot, 2, 2) as u16;
            let (name, model) = m
                .virtio
                .all()
                .into_iter()
                .find(|(_, model)| model.pci.device == device)
                .unwrap_or_else(|| panic!("{}: unknown device {device:#x} at slot {slot}", m.name));
            check_virtio(&g, &m, slot, name, model);
            found.push(name);
        }
        let all: Vec<&str> = m.virtio.all().iter().map(|(n, _)| *n).collect();
        assert_eq!(found, all, "{}: every model built and checked", m.name);
        eprintln!(
            "{}: {} functions offer what they declare",
            m.name,
            found.len() + 1
        );
    }
}

#[test]
fn capabilities_report_what_machines_declare() {
    let out = run_abide(&["capabilities"], None, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out}");
    let caps: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let reported = caps["guest"]["machine_types"]
        .as_array()
        .expect("machine_types");
    let names: Vec<&str> = reported
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    let registry: Vec<String> = abide_machines::machine_types()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(
        names, registry,
        "capabilities lists the registry, newest first"
    );
    for t in reported {
        let m = abide_machines::resolve(t["name"].as_str().expect("name")).expect("machine");
        let devices = t["devices"].as_array().expect("devices");
        assert_eq!(devices.len(), m.virtio.all().len(), "{}", m.name);
        for (name, model) in m.virtio.all() {
            let d = devices
                .iter()
                .find(|d| d["model"] == name)
                .unwrap_or_else(|| panic!("{}: {name} not reported", m.name));
            let want = [
                ("vendor_id", Value::from(model.pci.vendor)),
                ("device_id", Value::from(model.pci.device)),
                (
                    "subsystem_vendor_id",
                    Value::from(model.pci.subsystem_vendor),
                ),
                ("subsystem_id", Value::from(model.pci.subsystem)),
                ("revision", Value::from(model.pci.revision)),
                ("class", Value::from(model.pci.class)),
                ("intx_pin", Value::from(model.intx_pin)),
                ("queues", Value::from(model.num_queues)),
                ("queue_size", Value::from(model.queue_size)),
                ("msix_vectors", Value::from(model.msix_vectors)),
                (
                    "rom_slot_bytes",
                    serde_json::to_value(model.rom_slot).expect("json"),
                ),
                ("features", Value::from(model.features)),
                ("config_len", Value::from(model.config_len)),
            ];
            for (key, value) in want {
                assert_eq!(d[key], value, "{}: {name}.{key}", m.name);
            }
        }
    }
}
