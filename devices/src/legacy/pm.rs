//! The ACPI PM1a event/control block with the PM timer, and the ACPI reset
//! register. Writing SLP_EN with the S5 sleep type powers the VM off.
//!
//! The fixed-feature power button: [`AcpiPm::press_power_button`] sets
//! PWRBTN_STS; while PWRBTN_STS and PWRBTN_EN are both set, the SCI is
//! asserted (a level-triggered line: the VMM re-raises it after each EOI
//! with [`AcpiPm::resample`] until the guest clears the status bit).

use std::time::Instant;

use abide_machines::{PmBlock, ResetRegister};

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::legacy::IrqLine;

const PM_TIMER_HZ: u128 = 3_579_545;
const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
/// PWRBTN_STS in PM1_STS and PWRBTN_EN in PM1_EN.
const PWRBTN: u16 = 1 << 8;

/// The PM1a block laid out as the machine description says.
#[derive(Debug)]
pub struct AcpiPm {
    layout: PmBlock,
    status: u16,
    enable: u16,
    control: u16,
    start: Instant,
    exit: ExitSignal,
    sci: Option<IrqLine>,
}

impl AcpiPm {
    /// A PM block that ends the VM through `exit` on S5.
    pub fn new(layout: PmBlock, exit: ExitSignal) -> Self {
        Self {
            layout,
            status: 0,
            enable: 0,
            // The FADT has no SMI command port, so ACPI is always enabled.
            control: SCI_EN,
            start: Instant::now(),
            exit,
            sci: None,
        }
    }

    /// Connects the SCI (the machine's `pm.sci_irq`), a line the VMM keeps
    /// asserted until the guest's EOI.
    pub fn set_sci(&mut self, line: IrqLine) {
        self.sci = Some(line);
        self.update_sci();
    }

    /// Presses the power button: sets PWRBTN_STS, and raises the SCI if
    /// the guest enabled the button (an ACPI OS then shuts down cleanly).
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    /// Whether an enabled event is pending (the SCI should be asserted).
    pub fn sci_pending(&self) -> bool {
        self.status & self.enable & PWRBTN != 0
    }

    /// Called after the guest's EOI of the SCI: raises it again while an
    /// event is still pending.
    pub fn resample(&self) {
        self.update_sci();
    }

    fn update_sci(&self) {
        if let (true, Some(line)) = (self.sci_pending(), &self.sci) {
            // A full eventfd counter still asserts the line.
            let _ = line.trigger();
        }
    }

