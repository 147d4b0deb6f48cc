//! ACPI tables built from a [`MachineDescription`].
//!
//! [`build`] produces an RSDP, an XSDT, a FADT, a DSDT, a MADT and an MCFG,
//! laid out contiguously from `memory.bios_area_start`:
//!
//! ```text
//! bios_area_start  RSDP (revision 2, 36 bytes; 16-byte aligned for the legacy scan)
//!                  DSDT (AML: \_SB devices, \_S5_)
//!                  FADT, MADT, MCFG (the tables listed in the XSDT, in XSDT order)
//!                  XSDT
//! ```
//!
//! The DSDT's `\_SB` holds COM1, PWRB, KBD_, RTC_ (ISA devices, at `\_SB`
//! level rather than under the PCI root), `PCI0` (the PCI Express root bridge
//! of bus 0) and `MRES` (motherboard resources: the ECAM window). The PCI
//! parts are in the `pci` submodule (`acpi/pci.rs`).
//!
//! Every table starts on an `acpi.table_align`-byte boundary. Addresses,
//! ports, IRQs, IDs, table revisions, FADT fields and the DSDT's device names
//! and PNP IDs come from the machine description (`acpi`, `acpi_ids`,
//! `irqchip`, `legacy`, `legacy_defaults`, `pci`); what it declares that
//! these tables cannot express is refused ([`AcpiError`]). Every literal
//! left here is fixed by the ACPI specification.
//!
//! # What the device models must do to match
//!
//! * ACPI is always enabled (`SMI_CMD` = 0): `SCI_EN` (bit 0) of PM1a_CNT must
//!   read as 1 from reset, and writes must not clear it.
//! * PM1a_CNT: a write with `SLP_EN` (bit 13) set and `SLP_TYP` (bits 10..=12)
//!   equal to `pm.s5_slp_typ` powers the machine off (the DSDT's `\_S5_`).
//! * The SCI (`pm.sci_irq`) is declared level-triggered, active-high: the PM
//!   device must hold the line high while `PM1_STS & PM1_EN != 0` and drop it
//!   when the guest clears the status bits.
//! * The PM timer is 24 bits wide (`TMR_VAL_EXT` = 0), running at 3.579545 MHz.
//! * The power button is a fixed-feature button (`PWR_BUTTON` = 0):
//!   `PWRBTN_STS`/`PWRBTN_EN` (bit 8) in PM1 raise the SCI. RTC wake status is
//!   not in PM1 (`FIX_RTC` = 1). There is no FACS, hence no global lock:
//!   `GBL_EN` (PM1_EN bit 5) must read as 0 so that the OS sees no global lock.
//! * Writing `reset.value` to `reset.port` resets the machine (`RESET_REG`).
//! * The MADT has no override for ISA IRQ 0: the PIT is on IOAPIC pin 0, which
//!   is where KVM's default GSI routing delivers it.
//! * The IOAPIC's ID register must read `irqchip.ioapic_id` (KVM's in-kernel
//!   IOAPIC resets to 0, so the VMM refuses any other ID).
//! * PCI: CONFIG_ADDRESS/CONFIG_DATA at `pci.config_io_port` (8 ports; the
//!   byte port `reset.port` may sit inside them), ECAM for buses
//!   `0..ecam_size >> 20` at `pci.ecam_base` (segment 0). BARs are placed in
//!   `pci.mmio32_*`, `pci.mmio64_*` and `pci.io_*`, all inside the `PCI0`
//!   windows. INTx pin P (0 = INTA#) of slot N is wired to GSI
//!   `pci.intx_gsis[(N + P) % 4]`, level-triggered, active-low as the guest
//!   programs it: the device must keep the line asserted while its interrupt
//!   is pending (re-raise after EOI) and drop it when the guest clears it.
//!   Those GSIs must be IOAPIC pins (below `irqchip.ioapic_pins`) and not
//!   ISA IRQs.
//! * The 64-bit window ends at `mmio64_base + mmio64_size - 1`; CPUID must
//!   report enough physical address bits to reach it (40 for the `pc` machine),
//!   or Linux drops the window.

use abide_machines::{
    AcpiDevice, AcpiIds, LintMode, MachineDescription, PioDevice, PmBlock, FADT_FIX_RTC,
    FADT_PROC_C1, FADT_RESET_REG_SUP, FADT_SLP_BUTTON, FADT_WBINVD, IAPC_8042, IAPC_LEGACY_DEVICES,
};
use acpi_tables::{aml, Aml, AmlSink};

mod choices;
mod pci;

/// Most vCPUs the tables describe: xAPIC IDs and MADT processor UIDs are 8
/// bits, 0xFF being the broadcast APIC ID and the "all processors" UID; we
/// stop at 254 vCPUs (IDs `0..=253`).
pub const MAX_XAPIC_CPUS: u32 = 254;

// ---------------------------------------------------------------------------
// ACPI specification constants.
// ---------------------------------------------------------------------------

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_REVISION: u8 = 2;
const RSDP_LEN: usize = 36;
/// Bytes covered by the ACPI 1.0 RSDP checksum.
const RSDP_V1_LEN: usize = 20;
const SDT_HEADER_LEN: usize = 36;
const SDT_LENGTH_OFFSET: usize = 4;
const SDT_CHECKSUM_OFFSET: usize = 9;
const XSDT_REVISION: u8 = 1;
const FADT_LEN: usize = 276;

/// Field offsets in the FADT (ACPI 6.5, table 5.9).
mod fadt_off {
    pub const DSDT: usize = 40;
    pub const PREFERRED_PM_PROFILE: usize = 45;
    pub const SCI_INT: usize = 46;
    pub const SMI_CMD: usize = 48;
    pub const PM1A_EVT_BLK: usize = 56;
    pub const PM1A_CNT_BLK: usize = 64;
    pub const PM_TMR_BLK: usize = 76;
    pub const PM1_EVT_LEN: usize = 88;
    pub const PM1_CNT_LEN: usize = 89;
    pub const PM_TMR_LEN: usize = 91;
    pub const P_LVL2_LAT: usize = 96;
    pub const P_LVL3_LAT: usize = 98;
    pub const CENTURY: usize = 108;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION: usize = 131;
    pub const X_DSDT: usize = 140;
    pub const X_PM1A_EVT_BLK: usize = 148;
    pub const X_PM1A_CNT_BLK: usize = 172;
    pub const X_PM_TMR_BLK: usize = 208;
    pub const HYPERVISOR_VENDOR_ID: usize = 268;
}

