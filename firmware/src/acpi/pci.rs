//! The PCI parts of the tables: the MCFG, the root bridge `\_SB.PCI0` and the
//! motherboard-resources device `\_SB.MRES` that reserves the ECAM window.
//!
//! # `PCI0`
//!
//! ```text
//! Device (PCI0) {
//!     _HID PNP0A08 (PCI Express root bridge), _CID PNP0A03 (PCI root bridge)
//!     _SEG 0, _BBN 0, _UID 0, _STA 0x0F
//!     (no _ADR: a device with a _HID must not have one; iasl warns 3073)
//!     _CRS: WordBusNumber  0 .. last ECAM bus
//!           IO             config_io_port, 8 ports (consumed, not a window)
//!           WordIO         0 .. config_io_port - 1
//!           WordIO         config_io_port + 8 .. 0xFFFF (holds the I/O BAR window)
//!           DWordMemory    mmio32 window, non-cacheable
//!           QWordMemory    mmio64 window, cacheable (not prefetchable, so
//!                          non-prefetchable 64-bit BARs may go there too)
//!     _PRT: slot 0..=31, pin 0..=3 -> GSI intx_gsis[(slot + pin) % 4]
//! }
//! ```
//!
//! The I/O windows cover all of the port space except the configuration
//! ports, legacy devices included: those stay at `\_SB` level, which Linux
//! accepts (their ports are claimed by their own `_CRS`, and x86 Linux never
//! hands out I/O BARs below 0x1000).
//!
//! `_PRT` entries are GSI-based (source 0), which makes INTx level-triggered
//! and active-low; the MADT needs no Interrupt Source Override for them
//! (overrides describe ISA IRQs only).

use abide_machines::{AcpiChoices, MachineDescription, PciLayout, MIB};
use acpi_tables::{aml, Aml};

use super::{hid_device, uid, AcpiError, Sdt, TableIds, IO_FIXED_ALIGNMENT, ISA_IRQ_COUNT};
use super::{SDT_HEADER_LEN, STA_PRESENT_AND_FUNCTIONING};

// ---------------------------------------------------------------------------
// Specification constants.
// ---------------------------------------------------------------------------

/// MCFG revision (PCI Firmware Specification 3.x).
const MCFG_REVISION: u8 = 1;
/// Offset of the first allocation entry: header + 8 reserved bytes.
const MCFG_ENTRIES_OFFSET: usize = SDT_HEADER_LEN + 8;
/// Size of one MCFG allocation entry.
const MCFG_ENTRY_LEN: usize = 16;
/// ECAM space of one bus: 32 devices x 8 functions x 4 KiB.
const ECAM_BYTES_PER_BUS: u64 = MIB;
/// Buses one ECAM window can cover (bus numbers are 8 bits).
const MAX_BUSES: u64 = 256;
/// Ports of configuration mechanism #1: CONFIG_ADDRESS (4) + CONFIG_DATA (4).
/// Mirrors the doc comment on `PciLayout::config_io_port`.
const PCI_CONFIG_IO_LEN: u16 = 8;
/// Devices on a bus and interrupt pins (INTA#..INTD#) per device.
const PCI_SLOTS: u32 = 32;
const PCI_INTX_PINS: u32 = 4;
/// `_PRT` address field: device in the high word, 0xFFFF = any function.
const PRT_ANY_FUNCTION: u32 = 0xffff;

/// The validated PCI layout, in the forms the tables need.
struct PciTables<'a> {
    layout: &'a PciLayout,
    /// The machine's ACPI choices (segment, first bus, device names).
    acpi: &'a AcpiChoices,
    /// Last bus number the ECAM window covers.
    last_bus: u8,
    /// ECAM window as a 32-bit (base, size).
    ecam32: (u32, u32),
    /// 32-bit window as (min, max).
    mmio32: (u32, u32),
    /// 64-bit window as (min, max).
    mmio64: (u64, u64),
}

