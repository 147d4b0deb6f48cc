//! QEMU's firmware configuration interface (fw_cfg), as SeaBIOS and
//! `linuxboot_dma.bin` use it: a 16-bit selector port, an 8-bit data port
//! right after it, and a DMA address register (two big-endian 32-bit
//! halves; writing the low half starts the transfer).
//!
//! The device only serves items; what they hold is built from the machine
//! description and the configuration elsewhere (`abide_firmware::fw_cfg`).
//! The register layout, the item keys below 0x20, the file directory format
//! and the DMA descriptor are fixed by QEMU's interface
//! (`docs/specs/fw_cfg.txt` there), not choices of ours. Items are
//! read-only: a DMA write is answered with the error bit.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::GuestMem;

/// Key of the signature item ("QEMU").
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Key of the interface ID item (bit 0: traditional, bit 1: DMA).
pub const FW_CFG_ID: u16 = 0x01;
/// Key of the file directory.
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// First key given to files.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// Longest file name, NUL included.
pub const FW_CFG_MAX_NAME: usize = 56;
/// Bytes a DMA address read returns: "QEMU CFG", big-endian.
const DMA_SIGNATURE: &[u8; 8] = b"QEMU CFG";

const DMA_ERROR: u32 = 0x01;
const DMA_READ: u32 = 0x02;
const DMA_SKIP: u32 = 0x04;
const DMA_SELECT: u32 = 0x08;
const DMA_WRITE: u32 = 0x10;
/// Size of a DMA descriptor: control, length (BE u32 each), address (BE u64).
const DMA_DESCRIPTOR: u64 = 16;

/// An item the device could not take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A file name too long for the directory.
    #[error("fw_cfg file name '{0}' is longer than {max} bytes", max = FW_CFG_MAX_NAME - 1)]
    NameTooLong(String),
    /// Two files with one name.
    #[error("fw_cfg file '{0}' is given twice")]
    Duplicate(String),
    /// More files than keys.
    #[error("too many fw_cfg files")]
    TooMany,
    /// An item larger than the interface's 32-bit sizes.
    #[error("fw_cfg item '{0}' is larger than 4 GiB")]
    TooLarge(String),
}

/// The fw_cfg device's contents and registers.
pub struct FwCfg {
    items: std::collections::BTreeMap<u16, Arc<Vec<u8>>>,
    files: Vec<(String, u16, u32)>,
    selector: u16,
    offset: usize,
    dma_high: u32,
    mem: Option<GuestMem>,
}

impl std::fmt::Debug for FwCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FwCfg")
            .field("keys", &self.items.keys().collect::<Vec<_>>())
            .field("files", &self.files)
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

impl FwCfg {
    /// A device holding `items` (numbered keys) and `files` (given keys
    /// from 0x20 on, in order, and listed in the directory). With `mem`,
    /// the DMA interface is offered.
    pub fn new(
        items: Vec<(u16, Vec<u8>)>,
        files: Vec<(String, Vec<u8>)>,
        mem: Option<GuestMem>,
    ) -> Result<Self, FwCfgError> {
        let mut map: std::collections::BTreeMap<u16, Arc<Vec<u8>>> =
            items.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        map.insert(FW_CFG_SIGNATURE, Arc::new(b"QEMU".to_vec()));
        let id: u32 = if mem.is_some() { 0x3 } else { 0x1 };
        map.insert(FW_CFG_ID, Arc::new(id.to_le_bytes().to_vec()));
        let mut dir = Vec::new();
        let mut list = Vec::new();
        for (i, (name, data)) in files.into_iter().enumerate() {
            if name.len() >= FW_CFG_MAX_NAME {
                return Err(FwCfgError::NameTooLong(name));
            }
            if list.iter().any(|(n, _, _): &(String, u16, u32)| *n == name) {
                return Err(FwCfgError::Duplicate(name));
            }
            let key = u16::try_from(i)
                .ok()
                .and_then(|i| FW_CFG_FILE_FIRST.checked_add(i))
                .filter(|k| *k < 0x4000)
                .ok_or(FwCfgError::TooMany)?;
            let size = u32::try_from(data.len()).map_err(|_| FwCfgError::TooLarge(name.clone()))?;
            dir.push((name.clone(), key, size));
            list.push((name, key, size));
            map.insert(key, Arc::new(data));
        }
        let mut d = (dir.len() as u32).to_be_bytes().to_vec();
        for (name, key, size) in &dir {
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&key.to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FW_CFG_MAX_NAME];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        map.insert(FW_CFG_FILE_DIR, Arc::new(d));
        Ok(Self {
            items: map,
            files: list,
            selector: 0,
            offset: 0,
            dma_high: 0,
            mem,
        })
    }

