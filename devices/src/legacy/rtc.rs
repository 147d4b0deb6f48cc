//! MC146818-compatible CMOS RTC with 128 bytes of CMOS RAM.
//!
//! Time registers read the host's wall clock (UTC) plus an offset the guest
//! may set by writing them while the SET bit is held.

use std::time::{SystemTime, UNIX_EPOCH};

use abide_machines::RtcDefaults;

use crate::bus::BusDevice;
use crate::model::ModelError;

const REG_SECONDS: usize = 0x00;
const REG_MINUTES: usize = 0x02;
const REG_HOURS: usize = 0x04;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// First CMOS byte after the clock's registers.
const FIRST_RAM_BYTE: u8 = 0x0e;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// Register B bits a machine may set at reset: the data mode and the hour
/// format. The interrupt enables, square wave, daylight saving and SET are
/// not implemented.
const B_DECLARABLE: u8 = B_BINARY | B_24H;
const A_UIP: u8 = 0x80;
const D_VRT: u8 = 0x80;
const DEVICE: &str = "cmos-rtc";

/// Source of "now", in seconds since the Unix epoch (replaceable in tests).
pub type Clock = fn() -> i64;

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year.
    pub year: i64,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
    /// 0–23.
    pub hour: u32,
    /// 0–59.
    pub minute: u32,
    /// 0–59.
    pub second: u32,
    /// 1 (Sunday) – 7.
    pub weekday: u32,
}

impl DateTime {
    /// Converts seconds since the epoch (UTC).
    pub fn from_unix(t: i64) -> Self {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        // Civil-from-days (proleptic Gregorian), after H. Hinnant.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            weekday: (days + 4).rem_euclid(7) as u32 + 1,
        }
    }

    /// Converts back to seconds since the epoch.
    pub fn to_unix(&self) -> i64 {
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

/// Saved RTC state (version 1). The guest's clock is kept as its offset
/// from the host's, so it moves on with real time across a restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcStateV1 {
    /// Selected register (with the NMI-mask bit).
    pub index: u8,
    /// CMOS RAM and control registers.
    pub cmos: Vec<u8>,
    /// Guest time minus host time, seconds.
    pub offset: i64,
}

impl crate::persist::Persist for Rtc {
    const KIND: &'static str = "cmos-rtc";
    const VERSION: u32 = 1;
    type State = RtcStateV1;

    fn save(&self) -> RtcStateV1 {
        RtcStateV1 {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset: self.offset,
        }
    }

    fn restore(
        &mut self,
        _version: u32,
        s: RtcStateV1,
    ) -> Result<(), crate::persist::PersistError> {
        let cmos: [u8; 128] =
            s.cmos
                .try_into()
                .map_err(|v: Vec<u8>| crate::persist::PersistError::Invalid {
                    device: "cmos-rtc",
                    reason: format!("CMOS is {} bytes, not 128", v.len()),
                })?;
        self.index = s.index;
        self.cmos = cmos;
        self.offset = s.offset;
        Ok(())
    }
}

/// The CMOS RTC at an index/data port pair.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    cmos: [u8; 128],
    /// CMOS index of the century byte.
    century: usize,
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: Clock,
}

impl Rtc {
    /// An RTC following the host clock, with the machine's register
    /// defaults.
    pub fn new(defaults: RtcDefaults) -> Result<Self, ModelError> {
        Self::with_clock(defaults, host_now)
    }

    /// An RTC following `clock`.
    pub fn with_clock(defaults: RtcDefaults, clock: Clock) -> Result<Self, ModelError> {
        let d = defaults;
        let hex = |v: u8| format!("{v:#04x}");
        if d.register_a & A_UIP != 0 {
            return Err(ModelError::value(
                DEVICE,
                "register_a",
                hex(d.register_a),
                "update-in-progress (bit 7) always reads 0",
            ));
        }
        if d.register_b & !B_DECLARABLE != 0 {
            return Err(ModelError::value(
                DEVICE,
                "register_b",
                hex(d.register_b),
                "only the data mode (bit 2) and 24-hour format (bit 1) are implemented",
            ));
        }
        if d.register_d != D_VRT {
            return Err(ModelError::value(
                DEVICE,
                "register_d",
                hex(d.register_d),
                "register D reads 0x80 (valid RAM and time)",
            ));
        }
        if !(FIRST_RAM_BYTE..=0x7f).contains(&d.century_index) {
            return Err(ModelError::value(
                DEVICE,
                "century_index",
                hex(d.century_index),
                "the century byte must be a CMOS RAM byte (0x0e..=0x7f)",
            ));
        }
        let mut cmos = [0u8; 128];
        cmos[REG_A] = d.register_a;
        cmos[REG_B] = d.register_b;
        cmos[REG_D] = d.register_d;
        Ok(Self {
            index: 0,
            cmos,
            century: usize::from(d.century_index),
            offset: 0,
            clock,
        })
    }

