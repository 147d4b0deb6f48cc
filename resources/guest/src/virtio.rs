//! Virtio 1.x over PCI ("modern" transport only) with one split
//! virtqueue, driven by polling. Runs in ring 3: the capability regions are
//! mapped user-accessible (and uncached) through `SYS_MAP`, the rings and
//! buffers are ordinary (identity-mapped) guest memory.

use core::sync::atomic::{fence, Ordering};

use crate::io::{mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8};
use crate::pci::{self, BarKind, Func, CMD, CMD_MASTER, CMD_MEM};
use crate::timer::Deadline;
use crate::user::sys_map;
use crate::Global;

pub const VENDOR: u16 = 0x1AF4;
pub const DEV_BLK: u16 = 0x1042;
pub const DEV_RNG: u16 = 0x1044;

pub const F_VERSION_1: u64 = 1 << 32;

pub const S_ACK: u8 = 1;
pub const S_DRIVER: u8 = 2;
pub const S_DRIVER_OK: u8 = 4;
pub const S_FEATURES_OK: u8 = 8;
pub const S_NEEDS_RESET: u8 = 0x40;
pub const S_FAILED: u8 = 0x80;

pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;

/// Polls between deadline checks: reading the clock from ring 3 is a
/// system call, i.e. interpreted ring-0 instructions under PVM.
const POLLS_PER_TICK: u32 = 32;

/// Largest queue the driver sets up.
pub const QMAX: u16 = 16;

// Common configuration layout (virtio 1.1, 4.1.4.3).
pub const C_DFSELECT: u64 = 0x00;
pub const C_DF: u64 = 0x04;
const C_GFSELECT: u64 = 0x08;
const C_GF: u64 = 0x0C;
pub const C_NUMQ: u64 = 0x12;
const C_STATUS: u64 = 0x14;
const C_GEN: u64 = 0x15;
pub const C_QSELECT: u64 = 0x16;
const C_QSIZE: u64 = 0x18;
const C_QENABLE: u64 = 0x1C;
const C_QNOFF: u64 = 0x1E;
const C_QDESC: u64 = 0x20;
const C_QDRIVER: u64 = 0x28;
const C_QDEVICE: u64 = 0x30;
const COMMON_LEN: u32 = 0x38;

#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

/// Guest memory the devices see: one page of rings per device, a page of
/// request headers/status bytes and three data pages.
#[repr(C)]
pub struct Dma {
    pub queues: [Page; 2],
    pub req: Page,
    pub wbuf: Page,
    pub rbuf: Page,
    pub rbuf2: Page,
}

pub static DMA: Global<Dma> = Global::new(Dma {
    queues: [const { Page([0; 4096]) }; 2],
    req: Page([0; 4096]),
    wbuf: Page([0; 4096]),
    rbuf: Page([0; 4096]),
    rbuf2: Page([0; 4096]),
});

pub fn addr_of(p: &Page) -> u64 {
    p.0.as_ptr() as u64
}

/// Where the three parts of a split virtqueue live.
#[derive(Clone, Copy)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Layout {
    /// Everything in one page: descriptors, then avail, then used.
    pub fn in_page(page: u64) -> Layout {
        Layout {
            desc: page,
            avail: page + 0x100,
            used: page + 0x200,
        }
    }
}

#[derive(Clone, Copy)]
pub struct Vq {
    pub size: u16,
    pub l: Layout,
    pub notify_addr: u64,
    pub avail_idx: u16,
    pub used_idx: u16,
}

/// A capability region: BAR index and offset inside it.
#[derive(Clone, Copy)]
pub struct Region {
    pub bar: u8,
    pub offset: u32,
    pub len: u32,
    pub addr: u64,
}

#[derive(Clone, Copy)]
pub struct Vdev {
    pub df: u8,
    #[allow(dead_code)]
    pub device: u16,
    pub common: Region,
    pub notify: Region,
    pub notify_mult: u32,
    /// Mapped but unused: completions are polled, not interrupt-driven.
    #[allow(dead_code)]
    pub isr: Region,
    pub devcfg: Option<Region>,
    pub dev_features: u64,
    pub features: u64,
    /// Page for this device's rings.
    pub qpage: u64,
    pub q: Vq,
}

/// Is this a modern virtio function?
pub fn is_virtio(f: &Func) -> bool {
    f.vendor == VENDOR && f.device >= 0x1040 && f.device <= 0x107F
}

