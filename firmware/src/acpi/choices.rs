//! Checks the machine's ACPI choices against what these tables can express,
//! before any byte is written: a choice they cannot honour is refused, never
//! replaced by something else.

use std::ops::RangeInclusive;

use abide_machines::{AcpiDevice, MachineDescription};

use super::{
    AcpiError, FADT_FLAGS_IMPLEMENTED, FADT_IMPLEMENTED_REVISION, FADT_MAX_MINOR_REVISION,
    IAPC_IMPLEMENTED, MADT_REVISIONS, MAX_PM_PROFILE,
};

/// Smallest table alignment: the legacy RSDP scan looks at 16-byte
/// boundaries.
const MIN_TABLE_ALIGN: u64 = 16;
/// Largest table alignment accepted (one page).
const MAX_TABLE_ALIGN: u64 = 4096;
/// DSDT revisions below 2 make AML integers 32 bits wide, too narrow for the
/// 64-bit PCI window.
const MIN_DSDT_REVISION: u8 = 2;

fn refuse(field: &'static str, value: impl std::fmt::Display, reason: &str) -> AcpiError {
    AcpiError::Unsupported {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Whether `name` is a valid 4-character AML name segment.
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4
        && (b[0].is_ascii_uppercase() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// Whether `id` is an EISA ID string: three uppercase letters, four
/// uppercase hexadecimal digits.
pub(super) fn valid_eisa_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 7
        && b[..3].iter().all(u8::is_ascii_uppercase)
        && b[3..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
}

fn check_device(field: &'static str, d: &AcpiDevice) -> Result<(), AcpiError> {
    if !valid_name(&d.name) {
        return Err(refuse(field, &d.name, "not a 4-character AML name"));
    }
    if !valid_eisa_id(&d.hid) {
        return Err(refuse(
            field,
            &d.hid,
            "_HID must be an EISA ID (3 uppercase letters, 4 hex digits)",
        ));
    }
    Ok(())
}

/// Refuses every choice of `machine.acpi` these tables cannot express.
pub(super) fn check(machine: &MachineDescription) -> Result<(), AcpiError> {
    let a = &machine.acpi;
    if !a.table_align.is_power_of_two()
        || !(MIN_TABLE_ALIGN..=MAX_TABLE_ALIGN).contains(&a.table_align)
    {
        return Err(refuse(
            "table_align",
            a.table_align,
            "a power of two from 16 to 4096",
        ));
    }
    // (field, value, what these tables can write, why).
    let ranges: [(&'static str, u8, RangeInclusive<u8>, &str); 5] = [
        (
            "fadt_revision",
            a.fadt_revision,
            FADT_IMPLEMENTED_REVISION..=FADT_IMPLEMENTED_REVISION,
            "these tables write the FADT revision 6 layout",
        ),
        (
            "fadt_minor_revision",
            a.fadt_minor_revision,
            0..=FADT_MAX_MINOR_REVISION,
            "FADT revision 6 has minor versions 0 to 5",
        ),
        (
            "madt_revision",
            a.madt_revision,
            MADT_REVISIONS,
            "the MADT structures written are those of revisions 1 to 5",
        ),
        (
            "dsdt_revision",
            a.dsdt_revision,
            MIN_DSDT_REVISION..=u8::MAX,
            "revision 2 or more (64-bit AML integers) is needed for the 64-bit PCI window",
        ),
        (
            "preferred_pm_profile",
            a.preferred_pm_profile,
            0..=MAX_PM_PROFILE,
            "profiles 0 to 8 are defined",
        ),
    ];
    for (field, value, ok, reason) in ranges {
        if !ok.contains(&value) {
            return Err(refuse(field, value, reason));
        }
    }
    // (field, flags, the flags that describe this platform truthfully).
    let masks: [(&'static str, u32, u32, &str); 2] = [
        (
            "fadt_flags",
            a.fadt_flags,
            FADT_FLAGS_IMPLEMENTED,
            "only WBINVD, PROC_C1, SLP_BUTTON, FIX_RTC and RESET_REG_SUP describe this platform",
        ),
        (
            "iapc_boot_arch",
            a.iapc_boot_arch.into(),
            IAPC_IMPLEMENTED.into(),
            "only LEGACY_DEVICES, 8042 and VGA_NOT_PRESENT describe this platform",
        ),
    ];
    for (field, flags, implemented, reason) in masks {
        if flags & !implemented != 0 {
            return Err(refuse(field, format!("{flags:#x}"), reason));
        }
    }
    let d = &a.devices;
    let devices = [
        ("devices.com1", &d.com1),
        ("devices.power_button", &d.power_button),
        ("devices.keyboard", &d.keyboard),
        ("devices.rtc", &d.rtc),
        ("devices.pci_root", &d.pci_root),
        ("devices.motherboard", &d.motherboard),
    ];
    for (i, (field, dev)) in devices.iter().enumerate() {
        check_device(field, dev)?;
        if devices[..i].iter().any(|(_, o)| o.name == dev.name) {
            return Err(refuse(
                field,
                &dev.name,
                "two devices in \\_SB with one name",
            ));
        }
    }
    if !valid_eisa_id(&d.pci_root_cid) {
        return Err(refuse(
            "devices.pci_root_cid",
            &d.pci_root_cid,
            "_CID must be an EISA ID (3 uppercase letters, 4 hex digits)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(edit: impl FnOnce(&mut MachineDescription)) -> String {
        let mut m = abide_machines::pc_1_0();
        edit(&mut m);
        match super::super::build(&m, 1) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected a refusal"),
        }
    }

    #[test]
    fn every_released_machine_passes() {
        for t in abide_machines::machine_types() {
            let m = abide_machines::resolve(&t.name).expect("machine");
            check(&m).expect("released choices are expressible");
        }
    }

    #[test]
    fn inexpressible_choices_are_refused() {
        let e = refusal(|m| m.acpi.fadt_revision = 5);
        assert!(e.contains("fadt_revision = 5"), "{e}");
        let e = refusal(|m| m.acpi.table_align = 8);
        assert!(e.contains("table_align = 8"), "{e}");
        let e = refusal(|m| m.acpi.dsdt_revision = 1);
        assert!(e.contains("dsdt_revision = 1"), "{e}");
        let e = refusal(|m| m.acpi.fadt_flags |= 1 << 4);
        assert!(e.contains("fadt_flags = 0x475"), "{e}");
        let e = refusal(|m| m.acpi.iapc_boot_arch |= 1 << 3);
        assert!(e.contains("iapc_boot_arch = 0xb"), "{e}");
        let e = refusal(|m| m.acpi.devices.rtc.hid = "PNP0b00".into());
        assert!(e.contains("devices.rtc = PNP0b00"), "{e}");
        let e = refusal(|m| m.acpi.devices.keyboard.name = "COM1".into());
        assert!(e.contains("devices.keyboard = COM1"), "{e}");
        let e = refusal(|m| m.acpi.devices.com1.name = "com1".into());
        assert!(e.contains("devices.com1 = com1"), "{e}");
        let e = refusal(|m| m.acpi.devices.pci_root_cid = "PNP0A0".into());
        assert!(e.contains("pci_root_cid = PNP0A0"), "{e}");
    }

    #[test]
    fn names_and_ids() {
        assert!(valid_name("KBD_") && valid_name("_SB_") && !valid_name("1ABC"));
        assert!(valid_eisa_id("PNP0A08") && !valid_eisa_id("PNP0a08") && !valid_eisa_id("PN10A08"));
    }
}