    fn now(&self) -> DateTime {
        DateTime::from_unix((self.clock)() + self.offset)
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let pm = h >= 12;
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | if pm { 0x80 } else { 0 }
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year % 100) as u32),
            r if r == self.century => self.encode((t.year / 100) as u32),
            // Update-in-progress is never reported: reads are always coherent.
            REG_A => self.cmos[REG_A] & 0x7f,
            REG_C => {
                let v = self.cmos[REG_C];
                self.cmos[REG_C] = 0;
                v
            }
            _ => self.cmos[reg],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8) {
        let century = reg == self.century;
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR => self.set_time(reg, v),
            _ if century => self.set_time(reg, v),
            REG_B => self.cmos[REG_B] = v & !B_SET | (v & B_SET),
            REG_C | REG_D => {}
            _ => self.cmos[reg] = v,
        }
    }

    /// A write to a time register (or the century byte): latch the current
    /// time, apply the write and derive the new offset from it.
    fn set_time(&mut self, reg: usize, v: u8) {
        let mut t = self.now();
        let d = self.decode(v & if reg == REG_HOURS { 0x7f } else { 0xff });
        match reg {
            REG_SECONDS => t.second = d.min(59),
            REG_MINUTES => t.minute = d.min(59),
            REG_HOURS => {
                t.hour = if self.cmos[REG_B] & B_24H != 0 {
                    d.min(23)
                } else {
                    d % 12 + if v & 0x80 != 0 { 12 } else { 0 }
                }
            }
            REG_DAY => t.day = d.clamp(1, 31),
            REG_MONTH => t.month = d.clamp(1, 12),
            REG_YEAR => t.year = t.year / 100 * 100 + i64::from(d),
            r if r == self.century => t.year = i64::from(d) * 100 + t.year % 100,
            _ => {}
        }
        self.offset = t.to_unix() - (self.clock)();
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => self.index,
            1 => {
                let reg = usize::from(self.index & 0x7f);
                self.read_reg(reg)
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            // Bit 7 of the index port is the NMI mask; it does not select a register.
            0 => self.index = v,
            1 => {
                let reg = usize::from(self.index & 0x7f);
                self.write_reg(reg, v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 17:05:09 UTC, a Monday.
    const T: i64 = 1_795_453_509;

    /// pc-1.0's RTC at time `T`.
    fn rtc() -> Rtc {
        Rtc::with_clock(abide_machines::pc_1_0().legacy_defaults.rtc, || T).expect("rtc")
    }

    #[test]
    fn undeclarable_defaults_are_refused() {
        let refusal = |edit: &dyn Fn(&mut RtcDefaults)| {
            let mut d = abide_machines::pc_1_0().legacy_defaults.rtc;
            edit(&mut d);
            Rtc::with_clock(d, || T).expect_err("refused").to_string()
        };
        assert!(refusal(&|d| d.register_a = 0xa6).contains("register_a = 0xa6"));
        // Periodic interrupts are not implemented.
        assert!(refusal(&|d| d.register_b = 0x42).contains("register_b = 0x42"));
        assert!(refusal(&|d| d.register_d = 0).contains("register_d = 0x00"));
        let e = refusal(&|d| d.century_index = 0x09);
        assert!(
            e.contains("cmos-rtc") && e.contains("century_index = 0x09"),
            "{e}"
        );
    }

    #[test]
    fn century_byte_is_where_the_machine_puts_it() {
        let mut d = abide_machines::pc_1_0().legacy_defaults.rtc;
        d.century_index = 0x48;
        let mut rtc = Rtc::with_clock(d, || T).expect("rtc");
        assert_eq!(rd(&mut rtc, 0x48), 0x20);
        assert_eq!(rd(&mut rtc, 0x32), 0, "plain CMOS RAM now");
    }

    fn rd(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn date_conversion_round_trips() {
        let d = DateTime::from_unix(T);
        assert_eq!((d.year, d.month, d.day), (2026, 11, 23));
        assert_eq!((d.hour, d.minute, d.second), (17, 5, 9));
        assert_eq!(d.weekday, 2);
        assert_eq!(d.to_unix(), T);
        assert_eq!(DateTime::from_unix(0).year, 1970);
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn reads_bcd_time() {
        let mut rtc = rtc();
        assert_eq!(rd(&mut rtc, 0x09), 0x26);
        assert_eq!(rd(&mut rtc, 0x32), 0x20);
        assert_eq!(rd(&mut rtc, 0x08), 0x11);
        assert_eq!(rd(&mut rtc, 0x07), 0x23);
        assert_eq!(rd(&mut rtc, 0x04), 0x17);
        assert_eq!(rd(&mut rtc, 0x00), 0x09);
        assert_eq!(rd(&mut rtc, 0x0d) & 0x80, 0x80);
    }

    #[test]
    fn binary_mode_and_guest_set_time() {
        let mut rtc = rtc();
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[B_24H | B_BINARY]);
        assert_eq!(rd(&mut rtc, 0x04), 17);
        rtc.write(0, &[0x04]);
        rtc.write(1, &[5]);
        assert_eq!(rd(&mut rtc, 0x04), 5);
        assert_eq!(rd(&mut rtc, 0x02), 5, "minutes unchanged");
    }

    #[test]
    fn state_round_trips() {
        use crate::persist::Persist;
        let mut a = rtc();
        a.write(0, &[0x40]);
        a.write(1, &[0xab]);
        a.write(0, &[0x04]);
        a.write(1, &[0x05]); // guest sets the hour: an offset
        let (v, bytes) = a.save_section();
        let mut b = rtc();
        b.restore_section(v, &bytes).expect("restore");
        assert_eq!(rd(&mut b, 0x40), 0xab);
        assert_eq!(rd(&mut b, 0x04), 0x05, "guest time kept");
        let mut short = a.save();
        short.cmos.truncate(10);
        assert!(b.restore(1, short).is_err());
    }

    #[test]
    fn cmos_ram_keeps_bytes() {
        let mut rtc = rtc();
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(rd(&mut rtc, 0x40), 0xab);
    }
}
