//! The PCI platform: configuration space, bus 0, config access mechanisms.

pub mod config;
pub mod root;

pub use config::{BarKind, BarSpec, PciConfig, PciIds};
pub use root::{PciConfigIo, PciEcam, PciFunction, PciRoot};
