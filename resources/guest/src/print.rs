//! Line builder for the `guest: key=value ...` output format. No
//! core::fmt: it is large and slow, and ring-0 instructions are expensive.

pub const LINE_MAX: usize = 512;
/// Capacity of `LongLine` (fingerprint lines with long hex dumps; built
/// in ring 3, where the larger buffer costs nothing).
pub const LONG_LINE_MAX: usize = 2048;

use core::mem::MaybeUninit;

/// A line of at most `N - 1` bytes plus the newline; longer text is cut.
pub struct LineBuf<const N: usize> {
    // Uninitialised on purpose: zeroing it would cost ring-0 instructions.
    buf: [MaybeUninit<u8>; N],
    len: usize,
}

pub type Line = LineBuf<LINE_MAX>;
pub type LongLine = LineBuf<LONG_LINE_MAX>;

impl<const N: usize> LineBuf<N> {
    /// Start a line: `guest: <topic>`.
    #[inline(never)]
    pub fn new(topic: &str) -> Self {
        let mut l = LineBuf {
            buf: [const { MaybeUninit::uninit() }; N],
            len: 0,
        };
        l.s("guest: ");
        l.s(topic);
        l
    }

    #[inline(never)]
    pub fn s(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    #[inline(never)]
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &c in b {
            self.byte(c);
        }
        self
    }

    #[inline(always)]
    pub fn byte(&mut self, c: u8) -> &mut Self {
        // Keep one byte for the newline.
        if self.len < N - 1 {
            self.buf[self.len] = MaybeUninit::new(c);
            self.len += 1;
        }
        self
    }

    /// ` key=` prefix.
    #[inline(never)]
    pub fn key(&mut self, k: &str) -> &mut Self {
        self.byte(b' ');
        self.s(k);
        self.byte(b'=')
    }

    /// ` key=<decimal>`
    pub fn kd(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k).dec(v)
    }

    /// ` key=0x<hex, minimal digits>`
    pub fn kx(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k).hex(v, 1)
    }

    /// ` key=0x<16 hex digits>`
    pub fn kx16(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k).hex(v, 16)
    }

    /// ` key=0x<hex, at least `digits` digits>`
    pub fn kxw(&mut self, k: &str, v: u64, digits: u32) -> &mut Self {
        self.key(k).hex(v, digits)
    }

    /// Hex without the `0x` prefix, exactly `digits` digits (low ones).
    #[inline(never)]
    pub fn hex_raw(&mut self, v: u64, digits: u32) -> &mut Self {
        let mut d = digits;
        while d > 0 {
            d -= 1;
            let n = ((v >> (d * 4)) & 0xF) as u8;
            self.byte(if n < 10 { b'0' + n } else { b'a' + n - 10 });
        }
        self
    }

    /// ` key=<string>`
    pub fn ks(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k).s(v)
    }

    #[inline(never)]
    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&tmp[i..])
    }

    /// Zero-padded decimal of at least `width` digits.
    pub fn dec_pad(&mut self, v: u64, width: usize) -> &mut Self {
        let mut digits = 1;
        let mut t = v;
        while t >= 10 {
            t /= 10;
            digits += 1;
        }
        while digits < width {
            self.byte(b'0');
            digits += 1;
        }
        self.dec(v)
    }

    /// `0x` + hex, at least `min_digits` digits.
    #[inline(never)]
    pub fn hex(&mut self, v: u64, min_digits: u32) -> &mut Self {
        self.s("0x");
        let mut digits = 16;
        while digits > min_digits && (v >> ((digits - 1) * 4)) & 0xF == 0 {
            digits -= 1;
        }
        while digits > 0 {
            digits -= 1;
            let d = ((v >> (digits * 4)) & 0xF) as u8;
            self.byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
        self
    }

    /// Append text made safe for a value: spaces become ',', other
    /// non-printable bytes become '?'.
    pub fn sanitized(&mut self, b: &[u8]) -> &mut Self {
        for &c in b {
            let c = match c {
                b' ' | b'\t' => b',',
                0x21..=0x7E => c,
                _ => b'?',
            };
            self.byte(c);
        }
        self
    }

    /// Finish the line (append '\n') and return its bytes.
    pub fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = MaybeUninit::new(b'\n');
        // SAFETY: bytes 0..=len have been written.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr() as *const u8, self.len + 1) }
    }

    /// Finish and write to the serial port; from ring 3 through SYS_WRITE
    /// (one kernel entry per line: PVM does not honour IOPL=3, so ring-3
    /// port I/O would trap per byte).
    #[inline(never)]
    pub fn print(&mut self) {
        let cpl = crate::io::read_cs() & 3;
        let bytes = self.finish();
        if cpl == 0 {
            crate::serial::write(bytes);
        } else {
            crate::user::sys_write(bytes);
        }
    }
}

/// Print a whole literal line (`guest: ` is prepended).
pub fn line(text: &str) {
    Line::new(text).print();
}

/// `guest: error what=<what>`
pub fn error(what: &str) {
    Line::new("error").ks("what", what).print();
}
