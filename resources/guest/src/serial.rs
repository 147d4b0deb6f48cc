//! Polled 16550 UART on COM1.
//!
//! Output waits for LSR.THRE and then writes up to 16 bytes (the FIFO
//! depth), so a line costs one status read per 16 characters instead of
//! one per character: every port access is a VM exit.

use crate::io::{inb, outb};
use crate::Global;

pub const COM1: u16 = 0x3F8;
const THR: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const FIFO_DEPTH: usize = 16;

/// Input that arrived before init: enabling the FIFO clears the receive
/// side on a real 16550 (and QEMU), so it is drained first.
struct Early {
    buf: [u8; FIFO_DEPTH],
    len: u8,
    pos: u8,
}
static EARLY: Global<Early> = Global::new(Early {
    buf: [0; FIFO_DEPTH],
    len: 0,
    pos: 0,
});

pub fn init() {
    let early = EARLY.get();
    while (early.len as usize) < FIFO_DEPTH && inb(COM1 + LSR) & LSR_DR != 0 {
        early.buf[early.len as usize] = inb(COM1 + THR);
        early.len += 1;
    }
    outb(COM1 + IER, 0x00); // no interrupts
    outb(COM1 + LCR, 0x80); // DLAB
    outb(COM1 + THR, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + IER, 0x00);
    outb(COM1 + LCR, 0x03); // 8N1
    outb(COM1 + FCR, 0x07); // enable + clear FIFOs
    outb(COM1 + MCR, 0x03); // DTR | RTS
}

/// LSR reads as 0xff when nothing decodes the port.
pub fn present() -> bool {
    inb(COM1 + LSR) != 0xFF
}

/// Wait (bounded) until the transmitter can take a FIFO's worth.
fn wait_thre() {
    // Bounded by iteration count: each iteration is a port read, i.e. a
    // VM exit (microseconds). ~1M iterations is seconds; a broken UART
    // must not hang the guest.
    let mut n = 0u32;
    while inb(COM1 + LSR) & LSR_THRE == 0 {
        n += 1;
        if n > 1_000_000 {
            return;
        }
        core::hint::spin_loop();
    }
}

pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_DEPTH) {
        wait_thre();
        for &b in chunk {
            outb(COM1 + THR, b);
        }
    }
}

/// Non-blocking read of one byte.
pub fn try_read() -> Option<u8> {
    let early = EARLY.get();
    if early.pos < early.len {
        early.pos += 1;
        return Some(early.buf[early.pos as usize - 1]);
    }
    if inb(COM1 + LSR) & LSR_DR != 0 {
        Some(inb(COM1 + THR))
    } else {
        None
    }
}
