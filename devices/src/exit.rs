//! How a device asks for the VM to end (guest poweroff or reset), or the
//! VMM says the VM left this process (live migration).

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Why the guest ended the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 (soft off).
    Poweroff,
    /// Reset through the i8042 or the ACPI reset register.
    Reset,
    /// Not the guest's doing: the VM moved to another Abide (live
    /// migration committed and confirmed) and must not run here again.
    Migrated,
}

/// A handle devices use to end the VM. The first request wins; the VMM
/// waits on [`ExitSignal::eventfd`].
#[derive(Clone, Debug)]
pub struct ExitSignal {
    reason: Arc<Mutex<Option<ExitReason>>>,
    evt: Arc<EventFd>,
}

impl ExitSignal {
    /// A new signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::new(Mutex::new(None)),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Requests that the VM end for `reason`.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        // A full counter still wakes the waiter, so the error is harmless.
        let _ = self.evt.write(1);
    }

    /// The reason requested so far, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Event that becomes readable once an exit is requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = ExitSignal::new().expect("eventfd");
        assert_eq!(s.reason(), None);
        s.clone().request(ExitReason::Reset);
        s.request(ExitReason::Poweroff);
        assert_eq!(s.reason(), Some(ExitReason::Reset));
        assert_eq!(s.eventfd().read().expect("readable"), 2);
    }
}