impl<'a> PciTables<'a> {
    fn new(machine: &'a MachineDescription) -> Result<Self, AcpiError> {
        let bad = |device, reason| AcpiError::BadResource { device, reason };
        let layout = &machine.pci;
        let first_bus = machine.acpi.pci_first_bus;

        let ecam = |reason| bad("PCI ECAM", reason);
        if layout.ecam_size == 0 || !layout.ecam_size.is_multiple_of(ECAM_BYTES_PER_BUS) {
            return Err(ecam("size is not a whole number of 1 MiB buses"));
        }
        let buses = layout.ecam_size / ECAM_BYTES_PER_BUS;
        if buses > MAX_BUSES - u64::from(first_bus) {
            return Err(ecam("window covers more buses than exist"));
        }
        if !layout.ecam_base.is_multiple_of(ECAM_BYTES_PER_BUS) {
            return Err(ecam("base is not 1 MiB aligned"));
        }
        let ecam32 = u32::try_from(layout.ecam_base)
            .ok()
            .zip(u32::try_from(layout.ecam_size).ok())
            .filter(|(base, size)| base.checked_add(*size - 1).is_some())
            .ok_or(ecam("window is not below 4 GiB"))?;
        // buses <= 256 - first bus, so this fits.
        let last_bus = (u64::from(first_bus) + buses - 1) as u8;

        let mmio32 = window(layout.mmio32_base, layout.mmio32_size)
            .and_then(|(min, max)| Some((u32::try_from(min).ok()?, u32::try_from(max).ok()?)))
            .ok_or(bad("PCI 32-bit window", "empty or not below 4 GiB"))?;
        let mmio64 = window(layout.mmio64_base, layout.mmio64_size)
            .ok_or(bad("PCI 64-bit window", "empty or past the 64-bit space"))?;
        let ecam_range = (layout.ecam_base, layout.ecam_base + layout.ecam_size - 1);
        if overlaps((mmio32.0.into(), mmio32.1.into()), ecam_range) || overlaps(mmio64, ecam_range)
        {
            return Err(ecam("window overlaps a BAR window"));
        }

        let cfg = u32::from(layout.config_io_port);
        let cfg_end = cfg + u32::from(PCI_CONFIG_IO_LEN);
        if cfg_end > 0x1_0000 {
            return Err(bad(
                "PCI config ports",
                "run past the end of the port space",
            ));
        }
        let io = (u32::from(layout.io_base), u32::from(layout.io_size));
        if io.1 == 0 || io.0 + io.1 > 0x1_0000 {
            return Err(bad("PCI I/O window", "empty or past the port space"));
        }
        if io.0 < cfg_end && cfg < io.0 + io.1 {
            return Err(bad("PCI I/O window", "overlaps the config ports"));
        }

        for &gsi in &layout.intx_gsis {
            if gsi < ISA_IRQ_COUNT {
                return Err(bad("PCI INTx", "GSI collides with the ISA IRQs (0..=15)"));
            }
            if gsi >= machine.irqchip.ioapic_pins {
                return Err(bad("PCI INTx", "GSI beyond the IOAPIC's pins"));
            }
        }

        Ok(PciTables {
            layout,
            acpi: &machine.acpi,
            last_bus,
            ecam32,
            mmio32,
            mmio64,
        })
    }
}

/// `(min, max)` of a non-empty window that does not wrap.
fn window(base: u64, size: u64) -> Option<(u64, u64)> {
    let max = base.checked_add(size.checked_sub(1)?)?;
    Some((base, max))
}

/// Whether inclusive ranges `a` and `b` intersect.
fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// MCFG with one allocation entry: the ECAM window, segment
/// `acpi.pci_segment`, buses `acpi.pci_first_bus` to the last bus the window
/// covers.
pub(super) fn build_mcfg(
    machine: &MachineDescription,
    ids: &TableIds,
) -> Result<Vec<u8>, AcpiError> {
    let pci = PciTables::new(machine)?;
    let mut mcfg = Sdt::new(b"MCFG", MCFG_REVISION, ids);
    mcfg.push(&[0; MCFG_ENTRIES_OFFSET - SDT_HEADER_LEN]); // reserved
    mcfg.push(&pci.layout.ecam_base.to_le_bytes());
    mcfg.push(&pci.acpi.pci_segment.to_le_bytes());
    mcfg.push(&[pci.acpi.pci_first_bus, pci.last_bus]);
    mcfg.push(&[0; 4]); // reserved
    debug_assert_eq!(mcfg.bytes.len(), MCFG_ENTRIES_OFFSET + MCFG_ENTRY_LEN);
    Ok(mcfg.finish())
}

