//! PCI bus 0: function slots, configuration access (0xCF8/0xCFC and ECAM),
//! and BAR placement on the MMIO and port buses.
//!
//! Lock order: a bus map, then [`PciRoot`], then one function. The root never
//! holds a function's lock while it changes a bus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use abide_machines::BarPlacement;

use crate::bus::{Bus, BusDevice};
use crate::pci::config::{reg, BarKind, BarMapping, BarSpec, PciConfig, ROM_BAR_INDEX};

/// A PCI function on bus 0.
pub trait PciFunction: Send {
    /// Configuration space.
    fn config(&self) -> &PciConfig;
    /// Configuration space, mutable.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Guest read inside BAR `index`.
    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]);
    /// Guest write inside BAR `index`.
    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]);
    /// The option ROM image, if any (at most the ROM slot size).
    fn rom(&self) -> Option<&[u8]> {
        None
    }
    /// Replaces the option ROM image with `image` (a restored or migrated
    /// guest's own), which must fit the function's ROM slot. Refused by a
    /// function without a ROM slot (the default).
    fn set_rom(&mut self, image: Vec<u8>) -> Result<(), String> {
        let _ = image;
        Err("this PCI function has no ROM slot".into())
    }
    /// Guest read of configuration space: what [`PciConfig::read`] holds,
    /// unless the function answers some bytes itself (a window onto a BAR).
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// Called after the guest wrote `len` bytes at config `offset`, so the
    /// function can react (e.g. MSI-X enable and mask).
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// Called after the function's regions were (re)placed on the buses.
    fn bars_placed(&mut self, _placed: &[BarMapping]) {}
    /// Saves the function's guest-visible state for a snapshot: the state
    /// version and its payload. The function must be quiescent (vCPUs
    /// stopped; virtio functions paused). A function that cannot save its
    /// state says so with an error (the default): nothing is skipped.
    fn save_state(&self) -> Result<(u32, Vec<u8>), crate::persist::PersistError> {
        Err(unsupported())
    }
    /// The state layout [`PciFunction::save_state`] would write now, and
    /// why when newer than the first ([`crate::persist::Persist::oldest_version`]).
    /// Callable while the guest runs.
    fn state_version(&self) -> crate::persist::Needed {
        crate::persist::Needed::first()
    }
    /// Applies state written by [`PciFunction::save_state`] to a freshly
    /// built function of the same model. Afterwards the caller places the
    /// function's regions again with [`PciRoot::refresh`]. Newer versions,
    /// unparsable and inapplicable state are refused; so is any state by a
    /// function that cannot restore (the default).
    fn restore_state(
        &mut self,
        _version: u32,
        _bytes: &[u8],
    ) -> Result<(), crate::persist::PersistError> {
        Err(unsupported())
    }
}

fn unsupported() -> crate::persist::PersistError {
    crate::persist::PersistError::Invalid {
        device: "pci-function",
        reason: "this PCI function cannot save or restore its state".into(),
    }
}

/// A shared function.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Errors placing functions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Slot number out of range.
    #[error("PCI slot {0} does not exist on bus 0 (valid: 0-31)")]
    NoSuchSlot(u8),
    /// Slot taken.
    #[error("PCI slot {0} is already in use")]
    SlotInUse(u8),
}

/// Where a config access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    /// Bus.
    pub bus: u8,
    /// Device (slot).
    pub device: u8,
    /// Function.
    pub function: u8,
    /// Register offset.
    pub offset: usize,
}

struct Slot {
    function: SharedFunction,
    /// Regions currently placed on a bus.
    placed: Vec<BarMapping>,
}

