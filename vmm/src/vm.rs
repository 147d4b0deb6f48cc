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
    pub(crate) machine: MachineDescription,
    pub(crate) cfg: VmConfig,
    cpu: vcpu::cpuid::ResolvedCpu,
    pub(crate) vm: Arc<VmFd>,
    /// What `KVM_CAP_ADJUST_CLOCK` reports (`KVM_CLOCK_*` flags).
    pub(crate) clock_flags: u32,
    // Kept alive for as long as KVM maps it.
    pub(crate) ram: GuestRam,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) pci: PciPlatform,
    _resampler: Resampler,
    pub(crate) exit: ExitSignal,
    serial_is_console: bool,
    api: Option<crate::api::ApiServer>,
    /// Devices were restored from a snapshot and wait to be resumed.
    pub(crate) restored: bool,
    /// Second handles on the disk images, to flush them before a
    /// migration's switch-over.
    pub(crate) disk_files: Vec<File>,
    /// The NICs' taps and MACs (for announcements after a migration).
    net_ports: Vec<crate::virtio::NetPort>,
    /// PCI slot of each network card, in `cfg.nets` order.
    pub(crate) net_slots: Vec<u8>,
    /// Called once the vCPU threads run (a received migration's answer to
    /// its source).
    on_start: Option<Box<dyn FnOnce() + Send + Sync>>,
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
        cfg.validate(&machine)?;
        crate::irq::check_irqchip(&machine)?;
        let types = abide_machines::machine_types();
        if let Some(w) = crate::capabilities::deprecation_warning(&types, &machine.name) {
            eprintln!("abide: warning: {w}");
        }
        let cpu_model = vcpu::cpuid::model_for(&machine, &cfg.cpu)?;
        // Open user files first, so bad paths fail before any KVM work.
        let mut boot_files = None;
        if start == Start::Boot {
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

        let kvm = open_kvm()?;
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
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel PIC/IOAPIC/LAPIC"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create the in-kernel PIT"))?;

        let ram = GuestRam::new(&machine, cfg.memory)?;
        ram.register(&vm)?;

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
        let pci = PciPlatform::new(&machine, &pio, &mmio, &exit)?;
        let max_gsi = kvm.check_extension_int(kvm_ioctls::Cap::IrqRouting).max(0) as u32;
        let router = GsiRouter::new(vm.clone(), max_gsi, &machine.irqchip)?;
        let resampler = Resampler::new().map_err(Error::Resampler)?;
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
            }
            vcpus.push(Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                msrs: msrs.clone(),
            });
        }
        Ok(Self {
            machine,
            cfg: kept,
            cpu,
            vm,
            clock_flags,
            ram,
            vcpus,
            legacy,
            pci,
            _resampler: resampler,
            exit,
            serial_is_console: cfg.serial == SerialConfig::Stdio,
            api: None,
            restored: false,
            disk_files,
            net_ports,
            net_slots,
            on_start: None,
        })
    }

    /// Calls `f` once the vCPU threads run.
    pub fn on_start(&mut self, f: Box<dyn FnOnce() + Send + Sync>) {
        self.on_start = Some(f);
    }

    /// Takes the NICs' taps and MACs.
    pub fn take_net_ports(&mut self) -> Vec<crate::virtio::NetPort> {
        std::mem::take(&mut self.net_ports)
    }

    /// Serves the control API on `server` while the VM runs.
    pub fn set_api(&mut self, server: crate::api::ApiServer) {
        self.api = Some(server);
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

    /// Runs the guest until it powers off, resets, or a vCPU fails,
    /// serving the control API meanwhile.
    pub fn run(mut self) -> Result<ExitReason, Error> {
        let _console = if self.serial_is_console {
            Some(console::attach_stdin(self.legacy.serial.clone()))
        } else {
            None
        };
        if self.restored {
            // Interrupt controllers and vCPUs hold their saved state now:
            // devices may raise interrupts again.
            self.resume_devices()?;
            self.restored = false;
        }
        let (tx, rx) = mpsc::channel();
        let vcpus = Vcpus::start(std::mem::take(&mut self.vcpus), self.exit.clone(), tx)
            .map_err(Error::Thread)?;
        if let Some(f) = self.on_start.take() {
            f();
        }
        let vcpus = Mutex::new(vcpus);
        let job = crate::migration::Job::default();
        let mut api = self.api.take();
        let quit = std::thread::scope(|scope| {
            let ctx = crate::api::Context {
                vm: &self,
                vcpus: &vcpus,
                migration: &job,
                scope,
            };
            let quit = loop {
                match &mut api {
                    Some(server) => {
                        if server.serve(&self.exit, |req, client| {
                            crate::api::handle(&ctx, req, client)
                        }) {
                            break true;
                        }
                    }
                    None => {
                        crate::api::wait_readable(&self.exit);
                        break false;
                    }
                }
                if crate::api::exit_pending(&self.exit) {
                    break false;
                }
            };
            // An unfinished migration gives up (before its commit); the
            // scope then waits for its thread.
            job.cancel();
            quit
        });
        // A paused VM stays paused: its vCPU threads leave from where they
        // are parked, and parked device handlers go with the VM. Nothing
        // may run past a snapshot taken before a quit, nor past a
        // migration.
        vcpus.into_inner().unwrap_or_else(|e| e.into_inner()).stop();
        if quit {
            return Ok(ExitReason::Poweroff);
        }
        if let Ok(e) = rx.try_recv() {
            return Err(Error::Vcpu(e));
        }
        // Either a device or a vCPU system event set the reason before waking us.
        Ok(self.exit.reason().unwrap_or(ExitReason::Poweroff))
    }
}
