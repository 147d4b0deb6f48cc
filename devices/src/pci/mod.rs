//! The PCI platform: configuration space, bus 0, config access mechanisms.

pub mod config;
pub mod host_bridge;
pub mod msix;
pub mod root;

pub use config::{BarKind, BarSpec, PciConfig, PciIds};
pub use host_bridge::HostBridge;
pub use root::{AllocError, PciConfigIo, PciEcam, PciFunction, PciRoot, Windows};
