//! Poweroff (ACPI S5) and reset (i8042, then the FADT reset register).

use crate::acpi::{Acpi, Gas};
use crate::io::{halt_forever, inw, outb, outw};
use crate::print::{error, line};
use crate::{timer, Global};

struct Power {
    pm1a_cnt: u16,
    pm1a_evt: u16,
    sleep_ctl: u16,
    s5: u8,
    reset: Option<(Gas, u8)>,
}

static POWER: Global<Power> = Global::new(Power {
    pm1a_cnt: 0,
    pm1a_evt: 0,
    sleep_ctl: 0,
    s5: 0,
    reset: None,
});

pub fn init(acpi: &Acpi) {
    let p = POWER.get();
    p.pm1a_cnt = acpi.pm1a_cnt;
    p.pm1a_evt = acpi.pm1a_evt;
    p.sleep_ctl = acpi.sleep_ctl;
    p.s5 = acpi.s5.unwrap_or(0);
    p.reset = acpi.reset;
}

pub fn poweroff() -> ! {
    let p = POWER.get();
    if p.pm1a_cnt != 0 {
        outw(p.pm1a_cnt, ((p.s5 as u16 & 7) << 10) | (1 << 13));
        timer::sleep_us(100_000);
    } else if p.sleep_ctl != 0 {
        // HW-reduced ACPI: SLP_TYP in bits 4:2, SLP_EN bit 5.
        outb(p.sleep_ctl, ((p.s5 & 7) << 2) | (1 << 5));
        timer::sleep_us(100_000);
    }
    error("poweroff-failed");
    reset()
}

/// PWRBTN_STS in PM1_STS.
const PWRBTN_STS: u16 = 1 << 8;

/// `power-button`: waits until the ACPI power button is pressed, polling
/// PWRBTN_STS (no SCI handler: PWRBTN_EN stays clear), and clears it.
pub fn wait_power_button() {
    let evt = POWER.get().pm1a_evt;
    if evt == 0 {
        error("no-pm1a-evt");
        return;
    }
    line("power-button waiting");
    while inw(evt) & PWRBTN_STS == 0 {
        timer::sleep_us(20_000);
    }
    outw(evt, PWRBTN_STS);
    if inw(evt) & PWRBTN_STS != 0 {
        error("pwrbtn-sts-stuck");
    }
    line("power-button pressed");
}

pub fn reset() -> ! {
    // i8042: pulse the CPU reset line.
    outb(0x64, 0xFE);
    timer::sleep_us(100_000);
    let p = POWER.get();
    if let Some((g, v)) = p.reset {
        if g.space == 1 && g.addr < 0x10000 {
            outb(g.addr as u16, v);
        } else if g.space == 0 && g.addr < (1 << 32) {
            unsafe { core::ptr::write_volatile(g.addr as *mut u8, v) };
        }
        timer::sleep_us(100_000);
    }
    error("reset-failed");
    halt_forever()
}
