//! PCI bus 0 (runs in ring 3: 0xCF8/0xCFC is port I/O, emulated by the #GP
//! handler where IOPL=3 is not honoured; ECAM is MMIO mapped via SYS_MAP).
//!
//! `scan` finds every function through both configuration mechanisms
//! (0xCF8/0xCFC and the ECAM window from the MCFG), sizes its BARs and
//! expansion ROM, and gives unassigned BARs an address; `report` prints
//! what was found. Config space accesses go through ECAM when there is
//! one (so both mechanisms see reads *and* writes), else through CF8.

use crate::io::{
    inl, inw, mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, outl, outw,
};
use crate::print::{Line, LineBuf};
use crate::user::sys_map;
use crate::Global;

pub const MAX_FUNCS: usize = 64;

pub const CMD: u16 = 0x04;
pub const CMD_IO: u16 = 1;
pub const CMD_MEM: u16 = 2;
pub const CMD_MASTER: u16 = 4;
const STATUS_CAPS: u16 = 1 << 4;

/// Unassigned BARs are placed here (bump allocation around what is taken).
const ALLOC_MEM32: u64 = 0xC000_0000;
const ALLOC_MEM32_END: u64 = 0xFEC0_0000;
const ALLOC_MEM64: u64 = 0x80_0000_0000;
const ALLOC_IO: u64 = 0xC000;
const ALLOC_IO_END: u64 = 0x1_0000;
/// Where a ROM without an address is placed (+ slot * 1 MiB).
const ROM_WINDOW: u64 = 0xC800_0000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    None,
    Mem32,
    Mem64,
    Io,
}

#[derive(Clone, Copy)]
pub struct Bar {
    pub kind: BarKind,
    pub prefetch: bool,
    pub addr: u64,
    pub size: u64,
    /// Address was 0 and the guest assigned one.
    pub assigned: bool,
}

