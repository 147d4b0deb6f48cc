//! What the guest sees, as data.
//!
//! A [`MachineDescription`] holds every value a guest can observe that is a
//! choice: addresses, ports, IRQs and limits; PCI identities, interrupt pins
//! and the BAR placement policy; virtio transport layout, queue counts and
//! sizes, feature bits (`VIRTIO_F_VERSION_1` included) and configuration
//! contents and lengths; the default MAC prefix; the interrupt controllers,
//! LAPIC LINT wiring and the FPU/MSR state vCPUs start with; RTC and i8042
//! register defaults; ACPI revisions, FADT fields, DSDT names and PNP IDs.
//! CPU models ([`CpuModel`]) hold CPUID, leaf 2 and the TLB leaves
//! included. Versioned machine types (`pc-1.0`, `pc-2.0`, …) are instances
//! of these structures in the registry ([`machine_types`]); a new one is
//! written as data, by changing fields of its predecessor.
//!
//! Devices, firmware and the VMM take their values from here. A device that
//! cannot implement a declared value refuses when the machine is built,
//! naming itself, the field and the value; nothing is masked or forced.
//!
//! # What stays outside, and why
//!
//! A grep-level review of `devices/`, `firmware/` and `vmm/` (every `const`
//! and hex literal outside tests) leaves these guest-visible values in code:
//!
//! - **Fixed by a specification or the hardware interface**, so not a
//!   choice: virtio register offsets, status and ISR bits, capability
//!   structure layouts, device type IDs, request and header formats
//!   (virtio 1.x); PCI header offsets and bits, BAR and ROM BAR encodings,
//!   MSI-X table format; the 16550, MC146818 and i8042 register sets and
//!   command replies; the ACPI table layouts, RSDP/XSDT/MCFG revisions
//!   (one defined each), FADT offsets, GAS encodings, MADT structure types;
//!   PM timer frequency (3.579545 MHz) and PM1 bit layout; the Linux and PVH
//!   boot protocols (boot GDT entries and selectors 0x10/0x18, 32-bit flat
//!   entry state, `type_of_loader` 0xff "undefined", `hvm_start_info`
//!   version 1); XSAVE area sizes; the KVM paravirtual signature
//!   (`KVMKVMKVM`, leaf 0x4000_0000) that `kvm_features` depends on.
//! - **Derived from data here**: CPUID topology (APIC IDs, leaf 0xb, leaf 4
//!   sharing, HTT), CLFLUSH size (the model's L1 line), XSAVE leaves (from
//!   `avx`/`xsave`), AMD's leaf 1 EDX aliases; cache descriptor encodings
//!   (every cache is self-initializing with one line per tag); config-space
//!   capability offsets (from `cap_order`, each capability's size);
//!   `queue_notify_off` = queue index (with `notify_multiplier`); e820 (from
//!   `memory` and `pci.ecam_*`); ACPI table addresses (from the BIOS area and
//!   `acpi.table_align`); the host bridge's interrupt pin 0 (it raises no
//!   interrupt).
//! - **Device implementation limits** a guest meets only by exceeding
//!   them: virtio-net's largest frame (65,550 bytes with no offloads
//!   offered), virtio-rng's 64 KiB per request, the per-wakeup request
//!   budgets, virtio-blk's bounce buffer for `direct=on`.
//! - **Hypervisor placement**: the TSS address KVM needs on Intel
//!   (`vmm/src/vm.rs`, 0xfffb_d000, 3 pages, inside the 32-bit hole above
//!   every window). A machine type that puts something there (a firmware
//!   image of more than 256 KiB below 4 GiB) must move it into the
//!   description first.
//! - **Boot placement policy**: the initramfs goes to the highest
//!   page-aligned address below the limits, and the PVH module list and
//!   memory map follow `hvm_start_info`; both are read by the kernel from
//!   the boot structures, never assumed.
//!
//! Values that lived in code before and are data now: virtio-net's queue
//! count (2) and virtio-rng's (1); the feature masks (a declared bit a model
//! lacks is refused, VERSION_1 is declared); virtio-blk `blk_size` (512),
//! `seg_max` (queue size − 2) and config length 0x3c; virtio-net `status`
//! (LINK_UP), `max_virtqueue_pairs` (1) and config length 10; the common
//! configuration length (0x38) and capability order; INTA#; the BAR
//! placement policy; the default MAC prefix 52:54:00:ab:1d; CPUID leaf 2 and
//! the TLB fields of leaves 0x8000_0005/6; the reset FPU control word and
//! MXCSR, MSRs (`IA32_MISC_ENABLE` fast strings and eight zeroed syscall
//! MSRs) and LVT0/LVT1 delivery modes; IOAPIC pins (24) and ID (0); RTC
//! registers A, B, D and the century index; the i8042 command port offset,
//! configuration byte and output port; ACPI table alignment, FADT/MADT/DSDT
//! revisions, PM profile, century, hypervisor vendor, FADT flags,
//! IAPC_BOOT_ARCH, PCI segment and first bus, and the DSDT device names,
//! `_HID`/`_CID` and `_UID`s.
//!
//! The manifest format of release 0.1.0 serializes `legacy`, `memory.map`,
//! `boot` and `pci.layout` as they are; the new structures live beside
//! them, so no manifest changed.