/// Register block lengths the spec fixes for PM1 event (status + enable),
/// PM1 control and the PM timer.
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;
const PM_TMR_LEN: u8 = 4;
/// Latencies above 100 / 1000 µs mean "C2 / C3 not supported".
const P_LVL2_LAT_NO_C2: u16 = 101;
const P_LVL3_LAT_NO_C3: u16 = 1001;

/// FADT flags these tables and the device models can honour: the rest
/// (`PWR_BUTTON` clear is required: the power button is a fixed feature;
/// `TMR_VAL_EXT` clear: the PM timer is 24 bits; no `HW_REDUCED_ACPI`) are
/// refused.
const FADT_FLAGS_IMPLEMENTED: u32 =
    FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_RESET_REG_SUP;
/// `IAPC_BOOT_ARCH` `VGA_NOT_PRESENT`.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// `IAPC_BOOT_ARCH` flags that describe this platform truthfully (there is
/// no VGA; MSI works, the RTC exists: those flags stay clear).
const IAPC_IMPLEMENTED: u16 = IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT;
/// The FADT layout these tables write (ACPI 6.x, 276 bytes).
const FADT_IMPLEMENTED_REVISION: u8 = 6;
/// Highest FADT minor version of revision 6 (ACPI 6.5).
const FADT_MAX_MINOR_REVISION: u8 = 5;
/// MADT revisions whose structures these tables use unchanged.
const MADT_REVISIONS: std::ops::RangeInclusive<u8> = 1..=5;
/// Highest `Preferred_PM_Profile` defined (8: tablet).
const MAX_PM_PROFILE: u8 = 8;

/// Generic Address Structure: address space IDs and access sizes.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const GAS_ACCESS_DWORD: u8 = 3;

/// MADT flags and interrupt controller structure types.
const MADT_PCAT_COMPAT: u32 = 1 << 0;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_ENABLED: u32 = 1 << 0;
/// MPS INTI flags: polarity in bits 0..=1, trigger mode in bits 2..=3.
const MPS_INTI_CONFORMS: u16 = 0;
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_LEVEL: u16 = 0b11 << 2;
/// Bus value of ISA in an Interrupt Source Override.
const MADT_BUS_ISA: u8 = 0;
/// ACPI processor UID meaning "all processors" in a Local APIC NMI entry.
const MADT_ALL_PROCESSORS: u8 = 0xff;

/// `_STA`: present, enabled, shown in UI, functioning.
const STA_PRESENT_AND_FUNCTIONING: u8 = 0x0f;
/// ISA IRQs fit the 16-bit mask of an IRQ descriptor.
const ISA_IRQ_COUNT: u32 = 16;
/// Small resource descriptor: IRQ format without the flags byte.
const IRQ_NO_FLAGS_DESCRIPTOR: u8 = 0x22;
/// Alignment given in an IO descriptor whose minimum equals its maximum.
const IO_FIXED_ALIGNMENT: u8 = 1;

/// Errors building ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area reserved for them.
    #[error("ACPI tables need {needed} bytes but the machine reserves only {available}")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A machine needs at least one vCPU.
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
    /// More vCPUs than xAPIC IDs can number.
    #[error("{requested} vCPUs requested but xAPIC tables describe at most {max}")]
    TooManyCpus {
        /// vCPUs requested.
        requested: u32,
        /// Largest count supported.
        max: u32,
    },
    /// The BIOS area does not start where the RSDP may go.
    #[error("BIOS area start {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Start of the BIOS area.
        addr: u64,
        /// Alignment required.
        align: u64,
    },
    /// An identification string has the wrong length or is not printable ASCII.
    #[error("ACPI {field} {value:?} must be exactly {len} printable ASCII bytes")]
    BadId {
        /// Which field of `acpi_ids`.
        field: &'static str,
        /// Its value.
        value: String,
        /// Length the field requires.
        len: usize,
    },
    /// A choice of the machine's `acpi` these tables cannot express.
    #[error("ACPI {field} = {value} cannot be given: {reason}")]
    Unsupported {
        /// The machine description's field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What the tables can express instead.
        reason: String,
    },
    /// A device's resources cannot be described in ACPI.
    #[error("{device}: {reason}")]
    BadResource {
        /// The device.
        device: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The ACPI tables, laid out at guest physical addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest physical address of the RSDP.
    pub rsdp_addr: u64,
    /// Each table (RSDP included) with the guest physical address it goes to.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Builds the tables for `machine` with `num_cpus` vCPUs (APIC IDs `0..num_cpus`).
pub fn build(machine: &MachineDescription, num_cpus: u32) -> Result<AcpiTables, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_XAPIC_CPUS {
        return Err(AcpiError::TooManyCpus {
            requested: num_cpus,
            max: MAX_XAPIC_CPUS,
        });
    }
    choices::check(machine)?;
    let ids = TableIds::new(&machine.acpi_ids)?;
    let mem = &machine.memory;
    let mut layout = Layout::new(
        mem.bios_area_start,
        mem.bios_area_end,
        machine.acpi.table_align,
    )?;

    let rsdp_addr = layout.place(RSDP_LEN);
    let dsdt = build_dsdt(machine, &ids)?;
    let dsdt_addr = layout.place(dsdt.len());

    // The tables the XSDT lists, in order. Adding a table (MCFG, …) is one line.
    let xsdt_tables = vec![
        build_fadt(machine, &ids, dsdt_addr)?,
        build_madt(machine, &ids, num_cpus)?,
        pci::build_mcfg(machine, &ids)?,
    ];

    let mut blobs = vec![(dsdt_addr, dsdt)];
    let mut xsdt_entries = Vec::with_capacity(xsdt_tables.len());
    for table in xsdt_tables {
        let addr = layout.place(table.len());
        xsdt_entries.push(addr);
        blobs.push((addr, table));
    }
    let xsdt = build_xsdt(&ids, &xsdt_entries);
    let xsdt_addr = layout.place(xsdt.len());
    blobs.push((xsdt_addr, xsdt));
    blobs.push((rsdp_addr, build_rsdp(&ids, xsdt_addr)));

    layout.check()?;
    blobs.sort_by_key(|(addr, _)| *addr);
    Ok(AcpiTables { rsdp_addr, blobs })
}