const NO_BAR: Bar = Bar {
    kind: BarKind::None,
    prefetch: false,
    addr: 0,
    size: 0,
    assigned: false,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum EcamCmp {
    None,
    Match,
    Mismatch,
}

#[derive(Clone, Copy)]
pub struct Func {
    /// device << 3 | function
    pub df: u8,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub rev: u8,
    pub header: u8,
    pub subsys_vendor: u16,
    pub subsys: u16,
    pub irq_pin: u8,
    pub caps: [u8; 16],
    pub ncaps: u8,
    pub ecam: EcamCmp,
    pub bars: [Bar; 6],
    pub rom_size: u64,
    /// ROM BAR offset (0x30 type 0, 0x38 type 1), 0 if none.
    pub rom_off: u16,
}

pub struct Pci {
    pub ecam: u64,
    pub funcs: [Func; MAX_FUNCS],
    pub nfuncs: usize,
    pub scanned: bool,
    access_ready: bool,
    next32: u64,
    next64: u64,
    next_io: u64,
}

const EMPTY_FUNC: Func = Func {
    df: 0,
    vendor: 0,
    device: 0,
    class: 0,
    rev: 0,
    header: 0,
    subsys_vendor: 0,
    subsys: 0,
    irq_pin: 0,
    caps: [0; 16],
    ncaps: 0,
    ecam: EcamCmp::None,
    bars: [NO_BAR; 6],
    rom_size: 0,
    rom_off: 0,
};

pub static PCI: Global<Pci> = Global::new(Pci {
    ecam: 0,
    funcs: [EMPTY_FUNC; MAX_FUNCS],
    nfuncs: 0,
    scanned: false,
    access_ready: false,
    // Set by `scan` (all-zero initialiser: .bss, not .data).
    next32: 0,
    next64: 0,
    next_io: 0,
});

// ---------------------------------------------------------------------
// Configuration access.

fn cf8_addr(df: u8, off: u16) -> u32 {
    0x8000_0000 | (df as u32) << 8 | (off as u32 & 0xFC)
}

pub fn cf8_read32(df: u8, off: u16) -> u32 {
    outl(0xCF8, cf8_addr(df, off));
    inl(0xCFC)
}

fn cf8_read16(df: u8, off: u16) -> u16 {
    outl(0xCF8, cf8_addr(df, off));
    inw(0xCFC + (off & 2))
}

fn cf8_write32(df: u8, off: u16, v: u32) {
    outl(0xCF8, cf8_addr(df, off));
    outl(0xCFC, v);
}

fn cf8_write16(df: u8, off: u16, v: u16) {
    outl(0xCF8, cf8_addr(df, off));
    outw(0xCFC + (off & 2), v);
}

fn ecam_addr(ecam: u64, df: u8, off: u16) -> u64 {
    ecam + ((df as u64) << 12) + off as u64
}

pub fn read32(df: u8, off: u16) -> u32 {
    let e = PCI.get().ecam;
    if e != 0 {
        mmio_read32(ecam_addr(e, df, off & !3))
    } else {
        cf8_read32(df, off)
    }
}

pub fn read16(df: u8, off: u16) -> u16 {
    let e = PCI.get().ecam;
    if e != 0 {
        mmio_read16(ecam_addr(e, df, off & !1))
    } else {
        cf8_read16(df, off)
    }
}

pub fn read8(df: u8, off: u16) -> u8 {
    let e = PCI.get().ecam;
    if e != 0 {
        mmio_read8(ecam_addr(e, df, off))
    } else {
        (cf8_read32(df, off) >> ((off & 3) * 8)) as u8
    }
}

pub fn write32(df: u8, off: u16, v: u32) {
    let e = PCI.get().ecam;
    if e != 0 {
        mmio_write32(ecam_addr(e, df, off & !3), v)
    } else {
        cf8_write32(df, off, v)
    }
}

pub fn write16(df: u8, off: u16, v: u16) {
    let e = PCI.get().ecam;
    if e != 0 {
        mmio_write16(ecam_addr(e, df, off & !1), v)
    } else {
        cf8_write16(df, off, v)
    }
}

/// Program BAR `index` (both halves for a 64-bit BAR), keeping the type bits.
pub fn set_bar(df: u8, index: usize, kind: BarKind, addr: u64) {
    let off = 0x10 + 4 * index as u16;
    let low_bits = read32(df, off) & if kind == BarKind::Io { 3 } else { 0xF };
    write32(df, off, addr as u32 | low_bits);
    if kind == BarKind::Mem64 {
        write32(df, off + 4, (addr >> 32) as u32);
    }
}

// ---------------------------------------------------------------------
// Scan.

/// Size BAR `i` (decode must be off). Returns the BAR and how many
/// indices it takes.
#[inline(never)]
fn size_bar(df: u8, i: usize) -> (Bar, usize) {
    let off = 0x10 + 4 * i as u16;
    let orig = read32(df, off);
    write32(df, off, 0xFFFF_FFFF);
    let r = read32(df, off);
    write32(df, off, orig);
    if r == 0 {
        return (NO_BAR, 1);
    }
    if r & 1 != 0 {
        let mut mask = r & !3;
        if r >> 16 == 0 {
            mask |= 0xFFFF_0000;
        }
        let size = (!mask).wrapping_add(1) as u64;
        let bar = Bar {
            kind: BarKind::Io,
            prefetch: false,
            addr: (orig & !3) as u64,
            size,
            assigned: false,
        };
        return (if size == 0 { NO_BAR } else { bar }, 1);
    }
    let prefetch = r & 8 != 0;
    if (r >> 1) & 3 == 2 && i < 5 {
        let orig_hi = read32(df, off + 4);
        write32(df, off + 4, 0xFFFF_FFFF);
        let r_hi = read32(df, off + 4);
        write32(df, off + 4, orig_hi);
        let mask = (r_hi as u64) << 32 | (r & !0xF) as u64;
        let size = (!mask).wrapping_add(1);
        let bar = Bar {
            kind: BarKind::Mem64,
            prefetch,
            addr: (orig_hi as u64) << 32 | (orig & !0xF) as u64,
            size,
            assigned: false,
        };
        return (if mask == 0 { NO_BAR } else { bar }, 2);
    }
    let mask = r & !0xF;
    let bar = Bar {
        kind: BarKind::Mem32,
        prefetch,
        addr: (orig & !0xF) as u64,
        size: (!mask).wrapping_add(1) as u64,
        assigned: false,
    };
    (if mask == 0 { NO_BAR } else { bar }, 1)
}

fn size_rom(df: u8, off: u16) -> u64 {
    let orig = read32(df, off);
    write32(df, off, 0xFFFF_F800);
    let r = read32(df, off);
    write32(df, off, orig);
    let mask = r & 0xFFFF_F800;
    if mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1) as u64
    }
}