/// Bus 0 and the functions on it.
pub struct PciRoot {
    slots: BTreeMap<u8, Slot>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("slots", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Forwards accesses inside a BAR (or the ROM) to its function.
struct BarRegion {
    function: SharedFunction,
    index: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut f = self.function.lock().unwrap_or_else(|e| e.into_inner());
        if self.index == ROM_BAR_INDEX {
            // Read-only image, zero-padded to the slot size.
            data.fill(0);
            if let Some(rom) = f.rom() {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, d) in data.iter_mut().enumerate() {
                    if let Some(b) = start.checked_add(i).and_then(|p| rom.get(p)) {
                        *d = *b;
                    }
                }
            }
        } else {
            f.bar_read(self.index, offset, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.index != ROM_BAR_INDEX {
            let mut f = self.function.lock().unwrap_or_else(|e| e.into_inner());
            f.bar_write(self.index, offset, data);
        }
    }
}

impl PciRoot {
    /// An empty bus 0 whose BARs go on `mmio` and `pio`.
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>) -> Self {
        Self {
            slots: BTreeMap::new(),
            mmio,
            pio,
        }
    }

    /// Places `function` at `slot` (function 0).
    pub fn add(&mut self, slot: u8, function: SharedFunction) -> Result<(), PciError> {
        if slot >= 32 {
            return Err(PciError::NoSuchSlot(slot));
        }
        if self.slots.contains_key(&slot) {
            return Err(PciError::SlotInUse(slot));
        }
        self.slots.insert(
            slot,
            Slot {
                function,
                placed: Vec::new(),
            },
        );
        self.remap(slot);
        Ok(())
    }

    /// Occupied slots.
    pub fn slots(&self) -> Vec<u8> {
        self.slots.keys().copied().collect()
    }

    /// The function at `slot`, if any.
    pub fn function(&self, slot: u8) -> Option<SharedFunction> {
        self.slots.get(&slot).map(|s| s.function.clone())
    }

    /// Guest configuration read. Absent functions read all-ones.
    pub fn config_read(&self, addr: ConfigAddress, data: &mut [u8]) {
        match self.target(addr) {
            Some(slot) => slot
                .function
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(addr.offset, data),
            None => data.fill(0xff),
        }
    }

    /// Guest configuration write.
    pub fn config_write(&mut self, addr: ConfigAddress, data: &[u8]) {
        let Some(slot) = self.target(addr) else {
            return;
        };
        let changed = {
            let mut f = slot.function.lock().unwrap_or_else(|e| e.into_inner());
            let changed = f.config_mut().write(addr.offset, data);
            f.config_written(addr.offset, data.len());
            changed
        };
        if changed {
            self.remap(addr.device);
        }
    }

    fn target(&self, addr: ConfigAddress) -> Option<&Slot> {
        if addr.bus != 0 || addr.function != 0 {
            return None;
        }
        self.slots.get(&addr.device)
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            _ => &self.mmio,
        }
    }

    /// Brings the bus placement of `slot`'s regions (and, through
    /// [`PciFunction::bars_placed`], its ioeventfds) in line with its
    /// configuration space: what a guest's BAR or command write does, for
    /// use after the function's registers were restored from a snapshot.
    /// An empty slot is ignored.
    pub fn refresh(&mut self, slot: u8) {
        self.remap(slot);
    }

    /// Brings the bus placement of `slot`'s regions in line with its config
    /// space. A region that would overlap another device stays unplaced (the
    /// guest programmed a conflict; it is retried on the next change).
    fn remap(&mut self, slot: u8) {
        let Some(s) = self.slots.get(&slot) else {
            return;
        };
        let wanted = s
            .function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config()
            .mappings();
        let function = s.function.clone();
        let old = s.placed.clone();
        let mut placed = Vec::new();
        for m in &old {
            if wanted.contains(m) {
                placed.push(*m);
            } else {
                self.bus_for(m.kind).remove(m.addr);
            }
        }
        for m in &wanted {
            if placed.contains(m) {
                continue;
            }
            let region = Arc::new(Mutex::new(BarRegion {
                function: function.clone(),
                index: m.index,
            }));
            if self.bus_for(m.kind).insert(region, m.addr, m.size).is_ok() {
                placed.push(*m);
            }
        }
        function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bars_placed(&placed);
        if let Some(s) = self.slots.get_mut(&slot) {
            s.placed = placed;
        }
    }

