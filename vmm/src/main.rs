//! The `abide` command.

use std::path::PathBuf;
use std::process::ExitCode;

use abide_vmm::api::client;
use abide_vmm::config::{parse_serial, VmConfig};
use abide_vmm::devices_config::{DiskSpec, NetBackend, NetSpec, RngSpec};
use abide_vmm::spec::{Size, VmSpec};
use abide_vmm::{error_chain, ExitReason, EXIT_ERROR, EXIT_POWEROFF, EXIT_RESET, EXIT_USAGE};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

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
    Run(RunCmd),
    /// Print the guest ABI manifest (and host-side settings) that `run` with
    /// the same flags would give the guest, as JSON, without starting it.
    Manifest(RunArgs),
    /// Print the VM configuration the flags describe, as the JSON that
    /// `--config` and the API's vm.create take.
    Config(RunArgs),
    /// Serve the API with no VM: an orchestrator then creates, restores or
    /// receives one (docs/api/openapi.yaml).
    Serve(ServeArgs),
    /// Print what this host offers and what Abide can give a guest (JSON).
    Capabilities,
    /// List the machine types and whether this host can run their default CPU model.
    Machines,
    /// Ask a running abide (started with --api-socket) to write a snapshot.
    Snapshot(SnapshotArgs),
    /// Restore a snapshot in this process and run the guest on.
    Restore(RestoreArgs),
    /// Send a request to a running abide's API (see `abide ctl --help`).
    Ctl(CtlArgs),
    /// Wait for one incoming live migration, then run the guest.
    Receive(ReceiveArgs),
    /// Live-migrate the guest of a running abide (started with --api-socket)
    /// to an `abide receive`.
    Migrate(MigrateArgs),
}
/// How the process is confined once the VM is set up (host-side only: not
/// part of the VM configuration or the guest ABI).
#[derive(clap::Args)]
struct SandboxArgs {
    /// What a system call outside the thread's seccomp allow-list does:
    /// kill (the kernel kills abide with SIGSYS), trap (abide names the
    /// call and exits 1), log (allowed, logged by the kernel), or off.
    #[arg(long, value_name = "off|log|trap|kill", default_value = "kill")]
    seccomp: abide_vmm::seccomp::Action,
    /// Drop to this user (name or uid) once /dev/kvm, the images, taps and
    /// sockets are open.
    #[arg(long)]
    user: Option<String>,
    /// Drop to this group (name or gid; default: the user's group).
    #[arg(long)]
    group: Option<String>,
}

/// Sets up the sandbox of `s` before anything runs: PR_SET_NO_NEW_PRIVS,
/// the user to drop to later, and every thread kind's seccomp filter.
fn sandbox(s: &SandboxArgs) -> Result<(), abide_vmm::Error> {
    let target = abide_vmm::privileges::resolve(s.user.as_deref(), s.group.as_deref())?;
    abide_vmm::privileges::configure(target)?;
    abide_vmm::seccomp::configure(s.seccomp)?;
    Ok(())
}

