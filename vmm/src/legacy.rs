//! Wires the legacy PC devices onto the port bus and their IRQs to KVM.

use std::sync::{Arc, Mutex};

use abide_devices::legacy::{AcpiPm, IrqLine, ResetControl, Rtc, Serial, I8042};
use abide_devices::{Bus, BusError, ExitSignal};
use abide_machines::MachineDescription;
use kvm_ioctls::VmFd;

/// Errors attaching legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("cannot route {device}'s interrupt to GSI {gsi}")]
    Irqfd {
        /// Device.
        device: &'static str,
        /// GSI.
        gsi: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Two devices claim the same ports.
    #[error("cannot place {0} on the port bus")]
    Bus(&'static str, #[source] BusError),
    /// The SCI's end-of-interrupt eventfd could not be watched.
    #[error("cannot watch the SCI's end-of-interrupt eventfd")]
    Resample(#[source] std::io::Error),
    /// A device model refused the machine's defaults.
    #[error("machine type '{machine}' declares what a legacy device cannot implement")]
    Model {
        /// Machine type.
        machine: String,
        /// The refusal.
        #[source]
        source: abide_devices::ModelError,
    },
}

/// Handles the VMM keeps to legacy devices after attaching them.
#[derive(Debug)]
pub struct LegacyDevices {
    /// COM1, for feeding input.
    pub serial: Arc<Mutex<Serial>>,
    /// The i8042 controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// The CMOS RTC.
    pub rtc: Arc<Mutex<Rtc>>,
    /// The ACPI PM block.
    pub pm: Arc<Mutex<AcpiPm>>,
}

fn irq_line(vm: &VmFd, device: &'static str, gsi: u32) -> Result<IrqLine, LegacyError> {
    let line = IrqLine::new().map_err(|e| LegacyError::EventFd(device, e))?;
    vm.register_irqfd(line.eventfd(), gsi)
        .map_err(|source| LegacyError::Irqfd {
            device,
            gsi,
            source,
        })?;
    Ok(line)
}

/// Creates COM1, the i8042, the RTC, the ACPI PM block and the reset
/// register where `machine` places them.
pub fn attach(
    vm: &VmFd,
    pio: &Bus,
    machine: &MachineDescription,
    serial_out: abide_devices::legacy::serial::SerialSink,
    exit: &ExitSignal,
) -> Result<LegacyDevices, LegacyError> {
    let l = &machine.legacy;
    let place = |name, dev: Arc<Mutex<dyn abide_devices::BusDevice>>, port: u16, len: u16| {
        pio.insert(dev, u64::from(port), u64::from(len))
            .map_err(|e| LegacyError::Bus(name, e))
    };

    let com1_irq = match l.com1.irq {
        Some(gsi) => irq_line(vm, "COM1", gsi)?,
        // A machine without a COM1 IRQ gets a polled-only UART.
        None => IrqLine::new().map_err(|e| LegacyError::EventFd("COM1", e))?,
    };
    let serial = Arc::new(Mutex::new(Serial::new(com1_irq, serial_out)));
    place("COM1", serial.clone(), l.com1.port, l.com1.len)?;
    let refused = |source| LegacyError::Model {
        machine: machine.name.clone(),
        source,
    };
    let defaults = &machine.legacy_defaults;
    let i8042 = I8042::new(exit.clone(), defaults.i8042).map_err(refused)?;
    let i8042 = Arc::new(Mutex::new(i8042));
    place("i8042", i8042.clone(), l.i8042.port, l.i8042.len)?;
    let rtc = Arc::new(Mutex::new(Rtc::new(defaults.rtc).map_err(refused)?));
    place("RTC", rtc.clone(), l.rtc.port, l.rtc.len)?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(l.pm, exit.clone())));
    place("ACPI PM block", pm.clone(), l.pm.base, l.pm.len)?;
    // A reset register inside the PCI config ports belongs to that device.
    if !crate::pci::reset_in_config_ports(machine) {
        place(
            "ACPI reset register",
            Arc::new(Mutex::new(ResetControl::new(l.reset, exit.clone()))),
            l.reset.port,
            1,
        )?;
    }
    Ok(LegacyDevices {
        serial,
        i8042,
        rtc,
        pm,
    })
}

/// Connects the ACPI PM block's SCI to the machine's `pm.sci_irq` as the
/// level-triggered line the MADT declares: a resampling irqfd, raised again
/// after each EOI while an event is pending.
pub fn wire_sci(
    vm: &VmFd,
    resampler: &crate::intx::Resampler,
    machine: &MachineDescription,
    pm: &Arc<Mutex<AcpiPm>>,
) -> Result<(), LegacyError> {
    let gsi = machine.legacy.pm.sci_irq;
    let line = IrqLine::new().map_err(|e| LegacyError::EventFd("SCI", e))?;
    let resample = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| LegacyError::EventFd("SCI", e))?;
    vm.register_irqfd_with_resample(line.eventfd(), &resample, gsi)
        .map_err(|source| LegacyError::Irqfd {
            device: "SCI",
            gsi,
            source,
        })?;
    let dev = pm.clone();
    resampler
        .add(
            resample,
            Box::new(move || dev.lock().unwrap_or_else(|e| e.into_inner()).resample()),
        )
        .map_err(LegacyError::Resample)?;
    pm.lock().unwrap_or_else(|e| e.into_inner()).set_sci(line);
    Ok(())
}
