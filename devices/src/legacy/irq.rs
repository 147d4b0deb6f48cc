//! An interrupt line backed by an eventfd that the VMM wires to a KVM irqfd.

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line: each [`IrqLine::trigger`] pulses the GSI
/// the eventfd is registered for.
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
}

impl IrqLine {
    /// A new, unregistered line.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Another handle on the same line.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            evt: self.evt.try_clone()?,
        })
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
