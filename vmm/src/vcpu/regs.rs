//! Architectural vCPU state at boot: segments, registers, FPU, MSRs, LAPIC.

use abide_firmware::boot::{BootEntry, BootProtocol, BOOT_CS, BOOT_DS, BOOT_GDT};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

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

/// FPU, MSRs and LAPIC LINT pins, for every vCPU.
pub fn setup_common(vcpu: &VcpuFd, index: u32, supported_msrs: &[u32]) -> Result<(), RegsError> {
    let kvm = |what| {
        move |source| RegsError::Kvm {
            what,
            index,
            source,
        }
    };
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU state"))?;

    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(i, _)| supported_msrs.contains(i))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
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
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
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
        regs[APIC_LVT0 + 2] = 1; // masked bit 16 stays
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2], 1);
    }
}
