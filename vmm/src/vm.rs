//! Builds a VM from a machine description and a configuration, runs it, and
//! reports how it ended.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{mpsc, Arc, Mutex};

use abide_devices::{Bus, ExitReason, ExitSignal};
use abide_firmware::boot::{self, BootSource};
use abide_machines::MachineDescription;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{KernelSource, SerialConfig, VmConfig};
use crate::intx::Resampler;
use crate::irq::GsiRouter;
use crate::legacy::{self, LegacyDevices};
use crate::memory::GuestRam;
use crate::pci::PciPlatform;
use crate::vcpu::{self, regs, Vcpu, Vcpus};
use crate::{console, Error};

/// Address of the 3-page TSS region KVM needs on Intel hosts (just below the
/// 4 GiB BIOS area, outside RAM and MMIO).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The guest built into this binary.
pub static EMBEDDED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/abide-guest.elf"));

/// A built, not yet running VM.
pub struct Vm {
    /// A restored VM's memory loader (a snapshot with `memory.chunks`),
    /// while chunks are still coming in. First, so that it is dropped first:
    /// its userfaultfd closes before anything else of the VM goes.
    pub(crate) lazy: Option<crate::snapshot::lazy::LazyMemory>,
    /// RAM's memory slots while KVM still registers them (a restore;
    /// [`Vm::await_slots`]). Before `ram`, so that it is joined before the
    /// memory goes.
    slots: crate::memory::PendingSlots,
    pub(crate) machine: MachineDescription,
    pub(crate) cfg: VmConfig,
    cpu: vcpu::cpuid::ResolvedCpu,
    pub(crate) vm: Arc<VmFd>,
    /// What `KVM_CAP_ADJUST_CLOCK` reports (`KVM_CLOCK_*` flags).
    pub(crate) clock_flags: u32,
    // Kept alive for as long as KVM maps it.
    pub(crate) ram: GuestRam,
    pub(crate) vcpus: Vec<Vcpu>,
    /// Exits of each vCPU by reason (shared with its thread).
    pub(crate) exit_counters: Vec<Arc<vcpu::exits::ExitCounters>>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) pci: PciPlatform,
    _resampler: Resampler,
    pub(crate) exit: ExitSignal,
    serial_is_console: bool,
    /// Devices were restored from a snapshot and wait to be resumed.
    pub(crate) restored: bool,
    /// Second handles on the disk images, to flush them before a
    /// migration's switch-over.
    pub(crate) disk_files: Vec<File>,
    /// The NICs' taps and MACs (for announcements after a migration).
    net_ports: Vec<crate::virtio::NetPort>,
    /// PCI slot of each network card, in `cfg.nets` order.
    pub(crate) net_slots: Vec<u8>,
    /// The firmware image's read-only mapping (`--firmware`), kept alive
    /// for as long as KVM maps it.
    _firmware: Option<crate::firmware::FirmwareRegion>,
    /// vCPU threads started ahead of [`Vm::start`] ([`Vm::start_threads_early`]).
    early_threads: Vec<vcpu::WaitingThread>,
    /// The fw_cfg device of a `--firmware` guest.
    pub(crate) fw_cfg: Option<Arc<Mutex<abide_devices::legacy::fw_cfg::FwCfg>>>,
}

/// A VM whose vCPU threads exist: running, or parked by a pause.
pub(crate) struct Started {
    /// Shared with an outgoing migration's thread.
    pub(crate) vcpus: Arc<Mutex<Vcpus>>,
    errors: mpsc::Receiver<vcpu::VcpuError>,
    _console: Option<console::Console>,
}

/// How a VM's state is initialized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Load the kernel and firmware tables; vCPU 0 starts at the entry.
    Boot,
    /// Leave memory and vCPUs untouched: a snapshot's state is loaded next.
    Restore,
}

fn open_kernel(cfg: &VmConfig) -> Result<File, Error> {
    match &cfg.kernel {
        KernelSource::Path(p) => File::open(p).map_err(|source| Error::OpenFile {
            what: "kernel",
            path: p.clone(),
            source,
        }),
        KernelSource::Embedded => {
            let mut f = crate::anon_file("abide-embedded-guest").map_err(Error::EmbeddedGuest)?;
            f.write_all(EMBEDDED_GUEST).map_err(Error::EmbeddedGuest)?;
            f.seek(SeekFrom::Start(0)).map_err(Error::EmbeddedGuest)?;
            Ok(f)
        }
    }
}

