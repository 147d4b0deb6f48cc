//! i8042 keyboard controller with no keyboard or mouse attached.
//!
//! It answers the controller commands an OS uses to probe it (read/write the
//! configuration byte, self-tests, port enable/disable), so a guest finds a
//! working controller quickly instead of timing out, and it pulses the CPU
//! reset line on command 0xFE, which ends the VM.

use std::collections::VecDeque;

use abide_machines::I8042Defaults;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::model::ModelError;

const DEVICE: &str = "i8042";
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Keyboard not inhibited (no keylock).
const STATUS_UNLOCKED: u8 = 1 << 4;
const STATUS_AUX_DATA: u8 = 1 << 5;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const CTR_KBD_INT: u8 = 1 << 0;
const CTR_AUX_INT: u8 = 1 << 1;
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
/// Output port: bit 0 is the (active-low) reset line, bit 1 the A20 gate.
const OUTPUT_RESET_INACTIVE: u8 = 1 << 0;
const OUTPUT_A20: u8 = 1 << 1;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// What a device-less port answers to a byte sent to it: "no device".
const NO_DEVICE: u8 = 0xfe;

/// Saved i8042 state (version 1).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042StateV1 {
    /// Controller configuration byte.
    pub ctr: u8,
    /// Output port.
    pub output_port: u8,
    /// Command waiting for its data byte.
    pub pending_write: Option<u8>,
    /// Whether the last write was a command.
    pub last_was_command: bool,
    /// Bytes waiting for the guest, with whether each is from the aux port.
    pub output: Vec<(u8, bool)>,
}

impl crate::persist::Persist for I8042 {
    const KIND: &'static str = "i8042";
    const VERSION: u32 = 1;
    type State = I8042StateV1;

    fn save(&self) -> I8042StateV1 {
        I8042StateV1 {
            ctr: self.ctr,
            output_port: self.output_port,
            pending_write: self.pending_write,
            last_was_command: self.last_was_command,
            output: self.output.iter().copied().collect(),
        }
    }

    fn restore(
        &mut self,
        _version: u32,
        s: I8042StateV1,
    ) -> Result<(), crate::persist::PersistError> {
        if s.output.len() > 16 {
            return Err(crate::persist::PersistError::Invalid {
                device: "i8042",
                reason: format!("{} queued bytes, at most 16", s.output.len()),
            });
        }
        self.ctr = s.ctr;
        self.output_port = s.output_port;
        self.pending_write = s.pending_write;
        self.last_was_command = s.last_was_command;
        self.output = s.output.into_iter().collect();
        Ok(())
    }
}

/// The i8042 at data port + command port (`base`, `base` + the machine's
/// command offset).
#[derive(Debug)]
pub struct I8042 {
    /// Offset of the command/status port from the data port.
    command_offset: u64,
    ctr: u8,
    output_port: u8,
    pending_write: Option<u8>,
    last_was_command: bool,
    /// Bytes for the guest, with whether each came from the aux port.
    output: VecDeque<(u8, bool)>,
    exit: ExitSignal,
}

