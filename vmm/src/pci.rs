//! Builds PCI bus 0 from the machine description: host bridge, config
//! access (ports and ECAM), and BAR windows.

use std::sync::{Arc, Mutex};

use abide_devices::legacy::ResetControl;
use abide_devices::pci::{HostBridge, PciConfigIo, PciEcam, PciFunction, PciRoot, Windows};
use abide_devices::{Bus, BusError, ExitSignal};
use abide_machines::MachineDescription;

/// Errors building the PCI platform.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// Config access window could not be placed.
    #[error("cannot place the PCI {0} on its bus")]
    Bus(&'static str, #[source] BusError),
    /// A function could not be added.
    #[error("cannot add PCI function {name} at slot {slot}")]
    Add {
        /// Function name.
        name: String,
        /// Slot.
        slot: u8,
        /// Cause.
        #[source]
        source: abide_devices::pci::root::PciError,
    },
    /// BAR allocation failed.
    #[error(transparent)]
    Alloc(#[from] abide_devices::pci::AllocError),
}

/// Whether the machine's reset register sits inside the PCI config ports
/// (the PIIX-style 0xCF9), in which case the config device carries it.
pub fn reset_in_config_ports(machine: &MachineDescription) -> bool {
    let base = machine.pci.config_io_port;
    (base..base + 8).contains(&machine.legacy.reset.port)
}

/// A virtio function on the bus, kept for describing it.
#[derive(Debug, Clone)]
pub struct VirtioFunction {
    /// Slot.
    pub slot: u8,
    /// Model name (virtio-blk, …).
    pub model: &'static str,
    /// The function.
    pub function: Arc<Mutex<abide_devices::virtio::pci::VirtioPci>>,
}

/// PCI bus 0 of a VM.
#[derive(Debug)]
pub struct PciPlatform {
    /// The root bus.
    pub root: Arc<Mutex<PciRoot>>,
    /// Virtio functions, in the order they were added.
    pub virtio: Mutex<Vec<VirtioFunction>>,
}

impl PciPlatform {
    /// Creates bus 0 with the host bridge and places the config mechanisms.
    pub fn new(
        machine: &MachineDescription,
        pio: &Arc<Bus>,
        mmio: &Arc<Bus>,
        exit: &ExitSignal,
    ) -> Result<Self, PciSetupError> {
        let p = &machine.pci;
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), pio.clone())));
        let bridge: Arc<Mutex<dyn PciFunction>> =
            Arc::new(Mutex::new(HostBridge::new(p.host_bridge)));
        root.lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(0, bridge)
            .map_err(|source| PciSetupError::Add {
                name: "host bridge".into(),
                slot: 0,
                source,
            })?;
        let reset: Option<Box<dyn abide_devices::BusDevice>> = if reset_in_config_ports(machine) {
            Some(Box::new(ResetControl::new(
                machine.legacy.reset,
                exit.clone(),
            )))
        } else {
            None
        };
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone(), reset))),
            u64::from(p.config_io_port),
            8,
        )
        .map_err(|e| PciSetupError::Bus("configuration ports", e))?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            p.ecam_base,
            p.ecam_size,
        )
        .map_err(|e| PciSetupError::Bus("ECAM window", e))?;
        Ok(Self {
            root,
            virtio: Mutex::new(Vec::new()),
        })
    }

    /// The virtio functions, in the order they were added.
    pub fn virtio_functions(&self) -> Vec<VirtioFunction> {
        self.virtio
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the first 256 bytes of a slot's configuration space.
    pub fn config_space(&self, slot: u8) -> Vec<u8> {
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = vec![0u8; 256];
        for (i, chunk) in out.chunks_mut(4).enumerate() {
            root.config_read(
                abide_devices::pci::root::ConfigAddress {
                    bus: 0,
                    device: slot,
                    function: 0,
                    offset: i * 4,
                },
                chunk,
            );
        }
        out
    }

    /// Adds a function at `slot`.
    pub fn add(
        &self,
        name: &str,
        slot: u8,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<(), PciSetupError> {
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(slot, function)
            .map_err(|source| PciSetupError::Add {
                name: name.into(),
                slot,
                source,
            })
    }

    /// Assigns BAR addresses once every function is present.
    pub fn assign_resources(&self, machine: &MachineDescription) -> Result<(), PciSetupError> {
        let p = &machine.pci;
        let windows = Windows {
            mmio32: (p.mmio32_base, p.mmio32_size),
            mmio64: (p.mmio64_base, p.mmio64_size),
            io: (u64::from(p.io_base), u64::from(p.io_size)),
        };
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assign_resources(&windows, machine.bar_placement)?;
        Ok(())
    }
}
