//! PVH `hvm_start_info` parsing. Everything needed later is copied out,
//! so the original structures may be overwritten afterwards.

use crate::io::{phys_u32, phys_u64, phys_u8};

pub const START_MAGIC: u32 = 0x336e_c578;
pub const MAX_E820: usize = 128;
pub const CMDLINE_MAX: usize = 1024;
pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    pub magic_ok: bool,
    pub magic: u32,
    pub version: u32,
    pub rsdp: u64,
    pub cmdline: [u8; CMDLINE_MAX],
    pub cmdline_len: usize,
    pub e820: [E820; MAX_E820],
    pub e820_len: usize,
    /// Entries the VMM reported (may exceed MAX_E820).
    pub e820_reported: u32,
}

impl BootInfo {
    pub const fn empty() -> BootInfo {
        BootInfo {
            magic_ok: false,
            magic: 0,
            version: 0,
            rsdp: 0,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            e820: [E820 {
                addr: 0,
                size: 0,
                kind: 0,
            }; MAX_E820],
            e820_len: 0,
            e820_reported: 0,
        }
    }

    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    pub fn e820(&self) -> &[E820] {
        &self.e820[..self.e820_len]
    }

    /// Is [addr, addr+len) entirely inside one RAM (type 1) range?
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.e820().iter().any(|e| {
            e.kind == E820_RAM && addr >= e.addr && addr + len <= e.addr.saturating_add(e.size)
        })
    }

    pub fn parse(&mut self, paddr: u64) {
        self.magic = if paddr != 0 && paddr < (1 << 32) {
            phys_u32(paddr)
        } else {
            0
        };
        if self.magic != START_MAGIC {
            return;
        }
        self.magic_ok = true;
        self.version = phys_u32(paddr + 4);
        let cmdline = phys_u64(paddr + 24);
        self.rsdp = phys_u64(paddr + 32);
        if cmdline != 0 && cmdline < (1 << 32) {
            let mut n = 0;
            while n < CMDLINE_MAX {
                let c = phys_u8(cmdline + n as u64);
                if c == 0 {
                    break;
                }
                self.cmdline[n] = c;
                n += 1;
            }
            self.cmdline_len = n;
        }
        if self.version >= 1 {
            let map = phys_u64(paddr + 40);
            let entries = phys_u32(paddr + 48);
            self.e820_reported = entries;
            if map != 0 && map < (1 << 32) {
                let n = (entries as usize).min(MAX_E820);
                for i in 0..n {
                    let e = map + (i as u64) * 24;
                    self.e820[i] = E820 {
                        addr: phys_u64(e),
                        size: phys_u64(e + 8),
                        kind: phys_u32(e + 16),
                    };
                }
                self.e820_len = n;
            }
        }
    }
}
