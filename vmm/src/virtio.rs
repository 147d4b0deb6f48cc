//! Builds virtio-pci functions from the machine's device models and the
//! user's device options, and attaches them to PCI bus 0.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use abide_devices::pci::msix::{MsiController, MsiMessage};
use abide_devices::virtio::blk::{Block, BlockParams};
use abide_devices::virtio::net::{Detached, Net, NetParams, Tap};
use abide_devices::virtio::rng::{Rng, RngParams};

use abide_devices::legacy::IrqLine;
use abide_devices::pci::PciFunction;
use abide_devices::virtio::pci::{NotifyRegistrar, VirtioPci, VirtioPciParams};
use abide_devices::virtio::VirtioDevice;
use abide_devices::GuestMem;
use abide_machines::{MachineDescription, VirtioModel};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::backends::Backends;
use crate::devices_config::NetBackend;
use crate::intx::Resampler;
use crate::irq::{GsiRouter, IrqError, MsiVectors};
use crate::pci::{PciPlatform, PciSetupError};

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
    /// The device model refused its parameters.
    #[error("cannot create {name} for machine type '{machine}'")]
    Device {
        /// Device name.
        name: String,
        /// Machine type.
        machine: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The tap could not be opened.
    #[error("{name}: cannot open the tap device (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tap {
        /// Device name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A NIC's host side: a second handle on its tap and the guest's MAC, for
/// frames the VMM sends itself (the announcement after a migration).
pub type NetPort = (Tap, [u8; 6]);

/// Creates every device the user asked for and attaches it at its slot.
/// Returns the taps of the network cards.
pub fn attach_all(ctx: &VirtioAttach<'_>, b: Backends) -> Result<Vec<NetPort>, crate::Error> {
    let mut ports = Vec::new();
    let models = &ctx.machine.virtio;
    for (i, d) in b.disks.into_iter().enumerate() {
        let name = format!("virtio-blk #{i} ({})", d.config.path.display());
        let mut params = BlockParams::new(d.file, &models.blk, models.blk_config);
        params.read_only = d.config.readonly;
        params.serial = d.config.serial.clone();
        params.direct = d.config.direct;
        let dev = Block::new(params).map_err(|source| ctx.device_error(&name, source))?;
        ctx.attach(
            &name,
            "virtio-blk",
            &models.blk,
            d.slot,
            Box::new(dev),
            None,
        )?;
    }
    for (i, n) in b.nets.into_iter().enumerate() {
        let name = format!("virtio-net #{i}");
        let dev: Box<dyn VirtioDevice> = if ctx.wiring.connects_networks() {
            let tap = match &n.config.backend {
                NetBackend::Tap(ifname) => Tap::open(ifname),
                NetBackend::Fd(fd) => open_tap_fd(*fd),
            }
            .map_err(|source| VirtioSetupError::Tap {
                name: name.clone(),
                source,
            })?;
            let port = tap.try_clone().map_err(|source| VirtioSetupError::Tap {
                name: name.clone(),
                source,
            })?;
            ports.push((port, n.mac));
            net_device(ctx, &name, tap, n.mac)?
        } else {
            let detached = Detached::new().map_err(|source| VirtioSetupError::Tap {
                name: name.clone(),
                source,
            })?;
            net_device(ctx, &name, detached, n.mac)?
        };
        ctx.attach(&name, "virtio-net", &models.net, n.slot, dev, n.rom)?;
    }
    if let Some(slot) = b.rng_slot {
        let dev = Rng::new(RngParams::new(&models.rng))
            .map_err(|source| ctx.device_error("virtio-rng", source))?;
        ctx.attach(
            "virtio-rng",
            "virtio-rng",
            &models.rng,
            slot,
            Box::new(dev),
            None,
        )?;
    }
    Ok(ports)
}

fn net_device<B: abide_devices::virtio::net::NetBackend>(
    ctx: &VirtioAttach<'_>,
    name: &str,
    backend: B,
    mac: [u8; 6],
) -> Result<Box<dyn VirtioDevice>, VirtioSetupError> {
    let models = &ctx.machine.virtio;
    let params = NetParams::new(backend, mac, &models.net, models.net_config);
    let dev = Net::new(params).map_err(|source| ctx.device_error(name, source))?;
    Ok(Box::new(dev))
}

/// Takes ownership of a tap fd an orchestrator passed in. A descriptor that
/// is not an open tap is refused and left alone (it may be one of abide's
/// own: closing it would break the VMM).
fn open_tap_fd(fd: i32) -> std::io::Result<Tap> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if !abide_devices::virtio::net::is_tap(fd) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("file descriptor {fd} is not a tap device"),
        ));
    }
    // SAFETY: the fd is open (checked above) and the user handed it to
    // abide for this device; nothing else in abide owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Tap::from_fd(owned)
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