/// Hands out table addresses in `[start, end)`; [`Layout::check`] reports
/// whether everything fit.
struct Layout {
    start: u64,
    end: u64,
    next: u64,
    align: u64,
}

impl Layout {
    fn new(start: u64, end: u64, align: u64) -> Result<Self, AcpiError> {
        if align_up(start, align) != start {
            return Err(AcpiError::Misaligned { addr: start, align });
        }
        Ok(Layout {
            start,
            end,
            next: start,
            align,
        })
    }

    /// Reserves `len` bytes and returns their address.
    fn place(&mut self, len: usize) -> u64 {
        let addr = self.next;
        self.next = align_up(addr.saturating_add(len as u64), self.align);
        addr
    }

    fn check(&self) -> Result<(), AcpiError> {
        if self.next > self.end {
            return Err(AcpiError::TooLarge {
                needed: self.next - self.start,
                available: self.end.saturating_sub(self.start),
            });
        }
        Ok(())
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align).saturating_mul(align)
}

/// Sums `bytes` modulo 256 and returns what makes the total 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The identification fields of every table header, validated.
struct TableIds {
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: u32,
    creator_id: [u8; 4],
    creator_revision: u32,
}

impl TableIds {
    fn new(ids: &AcpiIds) -> Result<Self, AcpiError> {
        Ok(TableIds {
            oem_id: fixed_id("oem_id", &ids.oem_id)?,
            oem_table_id: fixed_id("oem_table_id", &ids.oem_table_id)?,
            oem_revision: ids.oem_revision,
            creator_id: fixed_id("creator_id", &ids.creator_id)?,
            creator_revision: ids.creator_revision,
        })
    }
}

fn fixed_id<const N: usize>(field: &'static str, value: &str) -> Result<[u8; N], AcpiError> {
    let bad = || AcpiError::BadId {
        field,
        value: value.to_string(),
        len: N,
    };
    if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(bad());
    }
    value.as_bytes().try_into().map_err(|_| bad())
}

/// A system description table under construction: header first, then the
/// body either appended or written at fixed offsets.
struct Sdt {
    bytes: Vec<u8>,
}

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8, ids: &TableIds) -> Self {
        let mut bytes = Vec::with_capacity(SDT_HEADER_LEN);
        bytes.extend_from_slice(signature);
        bytes.extend_from_slice(&0u32.to_le_bytes()); // length, set by finish()
        bytes.push(revision);
        bytes.push(0); // checksum, set by finish()
        bytes.extend_from_slice(&ids.oem_id);
        bytes.extend_from_slice(&ids.oem_table_id);
        bytes.extend_from_slice(&ids.oem_revision.to_le_bytes());
        bytes.extend_from_slice(&ids.creator_id);
        bytes.extend_from_slice(&ids.creator_revision.to_le_bytes());
        debug_assert_eq!(bytes.len(), SDT_HEADER_LEN);
        Sdt { bytes }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }

    /// Zero-extends the table to `len` bytes, for fixed-layout tables.
    fn resize(&mut self, len: usize) {
        self.bytes.resize(len, 0);
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn put_u8(&mut self, offset: usize, value: u8) {
        self.put(offset, &[value]);
    }

    fn put_u16(&mut self, offset: usize, value: u16) {
        self.put(offset, &value.to_le_bytes());
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        self.put(offset, &value.to_le_bytes());
    }

    fn put_u64(&mut self, offset: usize, value: u64) {
        self.put(offset, &value.to_le_bytes());
    }

    /// Sets the length and checksum fields and returns the bytes.
    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        self.put_u32(SDT_LENGTH_OFFSET, len);
        self.bytes[SDT_CHECKSUM_OFFSET] = 0;
        self.bytes[SDT_CHECKSUM_OFFSET] = checksum(&self.bytes);
        self.bytes
    }
}

/// A Generic Address Structure for an I/O port register of `bytes` bytes.
fn gas_io(port: u16, bytes: u8, access_size: u8) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = GAS_SYSTEM_IO;
    gas[1] = bytes * 8; // register bit width
    gas[2] = 0; // register bit offset
    gas[3] = access_size;
    gas[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    gas
}

fn build_rsdp(ids: &TableIds, xsdt_addr: u64) -> Vec<u8> {
    let mut rsdp = Vec::with_capacity(RSDP_LEN);
    rsdp.extend_from_slice(RSDP_SIGNATURE);
    rsdp.push(0); // checksum (first 20 bytes)
    rsdp.extend_from_slice(&ids.oem_id);
    rsdp.push(RSDP_REVISION);
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // RsdtAddress: no RSDT
    rsdp.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.push(0); // extended checksum (all 36 bytes)
    rsdp.extend_from_slice(&[0; 3]);
    debug_assert_eq!(rsdp.len(), RSDP_LEN);
    rsdp[8] = checksum(&rsdp[..RSDP_V1_LEN]);
    rsdp[32] = checksum(&rsdp);
    rsdp
}

fn build_xsdt(ids: &TableIds, entries: &[u64]) -> Vec<u8> {
    let mut xsdt = Sdt::new(b"XSDT", XSDT_REVISION, ids);
    for addr in entries {
        xsdt.push(&addr.to_le_bytes());
    }
    xsdt.finish()
}

