//! ACPI: RSDP -> XSDT/RSDT -> tables; FADT (PM1a_CNT, PM_TMR, reset
//! register, DSDT), DSDT (`\_S5_` SLP_TYPa), MADT (APIC IDs, IOAPIC).

use crate::boot::MAX_CPUS;
use crate::io::{phys_u16, phys_u32, phys_u64, phys_u8};
use crate::print::{error, Line};

const FOUR_GIB: u64 = 1 << 32;
const MAX_TABLE_LEN: u64 = 16 << 20;

/// Generic Address Structure (only the parts used here).
#[derive(Clone, Copy)]
pub struct Gas {
    /// 0 = system memory, 1 = system I/O.
    pub space: u8,
    pub addr: u64,
}

pub struct Acpi {
    pub rsdp: u64,
    pub revision: u8,
    pub xsdt: bool,
    pub tables: u32,
    pub bad: u32,
    pub pm1a_cnt: u16,
    /// PM1a event block (PM1_STS, then PM1_EN), 0 if none.
    pub pm1a_evt: u16,
    pub pm_tmr: u16,
    pub reset: Option<(Gas, u8)>,
    /// HW-reduced SLEEP_CONTROL_REG (I/O port), 0 if none.
    pub sleep_ctl: u16,
    pub s5: Option<u8>,
    pub have_madt: bool,
    pub lapic: u64,
    pub ioapic: u64,
    /// Enabled local APIC IDs, in MADT order.
    pub cpus: [u32; MAX_CPUS],
    pub ncpus: usize,
    /// Enabled CPUs listed by the MADT (may exceed MAX_CPUS).
    pub madt_cpus: u32,
    /// ECAM window of segment 0 (address of bus `ecam_bus0`), 0 if no MCFG.
    pub ecam: u64,
    pub ecam_bus0: u8,
    pub ecam_bus_end: u8,
}

impl Acpi {
    pub const fn empty() -> Acpi {
        Acpi {
            rsdp: 0,
            revision: 0,
            xsdt: false,
            tables: 0,
            bad: 0,
            pm1a_cnt: 0,
            pm1a_evt: 0,
            pm_tmr: 0,
            reset: None,
            sleep_ctl: 0,
            s5: None,
            have_madt: false,
            lapic: 0xFEE0_0000,
            ioapic: 0,
            cpus: [0; MAX_CPUS],
            ncpus: 0,
            madt_cpus: 0,
            ecam: 0,
            ecam_bus0: 0,
            ecam_bus_end: 0,
        }
    }
}

/// Sum of `len` bytes at `addr`, mod 256. Reads 8 bytes at a time and adds
/// byte lanes in parallel (SWAR): ~4x fewer ring-0 instructions than a
/// byte loop.
pub fn checksum(addr: u64, len: u64) -> u8 {
    const M: u64 = 0x00FF_00FF_00FF_00FF;
    let words = len / 8;
    let mut total: u64 = 0;
    let mut i = 0;
    while i < words {
        // 128 words * 510 per 16-bit lane < 65536: no carry between lanes.
        let end = if words - i > 128 { i + 128 } else { words };
        let mut acc = 0u64;
        while i < end {
            let w = phys_u64(addr + i * 8);
            acc += (w & M) + ((w >> 8) & M);
            i += 1;
        }
        total += (acc & 0xFFFF) + ((acc >> 16) & 0xFFFF) + ((acc >> 32) & 0xFFFF) + (acc >> 48);
    }
    let mut j = words * 8;
    while j < len {
        total += phys_u8(addr + j) as u64;
        j += 1;
    }
    total as u8
}

fn sig_at(addr: u64) -> [u8; 4] {
    phys_u32(addr).to_le_bytes()
}

fn rsdp_valid(addr: u64) -> bool {
    if &phys_u64(addr).to_le_bytes() != b"RSD PTR " || checksum(addr, 20) != 0 {
        return false;
    }
    let rev = phys_u8(addr + 15);
    rev < 2 || checksum(addr, phys_u32(addr + 20).clamp(36, 4096) as u64) == 0
}

