//! `fingerprint`: everything the guest can observe about the machine
//! (CPUID, per-AP topology, e820, ACPI tables, PCI configuration space,
//! virtio device registers), printed as `guest: fp-<topic> ...` lines that
//! are the same on every boot of the same machine type + configuration.
//! Nothing printed depends on time, on memory the guest wrote, or on
//! addresses the guest chose.
//!
//! All of it runs in ring 3 (native under PVM): CPUID traps to the
//! hypervisor from either ring, and the formatting and CRCs are bulk work.
//! The last line is `fp-done lines=<n> crc32=<crc>`, the CRC-32 of every
//! fp line's text (without `guest: `) joined by and ending in '\n'.

use crate::acpi::Acpi;
use crate::bootinfo::BootInfo;
use crate::io::{cpuid, mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32};
use crate::io::{phys_u32, phys_u64, phys_u8};
use crate::pci::{self, BarKind, Func, CMD, CMD_MEM, MAX_FUNCS, PCI};
use crate::print::{Line, LineBuf, LongLine};
use crate::user::{self, sys_cpuid, sys_map, sys_write};
use crate::Global;

/// What the ring-3 side needs (the kernel's tables are readable from
/// ring 3: the identity map is user-accessible).
pub struct FpArgs {
    pub acpi: *const Acpi,
    pub boot_info: *const BootInfo,
}

pub fn run(args: &FpArgs) {
    user::call(fp_main, args as *const FpArgs as u64);
}

// ---------------------------------------------------------------------
// Output: every fp line goes through `Fp::emit`, which keeps the count
// and the running CRC for `fp-done`.

struct Fp {
    lines: u64,
    crc: u32,
    /// CPUID leaves dumped, how many of them read differently from
    /// ring 3, and the first such (leaf, subleaf).
    cpuid_leaves: u64,
    cpuid_differ: u64,
    cpuid_first: (u32, u32),
}

static CRC_TABLE: Global<[u32; 256]> = Global::new([0; 256]);

fn crc_init() {
    let t = CRC_TABLE.get();
    for (i, e) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
        }
        *e = c;
    }
}