/// Checks that the PM registers the FADT declares lie inside the PM block and
/// do not overlap.
fn check_pm_block(pm: &PmBlock) -> Result<(), AcpiError> {
    let bad = |reason| AcpiError::BadResource {
        device: "PM block",
        reason,
    };
    let regions = [
        (0, u16::from(PM1_EVT_LEN)),
        (pm.cnt_offset, u16::from(PM1_CNT_LEN)),
        (pm.tmr_offset, u16::from(PM_TMR_LEN)),
    ];
    for (i, &(off, len)) in regions.iter().enumerate() {
        if u32::from(off) + u32::from(len) > u32::from(pm.len) {
            return Err(bad("register outside the block"));
        }
        for &(other, other_len) in &regions[i + 1..] {
            if off < other + other_len && other < off + len {
                return Err(bad("registers overlap"));
            }
        }
    }
    if u32::from(pm.base) + u32::from(pm.len) > 0x1_0000 {
        return Err(bad("block runs past the end of the port space"));
    }
    Ok(())
}

/// FADT, revision 6. Flags:
/// * `WBINVD`: WBINVD flushes caches correctly (always true under KVM).
/// * `PROC_C1`: C1 (HLT) works on every CPU.
/// * `SLP_BUTTON`: no fixed-feature sleep button.
/// * `FIX_RTC`: RTC wake status is not in the PM1 registers.
/// * `RESET_REG_SUP`: `RESET_REG` is valid.
/// * clear: `PWR_BUTTON` (the power button *is* a fixed feature),
///   `TMR_VAL_EXT` (24-bit PM timer), `HW_REDUCED_ACPI` (we have PM1).
///
/// There is no FACS (`FIRMWARE_CTRL` = 0), no GPE block and no SMI command
/// port: ACPI is always enabled, so the PM device must report `SCI_EN` = 1.
fn build_fadt(
    machine: &MachineDescription,
    ids: &TableIds,
    dsdt_addr: u64,
) -> Result<Vec<u8>, AcpiError> {
    let pm = &machine.legacy.pm;
    let reset = &machine.legacy.reset;
    check_pm_block(pm)?;
    let sci_int = u16::try_from(pm.sci_irq).map_err(|_| AcpiError::BadResource {
        device: "PM block",
        reason: "SCI does not fit the FADT's 16-bit SCI_INT",
    })?;

    let a = &machine.acpi;
    let mut fadt = Sdt::new(b"FACP", a.fadt_revision, ids);
    fadt.resize(FADT_LEN);
    // The 32-bit pointer is only usable below 4 GiB; X_DSDT always is.
    fadt.put_u32(fadt_off::DSDT, u32::try_from(dsdt_addr).unwrap_or(0));
    fadt.put_u64(fadt_off::X_DSDT, dsdt_addr);
    fadt.put_u8(fadt_off::PREFERRED_PM_PROFILE, a.preferred_pm_profile);
    fadt.put_u16(fadt_off::SCI_INT, sci_int);
    fadt.put_u32(fadt_off::SMI_CMD, 0);

    fadt.put_u32(fadt_off::PM1A_EVT_BLK, pm.base.into());
    fadt.put_u32(fadt_off::PM1A_CNT_BLK, pm.cnt_port().into());
    fadt.put_u32(fadt_off::PM_TMR_BLK, pm.tmr_port().into());
    fadt.put_u8(fadt_off::PM1_EVT_LEN, PM1_EVT_LEN);
    fadt.put_u8(fadt_off::PM1_CNT_LEN, PM1_CNT_LEN);
    fadt.put_u8(fadt_off::PM_TMR_LEN, PM_TMR_LEN);
    // PM1 status and enable are two 16-bit halves: word access.
    fadt.put(
        fadt_off::X_PM1A_EVT_BLK,
        &gas_io(pm.base, PM1_EVT_LEN, GAS_ACCESS_WORD),
    );
    fadt.put(
        fadt_off::X_PM1A_CNT_BLK,
        &gas_io(pm.cnt_port(), PM1_CNT_LEN, GAS_ACCESS_WORD),
    );
    fadt.put(
        fadt_off::X_PM_TMR_BLK,
        &gas_io(pm.tmr_port(), PM_TMR_LEN, GAS_ACCESS_DWORD),
    );

    fadt.put_u16(fadt_off::P_LVL2_LAT, P_LVL2_LAT_NO_C2);
    fadt.put_u16(fadt_off::P_LVL3_LAT, P_LVL3_LAT_NO_C3);
    let century = if a.declare_century {
        machine.legacy_defaults.rtc.century_index
    } else {
        0
    };
    fadt.put_u8(fadt_off::CENTURY, century);
    fadt.put_u16(fadt_off::IAPC_BOOT_ARCH, a.iapc_boot_arch);
    fadt.put_u32(fadt_off::FLAGS, a.fadt_flags);
    fadt.put(fadt_off::RESET_REG, &gas_io(reset.port, 1, GAS_ACCESS_BYTE));
    fadt.put_u8(fadt_off::RESET_VALUE, reset.value);
    fadt.put_u8(fadt_off::MINOR_VERSION, a.fadt_minor_revision);
    fadt.put_u64(fadt_off::HYPERVISOR_VENDOR_ID, a.hypervisor_vendor_id);
    Ok(fadt.finish())
}

