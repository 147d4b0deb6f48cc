//! Builds virtio-pci functions from the machine's device models and the
//! user's device options, and attaches them to PCI bus 0.

use std::sync::{Arc, Mutex};

use abide_devices::legacy::IrqLine;
use abide_devices::pci::PciFunction;
use abide_devices::virtio::pci::{NotifyRegistrar, VirtioPci, VirtioPciLayout, VirtioPciParams};
use abide_devices::virtio::VirtioDevice;
use abide_machines::{MachineDescription, VirtioBarLayout, VirtioModel};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::{GsiRouter, IrqError, MsiVectors};
use crate::pci::{ids, PciPlatform, PciSetupError};

/// Errors attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// Interrupt setup.
    #[error("cannot set up interrupts for {name}")]
    Irq {
        /// Device name.
        name: String,
        /// Cause.
        #[source]
        source: IrqError,
    },
    /// INTx line.
    #[error("cannot wire the INTx line of {name}")]
    Intx {
        /// Device name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Transport.
    #[error("cannot build the PCI function of {name}")]
    Transport {
        /// Device name.
        name: String,
        /// Cause.
        #[source]
        source: abide_devices::virtio::pci::VirtioPciError,
    },
    /// Placement.
    #[error(transparent)]
    Pci(#[from] PciSetupError),
}

/// ioeventfd registration through KVM.
struct KvmNotify(Arc<VmFd>);

impl NotifyRegistrar for KvmNotify {
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn layout(l: &VirtioBarLayout) -> VirtioPciLayout {
    VirtioPciLayout {
        bar_size: l.bar_size,
        common: l.common,
        isr: l.isr,
        device: l.device,
        notify: l.notify,
        notify_multiplier: l.notify_multiplier,
        msix_table: l.msix_table,
        msix_pba: l.msix_pba,
    }
}

/// Shared context for attaching virtio devices.
pub struct VirtioAttach<'a> {
    /// Machine.
    pub machine: &'a MachineDescription,
    /// VM.
    pub vm: &'a Arc<VmFd>,
    /// GSI routing.
    pub router: &'a Arc<GsiRouter>,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Bus 0.
    pub pci: &'a PciPlatform,
}

impl VirtioAttach<'_> {
    /// Wraps `device` (of `model`) in virtio-pci at `slot`, with an optional ROM image.
    pub fn attach(
        &self,
        name: &str,
        model: &VirtioModel,
        slot: u8,
        device: Box<dyn VirtioDevice>,
        rom: Option<Vec<u8>>,
    ) -> Result<(), VirtioSetupError> {
        let named = |s: &str| s.to_string();
        let msi = MsiVectors::new(self.vm, self.router.clone(), model.msix_vectors).map_err(
            |source| VirtioSetupError::Irq {
                name: named(name),
                source,
            },
        )?;
        // INTA# of this slot, per the machine's swizzle.
        let gsi = self.machine.pci.intx_gsis[usize::from(slot) % 4];
        let intx = IrqLine::new().map_err(|source| VirtioSetupError::Intx {
            name: named(name),
            source,
        })?;
        self.vm
            .register_irqfd(intx.eventfd(), gsi)
            .map_err(|e| VirtioSetupError::Intx {
                name: named(name),
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        let rom = match (model.rom_slot, rom) {
            (Some(slot_size), Some(image)) => Some((slot_size, image)),
            _ => None,
        };
        let function = VirtioPci::new(
            device,
            VirtioPciParams {
                ids: ids(&model.pci),
                layout: layout(&self.machine.virtio.layout),
                msix_vectors: model.msix_vectors,
                msi: Arc::new(msi),
                intx: Some(intx),
                mem: self.mem.clone(),
                rom,
                notify: Some(Arc::new(KvmNotify(self.vm.clone()))),
            },
        )
        .map_err(|source| VirtioSetupError::Transport {
            name: named(name),
            source,
        })?;
        let function: Arc<Mutex<dyn PciFunction>> = Arc::new(Mutex::new(function));
        self.pci.add(name, slot, function)?;
        Ok(())
    }
}
