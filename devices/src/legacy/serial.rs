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