use serde::{Deserialize, Serialize};

mod acpi;
mod cpu;
mod firmware;
mod platform;
mod types;
mod virtio;
pub use acpi::{
    AcpiChoices, AcpiDevice, AcpiDevices, FADT_FIX_RTC, FADT_PROC_C1, FADT_RESET_REG_SUP,
    FADT_SLP_BUTTON, FADT_WBINVD, IAPC_8042, IAPC_LEGACY_DEVICES,
};
pub use cpu::{
    abide_v1, abide_v2, cpu_model, cpu_models, feature, host as host_cpu_model, AmdTlb, Cache,
    CacheKind, CpuFeature, CpuModel, FeatureReg, FeatureSet, UnknownCpuModel, UnknownFeature,
    VendorPolicy, HOST_MODEL, KNOWN_FEATURES, VMM_PROVIDED_FEATURES,
};
pub use firmware::{FirmwareLayout, FwCfgPorts, LinuxbootLayout};
pub use platform::{
    BarPlacement, CpuReset, I8042Defaults, InterruptControllers, LegacyDefaults, LintMode,
    MsrValue, RtcDefaults,
};
pub use types::{
    machine_types, newest, pc_2_0, pc_3_0, resolve, types_alias, MachineTypeInfo, UnknownMachine,
};
pub use virtio::{
    virtio_feature_name, virtio_feature_names, BlkConfig, NetConfig, VirtioBarLayout, VirtioCap,
    VirtioModel, VirtioModels, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// The guest physical memory map: where RAM goes and what is reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMap {
    /// End of the conventional (below 640 KiB) RAM reported in e820.
    pub low_ram_end: u64,
    /// Start of RAM above the legacy hole (usually 1 MiB).
    pub high_ram_start: u64,
    /// Start of the reserved BIOS area where ACPI tables live.
    pub bios_area_start: u64,
    /// End (exclusive) of the BIOS area.
    pub bios_area_end: u64,
    /// Start of the 32-bit PCI/MMIO hole; RAM below 4 GiB stops here.
    pub pci_hole_start: u64,
    /// End (exclusive) of the 32-bit hole: RAM resumes at this address.
    pub pci_hole_end: u64,
    /// IOAPIC MMIO base.
    pub ioapic_addr: u64,
    /// Local APIC MMIO base.
    pub lapic_addr: u64,
}

/// A contiguous block of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl MemoryMap {
    /// Splits `total` bytes of RAM around the 32-bit hole.
    ///
    /// RAM starts at 0 and runs up to the hole; whatever does not fit goes
    /// above 4 GiB (`pci_hole_end`).
    pub fn ram_ranges(&self, total: u64) -> Vec<RamRange> {
        let below = total.min(self.pci_hole_start);
        let mut ranges = vec![RamRange {
            start: 0,
            size: below,
        }];
        if total > below {
            ranges.push(RamRange {
                start: self.pci_hole_end,
                size: total - below,
            });
        }
        ranges
    }
}

/// Location of one legacy device on the port bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PioDevice {
    /// First port.
    pub port: u16,
    /// Number of ports.
    pub len: u16,
    /// ISA IRQ (== GSI on the IOAPIC), if the device raises one.
    pub irq: Option<u32>,
}

/// The ACPI power-management block (PM1a event, PM1a control, PM timer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmBlock {
    /// Base port of the block; PM1a_EVT is at `base`, 4 bytes.
    pub base: u16,
    /// Offset of PM1a_CNT (2 bytes) from `base`.
    pub cnt_offset: u16,
    /// Offset of the 24-bit PM timer (4 bytes) from `base`.
    pub tmr_offset: u16,
    /// Total length of the block in ports.
    pub len: u16,
    /// SCI interrupt.
    pub sci_irq: u32,
    /// SLP_TYP value for S5 (soft off), as declared by the DSDT `_S5` object.
    pub s5_slp_typ: u8,
}

