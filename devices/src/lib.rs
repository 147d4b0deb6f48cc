//! Device models behind one bus trait.
//!
//! Every device implements [`BusDevice`] and is placed on a [`Bus`] (one for
//! port I/O, one for MMIO). The vCPU loop only dispatches to buses; it never
//! knows a port or address itself. Guest-visible parameters (ports, IRQs)
//! come from the machine description.

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitReason, ExitSignal};