    /// Gives every BAR and ROM BAR an address, as firmware would, by the
    /// machine's `policy` (see [`BarPlacement`]). Decode stays off (the
    /// guest enables it); ROM BARs are not enabled.
    pub fn assign_resources(
        &mut self,
        windows: &Windows,
        policy: BarPlacement,
    ) -> Result<(), AllocError> {
        match policy {
            BarPlacement::SlotOrder => self.place_in_slot_order(windows),
        }
    }

    /// [`BarPlacement::SlotOrder`]: slots in order; a function's BARs in
    /// index order, then its ROM BAR; each naturally aligned, bottom-up in
    /// its window.
    fn place_in_slot_order(&mut self, windows: &Windows) -> Result<(), AllocError> {
        let mut mem32 = Cursor::new("32-bit MMIO", windows.mmio32);
        let mut mem64 = Cursor::new("64-bit MMIO", windows.mmio64);
        let mut io = Cursor::new("I/O", windows.io);
        for slot in self.slots.values() {
            let mut f = slot.function.lock().unwrap_or_else(|e| e.into_inner());
            let config = f.config_mut();
            for index in 0..6 {
                let Some(spec) = config.bar(index) else {
                    continue;
                };
                let addr = match spec.kind {
                    BarKind::Mem32 => mem32.take(spec.size)?,
                    BarKind::Mem64 => mem64.take(spec.size)?,
                    BarKind::Io => io.take(spec.size)?,
                };
                let off = reg::BAR0 + 4 * index;
                config.write(off, &(addr as u32).to_le_bytes());
                if spec.kind == BarKind::Mem64 {
                    config.write(off + 4, &((addr >> 32) as u32).to_le_bytes());
                }
            }
            if config.rom_size() > 0 {
                let addr = mem32.take(config.rom_size())?;
                config.write(reg::ROM, &(addr as u32).to_le_bytes());
            }
        }
        Ok(())
    }

    /// The BARs of `slot` (index, spec, programmed address) and its ROM BAR
    /// (slot size, programmed address), as the guest would find them.
    pub fn resources(&self, slot: u8) -> FunctionResources {
        let Some(s) = self.slots.get(&slot) else {
            return (Vec::new(), None);
        };
        let f = s.function.lock().unwrap_or_else(|e| e.into_inner());
        let c = f.config();
        let bars = (0..6)
            .filter_map(|i| Some((i, c.bar(i)?, c.bar_addr(i)?)))
            .collect();
        let rom = (c.rom_size() > 0).then(|| {
            let mut b = [0u8; 4];
            c.read(reg::ROM, &mut b);
            (c.rom_size(), u64::from(u32::from_le_bytes(b) & !0x7ff))
        });
        (bars, rom)
    }

    /// Regions of `slot` currently placed on a bus.
    pub fn placed(&self, slot: u8) -> Vec<BarMapping> {
        self.slots
            .get(&slot)
            .map(|s| s.placed.clone())
            .unwrap_or_default()
    }
}

/// A function's BARs (index, spec, address) and ROM BAR (slot size, address).
pub type FunctionResources = (Vec<(usize, BarSpec, u64)>, Option<(u64, u64)>);

/// Address windows BARs are allocated from: (base, size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// 32-bit memory window.
    pub mmio32: (u64, u64),
    /// 64-bit memory window.
    pub mmio64: (u64, u64),
    /// I/O port window.
    pub io: (u64, u64),
}

/// A window ran out of space.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("the PCI {window} window has no room for a {size:#x}-byte BAR; use fewer devices")]
pub struct AllocError {
    /// Which window.
    pub window: &'static str,
    /// BAR size.
    pub size: u64,
}

struct Cursor {
    name: &'static str,
    next: u64,
    end: u64,
}

impl Cursor {
    fn new(name: &'static str, (base, size): (u64, u64)) -> Self {
        Self {
            name,
            next: base,
            end: base + size,
        }
    }