/// Continue a CRC-32 (IEEE): start with 0xFFFF_FFFF, finish with `!`.
fn crc_update(mut crc: u32, data: &[u8]) -> u32 {
    let t = CRC_TABLE.get();
    for &b in data {
        crc = t[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32 of physical memory (below 4 GiB, identity-mapped).
fn crc_phys(addr: u64, len: u64) -> u32 {
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    !crc_update(0xFFFF_FFFF, bytes)
}

const PREFIX: usize = "guest: ".len();

impl Fp {
    fn emit<const N: usize>(&mut self, l: &mut LineBuf<N>) {
        let b = l.finish();
        self.crc = crc_update(self.crc, &b[PREFIX..]);
        self.lines += 1;
        sys_write(b);
    }
}

/// ` key=0x<exactly 8 hex digits>`
fn x8(l: &mut Line, k: &str, v: u32) {
    l.kxw(k, v as u64, 8);
}

/// Raw bytes as lowercase hex, two digits each.
fn hex_bytes<const N: usize>(l: &mut LineBuf<N>, b: &[u8]) {
    for &c in b {
        l.hex_raw(c as u64, 2);
    }
}

/// ` key=<text>`: spaces become '_', other non-printables '?'.
fn ks_raw(l: &mut Line, k: &str, b: &[u8]) {
    l.key(k);
    for &c in b {
        l.byte(match c {
            b' ' => b'_',
            0x21..=0x7E => c,
            _ => b'?',
        });
    }
}

extern "C" fn fp_main(argp: u64) -> ! {
    let a = unsafe { &*(argp as *const FpArgs) };
    let (acpi, bi) = unsafe { (&*a.acpi, &*a.boot_info) };
    crc_init();
    let mut fp = Fp {
        lines: 0,
        crc: 0xFFFF_FFFF,
        cpuid_leaves: 0,
        cpuid_differ: 0,
        cpuid_first: (0, 0),
    };
    cpuid_bsp(&mut fp);
    if fp.cpuid_differ > 0 {
        Line::new("warn")
            .ks("what", "cpuid-ring3-differs")
            .kd("leaves", fp.cpuid_leaves)
            .kd("differ", fp.cpuid_differ)
            .kxw("first_leaf", fp.cpuid_first.0 as u64, 8)
            .kxw("first_sub", fp.cpuid_first.1 as u64, 2)
            .print();
    }
    cpuid_aps(&mut fp, acpi);
    e820(&mut fp, bi);
    acpi_tables(&mut fp, acpi.rsdp);
    pci_fp(&mut fp, acpi.ecam);
    Line::new("fp-done")
        .kd("lines", fp.lines)
        .kxw("crc32", !fp.crc as u64, 8)
        .print();
    user::sys_exit(0)
}

// ---------------------------------------------------------------------
// CPUID
//
// Executed by the kernel (SYS_CPUID), not in ring 3: under PVM on a
// nested host a ring-3 CPUID exits straight to the outer hypervisor and
// returns the host CPU's values (APIC ID of whichever host CPU the vCPU
// thread runs on), which the VMM never sees. Ring 3 is still compared,
// and a mismatch reported as `warn what=cpuid-ring3-differs` (not an fp
// line: it is not deterministic there).

/// Subleaf loops stop here whatever the CPU reports.
const MAX_SUB: u32 = 64;
/// At most this many leaves per range (basic, hypervisor, extended).
const MAX_LEAVES: u32 = 0x100;

fn cpuid_line(fp: &mut Fp, leaf: u32, sub: u32) -> crate::io::Cpuid {
    let r = sys_cpuid(leaf, sub);
    let u = cpuid(leaf, sub);
    fp.cpuid_leaves += 1;
    if (u.eax, u.ebx, u.ecx, u.edx) != (r.eax, r.ebx, r.ecx, r.edx) {
        if fp.cpuid_differ == 0 {
            fp.cpuid_first = (leaf, sub);
        }
        fp.cpuid_differ += 1;
    }
    let mut l = Line::new("fp-cpuid");
    x8(&mut l, "leaf", leaf);
    l.kxw("sub", sub as u64, 2);
    x8(&mut l, "eax", r.eax);
    x8(&mut l, "ebx", r.ebx);
    x8(&mut l, "ecx", r.ecx);
    x8(&mut l, "edx", r.edx);
    fp.emit(&mut l);
    r
}

/// One leaf with the subleaves it defines.
fn cpuid_leaf(fp: &mut Fp, leaf: u32) {
    let s0 = cpuid_line(fp, leaf, 0);
    match leaf {
        // Cache parameters: until the cache type (EAX[4:0]) is 0; the
        // terminating subleaf is printed too.
        4 | 0x8000_001D => {
            let mut r = s0;
            let mut sub = 1;
            while r.eax & 0x1F != 0 && sub < MAX_SUB {
                r = cpuid_line(fp, leaf, sub);
                sub += 1;
            }
        }
        // Topology: until the level type (ECX[15:8]) is 0, included.
        0xB | 0x1F => {
            let mut r = s0;
            let mut sub = 1;
            while (r.ecx >> 8) & 0xFF != 0 && sub < MAX_SUB {
                r = cpuid_line(fp, leaf, sub);
                sub += 1;
            }
        }
        // Structured features: subleaves 1..=EAX.
        7 => {
            for sub in 1..=s0.eax.min(MAX_SUB - 1) {
                cpuid_line(fp, leaf, sub);
            }
        }
        // XSAVE: 1, then every component enabled in XCR0 or IA32_XSS
        // that the CPU supports (sub 0 EDX:EAX, sub 1 EDX:ECX).
        0xD => {
            let s1 = cpuid_line(fp, leaf, 1);
            let mask =
                (s0.eax as u64 | (s0.edx as u64) << 32) | (s1.ecx as u64 | (s1.edx as u64) << 32);
            for sub in 2..MAX_SUB {
                if mask & (1 << sub) != 0 {
                    cpuid_line(fp, leaf, sub);
                }
            }
        }
        // RDT allocation: one subleaf per resource bit in sub 0 EBX.
        0x10 => {
            for sub in 1..32 {
                if s0.ebx & (1 << sub) != 0 {
                    cpuid_line(fp, leaf, sub);
                }
            }
        }
        // SGX: attributes (1) and EPC sections (2.. until type 0), only
        // when sub 0 reports SGX1/SGX2.
        0x12 if s0.eax != 0 => {
            cpuid_line(fp, leaf, 1);
            let mut sub = 2;
            while sub < 32 {
                let r = cpuid_line(fp, leaf, sub);
                if r.eax & 0xF == 0 {
                    break;
                }
                sub += 1;
            }
        }
        // PT, SoC vendor, TLB: EAX = last subleaf.
        0x14 | 0x17 | 0x18 => {
            for sub in 1..=s0.eax.min(32) {
                cpuid_line(fp, leaf, sub);
            }
        }
        _ => {}
    }
}

fn cpuid_range(fp: &mut Fp, base: u32, last: u32) {
    let last = last.min(base + MAX_LEAVES - 1);
    let mut leaf = base;
    while leaf <= last {
        cpuid_leaf(fp, leaf);
        leaf += 1;
    }
}

fn cpuid_bsp(fp: &mut Fp) {
    cpuid_range(fp, 0, sys_cpuid(0, 0).eax);
    let h = sys_cpuid(0x4000_0000, 0).eax;
    let h = if h < 0x4000_0000 { 0x4000_0001 } else { h };
    cpuid_range(fp, 0x4000_0000, h);
    let x = sys_cpuid(0x8000_0000, 0).eax;
    if x >= 0x8000_0000 {
        cpuid_range(fp, 0x8000_0000, x);
    } else {
        cpuid_line(fp, 0x8000_0000, 0);
    }
}

/// Per AP (MADT order, numbered like the `cpu` lines): what it recorded
/// at bring-up.
fn cpuid_aps(fp: &mut Fp, acpi: &Acpi) {
    // The BSP's APIC ID as smp.rs saw it (ring 0: see above).
    let bsp = {
        let b = sys_cpuid(0xB, 0);
        if sys_cpuid(0, 0).eax >= 0xB && b.ebx != 0 {
            b.edx
        } else {
            sys_cpuid(1, 0).ebx >> 24
        }
    };
    let aps = acpi.cpus[..acpi.ncpus].iter().filter(|&&id| id != bsp);
    for (index, &id) in (1u64..).zip(aps) {
        let mut l = Line::new("fp-cpuid-ap");
        l.kd("index", index).kd("apic_id", id as u64);
        match crate::smp::ap_cpuid(id) {
            Some((ebx1, edxb)) => {
                x8(&mut l, "leaf1_ebx", ebx1);
                x8(&mut l, "leafb_edx", edxb);
            }
            None => {
                l.ks("leaf1_ebx", "none").ks("leafb_edx", "none");
            }
        }
        fp.emit(&mut l);
    }
}

// ---------------------------------------------------------------------
// e820

fn e820(fp: &mut Fp, bi: &BootInfo) {
    for e in bi.e820() {
        let mut l = Line::new("fp-e820");
        l.kx16("addr", e.addr)
            .kx16("size", e.size)
            .kd("type", e.kind as u64);
        fp.emit(&mut l);
    }
}

// ---------------------------------------------------------------------
// ACPI

const FOUR_GIB: u64 = 1 << 32;
const MAX_TABLE_LEN: u64 = 16 << 20;
const MAX_ROOT_ENTRIES: u64 = 64;

fn acpi_tables(fp: &mut Fp, rsdp: u64) {
    if rsdp == 0 {
        let mut l = Line::new("fp-acpi");
        l.ks("sig", "none");
        fp.emit(&mut l);
        return;
    }
    let rev = phys_u8(rsdp + 15);
    let len = if rev >= 2 {
        (phys_u32(rsdp + 20) as u64).clamp(36, 4096)
    } else {
        20
    };
    let mut l = Line::new("fp-acpi");
    l.ks("sig", "RSDP").kd("rev", rev as u64).kd("len", len);
    ks_raw(&mut l, "oem", &phys_u64(rsdp + 9).to_le_bytes()[..6]);
    l.ks("table", "-")
        .ks("oemrev", "-")
        .ks("creator", "-")
        .ks("crev", "-")
        .kxw("checksum", phys_u8(rsdp + 8) as u64, 2);
    x8(&mut l, "crc32", crc_phys(rsdp, len));
    fp.emit(&mut l);

    let xsdt = if rev >= 2 { phys_u64(rsdp + 24) } else { 0 };
    let (root, entry) = if xsdt != 0 && xsdt < FOUR_GIB {
        (xsdt, 8)
    } else {
        (phys_u32(rsdp + 16) as u64, 4)
    };
    let root_len = match table(fp, root) {
        Some(n) => n,
        None => return,
    };
    let n = ((root_len - 36) / entry).min(MAX_ROOT_ENTRIES);
    let mut dsdt = 0;
    for i in 0..n {
        let p = root + 36 + i * entry;
        let t = if entry == 8 {
            phys_u64(p)
        } else {
            phys_u32(p) as u64
        };
        let len = table(fp, t);
        if let Some(len) = len {
            if &phys_u32(t).to_le_bytes() == b"FACP" && dsdt == 0 {
                dsdt = if len >= 148 { phys_u64(t + 140) } else { 0 };
                if dsdt == 0 && len >= 44 {
                    dsdt = phys_u32(t + 40) as u64;
                }
            }
        }
    }
    if dsdt != 0 {
        table(fp, dsdt);
    }
}

/// One `fp-acpi` line for the table at `addr`; its length if usable.
fn table(fp: &mut Fp, addr: u64) -> Option<u64> {
    let mut l = Line::new("fp-acpi");
    if addr == 0 || addr >= FOUR_GIB - 36 {
        l.ks("sig", "-").ks("bad", "addr");
        fp.emit(&mut l);
        return None;
    }
    let len = phys_u32(addr + 4) as u64;
    ks_raw(&mut l, "sig", &phys_u32(addr).to_le_bytes());
    l.kd("rev", phys_u8(addr + 8) as u64).kd("len", len);
    if !(36..=MAX_TABLE_LEN).contains(&len) || addr + len > FOUR_GIB {
        l.ks("bad", "len");
        fp.emit(&mut l);
        return None;
    }
    ks_raw(&mut l, "oem", &phys_u64(addr + 10).to_le_bytes()[..6]);
    ks_raw(&mut l, "table", &phys_u64(addr + 16).to_le_bytes());
    x8(&mut l, "oemrev", phys_u32(addr + 24));
    ks_raw(&mut l, "creator", &phys_u32(addr + 28).to_le_bytes());
    x8(&mut l, "crev", phys_u32(addr + 32));
    l.kxw("checksum", phys_u8(addr + 9) as u64, 2);
    x8(&mut l, "crc32", crc_phys(addr, len));
    fp.emit(&mut l);
    Some(len)
}

// ---------------------------------------------------------------------
// PCI

/// Configuration space of every function as found, before the guest
/// wrote anything (BAR sizing comes after the snapshot).
struct Snap {
    df: [u8; MAX_FUNCS],
    cfg: [[u8; 256]; MAX_FUNCS],
    n: usize,
}

static SNAP: Global<Snap> = Global::new(Snap {
    df: [0; MAX_FUNCS],
    cfg: [[0; 256]; MAX_FUNCS],
    n: 0,
});

const MAX_CAPS: usize = 48;
/// Longest virtio device configuration dump, and most queues listed.
const MAX_DEVCFG: u32 = 256;
const MAX_QUEUES: u16 = 64;

fn snapshot() {
    let s = SNAP.get();
    s.n = 0;
    for dev in 0u8..32 {
        for func in 0u8..8 {
            let df = dev << 3 | func;
            let id = pci::read32(df, 0);
            if id & 0xFFFF == 0xFFFF {
                if func == 0 {
                    break;
                }
                continue;
            }
            if s.n < MAX_FUNCS {
                let c = &mut s.cfg[s.n];
                for off in (0..256).step_by(4) {
                    let v = pci::read32(df, off as u16);
                    c[off..off + 4].copy_from_slice(&v.to_le_bytes());
                }
                s.df[s.n] = df;
                s.n += 1;
            }
            if func == 0 && pci::read8(df, 0x0E) & 0x80 == 0 {
                break;
            }
        }
    }
}

/// Capabilities in a snapshot: (offset, id), at most MAX_CAPS.
fn caps(c: &[u8; 256], out: &mut [(u8, u8); MAX_CAPS]) -> usize {
    let mut n = 0;
    if u16::from_le_bytes([c[6], c[7]]) & (1 << 4) == 0 {
        return 0;
    }
    let mut ptr = c[0x34] & 0xFC;
    while ptr >= 0x40 && n < MAX_CAPS {
        out[n] = (ptr, c[ptr as usize]);
        n += 1;
        ptr = c[ptr as usize + 1] & 0xFC;
    }
    n
}

fn pci_fp(fp: &mut Fp, ecam: u64) {
    pci::access(ecam);
    snapshot();
    pci::scan(ecam);
    let s = SNAP.get();
    let p = PCI.get();
    let mut cl = [(0u8, 0u8); MAX_CAPS];
    for i in 0..s.n {
        let (df, c) = (s.df[i], &s.cfg[i]);
        let mut l = Line::new("fp-pci");
        pci::bdf(&mut l, df);
        l.key("cfg");
        hex_bytes(&mut l, &c[..64]);
        fp.emit(&mut l);

        let ncaps = caps(c, &mut cl);
        for &(off, id) in &cl[..ncaps] {
            let want = match id {
                0x09 => c[off as usize + 2] as usize,
                0x11 => 12,
                _ => 8,
            };
            let end = (off as usize + want).min(256);
            let mut l = LongLine::new("fp-pci-cap");
            pci::bdf(&mut l, df);
            l.kxw("off", off as u64, 2).kxw("id", id as u64, 2);
            l.key("bytes");
            hex_bytes(&mut l, &c[off as usize..end]);
            fp.emit(&mut l);
        }

        let f = match p.funcs[..p.nfuncs].iter().find(|f| f.df == df) {
            Some(f) => *f,
            None => continue,
        };
        for (index, b) in f.bars.iter().enumerate() {
            let kind = match b.kind {
                BarKind::None => continue,
                BarKind::Mem32 => "mem32",
                BarKind::Mem64 => "mem64",
                BarKind::Io => "io",
            };
            let mut l = Line::new("fp-pci-bar");
            pci::bdf(&mut l, df);
            l.kd("index", index as u64)
                .ks("kind", kind)
                .kd("prefetch", b.prefetch as u64)
                .kx("size", b.size);
            fp.emit(&mut l);
        }
        if f.rom_size != 0 {
            let mut l = Line::new("fp-pci-rom");
            pci::bdf(&mut l, df);
            l.kx("size", f.rom_size);
            fp.emit(&mut l);
        }
        if crate::virtio::is_virtio(&f) {
            virtio(fp, &f, c, &cl[..ncaps]);
        }
    }
}

/// A virtio structure: (BAR address + offset, length).
fn vcap(f: &Func, c: &[u8; 256], caps: &[(u8, u8)], typ: u8) -> Option<(u64, u32)> {
    let rd32 = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
    for &(off, id) in caps {
        let o = off as usize;
        if id != 0x09 || o + 16 > 256 || c[o + 2] < 16 || c[o + 3] != typ {
            continue;
        }
        let bar = c[o + 4] as usize;
        if bar >= 6 {
            continue;
        }
        let b = f.bars[bar];
        if !matches!(b.kind, BarKind::Mem32 | BarKind::Mem64) || b.addr == 0 {
            continue;
        }
        return Some((b.addr + rd32(o + 8) as u64, rd32(o + 12)));
    }
    None
}

// Common configuration registers (virtio 1.1, 4.1.4.3).
const C_DFSELECT: u64 = 0x00;
const C_DF: u64 = 0x04;
const C_NUMQ: u64 = 0x12;
const C_QSELECT: u64 = 0x16;
const C_QSIZE: u64 = 0x18;
const COMMON_LEN: u32 = 0x38;

/// What a driver sees before touching device_status: features, queue
/// maxima, MSI-X table size, device configuration. Registers written
/// (feature select, queue select, command) are put back.
fn virtio(fp: &mut Fp, f: &Func, c: &[u8; 256], caps: &[(u8, u8)]) {
    let (common, clen) = match vcap(f, c, caps, 1) {
        Some(r) => r,
        None => return,
    };
    if clen < COMMON_LEN || !sys_map(common, clen as u64, true) {
        let mut l = Line::new("fp-virtio");
        pci::bdf(&mut l, f.df);
        l.ks("error", "common-cap");
        fp.emit(&mut l);
        return;
    }
    let devcfg = vcap(f, c, caps, 4).filter(|&(a, n)| n == 0 || sys_map(a, n as u64, true));
    let msix = caps
        .iter()
        .find(|&&(_, id)| id == 0x11)
        .map_or(0, |&(off, _)| {
            let o = off as usize;
            (u16::from_le_bytes([c[o + 2], c[o + 3]]) & 0x7FF) as u64 + 1
        });

    let cmd = pci::read16(f.df, CMD);
    if cmd & CMD_MEM == 0 {
        pci::write16(f.df, CMD, cmd | CMD_MEM);
    }
    let sel = mmio_read32(common + C_DFSELECT);
    mmio_write32(common + C_DFSELECT, 0);
    let lo = mmio_read32(common + C_DF) as u64;
    mmio_write32(common + C_DFSELECT, 1);
    let hi = mmio_read32(common + C_DF) as u64;
    mmio_write32(common + C_DFSELECT, sel);
    let numq = mmio_read16(common + C_NUMQ);
    let mut sizes = [0u16; MAX_QUEUES as usize];
    let nq = numq.min(MAX_QUEUES);
    let qsel = mmio_read16(common + C_QSELECT);
    for q in 0..nq {
        mmio_write16(common + C_QSELECT, q);
        sizes[q as usize] = mmio_read16(common + C_QSIZE);
    }
    mmio_write16(common + C_QSELECT, qsel);
    let mut cfg = [0u8; MAX_DEVCFG as usize];
    let cfg_len = devcfg.map(|(a, n)| {
        let n = n.min(MAX_DEVCFG);
        for (i, b) in cfg[..n as usize].iter_mut().enumerate() {
            *b = mmio_read8(a + i as u64);
        }
        n as usize
    });
    if cmd & CMD_MEM == 0 {
        pci::write16(f.df, CMD, cmd);
    }

    let mut l = LongLine::new("fp-virtio");
    pci::bdf(&mut l, f.df);
    l.kd("type", (f.device - 0x1040) as u64)
        .kx16("features", hi << 32 | lo)
        .kd("num_queues", numq as u64)
        .key("queue_sizes");
    if nq == 0 {
        l.s("none");
    }
    for (i, &s) in sizes[..nq as usize].iter().enumerate() {
        if i > 0 {
            l.byte(b',');
        }
        l.dec(s as u64);
    }
    l.kd("msix_vectors", msix).key("cfg");
    match cfg_len {
        Some(n) => hex_bytes(&mut l, &cfg[..n]),
        None => {
            l.s("none");
        }
    }
    fp.emit(&mut l);
}
