//! PCI configuration space and MSI-X table accesses as a guest makes
//! them (any offset, any width, any value), and the saved forms of both
//! as a snapshot or migration stream delivers them.
#![no_main]

use std::sync::{Arc, Mutex};

use abide_devices::pci::config::{BarKind, BarSpec, PciConfig, PciIds};
use abide_devices::pci::msix::{MsiController, MsiMessage, Msix, MsixState};
use libfuzzer_sys::fuzz_target;

/// Records routes; checks that only declared vectors are used.
struct Routes {
    vectors: u16,
    set: Mutex<Vec<(u16, Option<MsiMessage>)>>,
}

impl MsiController for Routes {
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
        assert!(
            vector < self.vectors,
            "route for vector {vector} of {}",
            self.vectors
        );
        let mut s = self.set.lock().expect("lock");
        if s.len() < 1024 {
            s.push((vector, msg));
        }
        Ok(())
    }
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        assert!(
            vector < self.vectors,
            "trigger of vector {vector} of {}",
            self.vectors
        );
        Ok(())
    }
}

fn ids() -> PciIds {
    PciIds {
        vendor: 0x1af4,
        device: 0x1042,
        subsystem_vendor: 0x1af4,
        subsystem: 0x0002,
        revision: 1,
        class: 0x01_0000,
    }
}

fn take<const N: usize>(d: &mut &[u8]) -> Option<[u8; N]> {
    let (h, t) = d.split_first_chunk::<N>()?;
    *d = t;
    Some(*h)
}

fuzz_target!(|data: &[u8]| {
    let mut d = data;
    let Some([vectors_byte, mode]) = take::<2>(&mut d) else {
        return;
    };
    let vectors = u16::from(vectors_byte % 64) + 1;
    let routes = Arc::new(Routes {
        vectors,
        set: Mutex::new(Vec::new()),
    });
    let mut msix = Msix::new(vectors, routes.clone());
    let mut cfg = PciConfig::new(ids(), 1);
    let _ = cfg.set_bar(
        0,
        BarSpec {
            kind: BarKind::Mem64,
            size: 0x4000,
            prefetchable: false,
        },
    );
    let _ = cfg.set_bar(
        2,
        BarSpec {
            kind: BarKind::Io,
            size: 0x40,
            prefetchable: false,
        },
    );
    let _ = cfg.set_rom_slot(0x20000);
    let (cap, writable) = msix.capability(0, 0, 0x2000);
    let _ = cfg.add_capability(&cap, &writable);

    if mode & 1 == 1 {
        // Restore saved state first, as restore and migration do.
        let n = usize::from(mode >> 1);
        let regs: Vec<u32> = d
            .chunks_exact(4)
            .take(n)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let _ = cfg.restore_regs(&regs);
        d = &d[(regs.len() * 4).min(d.len())..];
        if let Some([len]) = take::<1>(&mut d) {
            let (json, rest) = d.split_at(usize::from(len).min(d.len()));
            if let Ok(state) = serde_json::from_slice::<MsixState>(json) {
                let _ = msix.restore(&state);
            }
            d = rest;
        }
    }

    // Accesses: op, offset (u16), width, value (u32).
    while let Some([op, lo, hi, w, v0, v1, v2, v3]) = take::<8>(&mut d) {
        let offset = usize::from(u16::from_le_bytes([lo, hi]));
        let width = [1usize, 2, 4, 8][usize::from(w & 3)];
        let value = [v0, v1, v2, v3, v0, v1, v2, v3];
        let mut out = [0u8; 8];
        match op % 8 {
            0 => cfg.read(offset, &mut out[..width]),
            1 => {
                if cfg.write(offset, &value[..width]) {
                    let _ = cfg.mappings();
                }
            }
            2 => msix.read_table(offset as u64, &mut out[..width]),
            3 => msix.write_table(offset as u64, &value[..width]),
            4 => msix.read_pba(offset as u64, &mut out[..width]),
            5 => msix.set_message_control(u16::from_le_bytes([v0, v1])),
            6 => {
                let _ = msix.notify(u16::from_le_bytes([v0, v1]));
            }
            _ => {
                let saved = msix.save();
                msix.restore(&saved).expect("a saved MSI-X state restores");
                let regs = cfg.save_regs();
                cfg.restore_regs(&regs).expect("saved registers restore");
            }
        }
        let _ = cfg.command();
        for i in 0..6 {
            let _ = cfg.bar_addr(i);
        }
    }
});
