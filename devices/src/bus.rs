//! A bus of devices keyed by address ranges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a [`Bus`].
///
/// `offset` is relative to the base the device was inserted at; `data.len()`
/// is the access width (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    /// Guest read.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors placing devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps a device already at {other:#x}+{other_len:#x}")]
    Overlap {
        /// New base.
        base: u64,
        /// New length.
        len: u64,
        /// Existing base.
        other: u64,
        /// Existing length.
        other_len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A shared, lockable device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices. Lookups take a read lock; devices are
/// locked individually, so two vCPUs touching different devices never wait
/// for each other. Lock order: bus map, then one device.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(map.iter().map(|(b, e)| (b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // The closest device below `end` is the only one that can overlap.
        if let Some((&other, e)) = map.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other,
                    other_len: e.len,
                });
            }
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device at exactly `base`. Returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).is_some()
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = map.range(..=addr).next_back()?;
        (addr - base < e.len).then(|| (addr - base, Arc::clone(&e.device)))
    }

    /// Dispatches a read. Returns false (and fills `data` with all-ones, as
    /// an unclaimed ISA/PCI cycle reads) when nothing is at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false when nothing is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    fn echo() -> Arc<Mutex<Echo>> {
        Arc::new(Mutex::new(Echo { last: vec![] }))
    }

    #[test]
    fn dispatches_by_offset() {
        let bus = Bus::new();
        let dev = echo();
        bus.insert(dev.clone(), 0x3f8, 8).expect("insert");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(dev.lock().expect("lock").last, vec![(0, vec![7])]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0x3f7, &mut b));
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let bus = Bus::new();
        bus.insert(echo(), 0x100, 0x10).expect("insert");
        assert!(matches!(
            bus.insert(echo(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(echo(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(echo(), 0xf8, 0x8).is_ok());
        assert!(bus.insert(echo(), 0x110, 1).is_ok());
        assert!(matches!(
            bus.insert(echo(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(echo(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(bus.remove(0x100));
        assert!(bus.insert(echo(), 0x108, 8).is_ok());
    }
}
