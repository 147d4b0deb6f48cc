//! The virtio-pci (modern, virtio 1.x) transport.
//!
//! BAR 0 (64-bit memory) holds, at offsets from [`VirtioPciLayout`]: the
//! common configuration, the ISR byte, the device configuration, the queue
//! notification area and the MSI-X table and pending-bit array. Each region
//! is announced by a vendor capability in config space.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::legacy::IrqLine;
use crate::pci::config::{BarKind, BarSpec, PciConfig, PciIds};
use crate::pci::msix::{MsiController, Msix, MsixState};
use crate::pci::PciFunction;
use crate::persist::{Persist, PersistError};
use crate::virtio::{
    status, ActivateError, Activation, ActiveQueue, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;
const VENDOR_CAP: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// `pci_cfg_data` within the `VIRTIO_PCI_CAP_PCI_CFG` capability.
const PCI_CFG_DATA: usize = 16;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;
/// Length of the common configuration this transport implements: the
/// virtio 1.0 layout, through `queue_device`.
pub const COMMON_CFG_LEN: u32 = 0x38;

/// Where the transport's regions sit in BAR 0, as the machine description
/// gives it. Guest-visible.
pub use abide_machines::VirtioBarLayout as VirtioPciLayout;
use abide_machines::VirtioCap;

/// Registers queue-notification eventfds with the hypervisor so that a
/// guest's notify write signals the eventfd without a VM exit to userspace.
pub trait NotifyRegistrar: Send + Sync {
    /// Signal `fd` on guest writes to MMIO `addr`.
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Undo [`NotifyRegistrar::register`].
    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
}

/// The guest-visible facts of a virtio function beyond its config space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioDescription {
    /// Virtio device type.
    pub device_type: u16,
    /// Features offered.
    pub features: u64,
    /// Maximum size of each queue.
    pub queue_sizes: Vec<u16>,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// Device configuration space.
    pub config: Vec<u8>,
}

/// Everything the transport needs besides the device model.
pub struct VirtioPciParams {
    /// PCI identity.
    pub ids: PciIds,
    /// Interrupt pin in config space (0 = none, 1..=4 = INTA#..INTD#).
    pub intx_pin: u8,
    /// BAR layout.
    pub layout: VirtioPciLayout,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// MSI-X delivery.
    pub msi: Arc<dyn MsiController>,
    /// INTx line (of `intx_pin`), used while MSI-X is disabled.
    pub intx: Option<IrqLine>,
    /// Guest memory.
    pub mem: GuestMem,
    /// Expansion ROM: slot size and image (image no larger than the slot).
    pub rom: Option<(u64, Vec<u8>)>,
    /// ioeventfd registration for notifications (None: notifications go
    /// through the MMIO exit path).
    pub notify: Option<Arc<dyn NotifyRegistrar>>,
}

/// Interrupt state shared with the device's worker thread.
struct Interrupts {
    msix: Mutex<Msix>,
    queue_vectors: Mutex<Vec<u16>>,
    config_vector: Mutex<u16>,
    isr: AtomicU8,
    status: AtomicU8,
    intx: std::sync::OnceLock<IrqLine>,
    metrics: Arc<super::metrics::DeviceMetrics>,
}

impl Interrupts {
    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        let delivered = vector != super::pci::NO_VECTOR
            && self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify(vector);
        if !delivered {
            if let Some(l) = self.intx.get() {
                let _ = l.trigger();
            }
        }
    }
}

impl VirtioInterrupt for Interrupts {
    fn signal_used_queue(&self, index: u16) {
        let v = self
            .queue_vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(usize::from(index))
            .copied()
            .unwrap_or(NO_VECTOR);
        self.raise(v, ISR_QUEUE);
    }

    fn signal_config_change(&self) {
        let v = *self.config_vector.lock().unwrap_or_else(|e| e.into_inner());
        self.raise(v, ISR_CONFIG);
    }

    fn set_needs_reset(&self) {
        self.status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        self.metrics.needs_reset();
        self.signal_config_change();
    }

