//! Abide: a KVM virtual machine monitor whose machine types pin everything a
//! guest can observe.
//!
//! [`run`] builds a VM from a [`config::VmConfig`] and runs it to completion.

pub mod api;
pub mod backends;
pub mod capabilities;
pub mod compat;
pub mod config;
pub mod console;
pub mod control;
pub mod devices_config;
pub mod firmware;
pub mod intx;
pub mod irq;
pub mod legacy;
pub mod manifest;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod privileges;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

pub use abide_devices::ExitReason;

/// Exit status of `abide run` when the guest powered off.
pub const EXIT_POWEROFF: i32 = 0;
/// Exit status on an error (bad input, host problem, guest crash).
pub const EXIT_ERROR: i32 = 1;
/// Exit status when the command line does not parse.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the guest reset itself.
pub const EXIT_RESET: i32 = 3;

/// Everything that can stop `abide` from running a guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A user-supplied file could not be opened.
    #[error("cannot open the {what} '{}'", path.display())]
    OpenFile {
        /// What the file is for.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The embedded guest could not be staged.
    #[error("cannot stage the embedded guest")]
    EmbeddedGuest(#[source] std::io::Error),
    /// No permission on /dev/kvm.
    #[error("permission denied opening /dev/kvm; add your user to the 'kvm' group or run as root")]
    KvmPermission,
    /// No /dev/kvm.
    #[error("/dev/kvm does not exist; load the kvm module (kvm_intel or kvm_amd) or run on a host with KVM")]
    KvmMissing,
    /// A KVM ioctl failed.
    #[error("KVM failed to {what}")]
    Kvm {
        /// What we were doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than the host's KVM allows.
    #[error("--cpus {given} exceeds this host's KVM limit of {max} vCPUs")]
    HostVcpus {
        /// Asked for.
        given: u32,
        /// KVM limit.
        max: u32,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] abide_firmware::acpi::AcpiError),
    /// Firmware boot.
    #[error(transparent)]
    Firmware(#[from] firmware::FirmwareBootError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] abide_firmware::boot::BootError),
    /// Writing into guest memory.
    #[error("cannot write the {what} into guest memory")]
    GuestWrite {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// eventfd creation.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Legacy devices.
    #[error(transparent)]
    Legacy(#[from] legacy::LegacyError),
    /// PCI platform.
    #[error(transparent)]
    Pci(#[from] pci::PciSetupError),
    /// Unknown machine type.
    #[error(transparent)]
    Machine(#[from] abide_machines::UnknownMachine),
    /// Unknown CPU model.
    #[error(transparent)]
    CpuModel(#[from] abide_machines::UnknownCpuModel),
    /// A CPU model this host's KVM cannot run.
    #[error(transparent)]
    CpuUnsupported(#[from] vcpu::cpuid::Unsupported),
    /// Building CPUID.
    #[error(transparent)]
    Cpu(#[from] vcpu::cpuid::CpuError),
    /// Device options.
    #[error(transparent)]
    DeviceConfig(#[from] devices_config::DeviceConfigError),
    /// An option ROM larger than the machine's slot for its device.
    #[error("{device}: option ROM '{}' is {rom} bytes, larger than the {slot}-byte ROM slot of {model} on machine '{machine}'; use a smaller ROM (e.g. pxe-virtio.rom instead of efi-virtio.rom), a machine type with a larger slot, or romsize=", path.display())]
    RomTooLarge {
        /// Device label.
        device: String,
        /// Model name.
        model: &'static str,
        /// ROM path.
        path: PathBuf,
        /// ROM size.
        rom: u64,
        /// Slot size.
        slot: u64,
        /// Machine name.
        machine: String,
    },
    /// A ROM for a model without a ROM slot.
    #[error("{device}: {model} has no option ROM slot on machine '{machine}'")]
    NoRomSlot {
        /// Device label.
        device: String,
        /// Model name.
        model: &'static str,
        /// Machine name.
        machine: String,
    },
    /// Interrupt routing.
    #[error(transparent)]
    Irq(#[from] irq::IrqError),
    /// Virtio devices.
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioSetupError),
    /// vCPU setup.
    #[error(transparent)]
    Regs(#[from] vcpu::regs::RegsError),
    /// A vCPU failed while running.
    #[error(transparent)]
    Vcpu(vcpu::VcpuError),
    /// The INTx resample thread could not be started.
    #[error("cannot start the INTx resample thread")]
    Resampler(#[source] std::io::Error),
    /// JSON output.
    #[error("cannot format JSON")]
    Json(#[source] serde_json::Error),
    /// A thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The vCPUs could not be paused.
    #[error("cannot pause the VM")]
    Pause(#[source] vcpu::PauseError),
    /// A device could not be resumed.
    #[error("cannot resume {device}")]
    Resume {
        /// Device.
        device: String,
        /// Cause.
        #[source]
        source: abide_devices::virtio::ActivateError,
    },
    /// Saving or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] snapshot::RestoreError),
    /// The control API.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The VM configuration.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// Live migration.
    #[error(transparent)]
    Migration(#[from] migration::MigrationError),
    /// The seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// Dropping privileges.
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
}

/// An anonymous, unlinked in-memory file.
pub fn anon_file(name: &str) -> std::io::Result<File> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string; flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this fd; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Builds and runs a VM of the configured machine type.
pub fn run(cfg: &config::VmConfig) -> Result<ExitReason, Error> {
    run_with_api(cfg, None)
}

/// Like [`run`], serving the API on `api_socket` if given.
pub fn run_with_api(
    cfg: &config::VmConfig,
    api_socket: Option<&std::path::Path>,
) -> Result<ExitReason, Error> {
    let machine = abide_machines::resolve(&cfg.machine)?;
    let api = api_socket.map(api::Listener::bind).transpose()?;
    let vm = vm::Vm::build(machine, cfg)?;
    control::run(vm, api, None)
}

/// The guest ABI manifest and host-side settings for `cfg`, without
/// starting a VM. The CPU model is checked against this host as for `run`.
pub fn manifest(cfg: &config::VmConfig) -> Result<manifest::Description, Error> {
    let machine = abide_machines::resolve(&cfg.machine)?;
    cfg.validate(&machine)?;
    let model = vcpu::cpuid::model_for(&machine, &cfg.cpu)?;
    let kvm = vm::open_kvm()?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| Error::Kvm {
            what: "read the supported CPUID",
            source,
        })?;
    let cpu = vcpu::cpuid::resolve(model, &machine, !cfg.cpu.is_empty(), supported.as_slice())?;
    let mut per_vcpu = Vec::new();
    for index in 0..cfg.cpus {
        let table = vcpu::cpuid::build(&cpu.model, supported.as_slice(), index, cfg.cpus)?;
        let mut leaves: Vec<manifest::CpuidLeaf> = table
            .as_slice()
            .iter()
            .map(|e| manifest::CpuidLeaf {
                function: e.function,
                index: e.index,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect();
        leaves.sort_by_key(|l| (l.function, l.index));
        per_vcpu.push(leaves);
    }
    manifest::describe(
        &machine,
        cfg,
        manifest::CpuAbi {
            model: cpu.model.name.clone(),
            cpuid: per_vcpu,
        },
        cpu.migratable,
    )
}

/// Formats an error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}
