//! A PCI function's configuration space (type-0 header, 4 KiB for ECAM).
//!
//! Register semantics are table-driven: every dword has a write mask, so BAR
//! sizing (write all-ones, read back the size mask), read-only IDs and
//! capability chaining all fall out of the same code path.

/// Size of the configuration space reachable through ECAM.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

/// Header register offsets.
pub mod reg {
    /// Vendor ID (16) | Device ID (16).
    pub const ID: usize = 0x00;
    /// Command (16) | Status (16).
    pub const COMMAND_STATUS: usize = 0x04;
    /// Revision (8) | Class code (24).
    pub const CLASS_REVISION: usize = 0x08;
    /// Cache line size, latency timer, header type, BIST.
    pub const HEADER: usize = 0x0c;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID | subsystem ID.
    pub const SUBSYSTEM: usize = 0x2c;
    /// Expansion ROM base address.
    pub const ROM: usize = 0x30;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line | pin | min_gnt | max_lat.
    pub const INTERRUPT: usize = 0x3c;
    /// First byte available for capabilities.
    pub const CAP_START: usize = 0x40;
}

/// Command register bits.
pub mod command {
    /// I/O space decode.
    pub const IO: u16 = 1 << 0;
    /// Memory space decode.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Bits a guest may change.
    pub const WRITABLE: u16 = IO | MEMORY | BUS_MASTER | PARITY | SERR | INTX_DISABLE;
}

const STATUS_CAP_LIST: u16 = 1 << 4;
const ROM_ENABLE: u32 = 1;
const ROM_ADDR_MASK: u32 = !0x7ff;

/// What kind of resource a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (occupies two BAR slots).
    Mem64,
    /// I/O port BAR.
    Io,
}

/// One BAR's static description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Kind.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 (memory) or 4 (I/O).
    pub size: u64,
    /// Prefetchable (memory BARs).
    pub prefetchable: bool,
}

/// Errors describing a function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR index out of range, or a 64-bit BAR in slot 5.
    #[error("BAR {0} is not available")]
    BarSlot(usize),
    /// BAR size not a power of two or too small/large.
    #[error("BAR {index} size {size:#x} is invalid: it must be a power of two, at least {min:#x}")]
    BarSize {
        /// BAR index.
        index: usize,
        /// Size.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// ROM slot size not a power of two of at least 2 KiB.
    #[error("ROM slot size {0:#x} is invalid: it must be a power of two of at least 2 KiB")]
    RomSlot(u64),
    /// No room for a capability.
    #[error("no room for a {0}-byte capability in the configuration space")]
    CapabilityFull(usize),
}

/// A region a BAR (or the ROM BAR) currently decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    /// BAR index (6 = expansion ROM).
    pub index: usize,
    /// Kind.
    pub kind: BarKind,
    /// Guest address (or port).
    pub addr: u64,
    /// Size.
    pub size: u64,
}

/// Index used for the expansion ROM in [`BarMapping`].
pub const ROM_BAR_INDEX: usize = 6;

/// The configuration space of one function.
#[derive(Clone, Debug)]
pub struct PciConfig {
    regs: Vec<u32>,
    masks: Vec<u32>,
    /// Write-one-to-clear bits per dword.
    w1c: Vec<u32>,
    bars: [Option<BarSpec>; 6],
    rom_size: u64,
    next_cap: usize,
    last_cap: Option<usize>,
}

/// Identity of a function, as the machine description gives it.
pub use abide_machines::PciIdentity as PciIds;

impl PciConfig {
    /// A header-type-0 function with `ids` and interrupt pin `pin` (0 = none, 1 = INTA#).
    pub fn new(ids: PciIds, pin: u8) -> Self {
        let mut c = Self {
            regs: vec![0; DWORDS],
            masks: vec![0; DWORDS],
            w1c: vec![0; DWORDS],
            bars: [None; 6],
            rom_size: 0,
            next_cap: reg::CAP_START,
            last_cap: None,
        };
        c.regs[reg::ID / 4] = u32::from(ids.vendor) | u32::from(ids.device) << 16;
        c.regs[reg::CLASS_REVISION / 4] = u32::from(ids.revision) | (ids.class & 0xff_ffff) << 8;
        c.regs[reg::SUBSYSTEM / 4] =
            u32::from(ids.subsystem_vendor) | u32::from(ids.subsystem) << 16;
        c.regs[reg::INTERRUPT / 4] = u32::from(pin) << 8;
        c.masks[reg::COMMAND_STATUS / 4] = u32::from(command::WRITABLE);
        // Status: detected parity, signaled system error, master/target aborts.
        c.w1c[reg::COMMAND_STATUS / 4] = 0xf900_0000;
        // Cache line size and latency timer are plain storage.
        c.masks[reg::HEADER / 4] = 0x0000_ffff;
        c.masks[reg::INTERRUPT / 4] = 0x0000_00ff;
        c
    }