    fn metrics(&self) -> Arc<super::metrics::DeviceMetrics> {
        self.metrics.clone()
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: PciConfig,
    layout: VirtioPciLayout,
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    irq: Arc<Interrupts>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    active: bool,
    rom: Option<Vec<u8>>,
    msix_cap: usize,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability (0: none).
    pci_cfg_cap: usize,
    notify: Option<Arc<dyn NotifyRegistrar>>,
    /// BAR 0 base at which the kick eventfds are registered.
    notify_base: Option<u64>,
    /// The active device is paused; `queues` hold its progress.
    paused: bool,
    /// The device was restored from a snapshot and not resumed since.
    restored: bool,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("type", &self.device.device_type())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Errors building the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// Config space could not be laid out.
    #[error("cannot lay out the virtio PCI function")]
    Config(#[from] crate::pci::config::ConfigError),
    /// Queue creation failed.
    #[error("queue {index}: invalid maximum size {size}")]
    Queue {
        /// Queue index.
        index: usize,
        /// Size.
        size: u16,
    },
    /// eventfd creation.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
    /// The machine declares a transport this one cannot implement.
    #[error(transparent)]
    Model(#[from] crate::virtio::ModelError),
    /// ROM bigger than its slot.
    #[error("option ROM is {rom} bytes but the slot is {slot} bytes")]
    RomTooLarge {
        /// ROM size.
        rom: u64,
        /// Slot size.
        slot: u64,
    },
}

fn vendor_cap(cfg_type: u8, offset: u32, length: u32, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![VENDOR_CAP, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&offset.to_le_bytes());
    c.extend_from_slice(&length.to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

/// Refuses transport values this implementation cannot give a guest.
fn check_transport(p: &VirtioPciParams) -> Result<(), crate::virtio::ModelError> {
    use crate::virtio::ModelError;
    const DEVICE: &str = "virtio-pci";
    if p.layout.common_len != COMMON_CFG_LEN {
        return Err(ModelError::value(
            DEVICE,
            "common_len",
            format!("{:#x}", p.layout.common_len),
            format!("this transport implements the virtio 1.0 common configuration ({COMMON_CFG_LEN:#x} bytes)"),
        ));
    }
    let order = p.layout.cap_order;
    if (0..order.len()).any(|i| order[i + 1..].contains(&order[i])) {
        return Err(ModelError::value(
            DEVICE,
            "cap_order",
            format!("{order:?}"),
            "each capability exactly once",
        ));
    }
    if p.intx_pin > 4 {
        return Err(ModelError::value(
            DEVICE,
            "intx_pin",
            p.intx_pin,
            "PCI has pins 0 (none) and 1..=4 (INTA#..INTD#)",
        ));
    }
    if p.msix_vectors == 0 || p.msix_vectors > 2048 {
        return Err(ModelError::value(
            DEVICE,
            "msix_vectors",
            p.msix_vectors,
            "an MSI-X table has 1 to 2048 entries",
        ));
    }
    Ok(())
}

impl VirtioPci {
    /// Wraps `device` in a PCI function.
    pub fn new(device: Box<dyn VirtioDevice>, p: VirtioPciParams) -> Result<Self, VirtioPciError> {
        check_transport(&p)?;
        let mut config = PciConfig::new(p.ids, p.intx_pin);
        config.set_bar(
            0,
            BarSpec {
                kind: BarKind::Mem64,
                size: p.layout.bar_size,
                prefetchable: false,
            },
        )?;
        let sizes = device.queue_max_sizes();
        let nq = sizes.len() as u32;
        let l = &p.layout;
        let msix = Msix::new(p.msix_vectors, p.msi);
        let mut msix_cap = 0;
        for cap in l.cap_order {
            match cap {
                VirtioCap::Common => {
                    config.add_capability(
                        &vendor_cap(CAP_COMMON, l.common, l.common_len, None),
                        &[],
                    )?;
                }
                VirtioCap::Notify => {
                    config.add_capability(
                        &vendor_cap(
                            CAP_NOTIFY,
                            l.notify,
                            nq * l.notify_multiplier,
                            Some(l.notify_multiplier),
                        ),
                        &[],
                    )?;
                }
                VirtioCap::Isr => {
                    config.add_capability(&vendor_cap(CAP_ISR, l.isr, 1, None), &[])?;
                }
                // Devices without configuration (virtio-rng) must not
                // announce an empty region: drivers reject a zero-length
                // capability.
                VirtioCap::Device if device.config_len() > 0 => {
                    config.add_capability(
                        &vendor_cap(CAP_DEVICE, l.device, device.config_len(), None),
                        &[],
                    )?;
                }
                VirtioCap::Device => {}
                VirtioCap::Msix => {
                    let (cap, writable) = msix.capability(0, l.msix_table, l.msix_pba);
                    msix_cap = config.add_capability(&cap, &writable)?;
                }
            }
        }
        // The driver writes `bar`, `offset` and `length`, then reads or
        // writes `pci_cfg_data` (virtio 1.x, 4.1.4.7).
        let pci_cfg_cap = if l.pci_cfg_window {
            config.add_capability(
                &vendor_cap(CAP_PCI_CFG, 0, 0, Some(0)),
                &[0, 0xff, u32::MAX, u32::MAX, u32::MAX],
            )?
        } else {
            0
        };
        let rom = match p.rom {
            Some((slot, image)) => {
                if image.len() as u64 > slot {
                    return Err(VirtioPciError::RomTooLarge {
                        rom: image.len() as u64,
                        slot,
                    });
                }
                config.set_rom_slot(slot)?;
                Some(image)
            }
            None => None,
        };
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for (index, &size) in sizes.iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| VirtioPciError::Queue { index, size })?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?);
        }
        let irq = Arc::new(Interrupts {
            msix: Mutex::new(msix),
            queue_vectors: Mutex::new(vec![NO_VECTOR; sizes.len()]),
            config_vector: Mutex::new(NO_VECTOR),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            intx: p.intx.map(std::sync::OnceLock::from).unwrap_or_default(),
            metrics: Arc::default(),
        });
        Ok(Self {
            config,
            layout: p.layout,
            device,
            mem: p.mem,
            irq,
            queues,
            kicks,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            active: false,
            rom,
            msix_cap,
            pci_cfg_cap,
            notify: p.notify,
            notify_base: None,
            paused: false,
            restored: false,
        })
    }

    /// The kick eventfd of each queue, for ioeventfd registration at
    /// `notify + index * notify_multiplier` within BAR 0.
    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Connects the INTx line (INTA#), used while MSI-X is disabled. A line
    /// given in the parameters is kept; only the first call has effect.
    pub fn set_intx(&self, line: IrqLine) {
        let _ = self.irq.intx.set(line);
    }

    /// What to run after the guest's EOI of an INTx interrupt: re-assert
    /// the line while the ISR still has a bit set (level semantics).
    pub fn intx_resample(&self) -> Box<dyn Fn() + Send> {
        let irq = self.irq.clone();
        Box::new(move || {
            if irq.isr.load(Ordering::Acquire) != 0 {
                if let Some(l) = irq.intx.get() {
                    let _ = l.trigger();
                }
            }
        })
    }

    /// What a driver can learn about the device without starting it.
    pub fn describe(&self) -> VirtioDescription {
        let mut config = vec![0u8; self.device.config_len() as usize];
        self.device.read_config(0, &mut config);
        VirtioDescription {
            device_type: self.device.device_type(),
            features: self.device.features(),
            queue_sizes: self.device.queue_max_sizes(),
            msix_vectors: self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .vectors(),
            config,
        }
    }

    /// The BAR layout.
    pub fn layout(&self) -> VirtioPciLayout {
        self.layout
    }

    fn status(&self) -> u8 {
        self.irq.status.load(Ordering::Acquire)
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.irq.status.store(0, Ordering::Release);
        self.irq.isr.store(0, Ordering::Release);
        self.irq
            .queue_vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fill(NO_VECTOR);
        *self
            .irq
            .config_vector
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = NO_VECTOR;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.active = false;
        self.paused = false;
        self.restored = false;
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status();
        let mut new = v | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & VIRTIO_F_VERSION_1 != 0
                && self.driver_features & !offered == 0;
            if !ok {
                // Refuse: the driver reads FEATURES_OK back as clear.
                new &= !status::FEATURES_OK;
            }
        }
        self.irq.status.store(new, Ordering::Release);
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let Ok(activation) = self.activation() else {
            // Rings outside guest memory or misaligned: refuse to run.
            return self.irq.set_needs_reset();
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.active = true;
                self.paused = false;
            }
            Err(_) => self.irq.set_needs_reset(),
        }
    }

    /// What the device gets at activation: the ready queues, each checked
    /// against guest memory.
    fn activation(&self) -> Result<Activation, String> {
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let kick = self.kicks[i]
                .try_clone()
                .map_err(|e| format!("queue {i}: cannot clone its eventfd: {e}"))?;
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}: rings outside guest memory or misaligned"
                ));
            }
            // The device gets its own copy; the transport keeps the
            // configuration the driver wrote.
            let queue = Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e:?}"))?;
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        Ok(Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues: active,
            interrupt: self.irq.clone(),
        })
    }

    /// Indices of the queues an active device runs.
    fn running_queues(&self) -> Vec<u16> {
        if !self.active {
            return Vec::new();
        }
        (0..self.queues.len() as u16)
            .filter(|&i| self.queues[usize::from(i)].ready())
            .collect()
    }

    /// The device's counters (requests, bytes, errors, DEVICE_NEEDS_RESET).
    pub fn metrics(&self) -> Arc<super::metrics::DeviceMetrics> {
        self.irq.metrics.clone()
    }

    /// Pauses an active device between two requests (the VMM does this
    /// with the vCPUs stopped, before saving) and keeps each queue's
    /// progress for [`Persist::save`]. Nothing happens to an inactive or
    /// already paused device. A device whose worker died and took its
    /// queues with it cannot report progress: it is marked
    /// DEVICE_NEEDS_RESET, so the driver starts over instead of trusting
    /// stale queue positions.
    pub fn pause(&mut self) {
        if !self.active || self.paused {
            return;
        }
        let progress = self.device.pause();
        self.paused = true;
        let mut missing = false;
        for i in self.running_queues() {
            match progress.iter().find(|p| p.index == i) {
                Some(p) => {
                    let q = &mut self.queues[usize::from(i)];
                    q.set_next_avail(p.next_avail);
                    q.set_next_used(p.next_used);
                }
                None => missing = true,
            }
        }
        if missing {
            self.irq
                .status
                .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
            self.irq.metrics.needs_reset();
        }
    }

    /// Resumes a paused device: it takes the buffers made available while
    /// it was paused. After a restore, each running queue's used-buffer
    /// interrupt is also signalled once, so an interrupt that was due when
    /// the snapshot was taken is not lost (a spurious one is harmless to a
    /// driver). Does nothing when not paused. If the device cannot be
    /// restarted it is marked DEVICE_NEEDS_RESET and the error returned.
    pub fn resume(&mut self) -> Result<(), ActivateError> {
        if !self.active || !self.paused {
            return Ok(());
        }
        if let Err(e) = self.device.resume() {
            self.irq.set_needs_reset();
            return Err(e);
        }
        self.paused = false;
        if std::mem::take(&mut self.restored) {
            for i in self.running_queues() {
                self.irq.signal_used_queue(i);
            }
        }
        Ok(())
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let qs = usize::from(self.queue_select);
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(
                *self
                    .irq
                    .config_vector
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status()),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => self.queues.get(qs).map_or(0, |q| u64::from(q.size())),
            0x1a => u64::from(
                self.irq
                    .queue_vectors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(qs)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            ),
            0x1c => self.queues.get(qs).map_or(0, |q| u64::from(q.ready())),
            0x1e => qs as u64,
            0x20 | 0x24 => self.queues.get(qs).map_or(0, |q| q.desc_table()),
            0x28 | 0x2c => self.queues.get(qs).map_or(0, |q| q.avail_ring()),
            0x30 | 0x34 => self.queues.get(qs).map_or(0, |q| q.used_ring()),
            _ => 0,
        };
        // 64-bit fields are read as two dwords.
        let v = if matches!(offset, 0x24 | 0x2c | 0x34) {
            v >> 32
        } else {
            v
        };
        let bytes = v.to_le_bytes();
        for (d, s) in data.iter_mut().zip(bytes.iter()) {
            *d = *s;
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let v = u64::from_le_bytes(b);
        let configurable = !self.active && self.status() & status::DRIVER_OK == 0;
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status() & status::FEATURES_OK == 0 => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            0x10 => {
                *self
                    .irq
                    .config_vector
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = self.valid_vector(v as u16);
            }
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if configurable => {
                if let Some(q) = self.selected() {
                    // Sizes that are not a power of two or exceed the maximum are ignored.
                    let _ = q.try_set_size(v as u16);
                }
            }
            0x1a => {
                let vector = self.valid_vector(v as u16);
                let qs = usize::from(self.queue_select);
                if let Some(slot) = self
                    .irq
                    .queue_vectors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(qs)
                {
                    *slot = vector;
                }
            }
            0x1c if configurable && v == 1 => {
                if let Some(q) = self.selected() {
                    q.set_ready(true);
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if configurable => {
                let (lo, hi) = if offset.is_multiple_of(8) {
                    (
                        Some(v as u32),
                        (data.len() == 8).then_some((v >> 32) as u32),
                    )
                } else {
                    (None, Some(v as u32))
                };
                if let Some(q) = self.selected() {
                    match offset & !7 {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    /// A vector the driver may use: in range, or NO_VECTOR.
    fn valid_vector(&self, v: u16) -> u16 {
        let n = self
            .irq
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .vectors();
        if v < n {
            v
        } else {
            NO_VECTOR
        }
    }

    /// The BAR 0 access the `VIRTIO_PCI_CAP_PCI_CFG` window stands for
    /// now: its offset and length, when the capability exists and names
    /// BAR 0 with a naturally aligned 1-, 2- or 4-byte access inside it.
    fn window_access(&self) -> Option<(u64, usize)> {
        if self.pci_cfg_cap == 0 {
            return None;
        }
        let at = |o: usize| {
            let mut b = [0u8; 4];
            self.config.read(self.pci_cfg_cap + o, &mut b);
            u32::from_le_bytes(b)
        };
        let (bar, offset, length) = (at(4) & 0xff, at(8), at(12));
        let fits = matches!(length, 1 | 2 | 4)
            && offset % length == 0
            && u64::from(offset) + u64::from(length) <= self.layout.bar_size;
        (bar == 0 && fits).then_some((u64::from(offset), length as usize))
    }

    /// Whether config bytes `offset..offset + len` touch `pci_cfg_data`.
    fn touches_window_data(&self, offset: usize, len: usize) -> bool {
        let data = self.pci_cfg_cap + PCI_CFG_DATA;
        self.pci_cfg_cap != 0 && offset < data + 4 && offset + len > data
    }

    fn region(&self, offset: u64) -> Option<(Region, u64)> {
        let l = &self.layout;
        let nq = self.queues.len() as u64;
        let msix_table_len = u64::from(
            self.irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .vectors(),
        ) * 16;
        let within = |base: u32, len: u64| {
            let base = u64::from(base);
            (offset >= base && offset < base + len).then(|| offset - base)
        };
        if let Some(o) = within(l.common, u64::from(l.common_len)) {
            return Some((Region::Common, o));
        }
        if let Some(o) = within(l.isr, 1) {
            return Some((Region::Isr, o));
        }
        if let Some(o) = within(l.device, u64::from(self.device.config_len())) {
            return Some((Region::Device, o));
        }
        if let Some(o) = within(l.notify, nq * u64::from(l.notify_multiplier)) {
            return Some((Region::Notify, o));
        }
        if let Some(o) = within(l.msix_table, msix_table_len) {
            return Some((Region::MsixTable, o));
        }
        if let Some(o) = within(l.msix_pba, msix_table_len.div_ceil(16 * 64) * 8) {
            return Some((Region::MsixPba, o));
        }
        None
    }
}

/// One queue of a [`VirtioPciState`]: what the driver configured, its
/// MSI-X vector, and how far the device got.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioQueueState {
    /// Queue size the driver chose.
    pub size: u16,
    /// Enabled by the driver.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// MSI-X vector ([`NO_VECTOR`] for none).
    pub vector: u16,
    /// Next available-ring index the device reads.
    pub next_avail: u16,
    /// Next used-ring index the device writes.
    pub next_used: u16,
}

/// Saved virtio-pci function state (version 1): the PCI configuration
/// space, MSI-X, the common configuration and every queue. The device
/// model behind it has no state of its own (see [`VirtioDevice`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VirtioPciState {
    /// Virtio device type (checked on restore).
    pub device_type: u16,
    /// Number of queues (checked on restore).
    pub num_queues: u16,
    /// PCI configuration space dwords.
    pub config_regs: Vec<u32>,
    /// MSI-X table, pending bits and control.
    pub msix: MsixState,
    /// Device status.
    pub status: u8,
    /// Interrupt status not yet read by the driver.
    pub isr: u8,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `queue_select`.
    pub queue_select: u16,
    /// `config_generation`.
    pub config_generation: u8,
    /// The device was running (DRIVER_OK accepted).
    pub active: bool,
    /// MSI-X vector for configuration changes.
    pub config_vector: u16,
    /// Every queue, by index.
    pub queues: Vec<VirtioQueueState>,
}

impl Persist for VirtioPci {
    const KIND: &'static str = "virtio-pci";
    const VERSION: u32 = 1;
    type State = VirtioPciState;

    /// Captures the function. An active device must have been paused
    /// ([`VirtioPci::pause`]) first: the queue positions saved are the ones
    /// the pause reported. ([`PciFunction::save_state`] refuses a running
    /// device.)
    fn save(&self) -> VirtioPciState {
        let vectors = self
            .irq
            .queue_vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| VirtioQueueState {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                vector: vectors.get(i).copied().unwrap_or(NO_VECTOR),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect();
        VirtioPciState {
            device_type: self.device.device_type(),
            num_queues: self.queues.len() as u16,
            config_regs: self.config.save_regs(),
            msix: self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save(),
            status: self.status(),
            isr: self.irq.isr.load(Ordering::Acquire),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            active: self.active,
            config_vector: *self
                .irq
                .config_vector
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            queues,
        }
    }

    /// Applies a saved state to a function built from the same machine
    /// type and configuration (normally freshly built and never started).
    /// The MSI-X routes are programmed again. A device that was running is
    /// prepared but left paused at the saved queue positions: it processes
    /// nothing and raises no interrupt until [`VirtioPci::resume`]. The
    /// caller then places the BAR again ([`crate::pci::PciRoot::refresh`]).
    /// A different device type or queue count, features the device does
    /// not offer, out-of-range vectors, bad queue sizes or alignment, and
    /// rings of a running device outside guest memory are refused.
    fn restore(&mut self, _version: u32, s: VirtioPciState) -> Result<(), PersistError> {
        let invalid = |reason: String| PersistError::Invalid {
            device: Self::KIND,
            reason,
        };
        let device_type = self.device.device_type();
        if s.device_type != device_type {
            return Err(invalid(format!(
                "saved device type {} but this function is type {device_type}",
                s.device_type
            )));
        }
        let nq = self.queues.len();
        if usize::from(s.num_queues) != nq || s.queues.len() != nq {
            return Err(invalid(format!(
                "{} queues saved ({} described) but this function has {nq}",
                s.num_queues,
                s.queues.len()
            )));
        }
        let regs = self.config.save_regs().len();
        if s.config_regs.len() != regs {
            return Err(invalid(format!(
                "{} configuration registers saved, this function has {regs}",
                s.config_regs.len()
            )));
        }
        let vectors = self
            .irq
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .vectors();
        if s.msix.entries.len() != usize::from(vectors) {
            return Err(invalid(format!(
                "{} MSI-X vectors saved, this function has {vectors}",
                s.msix.entries.len()
            )));
        }
        let vector_ok = |v: u16| v == NO_VECTOR || v < vectors;
        if !vector_ok(s.config_vector) {
            return Err(invalid(format!(
                "configuration vector {} does not exist",
                s.config_vector
            )));
        }
        if s.status & status::FEATURES_OK != 0
            && (s.driver_features & VIRTIO_F_VERSION_1 == 0
                || s.driver_features & !self.device.features() != 0)
        {
            return Err(invalid(format!(
                "accepted features {:#x} are not a valid subset of the offered {:#x}",
                s.driver_features,
                self.device.features()
            )));
        }
        let running = status::DRIVER_OK | status::FEATURES_OK;
        if s.active && s.status & running != running {
            return Err(invalid(format!(
                "active with status {:#x} (no DRIVER_OK and FEATURES_OK)",
                s.status
            )));
        }
        let mut queues = Vec::with_capacity(nq);
        for (i, (q, current)) in s.queues.iter().zip(&self.queues).enumerate() {
            if !vector_ok(q.vector) {
                return Err(invalid(format!(
                    "queue {i}: vector {} does not exist",
                    q.vector
                )));
            }
            let queue = Queue::try_from(QueueState {
                max_size: current.max_size(),
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: false,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            })
            .map_err(|e| invalid(format!("queue {i}: {e}")))?;
            if s.active && q.ready && !queue.is_valid(&self.mem) {
                return Err(invalid(format!(
                    "queue {i}: rings outside guest memory or misaligned"
                )));
            }
            queues.push(queue);
        }

        if self.active {
            self.reset();
        }
        self.config.restore_regs(&s.config_regs).map_err(invalid)?;
        self.irq
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&s.msix)
            .map_err(invalid)?;
        self.irq.status.store(s.status, Ordering::Release);
        self.irq.isr.store(s.isr, Ordering::Release);
        *self
            .irq
            .queue_vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = s.queues.iter().map(|q| q.vector).collect();
        *self
            .irq
            .config_vector
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = s.config_vector;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.queues = queues;
        self.active = false;
        self.paused = false;
        self.restored = false;
        if s.active {
            let activation = self.activation().map_err(invalid)?;
            self.device
                .activate_paused(activation)
                .map_err(|e| invalid(format!("cannot prepare the device: {e}")))?;
            self.active = true;
            self.paused = true;
            self.restored = true;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Common,
    Isr,
    Device,
    Notify,
    MsixTable,
    MsixPba,
}

impl PciFunction for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        if !self.touches_window_data(offset, data.len()) {
            return;
        }
        // `pci_cfg_data` reads BAR 0 through the window; bytes past the
        // access's length read as zero.
        let mut window = [0u8; 4];
        if let Some((at, len)) = self.window_access() {
            self.bar_read(0, at, &mut window[..len]);
        }
        let data_at = self.pci_cfg_cap + PCI_CFG_DATA;
        for (i, d) in data.iter_mut().enumerate() {
            if let Some(w) = (offset + i)
                .checked_sub(data_at)
                .and_then(|j| window.get(j))
            {
                *d = *w;
            }
        }
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        if self.touches_window_data(offset, len) {
            if let Some((at, n)) = self.window_access() {
                let mut b = [0u8; 4];
                self.config.read(self.pci_cfg_cap + PCI_CFG_DATA, &mut b);
                self.bar_write(0, at, &b[..n]);
            }
        }
        // Message control is the upper half of the capability's first dword.
        let ctrl = self.msix_cap + 2;
        if offset < ctrl + 2 && offset + len > ctrl {
            let mut b = [0u8; 2];
            self.config.read(ctrl, &mut b);
            self.irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_message_control(u16::from_le_bytes(b));
        }
    }

    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if index != 0 {
            return;
        }
        match self.region(offset) {
            Some((Region::Common, o)) => self.common_read(o, data),
            Some((Region::Isr, _)) => {
                // Reading the ISR acknowledges it.
                if let Some(d) = data.first_mut() {
                    *d = self.irq.isr.swap(0, Ordering::AcqRel);
                }
            }
            Some((Region::Device, o)) => self.device.read_config(o, data),
            Some((Region::MsixTable, o)) => self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o, data),
            Some((Region::MsixPba, o)) => self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(o, data),
            Some((Region::Notify, _)) | None => {}
        }
    }

    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != 0 {
            return;
        }
        match self.region(offset) {
            Some((Region::Common, o)) => self.common_write(o, data),
            Some((Region::Device, o)) => {
                self.device.write_config(o, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            Some((Region::Notify, o)) => {
                let q = (o / u64::from(self.layout.notify_multiplier)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            Some((Region::MsixTable, o)) => self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(o, data),
            Some((Region::Isr, _)) | Some((Region::MsixPba, _)) | None => {}
        }
    }

    fn rom(&self) -> Option<&[u8]> {
        self.rom.as_deref()
    }

    fn set_rom(&mut self, image: Vec<u8>) -> Result<(), String> {
        let slot = self.config.rom_size();
        if slot == 0 {
            return Err("this function has no ROM slot".into());
        }
        if image.len() as u64 > slot {
            return Err(format!(
                "the ROM image is {} bytes but the slot is {slot} bytes",
                image.len()
            ));
        }
        self.rom = Some(image);
        Ok(())
    }

    /// [`Persist::save_section`], refused while the device runs (it must
    /// be paused first, see [`VirtioPci::pause`]).
    fn save_state(&self) -> Result<(u32, Vec<u8>), PersistError> {
        if self.active && !self.paused {
            return Err(PersistError::Invalid {
                device: <Self as Persist>::KIND,
                reason: "the device is running; pause it before saving".into(),
            });
        }
        Ok(self.save_section())
    }

    fn state_version(&self) -> crate::persist::Needed {
        self.oldest_version()
    }
    /// [`Persist::restore_section`].
    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), PersistError> {
        self.restore_section(version, bytes)
    }

    fn bars_placed(&mut self, placed: &[crate::pci::config::BarMapping]) {
        let Some(reg) = self.notify.clone() else {
            return;
        };
        let base = placed.iter().find(|m| m.index == 0).map(|m| m.addr);
        if base == self.notify_base {
            return;
        }
        let step = u64::from(self.layout.notify_multiplier);
        let notify = u64::from(self.layout.notify);
        if let Some(old) = self.notify_base.take() {
            for (i, k) in self.kicks.iter().enumerate() {
                let _ = reg.unregister(k, old + notify + i as u64 * step);
            }
        }
        if let Some(new) = base {
            let ok = self
                .kicks
                .iter()
                .enumerate()
                .all(|(i, k)| reg.register(k, new + notify + i as u64 * step).is_ok());
            // If any registration failed, notifications still arrive through
            // the MMIO exit path; keep the bookkeeping consistent.
            if ok {
                self.notify_base = Some(new);
            } else {
                for (i, k) in self.kicks.iter().enumerate() {
                    let _ = reg.unregister(k, new + notify + i as u64 * step);
                }
            }
        }
    }
}

/// Driver-side helpers for transport tests (also used by the device
/// models' snapshot tests).
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// The BAR layout used in tests: pc-1.0's.
    pub(crate) fn layout() -> VirtioPciLayout {
        abide_machines::pc_1_0().virtio.layout
    }

    /// The transport parameters of the tests: 3 MSI-X vectors delivered by
    /// `msi`, INTA#, [`layout`].
    pub(crate) fn params(mem: GuestMem, msi: Arc<dyn MsiController>) -> VirtioPciParams {
        VirtioPciParams {
            ids: PciIds {
                vendor: 0x1af4,
                device: 0x1044,
                subsystem_vendor: 0x1af4,
                subsystem: 0x44,
                revision: 1,
                class: 0xff00,
            },
            intx_pin: 1,
            layout: layout(),
            msix_vectors: 3,
            msi,
            intx: None,
            mem,
            rom: None,
            notify: None,
        }
    }

    /// `device` behind a transport with [`params`].
    pub(crate) fn transport(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        msi: Arc<dyn MsiController>,
    ) -> VirtioPci {
        VirtioPci::new(device, params(mem, msi)).expect("transport")
    }

    /// Guest write of `len` bytes of `v` at BAR 0 offset `off`.
    pub(crate) fn w(d: &mut VirtioPci, off: u64, v: u64, len: usize) {
        d.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    /// Guest read of `len` bytes at BAR 0 offset `off`.
    pub(crate) fn r(d: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK; returns the status
    /// read back.
    pub(crate) fn negotiate(d: &mut VirtioPci, features: u64) -> u8 {
        w(d, 0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        w(d, 0x08, 0, 4);
        w(d, 0x0c, features & 0xffff_ffff, 4);
        w(d, 0x08, 1, 4);
        w(d, 0x0c, features >> 32, 4);
        w(
            d,
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            1,
        );
        r(d, 0x14, 1) as u8
    }

    /// Configures and enables queue `q` with its rings at the given
    /// addresses and MSI-X `vector`.
    pub(crate) fn enable_queue(
        d: &mut VirtioPci,
        q: u16,
        size: u16,
        rings: (u64, u64, u64),
        vector: u16,
    ) {
        w(d, 0x16, u64::from(q), 2);
        w(d, 0x18, u64::from(size), 2);
        w(d, 0x20, rings.0, 8);
        w(d, 0x28, rings.1, 8);
        w(d, 0x30, rings.2, 8);
        w(d, 0x1a, u64::from(vector), 2);
        w(d, 0x1c, 1, 2);
    }

    /// Enables MSI-X and points `vector` at an unmasked message.
    pub(crate) fn enable_msix(d: &mut VirtioPci, vector: u16, data: u32) {
        let ctrl = d.msix_cap + 2;
        d.config_mut().write(ctrl, &0x8000u16.to_le_bytes());
        d.config_written(ctrl, 2);
        let e = u64::from(layout().msix_table) + 16 * u64::from(vector);
        w(d, e, 0xfee0_0000, 4);
        w(d, e + 4, 0, 4);
        w(d, e + 8, u64::from(data), 4);
        w(d, e + 12, 0, 4);
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::pci::msix::{MsiMessage, Recorder};
    use crate::virtio::QueueProgress;
    use std::sync::atomic::{AtomicU16, AtomicUsize};
    use vm_memory::GuestAddress;

    struct NoMsi;
    impl MsiController for NoMsi {
        fn set_route(&self, _: u16, _: Option<MsiMessage>) -> std::io::Result<()> {
            Ok(())
        }
        fn trigger(&self, _: u16) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Counters {
        activations: AtomicUsize,
        paused_activations: AtomicUsize,
        pauses: AtomicUsize,
        resumes: AtomicUsize,
        resets: AtomicUsize,
        queues: AtomicUsize,
        /// Requests each queue "completes" before the next pause.
        work: AtomicU16,
        /// Progress of the queues handed over at the last activation.
        handed: Mutex<Vec<QueueProgress>>,
    }

    fn progress(queues: &[ActiveQueue]) -> Vec<QueueProgress> {
        queues
            .iter()
            .map(|q| QueueProgress {
                index: q.index,
                next_avail: q.queue.next_avail(),
                next_used: q.queue.next_used(),
            })
            .collect()
    }

    struct Dummy {
        c: Arc<Counters>,
        queues: Vec<ActiveQueue>,
    }

    impl Dummy {
        fn take(&mut self, a: Activation) {
            self.c.queues.store(a.queues.len(), Ordering::SeqCst);
            *self.c.handed.lock().expect("lock") = progress(&a.queues);
            self.queues = a.queues;
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u16 {
            4
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn config_len(&self) -> u32 {
            8
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.c.activations.fetch_add(1, Ordering::SeqCst);
            self.take(a);
            Ok(())
        }
        fn activate_paused(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.c.paused_activations.fetch_add(1, Ordering::SeqCst);
            self.take(a);
            Ok(())
        }
        fn pause(&mut self) -> Vec<QueueProgress> {
            self.c.pauses.fetch_add(1, Ordering::SeqCst);
            let n = self.c.work.swap(0, Ordering::SeqCst);
            for q in &mut self.queues {
                let (a, u) = (q.queue.next_avail(), q.queue.next_used());
                q.queue.set_next_avail(a.wrapping_add(n));
                q.queue.set_next_used(u.wrapping_add(n));
            }
            progress(&self.queues)
        }
        fn resume(&mut self) -> Result<(), ActivateError> {
            self.c.resumes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.c.resets.fetch_add(1, Ordering::SeqCst);
            self.queues.clear();
        }
    }

    fn device_with(msi: Arc<dyn MsiController>) -> (VirtioPci, Arc<Counters>) {
        let c = Arc::new(Counters::default());
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let dev = transport(
            Box::new(Dummy {
                c: c.clone(),
                queues: Vec::new(),
            }),
            mem,
            msi,
        );
        (dev, c)
    }

    fn device() -> (VirtioPci, Arc<Counters>) {
        device_with(Arc::new(NoMsi))
    }

    fn setup_queue(d: &mut VirtioPci, q: u16, base: u64) {
        w(d, 0x16, u64::from(q), 2);
        w(d, 0x18, 8, 2);
        w(d, 0x20, base, 8);
        w(d, 0x28, base + 0x1000, 8);
        w(d, 0x30, base + 0x2000, 8);
        w(d, 0x1c, 1, 2);
    }

    /// The capability list: (ID, byte 3: a virtio capability's cfg_type).
    fn cap_list(d: &VirtioPci) -> Vec<(u8, u8)> {
        let mut ptr = [0u8; 1];
        d.config().read(0x34, &mut ptr);
        let mut ids = Vec::new();
        let mut p = usize::from(ptr[0]);
        while p != 0 {
            let mut hdr = [0u8; 4];
            d.config().read(p, &mut hdr);
            ids.push((hdr[0], hdr[3]));
            p = usize::from(hdr[1]);
        }
        ids
    }

    #[test]
    fn header_and_capabilities() {
        let (d, _) = device();
        let mut b = [0u8; 4];
        d.config().read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        // Walk the capability list: four virtio caps then MSI-X.
        let ids = cap_list(&d);
        assert_eq!(ids.len(), 5);
        assert_eq!(&ids[..4], &[(9, 1), (9, 2), (9, 3), (9, 4)]);
        assert_eq!(ids[4].0, 0x11);
    }

    #[test]
    fn the_pci_cfg_window_reaches_bar_0_from_config_space() {
        let mut d = built_with(|p| p.layout.pci_cfg_window = true).expect("built");
        // The window ends the list, after MSI-X; without it, no such cap.
        let ids = cap_list(&d);
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[5], (9, 5));
        assert!(!cap_list(&device().0).contains(&(9, 5)));
        let cap = d.pci_cfg_cap;
        let mut len = [0u8; 1];
        d.config_read(cap + 2, &mut len);
        assert_eq!(len[0], 20);
        let cfg_w = |d: &mut VirtioPci, off: usize, v: u32, n: usize| {
            d.config_mut().write(off, &v.to_le_bytes()[..n]);
            d.config_written(off, n);
        };
        let cfg_r = |d: &mut VirtioPci, off: usize, n: usize| {
            let mut b = [0u8; 4];
            d.config_read(off, &mut b[..n]);
            u32::from_le_bytes(b)
        };
        let data = cap + PCI_CFG_DATA;
        // Aim at the common configuration's num_queues (0x12, 2 bytes).
        cfg_w(&mut d, cap + 4, 0, 1);
        cfg_w(&mut d, cap + 8, 0x12, 4);
        cfg_w(&mut d, cap + 12, 2, 4);
        assert_eq!(cfg_r(&mut d, data, 4), r(&mut d, 0x12, 2) as u32);
        assert_ne!(cfg_r(&mut d, data, 2), 0);
        // A write through the window lands: device_status (0x14, 1 byte).
        cfg_w(&mut d, cap + 8, 0x14, 4);
        cfg_w(&mut d, cap + 12, 1, 4);
        cfg_w(&mut d, data, u32::from(status::ACKNOWLEDGE), 1);
        assert_eq!(r(&mut d, 0x14, 1), u64::from(status::ACKNOWLEDGE));
        assert_eq!(cfg_r(&mut d, data, 1), u32::from(status::ACKNOWLEDGE));
        // Misaligned, oversized, past the BAR or another BAR: no access.
        for (bar, off, n) in [(0, 0x13, 2), (0, 0x14, 3), (0, 0x10_0000, 4), (1, 0x14, 1)] {
            cfg_w(&mut d, cap + 4, bar, 1);
            cfg_w(&mut d, cap + 8, off, 4);
            cfg_w(&mut d, cap + 12, n, 4);
            assert_eq!(
                d.window_access(),
                None,
                "bar {bar} offset {off:#x} length {n}"
            );
            assert_eq!(cfg_r(&mut d, data, 4), 0);
            cfg_w(&mut d, data, 0, 1);
        }
        assert_eq!(r(&mut d, 0x14, 1), u64::from(status::ACKNOWLEDGE));
    }

    /// Builds the Dummy behind a transport whose parameters `edit` changed.
    fn built_with(edit: impl FnOnce(&mut VirtioPciParams)) -> Result<VirtioPci, VirtioPciError> {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let mut p = params(mem, Arc::new(NoMsi));
        edit(&mut p);
        let dummy = Dummy {
            c: Arc::new(Counters::default()),
            queues: Vec::new(),
        };
        VirtioPci::new(Box::new(dummy), p)
    }

    #[test]
    fn undeclarable_transports_are_refused() {
        let refusal = |edit: &dyn Fn(&mut VirtioPciParams)| {
            built_with(edit)
                .map(|_| ())
                .expect_err("refused")
                .to_string()
        };
        let e = refusal(&|p| p.layout.common_len = 0x40);
        assert!(e.contains("virtio-pci: common_len = 0x40"), "{e}");
        let e = refusal(&|p| p.intx_pin = 5);
        assert!(e.contains("intx_pin = 5"), "{e}");
        let e = refusal(&|p| p.msix_vectors = 0);
        assert!(e.contains("msix_vectors = 0"), "{e}");
        let e = refusal(&|p| p.layout.cap_order[4] = VirtioCap::Common);
        assert!(e.contains("cap_order"), "{e}");
    }

    #[test]
    fn pin_and_capability_order_follow_the_machine() {
        let d = built_with(|p| {
            p.intx_pin = 2;
            p.layout.cap_order = [
                VirtioCap::Msix,
                VirtioCap::Device,
                VirtioCap::Isr,
                VirtioCap::Notify,
                VirtioCap::Common,
            ];
        })
        .expect("transport");
        let mut b = [0u8; 1];
        d.config().read(0x3d, &mut b);
        assert_eq!(b[0], 2, "INTB#");
        let ids: Vec<(u8, u8)> = cap_list(&d)
            .into_iter()
            .map(|(id, kind)| (id, if id == 9 { kind } else { 0 }))
            .collect();
        assert_eq!(ids, [(0x11, 0), (9, 4), (9, 3), (9, 2), (9, 1)]);
    }

    #[test]
    fn refuses_drivers_without_version_1() {
        let (mut d, c) = device();
        assert_eq!(r(&mut d, 0x12, 2), 2, "num_queues");
        w(&mut d, 0x00, 1, 4);
        assert_eq!(r(&mut d, 0x04, 4), 1, "VERSION_1 in the high word");
        let st = negotiate(&mut d, 1);
        assert_eq!(st & status::FEATURES_OK, 0, "legacy driver refused");
        // Unoffered bits are refused too.
        w(&mut d, 0x14, 0, 1);
        let st = negotiate(&mut d, VIRTIO_F_VERSION_1 | 1 << 5);
        assert_eq!(st & status::FEATURES_OK, 0);
        w(&mut d, 0x14, 0, 1);
        let st = negotiate(&mut d, VIRTIO_F_VERSION_1 | 1);
        assert_ne!(st & status::FEATURES_OK, 0);
        assert_eq!(c.activations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn activation_and_reset() {
        let (mut d, c) = device();
        negotiate(&mut d, VIRTIO_F_VERSION_1);
        setup_queue(&mut d, 0, 0x1_0000);
        assert_eq!(r(&mut d, 0x18, 2), 8);
        assert_eq!(r(&mut d, 0x20, 4), 0x1_0000);
        w(&mut d, 0x1a, 1, 2);
        assert_eq!(r(&mut d, 0x1a, 2), 1);
        w(&mut d, 0x1a, 99, 2);
        assert_eq!(
            r(&mut d, 0x1a, 2),
            u64::from(NO_VECTOR),
            "out-of-range vector"
        );
        w(&mut d, 0x14, 0x0f, 1);
        assert_eq!(c.activations.load(Ordering::SeqCst), 1);
        assert_eq!(c.queues.load(Ordering::SeqCst), 1, "only queue 0 enabled");
        // Queue registers are frozen once running.
        w(&mut d, 0x18, 4, 2);
        assert_eq!(r(&mut d, 0x18, 2), 8);
        // A notify write kicks the queue's eventfd.
        w(&mut d, 0x3000, 0, 2);
        assert_eq!(d.kicks()[0].read().expect("kicked"), 1);
        assert_eq!(r(&mut d, 0x2002, 2), 0x0403, "device config");
        w(&mut d, 0x14, 0, 1);
        assert_eq!(c.resets.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        w(&mut d, 0x16, 0, 2);
        assert_eq!(r(&mut d, 0x1c, 2), 0, "queue disabled by reset");
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let (mut d, c) = device();
        negotiate(&mut d, VIRTIO_F_VERSION_1);
        // The used ring would straddle the end of the 1 MiB of RAM.
        setup_queue(&mut d, 0, 0x10_0000 - 0x2000 - 8);
        w(&mut d, 0x14, 0x0f, 1);
        assert_eq!(c.activations.load(Ordering::SeqCst), 0);
        let st = r(&mut d, 0x14, 1) as u8;
        assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
        // Reset clears it and the device can start again.
        w(&mut d, 0x14, 0, 1);
        negotiate(&mut d, VIRTIO_F_VERSION_1);
        setup_queue(&mut d, 0, 0x1_0000);
        w(&mut d, 0x14, 0x0f, 1);
        assert_eq!(c.activations.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut d, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
    }

    #[derive(Default)]
    struct Registry(Mutex<Vec<(bool, u64)>>);
    impl NotifyRegistrar for Registry {
        fn register(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0.lock().expect("lock").push((true, addr));
            Ok(())
        }
        fn unregister(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0.lock().expect("lock").push((false, addr));
            Ok(())
        }
    }

    #[test]
    fn ioeventfds_follow_the_bar() {
        use crate::pci::config::BarMapping;
        let (mut d, _) = device();
        let reg = Arc::new(Registry::default());
        d.notify = Some(reg.clone());
        let at = |addr| BarMapping {
            index: 0,
            kind: BarKind::Mem64,
            addr,
            size: layout().bar_size,
        };
        d.bars_placed(&[at(0x8000_0000)]);
        assert_eq!(
            *reg.0.lock().expect("lock"),
            vec![(true, 0x8000_3000), (true, 0x8000_3004)],
            "one per queue at notify + index * multiplier"
        );
        reg.0.lock().expect("lock").clear();
        d.bars_placed(&[at(0x9000_0000)]);
        assert_eq!(
            *reg.0.lock().expect("lock"),
            vec![
                (false, 0x8000_3000),
                (false, 0x8000_3004),
                (true, 0x9000_3000),
                (true, 0x9000_3004)
            ]
        );
        reg.0.lock().expect("lock").clear();
        d.bars_placed(&[]);
        assert_eq!(
            *reg.0.lock().expect("lock"),
            vec![(false, 0x9000_3000), (false, 0x9000_3004)],
            "decode off removes them"
        );
    }

    #[test]
    fn isr_reads_clear() {
        let (mut d, _) = device();
        d.irq.signal_used_queue(0);
        assert_eq!(r(&mut d, 0x1000, 1), 1);
        assert_eq!(r(&mut d, 0x1000, 1), 0);
        d.irq.set_needs_reset();
        assert_eq!(r(&mut d, 0x1000, 1), 2);
        assert_ne!(r(&mut d, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
    }

    /// Everything a driver can read from the common configuration (queue
    /// fields of both queues), the MSI-X table and PBA; leaves
    /// `queue_select` as it was.
    fn guest_view(d: &mut VirtioPci) -> Vec<u64> {
        let sel = r(d, 0x16, 2);
        let mut v = Vec::new();
        for off in [0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16] {
            v.push(r(d, off, 4));
        }
        for q in 0..2 {
            w(d, 0x16, q, 2);
            for off in [0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x24, 0x28, 0x2c, 0x30, 0x34] {
                v.push(r(d, off, 4));
            }
        }
        w(d, 0x16, sel, 2);
        for off in (0..3 * 16).step_by(4) {
            v.push(r(d, u64::from(layout().msix_table) + off, 4));
        }
        v.push(r(d, u64::from(layout().msix_pba), 8));
        v.push(r(d, 0x2000, 8));
        v
    }

    /// A running device with MSI-X, two vectors in use, queue 0 running
    /// and queue 1 configured but not enabled.
    fn running(msi: Arc<Recorder>) -> (VirtioPci, Arc<Counters>) {
        let (mut d, c) = device_with(msi);
        assert_ne!(
            negotiate(&mut d, VIRTIO_F_VERSION_1 | 1) & status::FEATURES_OK,
            0
        );
        enable_msix(&mut d, 1, 0x4041);
        w(&mut d, 0x10, 0, 2); // config vector 0 (left masked)
        enable_queue(&mut d, 0, 8, (0x1_0000, 0x1_1000, 0x1_2000), 1);
        w(&mut d, 0x16, 1, 2);
        w(&mut d, 0x18, 4, 2);
        w(&mut d, 0x20, 0x3_0000, 8);
        w(&mut d, 0x14, 0x0f, 1);
        assert_eq!(c.activations.load(Ordering::SeqCst), 1);
        // Guest-visible odds and ends.
        w(&mut d, 0x00, 1, 4);
        w(&mut d, 0x2000, 0, 1); // config_generation 1
        d.irq.signal_config_change(); // ISR bit 2; vector 0 masked: pending
        (d, c)
    }

    #[test]
    fn state_round_trips_paused_and_resumes() {
        let rec_a = Arc::new(Recorder::default());
        let (mut a, ca) = running(rec_a.clone());
        assert!(
            matches!(a.save_state(), Err(PersistError::Invalid { .. })),
            "a running device is not saved"
        );
        // The device completed 5 requests before it was paused.
        ca.work.store(5, Ordering::SeqCst);
        a.pause();
        a.pause();
        assert_eq!(
            ca.pauses.load(Ordering::SeqCst),
            1,
            "pausing twice is one pause"
        );
        let (v, bytes) = a.save_state().expect("save");
        assert_eq!(v, 1);
        let saved = a.save();
        assert_eq!(saved.device_type, 4);
        assert_eq!(saved.num_queues, 2);
        assert!(saved.active);
        assert_eq!(saved.isr, ISR_CONFIG);
        assert_eq!(saved.config_generation, 1);
        assert_eq!(saved.msix.pending, vec![1]);
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (5, 5),
            "progress from the pause"
        );
        assert_eq!(saved.queues[1].size, 4);
        assert!(!saved.queues[1].ready);

        let rec_b = Arc::new(Recorder::default());
        let (mut b, cb) = device_with(rec_b.clone());
        b.restore_state(v, &bytes).expect("restore");
        assert_eq!(b.save(), saved);
        assert_eq!(cb.activations.load(Ordering::SeqCst), 0);
        assert_eq!(cb.paused_activations.load(Ordering::SeqCst), 1);
        assert_eq!(cb.queues.load(Ordering::SeqCst), 1, "only queue 0 runs");
        assert_eq!(
            *cb.handed.lock().expect("lock"),
            vec![QueueProgress {
                index: 0,
                next_avail: 5,
                next_used: 5
            }],
            "the device continues where it was"
        );
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x4041,
        };
        assert!(rec_b.routes.lock().expect("lock").contains(&(1, Some(msg))));
        assert!(
            rec_b.fired.lock().expect("lock").is_empty(),
            "no interrupt yet"
        );
        assert_eq!(b.irq.isr.load(Ordering::Acquire), ISR_CONFIG);
        assert_eq!(guest_view(&mut b), guest_view(&mut a));
        // The config space too (MSI-X enable in its capability).
        assert_eq!(b.config().save_regs(), a.config().save_regs());
        // Queue registers stay frozen: the device is running.
        w(&mut b, 0x16, 0, 2);
        w(&mut b, 0x18, 4, 2);
        assert_eq!(r(&mut b, 0x18, 2), 8);

        // Resuming the restored device signals queue 0 once.
        b.resume().expect("resume");
        assert_eq!(cb.resumes.load(Ordering::SeqCst), 1);
        assert_eq!(*rec_b.fired.lock().expect("lock"), vec![1]);
        assert_eq!(b.irq.isr.load(Ordering::Acquire), ISR_CONFIG | ISR_QUEUE);
        b.resume().expect("resume again");
        assert_eq!(cb.resumes.load(Ordering::SeqCst), 1, "not paused: no-op");
        b.pause();
        b.resume().expect("resume");
        assert_eq!(*rec_b.fired.lock().expect("lock"), vec![1], "only once");

        // A plain pause and resume signals nothing.
        let fired = rec_a.fired.lock().expect("lock").len();
        a.resume().expect("resume");
        assert_eq!(ca.resumes.load(Ordering::SeqCst), 1);
        assert_eq!(rec_a.fired.lock().expect("lock").len(), fired);

        // Reset after a restore works as usual.
        w(&mut b, 0x14, 0, 1);
        assert_eq!(cb.resets.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut b, 0x14, 1), 0);
    }

    #[test]
    fn inactive_state_round_trips() {
        let (mut a, _) = device();
        negotiate(&mut a, VIRTIO_F_VERSION_1);
        enable_queue(&mut a, 1, 16, (0x2_0000, 0x2_1000, 0x2_2000), NO_VECTOR);
        a.pause();
        let (v, bytes) = a.save_state().expect("inactive devices save");
        let (mut b, cb) = device();
        b.restore_state(v, &bytes).expect("restore");
        assert_eq!(guest_view(&mut b), guest_view(&mut a));
        assert_eq!(cb.paused_activations.load(Ordering::SeqCst), 0);
        b.resume().expect("nothing to resume");
        // The driver goes on where it was: DRIVER_OK starts the device.
        w(&mut b, 0x14, 0x0f, 1);
        assert_eq!(cb.activations.load(Ordering::SeqCst), 1);
        assert_eq!(cb.queues.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn bad_states_are_refused() {
        let (mut a, _) = running(Arc::new(Recorder::default()));
        a.pause();
        let (v, bytes) = a.save_state().expect("save");
        let good = a.save();
        let (mut b, cb) = device();
        assert!(matches!(
            b.restore_state(v + 1, &bytes),
            Err(PersistError::NewerVersion { .. })
        ));
        assert!(matches!(
            b.restore_state(v, b"[1, 2"),
            Err(PersistError::Malformed { .. })
        ));
        type Edit = fn(&mut VirtioPciState);
        let cases: [(&str, Edit); 10] = [
            ("device type", |s| s.device_type = 2),
            ("queue count", |s| s.num_queues = 3),
            ("queue list", |s| {
                s.queues.pop();
            }),
            ("config registers", |s| {
                s.config_regs.pop();
            }),
            ("MSI-X vectors", |s| s.msix.entries.push([0; 4])),
            ("queue vector", |s| s.queues[0].vector = 3),
            ("features not offered", |s| s.driver_features |= 1 << 7),
            ("queue size", |s| s.queues[0].size = 32),
            ("misaligned ring", |s| s.queues[0].desc_table = 0x1_0008),
            ("used ring outside memory", |s| {
                s.queues[0].used_ring = 0x10_0000 - 8
            }),
        ];
        for (name, edit) in cases {
            let mut s = good.clone();
            edit(&mut s);
            assert!(
                matches!(b.restore(1, s), Err(PersistError::Invalid { .. })),
                "{name}"
            );
            assert_eq!(cb.paused_activations.load(Ordering::SeqCst), 0, "{name}");
            assert_eq!(r(&mut b, 0x14, 1), 0, "{name}: nothing applied");
        }
        // Rings outside memory are fine while the device is not running.
        let mut s = good.clone();
        s.active = false;
        s.status &= !status::DRIVER_OK;
        s.queues[0].used_ring = 0x10_0000 - 8;
        b.restore(1, s).expect("inactive");
        // And the good state still applies.
        let (mut c, cc) = device();
        c.restore(1, good).expect("good state");
        assert_eq!(cc.paused_activations.load(Ordering::SeqCst), 1);
    }
}