/// A `Package() { address, pin, 0, gsi }` routing entry for every slot and
/// pin, in slot-major order.
struct RoutingTable<'a> {
    layout: &'a PciLayout,
}

impl Aml for RoutingTable<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let mut prt = aml::PackageBuilder::new();
        for slot in 0..PCI_SLOTS {
            for pin in 0..PCI_INTX_PINS {
                let address = (slot << 16) | PRT_ANY_FUNCTION;
                let gsi = intx_gsi(self.layout, slot, pin);
                let source = aml::ZERO;
                prt.add_element(&aml::Package::new(vec![&address, &pin, &source, &gsi]));
            }
        }
        prt.to_aml_bytes(sink);
    }
}

/// The GSI of `pin` (0 = INTA#) of the device in `slot`.
fn intx_gsi(layout: &PciLayout, slot: u32, pin: u32) -> u32 {
    layout.intx_gsis[((slot + pin) % PCI_INTX_PINS) as usize]
}

/// `\_SB.PCI0`, the root bridge of bus 0.
fn pci_root_device(pci: &PciTables) -> Vec<u8> {
    let layout = pci.layout;
    let dev = &pci.acpi.devices.pci_root;
    // Checked by `choices::check`.
    let cid = aml::EISAName::new(&pci.acpi.devices.pci_root_cid);
    let seg = pci.acpi.pci_segment;
    let bbn = pci.acpi.pci_first_bus;

    let buses = aml::AddressSpace::<u16>::new_bus_number(bbn.into(), pci.last_bus.into());
    let cfg = layout.config_io_port;
    let cfg_ports = aml::IO::new(
        cfg,
        cfg,
        IO_FIXED_ALIGNMENT,
        PCI_CONFIG_IO_LEN as u8, // 8
    );
    // PciTables::new checked that the config ports end at or below 0x10000.
    let cfg_end = u32::from(cfg) + u32::from(PCI_CONFIG_IO_LEN);
    let io_below = (cfg > 0).then(|| aml::AddressSpace::<u16>::new_io(0, cfg - 1, None));
    let io_above = u16::try_from(cfg_end)
        .ok()
        .map(|min| aml::AddressSpace::<u16>::new_io(min, u16::MAX, None));
    let mmio32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio32.0,
        pci.mmio32.1,
        None,
    );
    let mmio64 = aml::AddressSpace::<u64>::new_memory(
        aml::AddressSpaceCacheable::Cacheable,
        true,
        pci.mmio64.0,
        pci.mmio64.1,
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&buses, &cfg_ports];
    if let Some(io) = &io_below {
        resources.push(io);
    }
    if let Some(io) = &io_above {
        resources.push(io);
    }
    resources.push(&mmio32);
    resources.push(&mmio64);

    let prt = RoutingTable { layout };
    hid_device(
        dev,
        &[
            ("_CID", Some(&cid)),
            ("_SEG", Some(&seg)),
            ("_BBN", Some(&bbn)),
            ("_UID", uid(dev)),
            ("_STA", Some(&STA_PRESENT_AND_FUNCTIONING)),
            ("_PRT", Some(&prt)),
        ],
        resources,
    )
}

/// `\_SB.MRES`: motherboard resources, here the ECAM window. Linux only uses
/// an MCFG region that e820 or a PNP0C01/PNP0C02 `_CRS` reserves.
fn motherboard_resources_device(pci: &PciTables) -> Vec<u8> {
    let (base, size) = pci.ecam32;
    let ecam = aml::Memory32Fixed::new(true, base, size);
    let dev = &pci.acpi.devices.motherboard;
    hid_device(dev, &[("_UID", uid(dev))], vec![&ecam])
}

