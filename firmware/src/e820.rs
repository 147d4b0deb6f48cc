//! The e820 memory map a guest is given, derived from the machine's memory map.

use abide_machines::MachineDescription;

/// e820 entry types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved; the OS must not use it.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: E820Type,
}

/// Builds the e820 map for `ram_bytes` of guest RAM on `machine`.
///
/// Low RAM stops at `low_ram_end` (the EBDA and VGA/BIOS area above it are
/// reserved up to 1 MiB, and the BIOS area holding ACPI tables is explicitly
/// reserved); RAM resumes at `high_ram_start`, runs to the 32-bit hole, and
/// continues above 4 GiB when the guest is larger than the hole start.
pub fn build(machine: &MachineDescription, ram_bytes: u64) -> Vec<E820Entry> {
    let mem = &machine.memory;
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: mem.low_ram_end,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: mem.bios_area_start,
            size: mem.bios_area_end - mem.bios_area_start,
            kind: E820Type::Reserved,
        },
    ];
    // The ECAM window must be reserved, or an OS may refuse to use MMCONFIG.
    map.push(E820Entry {
        addr: machine.pci.ecam_base,
        size: machine.pci.ecam_size,
        kind: E820Type::Reserved,
    });
    for range in mem.ram_ranges(ram_bytes) {
        // The first range starts at 0; the part below 1 MiB is described above.
        let start = range.start.max(mem.high_ram_start);
        let end = range.start + range.size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Type::Ram,
            });
        }
    }
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use abide_machines::{GIB, MIB};

    #[test]
    fn small_guest() {
        let m = abide_machines::pc_1_0();
        let map = build(&m, 512 * MIB);
        assert_eq!(map.len(), 4);
        assert_eq!(map[0].size, 0x9_fc00);
        assert_eq!(map[1].kind, E820Type::Reserved);
        assert_eq!(map[2].addr, MIB);
        assert_eq!(map[2].size, 511 * MIB);
        assert_eq!(map[3].addr, m.pci.ecam_base);
        assert_eq!(map[3].kind, E820Type::Reserved);
    }

    #[test]
    fn big_guest_has_ram_above_4g() {
        let m = abide_machines::pc_1_0();
        let map = build(&m, 5 * GIB);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // Everything except the 640K..1M gap is RAM.
        assert_eq!(ram, 5 * GIB - (MIB - 0x9_fc00));
        let last = map.last().expect("entries");
        assert_eq!(last.addr, 4 * GIB);
        assert_eq!(last.size, 2 * GIB);
    }
}