    fn ticks(&self) -> u64 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u64
    }

    fn timer(&self) -> u32 {
        (self.ticks() & 0x00ff_ffff) as u32
    }

    fn register(&self, offset: u64) -> Option<(u64, u32)> {
        // (register base offset, value)
        let cnt = u64::from(self.layout.cnt_offset);
        let tmr = u64::from(self.layout.tmr_offset);
        match offset {
            0..=1 => Some((0, u32::from(self.status))),
            2..=3 => Some((2, u32::from(self.enable))),
            o if (cnt..cnt + 2).contains(&o) => Some((cnt, u32::from(self.control))),
            o if (tmr..tmr + 4).contains(&o) => Some((tmr, self.timer())),
            _ => None,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((base, value)) = self.register(offset) {
            let bytes = value.to_le_bytes();
            let skip = (offset - base) as usize;
            for (d, s) in data.iter_mut().zip(bytes.iter().skip(skip)) {
                *d = *s;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut buf = [0u8; 2];
        for (b, d) in buf.iter_mut().zip(data) {
            *b = *d;
        }
        let v = u16::from_le_bytes(buf);
        let cnt = u64::from(self.layout.cnt_offset);
        match offset {
            // PM1_STS bits are write-one-to-clear.
            0 => self.status &= !v,
            // Enabling a latched event raises the SCI.
            2 => {
                self.enable = v;
                self.update_sci();
            }
            o if o == cnt => {
                self.control = (v & !SLP_EN) | SCI_EN;
                let slp_typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if v & SLP_EN != 0 && slp_typ == u16::from(self.layout.s5_slp_typ) {
                    self.exit.request(ExitReason::Poweroff);
                }
            }
            _ => {}
        }
    }
}

/// Saved PM block state (version 1). The PM timer continues from the
/// saved count.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmStateV1 {
    /// PM1 status.
    pub status: u16,
    /// PM1 enable.
    pub enable: u16,
    /// PM1 control.
    pub control: u16,
    /// PM timer ticks since the machine started.
    pub timer_ticks: u64,
}

impl crate::persist::Persist for AcpiPm {
    const KIND: &'static str = "acpi-pm";
    const VERSION: u32 = 1;
    type State = AcpiPmStateV1;

    fn save(&self) -> AcpiPmStateV1 {
        AcpiPmStateV1 {
            status: self.status,
            enable: self.enable,
            control: self.control,
            timer_ticks: self.ticks(),
        }
    }

    fn restore(
        &mut self,
        _version: u32,
        s: AcpiPmStateV1,
    ) -> Result<(), crate::persist::PersistError> {
        // The guest sees 24 bits: continuing from the saved count modulo
        // 2^24 is exact, and never reaches before this process started.
        let ticks = u128::from(s.timer_ticks & 0x00ff_ffff);
        let back = std::time::Duration::from_nanos((ticks * 1_000_000_000 / PM_TIMER_HZ) as u64);
        self.start = Instant::now()
            .checked_sub(back)
            .unwrap_or_else(Instant::now);
        self.status = s.status;
        self.enable = s.enable;
        self.control = s.control | SCI_EN;
        Ok(())
    }
}

/// The ACPI reset register (one I/O port).
#[derive(Debug)]
pub struct ResetControl {
    layout: ResetRegister,
    exit: ExitSignal,
}

impl ResetControl {
    /// A reset register that ends the VM through `exit`.
    pub fn new(layout: ResetRegister, exit: ExitSignal) -> Self {
        Self { layout, exit }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&self.layout.value) {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, ExitSignal) {
        let exit = ExitSignal::new().expect("eventfd");
        let layout = abide_machines::pc_1_0().legacy.pm;
        (AcpiPm::new(layout, exit.clone()), exit)
    }

    #[test]
    fn s5_powers_off() {
        let (mut pm, exit) = pm();
        let cnt = u64::from(pm.layout.cnt_offset);
        let mut b = [0u8; 2];
        pm.read(cnt, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        // S1-ish sleep type: no exit.
        pm.write(cnt, &(SLP_EN | (1 << SLP_TYP_SHIFT)).to_le_bytes());
        assert_eq!(exit.reason(), None);
        let s5 = u16::from(pm.layout.s5_slp_typ) << SLP_TYP_SHIFT;
        pm.write(cnt, &s5.to_le_bytes());
        assert_eq!(exit.reason(), None, "no SLP_EN, no sleep");
        pm.write(cnt, &(SLP_EN | s5).to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::Poweroff));
    }

    #[test]
    fn timer_advances_and_wraps_at_24_bits() {
        let (mut pm, _) = pm();
        let tmr = u64::from(pm.layout.tmr_offset);
        let mut a = [0u8; 4];
        pm.read(tmr, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut b = [0u8; 4];
        pm.read(tmr, &mut b);
        let (a, b) = (u32::from_le_bytes(a), u32::from_le_bytes(b));
        assert!(b > a, "timer advanced: {a} -> {b}");
        assert!(b < 1 << 24);
    }

    #[test]
    fn state_round_trips_and_timer_continues() {
        use crate::persist::Persist;
        let (mut a, _) = pm();
        a.write(2, &0x0100u16.to_le_bytes()); // PWRBTN_EN
        let mut saved = a.save();
        saved.timer_ticks = 1_000_000;
        let (mut b, _) = pm();
        b.restore(1, saved.clone()).expect("restore");
        let after = b.save();
        assert_eq!(after.enable, 0x0100);
        assert!(
            after.timer_ticks >= 1_000_000,
            "timer continues, not from 0"
        );
        assert!(
            after.timer_ticks < 1_000_000 + PM_TIMER_HZ as u64,
            "within a second"
        );
        // Only the 24 bits the guest sees carry over.
        saved.timer_ticks = (7 << 24) + 5;
        b.restore(1, saved).expect("restore");
        let t = b.save().timer_ticks;
        assert!((5..5 + PM_TIMER_HZ as u64).contains(&t), "{t}");
    }

    #[test]
    fn power_button_raises_the_sci_until_cleared() {
        let (mut pm, exit) = pm();
        let line = IrqLine::new().expect("eventfd");
        let seen = line.try_clone().expect("clone");
        let fired = || seen.eventfd().read().unwrap_or(0);
        pm.set_sci(line);
        // Latched while the guest has not enabled the button: no SCI yet.
        pm.press_power_button();
        assert_eq!(fired(), 0);
        let mut b = [0u8; 2];
        pm.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b) & PWRBTN, PWRBTN, "PWRBTN_STS");
        pm.write(2, &PWRBTN.to_le_bytes());
        assert_eq!(fired(), 1, "enabling a latched event raises the SCI");
        assert!(pm.sci_pending());
        pm.resample();
        assert_eq!(fired(), 1, "still pending after EOI: raised again");
        pm.write(0, &PWRBTN.to_le_bytes());
        assert!(!pm.sci_pending(), "write-one-to-clear");
        pm.resample();
        assert_eq!(fired(), 0);
        pm.press_power_button();
        assert_eq!(fired(), 1, "enabled: raised at once");
        assert_eq!(exit.reason(), None, "the button alone powers nothing off");
    }

    #[test]
    fn reset_register() {
        let exit = ExitSignal::new().expect("eventfd");
        let layout = abide_machines::pc_1_0().legacy.reset;
        let mut r = ResetControl::new(layout, exit.clone());
        r.write(0, &[0x02]);
        assert_eq!(exit.reason(), None);
        r.write(0, &[layout.value]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
