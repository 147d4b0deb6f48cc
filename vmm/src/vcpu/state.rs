//! vCPU and VM (in-kernel irqchip, PIT, clock) state for snapshots.
//!
//! KVM's state structures are kernel ABI: their layout never changes, so
//! they are stored as their raw bytes (hex in the section's JSON). Each
//! section carries a version; a newer one is refused.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Version of [`VcpuState`].
pub const VCPU_VERSION: u32 = 1;
/// Version of [`VmState`].
pub const VM_VERSION: u32 = 1;

/// Errors saving or loading KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what}: KVM refused")]
    Kvm {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saved bytes that do not fit the structure.
    #[error("{what}: saved state is {found} bytes, expected {expected}")]
    Size {
        /// What.
        what: &'static str,
        /// Found.
        found: usize,
        /// Expected.
        expected: usize,
    },
    /// Saved state that does not parse.
    #[error("{0}")]
    Malformed(String),
    /// A section from a newer Abide.
    #[error("{what} state version {found} is newer than this Abide's {supported}")]
    Newer {
        /// What.
        what: &'static str,
        /// Found.
        found: u32,
        /// Supported.
        supported: u32,
    },
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    let what = what.into();
    move |source| StateError::Kvm { what, source }
}

/// A KVM ABI structure stored as its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Raw(String);

impl Raw {
    fn of<T>(v: &T) -> Self {
        // SAFETY: T is a plain C structure from kvm-bindings (Copy, no
        // pointers); reading its bytes is reading initialized memory (the
        // structures are zero-initialized before KVM fills them).
        let bytes = unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        Raw(hex::encode(bytes))
    }

    fn to<T: Default>(&self, what: &'static str) -> Result<T, StateError> {
        let bytes = hex::decode(&self.0)
            .map_err(|e| StateError::Malformed(format!("{what}: not hex: {e}")))?;
        let expected = std::mem::size_of::<T>();
        if bytes.len() != expected {
            return Err(StateError::Size {
                what,
                found: bytes.len(),
                expected,
            });
        }
        let mut v = T::default();
        // SAFETY: `bytes` holds exactly size_of::<T>() bytes, and every bit
        // pattern is valid for these plain integer structures.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut v as *mut T).cast::<u8>(),
                expected,
            );
        }
        Ok(v)
    }
}

/// One vCPU's architectural state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: Raw,
    /// Segment, control and descriptor-table registers.
    pub sregs: Raw,
    /// Legacy FPU/SSE state (used when XSAVE is not available).
    pub fpu: Raw,
    /// XSAVE area, if the host supports it.
    pub xsave: Option<Raw>,
    /// Extended control registers, if the host supports them.
    pub xcrs: Option<Raw>,
    /// Debug registers.
    pub debugregs: Raw,
    /// Local APIC registers.
    pub lapic: Raw,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: Raw,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: u32,
    /// Model-specific registers (index, value), kvmclock and TSC included.
    pub msrs: Vec<(u32, u64)>,
}

/// Reads the MSRs in `indices` that this vCPU has; an MSR KVM lists but
/// refuses to read for this CPU model is left out.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Malformed(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it refuses: skip that one.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let batch = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Malformed(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&batch).map_err(kvm("write MSRs"))?;
        if n < rest.len() {
            let (index, data) = rest[n];
            return Err(StateError::Malformed(format!(
                "KVM refused MSR {index:#x} = {data:#x}; this host cannot hold the saved vCPU state"
            )));
        }
        rest = &rest[n..];
    }
    Ok(())
}