#[inline(never)]
fn probe(df: u8, ecam: u64) -> Option<Func> {
    let id_cf8 = cf8_read32(df, 0);
    let id_ecam = if ecam != 0 {
        mmio_read32(ecam_addr(ecam, df, 0))
    } else {
        0xFFFF_FFFF
    };
    if id_cf8 & 0xFFFF == 0xFFFF && id_ecam & 0xFFFF == 0xFFFF {
        return None;
    }
    let mut f = EMPTY_FUNC;
    f.df = df;
    // Compare the first 64 bytes as seen through both mechanisms.
    f.ecam = if ecam == 0 {
        EcamCmp::None
    } else {
        let mut same = true;
        for off in (0..64).step_by(4) {
            if cf8_read32(df, off) != mmio_read32(ecam_addr(ecam, df, off)) {
                same = false;
            }
        }
        if same {
            EcamCmp::Match
        } else {
            EcamCmp::Mismatch
        }
    };
    let id = read32(df, 0);
    f.vendor = id as u16;
    f.device = (id >> 16) as u16;
    let cr = read32(df, 8);
    f.rev = cr as u8;
    f.class = cr >> 8;
    f.header = read8(df, 0x0E);
    let (nbars, rom_off) = match f.header & 0x7F {
        0 => (6, 0x30),
        1 => (2, 0x38),
        _ => (0, 0),
    };
    if f.header & 0x7F == 0 {
        let s = read32(df, 0x2C);
        f.subsys_vendor = s as u16;
        f.subsys = (s >> 16) as u16;
    }
    f.irq_pin = read8(df, 0x3D);
    if read16(df, 0x06) & STATUS_CAPS != 0 {
        let mut ptr = read8(df, 0x34) & 0xFC;
        let mut n = 0;
        while ptr >= 0x40 && n < 48 {
            if (f.ncaps as usize) < f.caps.len() {
                f.caps[f.ncaps as usize] = read8(df, ptr as u16);
                f.ncaps += 1;
            }
            ptr = read8(df, ptr as u16 + 1) & 0xFC;
            n += 1;
        }
    }
    // Size with decode off, then put the command register back.
    let cmd = read16(df, CMD);
    write16(df, CMD, cmd & !(CMD_IO | CMD_MEM));
    let mut i = 0;
    while i < nbars {
        let (bar, used) = size_bar(df, i);
        f.bars[i] = bar;
        i += used;
    }
    if rom_off != 0 {
        f.rom_off = rom_off;
        f.rom_size = size_rom(df, rom_off);
    }
    write16(df, CMD, cmd);
    Some(f)
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Does `[addr, addr+len)` collide with an assigned BAR of the same space,
/// the ECAM window, or (for memory) the APIC/firmware area below 4 GiB?
fn taken(p: &Pci, io: bool, addr: u64, len: u64) -> bool {
    if !io {
        if p.ecam != 0 && overlaps(addr, len, p.ecam, 1 << 20) {
            return true;
        }
        if overlaps(addr, len, ALLOC_MEM32_END, (1 << 32) - ALLOC_MEM32_END) {
            return true;
        }
    }
    for f in &p.funcs[..p.nfuncs] {
        for b in &f.bars {
            let same_space = match b.kind {
                BarKind::None => continue,
                BarKind::Io => io,
                _ => !io,
            };
            if same_space && b.addr != 0 && overlaps(addr, len, b.addr, b.size) {
                return true;
            }
        }
    }
    false
}

/// Naturally aligned block of `size` bytes from a bump pointer, skipping
/// anything taken. 0 if the window is exhausted.
fn alloc(p: &mut Pci, kind: BarKind, size: u64) -> u64 {
    let (io, mut next, end) = match kind {
        BarKind::Io => (true, p.next_io, ALLOC_IO_END),
        BarKind::Mem32 => (false, p.next32, ALLOC_MEM32_END),
        _ => (false, p.next64, ALLOC_MEM64 * 2),
    };
    let size = size.max(if io { 4 } else { 4096 });
    loop {
        next = (next + size - 1) & !(size - 1);
        if next + size > end {
            return 0;
        }
        if !taken(p, io, next, size) {
            break;
        }
        next += size;
    }
    match kind {
        BarKind::Io => p.next_io = next + size,
        BarKind::Mem32 => p.next32 = next + size,
        _ => p.next64 = next + size,
    }
    next
}

/// Set up configuration access (once): map the ECAM window if there is
/// one, so that `read*`/`write*` use it; else they use 0xCF8/0xCFC.
pub fn access(ecam: u64) {
    let p = PCI.get();
    if p.access_ready {
        return;
    }
    p.access_ready = true;
    if ecam != 0 && sys_map(ecam, 1 << 20, true) {
        p.ecam = ecam;
    } else if ecam != 0 {
        Line::new("error")
            .ks("what", "ecam-map")
            .kx("addr", ecam)
            .print();
    }
}

/// Enumerate bus 0 (once). `ecam` is the MCFG base, 0 if none.
#[inline(never)]
pub fn scan(ecam: u64) {
    let p = PCI.get();
    if p.scanned {
        return;
    }
    p.scanned = true;
    p.next32 = ALLOC_MEM32;
    p.next64 = ALLOC_MEM64;
    p.next_io = ALLOC_IO;
    access(ecam);
    for dev in 0u8..32 {
        for func in 0u8..8 {
            let df = dev << 3 | func;
            let f = match probe(df, p.ecam) {
                Some(f) => f,
                None if func == 0 => break,
                None => continue,
            };
            let multi = f.header & 0x80 != 0;
            if p.nfuncs < MAX_FUNCS {
                p.funcs[p.nfuncs] = f;
                p.nfuncs += 1;
            }
            if func == 0 && !multi {
                break;
            }
        }
    }
    // Give unassigned BARs an address (memory BARs with a zero address,
    // I/O BARs with a zero port), with decode off while reprogramming.
    for n in 0..p.nfuncs {
        let df = p.funcs[n].df;
        for i in 0..6 {
            let b = p.funcs[n].bars[i];
            if b.kind == BarKind::None || b.addr != 0 {
                continue;
            }
            let a = alloc(p, b.kind, b.size);
            if a == 0 {
                Line::new("error")
                    .ks("what", "bar-alloc")
                    .kx("df", df as u64)
                    .kd("index", i as u64)
                    .print();
                continue;
            }
            let cmd = read16(df, CMD);
            write16(df, CMD, cmd & !(CMD_IO | CMD_MEM));
            set_bar(df, i, b.kind, a);
            write16(df, CMD, cmd);
            let fb = &mut p.funcs[n].bars[i];
            fb.addr = a;
            fb.assigned = true;
        }
    }
}

// ---------------------------------------------------------------------
// Report.

pub fn bdf<const N: usize>(l: &mut LineBuf<N>, df: u8) {
    bdf_key(l, "bdf", df);
}

/// ` key=00:dd.f`
pub fn bdf_key<const N: usize>(l: &mut LineBuf<N>, key: &str, df: u8) {
    l.key(key)
        .hex_raw(0, 2)
        .byte(b':')
        .hex_raw((df >> 3) as u64, 2)
        .byte(b'.')
        .hex_raw((df & 7) as u64, 1);
}

/// Enable the ROM (at its address, or a temporary one), read the first
/// two bytes, restore. Returns (address used, signature).
#[inline(never)]
fn read_rom(p: &mut Pci, f: &Func) -> (u64, Option<u16>) {
    let df = f.df;
    let orig = read32(df, f.rom_off);
    let mut addr = (orig & 0xFFFF_F800) as u64;
    if addr == 0 {
        let align = f.rom_size.max(1 << 20);
        let cand = (ROM_WINDOW + (df >> 3) as u64 * 0x10_0000 + align - 1) & !(align - 1);
        addr = if taken(p, false, cand, f.rom_size) {
            alloc(p, BarKind::Mem32, f.rom_size)
        } else {
            cand
        };
        if addr == 0 {
            return (0, None);
        }
    }
    if !sys_map(addr, 4096, true) {
        return (addr, None);
    }
    let cmd = read16(df, CMD);
    write16(df, CMD, cmd & !(CMD_IO | CMD_MEM));
    write32(df, f.rom_off, addr as u32 | 1);
    write16(df, CMD, (cmd & !CMD_IO) | CMD_MEM);
    let b0 = mmio_read8(addr);
    let b1 = mmio_read8(addr + 1);
    write16(df, CMD, cmd & !(CMD_IO | CMD_MEM));
    write32(df, f.rom_off, orig);
    write16(df, CMD, cmd);
    let sig = (b0 as u16) << 8 | b1 as u16;
    (
        addr,
        if sig == 0xFFFF || sig == 0 {
            None
        } else {
            Some(sig)
        },
    )
}

#[inline(never)]
pub fn report() {
    let p = PCI.get();
    if p.ecam == 0 {
        Line::new("warn").ks("what", "no-mcfg").print();
    }
    for n in 0..p.nfuncs {
        let f = p.funcs[n];
        let mut l = Line::new("pci");
        bdf(&mut l, f.df);
        l.kxw("vendor", f.vendor as u64, 4)
            .kxw("device", f.device as u64, 4)
            .kxw("class", f.class as u64, 6)
            .kxw("rev", f.rev as u64, 2)
            .kxw("subsys_vendor", f.subsys_vendor as u64, 4)
            .kxw("subsys", f.subsys as u64, 4)
            .kd("irq_pin", f.irq_pin as u64)
            .key("caps");
        if f.ncaps == 0 {
            l.s("none");
        }
        for (i, &c) in f.caps[..f.ncaps as usize].iter().enumerate() {
            if i > 0 {
                l.byte(b',');
            }
            l.hex(c as u64, 2);
        }
        l.ks(
            "ecam",
            match f.ecam {
                EcamCmp::None => "none",
                EcamCmp::Match => "match",
                EcamCmp::Mismatch => "mismatch",
            },
        );
        l.print();
        for (i, b) in f.bars.iter().enumerate() {
            let kind = match b.kind {
                BarKind::None => continue,
                BarKind::Mem32 => "mem32",
                BarKind::Mem64 => "mem64",
                BarKind::Io => "io",
            };
            let mut l = Line::new("pci-bar");
            bdf(&mut l, f.df);
            l.kd("index", i as u64)
                .ks("kind", kind)
                .kd("prefetch", b.prefetch as u64)
                .kx16("addr", b.addr)
                .kx("size", b.size);
            if b.assigned {
                l.ks("assigned", "guest");
            }
            l.print();
        }
        if f.rom_size != 0 {
            let (addr, sig) = read_rom(p, &f);
            let mut l = Line::new("pci-rom");
            bdf(&mut l, f.df);
            l.kx("size", f.rom_size).kx16("addr", addr);
            match sig {
                Some(s) => l.kxw("signature", s as u64, 4),
                None => l.ks("signature", "none"),
            };
            l.print();
        }
    }
    Line::new("pci-done")
        .kd("functions", p.nfuncs as u64)
        .print();
}