/// MADT: one enabled Local APIC per vCPU (UID = APIC ID = index), one IOAPIC
/// (ID `irqchip.ioapic_id`, GSI base 0), the ISA override for the SCI, and
/// every LINT pin the machine wires to NMI, on every processor.
fn build_madt(
    machine: &MachineDescription,
    ids: &TableIds,
    num_cpus: u32,
) -> Result<Vec<u8>, AcpiError> {
    let mem = &machine.memory;
    let lapic_addr = u32::try_from(mem.lapic_addr).map_err(|_| AcpiError::BadResource {
        device: "local APIC",
        reason: "address above 4 GiB",
    })?;
    let ioapic_addr = u32::try_from(mem.ioapic_addr).map_err(|_| AcpiError::BadResource {
        device: "IOAPIC",
        reason: "address above 4 GiB",
    })?;
    let sci = isa_irq_number(machine.legacy.pm.sci_irq, "SCI")?;

    let mut madt = Sdt::new(b"APIC", machine.acpi.madt_revision, ids);
    madt.push(&lapic_addr.to_le_bytes());
    madt.push(&MADT_PCAT_COMPAT.to_le_bytes());

    for cpu in 0..num_cpus {
        // num_cpus <= MAX_XAPIC_CPUS, so the index fits a u8.
        let id = u8::try_from(cpu).map_err(|_| AcpiError::TooManyCpus {
            requested: num_cpus,
            max: MAX_XAPIC_CPUS,
        })?;
        madt.push(&[MADT_LOCAL_APIC, 8, id, id]);
        madt.push(&MADT_LOCAL_APIC_ENABLED.to_le_bytes());
    }

    madt.push(&[MADT_IO_APIC, 12, machine.irqchip.ioapic_id, 0]);
    madt.push(&ioapic_addr.to_le_bytes());
    madt.push(&0u32.to_le_bytes()); // GSI base

    let mut override_irq = |source: u8, gsi: u32, flags: u16| {
        madt.push(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, MADT_BUS_ISA, source]);
        madt.push(&gsi.to_le_bytes());
        madt.push(&flags.to_le_bytes());
    };
    // SCI: level-triggered, active high, identity-mapped.
    override_irq(sci, sci.into(), MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL);

    for (lint, mode) in (0u8..).zip(machine.irqchip.lapic_lint) {
        if mode == LintMode::Nmi {
            madt.push(&[MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS]);
            madt.push(&MPS_INTI_CONFORMS.to_le_bytes());
            madt.push(&[lint]);
        }
    }
    Ok(madt.finish())
}

fn isa_irq_number(irq: u32, device: &'static str) -> Result<u8, AcpiError> {
    if irq >= ISA_IRQ_COUNT {
        return Err(AcpiError::BadResource {
            device,
            reason: "not an ISA IRQ (0..=15)",
        });
    }
    Ok(irq as u8)
}

// ---------------------------------------------------------------------------
// DSDT
// ---------------------------------------------------------------------------

/// An `IRQNoFlags() {n}` resource descriptor (edge, active high, exclusive).
/// ISA devices conventionally use this short descriptor; the `acpi_tables`
/// crate only offers the extended interrupt descriptor.
struct IrqNoFlags {
    irq: u8,
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(IRQ_NO_FLAGS_DESCRIPTOR);
        sink.word(1 << self.irq);
    }
}

/// An `IO(Decode16, port, port, 1, len)` descriptor for a fixed port range,
/// checked to fit the descriptor and the port space.
fn io_range(device: &'static str, port: u16, len: u16) -> Result<aml::IO, AcpiError> {
    let bad = |reason| AcpiError::BadResource { device, reason };
    let len8 = u8::try_from(len).map_err(|_| bad("I/O range longer than 255 ports"))?;
    if len == 0 {
        return Err(bad("empty I/O range"));
    }
    if u32::from(port) + u32::from(len) > 0x1_0000 {
        return Err(bad("I/O range runs past the end of the port space"));
    }
    Ok(aml::IO::new(port, port, IO_FIXED_ALIGNMENT, len8))
}

fn device_irq(device: &'static str, dev: &PioDevice) -> Result<Option<IrqNoFlags>, AcpiError> {
    dev.irq
        .map(|irq| isa_irq_number(irq, device).map(|irq| IrqNoFlags { irq }))
        .transpose()
}

/// Serializes `Device(name) { Name(_HID, EisaId(hid)), <names…>, Name(_CRS, …) }`
/// (no `_CRS` if `resources` is empty). `extra` entries whose value is
/// `None` are left out. The name and `_HID` were checked by
/// [`choices::check`].
fn hid_device(
    dev: &AcpiDevice,
    extra: &[(&str, Option<&dyn Aml>)],
    resources: Vec<&dyn Aml>,
) -> Vec<u8> {
    let name = dev.name.as_str();
    let hid = aml::EISAName::new(&dev.hid);
    let mut names = vec![aml::Name::new("_HID".into(), &hid)];
    for (n, value) in extra {
        if let Some(value) = value {
            names.push(aml::Name::new((*n).into(), *value));
        }
    }
    if !resources.is_empty() {
        let crs = aml::ResourceTemplate::new(resources);
        names.push(aml::Name::new("_CRS".into(), &crs));
    }
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    let mut bytes = Vec::new();
    aml::Device::new(name.into(), children).to_aml_bytes(&mut bytes);
    bytes
}

/// `_UID` of `dev`, if it has one.
fn uid(dev: &AcpiDevice) -> Option<&dyn Aml> {
    dev.uid.as_ref().map(|u| u as &dyn Aml)
}

fn com1_device(dev: &AcpiDevice, com1: &PioDevice) -> Result<Vec<u8>, AcpiError> {
    let io = io_range("COM1", com1.port, com1.len)?;
    let irq = device_irq("COM1", com1)?;
    let mut resources: Vec<&dyn Aml> = vec![&io];
    if let Some(irq) = &irq {
        resources.push(irq);
    }
    Ok(hid_device(
        dev,
        &[
            ("_UID", uid(dev)),
            ("_STA", Some(&STA_PRESENT_AND_FUNCTIONING)),
        ],
        resources,
    ))
}

fn power_button_device(dev: &AcpiDevice) -> Vec<u8> {
    hid_device(dev, &[("_UID", uid(dev))], Vec::new())
}