impl PmBlock {
    /// Port of PM1a_CNT.
    pub fn cnt_port(&self) -> u16 {
        self.base + self.cnt_offset
    }
    /// Port of the PM timer.
    pub fn tmr_port(&self) -> u16 {
        self.base + self.tmr_offset
    }
}

/// The ACPI reset register (FADT `RESET_REG`), an I/O port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRegister {
    /// Port.
    pub port: u16,
    /// Value the guest writes to reset.
    pub value: u8,
}

/// Legacy (non-PCI) platform devices and their resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyDevices {
    /// COM1 16550 UART.
    pub com1: PioDevice,
    /// i8042 keyboard controller (data port; the command port is at
    /// `legacy_defaults.i8042.command_offset` from it, inside `len`).
    pub i8042: PioDevice,
    /// CMOS RTC index/data pair.
    pub rtc: PioDevice,
    /// ACPI PM block.
    pub pm: PmBlock,
    /// ACPI reset register.
    pub reset: ResetRegister,
}

/// Identification strings placed in ACPI tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiIds {
    /// 6-byte OEM ID.
    pub oem_id: String,
    /// 8-byte OEM table ID.
    pub oem_table_id: String,
    /// OEM revision.
    pub oem_revision: u32,
    /// 4-byte creator ID.
    pub creator_id: String,
    /// Creator revision.
    pub creator_revision: u32,
}

/// PCI identity of a function (guest-visible).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: class << 16 | subclass << 8 | programming interface.
    pub class: u32,
}

/// The PCI host bridge and the address windows of bus 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciLayout {
    /// Port of CONFIG_ADDRESS (CONFIG_DATA is at +4); 8 ports in all.
    pub config_io_port: u16,
    /// ECAM (MMCONFIG) window base; bus 0 only, so 1 MiB.
    pub ecam_base: u64,
    /// ECAM window size.
    pub ecam_size: u64,
    /// 32-bit BAR window base.
    pub mmio32_base: u64,
    /// 32-bit BAR window size.
    pub mmio32_size: u64,
    /// 64-bit BAR window base (above all RAM the machine allows).
    pub mmio64_base: u64,
    /// 64-bit BAR window size.
    pub mmio64_size: u64,
    /// I/O BAR window base.
    pub io_base: u16,
    /// I/O BAR window size.
    pub io_size: u16,
    /// GSIs of INTA#..INTD# at slot 0; slot N's pin P uses entry (N + P) % 4.
    pub intx_gsis: [u32; 4],
    /// Identity of the host bridge at 00:00.0.
    pub host_bridge: PciIdentity,
}

/// Where direct kernel boot puts its structures in low RAM.
///
/// These addresses are guest-visible (a kernel can read where its zero page or
/// start-info block sits), so they belong to the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootLayout {
    /// The boot GDT (4 entries: null, unused, code 0x10, data 0x18).
    pub gdt_addr: u64,
    /// PVH `hvm_start_info`, followed by its memory map.
    pub pvh_start_info_addr: u64,
    /// Linux zero page (`boot_params`).
    pub zero_page_addr: u64,
    /// Kernel command line.
    pub cmdline_addr: u64,
    /// Where the kernel image is loaded (the 32-bit entry for bzImage).
    pub kernel_addr: u64,
}

/// Devices a machine type has without being asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultDevices {
    /// A virtio-rng device.
    pub rng: bool,
}

/// A complete description of the machine a guest sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDescription {
    /// Canonical machine type name (`pc-1.0`, …).
    pub name: String,
    /// Name of the CPU model used when the user does not choose one.
    pub default_cpu_model: String,
    /// Devices present by default.
    pub default_devices: DefaultDevices,
    /// Memory map.
    pub memory: MemoryMap,
    /// Smallest guest memory accepted, in bytes.
    pub min_memory: u64,
    /// Largest guest memory accepted, in bytes.
    pub max_memory: u64,
    /// Largest vCPU count accepted.
    pub max_vcpus: u32,
    /// Legacy devices.
    pub legacy: LegacyDevices,
    /// ACPI identification.
    pub acpi_ids: AcpiIds,
    /// Longest kernel command line accepted, in bytes, excluding the NUL.
    pub max_cmdline_len: usize,
    /// Direct-boot structure placement.
    pub boot: BootLayout,
    /// PCI host bridge and windows.
    pub pci: PciLayout,
    /// Virtio device models.
    pub virtio: VirtioModels,
    /// Interrupt controllers.
    pub irqchip: InterruptControllers,
    /// vCPU state at reset.
    pub cpu_reset: CpuReset,
    /// Register defaults of the legacy devices.
    pub legacy_defaults: LegacyDefaults,
    /// How BARs are placed before the guest runs.
    pub bar_placement: BarPlacement,
    /// ACPI table choices.
    pub acpi: AcpiChoices,
    /// Firmware boot (`--firmware`): the image's slot and the devices only
    /// a firmware-booted guest has. Nothing here is visible to a guest
    /// booted directly, so adding it changed no released manifest.
    pub firmware: FirmwareLayout,
}

