//! The machine-type registry: every released machine type, and aliases.
//!
//! A released machine type is frozen. A change a guest could notice goes
//! into a new machine type, built here from its predecessor with the
//! differences spelled out.

use serde::Serialize;

use crate::{pc_1_0, MachineDescription, KIB, VIRTIO_BLK_F_MQ};

/// pc-2.0: pc-1.0 plus a larger virtio-net ROM slot (room for the combined
/// EFI+PXE iPXE ROM), multi-queue virtio-blk with deeper queues, a virtio-rng
/// by default and a richer default CPU model. Frozen once released.
pub fn pc_2_0() -> MachineDescription {
    let mut m = pc_1_0();
    m.name = "pc-2.0".to_string();
    m.default_cpu_model = "abide-v2".to_string();
    m.default_devices.rng = true;
    m.virtio.net.rom_slot = Some(256 * KIB);
    m.virtio.blk.num_queues = 4;
    m.virtio.blk.queue_size = 1024;
    m.virtio.blk_config.seg_max = 1024 - 2;
    // One vector per queue plus one for configuration changes.
    m.virtio.blk.msix_vectors = 5;
    m.virtio.blk.features |= VIRTIO_BLK_F_MQ;
    m.acpi_ids.oem_revision = 2;
    m
}

/// pc-3.0: pc-2.0 with its 32-bit PCI window where a firmware places BARs.
///
/// SeaBIOS (`--firmware`) assigns every BAR itself. On a host bridge that
/// is neither an i440FX nor a Q35 it uses [end of low RAM, 0xFEC0_0000)
/// and allocates from the top down, so BARs land just below the IOAPIC.
/// pc-2.0's window (0xC000_0000, 512 MiB) and its ACPI `_CRS` do not hold
/// them, and Linux then moves every BAR ("no compatible bridge window").
/// pc-3.0's window is the top of SeaBIOS's: 0xF000_0000..0xFEC0_0000
/// (236 MiB), above the ECAM window and below the IOAPIC, LAPIC and the
/// firmware slot, so the window Abide places BARs in for direct boot, the
/// `_CRS` and the firmware's choice agree. Not yet released.
pub fn pc_3_0() -> MachineDescription {
    let mut m = pc_2_0();
    m.name = "pc-3.0".to_string();
    m.pci.mmio32_base = 0xf000_0000;
    m.pci.mmio32_size = 0x0ec0_0000;
    // iPXE's virtio-net driver refuses a device without the config-space
    // window onto BAR 0 (network boot through firmware needs it).
    m.virtio.layout.pci_cfg_window = true;
    m
}

struct Entry {
    name: &'static str,
    build: fn() -> MachineDescription,
    deprecated: bool,
}

/// Oldest first; the last entry is the newest.
const TYPES: &[Entry] = &[
    Entry {
        name: "pc-1.0",
        build: pc_1_0,
        deprecated: false,
    },
    Entry {
        name: "pc-2.0",
        build: pc_2_0,
        deprecated: false,
    },
    Entry {
        name: "pc-3.0",
        build: pc_3_0,
        deprecated: false,
    },
];

/// Alias for the newest machine type.
pub const NEWEST_ALIAS: &str = "pc";

/// A machine type as listed by `abide machines` and `abide capabilities`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MachineTypeInfo {
    /// Canonical name.
    pub name: String,
    /// Aliases that resolve to it.
    pub aliases: Vec<String>,
    /// Whether it is what `abide run` uses without `--machine`.
    pub default: bool,
    /// Whether it is deprecated.
    pub deprecated: bool,
}

/// An unknown machine type name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown machine type '{name}'; valid machine types: {valid}")]
pub struct UnknownMachine {
    /// The name given.
    pub name: String,
    /// Valid names and aliases.
    pub valid: String,
}

/// The alias `abide run` uses when no machine type is given.
pub fn types_alias() -> &'static str {
    NEWEST_ALIAS
}

/// The newest machine type's canonical name.
pub fn newest() -> &'static str {
    TYPES.last().map_or("pc-1.0", |e| e.name)
}

/// Every machine type, newest first (the first one is the default).
pub fn machine_types() -> Vec<MachineTypeInfo> {
    TYPES
        .iter()
        .rev()
        .map(|e| MachineTypeInfo {
            name: e.name.to_string(),
            aliases: if e.name == newest() {
                vec![NEWEST_ALIAS.to_string()]
            } else {
                Vec::new()
            },
            default: e.name == newest(),
            deprecated: e.deprecated,
        })
        .collect()
}

/// Resolves a machine type name or alias to its description.
pub fn resolve(name: &str) -> Result<MachineDescription, UnknownMachine> {
    let canonical = if name == NEWEST_ALIAS { newest() } else { name };
    TYPES
        .iter()
        .find(|e| e.name == canonical)
        .map(|e| (e.build)())
        .ok_or_else(|| UnknownMachine {
            name: name.to_string(),
            valid: TYPES
                .iter()
                .map(|e| e.name)
                .chain([NEWEST_ALIAS])
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_resolves_to_newest() {
        let m = resolve("pc").expect("pc");
        assert_eq!(m.name, "pc-3.0");
        assert_eq!(resolve("pc-1.0").expect("1.0").name, "pc-1.0");
        let err = resolve("pc-9.9").expect_err("unknown");
        assert!(
            err.to_string().contains("pc-1.0, pc-2.0, pc-3.0, pc"),
            "{err}"
        );
        let list = machine_types();
        assert_eq!(list[0].name, "pc-3.0");
        assert!(list[0].default);
        assert_eq!(list[0].aliases, ["pc"]);
        assert!(!list[1].default);
    }

    #[test]
    fn pc_2_0_differs_from_pc_1_0_where_documented() {
        let (a, b) = (pc_1_0(), pc_2_0());
        assert_eq!(a.virtio.net.rom_slot, Some(128 * KIB));
        assert_eq!(b.virtio.net.rom_slot, Some(256 * KIB));
        assert!(b.virtio.blk.num_queues > a.virtio.blk.num_queues);
        assert!(b.virtio.blk.queue_size > a.virtio.blk.queue_size);
        assert_eq!(
            b.virtio.blk.msix_vectors,
            b.virtio.blk.num_queues + 1,
            "a vector per queue plus config"
        );
        assert!(!a.default_devices.rng && b.default_devices.rng);
        assert_ne!(a.default_cpu_model, b.default_cpu_model);
        // Everything else is shared.
        assert_eq!(a.memory, b.memory);
        assert_eq!(a.pci, b.pci);
        assert_eq!(a.legacy, b.legacy);
    }

    #[test]
    fn pc_3_0_differs_from_pc_2_0_in_the_32_bit_window_and_the_pci_cfg_window() {
        let (a, mut b) = (pc_2_0(), pc_3_0());
        let p = &b.pci;
        // Inside the 32-bit hole, above ECAM, ending at the IOAPIC.
        assert!(p.mmio32_base >= p.ecam_base + p.ecam_size);
        assert_eq!(p.mmio32_base + p.mmio32_size, b.memory.ioapic_addr);
        assert!(!a.virtio.layout.pci_cfg_window && b.virtio.layout.pci_cfg_window);
        b.name = a.name.clone();
        b.pci.mmio32_base = a.pci.mmio32_base;
        b.pci.mmio32_size = a.pci.mmio32_size;
        b.virtio.layout.pci_cfg_window = false;
        assert_eq!(a, b);
    }
}