fn serial_sink(cfg: &SerialConfig) -> Result<abide_devices::legacy::serial::SerialSink, Error> {
    use abide_devices::legacy::serial::Unbuffered;
    Ok(match cfg {
        SerialConfig::Stdio => Box::new(Unbuffered(std::io::stdout())),
        SerialConfig::Null => Box::new(std::io::sink()),
        SerialConfig::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| Error::OpenFile {
                    what: "serial output file",
                    path: p.clone(),
                    source,
                })?;
            Box::new(Unbuffered(f))
        }
    })
}

/// Opens /dev/kvm with an error that says what to do.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::KvmMissing,
        _ => Error::Kvm {
            what: "open /dev/kvm",
            source: e,
        },
    })
}

/// The start of a VM that a restore makes, on its own thread, while it
/// checks the snapshot's guest ABI: KVM's VM, its RAM and memory slot, and
/// the in-kernel PIC/IOAPIC/PIT. Each of these costs KVM an SRCU grace
/// period, milliseconds on a busy host; the slot goes first, while the
/// fresh VM's SRCU is idle (grace periods in a row wait longer).
pub(crate) struct Early {
    kvm: Kvm,
    vm: Arc<VmFd>,
    ram: GuestRam,
    slots: crate::memory::PendingSlots,
    machine: String,
    memory: u64,
}

impl Early {
    /// KVM's VM with its in-kernel irqchip and PIT and `memory` bytes of
    /// `machine`'s RAM, its slots being registered.
    pub(crate) fn start(machine: &MachineDescription, memory: u64) -> Result<Self, Error> {
        let kvm = open_kvm()?;
        let kvm_err = |what| move |source| Error::Kvm { what, source };
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        let ram = GuestRam::new(machine, memory)?;
        // The slots first (a fresh VM's first grace period is the
        // quickest), then the in-kernel devices, each costing another.
        ram.register(&vm)?;
        let slots = crate::memory::PendingSlots::done();
        create_irqchips(&vm)?;
        Ok(Self {
            kvm,
            vm,
            ram,
            slots,
            machine: machine.name.clone(),
            memory,
        })
    }

    /// [`Early::start`] on its own thread, while the caller goes on (a
    /// restore checks the snapshot's ABI meanwhile).
    pub(crate) fn start_in_background(
        machine: MachineDescription,
        memory: u64,
    ) -> std::thread::JoinHandle<Option<Self>> {
        let spawned = abide_devices::thread("abide-early-vm")
            .spawn(move || Self::start(&machine, memory).ok());
        match spawned {
            Ok(t) => t,
            // No thread: the build does it all itself.
            Err(_) => std::thread::spawn(|| None),
        }
    }
}

/// The TSS address, the in-kernel PIC/IOAPIC/LAPIC and the PIT.
fn create_irqchips(vm: &VmFd) -> Result<(), Error> {
    let kvm_err = |what| move |source| Error::Kvm { what, source };
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel PIC/IOAPIC/LAPIC"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("create the in-kernel PIT"))?;
    Ok(())
}

impl Vm {
    /// Builds the VM: memory, firmware tables, kernel, devices, vCPUs.
    pub fn build(machine: MachineDescription, cfg: &VmConfig) -> Result<Self, Error> {
        Self::build_with(machine, cfg, Start::Boot)
    }

    pub(crate) fn build_with(
        machine: MachineDescription,
        cfg: &VmConfig,
        start: Start,
    ) -> Result<Self, Error> {
        Self::build_from(machine, cfg, start, None)
    }