    /// Declares BAR `index`.
    pub fn set_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), ConfigError> {
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        let max = match spec.kind {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 => 1 << 62,
        };
        if index >= 6 || (spec.kind == BarKind::Mem64 && index >= 5) {
            return Err(ConfigError::BarSlot(index));
        }
        if !spec.size.is_power_of_two() || spec.size < min || spec.size > max {
            return Err(ConfigError::BarSize {
                index,
                size: spec.size,
                min,
            });
        }
        let r = reg::BAR0 / 4 + index;
        let mask = !(spec.size - 1);
        match spec.kind {
            BarKind::Io => {
                self.regs[r] = 0x1;
                self.masks[r] = (mask as u32) & !0x3;
            }
            BarKind::Mem32 => {
                self.regs[r] = if spec.prefetchable { 0x8 } else { 0 };
                self.masks[r] = (mask as u32) & !0xf;
            }
            BarKind::Mem64 => {
                self.regs[r] = 0x4 | if spec.prefetchable { 0x8 } else { 0 };
                self.masks[r] = (mask as u32) & !0xf;
                self.regs[r + 1] = 0;
                self.masks[r + 1] = (mask >> 32) as u32;
            }
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    /// Declares an expansion ROM BAR decoding `slot_size` bytes.
    pub fn set_rom_slot(&mut self, slot_size: u64) -> Result<(), ConfigError> {
        if !slot_size.is_power_of_two() || !(2048..=1 << 31).contains(&slot_size) {
            return Err(ConfigError::RomSlot(slot_size));
        }
        self.rom_size = slot_size;
        self.masks[reg::ROM / 4] = (!(slot_size - 1) as u32 & ROM_ADDR_MASK) | ROM_ENABLE;
        Ok(())
    }

    /// Appends a capability (`bytes[0]` is its ID; `bytes[1]`, the next
    /// pointer, is filled in). `writable` masks, dword-aligned with `bytes`,
    /// say which bits the guest may change. Returns its offset.
    pub fn add_capability(&mut self, bytes: &[u8], writable: &[u32]) -> Result<usize, ConfigError> {
        let len = bytes.len().max(2).next_multiple_of(4);
        let off = self.next_cap;
        if off + len > 256 {
            return Err(ConfigError::CapabilityFull(bytes.len()));
        }
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(off + i, *b);
        }
        self.set_byte(off + 1, 0);
        for (i, m) in writable.iter().enumerate().take(len / 4) {
            self.masks[off / 4 + i] = *m;
        }
        match self.last_cap {
            None => {
                self.regs[reg::CAP_PTR / 4] = off as u32;
                self.regs[reg::COMMAND_STATUS / 4] |= u32::from(STATUS_CAP_LIST) << 16;
            }
            Some(prev) => self.set_byte(prev + 1, off as u8),
        }
        self.last_cap = Some(off);
        self.next_cap = off + len;
        Ok(off)
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let shift = (off % 4) * 8;
        let r = &mut self.regs[off / 4];
        *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
    }

    /// The register dwords: the current contents of the configuration
    /// space, for a snapshot.
    pub fn save_regs(&self) -> Vec<u32> {
        self.regs.clone()
    }

    /// Sets the registers verbatim from [`PciConfig::save_regs`] output.
    /// Write masks, write-one-to-clear bits and BAR descriptions are not
    /// part of it: they are fixed when the function is built, and the
    /// snapshot's ABI check guarantees the same function is built again.
    /// Refuses a register count that differs from this space's.
    pub fn restore_regs(&mut self, regs: &[u32]) -> Result<(), String> {
        if regs.len() != self.regs.len() {
            return Err(format!(
                "{} configuration registers saved, this function has {}",
                regs.len(),
                self.regs.len()
            ));
        }
        self.regs.copy_from_slice(regs);
        Ok(())
    }

    /// Reads a dword-aligned register.
    pub fn read_reg(&self, dword: usize) -> u32 {
        self.regs.get(dword).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes a register through the guest's view: masked, W1C applied.
    fn write_masked(&mut self, dword: usize, value: u32, byte_mask: u32) {
        let (Some(mask), Some(w1c)) = (self.masks.get(dword), self.w1c.get(dword)) else {
            return;
        };
        let cur = self.regs[dword];
        let writable = mask & byte_mask;
        let clear = w1c & byte_mask & value;
        self.regs[dword] = (cur & !writable | value & writable) & !clear;
    }

    /// Guest read of `data.len()` bytes (1, 2 or 4) at `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let v = self.read_reg(offset / 4).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(offset % 4 + i).copied().unwrap_or(0xff);
        }
    }

    /// Guest write of `data.len()` bytes at `offset`. Returns true when a
    /// BAR, the ROM BAR or the command register changed, so the caller can
    /// re-evaluate the function's mappings.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let shift = offset % 4;
        if data.is_empty() || shift + data.len() > 4 {
            return false;
        }
        let mut value = [0u8; 4];
        let mut bytes = 0u32;
        for (i, b) in data.iter().enumerate() {
            value[shift + i] = *b;
            bytes |= 0xff << ((shift + i) * 8);
        }
        let dword = offset / 4;
        let before = self.read_reg(dword);
        self.write_masked(dword, u32::from_le_bytes(value), bytes);
        let decode_regs = dword == reg::COMMAND_STATUS / 4
            || (reg::BAR0 / 4..reg::BAR0 / 4 + 6).contains(&dword)
            || dword == reg::ROM / 4;
        decode_regs && before != self.read_reg(dword)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[reg::COMMAND_STATUS / 4] as u16
    }

    /// The declared BAR `index`.
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// Current address programmed into BAR `index`.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let r = reg::BAR0 / 4 + index;
        Some(match spec.kind {
            BarKind::Io => u64::from(self.regs[r] & !0x3),
            BarKind::Mem32 => u64::from(self.regs[r] & !0xf),
            BarKind::Mem64 => u64::from(self.regs[r] & !0xf) | u64::from(self.regs[r + 1]) << 32,
        })
    }

    /// ROM slot size (0 = no ROM BAR).
    pub fn rom_size(&self) -> u64 {
        self.rom_size
    }

    /// Regions this function decodes now: BARs whose decode is enabled in
    /// the command register and whose address is non-zero and not the
    /// all-ones sizing pattern, and the ROM when enabled.
    pub fn mappings(&self) -> Vec<BarMapping> {
        let cmd = self.command();
        let mut out = Vec::new();
        for index in 0..6 {
            let (Some(spec), Some(addr)) = (self.bar(index), self.bar_addr(index)) else {
                continue;
            };
            let enabled = match spec.kind {
                BarKind::Io => cmd & command::IO != 0,
                _ => cmd & command::MEMORY != 0,
            };
            let limit = match spec.kind {
                BarKind::Io => 1 << 16,
                BarKind::Mem32 => 1 << 32,
                BarKind::Mem64 => u64::MAX,
            };
            if enabled && addr != 0 && addr.checked_add(spec.size).is_some_and(|e| e <= limit) {
                out.push(BarMapping {
                    index,
                    kind: spec.kind,
                    addr,
                    size: spec.size,
                });
            }
        }
        let rom = self.regs[reg::ROM / 4];
        let rom_addr = u64::from(rom & ROM_ADDR_MASK);
        if self.rom_size > 0
            && rom & ROM_ENABLE != 0
            && cmd & command::MEMORY != 0
            && rom_addr != 0
            && rom_addr + self.rom_size <= 1 << 32
        {
            out.push(BarMapping {
                index: ROM_BAR_INDEX,
                kind: BarKind::Mem32,
                addr: rom_addr,
                size: self.rom_size,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0x1af4,
            subsystem: 0x0002,
            revision: 1,
            class: 0x01_0000,
        }
    }

    fn rd32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr32(c: &mut PciConfig, off: usize, v: u32) -> bool {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = PciConfig::new(ids(), 1);
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        wr32(&mut c, 0, 0);
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        assert_eq!(rd32(&c, 8) >> 8, 0x01_0000);
        assert_eq!(rd32(&c, 0x2c), 0x0002_1af4);
        assert_eq!((rd32(&c, 0x3c) >> 8) & 0xff, 1);
        let mut w = [0u8; 2];
        c.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
    }

    #[test]
    fn bar_sizing_32_and_64() {
        let mut c = PciConfig::new(ids(), 1);
        c.set_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false,
            },
        )
        .expect("bar0");
        c.set_bar(
            2,
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x4000,
                prefetchable: true,
            },
        )
        .expect("bar2");
        c.set_bar(
            4,
            BarSpec {
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false,
            },
        )
        .expect("bar4");
        wr32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x10), 0xffff_f000);
        wr32(&mut c, 0x18, 0xffff_ffff);
        wr32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x18), 0xffff_c00c);
        assert_eq!(rd32(&c, 0x1c), 0xffff_ffff);
        wr32(&mut c, 0x20, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x20), 0xffff_ffe1);
        // BAR 1 and 5 don't exist: they read 0 and ignore writes.
        wr32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x14), 0);
        // Program real addresses.
        wr32(&mut c, 0x10, 0xc000_0000);
        wr32(&mut c, 0x18, 0x0000_0000);
        wr32(&mut c, 0x1c, 0x0000_0080);
        wr32(&mut c, 0x20, 0xc040);
        assert_eq!(c.bar_addr(0), Some(0xc000_0000));
        assert_eq!(c.bar_addr(2), Some(0x80_0000_0000));
        assert_eq!(c.bar_addr(4), Some(0xc040));
    }

    #[test]
    fn mappings_follow_command_register() {
        let mut c = PciConfig::new(ids(), 1);
        c.set_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false,
            },
        )
        .expect("bar0");
        c.set_rom_slot(128 * 1024).expect("rom");
        assert!(wr32(&mut c, 0x10, 0xc000_0000));
        assert!(c.mappings().is_empty(), "decode off");
        assert!(wr32(&mut c, 0x04, u32::from(command::MEMORY)));
        assert_eq!(c.mappings().len(), 1);
        // ROM BAR sizing: slot size, not file size.
        wr32(&mut c, 0x30, 0xffff_fffe);
        assert_eq!(rd32(&c, 0x30), 0xfffe_0000);
        wr32(&mut c, 0x30, 0xd000_0001);
        let m = c.mappings();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].index, ROM_BAR_INDEX);
        assert_eq!((m[1].addr, m[1].size), (0xd000_0000, 128 * 1024));
        // Unchanged writes report no change.
        assert!(!wr32(&mut c, 0x30, 0xd000_0001));
        assert!(!wr32(&mut c, 0x3c, 0x0b));
    }

    #[test]
    fn capabilities_chain() {
        let mut c = PciConfig::new(ids(), 0);
        let a = c
            .add_capability(&[0x11, 0, 1, 2, 3, 4], &[0, 0])
            .expect("cap");
        let b = c.add_capability(&[0x09, 0, 7], &[]).expect("cap");
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(rd32(&c, 0x34) & 0xff, 0x40);
        assert_ne!((rd32(&c, 4) >> 16) & u32::from(STATUS_CAP_LIST), 0);
        assert_eq!((rd32(&c, 0x40) >> 8) & 0xff, 0x48);
        assert_eq!((rd32(&c, 0x48) >> 8) & 0xff, 0);
        assert!(c.add_capability(&[0x09; 200], &[]).is_err());
    }

    #[test]
    fn invalid_specs() {
        let mut c = PciConfig::new(ids(), 0);
        let bad = BarSpec {
            kind: BarKind::Mem32,
            size: 0x1800,
            prefetchable: false,
        };
        assert!(c.set_bar(0, bad).is_err());
        let b64 = BarSpec {
            kind: BarKind::Mem64,
            size: 0x1000,
            prefetchable: false,
        };
        assert!(c.set_bar(5, b64).is_err());
        assert!(c.set_rom_slot(3000).is_err());
        assert!(c.set_rom_slot(1024).is_err());
    }

    #[test]
    fn regs_save_and_restore() {
        let mut a = PciConfig::new(ids(), 1);
        a.set_bar(
            0,
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x4000,
                prefetchable: false,
            },
        )
        .expect("bar");
        wr32(&mut a, 0x10, 0xc000_0000);
        wr32(&mut a, 0x14, 0x80);
        wr32(
            &mut a,
            0x04,
            u32::from(command::MEMORY | command::BUS_MASTER),
        );
        wr32(&mut a, 0x3c, 0x0b);
        let regs = a.save_regs();
        assert_eq!(regs.len(), DWORDS);
        let mut b = PciConfig::new(ids(), 1);
        b.set_bar(0, a.bar(0).expect("bar")).expect("bar");
        assert!(b.restore_regs(&regs[..DWORDS - 1]).is_err(), "short");
        let mut long = regs.clone();
        long.push(0);
        assert!(b.restore_regs(&long).is_err(), "long");
        assert!(b.mappings().is_empty(), "refused restores change nothing");
        b.restore_regs(&regs).expect("restore");
        assert_eq!(b.save_regs(), regs);
        assert_eq!(b.bar_addr(0), Some(0x80_c000_0000));
        assert_eq!(b.mappings(), a.mappings());
        assert_eq!(rd32(&b, 0x3c) & 0xff, 0x0b);
        // The masks are still the construction-time ones.
        wr32(&mut b, 0, 0);
        assert_eq!(rd32(&b, 0), 0x1042_1af4);
    }

    #[test]
    fn status_w1c_and_out_of_range() {
        let mut c = PciConfig::new(ids(), 0);
        c.regs[1] |= 0x8000_0000; // detected parity error
        wr32(&mut c, 4, 0x8000_0000);
        assert_eq!(rd32(&c, 4) & 0x8000_0000, 0);
        let mut b = [0u8; 4];
        c.read(4096, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(!c.write(4094, &[1, 2, 3, 4]), "straddling write ignored");
    }
}