#[derive(clap::Args)]
struct RunCmd {
    #[command(flatten)]
    vm: RunArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// Host-side settings that may differ from the saved or migrated guest's.
#[derive(clap::Args)]
struct OverrideArgs {
    /// COM1 output: stdio, null or file:PATH (default: as saved).
    #[arg(long)]
    serial: Option<String>,
    /// Serve the API (docs/api/openapi.yaml) on this Unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Use another image for the disk at a PCI slot: SLOT=PATH. Repeatable.
    #[arg(long = "disk-path", value_name = "SLOT=PATH")]
    disk_paths: Vec<String>,
    /// Use another tap for the NIC at a PCI slot: SLOT=NAME, or SLOT=fd:N
    /// for an open tap descriptor handed over by an orchestrator. Repeatable.
    #[arg(long = "tap", value_name = "SLOT=NAME|SLOT=fd:N")]
    taps: Vec<String>,
}

#[derive(clap::Args)]
struct ReceiveArgs {
    /// Where to wait for the source: tcp:ADDR:PORT or unix:PATH. Without
    /// it, the API's vm.receive-migration gives the address.
    #[arg(long)]
    listen: Option<String>,
    #[command(flatten)]
    overrides: OverrideArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// Control socket of the running abide.
    #[arg(long)]
    api_socket: PathBuf,
    /// The destination: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    /// Longest acceptable pause of the guest, in ms.
    #[arg(long, default_value_t = 300)]
    max_downtime_ms: u64,
    /// Bandwidth limit for pre-copy, in MiB/s (default: none).
    #[arg(long, value_name = "MIB_PER_S")]
    max_bandwidth: Option<u64>,
    /// Give up (the guest keeps running here) after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Unix socket to serve the API on (created with mode 0600).
    #[arg(long)]
    api_socket: PathBuf,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(clap::Args)]
struct SnapshotArgs {
    /// Control socket of the running abide.
    #[arg(long)]
    api_socket: PathBuf,
    /// Stop the VM after the snapshot is written (abide exits 0).
    #[arg(long)]
    stop: bool,
    /// Write only what Abide release X.Y.Z restores, or refuse (before the
    /// guest is paused) naming the section it cannot read.
    #[arg(long, value_name = "X.Y.Z")]
    target_version: Option<String>,
    /// Snapshot file to write.
    output: PathBuf,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// Snapshot file.
    snapshot: PathBuf,
    #[command(flatten)]
    overrides: OverrideArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(clap::Args)]
struct CtlArgs {
    /// API socket of the running abide.
    #[arg(long)]
    api_socket: PathBuf,
    /// status (vm.info), pause, resume, power-button (ACPI soft shutdown),
    /// power-off, metrics, ping, or quit (vmm.shutdown: stop the VM, end
    /// abide).
    #[arg(value_parser = ["status", "pause", "resume", "power-button", "power-off", "metrics", "ping", "quit"])]
    request: String,
}

/// The REST call behind each `abide ctl` request.
fn ctl_call(request: &str) -> (&'static str, &'static str) {
    match request {
        "pause" => ("PUT", "/api/v1/vm.pause"),
        "resume" => ("PUT", "/api/v1/vm.resume"),
        "power-button" => ("PUT", "/api/v1/vm.power-button"),
        "power-off" => ("PUT", "/api/v1/vm.power-off"),
        "metrics" => ("GET", "/api/v1/vm.metrics"),
        "ping" => ("GET", "/api/v1/vmm.ping"),
        "quit" => ("PUT", "/api/v1/vmm.shutdown"),
        _ => ("GET", "/api/v1/vm.info"),
    }
}

fn slot_pair(flag: &str, s: &str) -> Result<(u8, String), abide_vmm::Error> {
    let bad = || {
        abide_vmm::Error::Snapshot(abide_vmm::snapshot::RestoreError::Override(format!(
            "invalid {flag} '{s}': use SLOT=VALUE with the PCI slot number (e.g. 1=/path or 0x1=/path)"
        )))
    };
    let (slot, value) = s.split_once('=').ok_or_else(bad)?;
    let slot = match slot.strip_prefix("0x") {
        Some(h) => u8::from_str_radix(h, 16).map_err(|_| bad())?,
        None => slot.parse::<u8>().map_err(|_| bad())?,
    };
    if value.is_empty() {
        return Err(bad());
    }
    Ok((slot, value.to_string()))
}

/// Parses the host-side overrides and binds the API socket.
fn overrides(
    a: &OverrideArgs,
) -> Result<
    (
        abide_vmm::snapshot::Overrides,
        Option<abide_vmm::api::Listener>,
    ),
    abide_vmm::Error,
> {
    let tap = |t: &String| {
        let (slot, v) = slot_pair("--tap", t)?;
        let backend = match v.strip_prefix("fd:") {
            Some(n) => NetBackend::Fd(n.parse().map_err(|_| {
                abide_vmm::Error::Snapshot(abide_vmm::snapshot::RestoreError::Override(format!(
                    "invalid --tap '{t}': fd:N needs a descriptor number"
                )))
            })?),
            None => NetBackend::Tap(v),
        };
        Ok::<_, abide_vmm::Error>((slot, backend))
    };
    let o = abide_vmm::snapshot::Overrides {
        serial: a.serial.as_deref().map(parse_serial).transpose()?,
        disk_paths: a
            .disk_paths
            .iter()
            .map(|d| slot_pair("--disk-path", d).map(|(s, p)| (s, PathBuf::from(p))))
            .collect::<Result<_, _>>()?,
        taps: a.taps.iter().map(tap).collect::<Result<_, _>>()?,
    };
    let api = a
        .api_socket
        .as_deref()
        .map(abide_vmm::api::Listener::bind)
        .transpose()?;
    Ok((o, api))
}

fn receive(a: ReceiveArgs) -> Result<ExitReason, abide_vmm::Error> {
    use abide_vmm::migration::{Endpoint, MigrationError, ReceiveOptions};
    let at = a
        .listen
        .as_deref()
        .map(|l| l.parse::<Endpoint>().map_err(MigrationError::Refused))
        .transpose()?;
    if at.is_none() && a.overrides.api_socket.is_none() {
        return Err(MigrationError::Refused(
            "give --listen tcp:ADDR:PORT|unix:PATH, or --api-socket to be told where by a receive request".into(),
        )
        .into());
    }
    let (overrides, api) = overrides(&a.overrides)?;
    abide_vmm::control::receive(at, ReceiveOptions { overrides }, api)
}

fn restore(a: RestoreArgs, started: std::time::Instant) -> Result<ExitReason, abide_vmm::Error> {
    let (overrides, api) = overrides(&a.overrides)?;
    let (vm, report) = abide_vmm::snapshot::restore(&a.snapshot, &overrides)?;
    if std::env::var_os("ABIDE_RESTORE_TIMINGS").is_some() {
        // ready_ms: from process start to just before the devices are
        // resumed and the vCPU threads spawned (the guest's first
        // instruction follows within the thread start-up).
        eprintln!(
            "abide: restore verify_ms={} abi_ms={} load_ms={} ready_ms={} memory={} memory_ms={} slots_wait_ms={}{}",
            report.verify_ms,
            report.abi_ms,
            report.load_ms,
            abide_vmm::api::ms(started),
            report.memory,
            report.memory_ms,
            report.slots_ms,
            report
                .memory_note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    let figures = json!({
        "path": a.snapshot,
        "verify_ms": report.verify_ms,
        "abi_ms": report.abi_ms,
        "load_ms": report.load_ms,
        "memory": report.memory,
        "memory_ms": report.memory_ms,
        "memory_note": report.memory_note,
    });
    abide_vmm::control::run(vm, api, Some(figures))
}

/// The VM configuration flags. Each is a field of the JSON configuration
/// (`abide config` prints it; `--config` and the API's vm.create take it):
/// flags given on the command line override the file's fields, repeated
/// `--disk`/`--net` add entries, and what neither gives has the schema's
/// default.
#[derive(clap::Args)]
struct RunArgs {
    /// JSON VM configuration file (the schema of `abide config` and of the
    /// API's vm.create); the other flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Machine type (pc-1.0, pc-2.0, pc-3.0; pc is the newest) [default: pc].
    #[arg(long)]
    machine: Option<String>,
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
    /// Boot through this firmware image (SeaBIOS's bios.bin or
    /// bios-256k.bin); with --kernel, the firmware loads the kernel.
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// Append the firmware's debug port (0x402) output to this file.
    #[arg(long)]
    firmware_log: Option<PathBuf>,
    /// Guest memory, e.g. 512M or 2G (a bare number means MiB) [default: 512M].
    #[arg(long)]
    memory: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    cpus: Option<u32>,
    /// COM1 output: stdio, null or file:PATH [default: stdio].
    #[arg(long)]
    serial: Option<String>,
    /// virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,direct=on][,addr=SLOT]. Repeatable.
    #[arg(long = "disk", value_name = "OPTIONS")]
    disks: Vec<String>,
    /// virtio-net card: tap=NAME|fd=N[,mac=MAC][,addr=SLOT][,rom=PATH][,romsize=SIZE]. Repeatable.
    #[arg(long = "net", value_name = "OPTIONS")]
    nets: Vec<String>,
    /// Add a virtio-rng device (optionally addr=SLOT).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    rng: Option<String>,
    /// Serve the API (docs/api/openapi.yaml) on this Unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

/// The configuration the flags (and `--config`) describe.
fn build_spec(a: &RunArgs) -> Result<VmSpec, abide_vmm::Error> {
    let mut spec = match &a.config {
        Some(p) => VmSpec::from_file(p)?,
        None => VmSpec::default(),
    };
    if let Some(m) = &a.machine {
        spec.machine = m.clone();
    }
    if let Some(c) = &a.cpu {
        spec.cpu = Some(c.clone());
    }
    if let Some(k) = &a.kernel {
        spec.kernel = Some(k.clone());
    }
    if let Some(i) = &a.initrd {
        spec.initrd = Some(i.clone());
    }
    if let Some(c) = &a.cmdline {
        spec.cmdline = Some(c.clone());
    }
    if let Some(f) = &a.firmware {
        spec.firmware = Some(f.clone());
    }
    if let Some(f) = &a.firmware_log {
        spec.firmware_log = Some(f.clone());
    }
    if let Some(m) = &a.memory {
        spec.memory = Size::Text(m.clone());
    }
    if let Some(n) = a.cpus {
        spec.cpus = n;
    }
    if let Some(s) = &a.serial {
        spec.serial = s.clone();
    }
    for d in &a.disks {
        spec.disks.push(DiskSpec::from_cli(d)?);
    }
    for n in &a.nets {
        spec.nets.push(NetSpec::from_cli(n)?);
    }
    if let Some(r) = &a.rng {
        spec.rng = Some(RngSpec::from_cli(r)?);
    }
    Ok(spec)
}

fn build_config(a: &RunArgs) -> Result<VmConfig, abide_vmm::Error> {
    Ok(build_spec(a)?.resolve()?)
}

/// `abide snapshot`: pause (with --stop), save, and quit (with --stop),
/// through the API.
fn snapshot(a: &SnapshotArgs) -> Result<(), abide_vmm::Error> {
    let sock = &a.api_socket;
    let path = std::path::absolute(&a.output).unwrap_or(a.output.clone());
    // With --stop the guest stays paused after the save (it must not run
    // past the snapshot before abide quits); a target release that cannot
    // read it is refused before the guest is paused at all.
    let reply = client::call(
        sock,
        "PUT",
        "/api/v1/vm.snapshot",
        Some(&json!({
            "path": path,
            "target_version": a.target_version,
            "stay_paused": a.stop,
        })),
    )?;
    println!("{reply}");
    if a.stop {
        client::call(sock, "PUT", "/api/v1/vmm.shutdown", None)?;
    }
    Ok(())
}

/// `pub` for the tests' hook binary, which includes this file as a module.
pub fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(RunCmd {
            vm: args,
            sandbox: s,
        }) => sandbox(&s)
            .and_then(|()| build_config(&args))
            .and_then(|cfg| abide_vmm::run_with_api(&cfg, args.api_socket.as_deref())),
        Command::Restore(args) => sandbox(&args.sandbox).and_then(|()| restore(args, started)),
        Command::Config(args) => build_config(&args).and_then(|cfg| {
            serde_json::to_string_pretty(&VmSpec::from_config(&cfg))
                .map(|json| println!("{json}"))
                .map(|()| ExitReason::Poweroff)
                .map_err(abide_vmm::Error::Json)
        }),
        Command::Serve(args) => sandbox(&args.sandbox)
            .and_then(|()| {
                abide_vmm::api::Listener::bind(&args.api_socket).map_err(abide_vmm::Error::Api)
            })
            .and_then(abide_vmm::control::serve)
            .map(|()| ExitReason::Poweroff),
        Command::Snapshot(a) => snapshot(&a).map(|()| ExitReason::Poweroff),
        Command::Receive(args) => sandbox(&args.sandbox).and_then(|()| receive(args)),
        Command::Migrate(a) => abide_vmm::migration::client::migrate(
            &a.api_socket,
            &json!({
                "destination_url": a.to,
                "max_downtime_ms": a.max_downtime_ms,
                "max_bandwidth_mib_s": a.max_bandwidth,
                "timeout_s": a.timeout,
            }),
            std::time::Duration::from_secs(a.timeout + 60),
        )
        .map(|()| ExitReason::Poweroff),
        Command::Ctl(a) => {
            let (method, path) = ctl_call(&a.request);
            client::call(&a.api_socket, method, path, None)
                .map(|reply| {
                    match reply {
                        Value::String(text) => print!("{text}"),
                        v => println!("{v}"),
                    }
                    ExitReason::Poweroff
                })
                .map_err(abide_vmm::Error::Api)
        }
        Command::Manifest(args) => build_config(&args)
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
        Ok(ExitReason::Migrated) => {
            eprintln!("abide: the guest was migrated to another abide; exiting");
            ExitCode::from(EXIT_POWEROFF as u8)
        }
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
