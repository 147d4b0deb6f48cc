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

/// Guest memory as the devices (and the rest of Abide) see it: the mapped
/// RAM regions, each with a dirty bitmap that every write made through
/// vm-memory marks (virtio-blk reads, virtio-net receive, used rings). Live
/// migration reads these bitmaps to find the pages Abide itself wrote,
/// which KVM's dirty log never shows. The one place this type is chosen.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
