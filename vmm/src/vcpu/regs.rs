//! Architectural vCPU state at boot: segments, registers, FPU, MSRs, LAPIC.
//!
//! The boot vCPU's registers, segments and GDT are fixed by the boot
//! protocols (32-bit flat protected mode, paging off); everything else a
//! vCPU starts with (FPU control, MSRs, LAPIC LINT wiring) is the machine's
//! `cpu_reset` and `irqchip`.

use abide_firmware::boot::{BootEntry, BootProtocol, BOOT_CS, BOOT_DS, BOOT_GDT};
use abide_machines::MachineDescription;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

/// LAPIC register offsets of LVT0 (LINT0) and LVT1 (LINT1).
const APIC_LVT: [usize; 2] = [0x350, 0x360];

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("cannot {what} on vCPU {index}")]
    Kvm {
        /// What we were doing.
        what: &'static str,
        /// vCPU index.
        index: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The machine sets an MSR this host's KVM does not list.
    #[error("machine type '{machine}' starts vCPUs with MSR {msr:#x} set, which this host's KVM does not offer")]
    UnknownMsr {
        /// Machine type.
        machine: String,
        /// MSR index.
        msr: u32,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {index}")]
    Msrs {
        /// Accepted.
        set: usize,
        /// Given.
        wanted: usize,
        /// vCPU index.
        index: u32,
    },
}

fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit_raw = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU in flat 32-bit protected mode at the kernel entry.
pub fn setup_boot_cpu(vcpu: &VcpuFd, boot: &BootEntry) -> Result<(), RegsError> {
    let kvm = |what| {
        move |source| RegsError::Kvm {
            what,
            index: 0,
            source,
        }
    };
    let mut sregs = vcpu.get_sregs().map_err(kvm("read sregs"))?;
    let code = segment_from_gdt(BOOT_GDT[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment_from_gdt(BOOT_GDT[usize::from(BOOT_DS / 8)], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = boot.gdt_addr;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;

    let mut regs = kvm_regs {
        rip: boot.entry,
        rflags: 0x2,
        ..Default::default()
    };
    match boot.protocol {
        BootProtocol::Linux { zero_page } => regs.rsi = zero_page,
        BootProtocol::Pvh { start_info } => regs.rbx = start_info,
    }
    vcpu.set_regs(&regs).map_err(kvm("set registers"))?;
    Ok(())
}

/// FPU, MSRs and LAPIC LINT pins, for every vCPU, as the machine's
/// `cpu_reset` and `irqchip` give them. Every MSR must be one KVM lists in
/// `supported_msrs`: none is skipped.
pub fn setup_common(
    vcpu: &VcpuFd,
    index: u32,
    machine: &MachineDescription,
    supported_msrs: &[u32],
) -> Result<(), RegsError> {
    let kvm = |what| {
        move |source| RegsError::Kvm {
            what,
            index,
            source,
        }
    };
    let reset = &machine.cpu_reset;
    let fpu = kvm_fpu {
        fcw: reset.fpu_control_word,
        mxcsr: reset.mxcsr,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU state"))?;

    if let Some(m) = reset
        .msrs
        .iter()
        .find(|m| !supported_msrs.contains(&m.index))
    {
        return Err(RegsError::UnknownMsr {
            machine: machine.name.clone(),
            msr: m.index,
        });
    }
    let entries: Vec<kvm_msr_entry> = reset
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.value,
            ..Default::default()
        })
        .collect();
    if !entries.is_empty() {
        let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
            set: 0,
            wanted: entries.len(),
            index,
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if set != entries.len() {
            return Err(RegsError::Msrs {
                set,
                wanted: entries.len(),
                index,
            });
        }
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("read LAPIC"))?;
    for (offset, mode) in APIC_LVT.into_iter().zip(machine.irqchip.lapic_lint) {
        set_lvt_mode(&mut lapic.regs, offset, mode.delivery_mode());
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&regs[offset..offset + 4]) {
        *d = *s as u8;
    }
    let v = u32::from_le_bytes(b);
    let v = (v & !0x700) | (mode << 8);
    for (d, s) in regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment() {
        let cs = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
        assert_eq!((cs.present, cs.s, cs.db, cs.g, cs.l), (1, 1, 1, 1, 0));
        let ds = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
        assert_eq!(ds.type_, 0x3);
    }

    #[test]
    fn lvt_mode_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        let lvt0 = APIC_LVT[0];
        regs[lvt0 + 2] = 1; // masked bit 16 stays
        set_lvt_mode(
            &mut regs,
            lvt0,
            abide_machines::LintMode::ExtInt.delivery_mode(),
        );
        assert_eq!(regs[lvt0 + 1] as u8, 0x07);
        assert_eq!(regs[lvt0 + 2], 1);
    }
}
