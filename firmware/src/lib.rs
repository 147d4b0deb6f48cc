//! Boot protocol, e820, ACPI and option ROMs: everything that turns a
//! machine description into bytes the guest reads.

pub mod acpi;
pub mod acpi_loader;
pub mod bios;
pub mod boot;
pub mod e820;