    fn take(&mut self, size: u64) -> Result<u64, AllocError> {
        let err = AllocError {
            window: self.name,
            size,
        };
        let addr = self
            .next
            .checked_next_multiple_of(size)
            .ok_or(err.clone())?;
        let end = addr.checked_add(size).ok_or(err.clone())?;
        if end > self.end {
            return Err(err);
        }
        self.next = end;
        Ok(addr)
    }
}

/// The legacy configuration mechanism: CONFIG_ADDRESS at port base (dword),
/// CONFIG_DATA at base + 4..8. A byte written at base + 1 goes to `reset`
/// (the PIIX-style reset control register at 0xCF9), if one is given.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    reset: Option<Box<dyn BusDevice>>,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &self.address)
            .finish()
    }
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    /// Config I/O for `root`, with an optional reset register at base + 1.
    pub fn new(root: Arc<Mutex<PciRoot>>, reset: Option<Box<dyn BusDevice>>) -> Self {
        Self {
            root,
            address: 0,
            reset,
        }
    }

    fn decode(&self, data_offset: u64) -> Option<ConfigAddress> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        Some(ConfigAddress {
            bus: (self.address >> 16) as u8,
            device: ((self.address >> 11) & 0x1f) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
            offset: (self.address & 0xfc) as usize + data_offset as usize,
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.decode(offset - 4) {
                Some(a) => self
                    .root
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config_read(a, data),
                None => data.fill(0xff),
            },
            1 if self.reset.is_some() => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            1 if data.len() == 1 => {
                if let Some(r) = self.reset.as_mut() {
                    r.write(0, data);
                }
            }
            4..=7 => {
                if let Some(a) = self.decode(offset - 4) {
                    self.root
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .config_write(a, data);
                }
            }
            _ => {}
        }
    }
}

/// The enhanced configuration mechanism (ECAM / MMCONFIG) window.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl std::fmt::Debug for PciEcam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciEcam").finish_non_exhaustive()
    }
}

impl PciEcam {
    /// ECAM access to `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> ConfigAddress {
        ConfigAddress {
            bus: (offset >> 20) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
            offset: (offset & 0xfff) as usize,
        }
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_read(Self::decode(offset), data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_write(Self::decode(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{command, BarSpec, PciIds};

    struct Dummy {
        config: PciConfig,
        rom: Vec<u8>,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciFunction for Dummy {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
            data.fill((index as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((index, offset, data.to_vec()));
        }
        fn rom(&self) -> Option<&[u8]> {
            Some(&self.rom)
        }
    }

    fn dummy() -> Arc<Mutex<Dummy>> {
        let mut config = PciConfig::new(
            PciIds {
                vendor: 0x1af4,
                device: 0x1041,
                subsystem_vendor: 0x1af4,
                subsystem: 1,
                revision: 1,
                class: 0x02_0000,
            },
            1,
        );
        config
            .set_bar(
                0,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 0x1000,
                    prefetchable: false,
                },
            )
            .expect("bar");
        config.set_rom_slot(0x2_0000).expect("rom");
        Arc::new(Mutex::new(Dummy {
            config,
            rom: vec![0x55, 0xaa, 0x01],
            last_write: None,
        }))
    }

    struct Setup {
        mmio: Arc<Bus>,
        io: PciConfigIo,
        ecam: PciEcam,
        dev: Arc<Mutex<Dummy>>,
        root: Arc<Mutex<PciRoot>>,
    }

    fn setup() -> Setup {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), pio)));
        let dev = dummy();
        root.lock().expect("lock").add(3, dev.clone()).expect("add");
        Setup {
            mmio,
            io: PciConfigIo::new(root.clone(), None),
            ecam: PciEcam::new(root.clone()),
            dev,
            root,
        }
    }

    fn cfg_addr(dev: u32, reg: u32) -> [u8; 4] {
        (CONFIG_ENABLE | dev << 11 | reg).to_le_bytes()
    }

