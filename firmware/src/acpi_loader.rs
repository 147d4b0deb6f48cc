//! Abide's own ACPI tables for a firmware-booted guest, through QEMU's
//! "linker/loader" interface (`etc/table-loader`), so that the guest sees
//! the same tables as with direct boot.
//!
//! [`crate::acpi::build`] lays the tables out at fixed addresses for direct
//! boot. Here the RSDP becomes the file `etc/acpi/rsdp` (allocated by the
//! firmware in the F segment, where OSes scan for it) and the other tables
//! one file, `etc/acpi/tables` (allocated in high memory), in the same
//! order and alignment. Every pointer between tables (RSDP → XSDT, XSDT →
//! each table, FADT → DSDT) is rewritten as an offset into that file, and
//! the loader adds the file's address once the firmware has placed it, then
//! fixes the checksums. The command format (128-byte entries: ALLOCATE,
//! ADD_POINTER, ADD_CHECKSUM) is QEMU's `hw/acpi/bios-linker-loader.c`
//! interface, which SeaBIOS implements.

use crate::acpi::AcpiTables;

/// File name of the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// File name of the other tables.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// File name of the loader script.
pub const LOADER_FILE: &str = "etc/table-loader";

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;
const ENTRY_LEN: usize = 128;
const FILE_LEN: usize = 56;

// ACPI layout facts (ACPI 6.x, 5.2).
const SDT_HEADER_LEN: usize = 36;
const SDT_CHECKSUM: usize = 9;
const SDT_LENGTH: usize = 4;
const RSDP_CHECKSUM: usize = 8;
const RSDP_V1_LEN: u32 = 20;
const RSDP_RSDT: usize = 16;
const RSDP_XSDT: usize = 24;
const RSDP_EXT_CHECKSUM: usize = 32;
const FADT_DSDT: usize = 40;
const FADT_X_DSDT: usize = 140;

/// The three fw_cfg files.
#[derive(Debug, PartialEq, Eq)]
pub struct LoaderFiles {
    /// `etc/acpi/rsdp`.
    pub rsdp: Vec<u8>,
    /// `etc/acpi/tables`.
    pub tables: Vec<u8>,
    /// `etc/table-loader`.
    pub loader: Vec<u8>,
}

fn name(n: &str) -> [u8; FILE_LEN] {
    let mut out = [0u8; FILE_LEN];
    out[..n.len()].copy_from_slice(n.as_bytes());
    out
}

fn entry(cmd: u32, body: &[u8]) -> Vec<u8> {
    let mut e = cmd.to_le_bytes().to_vec();
    e.extend_from_slice(body);
    e.resize(ENTRY_LEN, 0);
    e
}

fn allocate(file: &str, align: u32, zone: u8) -> Vec<u8> {
    let mut b = name(file).to_vec();
    b.extend_from_slice(&align.to_le_bytes());
    b.push(zone);
    entry(CMD_ALLOCATE, &b)
}

fn pointer(dest: &str, src: &str, offset: usize, size: u8) -> Vec<u8> {
    let mut b = name(dest).to_vec();
    b.extend_from_slice(&name(src));
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.push(size);
    entry(CMD_ADD_POINTER, &b)
}

fn checksum(file: &str, offset: usize, start: usize, len: usize) -> Vec<u8> {
    let mut b = name(file).to_vec();
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(start as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    entry(CMD_ADD_CHECKSUM, &b)
}

fn read(b: &[u8], off: usize, size: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..size].copy_from_slice(&b[off..off + size]);
    u64::from_le_bytes(v)
}

fn write(b: &mut [u8], off: usize, size: usize, v: u64) {
    b[off..off + size].copy_from_slice(&v.to_le_bytes()[..size]);
}

