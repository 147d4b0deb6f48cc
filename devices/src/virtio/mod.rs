//! Virtio 1.x devices and their PCI transport.
//!
//! A device model implements [`VirtioDevice`]: it states its type, queues,
//! features and config space, and when the driver sets DRIVER_OK it is
//! handed its queues (with kick eventfds) and an interrupt handle, and starts
//! its own worker on an event-manager thread. The vCPU threads never run
//! device work.

pub mod blk;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod net;
pub mod pci;
pub mod rng;
mod worker;

use std::sync::Arc;

use crate::GuestMem;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use abide_machines::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
pub use worker::set_worker_start_hook;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest has a driver.
    pub const DRIVER: u8 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation finished.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// Virtio device type IDs.
pub mod device_type {
    /// Network card.
    pub const NET: u16 = 1;
    /// Block device.
    pub const BLOCK: u16 = 2;
    /// Entropy source.
    pub const RNG: u16 = 4;
}

/// How a device tells the driver about used buffers and errors.
pub trait VirtioInterrupt: Send + Sync {
    /// Buffers were added to queue `index`'s used ring.
    fn signal_used_queue(&self, index: u16);
    /// The device configuration changed.
    fn signal_config_change(&self);
    /// The device cannot go on: set DEVICE_NEEDS_RESET and tell the driver.
    fn set_needs_reset(&self);
    /// The device's counters. The default is a fresh set nobody reads.
    fn metrics(&self) -> Arc<metrics::DeviceMetrics> {
        Arc::new(metrics::DeviceMetrics::default())
    }
}

/// A queue handed to a device at activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// The queue, configured and validated against guest memory.
    pub queue: virtio_queue::Queue,
    /// Signalled when the driver notifies this queue.
    pub kick: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMem,
    /// Features both sides agreed on.
    pub features: u64,
    /// The enabled queues.
    pub queues: Vec<ActiveQueue>,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("features", &self.features)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

pub use crate::model::ModelError;

/// Checks declared features against what a model implements: every bit
/// must be implemented, and `VIRTIO_F_VERSION_1` must be declared.
pub fn check_features(
    device: &'static str,
    device_type: u16,
    declared: u64,
    implemented: u64,
) -> Result<(), ModelError> {
    let extra = declared & !implemented;
    if extra != 0 {
        return Err(ModelError::Features {
            device,
            names: abide_machines::virtio_feature_names(device_type, extra),
        });
    }
    if declared & VIRTIO_F_VERSION_1 == 0 {
        return Err(ModelError::NoVersion1 { device });
    }
    Ok(())
}

/// Checks a declared queue count and maximum queue size: `count` must be
/// in `counts`, the size a power of two from `min_size` to 32768.
pub fn check_queues(
    device: &'static str,
    count: u16,
    counts: std::ops::RangeInclusive<u16>,
    size: u16,
    min_size: u16,
) -> Result<(), ModelError> {
    if !counts.contains(&count) {
        let reason = if counts.start() == counts.end() {
            format!("this model has exactly {} queues", counts.start())
        } else {
            format!(
                "this model has {} to {} queues",
                counts.start(),
                counts.end()
            )
        };
        return Err(ModelError::value(device, "num_queues", count, reason));
    }
    if size < min_size || !size.is_power_of_two() || size > 32768 {
        return Err(ModelError::value(
            device,
            "queue_size",
            size,
            format!("a queue size must be a power of two from {min_size} to 32768"),
        ));
    }
    Ok(())
}

/// Checks a declared configuration length: at most `implemented` bytes,
/// and reaching the end of every field a declared feature makes valid
/// (`fields`: feature bit, end of its field).
pub fn check_config_len(
    device: &'static str,
    declared_len: u32,
    implemented: usize,
    features: u64,
    fields: &[(u64, usize)],
) -> Result<(), ModelError> {
    let len = declared_len as usize;
    if len > implemented {
        return Err(ModelError::value(
            device,
            "config_len",
            declared_len,
            format!("this model implements {implemented} bytes of configuration"),
        ));
    }
    if let Some((_, end)) = fields
        .iter()
        .find(|(f, end)| features & f != 0 && *end > len)
    {
        return Err(ModelError::value(
            device,
            "config_len",
            declared_len,
            format!("a declared feature's field ends at byte {end}"),
        ));
    }
    Ok(())
}

/// Why activation failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled a queue layout the device cannot use.
    #[error("invalid queue configuration: {0}")]
    BadQueues(String),
    /// The worker thread could not start.
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
}

/// How far a device got in one of its queues: the next available-ring
/// entry it will take and the next used-ring entry it will fill. Saved
/// while the device is paused, so a restored device continues exactly
/// there (nothing done twice, nothing skipped).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueProgress {
    /// Queue index.
    pub index: u16,
    /// Next available-ring index the device reads.
    pub next_avail: u16,
    /// Next used-ring index the device writes.
    pub next_used: u16,
}

/// A virtio device model.
///
/// Guest-visible state lives in the transport ([`pci::VirtioPci`]), which
/// saves and restores it; a model with guest-writable state of its own
/// (writable configuration space) must add it to the transport's snapshot.
/// The models here have none.
pub trait VirtioDevice: Send {
    /// Virtio device type ([`device_type`]).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Size of the device-specific configuration space in bytes.
    fn config_len(&self) -> u32;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Prepares the device exactly as [`VirtioDevice::activate`] would, but
    /// leaves it paused: nothing is processed and no interrupt is raised
    /// until [`VirtioDevice::resume`]. Used to restore a snapshot of a
    /// running device (the queues carry the saved progress).
    fn activate_paused(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device's work between two requests, keeping it (the
    /// queues and their progress) for [`VirtioDevice::resume`]; returns
    /// each active queue's progress. Pausing an inactive device returns
    /// nothing; pausing a paused one returns the same progress again.
    fn pause(&mut self) -> Vec<QueueProgress>;
    /// Restarts a paused device, which then also takes the buffers the
    /// driver made available while it was paused. Does nothing if the
    /// device is not paused.
    fn resume(&mut self) -> Result<(), ActivateError>;
    /// Stops the device and returns it to its initial state. No request may
    /// be in flight when this returns; a paused device's work is dropped.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes at `offset` from a config-space image, leaving
/// bytes past its end as zero.
pub fn read_config_bytes(image: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, d) in data.iter_mut().enumerate() {
        if let Some(b) = start.checked_add(i).and_then(|p| image.get(p)) {
            *d = *b;
        }
    }
}
