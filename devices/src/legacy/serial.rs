//! 16550 UART (COM1), built on vm-superio.

use std::io::Write;

use crate::bus::BusDevice;
use crate::legacy::irq::IrqLine;

/// Where the UART's transmitted bytes go.
pub type SerialSink = Box<dyn Write + Send>;

/// A 16550A UART.
pub struct Serial {
    inner: vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, SerialSink>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: IrqLine, out: SerialSink) -> Self {
        Self {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues received bytes for the guest. Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Space left in the receive FIFO.
    pub fn input_space(&self) -> usize {
        self.inner.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A failing sink (closed pipe, full disk) must not stop the guest.
            let _ = self.inner.write(off, v);
        }
    }
}

/// Saved UART state (version 1): the 16550 registers and the receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialStateV1 {
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlh: u8,
    /// Interrupt enable.
    pub ier: u8,
    /// Interrupt identification.
    pub iir: u8,
    /// Line control.
    pub lcr: u8,
    /// Line status.
    pub lsr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Modem status.
    pub msr: u8,
    /// Scratch.
    pub scr: u8,
    /// Received bytes not yet read by the guest.
    pub rx_fifo: Vec<u8>,
}

impl crate::persist::Persist for Serial {
    const KIND: &'static str = "uart-16550";
    const VERSION: u32 = 1;
    type State = SerialStateV1;

    fn save(&self) -> SerialStateV1 {
        let s = self.inner.state();
        SerialStateV1 {
            dll: s.baud_divisor_low,
            dlh: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }

    fn restore(
        &mut self,
        _version: u32,
        s: SerialStateV1,
    ) -> Result<(), crate::persist::PersistError> {
        let invalid = |reason: String| crate::persist::PersistError::Invalid {
            device: <Self as crate::persist::Persist>::KIND,
            reason,
        };
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.dll,
            baud_divisor_high: s.dlh,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.rx_fifo,
        };
        // Keep the interrupt line and the output sink; replace the registers.
        let trigger = self
            .inner
            .interrupt_evt()
            .try_clone()
            .map_err(|e| invalid(e.to_string()))?;
        let spare = trigger.try_clone().map_err(|e| invalid(e.to_string()))?;
        let placeholder = vm_superio::Serial::new(spare, Box::new(std::io::sink()) as SerialSink);
        let old = std::mem::replace(&mut self.inner, placeholder);
        let out = old.into_writer();
        match vm_superio::Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, out) {
            Ok(restored) => {
                self.inner = restored;
                Ok(())
            }
            Err(e) => Err(invalid(format!("{e:?}"))),
        }
    }
}

/// A sink that flushes after every write, so partial lines (prompts) show.
#[derive(Debug)]
pub struct Unbuffered<W: Write>(pub W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn state_round_trips() {
        use crate::persist::Persist;
        let out = Shared::default();
        let mut a = Serial::new(IrqLine::new().expect("eventfd"), Box::new(out.clone()));
        a.write(3, &[0x03]); // LCR: 8 data bits
        a.write(7, &[0x5a]); // scratch
        a.enqueue_input(b"ab");
        let (v, bytes) = a.save_section();
        let mut b = Serial::new(IrqLine::new().expect("eventfd"), Box::new(out.clone()));
        b.restore_section(v, &bytes).expect("restore");
        assert_eq!(b.save(), a.save());
        let mut c = [0u8];
        b.read(0, &mut c);
        assert_eq!(c[0], b'a', "pending input survives");
        b.write(0, b"z");
        assert_eq!(&*out.0.lock().expect("lock"), b"z", "output sink kept");
        assert!(
            b.restore_section(2, &bytes).is_err(),
            "newer version refused"
        );
        assert!(b.restore_section(1, b"{").is_err(), "malformed refused");
    }

    #[test]
    fn transmits_and_receives() {
        let out = Shared::default();
        let irq = IrqLine::new().expect("eventfd");
        let mut s = Serial::new(irq, Box::new(out.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*out.0.lock().expect("lock"), b"hi");
        assert_eq!(s.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        s.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }
}
