//! Device models behind one bus trait.
//!
//! Every device implements [`BusDevice`] and is placed on a [`Bus`] (one for
//! port I/O, one for MMIO). The vCPU loop only dispatches to buses; it never
//! knows a port or address itself. Every guest-visible value (ports, IRQs,
//! register defaults, PCI identities, virtio queues, features and
//! configuration) comes from the machine description; a model given a value
//! it cannot implement refuses it ([`ModelError`]).

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod model;
pub mod pci;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitReason, ExitSignal};
pub use model::ModelError;