/// The PCI devices in `\_SB`, each serialized.
pub(super) fn system_bus_devices(machine: &MachineDescription) -> Result<Vec<Vec<u8>>, AcpiError> {
    let pci = PciTables::new(machine)?;
    Ok(vec![
        pci_root_device(&pci),
        motherboard_resources_device(&pci),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::{
        aml_integer, build_pc, contains, eisa_id, pkg_length, sum, table, u16_at, u32_at, u64_at,
    };
    use crate::acpi::{build, AcpiTables, SDT_LENGTH_OFFSET};
    use abide_machines::pc_1_0 as pc;

    /// The body (after the NameSeg) of `Device(name)` anywhere in `aml`.
    fn device_body<'a>(aml: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
        for i in 0..aml.len().saturating_sub(2) {
            if aml[i] != 0x5b || aml[i + 1] != 0x82 {
                continue;
            }
            let (len, used) = pkg_length(&aml[i + 2..]);
            let seg = i + 2 + used;
            if &aml[seg..seg + 4] == name {
                return &aml[seg + 4..i + 2 + len];
            }
        }
        panic!("no device {}", String::from_utf8_lossy(name));
    }

    /// The data object of `Name(name, …)` directly in a device body.
    fn named<'a>(body: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
        let mut key = vec![0x08];
        key.extend_from_slice(name);
        let at = body
            .windows(5)
            .position(|w| w == key)
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(name)));
        &body[at + 5..]
    }

    /// The descriptors of a ResourceTemplate (BufferOp …), end tag excluded.
    fn resources(data: &[u8]) -> Vec<Vec<u8>> {
        assert_eq!(data[0], 0x11, "BufferOp");
        let (_, used) = pkg_length(&data[1..]);
        let (len, n) = aml_integer(&data[1 + used..]);
        let mut buf = &data[1 + used + n..1 + used + n + len as usize];
        let mut out = Vec::new();
        loop {
            let tag = buf[0];
            let len = if tag & 0x80 != 0 {
                3 + usize::from(u16_at(buf, 1))
            } else {
                1 + usize::from(tag & 7)
            };
            if tag == 0x79 {
                assert_eq!(len, buf.len(), "end tag last");
                return out;
            }
            out.push(buf[..len].to_vec());
            buf = &buf[len..];
        }
    }

    /// A Package of integer Packages.
    fn nested_packages(data: &[u8]) -> Vec<Vec<u64>> {
        assert_eq!(data[0], 0x12, "PackageOp");
        let (len, used) = pkg_length(&data[1..]);
        let count = data[1 + used];
        let mut p = &data[2 + used..1 + len];
        let mut out = Vec::new();
        for _ in 0..count {
            assert_eq!(p[0], 0x12, "inner PackageOp");
            let (len, used) = pkg_length(&p[1..]);
            let n = p[1 + used];
            let mut q = &p[2 + used..1 + len];
            let mut values = Vec::new();
            for _ in 0..n {
                let (v, k) = aml_integer(q);
                values.push(v);
                q = &q[k..];
            }
            assert!(q.is_empty());
            out.push(values);
            p = &p[1 + len..];
        }
        assert!(p.is_empty());
        out
    }

    /// Address space descriptor: (tag, resource type, general flags,
    /// type flags, [granularity, min, max, translation, length]).
    fn address_space(d: &[u8]) -> (u8, u8, u8, u8, [u64; 5]) {
        let width = match d[0] {
            0x88 => 2,
            0x87 => 4,
            0x8a => 8,
            t => panic!("not an address space descriptor: {t:#x}"),
        };
        assert_eq!(usize::from(u16_at(d, 1)), 3 + 5 * width);
        let field = |i: usize| {
            let off = 6 + i * width;
            match width {
                2 => u64::from(u16_at(d, off)),
                4 => u64::from(u32_at(d, off)),
                _ => u64_at(d, off),
            }
        };
        (
            d[0],
            d[3],
            d[4],
            d[5],
            [field(0), field(1), field(2), field(3), field(4)],
        )
    }

    fn mcfg(t: &AcpiTables) -> &[u8] {
        table(t, b"MCFG")
    }

    #[test]
    fn mcfg_describes_ecam() {
        let m = pc();
        let t = build_pc(2);
        let mcfg = mcfg(&t);
        assert_eq!(mcfg.len(), 60);
        assert_eq!(u32_at(mcfg, SDT_LENGTH_OFFSET), 60);
        assert_eq!(sum(mcfg), 0);
        assert_eq!(mcfg[8], 1, "revision");
        assert_eq!(&mcfg[36..44], &[0; 8]);
        assert_eq!(u64_at(mcfg, 44), m.pci.ecam_base);
        assert_eq!(u16_at(mcfg, 52), 0, "segment");
        assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus 0 only");
        assert_eq!(&mcfg[56..60], &[0; 4]);
    }

    #[test]
    fn bus_range_follows_ecam_size() {
        let mut m = pc();
        m.pci.ecam_size = 16 * MIB;
        let t = build(&m, 1).expect("build");
        let mcfg = mcfg(&t);
        assert_eq!((mcfg[54], mcfg[55]), (0, 15));
        let dsdt = table(&t, b"DSDT");
        let crs = resources(named(device_body(dsdt, b"PCI0"), b"_CRS"));
        assert_eq!(address_space(&crs[0]).4, [0, 0, 15, 0, 16]);
        let mres = resources(named(device_body(dsdt, b"MRES"), b"_CRS"));
        assert_eq!(u32_at(&mres[0], 8), 16 << 20);

        m.pci.ecam_size = 256 * MIB;
        let t = build(&m, 1).expect("build");
        assert_eq!(mcfg_end(&t), 255);
    }

    fn mcfg_end(t: &AcpiTables) -> u8 {
        table(t, b"MCFG")[55]
    }

    #[test]
    fn pci0_identity() {
        let t = build_pc(1);
        let dsdt = table(&t, b"DSDT");
        let body = device_body(dsdt, b"PCI0");
        let int = |name| aml_integer(named(body, name)).0;
        assert_eq!(&named(body, b"_HID")[..5], &[0x0c, 0x41, 0xd0, 0x0a, 0x08]);
        assert_eq!(&named(body, b"_HID")[1..5], &eisa_id("PNP0A08"));
        assert_eq!(&named(body, b"_CID")[1..5], &eisa_id("PNP0A03"));
        assert_eq!(int(b"_SEG"), 0);
        assert_eq!(int(b"_BBN"), 0);
        assert_eq!(int(b"_UID"), 0);
        assert_eq!(int(b"_STA"), 0x0f);
        assert!(contains(dsdt, &eisa_id("PNP0A08")));
        assert!(contains(dsdt, &eisa_id("PNP0A03")));
    }

    #[test]
    fn pci0_resources() {
        let m = pc();
        let p = &m.pci;
        let t = build_pc(1);
        let dsdt = table(&t, b"DSDT");
        let crs = resources(named(device_body(dsdt, b"PCI0"), b"_CRS"));
        assert_eq!(crs.len(), 6);
        // WordBusNumber, producer, MinFixed | MaxFixed.
        assert_eq!(address_space(&crs[0]), (0x88, 2, 0x0c, 0, [0, 0, 0, 0, 1]));
        // IO(Decode16, 0xCF8, 0xCF8, 1, 8).
        let [lo, hi] = p.config_io_port.to_le_bytes();
        assert_eq!(crs[1], [0x47, 1, lo, hi, lo, hi, 1, 8]);
        // WordIO windows around the config ports, EntireRange.
        let cfg = u64::from(p.config_io_port);
        assert_eq!(
            address_space(&crs[2]),
            (0x88, 1, 0x0c, 3, [0, 0, cfg - 1, 0, cfg])
        );
        assert_eq!(
            address_space(&crs[3]),
            (
                0x88,
                1,
                0x0c,
                3,
                [0, cfg + 8, 0xffff, 0, 0x1_0000 - cfg - 8]
            )
        );
        assert_eq!((cfg - 1, cfg + 8), (0xcf7, 0xd00));
        let io_end = u64::from(p.io_base) + u64::from(p.io_size);
        assert!(u64::from(p.io_base) >= cfg + 8 && io_end <= 0x1_0000);
        // DWordMemory: non-cacheable, read-write.
        assert_eq!(
            address_space(&crs[4]),
            (
                0x87,
                0,
                0x0c,
                0b01,
                [
                    0,
                    p.mmio32_base,
                    p.mmio32_base + p.mmio32_size - 1,
                    0,
                    p.mmio32_size
                ]
            )
        );
        // QWordMemory: cacheable, read-write.
        assert_eq!(
            address_space(&crs[5]),
            (
                0x8a,
                0,
                0x0c,
                0b11,
                [
                    0,
                    p.mmio64_base,
                    p.mmio64_base + p.mmio64_size - 1,
                    0,
                    p.mmio64_size
                ]
            )
        );
    }

    #[test]
    fn pci0_routing_table() {
        let m = pc();
        let gsis = m.pci.intx_gsis;
        let t = build_pc(1);
        let dsdt = table(&t, b"DSDT");
        let prt = nested_packages(named(device_body(dsdt, b"PCI0"), b"_PRT"));
        assert_eq!(prt.len(), 128);
        for (i, entry) in prt.iter().enumerate() {
            let (slot, pin) = (i as u64 / 4, i as u64 % 4);
            let gsi = u64::from(gsis[((slot + pin) % 4) as usize]);
            assert_eq!(entry, &[(slot << 16) | 0xffff, pin, 0, gsi], "entry {i}");
        }
        assert_eq!(prt[0], [0xffff, 0, 0, u64::from(gsis[0])]);
        // Slot 3, INTB# -> intx_gsis[0].
        assert_eq!(prt[3 * 4 + 1], [0x3_ffff, 1, 0, u64::from(gsis[0])]);
        assert_eq!(prt[31 * 4 + 3], [0x1f_ffff, 3, 0, u64::from(gsis[2])]);
    }

    #[test]
    fn ecam_reserved_by_motherboard_resources() {
        let m = pc();
        let t = build_pc(1);
        let dsdt = table(&t, b"DSDT");
        let body = device_body(dsdt, b"MRES");
        assert_eq!(&named(body, b"_HID")[1..5], &eisa_id("PNP0C02"));
        assert_eq!(aml_integer(named(body, b"_UID")).0, 1);
        let crs = resources(named(body, b"_CRS"));
        let mut fixed = vec![0x86, 9, 0, 1];
        fixed.extend_from_slice(&(m.pci.ecam_base as u32).to_le_bytes());
        fixed.extend_from_slice(&(m.pci.ecam_size as u32).to_le_bytes());
        assert_eq!(crs, [fixed.clone()]);
        assert!(contains(dsdt, &fixed));
    }

    #[test]
    fn bad_pci_layouts() {
        let bad = |f: &dyn Fn(&mut PciLayout)| {
            let mut m = pc();
            f(&mut m.pci);
            match build(&m, 1) {
                Err(AcpiError::BadResource { .. }) => {}
                other => panic!("expected BadResource, got {other:?}"),
            }
        };
        bad(&|p| p.ecam_size = 0);
        bad(&|p| p.ecam_size = MIB + 4096);
        bad(&|p| p.ecam_size = 512 * MIB);
        bad(&|p| p.ecam_base += 4096);
        bad(&|p| p.ecam_base = 0x1_0000_0000);
        bad(&|p| p.mmio32_size = 0);
        bad(&|p| p.mmio32_base = 0xffff_0000);
        bad(&|p| p.mmio32_size = 0x2010_0000); // runs into ECAM
        bad(&|p| p.mmio64_base = u64::MAX);
        bad(&|p| p.config_io_port = 0xfffc);
        bad(&|p| p.io_base = 0xcf0);
        bad(&|p| p.io_size = 0);
        bad(&|p| p.intx_gsis[2] = 11);
        bad(&|p| p.intx_gsis[3] = 24);
    }
}
