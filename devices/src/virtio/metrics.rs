//! Counters of one virtio device: requests completed, bytes moved each way,
//! errors, and how often the device gave up (DEVICE_NEEDS_RESET).
//!
//! The transport owns one [`DeviceMetrics`] per function and hands it to the
//! device with the interrupt handle ([`super::VirtioInterrupt::metrics`]).
//! Workers count with relaxed atomic adds; the VMM reads a [`DeviceCounts`]
//! copy at any time. A hook set by the VMM hears about every
//! DEVICE_NEEDS_RESET (to report it as an event).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Called when the device raises DEVICE_NEEDS_RESET.
pub type NeedsResetHook = Box<dyn Fn() + Send + Sync>;

/// Live counters of one device.
#[derive(Default)]
pub struct DeviceMetrics {
    requests: AtomicU64,
    bytes_to_guest: AtomicU64,
    bytes_from_guest: AtomicU64,
    errors: AtomicU64,
    needs_reset: AtomicU64,
    hook: OnceLock<NeedsResetHook>,
}

impl std::fmt::Debug for DeviceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMetrics")
            .field("counts", &self.counts())
            .finish()
    }
}

/// A copy of a device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounts {
    /// Requests (descriptor chains) completed and returned to the driver.
    pub requests: u64,
    /// Bytes the device wrote into guest buffers (disk reads, received
    /// frames, random bytes).
    pub bytes_to_guest: u64,
    /// Bytes the device took from guest buffers (disk writes, sent frames).
    pub bytes_from_guest: u64,
    /// Requests completed with an error status, or dropped as malformed.
    pub errors: u64,
    /// Times the device gave up and raised DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
}

impl DeviceMetrics {
    /// `requests` chains were returned to the driver with `bytes` written.
    pub fn completed(&self, requests: u64, bytes: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.bytes_to_guest.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The device consumed `bytes` of guest data.
    pub fn took(&self, bytes: u64) {
        self.bytes_from_guest.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request failed or was dropped.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The device raised DEVICE_NEEDS_RESET: counted, and the hook runs.
    pub fn needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = self.hook.get() {
            hook();
        }
    }

    /// Sets the hook run on each DEVICE_NEEDS_RESET. Only the first call
    /// takes effect; returns whether this one did.
    pub fn on_needs_reset(&self, hook: NeedsResetHook) -> bool {
        self.hook.set(hook).is_ok()
    }

    /// The counters now.
    pub fn counts(&self) -> DeviceCounts {
        DeviceCounts {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_to_guest: self.bytes_to_guest.load(Ordering::Relaxed),
            bytes_from_guest: self.bytes_from_guest.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            needs_reset: self.needs_reset.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn counts_and_hook() {
        let m = DeviceMetrics::default();
        m.completed(2, 100);
        m.took(7);
        m.error();
        m.needs_reset();
        let heard = Arc::new(AtomicUsize::new(0));
        let h = heard.clone();
        assert!(m.on_needs_reset(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(!m.on_needs_reset(Box::new(|| {})), "set once");
        m.needs_reset();
        assert_eq!(heard.load(Ordering::SeqCst), 1);
        assert_eq!(
            m.counts(),
            DeviceCounts {
                requests: 2,
                bytes_to_guest: 100,
                bytes_from_guest: 7,
                errors: 1,
                needs_reset: 2,
            }
        );
    }
}
