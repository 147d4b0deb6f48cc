//! Guest-visible platform details beyond addresses and ports: interrupt
//! controllers, the vCPU state at reset, the legacy devices' register
//! defaults, and how BARs are placed.
//!
//! These structures are not part of the manifest format of release 0.1.0
//! (whose `legacy`, `memory.map` and `pci.layout` sections serialize other
//! structures as they are), so adding them changed no manifest. What they
//! decide still shows in the manifest where it can: ACPI table hashes, PCI
//! config space and BAR addresses.

use serde::{Deserialize, Serialize};

/// Delivery mode a local APIC LINT pin (LVT0/LVT1) is programmed with at
/// reset, as firmware wires a PC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LintMode {
    /// Fixed delivery (vector in the LVT).
    Fixed,
    /// NMI.
    Nmi,
    /// ExtINT: the pin carries the 8259 PIC's output.
    ExtInt,
}

impl LintMode {
    /// The LVT delivery-mode field (bits 8..=10).
    pub fn delivery_mode(self) -> u32 {
        match self {
            LintMode::Fixed => 0,
            LintMode::Nmi => 4,
            LintMode::ExtInt => 7,
        }
    }
}

/// The interrupt controllers a guest finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptControllers {
    /// Input pins of the (single) IOAPIC; GSIs `0..ioapic_pins` are its
    /// pins, MSI routes use the GSIs above.
    pub ioapic_pins: u32,
    /// The IOAPIC's ID (ID register and MADT entry).
    pub ioapic_id: u8,
    /// How LINT0 and LINT1 of every local APIC are wired (LVT0, LVT1); the
    /// MADT declares the NMI pin.
    pub lapic_lint: [LintMode; 2],
}

/// One MSR and the value a vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Value at reset.
    pub value: u64,
}

/// vCPU state at reset beyond what the boot protocol fixes (registers,
/// segments and GDT for the kernel's entry): set on every vCPU before it
/// first runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuReset {
    /// x87 control word (0x37f is the value after FNINIT).
    pub fpu_control_word: u16,
    /// MXCSR.
    pub mxcsr: u32,
    /// MSRs, written in this order. Each must be one the host's KVM lists
    /// (`KVM_GET_MSR_INDEX_LIST`); a VM is refused otherwise.
    pub msrs: Vec<MsrValue>,
}

/// Register defaults of the CMOS RTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcDefaults {
    /// Register A at reset (divider and periodic rate; bit 7, UIP, reads 0).
    pub register_a: u8,
    /// Register B at reset (0x02: 24-hour BCD, no interrupts enabled).
    pub register_b: u8,
    /// Register D (0x80: valid RAM and time).
    pub register_d: u8,
    /// CMOS index of the century byte.
    pub century_index: u8,
}

/// Defaults of the i8042 keyboard controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Defaults {
    /// Offset of the command/status port from the data port.
    pub command_offset: u16,
    /// Controller configuration byte at reset.
    pub config_byte: u8,
    /// Output port at reset (bit 0 the active-low reset line, bit 1 A20).
    pub output_port: u8,
}

/// Guest-visible defaults of the legacy devices (their ports and IRQs are
/// in [`crate::LegacyDevices`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyDefaults {
    /// CMOS RTC.
    pub rtc: RtcDefaults,
    /// i8042.
    pub i8042: I8042Defaults,
}

/// How BARs and ROM BARs get their addresses before the guest runs (the
/// placement firmware would do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BarPlacement {
    /// Slots in ascending order; within a function its BARs in index
    /// order, then its ROM BAR. Each region is naturally aligned and placed
    /// bottom-up from its window's base: memory BARs in the 32- or 64-bit
    /// window by kind, ROM BARs in the 32-bit window, I/O BARs in the I/O
    /// window. Decode stays off; ROM BARs are not enabled.
    SlotOrder,
}