    /// The key of file `name`.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        self.files.iter().find(|f| f.0 == name).map(|f| f.1)
    }

    /// The bytes of item `key`.
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&key).map(|v| v.as_slice())
    }

    fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selector)
            .and_then(|v| v.get(self.offset).copied())
            .unwrap_or(0);
        if self.items.contains_key(&self.selector) {
            self.offset = self.offset.saturating_add(1);
        }
        b
    }

    /// Runs the DMA descriptor at guest address `addr`. Whatever the guest
    /// wrote there, the transfer ends with the control word cleared or
    /// holding the error bit; nothing here can fail the VMM.
    fn dma(&mut self, addr: u64) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        let mut desc = [0u8; DMA_DESCRIPTOR as usize];
        if mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
            return;
        }
        let word = |i: usize| u32::from_be_bytes([desc[i], desc[i + 1], desc[i + 2], desc[i + 3]]);
        let control = word(0);
        let length = word(4) as usize;
        let target = u64::from_be_bytes(desc[8..16].try_into().unwrap_or([0; 8]));
        let mut result = 0u32;
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let item = self.items.get(&self.selector).cloned();
        if control & DMA_WRITE != 0 {
            result = DMA_ERROR;
        } else if control & DMA_READ != 0 {
            let data = item.as_deref().map_or(&[][..], |v| v.as_slice());
            let start = self.offset.min(data.len());
            let avail = (data.len() - start).min(length);
            let mut buf = data[start..start + avail].to_vec();
            // Reads past the end of an item give zeros.
            buf.resize(length, 0);
            if mem.write_slice(&buf, GuestAddress(target)).is_err() {
                result = DMA_ERROR;
            }
            self.offset = self.offset.saturating_add(length);
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length);
        }
        let _ = mem.write_slice(&result.to_be_bytes(), GuestAddress(addr));
    }
}

/// Saved fw_cfg registers (version 1). The items are not saved: they are
/// rebuilt from the configuration, as a firmware reboot would read them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FwCfgStateV1 {
    /// The selected item.
    pub selector: u16,
    /// The read position within it.
    pub offset: u64,
    /// The DMA address register's high half, written and not yet used.
    pub dma_high: u32,
}

impl crate::persist::Persist for FwCfg {
    const KIND: &'static str = "fw_cfg";
    const VERSION: u32 = 1;
    type State = FwCfgStateV1;

    fn save(&self) -> FwCfgStateV1 {
        FwCfgStateV1 {
            selector: self.selector,
            offset: self.offset as u64,
            dma_high: self.dma_high,
        }
    }

    fn restore(
        &mut self,
        _version: u32,
        s: FwCfgStateV1,
    ) -> Result<(), crate::persist::PersistError> {
        // Any position is harmless (past an item's end reads zeros), but
        // one past 4 GiB was never written by Abide: items are smaller.
        self.offset = usize::try_from(s.offset)
            .ok()
            .filter(|o| (*o as u64) <= u64::from(u32::MAX) + 1)
            .ok_or_else(|| crate::persist::PersistError::Invalid {
                device: Self::KIND,
                reason: format!("read position {} is past any item", s.offset),
            })?;
        self.selector = s.selector;
        self.dma_high = s.dma_high;
        Ok(())
    }
}

/// The selector and data ports.
#[derive(Debug)]
pub struct FwCfgIo(pub Arc<Mutex<FwCfg>>);

impl BusDevice for FwCfgIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            // A string read (`rep insb`) arrives as one access of many bytes.
            1 => data.iter_mut().for_each(|b| *b = d.next_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() >= 2 {
            let key = u16::from_le_bytes([data[0], data[1]]);
            self.0.lock().unwrap_or_else(|e| e.into_inner()).select(key);
        }
        // Writes to the data port are ignored (QEMU 2.4 and later).
    }
}

/// The DMA address register.
#[derive(Debug)]
pub struct FwCfgDma(pub Arc<Mutex<FwCfg>>);

impl BusDevice for FwCfgDma {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| DMA_SIGNATURE.get(o + i).copied())
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_be_bytes(word);
        let mut d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            0 => d.dma_high = v,
            4 => {
                let addr = (u64::from(d.dma_high) << 32) | u64::from(v);
                d.dma_high = 0;
                d.dma(addr);
            }
            _ => {}
        }
    }
}

/// The firmware's debug console (QEMU's `isa-debugcon`): bytes written go
/// to a sink; a read returns 0xe9, which is how SeaBIOS finds the port.
pub struct DebugPort {
    out: Box<dyn std::io::Write + Send>,
}

impl std::fmt::Debug for DebugPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugPort").finish_non_exhaustive()
    }
}

/// What a read of the debug port returns (QEMU's readback value).
pub const DEBUGCON_READBACK: u8 = 0xe9;

