//! CMOS real-time clock (ports 0x70/0x71).

use crate::io::{inb, outb};
use crate::timer;

const REG_SEC: u8 = 0x00;
const REG_MIN: u8 = 0x02;
const REG_HOUR: u8 = 0x04;
const REG_DAY: u8 = 0x07;
const REG_MON: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_CENTURY: u8 = 0x32;

fn read(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub min: u32,
    pub sec: u32,
}

impl DateTime {
    pub fn valid(&self) -> bool {
        (1970..=2199).contains(&self.year)
            && (1..=12).contains(&self.month)
            && (1..=31).contains(&self.day)
            && self.hour < 24
            && self.min < 60
            && self.sec < 60
    }

    /// Seconds since 1970-01-01T00:00:00Z (the RTC is taken to be UTC).
    pub fn epoch(&self) -> u64 {
        // Days from civil date (proleptic Gregorian), shifted so that
        // March is the first month of the year.
        let (y, m) = if self.month <= 2 {
            (self.year as i64 - 1, self.month as i64 + 9)
        } else {
            (self.year as i64, self.month as i64 - 3)
        };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * m + 2) / 5 + self.day as i64 - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        (days * 86_400 + self.hour as i64 * 3600 + self.min as i64 * 60 + self.sec as i64).max(0)
            as u64
    }
}

fn bcd(v: u8) -> u8 {
    (v & 0x0F) + (v >> 4) * 10
}

struct Raw([u8; 7]);

fn read_raw() -> Raw {
    Raw([
        read(REG_SEC),
        read(REG_MIN),
        read(REG_HOUR),
        read(REG_DAY),
        read(REG_MON),
        read(REG_YEAR),
        read(REG_CENTURY),
    ])
}

fn wait_uip() {
    // The update-in-progress window is < 2 ms; bound the wait at 10 ms.
    let d = timer::Deadline::after_us(10_000);
    while read(REG_A) & 0x80 != 0 && !d.expired() {}
}

/// Read the clock: wait for UIP to clear and re-read until two consecutive
/// reads agree (bounded).
pub fn now() -> DateTime {
    wait_uip();
    let mut raw = read_raw();
    for _ in 0..5 {
        wait_uip();
        let again = read_raw();
        if again.0 == raw.0 {
            break;
        }
        raw = again;
    }
    let b = read(REG_B);
    let binary = b & 0x04 != 0;
    let h24 = b & 0x02 != 0;
    let conv = |v: u8| if binary { v } else { bcd(v) };
    let [sec, min, hour_raw, day, mon, year, century] = raw.0;
    let pm = hour_raw & 0x80 != 0;
    let mut hour = conv(hour_raw & 0x7F) as u32;
    if !h24 {
        // 12-hour mode: 12 AM = 0, 12 PM = 12.
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let c = conv(century) as u32;
    let yy = conv(year) as u32;
    let year = if (19..=21).contains(&c) {
        c * 100 + yy
    } else if yy < 70 {
        2000 + yy
    } else {
        1900 + yy
    };
    DateTime {
        year,
        month: conv(mon) as u32,
        day: conv(day) as u32,
        hour,
        min: conv(min) as u32,
        sec: conv(sec) as u32,
    }
}