impl I8042 {
    /// A controller with the machine's defaults whose reset command ends
    /// the VM through `exit`.
    pub fn new(exit: ExitSignal, defaults: I8042Defaults) -> Result<Self, ModelError> {
        let d = defaults;
        if d.command_offset == 0 {
            return Err(ModelError::value(
                DEVICE,
                "command_offset",
                d.command_offset,
                "the command port cannot be the data port",
            ));
        }
        if d.config_byte & (CTR_KBD_INT | CTR_AUX_INT) != 0 {
            return Err(ModelError::value(
                DEVICE,
                "config_byte",
                format!("{:#04x}", d.config_byte),
                "no port raises an interrupt (bits 0 and 1 must be clear)",
            ));
        }
        let needed = OUTPUT_RESET_INACTIVE | OUTPUT_A20;
        if d.output_port & needed != needed {
            return Err(ModelError::value(
                DEVICE,
                "output_port",
                format!("{:#04x}", d.output_port),
                "the CPU runs and A20 is always enabled (bits 0 and 1 must be set)",
            ));
        }
        Ok(Self {
            command_offset: u64::from(d.command_offset),
            ctr: d.config_byte,
            output_port: d.output_port,
            pending_write: None,
            last_was_command: false,
            output: VecDeque::new(),
            exit,
        })
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED;
        if let Some(&(_, aux)) = self.output.front() {
            s |= STATUS_OUTPUT_FULL;
            if aux {
                s |= STATUS_AUX_DATA;
            }
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn reply(&mut self, v: u8) {
        self.push(v, false);
    }

    fn push(&mut self, v: u8, aux: bool) {
        // Bounded: a guest issuing commands without reading gets old bytes dropped.
        if self.output.len() >= 16 {
            self.output.pop_front();
        }
        self.output.push_back((v, aux));
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_AUX_OUTPUT | CMD_WRITE_AUX => {
                self.pending_write = Some(cmd)
            }
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.reply(PORT_TEST_OK),
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_PULSE_RESET => self.exit.request(ExitReason::Reset),
            // Pulse output lines 0xf0-0xfd: bit 0 clear pulses reset too.
            0xf0..=0xfd if cmd & 1 == 0 => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        self.last_was_command = false;
        match self.pending_write.take() {
            Some(CMD_WRITE_CTR) => self.ctr = v,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = v;
                if v & 1 == 0 {
                    self.exit.request(ExitReason::Reset);
                }
            }
            // Loop the byte back as if the mouse had sent it.
            Some(CMD_WRITE_AUX_OUTPUT) => self.push(v, true),
            // Nothing is attached to either port.
            Some(CMD_WRITE_AUX) => self.push(NO_DEVICE, true),
            _ => self.reply(NO_DEVICE),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => self.output.pop_front().map_or(0, |(v, _)| v),
            o if o == self.command_offset => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            0 => self.data(v),
            o if o == self.command_offset => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pc-1.0's command port offset.
    const COMMAND_OFFSET: u64 = 4;
    const CTR_SYSTEM_FLAG: u8 = 1 << 2;

    fn kbd() -> (I8042, ExitSignal) {
        let exit = ExitSignal::new().expect("eventfd");
        let d = abide_machines::pc_1_0().legacy_defaults.i8042;
        assert_eq!(u64::from(d.command_offset), COMMAND_OFFSET);
        (I8042::new(exit.clone(), d).expect("i8042"), exit)
    }

    #[test]
    fn undeclarable_defaults_are_refused() {
        let refusal = |edit: &dyn Fn(&mut I8042Defaults)| {
            let mut d = abide_machines::pc_1_0().legacy_defaults.i8042;
            edit(&mut d);
            let exit = ExitSignal::new().expect("eventfd");
            I8042::new(exit, d).expect_err("refused").to_string()
        };
        assert!(refusal(&|d| d.command_offset = 0).contains("command_offset = 0"));
        assert!(refusal(&|d| d.config_byte = 0x35).contains("config_byte = 0x35"));
        let e = refusal(&|d| d.output_port = 0x01);
        assert!(
            e.contains("i8042") && e.contains("output_port = 0x01"),
            "{e}"
        );
    }

    #[test]
    fn command_port_follows_the_machine() {
        let exit = ExitSignal::new().expect("eventfd");
        let mut d = abide_machines::pc_1_0().legacy_defaults.i8042;
        d.command_offset = 2;
        let mut k = I8042::new(exit, d).expect("i8042");
        k.write(2, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut k, 0), SELF_TEST_OK);
        assert_eq!(read(&mut k, 4), 0xff, "nothing at pc-1.0's offset");
    }

    fn read(k: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        k.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_ends_vm() {
        let (mut k, exit) = kbd();
        k.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(exit.reason(), None);
        k.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn ctr_round_trip_and_self_test() {
        let (mut k, exit) = kbd();
        let status = read(&mut k, COMMAND_OFFSET);
        assert_eq!(status & STATUS_OUTPUT_FULL, 0);
        assert_ne!(status & STATUS_UNLOCKED, 0, "no keylock");
        k.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&mut k, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        let ctr = read(&mut k, 0);
        assert_eq!(ctr & CTR_SYSTEM_FLAG, CTR_SYSTEM_FLAG);
        k.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        k.write(0, &[0x47]);
        k.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut k, 0), 0x47);
        k.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut k, 0), SELF_TEST_OK);
        k.write(COMMAND_OFFSET, &[CMD_TEST_KBD]);
        assert_eq!(read(&mut k, 0), PORT_TEST_OK);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn aux_loopback_sets_aux_bit() {
        let (mut k, _) = kbd();
        k.write(COMMAND_OFFSET, &[CMD_WRITE_AUX_OUTPUT]);
        k.write(0, &[0x5a]);
        assert_ne!(read(&mut k, COMMAND_OFFSET) & STATUS_AUX_DATA, 0);
        assert_eq!(read(&mut k, 0), 0x5a);
    }

    #[test]
    fn output_port_reset_line() {
        let (mut k, exit) = kbd();
        k.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        k.write(0, &[0x03]);
        assert_eq!(exit.reason(), None);
        k.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        k.write(0, &[0x02]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn state_round_trips() {
        use crate::persist::Persist;
        let (mut a, _) = kbd();
        a.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        a.write(0, &[0x47]);
        a.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let (v, bytes) = a.save_section();
        let (mut b, _) = kbd();
        b.restore_section(v, &bytes).expect("restore");
        assert_eq!(read(&mut b, 0), SELF_TEST_OK, "queued reply survives");
        b.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut b, 0), 0x47);
        let mut big = a.save();
        big.output = vec![(0, false); 17];
        assert!(b.restore(1, big).is_err());
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut k, _) = kbd();
        for _ in 0..1000 {
            k.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        assert!(k.output.len() <= 16);
    }
}