/// Turns direct-boot `tables` into the loader's files. `align` is the
/// tables' alignment (the machine's `acpi.table_align`).
pub fn build(tables: &AcpiTables, align: u64) -> LoaderFiles {
    let others: Vec<&(u64, Vec<u8>)> = tables
        .blobs
        .iter()
        .filter(|(a, _)| *a != tables.rsdp_addr)
        .collect();
    let base = others.iter().map(|(a, _)| *a).min().unwrap_or(0);
    let end = others
        .iter()
        .map(|(a, b)| a + b.len() as u64)
        .max()
        .unwrap_or(base);
    let mut file = vec![0u8; (end - base) as usize];
    // Where each table starts in the file, by its direct-boot address.
    let mut starts = Vec::new();
    for (addr, blob) in &others {
        let off = (addr - base) as usize;
        file[off..off + blob.len()].copy_from_slice(blob);
        starts.push((*addr, off, blob.len()));
    }
    let inside = |a: u64| a >= base && a < end;
    let mut cmds = Vec::new();
    cmds.extend(allocate(RSDP_FILE, 16, ZONE_FSEG));
    cmds.extend(allocate(TABLES_FILE, align.max(1) as u32, ZONE_HIGH));
    let mut pointers = Vec::new();
    for &(_, off, len) in &starts {
        let sig = &file[off..off + 4];
        let mut fields = Vec::new();
        if sig == b"XSDT" {
            fields.extend((SDT_HEADER_LEN..len).step_by(8).map(|o| (o, 8)));
        } else if sig == b"FACP" {
            fields.push((FADT_DSDT, 4));
            fields.push((FADT_X_DSDT, 8));
        }
        for (o, size) in fields {
            let v = read(&file, off + o, size);
            if v != 0 && inside(v) {
                write(&mut file, off + o, size, v - base);
                pointers.push(pointer(TABLES_FILE, TABLES_FILE, off + o, size as u8));
            }
        }
    }
    let mut rsdp = tables
        .blobs
        .iter()
        .find(|(a, _)| *a == tables.rsdp_addr)
        .map(|(_, b)| b.clone())
        .unwrap_or_default();
    for (o, size) in [(RSDP_RSDT, 4), (RSDP_XSDT, 8)] {
        if rsdp.len() >= o + size {
            let v = read(&rsdp, o, size);
            if v != 0 && inside(v) {
                write(&mut rsdp, o, size, v - base);
                pointers.push(pointer(RSDP_FILE, TABLES_FILE, o, size as u8));
            }
        }
    }
    for p in pointers {
        cmds.extend(p);
    }
    for &(_, off, _) in &starts {
        let len = read(&file, off + SDT_LENGTH, 4) as usize;
        cmds.extend(checksum(TABLES_FILE, off + SDT_CHECKSUM, off, len));
    }
    if rsdp.len() > RSDP_EXT_CHECKSUM {
        cmds.extend(checksum(RSDP_FILE, RSDP_CHECKSUM, 0, RSDP_V1_LEN as usize));
        cmds.extend(checksum(RSDP_FILE, RSDP_EXT_CHECKSUM, 0, rsdp.len()));
    }
    LoaderFiles {
        rsdp,
        tables: file,
        loader: cmds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the loader as firmware would (placing the files at `rsdp_at`
    /// and `tables_at`) and checks that the result equals the direct-boot
    /// tables relocated: same bytes except pointers, all checksums valid.
    #[test]
    fn loader_reproduces_the_tables() {
        let m = abide_machines::pc_1_0();
        let t = crate::acpi::build(&m, 2).expect("tables");
        let f = build(&t, m.acpi.table_align);
        assert_eq!(f.loader.len() % ENTRY_LEN, 0);
        let (rsdp_at, tables_at) = (0xf_5000u64, 0x1fff_0000u64);
        let mut rsdp = f.rsdp.clone();
        let mut tables = f.tables.clone();
        let mut pointers = 0;
        for e in f.loader.chunks(ENTRY_LEN) {
            let cmd = u32::from_le_bytes(e[..4].try_into().expect("4"));
            let file = |at: usize| {
                let n = &e[at..at + FILE_LEN];
                String::from_utf8_lossy(&n[..n.iter().position(|b| *b == 0).unwrap_or(FILE_LEN)])
                    .into_owned()
            };
            match cmd {
                CMD_ALLOCATE => {}
                CMD_ADD_POINTER => {
                    pointers += 1;
                    let (dest, src) = (file(4), file(60));
                    assert_eq!(src, TABLES_FILE);
                    let off = u32::from_le_bytes(e[116..120].try_into().expect("4")) as usize;
                    let size = e[120] as usize;
                    let buf = if dest == RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let v = read(buf, off, size);
                    write(buf, off, size, v + tables_at);
                }
                CMD_ADD_CHECKSUM => {
                    let buf = if file(4) == RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let n = |at: usize| {
                        u32::from_le_bytes(e[at..at + 4].try_into().expect("4")) as usize
                    };
                    let (off, start, len) = (n(60), n(64), n(68));
                    let sum = buf[start..start + len]
                        .iter()
                        .fold(0u8, |a, b| a.wrapping_add(*b));
                    buf[off] = buf[off].wrapping_sub(sum);
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        // XSDT's 3 entries, FADT's two DSDT pointers, RSDP's XSDT pointer.
        assert_eq!(pointers, 6);
        let _ = rsdp_at;
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_off = (read(&rsdp, RSDP_XSDT, 8) - tables_at) as usize;
        assert_eq!(&tables[xsdt_off..xsdt_off + 4], b"XSDT");
        // Every table the XSDT lists is where it points, checksummed, and
        // byte-identical to the direct-boot one outside its pointers.
        let base = t
            .blobs
            .iter()
            .filter(|(a, _)| *a != t.rsdp_addr)
            .map(|(a, _)| *a)
            .min()
            .expect("base");
        let xlen = read(&tables, xsdt_off + 4, 4) as usize;
        for o in (SDT_HEADER_LEN..xlen).step_by(8) {
            let off = (read(&tables, xsdt_off + o, 8) - tables_at) as usize;
            let len = read(&tables, off + 4, 4) as usize;
            assert_eq!(sum(&tables[off..off + len]), 0);
            let orig = &t
                .blobs
                .iter()
                .find(|(a, _)| *a == base + off as u64)
                .expect("table")
                .1;
            if &tables[off..off + 4] != b"FACP" {
                assert_eq!(&tables[off..off + len], &orig[..]);
            } else {
                let dsdt = read(&tables, off + FADT_X_DSDT, 8) - tables_at;
                assert_eq!(&tables[dsdt as usize..dsdt as usize + 4], b"DSDT");
                assert_eq!(read(&tables, off + FADT_DSDT, 4), dsdt + tables_at);
            }
        }
    }
}