fn keyboard_device(
    dev: &AcpiDevice,
    i8042: &PioDevice,
    command_offset: u16,
) -> Result<Vec<u8>, AcpiError> {
    const DEVICE: &str = "i8042";
    if command_offset == 0 || i8042.len <= command_offset {
        return Err(AcpiError::BadResource {
            device: DEVICE,
            reason: "port range does not reach the command port",
        });
    }
    let data = io_range(DEVICE, i8042.port, 1)?;
    let command_port = i8042
        .port
        .checked_add(command_offset)
        .ok_or(AcpiError::BadResource {
            device: DEVICE,
            reason: "command port past the end of the port space",
        })?;
    let command = io_range(DEVICE, command_port, 1)?;
    let irq = device_irq(DEVICE, i8042)?;
    let mut resources: Vec<&dyn Aml> = vec![&data, &command];
    if let Some(irq) = &irq {
        resources.push(irq);
    }
    Ok(hid_device(dev, &[("_UID", uid(dev))], resources))
}

fn rtc_device(dev: &AcpiDevice, rtc: &PioDevice) -> Result<Vec<u8>, AcpiError> {
    let io = io_range("RTC", rtc.port, rtc.len)?;
    let irq = device_irq("RTC", rtc)?;
    let mut resources: Vec<&dyn Aml> = vec![&io];
    if let Some(irq) = &irq {
        resources.push(irq);
    }
    Ok(hid_device(dev, &[("_UID", uid(dev))], resources))
}

/// The devices in `\_SB`, each serialized: the legacy devices, then the PCI
/// root bridge and the motherboard resources (see [`pci`]).
fn system_bus_devices(machine: &MachineDescription) -> Result<Vec<Vec<u8>>, AcpiError> {
    let legacy = &machine.legacy;
    let d = &machine.acpi.devices;
    let mut devices = vec![
        com1_device(&d.com1, &legacy.com1)?,
        power_button_device(&d.power_button),
        keyboard_device(
            &d.keyboard,
            &legacy.i8042,
            machine.legacy_defaults.i8042.command_offset,
        )?,
        rtc_device(&d.rtc, &legacy.rtc)?,
    ];
    devices.extend(pci::system_bus_devices(machine)?);
    Ok(devices)
}