impl DebugPort {
    /// A port writing to `out`.
    pub fn new(out: Box<dyn std::io::Write + Send>) -> Self {
        Self { out }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUGCON_READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // A failing sink must not stop the guest.
        let _ = self.out.write_all(data);
        if data.contains(&b'\n') {
            let _ = self.out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(mem: Option<GuestMem>) -> Arc<Mutex<FwCfg>> {
        Arc::new(Mutex::new(
            FwCfg::new(
                vec![(0x05, 2u16.to_le_bytes().to_vec())],
                vec![
                    ("etc/e820".into(), vec![1, 2, 3]),
                    ("bootorder".into(), vec![]),
                ],
                mem,
            )
            .expect("builds"),
        ))
    }

    fn read_item(io: &mut FwCfgIo, key: u16, len: usize) -> Vec<u8> {
        io.write(0, &key.to_le_bytes());
        let mut out = vec![0; len];
        io.read(1, &mut out);
        out
    }

    #[test]
    fn signature_id_and_directory() {
        let d = dev(None);
        let mut io = FwCfgIo(d.clone());
        assert_eq!(read_item(&mut io, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut io, FW_CFG_ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut io, 0x05, 2), [2, 0]);
        let dir = read_item(&mut io, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        assert_eq!(&dir[4..8], &[0, 0, 0, 3], "size of etc/e820");
        assert_eq!(&dir[8..10], &[0, 0x20], "its key");
        assert_eq!(&dir[12..20], b"etc/e820");
        assert_eq!(&dir[68 + 4..68 + 6], &[0, 0x21]);
        assert_eq!(read_item(&mut io, 0x20, 5), [1, 2, 3, 0, 0]);
        // An unknown key reads as zeros.
        assert_eq!(read_item(&mut io, 0x1234, 2), [0, 0]);
    }

    #[test]
    fn registers_survive_a_snapshot_and_bad_state_is_refused() {
        use crate::persist::Persist;
        let d = dev(None);
        let mut io = FwCfgIo(d.clone());
        io.write(0, &0x20u16.to_le_bytes());
        let mut b = [0u8; 1];
        io.read(1, &mut b);
        assert_eq!(b, [1]);
        FwCfgDma(d.clone()).write(0, &7u32.to_be_bytes());
        let (v, bytes) = d.lock().expect("lock").save_section();
        // A new device (as a restore builds it) goes on where this one was.
        let e = dev(None);
        e.lock()
            .expect("lock")
            .restore_section(v, &bytes)
            .expect("restore");
        let mut io = FwCfgIo(e.clone());
        io.read(1, &mut b);
        assert_eq!(b, [2], "the second byte of etc/e820");
        assert_eq!(e.lock().expect("lock").dma_high, 7);
        let mut bad = e.lock().expect("lock").save();
        bad.offset = u64::MAX;
        let bytes = serde_json::to_vec(&bad).expect("json");
        let err = e
            .lock()
            .expect("lock")
            .restore_section(1, &bytes)
            .expect_err("an offset past any item");
        assert!(err.to_string().contains("past any item"), "{err}");
    }

    #[test]
    fn bad_items_are_refused() {
        let long = "x".repeat(FW_CFG_MAX_NAME);
        assert!(matches!(
            FwCfg::new(vec![], vec![(long, vec![])], None),
            Err(FwCfgError::NameTooLong(_))
        ));
        assert!(matches!(
            FwCfg::new(
                vec![],
                vec![("a".into(), vec![]), ("a".into(), vec![])],
                None
            ),
            Err(FwCfgError::Duplicate(_))
        ));
    }

    #[test]
    fn dma_read_skip_write_and_bad_addresses() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        let d = dev(Some(mem.clone()));
        let mut io = FwCfgIo(d.clone());
        assert_eq!(read_item(&mut io, FW_CFG_ID, 4), [3, 0, 0, 0]);
        let mut dma = FwCfgDma(d.clone());
        let mut sig = [0u8; 8];
        dma.read(0, &mut sig);
        assert_eq!(&sig, DMA_SIGNATURE);
        let desc = |control: u32, len: u32, target: u64| {
            let mut b = control.to_be_bytes().to_vec();
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&target.to_be_bytes());
            mem.write_slice(&b, GuestAddress(0x100)).expect("write");
        };
        let control = || {
            let mut c = [0u8; 4];
            mem.read_slice(&mut c, GuestAddress(0x100)).expect("read");
            u32::from_be_bytes(c)
        };
        // Select etc/e820, skip one byte, read four (the last is padding).
        desc((0x20 << 16) | DMA_SELECT | DMA_SKIP, 1, 0);
        dma.write(4, &0x100u32.to_be_bytes());
        assert_eq!(control(), 0);
        desc(DMA_READ, 4, 0x200);
        dma.write(4, &0x100u32.to_be_bytes());
        assert_eq!(control(), 0);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x200)).expect("read");
        assert_eq!(got, [2, 3, 0, 0]);
        // Writes are refused; so is a target outside RAM.
        desc(DMA_WRITE, 4, 0x200);
        dma.write(4, &0x100u32.to_be_bytes());
        assert_eq!(control(), DMA_ERROR);
        desc((0x20 << 16) | DMA_SELECT | DMA_READ, 4, 0xffff_0000);
        dma.write(4, &0x100u32.to_be_bytes());
        assert_eq!(control(), DMA_ERROR);
        // A descriptor outside RAM is ignored, without a panic.
        dma.write(0, &1u32.to_be_bytes());
        dma.write(4, &0u32.to_be_bytes());
    }
}
