//! MSI-X: the vector table and pending-bit array a function exposes in a
//! BAR, and the capability that enables and masks them.
//!
//! Delivery goes through an [`MsiController`], which the VMM implements with
//! KVM GSI routes and irqfds: a route per vector is kept up to date with the
//! guest's table, and raising a vector is one eventfd write.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
const MSG_CTRL_ENABLE: u16 = 1 << 15;
const MSG_CTRL_FUNCTION_MASK: u16 = 1 << 14;

/// An MSI message: where the guest wants the interrupt written, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// Delivers MSI-X vectors of one function.
pub trait MsiController: Send + Sync {
    /// Points `vector` at `msg`, or disables its route (`None`).
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> std::io::Result<()>;
    /// Raises `vector` (its route is set and unmasked).
    fn trigger(&self, vector: u16) -> std::io::Result<()>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.ctrl & CTRL_MASKED != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Saved MSI-X state: the vector table, the pending bits and the enable
/// and function-mask bits of the message control word.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MsixState {
    /// Table entries: message address low, address high, data, vector
    /// control.
    pub entries: Vec<[u32; 4]>,
    /// Pending-bit array, 64 vectors per word.
    pub pending: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// A function's MSI-X state.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    controller: Arc<dyn MsiController>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl Msix {
    /// `vectors` entries (all masked, as after reset), delivered by `controller`.
    pub fn new(vectors: u16, controller: Arc<dyn MsiController>) -> Self {
        Self {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Entry::default()
                };
                usize::from(vectors)
            ],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
            controller,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Table size in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// PBA size in bytes.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body (ID, next, message control, table and PBA
    /// offset/BIR) and its writable masks, for [`crate::pci::PciConfig::add_capability`].
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u32>) {
        let ctrl = self.vectors() - 1;
        let mut b = vec![CAP_ID, 0];
        b.extend_from_slice(&ctrl.to_le_bytes());
        b.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        b.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let writable = u32::from(MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK) << 16;
        (b, vec![writable, 0, 0])
    }

    /// Applies the guest's message control word (from the capability).
    pub fn set_message_control(&mut self, ctrl: u16) {
        let was_active = self.enabled && !self.function_masked;
        self.enabled = ctrl & MSG_CTRL_ENABLE != 0;
        self.function_masked = ctrl & MSG_CTRL_FUNCTION_MASK != 0;
        if !was_active && self.enabled && !self.function_masked {
            self.deliver_pending();
        }
    }

    /// Whether MSI-X is enabled (otherwise the function uses INTx).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.pending[v / 64] &= !(1 << (v % 64));
        }
    }

    fn deliver_pending(&mut self) {
        for v in 0..self.entries.len() {
            if self.is_pending(v) && !self.entries[v].masked() {
                self.set_pending(v, false);
                let _ = self.controller.trigger(v as u16);
            }
        }
    }

    /// Raises `vector`. Returns false if MSI-X is disabled or the vector does
    /// not exist (the caller may fall back to INTx).
    pub fn notify(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return false;
        }
        if self.function_masked || self.entries[v].masked() {
            self.set_pending(v, true);
        } else {
            let _ = self.controller.trigger(vector);
        }
        true
    }

    /// Guest read in the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        read_words(offset, data, |i| {
            let e = self.entries.get(i / 4)?;
            Some(match i % 4 {
                0 => e.addr_lo,
                1 => e.addr_hi,
                2 => e.data,
                _ => e.ctrl,
            })
        });
    }

    /// Guest write in the table. Only aligned dword and qword writes are
    /// honoured, as the PCI spec allows.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !offset.is_multiple_of(4) || (data.len() != 4 && data.len() != 8) {
            return;
        }
        for (n, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let value = u32::from_le_bytes(b);
            let word = (offset / 4) as usize + n;
            let Some(e) = self.entries.get_mut(word / 4) else {
                return;
            };
            let before = *e;
            match word % 4 {
                0 => e.addr_lo = value,
                1 => e.addr_hi = value,
                2 => e.data = value,
                _ => e.ctrl = value & CTRL_MASKED,
            }
            let after = *e;
            if before != after {
                self.entry_changed(word / 4, before, after);
            }
        }
    }

    fn entry_changed(&mut self, v: usize, before: Entry, after: Entry) {
        let effective = |e: Entry| (!e.masked()).then(|| e.message());
        if effective(before) != effective(after) {
            let _ = self.controller.set_route(v as u16, effective(after));
        }
        if before.masked()
            && !after.masked()
            && self.enabled
            && !self.function_masked
            && self.is_pending(v)
        {
            self.set_pending(v, false);
            let _ = self.controller.trigger(v as u16);
        }
    }

    /// Captures the table, pending bits and control bits.
    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctrl])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Applies a saved state and programs the controller's route of every
    /// vector from it (its message when unmasked, none when masked), as if
    /// the guest had just written the whole table: in a new process, the
    /// hypervisor's routes are rebuilt. Pending vectors stay pending and no
    /// interrupt is raised. Refuses a vector count other than this
    /// function's, pending bits of vectors that do not exist and vector
    /// control bits the guest cannot set; a route the controller refuses
    /// is an error too.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        let vectors = self.entries.len();
        if s.entries.len() != vectors || s.pending.len() != self.pending.len() {
            return Err(format!(
                "MSI-X state has {} vectors and {} pending words, the function has {} and {}",
                s.entries.len(),
                s.pending.len(),
                vectors,
                self.pending.len()
            ));
        }
        let beyond =
            (vectors..self.pending.len() * 64).any(|v| s.pending[v / 64] & (1 << (v % 64)) != 0);
        if beyond {
            return Err("MSI-X pending bit set for a vector that does not exist".into());
        }
        if let Some(v) = s.entries.iter().position(|e| e[3] & !CTRL_MASKED != 0) {
            return Err(format!("MSI-X vector {v} has reserved control bits set"));
        }
        for (e, saved) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                addr_lo: saved[0],
                addr_hi: saved[1],
                data: saved[2],
                ctrl: saved[3],
            };
        }
        self.pending.copy_from_slice(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for (v, e) in self.entries.iter().enumerate() {
            let msg = (!e.masked()).then(|| e.message());
            self.controller
                .set_route(v as u16, msg)
                .map_err(|err| format!("MSI-X vector {v}: cannot set its route: {err}"))?;
        }
        Ok(())
    }

    /// Guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        read_words(offset, data, |i| {
            let q = self.pending.get(i / 2)?;
            Some(if i % 2 == 0 {
                *q as u32
            } else {
                (q >> 32) as u32
            })
        });
    }
}

