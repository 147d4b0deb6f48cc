//! ACPI PM timer: 3.579545 MHz, 24-bit wrapping counter. `now()` extends it
//! to 64 bits; it must be called at least every ~4.6 s to not miss a wrap
//! (every wait loop and the ring-3 workload's per-round syscall do).
//!
//! Without a PM timer, `now()` advances a fake clock by ~1 µs per call so
//! that every wait stays bounded (all wait loops do a port access per
//! iteration, which is at least that slow under virtualisation).

use crate::io::inl;
use crate::Global;

pub const HZ: u64 = 3_579_545;

struct State {
    port: u16,
    last: u32,
    total: u64,
}

static STATE: Global<State> = Global::new(State {
    port: 0,
    last: 0,
    total: 0,
});

pub fn init(port: u16) {
    let st = STATE.get();
    st.port = port;
    if port != 0 {
        st.last = inl(port) & 0xFF_FFFF;
    }
}

pub fn now() -> u64 {
    // Ring 3 (the device drivers) asks the kernel: the state lives there,
    // and ring-3 port I/O traps under PVM anyway.
    if crate::io::read_cs() & 3 != 0 {
        return crate::user::sys_ticks();
    }
    let st = STATE.get();
    if st.port == 0 {
        st.total += 4;
        return st.total;
    }
    let v = inl(st.port) & 0xFF_FFFF;
    st.total += (v.wrapping_sub(st.last) & 0xFF_FFFF) as u64;
    st.last = v;
    st.total
}

/// True if the counter moves (checked over a bounded number of reads).
pub fn advances() -> bool {
    let port = STATE.get().port;
    if port == 0 {
        return false;
    }
    let first = inl(port) & 0xFF_FFFF;
    for _ in 0..10_000 {
        if inl(port) & 0xFF_FFFF != first {
            return true;
        }
    }
    false
}

pub fn us_to_ticks(us: u64) -> u64 {
    us * HZ / 1_000_000
}

pub struct Deadline(u64);

impl Deadline {
    pub fn after_us(us: u64) -> Deadline {
        Deadline(now() + us_to_ticks(us))
    }
    pub fn expired(&self) -> bool {
        now() >= self.0
    }
}

pub fn sleep_us(us: u64) {
    let d = Deadline::after_us(us);
    while !d.expired() {
        core::hint::spin_loop();
    }
}
