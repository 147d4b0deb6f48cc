//! Device work selected on the command line (`pci`, `virtio-blk`,
//! `blk-write=`, `blk-loop=`, `blk-read=`, `blk-id`, `rng`, `hostile`).
//! All of it runs in ring 3; ring 0 is only asked to map MMIO (`SYS_MAP`).

use crate::pci::{self, BarKind, Func, CMD, CMD_IO, CMD_MEM, PCI};
use crate::print::{error, Line};
use crate::user::{self, sys_map};
use crate::virtio::{self, addr_of, is_virtio, Layout, Vdev, DMA, D_NEXT, D_WRITE, S_NEEDS_RESET};

pub struct DriverArgs {
    pub pci: bool,
    pub blk: bool,
    pub blk_write: Option<u64>,
    pub blk_read: Option<u64>,
    /// `blk-loop=N`: N write + read-back + verify iterations.
    pub blk_loop: Option<u64>,
    pub blk_id: bool,
    pub rng: bool,
    pub hostile: bool,
    /// ECAM base from the MCFG (0: none).
    pub ecam: u64,
    /// End of the highest RAM range in the e820 map.
    pub ram_end: u64,
    /// RAM the guest no longer uses (the workload buffer), 0 if none.
    pub scratch: u64,
    pub scratch_len: u64,
}

impl DriverArgs {
    pub fn any(&self) -> bool {
        self.pci || self.blk || self.rng || self.hostile
    }
}

/// Run the selected device work in ring 3.
pub fn run(args: &DriverArgs) {
    user::call(driver_main, args as *const DriverArgs as u64);
}

const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
/// Normal requests: 5 s. Hostile ones: 1 s (or NEEDS_RESET, whichever first).
const IO_TIMEOUT_US: u64 = 5_000_000;
const HOSTILE_TIMEOUT_US: u64 = 1_000_000;
/// Status byte before the device writes it.
const NO_STATUS: u8 = 0xFF;

extern "C" fn driver_main(argp: u64) -> ! {
    let a = unsafe { &*(argp as *const DriverArgs) };
    pci::scan(a.ecam);
    if a.pci {
        pci::report();
    }
    let mut blk = None;
    if a.blk || a.hostile {
        match first(virtio::DEV_BLK, 255) {
            Some(f) => blk = blk_main(a, &f).map(|d| (f, d)),
            None => error("no-virtio-blk"),
        }
    }
    if a.rng {
        match first(virtio::DEV_RNG, 255) {
            Some(f) => rng_main(&f),
            None => error("no-virtio-rng"),
        }
    }
    // Last: it leaves devices reset and re-initialised.
    if a.hostile {
        if let Some((f, mut d)) = blk {
            hostile(a, &f, &mut d);
        }
    }
    user::sys_exit(0)
}

/// First function with this virtio device ID (and not `skip_df`).
fn first(device: u16, skip_df: u16) -> Option<Func> {
    let p = PCI.get();
    p.funcs[..p.nfuncs]
        .iter()
        .find(|f| is_virtio(f) && f.device == device && f.df as u16 != skip_df)
        .copied()
}

fn err_dev(what: &str, df: u8) {
    let mut l = Line::new("error");
    l.ks("what", what);
    pci::bdf(&mut l, df);
    l.print();
}

fn qpage(i: usize) -> u64 {
    addr_of(&DMA.get().queues[i])
}

// ---------------------------------------------------------------------
// virtio-blk

fn hdr_addr() -> u64 {
    addr_of(&DMA.get().req)
}

fn status_addr() -> u64 {
    hdr_addr() + 16
}

fn status_byte() -> u8 {
    unsafe { core::ptr::read_volatile(status_addr() as *const u8) }
}

/// Fill in the request header and clear the status byte.
fn prepare(typ: u32, sector: u64) {
    let h = hdr_addr();
    unsafe {
        core::ptr::write_volatile(h as *mut u32, typ);
        core::ptr::write_volatile((h + 4) as *mut u32, 0);
        core::ptr::write_volatile((h + 8) as *mut u64, sector);
        core::ptr::write_volatile(status_addr() as *mut u8, NO_STATUS);
    }
}