fn read_words(offset: u64, data: &mut [u8], word: impl Fn(usize) -> Option<u32>) {
    for (i, d) in data.iter_mut().enumerate() {
        let byte = offset as usize + i;
        *d = word(byte / 4).map_or(0, |w| w.to_le_bytes()[byte % 4]);
    }
}

/// A controller for tests that records routes and triggers.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    /// Every `set_route` call, in order.
    pub routes: std::sync::Mutex<Vec<(u16, Option<MsiMessage>)>>,
    /// Every triggered vector, in order.
    pub fired: std::sync::Mutex<Vec<u16>>,
}

#[cfg(test)]
impl MsiController for Recorder {
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
        self.routes.lock().expect("lock").push((vector, msg));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.fired.lock().expect("lock").push(vector);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w32(m: &mut Msix, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }

    fn setup() -> (Msix, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Msix::new(3, rec.clone()), rec)
    }

    #[test]
    fn program_unmask_and_fire() {
        let (mut m, rec) = setup();
        assert!(!m.notify(0), "disabled MSI-X falls back");
        m.set_message_control(MSG_CTRL_ENABLE);
        w32(&mut m, 16, 0xfee0_0000);
        w32(&mut m, 20, 0);
        w32(&mut m, 24, 0x4041);
        assert!(rec.routes.lock().expect("lock").is_empty(), "still masked");
        w32(&mut m, 28, 0);
        assert_eq!(
            rec.routes.lock().expect("lock").last(),
            Some(&(
                1,
                Some(MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x4041
                })
            ))
        );
        assert!(m.notify(1));
        assert_eq!(*rec.fired.lock().expect("lock"), vec![1]);
        let mut b = [0u8; 4];
        m.read_table(24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x4041);
        assert!(!m.notify(7), "no such vector");
    }

    #[test]
    fn masked_vectors_pend_and_deliver_on_unmask() {
        let (mut m, rec) = setup();
        m.set_message_control(MSG_CTRL_ENABLE);
        assert!(m.notify(2));
        assert!(rec.fired.lock().expect("lock").is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b100);
        w32(&mut m, 2 * 16 + 12, 0);
        assert_eq!(*rec.fired.lock().expect("lock"), vec![2]);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Function mask holds everything, clearing it delivers.
        m.set_message_control(MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK);
        assert!(m.notify(2));
        assert_eq!(rec.fired.lock().expect("lock").len(), 1);
        m.set_message_control(MSG_CTRL_ENABLE);
        assert_eq!(*rec.fired.lock().expect("lock"), vec![2, 2]);
    }

    #[test]
    fn state_round_trips_and_reprograms_routes() {
        let (mut a, _) = setup();
        a.set_message_control(MSG_CTRL_ENABLE);
        // Vector 0: programmed and unmasked. Vector 1: programmed but
        // masked, with an interrupt pending. Vector 2: untouched.
        w32(&mut a, 0, 0xfee0_0000);
        w32(&mut a, 8, 0x4031);
        w32(&mut a, 12, 0);
        w32(&mut a, 16, 0xfee0_1000);
        w32(&mut a, 20, 0x1);
        w32(&mut a, 24, 0x4032);
        assert!(a.notify(1));
        let s = a.save();
        assert_eq!(s.entries[0], [0xfee0_0000, 0, 0x4031, 0]);
        assert_eq!(s.entries[1], [0xfee0_1000, 1, 0x4032, CTRL_MASKED]);
        assert_eq!(s.pending, vec![0b10]);
        assert!(s.enabled && !s.function_masked);
        // Through serde, as a snapshot stores it.
        let s: MsixState =
            serde_json::from_slice(&serde_json::to_vec(&s).expect("ser")).expect("de");

        let rec = Arc::new(Recorder::default());
        let mut b = Msix::new(3, rec.clone());
        b.restore(&s).expect("restore");
        assert_eq!(b.save(), s);
        let msg0 = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x4031,
        };
        assert_eq!(
            *rec.routes.lock().expect("lock"),
            vec![(0, Some(msg0)), (1, None), (2, None)],
            "every vector's route programmed from the table"
        );
        assert!(rec.fired.lock().expect("lock").is_empty(), "nothing fired");
        let mut pba = [0u8; 8];
        b.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10, "pending bit kept");
        let mut t = [0u8; 4];
        b.read_table(24, &mut t);
        assert_eq!(u32::from_le_bytes(t), 0x4032);
        // The restored function behaves: vector 0 fires, unmasking 1
        // delivers its pending interrupt.
        assert!(b.notify(0));
        w32(&mut b, 28, 0);
        assert_eq!(*rec.fired.lock().expect("lock"), vec![0, 1]);

        // Mismatches are refused.
        let mut c = Msix::new(4, Arc::new(Recorder::default()));
        assert!(c.restore(&s).is_err(), "vector count");
        let mut bad = s.clone();
        bad.pending[0] |= 1 << 5;
        assert!(b.restore(&bad).is_err(), "pending bit past the table");
        let mut bad = s.clone();
        bad.entries[2][3] = 0x2;
        assert!(b.restore(&bad).is_err(), "reserved control bits");
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut m, rec) = setup();
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        m.write_table(1000, &[1, 2, 3, 4]);
        assert!(rec.routes.lock().expect("lock").is_empty());
        let mut b = [0xaa; 4];
        m.read_table(1000, &mut b);
        assert_eq!(b, [0; 4]);
        let (cap, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(cap[0], CAP_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2, "table size - 1");
        assert_eq!(mask.len(), 3);
    }
}
