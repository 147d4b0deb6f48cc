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

/// Stack size of every thread Abide starts (1 MiB; Rust's default is
/// 2 MiB). Where transparent huge pages are `always` (the nested test host's
/// kernel), a 2 MiB stack that happens to be 2 MiB-aligned gets one huge page
/// on its first touch: 2 MiB of the VMM's RSS for a few KiB of stack. A stack
/// under 2 MiB can never hold an aligned huge page. Abide's threads keep
/// their buffers on the heap and need well under 100 KiB.
pub const THREAD_STACK_SIZE: usize = 1 << 20;

/// A thread builder with Abide's name and stack size: every thread that
/// lives as long as the VM comes from here (the scoped helpers of a save or
/// an eager restore are gone within the call that starts them).
pub fn thread(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK_SIZE)
}

/// Guest memory as the devices (and the rest of Abide) see it: the mapped
/// RAM regions, each with a dirty bitmap that every write made through
/// vm-memory marks (virtio-blk reads, virtio-net receive, used rings). Live
/// migration reads these bitmaps to find the pages Abide itself wrote,
/// which KVM's dirty log never shows. The one place this type is chosen.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
