//! ACPI tables built from a [`MachineDescription`].
//!
//! (Being written: RSDP, XSDT, FADT, DSDT, MADT.)

use abide_machines::MachineDescription;

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
    let _ = (machine, num_cpus);
    Ok(AcpiTables::default())
}