/// Root-level `Name(_S5_, Package() { typ, typ, 0, 0 })`: SLP_TYPa, SLP_TYPb
/// and two reserved elements.
fn s5_object(pm: &PmBlock) -> Vec<u8> {
    let typ = pm.s5_slp_typ;
    let mut bytes = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&typ, &typ, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

fn build_dsdt(machine: &MachineDescription, ids: &TableIds) -> Result<Vec<u8>, AcpiError> {
    let mut dsdt = Sdt::new(b"DSDT", machine.acpi.dsdt_revision, ids);
    let system_bus: Vec<u8> = system_bus_devices(machine)?.concat();
    dsdt.push(&aml::Scope::raw("\\_SB_".into(), system_bus));
    dsdt.push(&s5_object(&machine.legacy.pm));
    Ok(dsdt.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use abide_machines::pc_1_0 as pc;

    pub(super) fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    pub(super) fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    pub(super) fn u32_at(b: &[u8], off: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[off..off + 4]);
        u32::from_le_bytes(a)
    }

    pub(super) fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }

    pub(super) fn build_pc(num_cpus: u32) -> AcpiTables {
        build(&pc(), num_cpus).expect("pc tables build")
    }

    /// The blob starting at `addr`.
    pub(super) fn blob_at(t: &AcpiTables, addr: u64) -> &[u8] {
        &t.blobs
            .iter()
            .find(|(a, _)| *a == addr)
            .unwrap_or_else(|| panic!("no blob at {addr:#x}"))
            .1
    }

    /// The SDT with `signature`, following RSDP -> XSDT (or FADT for DSDT).
    pub(super) fn table<'a>(t: &'a AcpiTables, signature: &[u8; 4]) -> &'a [u8] {
        let rsdp = blob_at(t, t.rsdp_addr);
        let xsdt = blob_at(t, u64_at(rsdp, 24));
        let entries = (SDT_HEADER_LEN..xsdt.len()).step_by(8);
        for addr in entries.map(|off| u64_at(xsdt, off)) {
            let blob = blob_at(t, addr);
            if &blob[..4] == signature {
                return blob;
            }
            if &blob[..4] == b"FACP" && signature == b"DSDT" {
                return blob_at(t, u64_at(blob, fadt_off::X_DSDT));
            }
        }
        panic!("no {} table", String::from_utf8_lossy(signature));
    }

    /// EISA ID compression, written independently of the `acpi_tables` crate.
    pub(super) fn eisa_id(id: &str) -> [u8; 4] {
        let b = id.as_bytes();
        let letters =
            (u16::from(b[0] - 0x40) << 10) | (u16::from(b[1] - 0x40) << 5) | u16::from(b[2] - 0x40);
        let number = u16::from_str_radix(&id[3..], 16).expect("hex product number");
        let [l0, l1] = letters.to_be_bytes();
        let [n0, n1] = number.to_be_bytes();
        [l0, l1, n0, n1]
    }

    pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Decodes an AML PkgLength at `b[0..]`: (value, bytes used).
    pub(super) fn pkg_length(b: &[u8]) -> (usize, usize) {
        let follow = usize::from(b[0] >> 6);
        if follow == 0 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        let mut len = usize::from(b[0] & 0x0f);
        for i in 0..follow {
            len |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (len, 1 + follow)
    }

    /// Decodes an AML integer constant: (value, bytes used).
    pub(super) fn aml_integer(b: &[u8]) -> (u64, usize) {
        match b[0] {
            0x00 => (0, 1),
            0x01 => (1, 1),
            0xff => (u64::MAX, 1),
            0x0a => (b[1].into(), 2),
            0x0b => (u16_at(b, 1).into(), 3),
            0x0c => (u32_at(b, 1).into(), 5),
            0x0e => (u64_at(b, 1), 9),
            op => panic!("not an integer constant: {op:#x}"),
        }
    }

    /// The root-level `Name(name, Package(){…})` of a DSDT, as its integers.
    fn root_package(dsdt: &[u8], name: &[u8; 4]) -> Option<Vec<u64>> {
        let mut aml = &dsdt[SDT_HEADER_LEN..];
        while !aml.is_empty() {
            match aml[0] {
                // ScopeOp, MethodOp: skip the whole object.
                0x10 | 0x14 => aml = &aml[1 + pkg_length(&aml[1..]).0..],
                // ExtOpPrefix DeviceOp.
                0x5b if aml[1] == 0x82 => aml = &aml[2 + pkg_length(&aml[2..]).0..],
                // NameOp NameSeg DataObject.
                0x08 => {
                    let seg = &aml[1..5];
                    let data = &aml[5..];
                    if data[0] != 0x12 {
                        let (_, used) = aml_integer(data);
                        aml = &data[used..];
                        continue;
                    }
                    let (len, used) = pkg_length(&data[1..]);
                    if seg == name {
                        let count = data[1 + used];
                        let mut p = &data[2 + used..];
                        let mut values = Vec::new();
                        for _ in 0..count {
                            let (v, n) = aml_integer(p);
                            values.push(v);
                            p = &p[n..];
                        }
                        return Some(values);
                    }
                    aml = &data[1 + len..];
                }
                op => panic!("unexpected root-level AML opcode {op:#x}"),
            }
        }
        None
    }

    #[test]
    fn checksums_and_lengths() {
        for cpus in [1, 2, 64, MAX_XAPIC_CPUS] {
            let t = build_pc(cpus);
            assert_eq!(t.blobs.len(), 6);
            for (addr, blob) in &t.blobs {
                if *addr == t.rsdp_addr {
                    assert_eq!(&blob[..8], RSDP_SIGNATURE);
                    assert_eq!(blob.len(), RSDP_LEN);
                    assert_eq!(sum(&blob[..RSDP_V1_LEN]), 0, "RSDP checksum");
                    assert_eq!(sum(blob), 0, "RSDP extended checksum");
                    assert_eq!(blob[15], RSDP_REVISION);
                    assert_eq!(u32_at(blob, 20) as usize, blob.len());
                } else {
                    assert_eq!(sum(blob), 0, "checksum of table at {addr:#x}");
                    assert_eq!(u32_at(blob, SDT_LENGTH_OFFSET) as usize, blob.len());
                }
            }
        }
    }

    #[test]
    fn ids_on_every_table() {
        let m = pc();
        let t = build_pc(4);
        for (addr, blob) in &t.blobs {
            if *addr == t.rsdp_addr {
                assert_eq!(&blob[9..15], m.acpi_ids.oem_id.as_bytes());
                continue;
            }
            assert_eq!(&blob[10..16], m.acpi_ids.oem_id.as_bytes());
            assert_eq!(&blob[16..24], m.acpi_ids.oem_table_id.as_bytes());
            assert_eq!(u32_at(blob, 24), m.acpi_ids.oem_revision);
            assert_eq!(&blob[28..32], m.acpi_ids.creator_id.as_bytes());
            assert_eq!(u32_at(blob, 32), m.acpi_ids.creator_revision);
        }
    }

    #[test]
    fn xsdt_points_at_fadt_madt_and_mcfg() {
        let t = build_pc(2);
        let rsdp = blob_at(&t, t.rsdp_addr);
        let xsdt = blob_at(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        let signatures: Vec<&[u8]> = (SDT_HEADER_LEN..xsdt.len())
            .step_by(8)
            .map(|off| &blob_at(&t, u64_at(xsdt, off))[..4])
            .collect();
        assert_eq!(signatures, [b"FACP", b"APIC", b"MCFG"]);
    }

    #[test]
    fn fadt_fields_match_description() {
        let m = pc();
        let pm = &m.legacy.pm;
        let t = build_pc(1);
        let fadt = table(&t, b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(fadt[8], 6);

        let dsdt_addr = u64_at(fadt, fadt_off::X_DSDT);
        assert_eq!(u64::from(u32_at(fadt, fadt_off::DSDT)), dsdt_addr);
        assert_eq!(&blob_at(&t, dsdt_addr)[..4], b"DSDT");

        assert_eq!(u32::from(u16_at(fadt, fadt_off::SCI_INT)), pm.sci_irq);
        assert_eq!(u32_at(fadt, fadt_off::SMI_CMD), 0);
        assert_eq!(u32_at(fadt, fadt_off::PM1A_EVT_BLK), u32::from(pm.base));
        assert_eq!(
            u32_at(fadt, fadt_off::PM1A_CNT_BLK),
            u32::from(pm.cnt_port())
        );
        assert_eq!(u32_at(fadt, fadt_off::PM_TMR_BLK), u32::from(pm.tmr_port()));
        assert_eq!(fadt[fadt_off::PM1_EVT_LEN], 4);
        assert_eq!(fadt[fadt_off::PM1_CNT_LEN], 2);
        assert_eq!(fadt[fadt_off::PM_TMR_LEN], 4);
        for (off, port, bits) in [
            (fadt_off::X_PM1A_EVT_BLK, pm.base, 32),
            (fadt_off::X_PM1A_CNT_BLK, pm.cnt_port(), 16),
            (fadt_off::X_PM_TMR_BLK, pm.tmr_port(), 32),
            (fadt_off::RESET_REG, m.legacy.reset.port, 8),
        ] {
            assert_eq!(fadt[off], GAS_SYSTEM_IO);
            assert_eq!(fadt[off + 1], bits);
            assert_eq!(u64_at(fadt, off + 4), u64::from(port));
        }
        assert_eq!(fadt[fadt_off::RESET_VALUE], m.legacy.reset.value);

        let flags = u32_at(fadt, fadt_off::FLAGS);
        assert_ne!(flags & FADT_RESET_REG_SUP, 0);
        assert_ne!(flags & FADT_SLP_BUTTON, 0);
        assert_eq!(flags & (1 << 4), 0, "PWR_BUTTON: fixed power button");
        assert_eq!(flags & (1 << 8), 0, "TMR_VAL_EXT: 24-bit timer");
        assert_eq!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16_at(fadt, fadt_off::IAPC_BOOT_ARCH), 0b11);
    }

    #[test]
    fn madt_describes_cpus_and_interrupts() {
        let m = pc();
        for cpus in [1, 3, MAX_XAPIC_CPUS] {
            let t = build_pc(cpus);
            let madt = table(&t, b"APIC");
            assert_eq!(u64::from(u32_at(madt, 36)), m.memory.lapic_addr);
            assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);

            let mut lapic_ids = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut nmis = Vec::new();
            let mut off = 44;
            while off < madt.len() {
                let (kind, len) = (madt[off], usize::from(madt[off + 1]));
                let e = &madt[off..off + len];
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(len, 8);
                        assert_eq!(e[2], e[3], "UID = APIC ID");
                        assert_eq!(u32_at(e, 4), MADT_LOCAL_APIC_ENABLED);
                        lapic_ids.push(u32::from(e[3]));
                    }
                    MADT_IO_APIC => {
                        assert_eq!(len, 12);
                        ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                    }
                    MADT_INTERRUPT_SOURCE_OVERRIDE => {
                        assert_eq!(len, 10);
                        assert_eq!(e[2], MADT_BUS_ISA);
                        overrides.push((e[3], u32_at(e, 4), u16_at(e, 8)));
                    }
                    MADT_LOCAL_APIC_NMI => {
                        assert_eq!(len, 6);
                        nmis.push((e[2], u16_at(e, 3), e[5]));
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(lapic_ids, (0..cpus).collect::<Vec<_>>());
            assert_eq!(
                ioapics,
                [(m.irqchip.ioapic_id, m.memory.ioapic_addr as u32, 0)],
                "one IOAPIC"
            );
            let sci = m.legacy.pm.sci_irq;
            // Only the SCI is overridden; the PIT stays identity-mapped on pin 0.
            assert_eq!(overrides, [(sci as u8, sci, 0b1101)]);
            assert_eq!(nmis, [(0xff, 0, 1)]);
        }
    }

    #[test]
    fn dsdt_has_s5_and_devices() {
        let m = pc();
        let t = build_pc(1);
        let dsdt = table(&t, b"DSDT");
        let typ = u64::from(m.legacy.pm.s5_slp_typ);
        assert_eq!(root_package(dsdt, b"_S5_"), Some(vec![typ, typ, 0, 0]));
        for id in ["PNP0501", "PNP0C0C", "PNP0303", "PNP0B00"] {
            assert!(contains(dsdt, &eisa_id(id)), "{id} missing");
        }
        assert_eq!(eisa_id("PNP0501"), [0x41, 0xd0, 0x05, 0x01]);
        // COM1's IO descriptor: Decode16, min, max, alignment, length.
        let com1 = m.legacy.com1;
        let [lo, hi] = com1.port.to_le_bytes();
        assert!(contains(
            dsdt,
            &[0x47, 1, lo, hi, lo, hi, 1, com1.len as u8]
        ));
        // IRQNoFlags for COM1.
        let mask = 1u16 << com1.irq.expect("COM1 has an IRQ");
        let [mlo, mhi] = mask.to_le_bytes();
        assert!(contains(dsdt, &[0x22, mlo, mhi]));
        assert!(contains(dsdt, b"\\_SB_"));
    }

    #[test]
    fn s5_follows_description() {
        let mut m = pc();
        for typ in [0, 1, 7] {
            m.legacy.pm.s5_slp_typ = typ;
            let t = build(&m, 1).expect("build");
            let dsdt = table(&t, b"DSDT");
            let typ = u64::from(typ);
            assert_eq!(root_package(dsdt, b"_S5_"), Some(vec![typ, typ, 0, 0]));
        }
    }

    #[test]
    fn layout_inside_bios_area() {
        let m = pc();
        let t = build_pc(MAX_XAPIC_CPUS);
        assert_eq!(t.rsdp_addr, m.memory.bios_area_start);
        assert_eq!(t.blobs[0].0, t.rsdp_addr, "RSDP first");
        let mut prev_end = m.memory.bios_area_start;
        for (addr, blob) in &t.blobs {
            assert_eq!(align_up(*addr, m.acpi.table_align), *addr, "alignment");
            assert!(*addr >= prev_end, "blob at {addr:#x} overlaps");
            prev_end = addr + blob.len() as u64;
            assert!(prev_end <= m.memory.bios_area_end);
        }
    }

    #[test]
    fn cpu_count_limits() {
        let m = pc();
        assert!(matches!(build(&m, 0), Err(AcpiError::NoCpus)));
        assert!(matches!(
            build(&m, 255),
            Err(AcpiError::TooManyCpus {
                requested: 255,
                max: 254
            })
        ));
        assert!(build(&m, 254).is_ok());
    }

    #[test]
    fn too_small_area() {
        let mut m = pc();
        m.memory.bios_area_end = m.memory.bios_area_start + 256;
        match build(&m, 1) {
            Err(AcpiError::TooLarge { needed, available }) => {
                assert_eq!(available, 256);
                assert!(needed > 256);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn bad_ids_and_resources() {
        let mut m = pc();
        m.acpi_ids.oem_id = "TOOLONGID".to_string();
        assert!(matches!(
            build(&m, 1),
            Err(AcpiError::BadId {
                field: "oem_id",
                ..
            })
        ));

        let mut m = pc();
        m.legacy.pm.tmr_offset = m.legacy.pm.len - 2;
        assert!(matches!(build(&m, 1), Err(AcpiError::BadResource { .. })));

        let mut m = pc();
        m.legacy.com1.irq = Some(16);
        assert!(matches!(build(&m, 1), Err(AcpiError::BadResource { .. })));

        let mut m = pc();
        m.memory.bios_area_start += 4;
        assert!(matches!(build(&m, 1), Err(AcpiError::Misaligned { .. })));
    }
}