impl Vdev {
    /// Locate the common/notify/ISR/device regions from the vendor
    /// capabilities, map them, enable memory decode and bus mastering.
    #[inline(never)]
    pub fn find(f: &Func, qpage: u64) -> Result<Vdev, &'static str> {
        let df = f.df;
        let mut found: [Option<Region>; 5] = [None; 5];
        let mut mult = 0u32;
        let mut ptr = pci::read8(df, 0x34) & 0xFC;
        let mut n = 0;
        while ptr >= 0x40 && n < 48 {
            let p = ptr as u16;
            if pci::read8(df, p) == 0x09 {
                let t = pci::read8(df, p + 3) as usize;
                let bar = pci::read8(df, p + 4);
                if (1..=4).contains(&t) && found[t].is_none() && bar < 6 {
                    let b = f.bars[bar as usize];
                    if b.kind == BarKind::Mem32 || b.kind == BarKind::Mem64 {
                        let offset = pci::read32(df, p + 8);
                        let len = pci::read32(df, p + 12);
                        found[t] = Some(Region {
                            bar,
                            offset,
                            len,
                            addr: b.addr + offset as u64,
                        });
                        if t == 2 {
                            mult = pci::read32(df, p + 16);
                        }
                    }
                }
            }
            ptr = pci::read8(df, p + 1) & 0xFC;
            n += 1;
        }
        let common = found[1].ok_or("virtio-no-common-cap")?;
        let notify = found[2].ok_or("virtio-no-notify-cap")?;
        let isr = found[3].ok_or("virtio-no-isr-cap")?;
        if common.len < COMMON_LEN {
            return Err("virtio-common-short");
        }
        for r in [Some(common), Some(notify), Some(isr), found[4]]
            .into_iter()
            .flatten()
        {
            if !sys_map(r.addr, (r.len as u64).max(4), true) {
                return Err("virtio-map");
            }
        }
        let cmd = pci::read16(df, CMD);
        pci::write16(df, CMD, cmd | CMD_MEM | CMD_MASTER);
        Ok(Vdev {
            df,
            device: f.device,
            common,
            notify,
            notify_mult: mult,
            isr,
            devcfg: found[4],
            dev_features: 0,
            features: 0,
            qpage,
            q: Vq {
                size: 0,
                l: Layout::in_page(qpage),
                notify_addr: 0,
                avail_idx: 0,
                used_idx: 0,
            },
        })
    }

    // Common configuration accessors (at most 32 bits wide: devices need
    // not support 64-bit accesses).
    pub fn r8(&self, off: u64) -> u8 {
        mmio_read8(self.common.addr + off)
    }
    pub fn w8(&self, off: u64, v: u8) {
        mmio_write8(self.common.addr + off, v)
    }
    pub fn r16(&self, off: u64) -> u16 {
        mmio_read16(self.common.addr + off)
    }
    pub fn w16(&self, off: u64, v: u16) {
        mmio_write16(self.common.addr + off, v)
    }
    pub fn r32(&self, off: u64) -> u32 {
        mmio_read32(self.common.addr + off)
    }
    pub fn w32(&self, off: u64, v: u32) {
        mmio_write32(self.common.addr + off, v)
    }
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.r8(C_STATUS)
    }

    /// Write 0 to device_status and wait (bounded) until it reads 0.
    #[inline(never)]
    pub fn reset(&mut self, timeout_us: u64) -> bool {
        self.w8(C_STATUS, 0);
        let d = Deadline::after_us(timeout_us);
        loop {
            for _ in 0..POLLS_PER_TICK {
                if self.status() == 0 {
                    return true;
                }
            }
            if d.expired() {
                return false;
            }
        }
    }

    /// Reset and bring the device to DRIVER_OK with queue 0 at `layout`
    /// (default: this device's queue page), accepting `want` ∩ offered
    /// (+ VERSION_1, which is required).
    #[inline(never)]
    pub fn init(&mut self, want: u64, layout: Option<Layout>) -> Result<(), &'static str> {
        if !self.reset(1_000_000) {
            return Err("virtio-reset-timeout");
        }
        self.w8(C_STATUS, S_ACK);
        self.w8(C_STATUS, S_ACK | S_DRIVER);
        self.w32(C_DFSELECT, 0);
        let lo = self.r32(C_DF) as u64;
        self.w32(C_DFSELECT, 1);
        let hi = self.r32(C_DF) as u64;
        self.dev_features = hi << 32 | lo;
        if self.dev_features & F_VERSION_1 == 0 {
            self.w8(C_STATUS, S_FAILED);
            return Err("virtio-no-version-1");
        }
        self.features = self.dev_features & (want | F_VERSION_1);
        self.w32(C_GFSELECT, 0);
        self.w32(C_GF, self.features as u32);
        self.w32(C_GFSELECT, 1);
        self.w32(C_GF, (self.features >> 32) as u32);
        self.w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.w8(C_STATUS, S_FAILED);
            return Err("virtio-features-not-ok");
        }
        self.w16(C_QSELECT, 0);
        let max = self.r16(C_QSIZE);
        if max == 0 {
            self.w8(C_STATUS, S_FAILED);
            return Err("virtio-no-queue");
        }
        // Largest power of two <= min(max, QMAX).
        let mut size = QMAX;
        while size > max {
            size >>= 1;
        }
        let l = layout.unwrap_or(Layout::in_page(self.qpage));
        // Clear what the driver owns (only the parts inside this queue's
        // own memory: a hostile layout may point elsewhere).
        unsafe {
            core::ptr::write_bytes(l.desc as *mut u8, 0, 16 * size as usize);
            core::ptr::write_volatile(l.avail as *mut u32, 0);
            core::ptr::write_volatile(l.used as *mut u32, 0);
        }
        self.w16(C_QSIZE, size);
        self.w64(C_QDESC, l.desc);
        self.w64(C_QDRIVER, l.avail);
        self.w64(C_QDEVICE, l.used);
        let noff = self.r16(C_QNOFF) as u64;
        self.w16(C_QENABLE, 1);
        // A device may reject the queue (NEEDS_RESET) here; writing
        // DRIVER_OK would overwrite that bit, so look first.
        if self.status() & (S_NEEDS_RESET | S_FAILED) != 0 {
            return Err("virtio-queue-refused");
        }
        self.q = Vq {
            size,
            l,
            notify_addr: self.notify.addr + noff * self.notify_mult as u64,
            avail_idx: 0,
            used_idx: 0,
        };
        self.w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let st = self.status();
        if st & (S_NEEDS_RESET | S_FAILED) != 0 || st & S_DRIVER_OK == 0 {
            return Err("virtio-driver-ok-refused");
        }
        Ok(())
    }

    /// Device configuration space, 32-bit read (0 if there is none).
    pub fn cfg32(&self, off: u64) -> u32 {
        match self.devcfg {
            Some(r) if off + 4 <= r.len as u64 => mmio_read32(r.addr + off),
            _ => 0,
        }
    }

    /// 64-bit device config field, consistent per config_generation.
    pub fn cfg64(&self, off: u64) -> u64 {
        let mut v = 0;
        for _ in 0..16 {
            let g = self.r8(C_GEN);
            v = (self.cfg32(off + 4) as u64) << 32 | self.cfg32(off) as u64;
            if self.r8(C_GEN) == g {
                break;
            }
        }
        v
    }

    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.q.l.desc + 16 * i as u64;
        unsafe {
            core::ptr::write_volatile(p as *mut u64, addr);
            core::ptr::write_volatile((p + 8) as *mut u32, len);
            core::ptr::write_volatile((p + 12) as *mut u16, flags);
            core::ptr::write_volatile((p + 14) as *mut u16, next);
        }
    }

    /// Publish `head` in the avail ring and notify queue 0.
    #[inline(never)]
    pub fn submit(&mut self, head: u16) {
        let q = &mut self.q;
        let slot = q.l.avail + 4 + 2 * (q.avail_idx % q.size) as u64;
        unsafe { core::ptr::write_volatile(slot as *mut u16, head) };
        q.avail_idx = q.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        unsafe { core::ptr::write_volatile((q.l.avail + 2) as *mut u16, q.avail_idx) };
        fence(Ordering::SeqCst);
        mmio_write16(q.notify_addr, 0);
    }

    pub fn used_idx(&self) -> u16 {
        unsafe { core::ptr::read_volatile((self.q.l.used + 2) as *const u16) }
    }

    /// Wait for the next used entry: Some((id, len)), or None on timeout
    /// (or as soon as the device sets NEEDS_RESET, if `stop_on_reset`).
    #[inline(never)]
    pub fn wait_used(&mut self, timeout_us: u64, stop_on_reset: bool) -> Option<(u32, u32)> {
        let d = Deadline::after_us(timeout_us);
        let mut n = 0u32;
        loop {
            n = n.wrapping_add(1);
            if self.used_idx() != self.q.used_idx {
                fence(Ordering::SeqCst);
                let e = self.q.l.used + 4 + 8 * (self.q.used_idx % self.q.size) as u64;
                let id = unsafe { core::ptr::read_volatile(e as *const u32) };
                let len = unsafe { core::ptr::read_volatile((e + 4) as *const u32) };
                self.q.used_idx = self.q.used_idx.wrapping_add(1);
                return Some((id, len));
            }
            if !n.is_multiple_of(POLLS_PER_TICK) {
                core::hint::spin_loop();
                continue;
            }
            if stop_on_reset && self.status() & S_NEEDS_RESET != 0 {
                return None;
            }
            if d.expired() {
                return None;
            }
        }
    }
}
