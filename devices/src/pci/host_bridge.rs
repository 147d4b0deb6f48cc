//! The host bridge at 00:00.0: configuration header only.

use crate::pci::config::{PciConfig, PciIds};
use crate::pci::root::PciFunction;

/// A host bridge with the identity the machine gives it.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// A bridge with `ids` and no interrupt pin.
    pub fn new(ids: PciIds) -> Self {
        Self {
            config: PciConfig::new(ids, 0),
        }
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}
