//! Minimal i8042 keyboard controller: enough for the guest to probe it and
//! to pulse the CPU reset line (command 0xFE), which ends the VM.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Offset of the command/status port from the data port.
const COMMAND_OFFSET: u64 = 4;

struct ResetTrigger(ExitSignal);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 at data port + command port (`base`, `base + 4`).
pub struct I8042 {
    inner: vm_superio::I8042Device<ResetTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller whose reset command ends the VM through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self {
            inner: vm_superio::I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != COMMAND_OFFSET && offset != 0 {
            return;
        }
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.inner.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_vm() {
        let exit = ExitSignal::new().expect("eventfd");
        let mut kbd = I8042::new(exit.clone());
        kbd.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(exit.reason(), None);
        kbd.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