/// How a function's interrupts and notifications reach the hypervisor.
pub trait Wiring {
    /// MSI-X delivery for `vectors` vectors.
    fn msi(&self, vectors: u16) -> Result<Arc<dyn MsiController>, IrqError>;
    /// An INTx line on `gsi`; `resample` runs after each EOI.
    fn intx(&self, gsi: u32, resample: Box<dyn Fn() + Send>) -> std::io::Result<IrqLine>;
    /// ioeventfd registration for queue notifications.
    fn notify(&self) -> Option<Arc<dyn NotifyRegistrar>>;
    /// Whether network cards get their real host side (taps).
    fn connects_networks(&self) -> bool;
}

/// Wiring to a running KVM VM.
pub struct KvmWiring<'a> {
    /// VM.
    pub vm: &'a Arc<VmFd>,
    /// GSI routing.
    pub router: &'a Arc<GsiRouter>,
    /// INTx resample thread.
    pub resampler: &'a Resampler,
}

impl Wiring for KvmWiring<'_> {
    fn msi(&self, vectors: u16) -> Result<Arc<dyn MsiController>, IrqError> {
        Ok(Arc::new(MsiVectors::new(
            self.vm,
            self.router.clone(),
            vectors,
        )?))
    }

    fn intx(&self, gsi: u32, resample: Box<dyn Fn() + Send>) -> std::io::Result<IrqLine> {
        let line = IrqLine::new()?;
        let resample_fd = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm
            .register_irqfd_with_resample(line.eventfd(), &resample_fd, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.resampler.add(resample_fd, resample)?;
        Ok(line)
    }

    fn notify(&self) -> Option<Arc<dyn NotifyRegistrar>> {
        Some(Arc::new(KvmNotify(self.vm.clone())))
    }

    fn connects_networks(&self) -> bool {
        true
    }
}

/// Wiring to nothing: builds functions only to describe them (`abide manifest`).
#[derive(Debug, Default)]
pub struct DetachedWiring;

struct NoMsi;

impl MsiController for NoMsi {
    fn set_route(&self, _: u16, _: Option<MsiMessage>) -> std::io::Result<()> {
        Ok(())
    }
    fn trigger(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
}

impl Wiring for DetachedWiring {
    fn msi(&self, _vectors: u16) -> Result<Arc<dyn MsiController>, IrqError> {
        Ok(Arc::new(NoMsi))
    }
    fn intx(&self, _gsi: u32, _resample: Box<dyn Fn() + Send>) -> std::io::Result<IrqLine> {
        IrqLine::new()
    }
    fn notify(&self) -> Option<Arc<dyn NotifyRegistrar>> {
        None
    }
    fn connects_networks(&self) -> bool {
        false
    }
}

/// Shared context for attaching virtio devices.
pub struct VirtioAttach<'a> {
    /// Machine.
    pub machine: &'a MachineDescription,
    /// Interrupt and notification wiring.
    pub wiring: &'a dyn Wiring,
    /// Guest memory.
    pub mem: &'a GuestMem,
    /// Bus 0.
    pub pci: &'a PciPlatform,
}

impl VirtioAttach<'_> {
    /// The error for `name`'s device model refusing what the machine
    /// declares (or its other parameters).
    fn device_error(
        &self,
        name: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> VirtioSetupError {
        VirtioSetupError::Device {
            name: name.to_string(),
            machine: self.machine.name.clone(),
            source: Box::new(source),
        }
    }

    /// Wraps `device` (of `model`) in virtio-pci at `slot`, with an optional ROM image.
    pub fn attach(
        &self,
        name: &str,
        kind: &'static str,
        model: &VirtioModel,
        slot: u8,
        device: Box<dyn VirtioDevice>,
        rom: Option<(u64, Vec<u8>)>,
    ) -> Result<(), VirtioSetupError> {
        let named = |s: &str| s.to_string();
        let msi = self
            .wiring
            .msi(model.msix_vectors)
            .map_err(|source| VirtioSetupError::Irq {
                name: named(name),
                source,
            })?;
        let function = VirtioPci::new(
            device,
            VirtioPciParams {
                ids: model.pci,
                intx_pin: model.intx_pin,
                layout: self.machine.virtio.layout,
                msix_vectors: model.msix_vectors,
                msi,
                intx: None,
                mem: self.mem.clone(),
                rom,
                notify: self.wiring.notify(),
            },
        )
        .map_err(|source| VirtioSetupError::Transport {
            name: named(name),
            source,
        })?;
        // The model's pin of this slot, per the machine's swizzle (the
        // transport checked the pin is 0..=4; 0 is no INTx).
        if let Some(pin) = model.intx_pin.checked_sub(1) {
            let swizzled = (usize::from(slot) + usize::from(pin)) % 4;
            let gsi = self.machine.pci.intx_gsis[swizzled];
            let line = self
                .wiring
                .intx(gsi, function.intx_resample())
                .map_err(|source| VirtioSetupError::Intx {
                    name: named(name),
                    source,
                })?;
            function.set_intx(line);
        }
        let typed = Arc::new(Mutex::new(function));
        let function: Arc<Mutex<dyn PciFunction>> = typed.clone();
        self.pci.add(name, slot, function)?;
        self.pci
            .virtio
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(crate::pci::VirtioFunction {
                slot,
                model: kind,
                function: typed,
            });
        Ok(())
    }
}