/// RSDP from the boot info, else scan the BIOS area 0xE0000..0xFFFFF.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && hint < FOUR_GIB && rsdp_valid(hint) {
        return Some(hint);
    }
    let sig = u64::from_le_bytes(*b"RSD PTR ");
    let mut a = 0xE0000u64;
    while a < 0x100000 {
        if phys_u64(a) == sig && rsdp_valid(a) {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// Validate a table header; print its line. Returns the length if usable.
fn visit(addr: u64, quiet: bool, st: &mut Acpi) -> Option<u64> {
    if addr == 0 || addr >= FOUR_GIB - 36 {
        Line::new("error")
            .ks("what", "acpi-table-addr")
            .kx16("addr", addr)
            .print();
        st.bad += 1;
        return None;
    }
    let sig = sig_at(addr);
    let len = phys_u32(addr + 4) as u64;
    if !(36..=MAX_TABLE_LEN).contains(&len) || addr + len > FOUR_GIB {
        Line::new("error")
            .ks("what", "acpi-table-len")
            .key("table")
            .sanitized(&sig)
            .kd("len", len)
            .print();
        st.bad += 1;
        return None;
    }
    let ok = checksum(addr, len) == 0;
    st.tables += 1;
    if !ok {
        st.bad += 1;
    }
    if !quiet {
        Line::new("acpi")
            .key("table")
            .sanitized(&sig)
            .kx16("addr", addr)
            .kd("len", len)
            .ks("checksum", if ok { "ok" } else { "bad" })
            .print();
    }
    Some(len)
}

pub fn parse(hint: u64, quiet: bool, st: &mut Acpi) {
    let rsdp = match find_rsdp(hint) {
        Some(r) => r,
        None => {
            error("no-rsdp");
            return;
        }
    };
    st.rsdp = rsdp;
    st.revision = phys_u8(rsdp + 15);
    let xsdt = if st.revision >= 2 {
        phys_u64(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 && xsdt < FOUR_GIB {
        st.xsdt = true;
        (xsdt, 8u64)
    } else {
        (phys_u32(rsdp + 16) as u64, 4u64)
    };
    let root_len = if root != 0 && root < FOUR_GIB - 36 {
        phys_u32(root + 4) as u64
    } else {
        0
    };
    let root_len_ok = (36..=MAX_TABLE_LEN).contains(&root_len);
    if !root_len_ok || checksum(root, root_len) != 0 {
        Line::new("error")
            .ks("what", "acpi-root")
            .kx16("addr", root)
            .kd("len", root_len)
            .print();
        if !root_len_ok {
            return;
        }
    }
    let n = (root_len - 36) / entry_size;
    for i in 0..n {
        let p = root + 36 + i * entry_size;
        let t = if entry_size == 8 {
            phys_u64(p)
        } else {
            phys_u32(p) as u64
        };
        let len = match visit(t, quiet, st) {
            Some(l) => l,
            None => continue,
        };
        match &sig_at(t) {
            b"FACP" => fadt(t, len, quiet, st),
            b"APIC" => madt(t, len, st),
            b"MCFG" => mcfg(t, len, st),
            _ => {}
        }
    }
    if !st.have_madt {
        error("no-madt");
    }
    let mut l = Line::new("acpi");
    l.kx16("rsdp", rsdp)
        .kd("revision", st.revision as u64)
        .ks("root", if st.xsdt { "XSDT" } else { "RSDT" })
        .kd("tables", st.tables as u64)
        .kd("bad", st.bad as u64)
        .kx("pm1a_cnt", st.pm1a_cnt as u64)
        .kx("pm_tmr", st.pm_tmr as u64);
    match st.s5 {
        Some(v) => l.kd("s5_slp_typ", v as u64),
        None => l.ks("s5_slp_typ", "none"),
    };
    match st.reset {
        Some((g, v)) => l
            .kx("reset_reg", g.addr)
            .ks("reset_space", if g.space == 1 { "io" } else { "mem" })
            .kx("reset_val", v as u64),
        None => l.ks("reset_reg", "none"),
    };
    l.kx("lapic", st.lapic)
        .kx("ioapic", st.ioapic)
        .kd("madt_cpus", st.madt_cpus as u64)
        .print();
}

fn io_port(v: u64) -> u16 {
    if v < 0x10000 {
        v as u16
    } else {
        0
    }
}

fn fadt(t: u64, len: u64, quiet: bool, st: &mut Acpi) {
    if len < 116 {
        error("fadt-short");
        return;
    }
    st.pm1a_cnt = io_port(phys_u32(t + 64) as u64);
    if st.pm1a_cnt == 0 && len >= 184 && phys_u8(t + 172) == 1 {
        st.pm1a_cnt = io_port(phys_u64(t + 176));
    }
    st.pm1a_evt = io_port(phys_u32(t + 56) as u64);
    if st.pm1a_evt == 0 && len >= 160 && phys_u8(t + 148) == 1 {
        st.pm1a_evt = io_port(phys_u64(t + 152));
    }
    st.pm_tmr = io_port(phys_u32(t + 76) as u64);
    if st.pm_tmr == 0 && len >= 220 && phys_u8(t + 208) == 1 {
        st.pm_tmr = io_port(phys_u64(t + 212));
    }
    let flags = phys_u32(t + 112);
    if len >= 129 && flags & (1 << 10) != 0 {
        let g = Gas {
            space: phys_u8(t + 116),
            addr: phys_u64(t + 120),
        };
        if (g.space == 0 || g.space == 1) && g.addr != 0 {
            st.reset = Some((g, phys_u8(t + 128)));
        }
    }
    if len >= 256 && phys_u8(t + 244) == 1 {
        st.sleep_ctl = io_port(phys_u64(t + 248));
    }
    let mut dsdt = phys_u32(t + 40) as u64;
    if len >= 148 {
        let x = phys_u64(t + 140);
        if x != 0 {
            dsdt = x;
        }
    }
    if dsdt == 0 {
        error("no-dsdt");
        return;
    }
    if let Some(dlen) = visit(dsdt, quiet, st) {
        st.s5 = find_s5(dsdt, dlen);
        if st.s5.is_none() {
            error("no-s5");
        }
    }
}

/// Classic AML scan: `NameOp [\] "_S5_" PackageOp PkgLength NumElements
/// <integer>`; returns SLP_TYPa.
fn find_s5(dsdt: u64, len: u64) -> Option<u8> {
    let pat = u32::from_le_bytes(*b"_S5_");
    let end = dsdt + len;
    let mut p = dsdt + 36;
    while p + 4 <= end {
        if phys_u32(p) == pat {
            let named =
                phys_u8(p - 1) == 0x08 || (phys_u8(p - 1) == b'\\' && phys_u8(p - 2) == 0x08);
            if named && p + 5 < end && phys_u8(p + 4) == 0x12 {
                // PkgLength: bits 7:6 of the lead byte = extra bytes.
                let lead = phys_u8(p + 5);
                let q = p + 6 + (lead >> 6) as u64 + 1; // skip NumElements
                if q + 1 > end {
                    return None;
                }
                let v = match phys_u8(q) {
                    0x00 => 0,
                    0x01 => 1,
                    0x0A => phys_u8(q + 1) as u32,
                    0x0B => phys_u16(q + 1) as u32,
                    0x0C => phys_u32(q + 1),
                    0xFF => 0xFF,
                    b => b as u32,
                };
                return Some((v & 7) as u8);
            }
        }
        p += 1;
    }
    None
}

fn madt(t: u64, len: u64, st: &mut Acpi) {
    if len < 44 {
        error("madt-short");
        return;
    }
    st.have_madt = true;
    st.lapic = phys_u32(t + 36) as u64;
    let end = t + len;
    let mut p = t + 44;
    while p + 2 <= end {
        let kind = phys_u8(p);
        let elen = phys_u8(p + 1) as u64;
        if elen < 2 || p + elen > end {
            error("madt-entry");
            break;
        }
        match kind {
            // Processor Local APIC: enabled flag in bit 0.
            0 if elen >= 8 && phys_u32(p + 4) & 1 != 0 => add_cpu(st, phys_u8(p + 3) as u32),
            // I/O APIC: the first one is reported.
            1 if elen >= 12 && st.ioapic == 0 => st.ioapic = phys_u32(p + 4) as u64,
            // Local APIC address override.
            5 if elen >= 12 => st.lapic = phys_u64(p + 4),
            // Processor Local x2APIC.
            9 if elen >= 16 && phys_u32(p + 8) & 1 != 0 => add_cpu(st, phys_u32(p + 4)),
            _ => {}
        }
        p += elen;
    }
}

/// MCFG: 44-byte header, then 16-byte allocations (base, segment, start
/// bus, end bus). The first segment-0 entry that covers bus 0 is used.
fn mcfg(t: u64, len: u64, st: &mut Acpi) {
    let mut p = t + 44;
    while p + 16 <= t + len {
        let base = phys_u64(p);
        let seg = phys_u16(p + 8);
        let (b0, b1) = (phys_u8(p + 10), phys_u8(p + 11));
        if st.ecam == 0 && seg == 0 && b0 == 0 && b1 >= b0 && base != 0 {
            st.ecam = base;
            st.ecam_bus0 = b0;
            st.ecam_bus_end = b1;
        }
        p += 16;
    }
}

fn add_cpu(st: &mut Acpi, id: u32) {
    st.madt_cpus += 1;
    if st.ncpus < MAX_CPUS {
        st.cpus[st.ncpus] = id;
        st.ncpus += 1;
    } else {
        Line::new("error")
            .ks("what", "too-many-cpus")
            .kd("apic_id", id as u64)
            .print();
    }
}
