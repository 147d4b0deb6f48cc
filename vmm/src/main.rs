//! The `abide` command.

use std::path::PathBuf;
use std::process::ExitCode;

use abide_vmm::config::{parse_serial, parse_size, KernelSource, VmConfig};
use abide_vmm::devices_config::{parse_disk, parse_net, parse_rng};
use abide_vmm::{error_chain, ExitReason, EXIT_ERROR, EXIT_POWEROFF, EXIT_RESET, EXIT_USAGE};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "abide",
    version,
    about = "A KVM virtual machine monitor whose machine types keep a guest's hardware the same across upgrades",
    after_help = "Exit status of `abide run`: 0 guest powered off, 3 guest reset, 1 error, 2 usage error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing `RunArgs` would only obscure the derive.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it powers off or resets.
    Run(RunArgs),
    /// Print the guest ABI manifest (and host-side settings) that `run` with
    /// the same flags would give the guest, as JSON, without starting it.
    Manifest(RunArgs),
    /// Print what this host offers and what Abide can give a guest (JSON).
    Capabilities,
    /// List the machine types and whether this host can run their default CPU model.
    Machines,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Machine type (pc-1.0, pc-2.0; pc is the newest).
    #[arg(long, default_value = "pc")]
    machine: String,
    /// CPU model (abide-v1, abide-v2, host; default: the machine type's).
    #[arg(long)]
    cpu: Option<String>,
    /// Linux bzImage or PVH ELF vmlinux. Without it, the small guest built
    /// into abide boots, reports what it sees and powers off.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs to load.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0" for --kernel, empty for the embedded guest).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G (a bare number means MiB).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// COM1 output: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,direct=on][,addr=SLOT]. Repeatable.
    #[arg(long = "disk", value_name = "OPTIONS")]
    disks: Vec<String>,
    /// virtio-net card: tap=NAME|fd=N[,mac=MAC][,addr=SLOT][,rom=PATH]. Repeatable.
    #[arg(long = "net", value_name = "OPTIONS")]
    nets: Vec<String>,
    /// Add a virtio-rng device (optionally addr=SLOT).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    rng: Option<String>,
}

fn build_config(a: RunArgs) -> Result<VmConfig, abide_vmm::Error> {
    let kernel = match a.kernel {
        Some(p) => KernelSource::Path(p),
        None => KernelSource::Embedded,
    };
    let cmdline = a.cmdline.unwrap_or_else(|| match kernel {
        KernelSource::Path(_) => "console=ttyS0".to_string(),
        KernelSource::Embedded => String::new(),
    });
    Ok(VmConfig {
        machine: a.machine,
        cpu: a.cpu.unwrap_or_default(),
        kernel,
        initrd: a.initrd,
        cmdline,
        memory: parse_size(&a.memory)?,
        cpus: a.cpus,
        serial: parse_serial(&a.serial)?,
        disks: a
            .disks
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<_, _>>()?,
        nets: a
            .nets
            .iter()
            .map(|n| parse_net(n))
            .collect::<Result<_, _>>()?,
        rng: a.rng.as_deref().map(parse_rng).transpose()?,
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => build_config(args).and_then(|cfg| abide_vmm::run(&cfg)),
        Command::Manifest(args) => build_config(args)
            .and_then(|cfg| abide_vmm::manifest(&cfg))
            .and_then(|d| {
                serde_json::to_string_pretty(&d)
                    .map(|json| println!("{json}"))
                    .map_err(abide_vmm::Error::Json)
            })
            .map(|()| ExitReason::Poweroff),
        Command::Capabilities => {
            let host = abide_vmm::capabilities::HostKvm::probe();
            let report = abide_vmm::capabilities::report(&host);
            println!("{report:#}");
            return ExitCode::SUCCESS;
        }
        Command::Machines => {
            let host = abide_vmm::capabilities::HostKvm::probe();
            print!("{}", abide_vmm::capabilities::machines_table(&host));
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok(ExitReason::Poweroff) => ExitCode::from(EXIT_POWEROFF as u8),
        Ok(ExitReason::Reset) => {
            eprintln!("abide: the guest reset the machine");
            ExitCode::from(EXIT_RESET as u8)
        }
        Err(e) => {
            eprintln!("abide: error: {}", error_chain(&e));
            ExitCode::from(EXIT_ERROR as u8)
        }
    }
}