/// The first released machine type. Frozen: never change a value here.
pub fn pc_1_0() -> MachineDescription {
    MachineDescription {
        name: "pc-1.0".to_string(),
        default_cpu_model: "abide-v1".to_string(),
        default_devices: DefaultDevices { rng: false },
        memory: MemoryMap {
            low_ram_end: 0x9_fc00,
            high_ram_start: MIB,
            bios_area_start: 0xe_0000,
            bios_area_end: 0x10_0000,
            pci_hole_start: 3 * GIB,
            pci_hole_end: 4 * GIB,
            ioapic_addr: 0xfec0_0000,
            lapic_addr: 0xfee0_0000,
        },
        min_memory: 32 * MIB,
        // RAM above 4 GiB must stay below the 64-bit PCI window at 512 GiB.
        max_memory: 256 * GIB,
        max_vcpus: 64,
        legacy: LegacyDevices {
            com1: PioDevice {
                port: 0x3f8,
                len: 8,
                irq: Some(4),
            },
            i8042: PioDevice {
                port: 0x60,
                len: 5,
                irq: Some(1),
            },
            rtc: PioDevice {
                port: 0x70,
                len: 2,
                irq: Some(8),
            },
            pm: PmBlock {
                base: 0x600,
                cnt_offset: 4,
                tmr_offset: 8,
                len: 12,
                sci_irq: 9,
                s5_slp_typ: 5,
            },
            reset: ResetRegister {
                port: 0xcf9,
                value: 0x06,
            },
        },
        acpi_ids: AcpiIds {
            oem_id: "ABIDE ".to_string(),
            oem_table_id: "ABIDEPC ".to_string(),
            oem_revision: 1,
            creator_id: "ABDE".to_string(),
            creator_revision: 1,
        },
        max_cmdline_len: 4095,
        boot: BootLayout {
            gdt_addr: 0x500,
            pvh_start_info_addr: 0x6000,
            zero_page_addr: 0x7000,
            cmdline_addr: 0x2_0000,
            kernel_addr: MIB,
        },
        pci: PciLayout {
            config_io_port: 0xcf8,
            ecam_base: 0xe000_0000,
            ecam_size: MIB,
            mmio32_base: 0xc000_0000,
            mmio32_size: 0x2000_0000,
            mmio64_base: 0x80_0000_0000,
            mmio64_size: 0x80_0000_0000,
            io_base: 0x1000,
            io_size: 0xf000,
            intx_gsis: [16, 17, 18, 19],
            host_bridge: PciIdentity {
                vendor: 0x1b36,
                device: 0x0008,
                subsystem_vendor: 0x1b36,
                subsystem: 0x0008,
                revision: 0,
                class: 0x06_0000,
            },
        },
        virtio: VirtioModels {
            layout: VirtioBarLayout {
                bar_size: 0x8000,
                common: 0x0000,
                common_len: 0x38,
                isr: 0x1000,
                device: 0x2000,
                notify: 0x3000,
                notify_multiplier: 4,
                msix_table: 0x4000,
                msix_pba: 0x5000,
                cap_order: [
                    VirtioCap::Common,
                    VirtioCap::Notify,
                    VirtioCap::Isr,
                    VirtioCap::Device,
                    VirtioCap::Msix,
                ],
                pci_cfg_window: false,
            },
            blk: VirtioModel {
                msix_vectors: 2,
                num_queues: 1,
                queue_size: 256,
                features: VIRTIO_F_VERSION_1
                    | VIRTIO_BLK_F_SEG_MAX
                    | VIRTIO_BLK_F_BLK_SIZE
                    | VIRTIO_BLK_F_FLUSH,
                // Through `write_zeroes_may_unmap` of `struct virtio_blk_config`.
                config_len: 0x3c,
                ..virtio::model(0x1042, 0x01_0000)
            },
            blk_config: BlkConfig {
                blk_size: 512,
                seg_max: 256 - 2,
            },
            net: VirtioModel {
                msix_vectors: 3,
                num_queues: 2,
                queue_size: 256,
                rom_slot: Some(128 * KIB),
                features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS,
                // `mac`, `status`, `max_virtqueue_pairs`.
                config_len: 10,
                ..virtio::model(0x1041, 0x02_0000)
            },
            net_config: NetConfig {
                status: VIRTIO_NET_S_LINK_UP,
                max_virtqueue_pairs: 1,
                // QEMU's locally administered 52:54:00, then ab:1d.
                default_mac_prefix: [0x52, 0x54, 0x00, 0xab, 0x1d],
            },
            rng: VirtioModel {
                msix_vectors: 2,
                num_queues: 1,
                queue_size: 256,
                features: VIRTIO_F_VERSION_1,
                config_len: 0,
                ..virtio::model(0x1044, 0x00_ff00)
            },
        },
        irqchip: InterruptControllers {
            // KVM's in-kernel IOAPIC.
            ioapic_pins: 24,
            ioapic_id: 0,
            lapic_lint: [LintMode::ExtInt, LintMode::Nmi],
        },
        cpu_reset: CpuReset {
            fpu_control_word: 0x37f,
            mxcsr: 0x1f80,
            msrs: [
                (0x174, 0),       // IA32_SYSENTER_CS
                (0x175, 0),       // IA32_SYSENTER_ESP
                (0x176, 0),       // IA32_SYSENTER_EIP
                (0xc000_0081, 0), // STAR
                (0xc000_0083, 0), // CSTAR
                (0xc000_0102, 0), // KERNEL_GS_BASE
                (0xc000_0084, 0), // SYSCALL_MASK
                (0xc000_0082, 0), // LSTAR
                (0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
                                  // 0.1.0 also asked for IA32_MTRR_DEF_TYPE (0x2ff) = 0xc06
                                  // (MTRRs on, write-back), but KVM does not list that MSR, so
                                  // it was silently skipped: no released guest ever got it.
            ]
            .into_iter()
            .map(|(index, value)| MsrValue { index, value })
            .collect(),
        },
        legacy_defaults: LegacyDefaults {
            rtc: RtcDefaults {
                // 32.768 kHz time base, 1024 Hz periodic rate.
                register_a: 0x26,
                register_b: 0x02,
                register_d: 0x80,
                century_index: 0x32,
            },
            i8042: I8042Defaults {
                command_offset: 4,
                // System flag; keyboard and aux ports disabled.
                config_byte: 0x34,
                output_port: 0x03,
            },
        },
        bar_placement: BarPlacement::SlotOrder,
        acpi: acpi::pc_1_0_choices(),
        firmware: firmware::pc_1_0_firmware(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc() -> MachineDescription {
        resolve("pc").expect("pc resolves")
    }

    #[test]
    fn small_guest_fits_below_hole() {
        let m = pc();
        let r = m.memory.ram_ranges(512 * MIB);
        assert_eq!(
            r,
            vec![RamRange {
                start: 0,
                size: 512 * MIB
            }]
        );
    }

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn windows_do_not_collide() {
        let m = pc();
        let p = &m.pci;
        let hole = (
            m.memory.pci_hole_start,
            m.memory.pci_hole_end - m.memory.pci_hole_start,
        );
        let ecam = (p.ecam_base, p.ecam_size);
        let mmio32 = (p.mmio32_base, p.mmio32_size);
        let apics = (
            m.memory.ioapic_addr,
            m.memory.lapic_addr + 0x1000 - m.memory.ioapic_addr,
        );
        for w in [ecam, mmio32, apics] {
            assert!(
                w.0 >= hole.0 && w.0 + w.1 <= hole.0 + hole.1,
                "{w:x?} outside the hole"
            );
        }
        assert!(!overlaps(ecam, mmio32));
        assert!(!overlaps(ecam, apics));
        assert!(!overlaps(mmio32, apics));
        // The largest guest's RAM ends below the 64-bit window.
        let top = m
            .memory
            .ram_ranges(m.max_memory)
            .iter()
            .map(|r| r.start + r.size)
            .max()
            .expect("ram");
        assert!(top <= p.mmio64_base);
        assert!(u32::from(p.io_base) + u32::from(p.io_size) <= 0x1_0000);
        assert!(p.config_io_port < p.io_base);
    }

    #[test]
    fn large_guest_splits_around_hole() {
        let m = pc();
        let r = m.memory.ram_ranges(6 * GIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, 3 * GIB);
        assert_eq!(r[1].start, 4 * GIB);
        assert_eq!(r[1].size, 3 * GIB);
    }
}
