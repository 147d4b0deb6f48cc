//! Application processor bring-up: INIT-SIPI-SIPI via the xAPIC, a
//! real-mode trampoline (see boot.rs) and a check-in counter.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::acpi::Acpi;
use crate::boot::{self, MAX_CPUS, TRAMPOLINE_ADDR};
use crate::bootinfo::BootInfo;
use crate::io::{self, mmio_read32, mmio_write32};
use crate::print::{error, Line};
use crate::timer;

const APIC_SVR: u64 = 0xF0;
const APIC_ICR_LO: u64 = 0x300;
const APIC_ICR_HI: u64 = 0x310;
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_SIPI: u32 = 0x0000_4600; // start-up, vector = page number

/// APIC ID + 1 reported by the AP holding each ticket (0 = none yet).
static AP_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static AP_ONLINE: AtomicU32 = AtomicU32::new(0);
/// CPUID 1 EBX and 0xB EDX as each AP saw them (indexed like AP_IDS).
static AP_LEAF1_EBX: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static AP_LEAFB_EDX: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// Rust entry of an AP (called from ap_entry64 on its own stack).
#[no_mangle]
extern "C" fn ap_main(ticket: u32) -> ! {
    crate::arch::load_idt();
    // The same APIC ID as io::apic_id(), keeping the raw CPUID values for
    // the fingerprint (no extra CPUID exits).
    let max = io::cpuid(0, 0).eax;
    let leaf1_ebx = io::cpuid(1, 0).ebx;
    let leafb = if max >= 0xB {
        Some(io::cpuid(0xB, 0))
    } else {
        None
    };
    let id = match &leafb {
        Some(b) if b.ebx != 0 => b.edx,
        _ => leaf1_ebx >> 24,
    };
    if (ticket as usize) < MAX_CPUS {
        let t = ticket as usize;
        AP_LEAF1_EBX[t].store(leaf1_ebx, Ordering::Relaxed);
        AP_LEAFB_EDX[t].store(leafb.map_or(0, |b| b.edx), Ordering::Relaxed);
        AP_IDS[t].store(id + 1, Ordering::Release);
    }
    AP_ONLINE.fetch_add(1, Ordering::Release);
    io::halt_forever()
}

/// CPUID (1).EBX and (0xB, 0).EDX recorded by the AP with this APIC ID.
pub fn ap_cpuid(id: u32) -> Option<(u32, u32)> {
    let t = AP_IDS
        .iter()
        .position(|s| s.load(Ordering::Acquire) == id + 1)?;
    Some((
        AP_LEAF1_EBX[t].load(Ordering::Relaxed),
        AP_LEAFB_EDX[t].load(Ordering::Relaxed),
    ))
}

fn ap_seen(id: u32) -> bool {
    AP_IDS.iter().any(|s| s.load(Ordering::Acquire) == id + 1)
}

fn send_ipi(lapic: u64, dest: u32, icr: u32) {
    let mut n = 0;
    while mmio_read32(lapic + APIC_ICR_LO) & ICR_PENDING != 0 && n < 1000 {
        n += 1;
    }
    mmio_write32(lapic + APIC_ICR_HI, dest << 24);
    mmio_write32(lapic + APIC_ICR_LO, icr);
}

/// Start every enabled AP listed in the MADT; print one line per CPU
/// (BSP first, then MADT order) and the summary line.
pub fn start(acpi: &Acpi, boot_info: &BootInfo) {
    let bsp = io::apic_id();
    let cpus = &acpi.cpus[..acpi.ncpus];
    let expected = if acpi.have_madt && acpi.ncpus > 0 {
        acpi.madt_cpus
    } else {
        1
    };
    let aps = cpus.iter().filter(|&&id| id != bsp).count();
    if acpi.have_madt && !cpus.contains(&bsp) {
        Line::new("error")
            .ks("what", "bsp-not-in-madt")
            .kd("apic_id", bsp as u64)
            .print();
    }

    if aps > 0 && can_start(boot_info) {
        install_trampoline();
        let lapic = acpi.lapic;
        // Software-enable the local APIC (spurious vector 0xFF; IF stays 0).
        mmio_write32(lapic + APIC_SVR, mmio_read32(lapic + APIC_SVR) | 0x1FF);
        let vector = (TRAMPOLINE_ADDR >> 12) as u32;
        let targets = || {
            cpus.iter()
                .copied()
                .filter(move |&id| id != bsp && id < 0xFF)
        };
        for id in targets() {
            send_ipi(lapic, id, ICR_INIT);
        }
        timer::sleep_us(10_000);
        for id in targets() {
            send_ipi(lapic, id, ICR_SIPI | vector);
        }
        timer::sleep_us(200);
        for id in targets() {
            if !ap_seen(id) {
                send_ipi(lapic, id, ICR_SIPI | vector);
            }
        }
        let started = targets().count() as u32;
        let deadline = timer::Deadline::after_us(5_000_000);
        while AP_ONLINE.load(Ordering::Acquire) < started {
            if deadline.expired() {
                error("ap-timeout");
                break;
            }
            core::hint::spin_loop();
        }
    }

    Line::new("cpu")
        .kd("index", 0)
        .kd("apic_id", bsp as u64)
        .kd("online", 1)
        .print();
    for (index, &id) in (1u64..).zip(cpus.iter().filter(|&&id| id != bsp)) {
        if id >= 0xFF {
            Line::new("error")
                .ks("what", "apic-id-needs-x2apic")
                .kd("apic_id", id as u64)
                .print();
        }
        Line::new("cpu")
            .kd("index", index)
            .kd("apic_id", id as u64)
            .kd("online", ap_seen(id) as u64)
            .print();
    }
    let online = 1 + AP_ONLINE.load(Ordering::Acquire);
    Line::new("cpus")
        .kd("online", online as u64)
        .kd("expected", expected as u64)
        .print();
}

fn can_start(boot_info: &BootInfo) -> bool {
    if boot_info.e820_len > 0 && !boot_info.is_ram(TRAMPOLINE_ADDR, 4096) {
        error("trampoline-not-ram");
        return false;
    }
    // IA32_APIC_BASE: bit 11 = enabled, bit 10 = x2APIC mode.
    let base = io::rdmsr(0x1B);
    if base & (1 << 11) == 0 || base & (1 << 10) != 0 {
        Line::new("error")
            .ks("what", "apic-mode")
            .kx("apic_base", base)
            .print();
        return false;
    }
    true
}

fn install_trampoline() {
    unsafe {
        let start = &boot::ap_trampoline_start as *const u8;
        let end = &boot::ap_trampoline_end as *const u8;
        let len = end as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len);
    }
}
