//! ACPI choices: table revisions, FADT fields, and the names and PNP IDs of
//! the devices in the DSDT. (Identification strings are [`crate::AcpiIds`];
//! addresses, ports and IRQs come from the rest of the description.)

use serde::{Deserialize, Serialize};

/// A device in the DSDT's `\_SB` scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiDevice {
    /// AML name (4 characters).
    pub name: String,
    /// `_HID` as an EISA ID (`PNP0501`).
    pub hid: String,
    /// `_UID`, if the device has one.
    pub uid: Option<u8>,
}

fn device(name: &str, hid: &str, uid: Option<u8>) -> AcpiDevice {
    AcpiDevice {
        name: name.to_string(),
        hid: hid.to_string(),
        uid,
    }
}

/// The devices the DSDT declares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiDevices {
    /// COM1.
    pub com1: AcpiDevice,
    /// The power button.
    pub power_button: AcpiDevice,
    /// The i8042 keyboard controller.
    pub keyboard: AcpiDevice,
    /// The CMOS RTC.
    pub rtc: AcpiDevice,
    /// The PCI root bridge of bus 0.
    pub pci_root: AcpiDevice,
    /// `_CID` of the PCI root bridge.
    pub pci_root_cid: String,
    /// Motherboard resources (reserves the ECAM window).
    pub motherboard: AcpiDevice,
}

/// ACPI table contents the machine chooses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiChoices {
    /// Alignment of every table (and of the RSDP, which the legacy scan
    /// needs on a 16-byte boundary).
    pub table_align: u64,
    /// FADT major revision (header `Revision`).
    pub fadt_revision: u8,
    /// FADT minor version.
    pub fadt_minor_revision: u8,
    /// MADT revision.
    pub madt_revision: u8,
    /// DSDT revision (2 or more: 64-bit AML integers).
    pub dsdt_revision: u8,
    /// FADT `Preferred_PM_Profile` (0 = unspecified).
    pub preferred_pm_profile: u8,
    /// Whether the FADT's `CENTURY` names the RTC's century byte (else 0:
    /// not supported).
    pub declare_century: bool,
    /// FADT `Hypervisor Vendor Identity` (0 = none).
    pub hypervisor_vendor_id: u64,
    /// FADT `Flags`.
    pub fadt_flags: u32,
    /// FADT `IAPC_BOOT_ARCH`.
    pub iapc_boot_arch: u16,
    /// PCI segment group of the root bridge (MCFG and `_SEG`).
    pub pci_segment: u16,
    /// First bus number under the root bridge (MCFG and `_BBN`).
    pub pci_first_bus: u8,
    /// The DSDT's devices.
    pub devices: AcpiDevices,
}

/// FADT flag `WBINVD`: WBINVD flushes caches correctly.
pub const FADT_WBINVD: u32 = 1 << 0;
/// FADT flag `PROC_C1`: C1 (HLT) works on every CPU.
pub const FADT_PROC_C1: u32 = 1 << 2;
/// FADT flag `SLP_BUTTON`: no fixed-feature sleep button.
pub const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT flag `FIX_RTC`: RTC wake status is not in the PM1 registers.
pub const FADT_FIX_RTC: u32 = 1 << 6;
/// FADT flag `RESET_REG_SUP`: `RESET_REG` is valid.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// `IAPC_BOOT_ARCH` `LEGACY_DEVICES`: ISA devices are present.
pub const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// `IAPC_BOOT_ARCH` `8042`: an i8042 is present.
pub const IAPC_8042: u16 = 1 << 1;

/// The choices of pc-1.0 (ACPI 6.5 tables).
pub(crate) fn pc_1_0_choices() -> AcpiChoices {
    AcpiChoices {
        table_align: 16,
        fadt_revision: 6,
        fadt_minor_revision: 5,
        madt_revision: 5,
        dsdt_revision: 2,
        preferred_pm_profile: 0,
        declare_century: false,
        hypervisor_vendor_id: 0,
        fadt_flags: FADT_WBINVD
            | FADT_PROC_C1
            | FADT_SLP_BUTTON
            | FADT_FIX_RTC
            | FADT_RESET_REG_SUP,
        iapc_boot_arch: IAPC_LEGACY_DEVICES | IAPC_8042,
        pci_segment: 0,
        pci_first_bus: 0,
        devices: AcpiDevices {
            com1: device("COM1", "PNP0501", Some(0)),
            power_button: device("PWRB", "PNP0C0C", Some(0)),
            keyboard: device("KBD_", "PNP0303", None),
            rtc: device("RTC_", "PNP0B00", None),
            pci_root: device("PCI0", "PNP0A08", Some(0)),
            pci_root_cid: "PNP0A03".to_string(),
            motherboard: device("MRES", "PNP0C02", Some(1)),
        },
    }
}