    /// [`Vm::build_with`], going on from `early` when it was made for this
    /// machine type and memory size (otherwise it is dropped).
    pub(crate) fn build_from(
        machine: MachineDescription,
        cfg: &VmConfig,
        start: Start,
        early: Option<Early>,
    ) -> Result<Self, Error> {
        let early = early.filter(|e| e.machine == machine.name && e.memory == cfg.memory);
        cfg.validate(&machine)?;
        crate::irq::check_irqchip(&machine)?;
        let types = abide_machines::machine_types();
        if let Some(w) = crate::capabilities::deprecation_warning(&types, &machine.name) {
            eprintln!("abide: warning: {w}");
        }
        let cpu_model = vcpu::cpuid::model_for(&machine, &cfg.cpu)?;
        // Open user files first, so bad paths fail before any KVM work.
        let mut boot_files = None;
        // Firmware boot: the image (saved bytes first) and, at boot, what
        // fw_cfg tells it; a kernel is then loaded by the firmware.
        let firmware = match &cfg.firmware {
            Some(f) => Some((
                crate::firmware::image(&machine, f)?,
                crate::firmware::contents(&machine, cfg, start == Start::Boot)?,
            )),
            None => None,
        };
        if start == Start::Boot && firmware.is_none() {
            let mut kernel = open_kernel(cfg)?;
            let initrd = match &cfg.initrd {
                Some(p) => Some(File::open(p).map_err(|source| Error::OpenFile {
                    what: "initramfs",
                    path: p.clone(),
                    source,
                })?),
                None => None,
            };
            boot::detect_format(&mut kernel)?;
            boot_files = Some((kernel, initrd));
        }
        let serial_out = serial_sink(&cfg.serial)?;

        let (kvm, early) = match early {
            Some(e) => (e.kvm, Some((e.vm, e.ram, e.slots))),
            None => (open_kvm()?, None),
        };
        let kvm_err = |what| move |source| Error::Kvm { what, source };
        // Refuse a CPU model this host cannot run before anything is set up.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        let cpu = vcpu::cpuid::resolve(
            cpu_model,
            &machine,
            !cfg.cpu.is_empty(),
            supported.as_slice(),
        )?;
        let max_vcpus = kvm.get_max_vcpus() as u32;
        if cfg.cpus as usize > kvm.get_max_vcpus() {
            return Err(Error::HostVcpus {
                given: cfg.cpus,
                max: max_vcpus,
            });
        }
        let backends = crate::backends::open(&machine, cfg)?;
        // The ROM images the guest gets stay with it (snapshots and
        // migrations carry them) whatever happens to the host files.
        let net_slots: Vec<u8> = backends.nets.iter().map(|n| n.slot).collect();
        let mut kept = cfg.clone();
        if let (Some(f), Some((image, _))) = (kept.firmware.as_mut(), &firmware) {
            f.bytes = Some(image.clone());
        }
        for (n, open) in kept.nets.iter_mut().zip(&backends.nets) {
            n.rom_image = open.rom.as_ref().map(|(_, image)| Arc::new(image.clone()));
        }
        let disk_files = backends
            .disks
            .iter()
            .map(|d| d.file.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::OpenFile {
                what: "disk image",
                path: std::path::PathBuf::from("(duplicate handle)"),
                source,
            })?;
        let (vm, early) = match early {
            Some((vm, ram, slots)) => (vm, Some((ram, slots))),
            None => {
                let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
                create_irqchips(&vm)?;
                (vm, None)
            }
        };

        // A restore overlaps the slots' registration with the rest of the
        // build and the state's loading (Vm::await_slots); a boot waits
        // here, before anything is written to the VM.
        let (ram, slots) = match early {
            Some(e) => e,
            None => {
                let ram = GuestRam::new(&machine, cfg.memory)?;
                let slots = if start == Start::Boot {
                    ram.register(&vm)?;
                    crate::memory::PendingSlots::done()
                } else {
                    ram.register_in_background(vm.clone())
                };
                (ram, slots)
            }
        };
        let firmware_region = match &firmware {
            Some((image, _)) => Some(crate::firmware::map(
                &vm,
                &ram.mem,
                &machine,
                image,
                start == Start::Boot,
            )?),
            None => None,
        };

        let mut entry = None;
        if let Some((mut kernel, mut initrd)) = boot_files {
            let tables = abide_firmware::acpi::build(&machine, cfg.cpus)?;
            for (addr, blob) in &tables.blobs {
                ram.mem
                    .write_slice(blob, GuestAddress(*addr))
                    .map_err(|source| Error::GuestWrite {
                        what: "ACPI tables",
                        source,
                    })?;
            }
            entry = Some(boot::load(
                &ram.mem,
                &machine,
                cfg.memory,
                BootSource {
                    kernel: &mut kernel,
                    initrd: initrd.as_mut(),
                    cmdline: &cfg.cmdline,
                    rsdp_addr: tables.rsdp_addr,
                },
            )?);
        }

