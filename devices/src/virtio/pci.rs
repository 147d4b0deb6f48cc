//! The virtio-pci (modern, virtio 1.x) transport.
//!
//! BAR 0 (64-bit memory) holds, at offsets from [`VirtioPciLayout`]: the
//! common configuration, the ISR byte, the device configuration, the queue
//! notification area and the MSI-X table and pending-bit array. Each region
//! is announced by a vendor capability in config space.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::legacy::IrqLine;
use crate::pci::config::{BarKind, BarSpec, PciConfig, PciIds};
use crate::pci::msix::{MsiController, Msix};
use crate::pci::PciFunction;
use crate::virtio::{
    status, Activation, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;
const VENDOR_CAP: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Where the transport's regions sit in BAR 0, as the machine description
/// gives it. Guest-visible.
pub use abide_machines::VirtioBarLayout as VirtioPciLayout;

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
    /// BAR layout.
    pub layout: VirtioPciLayout,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// MSI-X delivery.
    pub msi: Arc<dyn MsiController>,
    /// INTx line (INTA#), used while MSI-X is disabled.
    pub intx: Option<IrqLine>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
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
        self.signal_config_change();
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: PciConfig,
    layout: VirtioPciLayout,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
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
    notify: Option<Arc<dyn NotifyRegistrar>>,
    /// BAR 0 base at which the kick eventfds are registered.
    notify_base: Option<u64>,
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

impl VirtioPci {
    /// Wraps `device` in a PCI function.
    pub fn new(device: Box<dyn VirtioDevice>, p: VirtioPciParams) -> Result<Self, VirtioPciError> {
        let mut config = PciConfig::new(p.ids, 1);
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
        config.add_capability(&vendor_cap(CAP_COMMON, l.common, 0x38, None), &[])?;
        config.add_capability(
            &vendor_cap(
                CAP_NOTIFY,
                l.notify,
                nq * l.notify_multiplier,
                Some(l.notify_multiplier),
            ),
            &[],
        )?;
        config.add_capability(&vendor_cap(CAP_ISR, l.isr, 1, None), &[])?;
        // Devices without configuration (virtio-rng) must not announce an
        // empty region: drivers reject a zero-length capability.
        if device.config_len() > 0 {
            config.add_capability(
                &vendor_cap(CAP_DEVICE, l.device, device.config_len(), None),
                &[],
            )?;
        }
        let msix = Msix::new(p.msix_vectors, p.msi);
        let (cap, writable) = msix.capability(0, l.msix_table, l.msix_pba);
        let msix_cap = config.add_capability(&cap, &writable)?;
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
            notify: p.notify,
            notify_base: None,
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
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(_) => return self.irq.set_needs_reset(),
            };
            if !q.is_valid(&self.mem) {
                // Rings outside guest memory or misaligned: refuse to run.
                return self.irq.set_needs_reset();
            }
            // The device gets its own copy; the transport keeps the
            // configuration the driver wrote.
            let Ok(queue) = Queue::try_from(q.state()) else {
                return self.irq.set_needs_reset();
            };
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues: active,
            interrupt: self.irq.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(_) => self.irq.set_needs_reset(),
        }
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
        if let Some(o) = within(l.common, 0x38) {
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

    fn config_written(&mut self, offset: usize, len: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::MsiMessage;
    use std::sync::atomic::AtomicUsize;
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
        resets: AtomicUsize,
        queues: AtomicUsize,
    }

    struct Dummy(Arc<Counters>);
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
        fn activate(&mut self, a: Activation) -> Result<(), crate::virtio::ActivateError> {
            self.0.activations.fetch_add(1, Ordering::SeqCst);
            self.0.queues.store(a.queues.len(), Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.0.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    const LAYOUT: VirtioPciLayout = VirtioPciLayout {
        bar_size: 0x8000,
        common: 0,
        isr: 0x1000,
        device: 0x2000,
        notify: 0x3000,
        notify_multiplier: 4,
        msix_table: 0x4000,
        msix_pba: 0x5000,
    };

    fn device() -> (VirtioPci, Arc<Counters>) {
        let c = Arc::new(Counters::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let dev = VirtioPci::new(
            Box::new(Dummy(c.clone())),
            VirtioPciParams {
                ids: PciIds {
                    vendor: 0x1af4,
                    device: 0x1044,
                    subsystem_vendor: 0x1af4,
                    subsystem: 0x44,
                    revision: 1,
                    class: 0xff00,
                },
                layout: LAYOUT,
                msix_vectors: 3,
                msi: Arc::new(NoMsi),
                intx: None,
                mem,
                rom: None,
                notify: None,
            },
        )
        .expect("transport");
        (dev, c)
    }

    fn w(d: &mut VirtioPci, off: u64, v: u64, len: usize) {
        d.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(d: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn negotiate(d: &mut VirtioPci, features: u64) -> u8 {
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

    fn setup_queue(d: &mut VirtioPci, q: u16, base: u64) {
        w(d, 0x16, u64::from(q), 2);
        w(d, 0x18, 8, 2);
        w(d, 0x20, base, 8);
        w(d, 0x28, base + 0x1000, 8);
        w(d, 0x30, base + 0x2000, 8);
        w(d, 0x1c, 1, 2);
    }

    #[test]
    fn header_and_capabilities() {
        let (d, _) = device();
        let mut b = [0u8; 4];
        d.config().read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        // Walk the capability list: four virtio caps then MSI-X.
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
        assert_eq!(ids.len(), 5);
        assert_eq!(&ids[..4], &[(9, 1), (9, 2), (9, 3), (9, 4)]);
        assert_eq!(ids[4].0, 0x11);
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
            size: LAYOUT.bar_size,
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
}