impl VcpuState {
    /// Saves a paused vCPU (not inside KVM_RUN, pending I/O completed).
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
        let regs = fd.get_regs().map_err(kvm("read registers"))?;
        let sregs = fd.get_sregs().map_err(kvm("read special registers"))?;
        let fpu = fd.get_fpu().map_err(kvm("read the FPU"))?;
        let xsave = fd.get_xsave().ok();
        let xcrs = fd.get_xcrs().ok();
        let debugregs = fd.get_debug_regs().map_err(kvm("read debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm("read the local APIC"))?;
        let msrs = read_msrs(fd, msr_indices)?;
        // Events last: reading other state can change what is pending.
        let events = fd.get_vcpu_events().map_err(kvm("read vCPU events"))?;
        Ok(Self {
            regs: Raw::of::<kvm_regs>(&regs),
            sregs: Raw::of::<kvm_sregs>(&sregs),
            fpu: Raw::of::<kvm_fpu>(&fpu),
            xsave: xsave.as_ref().map(Raw::of::<kvm_xsave>),
            xcrs: xcrs.as_ref().map(Raw::of::<kvm_xcrs>),
            debugregs: Raw::of::<kvm_debugregs>(&debugregs),
            lapic: Raw::of::<kvm_lapic_state>(&lapic),
            events: Raw::of::<kvm_vcpu_events>(&events),
            mp_state: mp_state.mp_state,
            msrs,
        })
    }

    /// Checks that every structure decodes, before anything is loaded.
    pub fn check(&self) -> Result<(), StateError> {
        self.regs.to::<kvm_regs>("registers")?;
        self.sregs.to::<kvm_sregs>("special registers")?;
        self.fpu.to::<kvm_fpu>("FPU")?;
        if let Some(x) = &self.xsave {
            x.to::<kvm_xsave>("XSAVE")?;
        }
        if let Some(x) = &self.xcrs {
            x.to::<kvm_xcrs>("XCRs")?;
        }
        self.debugregs.to::<kvm_debugregs>("debug registers")?;
        self.lapic.to::<kvm_lapic_state>("local APIC")?;
        self.events.to::<kvm_vcpu_events>("vCPU events")?;
        Ok(())
    }

    /// Loads the state into a new vCPU whose CPUID is already set.
    pub fn load(&self, fd: &VcpuFd) -> Result<(), StateError> {
        fd.set_sregs(&self.sregs.to("special registers")?)
            .map_err(kvm("load special registers"))?;
        fd.set_regs(&self.regs.to("registers")?)
            .map_err(kvm("load registers"))?;
        match &self.xsave {
            Some(x) => {
                let xsave: kvm_xsave = x.to("XSAVE")?;
                // SAFETY: the area was read by KVM_GET_XSAVE on a vCPU with
                // the same CPUID (the ABI check guarantees it), so its size
                // matches what this vCPU expects.
                unsafe { fd.set_xsave(&xsave) }.map_err(kvm("load the XSAVE area"))?;
            }
            None => fd
                .set_fpu(&self.fpu.to("FPU")?)
                .map_err(kvm("load the FPU"))?,
        }
        if let Some(x) = &self.xcrs {
            fd.set_xcrs(&x.to("XCRs")?).map_err(kvm("load XCRs"))?;
        }
        // The LAPIC before the MSRs: the TSC deadline only sticks once the
        // timer is in deadline mode.
        fd.set_lapic(&self.lapic.to("local APIC")?)
            .map_err(kvm("load the local APIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm("load the MP state"))?;
        fd.set_debug_regs(&self.debugregs.to("debug registers")?)
            .map_err(kvm("load debug registers"))?;
        fd.set_vcpu_events(&self.events.to("vCPU events")?)
            .map_err(kvm("load vCPU events"))?;
        Ok(())
    }
}

/// The in-kernel interrupt controllers, PIT and clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`kvm_irqchip` each).
    pub irqchips: Vec<Raw>,
    /// PIT (`kvm_pit_state2`).
    pub pit: Raw,
    /// kvmclock (`kvm_clock_data`).
    pub clock: Raw,
    /// Host wall-clock time of the save (ns since the Unix epoch).
    pub saved_at_ns: u64,
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Saves the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = Vec::new();
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm(format!("read irqchip {chip_id}")))?;
            irqchips.push(Raw::of(&chip));
        }
        let pit = vm.get_pit2().map_err(kvm("read the PIT"))?;
        let clock = vm.get_clock().map_err(kvm("read the KVM clock"))?;
        Ok(Self {
            irqchips,
            pit: Raw::of::<kvm_pit_state2>(&pit),
            clock: Raw::of::<kvm_clock_data>(&clock),
            saved_at_ns: realtime_ns(),
        })
    }

    /// Checks that every structure decodes, before anything is loaded.
    pub fn check(&self) -> Result<(), StateError> {
        if self.irqchips.len() != CHIPS.len() {
            return Err(StateError::Malformed(format!(
                "{} irqchips saved, expected {}",
                self.irqchips.len(),
                CHIPS.len()
            )));
        }
        for (raw, id) in self.irqchips.iter().zip(CHIPS) {
            let chip: kvm_irqchip = raw.to("irqchip")?;
            if chip.chip_id != id {
                return Err(StateError::Malformed(format!(
                    "irqchip {} saved where {id} belongs",
                    chip.chip_id
                )));
            }
        }
        self.pit.to::<kvm_pit_state2>("PIT")?;
        self.clock.to::<kvm_clock_data>("KVM clock")?;
        Ok(())
    }

    /// Loads the state. The guest clock continues from the saved value,
    /// advanced by the wall-clock time since the save, so guest time moves
    /// on with the world instead of freezing at the save. KVM does that
    /// itself when the host supports `KVM_CLOCK_REALTIME`; otherwise the
    /// elapsed time is added here.
    pub fn load(&self, vm: &VmFd, clock_flags: u32) -> Result<(), StateError> {
        self.check()?;
        for raw in &self.irqchips {
            let chip: kvm_irqchip = raw.to("irqchip")?;
            vm.set_irqchip(&chip)
                .map_err(kvm(format!("load irqchip {}", chip.chip_id)))?;
        }
        vm.set_pit2(&self.pit.to("PIT")?)
            .map_err(kvm("load the PIT"))?;
        let saved: kvm_clock_data = self.clock.to("KVM clock")?;
        let mut clock = kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        };
        if saved.flags & KVM_CLOCK_REALTIME != 0 && clock_flags & KVM_CLOCK_REALTIME != 0 {
            clock.flags = KVM_CLOCK_REALTIME;
            clock.realtime = saved.realtime;
        } else {
            clock.clock = clock
                .clock
                .saturating_add(realtime_ns().saturating_sub(self.saved_at_ns));
        }
        vm.set_clock(&clock).map_err(kvm("load the KVM clock"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_structures_round_trip_and_sizes_are_checked() {
        let regs = kvm_regs {
            rip: 0x1234_5678,
            rflags: 0x202,
            ..Default::default()
        };
        let raw = Raw::of(&regs);
        let back: kvm_regs = raw.to("registers").expect("decode");
        assert_eq!(back.rip, 0x1234_5678);
        assert_eq!(back.rflags, 0x202);
        // Another structure's bytes do not fit.
        let err = raw.to::<kvm_sregs>("special registers").expect_err("size");
        assert!(matches!(err, StateError::Size { .. }), "{err}");
        let err = Raw("zz".into())
            .to::<kvm_regs>("registers")
            .expect_err("hex");
        assert!(matches!(err, StateError::Malformed(_)), "{err}");
    }

    #[test]
    fn vm_state_check_refuses_a_wrong_chip_order() {
        let chip = |chip_id| {
            Raw::of(&kvm_irqchip {
                chip_id,
                ..Default::default()
            })
        };
        let good = VmState {
            irqchips: vec![chip(0), chip(1), chip(2)],
            pit: Raw::of(&kvm_pit_state2::default()),
            clock: Raw::of(&kvm_clock_data::default()),
            saved_at_ns: 0,
        };
        good.check().expect("valid");
        let swapped = VmState {
            irqchips: vec![chip(2), chip(1), chip(0)],
            ..good.clone()
        };
        assert!(swapped.check().is_err());
        let short = VmState {
            irqchips: vec![chip(0)],
            ..good
        };
        assert!(short.check().is_err());
    }
}
