//! The host bridge at 00:00.0: configuration header only.

use crate::pci::config::{PciConfig, PciIds};
use crate::pci::root::PciFunction;
use crate::persist::{Persist, PersistError};

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
    fn save_state(&self) -> Result<(u32, Vec<u8>), PersistError> {
        Ok(self.save_section())
    }
    fn state_version(&self) -> crate::persist::Needed {
        self.oldest_version()
    }
    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), PersistError> {
        self.restore_section(version, bytes)
    }
}

/// Saved host bridge state (version 1): its configuration registers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostBridgeStateV1 {
    /// Configuration space dwords ([`PciConfig::save_regs`]).
    pub regs: Vec<u32>,
}

impl Persist for HostBridge {
    const KIND: &'static str = "pci-host-bridge";
    const VERSION: u32 = 1;
    type State = HostBridgeStateV1;

    fn save(&self) -> HostBridgeStateV1 {
        HostBridgeStateV1 {
            regs: self.config.save_regs(),
        }
    }

    fn restore(&mut self, _version: u32, s: HostBridgeStateV1) -> Result<(), PersistError> {
        self.config
            .restore_regs(&s.regs)
            .map_err(|reason| PersistError::Invalid {
                device: Self::KIND,
                reason,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x8086,
            device: 0x29c0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            revision: 0,
            class: 0x06_0000,
        }
    }

    #[test]
    fn state_round_trips() {
        let mut a = HostBridge::new(ids());
        // Cache line size and latency timer are guest-writable storage.
        a.config_mut().write(0x0c, &[0x10, 0x40]);
        a.config_mut().write(0x04, &[0x06]);
        let (v, bytes) = a.save_state().expect("save");
        assert_eq!(v, 1);
        let mut b = HostBridge::new(ids());
        assert_ne!(b.config().save_regs(), a.config().save_regs());
        b.restore_state(v, &bytes).expect("restore");
        assert_eq!(b.config().save_regs(), a.config().save_regs());
        let mut c = [0u8; 2];
        b.config().read(0x0c, &mut c);
        assert_eq!(c, [0x10, 0x40]);
        assert!(matches!(
            b.restore_state(2, &bytes),
            Err(PersistError::NewerVersion { .. })
        ));
        assert!(matches!(
            b.restore_state(1, b"{"),
            Err(PersistError::Malformed { .. })
        ));
        let mut short = a.save();
        short.regs.pop();
        assert!(matches!(
            b.restore(1, short),
            Err(PersistError::Invalid { .. })
        ));
    }
}
