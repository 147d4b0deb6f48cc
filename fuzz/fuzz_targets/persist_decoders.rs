//! The `Persist` state decoders of the devices a snapshot or migration
//! restores from bytes: the UART, RTC, i8042, ACPI PM block, fw_cfg and
//! the PCI host bridge. Every decoder must refuse bad bytes with an error, and what
//! it accepts must save and restore again.
#![no_main]

use abide_devices::legacy::fw_cfg::FwCfg;
use abide_devices::legacy::i8042::I8042;
use abide_devices::legacy::irq::IrqLine;
use abide_devices::legacy::pm::AcpiPm;
use abide_devices::legacy::rtc::Rtc;
use abide_devices::legacy::serial::Serial;
use abide_devices::pci::config::PciIds;
use abide_devices::pci::host_bridge::HostBridge;
use abide_devices::persist::Persist;
use abide_devices::ExitSignal;
use libfuzzer_sys::fuzz_target;

fn check<P: Persist>(dev: &mut P, version: u32, bytes: &[u8]) {
    if dev.restore_section(version, bytes).is_ok() {
        let (v, saved) = dev.save_section();
        dev.restore_section(v, &saved)
            .expect("a device's own saved state restores");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Some((v, bytes)) = rest.split_first() else {
        return;
    };
    let version = u32::from(*v % 4);
    let machine = abide_machines::resolve("pc-2.0").expect("pc-2.0");
    let exit = ExitSignal::new().expect("eventfd");
    match which % 6 {
        0 => {
            let irq = IrqLine::new().expect("eventfd");
            let mut s = Serial::new(irq, Box::new(std::io::sink()));
            check(&mut s, version, bytes);
        }
        1 => {
            let mut r = Rtc::new(machine.legacy_defaults.rtc).expect("rtc");
            check(&mut r, version, bytes);
        }
        2 => {
            let mut k = I8042::new(exit, machine.legacy_defaults.i8042).expect("i8042");
            check(&mut k, version, bytes);
        }
        3 => {
            let mut pm = AcpiPm::new(machine.legacy.pm, exit);
            check(&mut pm, version, bytes);
        }
        4 => {
            let mut f = FwCfg::new(vec![], vec![("etc/e820".into(), vec![0; 20])], None)
                .expect("fw_cfg");
            check(&mut f, version, bytes);
        }
        _ => {
            let mut hb = HostBridge::new(PciIds {
                vendor: 0x8086,
                device: 0x29c0,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
                revision: 0,
                class: 0x06_0000,
            });
            check(&mut hb, version, bytes);
        }
    }
});