    fn io_read32(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        io.write(0, &cfg_addr(dev, reg));
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    fn io_write32(io: &mut PciConfigIo, dev: u32, reg: u32, v: u32) {
        io.write(0, &cfg_addr(dev, reg));
        io.write(4, &v.to_le_bytes());
    }

    #[test]
    fn enumerates_through_both_mechanisms() {
        let mut s = setup();
        assert_eq!(io_read32(&mut s.io, 3, 0), 0x1041_1af4);
        assert_eq!(io_read32(&mut s.io, 4, 0), 0xffff_ffff, "empty slot");
        let mut b = [0u8; 4];
        s.ecam.read(3 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1041_1af4);
        s.ecam.read(1 << 20 | 3 << 15, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 is empty");
        s.ecam.read(3 << 15 | 1 << 12, &mut b);
        assert_eq!(b, [0xff; 4], "function 1 is empty");
        // Disabled CONFIG_ADDRESS reads all-ones.
        s.io.write(0, &(3u32 << 11).to_le_bytes());
        s.io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Sub-dword data-port access: device ID via 0xCFE.
        s.io.write(0, &cfg_addr(3, 0));
        let mut w = [0u8; 2];
        s.io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
    }

    #[test]
    fn reset_byte_inside_config_ports() {
        use crate::exit::{ExitReason, ExitSignal};
        let s = setup();
        let exit = ExitSignal::new().expect("eventfd");
        let layout = abide_machines::pc_1_0().legacy.reset;
        let reset = crate::legacy::ResetControl::new(layout, exit.clone());
        let mut io = PciConfigIo::new(s.root.clone(), Some(Box::new(reset)));
        // A dword CONFIG_ADDRESS write does not reset.
        io.write(0, &cfg_addr(3, 0));
        assert_eq!(exit.reason(), None);
        assert_eq!(io_read32(&mut io, 3, 0), 0x1041_1af4);
        io.write(1, &[layout.value]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn bar_placement_follows_the_guest() {
        let mut s = setup();
        io_write32(&mut s.io, 3, 0x10, 0xc000_0000);
        let mut b = [0u8; 1];
        assert!(!s.mmio.read(0xc000_0004, &mut b), "decode still off");
        io_write32(&mut s.io, 3, 0x04, u32::from(command::MEMORY));
        assert!(s.mmio.read(0xc000_0004, &mut b));
        assert_eq!(b[0], 0x04);
        assert!(s.mmio.write(0xc000_0008, &[9]));
        assert_eq!(
            s.dev.lock().expect("lock").last_write,
            Some((0, 8, vec![9]))
        );
        // Relocate: the old address goes dead, the new one answers.
        io_write32(&mut s.io, 3, 0x10, 0xc010_0000);
        assert!(!s.mmio.read(0xc000_0004, &mut b));
        assert!(s.mmio.read(0xc010_0004, &mut b));
        // Turning decode off removes it.
        io_write32(&mut s.io, 3, 0x04, 0);
        assert!(!s.mmio.read(0xc010_0004, &mut b));
    }

    #[test]
    fn refresh_places_restored_registers() {
        let s = setup();
        let mut root = s.root.lock().expect("lock");
        let mut b = [0u8; 1];
        // Registers set behind the root's back (as a restore does) are not
        // decoded until the slot is refreshed.
        let regs = {
            let mut saved = dummy().lock().expect("lock").config.clone();
            saved.write(0x10, &0xc000_0000u32.to_le_bytes());
            saved.write(0x04, &u32::from(command::MEMORY).to_le_bytes());
            saved.save_regs()
        };
        s.dev
            .lock()
            .expect("lock")
            .config
            .restore_regs(&regs)
            .expect("restore");
        assert!(!s.mmio.read(0xc000_0004, &mut b));
        root.refresh(3);
        assert!(s.mmio.read(0xc000_0004, &mut b));
        assert_eq!(root.placed(3).len(), 1);
        root.refresh(9);
        assert!(root.placed(9).is_empty(), "empty slot ignored");
        // Functions without an implementation refuse, never skip.
        let f = s.dev.lock().expect("lock");
        assert!(f.save_state().is_err());
        drop(f);
        assert!(s.dev.lock().expect("lock").restore_state(1, b"{}").is_err());
    }

    #[test]
    fn rom_is_read_only_and_padded() {
        let mut s = setup();
        io_write32(&mut s.io, 3, 0x04, u32::from(command::MEMORY));
        io_write32(&mut s.io, 3, 0x30, 0xffff_f800);
        assert_eq!(io_read32(&mut s.io, 3, 0x30), 0xfffe_0000, "slot size");
        io_write32(&mut s.io, 3, 0x30, 0xd000_0001);
        let mut b = [0u8; 4];
        assert!(s.mmio.read(0xd000_0000, &mut b));
        assert_eq!(b, [0x55, 0xaa, 0x01, 0x00]);
        assert!(s.mmio.write(0xd000_0000, &[0, 0]));
        assert!(s.mmio.read(0xd000_0000, &mut b));
        assert_eq!(b[..2], [0x55, 0xaa], "ROM is read-only");
        assert!(s.mmio.read(0xd001_fffc, &mut b));
        assert_eq!(b, [0; 4], "padding to the slot end");
        assert!(!s.mmio.read(0xd002_0000, &mut b), "slot ends at 128 KiB");
    }

    #[test]
    fn resources_are_assigned_in_slot_order() {
        let s = setup();
        let mut root = s.root.lock().expect("lock");
        root.add(5, dummy()).expect("add");
        let w = Windows {
            mmio32: (0xc000_0000, 0x10_0000),
            mmio64: (0x80_0000_0000, 0x1000_0000),
            io: (0x1000, 0x1000),
        };
        root.assign_resources(&w, BarPlacement::SlotOrder)
            .expect("assign");
        let bar = |d: u8, off: usize| {
            let mut b = [0u8; 4];
            root.config_read(
                ConfigAddress {
                    bus: 0,
                    device: d,
                    function: 0,
                    offset: off,
                },
                &mut b,
            );
            u32::from_le_bytes(b)
        };
        // Slot 3: BAR0 at the window base, its 128 KiB ROM aligned after it.
        assert_eq!(bar(3, 0x10), 0xc000_0000);
        assert_eq!(bar(3, 0x30), 0xc002_0000, "ROM assigned but not enabled");
        assert_eq!(bar(5, 0x10), 0xc004_0000);
        assert_eq!(bar(5, 0x30), 0xc006_0000);
        // Nothing decodes until the guest enables it.
        assert!(root.placed(3).is_empty());
        let tiny = Windows {
            mmio32: (0xc000_0000, 0x1000),
            ..w
        };
        assert!(root
            .assign_resources(&tiny, BarPlacement::SlotOrder)
            .is_err());
    }

    #[test]
    fn overlapping_bars_stay_unplaced() {
        let s = setup();
        let other = dummy();
        let mut root = s.root.lock().expect("lock");
        root.add(4, other).expect("add");
        assert_eq!(root.add(4, dummy()), Err(PciError::SlotInUse(4)));
        assert_eq!(root.add(32, dummy()), Err(PciError::NoSuchSlot(32)));
        let at = |d: u8, reg: usize| ConfigAddress {
            bus: 0,
            device: d,
            function: 0,
            offset: reg,
        };
        for d in [3, 4] {
            root.config_write(at(d, 0x10), &0xc000_0000u32.to_le_bytes());
            root.config_write(at(d, 4), &u32::from(command::MEMORY).to_le_bytes());
        }
        assert_eq!(root.placed(3).len(), 1);
        assert!(root.placed(4).is_empty(), "conflicting BAR not placed");
        // Moving the first away lets the second in on its next change.
        root.config_write(at(3, 0x10), &0xc100_0000u32.to_le_bytes());
        root.config_write(at(4, 4), &0u32.to_le_bytes());
        root.config_write(at(4, 4), &u32::from(command::MEMORY).to_le_bytes());
        assert_eq!(root.placed(4).len(), 1);
    }
}