        let exit = ExitSignal::new().map_err(Error::EventFd)?;
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let legacy = legacy::attach(&vm, &pio, &machine, serial_out, &exit)?;
        let fw_cfg = match (&cfg.firmware, firmware) {
            (Some(f), Some((_, contents))) => Some(crate::firmware::attach(
                &pio, &machine, f, contents, &ram.mem,
            )?),
            _ => None,
        };
        let pci = PciPlatform::new(&machine, &pio, &mmio, &exit)?;
        let max_gsi = kvm.check_extension_int(kvm_ioctls::Cap::IrqRouting).max(0) as u32;
        let router = GsiRouter::new(vm.clone(), max_gsi, &machine.irqchip)?;
        let resampler = Resampler::new().map_err(Error::Resampler)?;
        legacy::wire_sci(&vm, &resampler, &machine, &legacy.pm)?;
        let net_ports = crate::virtio::attach_all(
            &crate::virtio::VirtioAttach {
                machine: &machine,
                wiring: &crate::virtio::KvmWiring {
                    vm: &vm,
                    router: &router,
                    resampler: &resampler,
                },
                mem: &ram.mem,
                pci: &pci,
            },
            backends,
        )?;
        pci.assign_resources(&machine)?;

        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("read the MSR index list"))?;
        let msrs = Arc::new(msr_list.as_slice().to_vec());
        let clock_flags = kvm.check_extension_int(kvm_ioctls::Cap::AdjustClock).max(0) as u32;
        let mut vcpus = Vec::new();
        let mut exit_counters = Vec::new();
        for index in 0..cfg.cpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("create a vCPU"))?;
            let cpuid = vcpu::cpuid::build(&cpu.model, supported.as_slice(), index, cfg.cpus)?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            if let Some(entry) = &entry {
                regs::setup_common(&fd, index, &machine, msr_list.as_slice())?;
                if index == 0 {
                    regs::setup_boot_cpu(&fd, entry)?;
                }
            } else if start == Start::Boot {
                // Firmware boot: every vCPU keeps KVM's reset state (the
                // BSP at the reset vector, the APs waiting for INIT/SIPI
                // in the in-kernel LAPIC), with the machine's FPU, MSR and
                // LINT wiring.
                regs::setup_common(&fd, index, &machine, msr_list.as_slice())?;
            }
            let exits = Arc::new(vcpu::exits::ExitCounters::default());
            exit_counters.push(exits.clone());
            vcpus.push(Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                msrs: msrs.clone(),
                exits,
            });
        }
        Ok(Self {
            lazy: None,
            slots,
            machine,
            cfg: kept,
            cpu,
            vm,
            clock_flags,
            ram,
            vcpus,
            exit_counters,
            legacy,
            pci,
            _resampler: resampler,
            exit,
            serial_is_console: cfg.serial == SerialConfig::Stdio,
            restored: false,
            disk_files,
            net_ports,
            net_slots,
            _firmware: firmware_region,
            fw_cfg,
            early_threads: Vec::new(),
        })
    }

    /// Starts the vCPU threads now, waiting for their vCPUs, so that
    /// [`Vm::start`] only hands the vCPUs over (an incoming migration
    /// calls this while memory arrives: thread creation stays out of the
    /// guest's downtime).
    pub(crate) fn start_threads_early(&mut self) -> Result<(), Error> {
        for v in &self.vcpus {
            if self.early_threads.iter().all(|t| t.index() != v.index) {
                let t = vcpu::WaitingThread::start(v.index).map_err(Error::Thread)?;
                self.early_threads.push(t);
            }
        }
        Ok(())
    }

    /// Serves `image` as the firmware image from now on (a restored or
    /// migrated guest keeps the image it booted with). The guest's shadow
    /// copy is in its RAM, restored with it.
    pub(crate) fn set_firmware_image(&mut self, image: Vec<u8>) -> Result<(), String> {
        let Some(f) = self.cfg.firmware.as_mut() else {
            return Err("the guest was not booted through firmware".into());
        };
        if f.bytes.as_deref() == Some(&image) {
            return Ok(());
        }
        abide_firmware::bios::check_image(&self.machine, "(saved firmware image)", &image)
            .map_err(|e| e.to_string())?;
        crate::firmware::unmap(&self.vm).map_err(|e| e.to_string())?;
        self._firmware = None;
        self._firmware = Some(
            crate::firmware::map(&self.vm, &self.ram.mem, &self.machine, &image, false)
                .map_err(|e| e.to_string())?,
        );
        f.bytes = Some(Arc::new(image));
        Ok(())
    }

    /// Takes the NICs' taps and MACs.
    pub fn take_net_ports(&mut self) -> Vec<crate::virtio::NetPort> {
        std::mem::take(&mut self.net_ports)
    }

    /// Pauses the vCPUs, then the device workers: afterwards nothing
    /// changes guest-visible state.
    pub(crate) fn pause(&self, vcpus: &mut Vcpus) -> Result<(), Error> {
        if vcpus.is_paused() {
            return Ok(());
        }
        vcpus.pause().map_err(Error::Pause)?;
        for f in self.pci.virtio_functions() {
            f.function.lock().unwrap_or_else(|e| e.into_inner()).pause();
        }
        Ok(())
    }

    /// Resumes the device workers, then the vCPUs.
    pub(crate) fn resume(&self, vcpus: &mut Vcpus) -> Result<(), Error> {
        if !vcpus.is_paused() {
            return Ok(());
        }
        self.resume_devices()?;
        vcpus.resume();
        Ok(())
    }

    fn resume_devices(&self) -> Result<(), Error> {
        for f in self.pci.virtio_functions() {
            f.function
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resume()
                .map_err(|source| Error::Resume {
                    device: format!("{} at slot {}", f.model, f.slot),
                    source,
                })?;
        }
        Ok(())
    }

    /// The machine this VM was built from.
    pub fn machine(&self) -> &MachineDescription {
        &self.machine
    }

    /// The CPU model the vCPUs run, as resolved on this host.
    pub fn cpu(&self) -> &vcpu::cpuid::ResolvedCpu {
        &self.cpu
    }

    /// The KVM VM.
    pub fn fd(&self) -> &VmFd {
        &self.vm
    }

    /// The event that fires when the VM ends (guest poweroff or reset, or
    /// a vCPU failure).
    pub fn exit_event(&self) -> &ExitSignal {
        &self.exit
    }

    /// Starts the vCPU threads. `paused`: they park before running the
    /// guest and a restored VM's devices stay paused, until
    /// [`Vm::resume`]; otherwise the guest runs (a restored VM's devices
    /// are resumed first).
    pub(crate) fn start(&mut self, paused: bool) -> Result<Started, Error> {
        let started = self.launch(paused)?;
        if paused {
            started
                .vcpus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .await_parked()
                .map_err(Error::Thread)?;
        }
        Ok(started)
    }

    /// Like `start(true)`, but returns while the vCPU threads are still
    /// taking their vCPUs and parking (an incoming migration answers
    /// *ready* meanwhile); `Vcpus::await_parked` must follow before the
    /// guest is resumed.
    pub(crate) fn start_parking(&mut self) -> Result<Started, Error> {
        self.launch(true)
    }

    /// Waits until KVM has every RAM memory slot (registered in the
    /// background by a restore's build).
    pub(crate) fn await_slots(&mut self) -> Result<(), Error> {
        self.slots.wait().map_err(Error::from)
    }

    fn launch(&mut self, paused: bool) -> Result<Started, Error> {
        self.await_slots()?;
        let console = self
            .serial_is_console
            .then(|| console::attach_stdin(self.legacy.serial.clone()));
        if self.restored && !paused {
            // Interrupt controllers and vCPUs hold their saved state now:
            // devices may raise interrupts again.
            self.resume_devices()?;
            self.restored = false;
        }
        let (tx, rx) = mpsc::channel();
        let vcpus = std::mem::take(&mut self.vcpus);
        let early = std::mem::take(&mut self.early_threads);
        let vcpus = if paused {
            Vcpus::start_parking(vcpus, self.exit.clone(), tx, early)
        } else {
            Vcpus::start(vcpus, self.exit.clone(), tx, early)
        }
        .map_err(Error::Thread)?;
        Ok(Started {
            vcpus: Arc::new(Mutex::new(vcpus)),
            errors: rx,
            _console: console,
        })
    }

    /// Stops the vCPU threads and says how the VM ended: a vCPU's error,
    /// or the reason a device or vCPU gave (poweroff when none did, as
    /// when the VM is stopped from outside). A paused VM stays paused: its
    /// threads leave from where they are parked, so nothing runs past a
    /// snapshot taken before.
    pub(crate) fn finish(&self, started: Started) -> Result<ExitReason, Error> {
        started
            .vcpus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop_all();
        // A chunk of restored memory that failed verification ended the VM
        // (a vCPU waiting on it may report an error of its own too).
        if let Some(e) = self.lazy.as_ref().and_then(|l| l.failure()) {
            return Err(Error::Snapshot(crate::snapshot::RestoreError::Chunk(e)));
        }
        if let Ok(e) = started.errors.try_recv() {
            return Err(Error::Vcpu(e));
        }
        Ok(self.exit.reason().unwrap_or(ExitReason::Poweroff))
    }

    /// Runs the guest until it powers off, resets, or a vCPU fails.
    pub fn run(self) -> Result<ExitReason, Error> {
        crate::control::run(self, None, None)
    }
}
