//! Interrupt routing: the KVM GSI routing table (in-kernel PIC and IOAPIC
//! pins plus MSI routes) and per-device MSI-X delivery through irqfds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use abide_devices::pci::msix::{MsiController, MsiMessage};
use abide_machines::InterruptControllers;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IOAPIC_NUM_PINS, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// Legacy PIC inputs: the two cascaded 8259s of KVM's in-kernel PIC.
const PIC_PINS: u32 = 16;
/// The ID register of KVM's in-kernel IOAPIC after reset.
const KVM_IOAPIC_RESET_ID: u8 = 0;

/// Errors setting up interrupt routing.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// KVM refused the routing table.
    #[error("KVM refused the interrupt routing table")]
    SetRouting(#[source] kvm_ioctls::Error),
    /// Out of GSIs.
    #[error("out of interrupt lines (GSIs)")]
    Exhausted,
    /// eventfd or irqfd.
    #[error("cannot create an MSI irqfd")]
    Irqfd(#[source] std::io::Error),
    /// The machine declares interrupt controllers KVM's in-kernel ones are not.
    #[error(
        "machine type '{machine}' declares {field} = {value}, but KVM's in-kernel IOAPIC has {kvm}"
    )]
    Irqchip {
        /// Machine type.
        machine: String,
        /// The field of `irqchip`.
        field: &'static str,
        /// Its value.
        value: u32,
        /// What KVM's IOAPIC has.
        kvm: u32,
    },
}

/// Refuses interrupt controllers that KVM's in-kernel IOAPIC cannot be:
/// it has [`KVM_IOAPIC_NUM_PINS`] pins and its ID register resets to 0.
pub fn check_irqchip(machine: &abide_machines::MachineDescription) -> Result<(), IrqError> {
    let c = &machine.irqchip;
    let refuse = |field, value: u32, kvm: u32| IrqError::Irqchip {
        machine: machine.name.clone(),
        field,
        value,
        kvm,
    };
    if c.ioapic_pins != KVM_IOAPIC_NUM_PINS {
        return Err(refuse(
            "irqchip.ioapic_pins",
            c.ioapic_pins,
            KVM_IOAPIC_NUM_PINS,
        ));
    }
    if c.ioapic_id != KVM_IOAPIC_RESET_ID {
        return Err(refuse(
            "irqchip.ioapic_id",
            c.ioapic_id.into(),
            KVM_IOAPIC_RESET_ID.into(),
        ));
    }
    Ok(())
}

struct RouterState {
    ioapic_pins: u32,
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    max_gsi: u32,
}

/// The VM's GSI routing table. Every change re-sends the whole table, as
/// KVM_SET_GSI_ROUTING requires.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

impl std::fmt::Debug for GsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiRouter").finish_non_exhaustive()
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: m.addr as u32,
                address_hi: (m.addr >> 32) as u32,
                data: m.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

impl GsiRouter {
    /// The default routes (GSI 0–15 to the PICs and IOAPIC, the rest of
    /// the IOAPIC's pins to it), with MSI GSIs allocated from the first GSI
    /// above the IOAPIC's pins up to `max_gsi`.
    pub fn new(
        vm: Arc<VmFd>,
        max_gsi: u32,
        irqchip: &InterruptControllers,
    ) -> Result<Arc<Self>, IrqError> {
        let r = Arc::new(Self {
            vm,
            state: Mutex::new(RouterState {
                ioapic_pins: irqchip.ioapic_pins,
                msi: BTreeMap::new(),
                next_gsi: irqchip.ioapic_pins,
                max_gsi,
            }),
        });
        r.commit(&r.state.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok(r)
    }

    fn commit(&self, st: &RouterState) -> Result<(), IrqError> {
        let mut entries = Vec::new();
        for gsi in 0..st.ioapic_pins {
            if gsi < PIC_PINS {
                let (chip, pin) = if gsi < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, gsi)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
                };
                entries.push(irqchip_entry(gsi, chip, pin));
            }
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        entries.extend(st.msi.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::Exhausted)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(IrqError::SetRouting)
    }

    /// Reserves `n` consecutive GSIs for MSI.
    pub fn allocate(&self, n: u32) -> Result<u32, IrqError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = st.next_gsi;
        let end = first.checked_add(n).ok_or(IrqError::Exhausted)?;
        if end > st.max_gsi {
            return Err(IrqError::Exhausted);
        }
        st.next_gsi = end;
        Ok(first)
    }

    /// Points `gsi` at `msg`, or removes its route.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match msg {
            Some(m) => st.msi.insert(gsi, m),
            None => st.msi.remove(&gsi),
        };
        self.commit(&st)
    }
}

/// MSI-X delivery for one function: a GSI and an irqfd per vector.
pub struct MsiVectors {
    router: Arc<GsiRouter>,
    first_gsi: u32,
    irqfds: Vec<EventFd>,
}

impl std::fmt::Debug for MsiVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiVectors")
            .field("first_gsi", &self.first_gsi)
            .field("vectors", &self.irqfds.len())
            .finish()
    }
}

impl MsiVectors {
    /// Allocates `vectors` GSIs and registers an irqfd on each.
    pub fn new(vm: &VmFd, router: Arc<GsiRouter>, vectors: u16) -> Result<Self, IrqError> {
        let first_gsi = router.allocate(u32::from(vectors))?;
        let mut irqfds = Vec::new();
        for v in 0..u32::from(vectors) {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::Irqfd)?;
            vm.register_irqfd(&fd, first_gsi + v)
                .map_err(|e| IrqError::Irqfd(std::io::Error::from_raw_os_error(e.errno())))?;
            irqfds.push(fd);
        }
        Ok(Self {
            router,
            first_gsi,
            irqfds,
        })
    }
}

impl MsiController for MsiVectors {
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
        if usize::from(vector) >= self.irqfds.len() {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        self.router
            .set_msi(self.first_gsi + u32::from(vector), msg)
            .map_err(std::io::Error::other)
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Err(std::io::ErrorKind::InvalidInput.into()),
        }
    }
}