/// One request: header, optional data buffer, status. Returns the status
/// byte, or None on timeout.
#[inline(never)]
fn blk_req(d: &mut Vdev, typ: u32, sector: u64, buf: u64, len: u32) -> Option<u8> {
    prepare(typ, sector);
    d.desc(0, hdr_addr(), 16, D_NEXT, 1);
    if len > 0 {
        let dir = if typ == T_OUT { 0 } else { D_WRITE };
        d.desc(1, buf, len, D_NEXT | dir, 2);
        d.desc(2, status_addr(), 1, D_WRITE, 0);
    } else {
        d.desc(1, status_addr(), 1, D_WRITE, 0);
    }
    d.submit(0);
    d.wait_used(IO_TIMEOUT_US, false)?;
    Some(status_byte())
}

fn blk_timeout(d: &Vdev) {
    let mut l = Line::new("error");
    l.ks("what", "blk-timeout");
    pci::bdf(&mut l, d.df);
    l.kx("status", d.status() as u64).print();
}

/// Sectors `blk-loop` cycles over: 64 blocks of 4 KiB from sector 0.
const LOOP_BLOCKS: u64 = 64;

/// Fill `buf` with the `blk-loop` pattern of iteration `i` (xorshift64
/// seeded by i; the seed is never 0).
fn loop_pattern(i: u64, buf: &mut [u8]) {
    let mut x = (i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// `blk-loop=N`: iteration i writes 4 KiB at sector (i % 64) * 8, reads it
/// back and compares every byte: `blk-loop iter=<i> ok=<1|0>` per
/// iteration, then `blk-loop done iters=<n> errors=<count>`. Returns false
/// if a request timed out (the device is then given up, as elsewhere).
#[inline(never)]
fn blk_loop(d: &mut Vdev, n: u64) -> bool {
    let dma = DMA.get();
    let wbuf = addr_of(&dma.wbuf);
    let rbuf = addr_of(&dma.rbuf);
    let mut errors = 0u64;
    let mut iters = 0u64;
    let mut alive = true;
    for i in 0..n {
        let sector = (i % LOOP_BLOCKS) * 8;
        loop_pattern(i, &mut dma.wbuf.0);
        dma.rbuf.0.fill(0);
        iters += 1;
        let ok = match blk_req(d, T_OUT, sector, wbuf, 4096) {
            Some(0) => match blk_req(d, T_IN, sector, rbuf, 4096) {
                Some(r) => r == 0 && dma.rbuf.0 == dma.wbuf.0,
                None => {
                    alive = false;
                    false
                }
            },
            Some(_) => false,
            None => {
                alive = false;
                false
            }
        };
        if !ok {
            errors += 1;
        }
        Line::new("blk-loop")
            .kd("iter", i)
            .kd("ok", ok as u64)
            .print();
        if !alive {
            blk_timeout(d);
            break;
        }
    }
    Line::new("blk-loop")
        .s(" done")
        .kd("iters", iters)
        .kd("errors", errors)
        .print();
    alive
}

/// The test pattern: byte i of absolute sector s.
fn pattern(s: u64, i: u64) -> u8 {
    (s.wrapping_mul(131) + i * 7 + 0x5A) as u8
}

#[inline(never)]
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn blk_want() -> u64 {
    BLK_F_FLUSH
}

/// Bring up the first virtio-blk and do the requested I/O; returns the
/// device if it is still usable.
#[inline(never)]
fn blk_main(a: &DriverArgs, f: &Func) -> Option<Vdev> {
    let mut d = match Vdev::find(f, qpage(0)) {
        Ok(d) => d,
        Err(e) => {
            err_dev(e, f.df);
            return None;
        }
    };
    if let Err(e) = d.init(blk_want(), None) {
        err_dev(e, f.df);
        return None;
    }
    let feat = d.dev_features;
    let mut l = Line::new("blk");
    pci::bdf(&mut l, d.df);
    l.kd("capacity_sectors", d.cfg64(0));
    if feat & BLK_F_BLK_SIZE != 0 {
        l.kd("blk_size", d.cfg32(20) as u64);
    } else {
        l.ks("blk_size", "none");
    }
    l.kd("ro", (feat & BLK_F_RO != 0) as u64)
        .kx("features", feat)
        .kx("negotiated", d.features)
        .print();

    let dma = DMA.get();
    let wbuf = addr_of(&dma.wbuf);
    let rbuf = addr_of(&dma.rbuf);
    if let Some(s0) = a.blk_write {
        for s in 0..8u64 {
            for i in 0..SECTOR {
                dma.wbuf.0[(s * SECTOR + i) as usize] = pattern(s0 + s, i);
            }
        }
        dma.rbuf.0.fill(0);
        let w = match blk_req(&mut d, T_OUT, s0, wbuf, 4096) {
            Some(st) => st,
            None => {
                blk_timeout(&d);
                return None;
            }
        };
        let mut l = Line::new("blk-io");
        l.kd("write_sector", s0).kd("sectors", 8);
        if w == 0 {
            let r = match blk_req(&mut d, T_IN, s0, rbuf, 4096) {
                Some(st) => st,
                None => {
                    blk_timeout(&d);
                    return None;
                }
            };
            let same = r == 0 && dma.rbuf.0 == dma.wbuf.0;
            l.ks("verify", if same { "ok" } else { "bad" });
            l.kd("status", w as u64).kd("read_status", r as u64);
            if d.features & BLK_F_FLUSH != 0 {
                match blk_req(&mut d, T_FLUSH, 0, 0, 0) {
                    Some(st) => l.kd("flush_status", st as u64),
                    None => {
                        blk_timeout(&d);
                        return None;
                    }
                };
            } else {
                l.ks("flush_status", "none");
            }
        } else {
            l.ks("verify", "skip").kd("status", w as u64);
        }
        l.print();
    }
    if let Some(n) = a.blk_loop {
        if !blk_loop(&mut d, n) {
            return None;
        }
    }
    if let Some(s0) = a.blk_read {
        let r = match blk_req(&mut d, T_IN, s0, rbuf, 4096) {
            Some(st) => st,
            None => {
                blk_timeout(&d);
                return None;
            }
        };
        Line::new("blk-read")
            .kd("sector", s0)
            .kxw("crc", crc32(&dma.rbuf.0) as u64, 8)
            .kd("status", r as u64)
            .print();
    }
    if a.blk_id {
        dma.rbuf.0[..21].fill(0);
        let r = match blk_req(&mut d, T_GET_ID, 0, rbuf, 20) {
            Some(st) => st,
            None => {
                blk_timeout(&d);
                return None;
            }
        };
        let id = &dma.rbuf.0[..20];
        let n = id.iter().position(|&c| c == 0).unwrap_or(20);
        let mut l = Line::new("blk-id");
        l.key("id").sanitized(&id[..n]);
        if r != 0 {
            l.kd("status", r as u64);
        }
        l.print();
    }
    Some(d)
}

// ---------------------------------------------------------------------
// virtio-rng

#[inline(never)]
fn rng_read(d: &mut Vdev, buf: u64, len: u32) -> Option<u32> {
    d.desc(0, buf, len, D_WRITE, 0);
    d.submit(0);
    d.wait_used(IO_TIMEOUT_US, false).map(|(_, n)| n)
}

#[inline(never)]
fn rng_main(f: &Func) {
    let mut d = match Vdev::find(f, qpage(1)) {
        Ok(d) => d,
        Err(e) => return err_dev(e, f.df),
    };
    if let Err(e) = d.init(0, None) {
        return err_dev(e, f.df);
    }
    let dma = DMA.get();
    dma.rbuf.0[..64].fill(0);
    dma.rbuf2.0[..64].fill(0);
    let n1 = rng_read(&mut d, addr_of(&dma.rbuf), 64);
    let n2 = rng_read(&mut d, addr_of(&dma.rbuf2), 64);
    match (n1, n2) {
        (Some(n1), Some(n2)) => {
            let distinct = dma.rbuf.0[..64] != dma.rbuf2.0[..64];
            let mut l = Line::new("rng");
            l.kd("bytes", n1.min(n2) as u64)
                .kd("distinct", distinct as u64);
            if n1 != 64 || n2 != 64 {
                l.kd("len1", n1 as u64).kd("len2", n2 as u64);
            }
            l.print();
        }
        _ => {
            let mut l = Line::new("error");
            l.ks("what", "rng-timeout");
            pci::bdf(&mut l, d.df);
            l.print();
        }
    }
    d.reset(1_000_000);
}

// ---------------------------------------------------------------------
// hostile

const CASES: [&str; 7] = [
    "desc-oob",
    "desc-loop",
    "chain-too-long",
    "zero-len",
    "wrong-direction",
    "queue-across-end",
    "bad-head",
];

/// Descriptor address far beyond any RAM.
const OOB_ADDR: u64 = 0xFFF_FFFF_F000;

struct Outcome {
    status: Option<u8>,
    used: bool,
    req_status: Option<u8>,
    /// Extra hex field for the report (e.g. where a ring was placed).
    note: Option<(&'static str, u64)>,
}

/// Reset, re-initialise, read one sector: does the device work?
#[inline(never)]
fn recover(d: &mut Vdev) -> bool {
    if d.init(blk_want(), None).is_err() {
        return false;
    }
    let rbuf = addr_of(&DMA.get().rbuf);
    matches!(blk_req(d, T_IN, 0, rbuf, SECTOR as u32), Some(0))
}

#[inline(never)]
fn print_case(name: &str, o: &Outcome, recovered: bool, extra: &[(&str, &str)]) {
    let mut l = Line::new("hostile");
    l.ks("case", name);
    match o.status {
        Some(s) => l.kxw("status", s as u64, 2),
        None => l.ks("status", "none"),
    };
    l.kd("used", o.used as u64);
    match o.req_status {
        Some(s) => l.kd("req_status", s as u64),
        None => l.ks("req_status", "none"),
    };
    l.kd("recovered", recovered as u64);
    for (k, v) in extra {
        l.ks(k, v);
    }
    if let Some((k, v)) = o.note {
        l.kx(k, v);
    }
    l.print();
}

/// Submit a malformed request (or a normal one on a malformed queue) on
/// a freshly initialised device and see what happens.
#[inline(never)]
fn attack(d: &mut Vdev, case: &str, a: &DriverArgs) -> Result<Outcome, &'static str> {
    let rbuf = addr_of(&DMA.get().rbuf);
    let (hdr, st) = (hdr_addr(), status_addr());
    if case == "queue-across-end" {
        // Used ring straddling the end of the highest RAM range: its
        // header and first entry are RAM, the rest is not.
        let used = a.ram_end.checked_sub(16).ok_or("no-ram-end")?;
        if !sys_map(used & !0xFFF, 4096, false) {
            return Err("map-ram-end");
        }
        let l = Layout {
            desc: d.qpage,
            avail: d.qpage + 0x100,
            used,
        };
        d.init(blk_want(), Some(l))?;
    } else {
        d.init(blk_want(), None)?;
    }
    let qs = d.q.size;
    prepare(T_IN, 0);
    let mut head = 0;
    match case {
        "desc-oob" => {
            d.desc(0, hdr, 16, D_NEXT, 1);
            d.desc(1, OOB_ADDR, SECTOR as u32, D_NEXT | D_WRITE, 2);
            d.desc(2, st, 1, D_WRITE, 0);
        }
        "desc-loop" => d.desc(0, hdr, 16, D_NEXT, 0),
        "chain-too-long" => {
            // 0 -> 1 -> ... -> qs-1 -> 1: qs+1 descriptors, indices reused.
            d.desc(0, hdr, 16, D_NEXT, 1);
            for i in 1..qs {
                let next = if i + 1 < qs { i + 1 } else { 1 };
                d.desc(i, rbuf + 16 * i as u64, 16, D_NEXT | D_WRITE, next);
            }
        }
        "zero-len" => {
            d.desc(0, hdr, 16, D_NEXT, 1);
            d.desc(1, rbuf, 0, D_NEXT | D_WRITE, 2);
            d.desc(2, st, 1, D_WRITE, 0);
        }
        "wrong-direction" => {
            d.desc(0, hdr, 16, D_NEXT, 1);
            d.desc(1, rbuf, SECTOR as u32, D_NEXT | D_WRITE, 2);
            d.desc(2, st, 1, 0, 0);
        }
        "bad-head" => {
            d.desc(0, hdr, 16, D_NEXT, 1);
            d.desc(1, rbuf, SECTOR as u32, D_NEXT | D_WRITE, 2);
            d.desc(2, st, 1, D_WRITE, 0);
            head = qs;
        }
        _ => {
            // queue-across-end: a well-formed read.
            d.desc(0, hdr, 16, D_NEXT, 1);
            d.desc(1, rbuf, SECTOR as u32, D_NEXT | D_WRITE, 2);
            d.desc(2, st, 1, D_WRITE, 0);
        }
    }
    d.submit(head);
    let used = d.wait_used(HOSTILE_TIMEOUT_US, true).is_some();
    Ok(Outcome {
        status: Some(d.status()),
        used,
        req_status: if used { Some(status_byte()) } else { None },
        note: if case == "queue-across-end" {
            Some(("used_ring", d.q.l.used))
        } else {
            None
        },
    })
}

#[inline(never)]
fn hostile(a: &DriverArgs, f: &Func, d: &mut Vdev) {
    let mut cases = 0;
    for case in CASES {
        match attack(d, case, a) {
            Ok(o) => {
                let rec = recover(d);
                print_case(case, &o, rec, &[]);
            }
            Err(e) => {
                let status = Some(d.status());
                let rec = recover(d);
                let o = Outcome {
                    status,
                    used: false,
                    req_status: None,
                    note: if case == "queue-across-end" {
                        Some(("used_ring", a.ram_end.wrapping_sub(16)))
                    } else {
                        None
                    },
                };
                print_case(case, &o, rec, &[("setup", e)]);
            }
        }
        cases += 1;
    }
    if bar_over_ram(a, f, d) {
        cases += 1;
    }
    if bar_overlap(f, d) {
        cases += 1;
    }
    Line::new("hostile-done").kd("cases", cases).print();
}

/// The BAR holding `d`'s common configuration: (index, kind, address).
fn common_bar(f: &Func, d: &Vdev) -> (usize, BarKind, u64, u64) {
    let i = d.common.bar as usize;
    let b = f.bars[i];
    (i, b.kind, b.addr, b.size)
}

fn move_bar(df: u8, index: usize, kind: BarKind, addr: u64) {
    let cmd = pci::read16(df, CMD);
    pci::write16(df, CMD, cmd & !(CMD_IO | CMD_MEM));
    pci::set_bar(df, index, kind, addr);
    pci::write16(df, CMD, cmd | CMD_MEM);
}

/// Put the virtio BAR on top of guest RAM with decode on, access it,
/// move it back, check the device.
#[inline(never)]
fn bar_over_ram(a: &DriverArgs, f: &Func, d: &mut Vdev) -> bool {
    let (index, kind, orig, size) = common_bar(f, d);
    let target = (a.scratch + size - 1) & !(size - 1);
    if a.scratch == 0 || target + size > a.scratch + a.scratch_len {
        Line::new("warn").ks("what", "bar-over-ram-skipped").print();
        return false;
    }
    let _ = d.init(blk_want(), None);
    let numq = d.r16(virtio::C_NUMQ);
    let off = d.common.offset as u64;
    let ram_numq = target + off + virtio::C_NUMQ;
    let ram_qsel = target + off + virtio::C_QSELECT;
    // Markers in RAM where the moved registers will be.
    unsafe {
        core::ptr::write_volatile(ram_numq as *mut u16, 0xA5A5);
        core::ptr::write_volatile(ram_qsel as *mut u16, 0x5A5A);
    }
    move_bar(f.df, index, kind, target);
    let seen = unsafe { core::ptr::read_volatile(ram_numq as *const u16) };
    unsafe { core::ptr::write_volatile(ram_qsel as *mut u16, 0) };
    move_bar(f.df, index, kind, orig);
    let after = unsafe { core::ptr::read_volatile(ram_qsel as *const u16) };
    let read = if seen == 0xA5A5 {
        "ram"
    } else if seen == numq {
        "device"
    } else {
        "other"
    };
    let write = if after == 0 { "ram" } else { "not-ram" };
    let o = Outcome {
        status: Some(d.status()),
        used: false,
        req_status: None,
        note: None,
    };
    let rec = recover(d);
    print_case("bar-over-ram", &o, rec, &[("read", read), ("write", write)]);
    true
}

/// Program a second virtio function's BAR onto the first's, access the
/// shared address, restore both, check both.
#[inline(never)]
fn bar_overlap(f: &Func, d: &mut Vdev) -> bool {
    let p = PCI.get();
    let g = match p.funcs[..p.nfuncs]
        .iter()
        .find(|g| is_virtio(g) && g.df != f.df)
    {
        Some(g) => *g,
        None => {
            Line::new("warn")
                .ks("what", "bar-overlap-skipped")
                .ks("reason", "one-virtio-function")
                .print();
            return false;
        }
    };
    let mut e = match Vdev::find(&g, qpage(1)) {
        Ok(e) => e,
        Err(what) => {
            err_dev(what, g.df);
            return false;
        }
    };
    let (_, _, a_addr, _) = common_bar(f, d);
    let (bi, bkind, b_orig, _) = common_bar(&g, &e);
    if bkind == BarKind::Mem32 && a_addr >= 1 << 32 {
        Line::new("warn")
            .ks("what", "bar-overlap-skipped")
            .ks("reason", "mem32-vs-high")
            .print();
        return false;
    }
    let _ = d.init(blk_want(), None);
    let _ = e.init(0, None);
    // Feature word 0 tells the two devices apart (device types differ).
    d.w32(virtio::C_DFSELECT, 0);
    e.w32(virtio::C_DFSELECT, 0);
    let na = d.r32(virtio::C_DF);
    let nb = e.r32(virtio::C_DF);
    move_bar(g.df, bi, bkind, a_addr);
    // The first device's common config address now decodes for both.
    let seen = d.r32(virtio::C_DF);
    d.w32(virtio::C_DFSELECT, 0);
    move_bar(g.df, bi, bkind, b_orig);
    let read = if na == nb {
        "same"
    } else if seen == na {
        "first"
    } else if seen == nb {
        "second"
    } else {
        "other"
    };
    let o = Outcome {
        status: Some(d.status()),
        used: false,
        req_status: None,
        note: None,
    };
    let rec_a = recover(d);
    let rec_b = match e.init(0, None) {
        Ok(()) if g.device == virtio::DEV_RNG => {
            rng_read(&mut e, addr_of(&DMA.get().rbuf2), 16).is_some()
        }
        Ok(()) => e.status() & S_NEEDS_RESET == 0,
        Err(_) => false,
    };
    e.reset(1_000_000);
    let mut l = Line::new("hostile");
    l.ks("case", "bar-overlap");
    match o.status {
        Some(s) => l.kxw("status", s as u64, 2),
        None => l.ks("status", "none"),
    };
    l.kd("used", 0)
        .ks("req_status", "none")
        .kd("recovered", (rec_a && rec_b) as u64);
    l.ks("read", read);
    pci::bdf_key(&mut l, "second", g.df);
    l.kd("recovered_first", rec_a as u64)
        .kd("recovered_second", rec_b as u64);
    l.print();
    true
}
