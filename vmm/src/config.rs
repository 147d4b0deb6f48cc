//! The user's VM configuration, as parsed from the command line or the API.

use std::path::PathBuf;

use abide_machines::{MachineDescription, MIB};

use crate::devices_config::{DiskConfig, NetConfig, RngConfig};

/// Where the guest's kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelSource {
    /// The small guest built into the `abide` binary.
    Embedded,
    /// A bzImage or PVH ELF on disk.
    Path(PathBuf),
}

/// Where COM1's output goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SerialConfig {
    /// Standard output; standard input feeds the UART.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// Booting through a firmware image (`--firmware`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirmwareConfig {
    /// The image file.
    pub image: PathBuf,
    /// Where the debug port's output is appended (`--firmware-log`).
    pub log: Option<PathBuf>,
    /// The image the guest has: once a VM is built, the bytes it booted
    /// with; after a restore or migration, the saved image. Served instead
    /// of the file at `image`, which then only has to fit the slot. Never
    /// serialized: snapshots carry it in the `rom.firmware` section, as
    /// option ROMs travel in `rom.*` sections.
    #[serde(skip)]
    pub bytes: Option<std::sync::Arc<Vec<u8>>>,
}

/// Errors in the VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size '{0}': use a number with an optional K, M, G or T suffix (a plain number means MiB), e.g. 512M or 2G")]
    BadSize(String),
    /// Too little memory.
    #[error("--memory {given} MiB is too small: machine '{machine}' needs at least {min} MiB")]
    MemoryTooSmall {
        /// Given, MiB.
        given: u64,
        /// Minimum, MiB.
        min: u64,
        /// Machine name.
        machine: String,
    },
    /// Too much memory.
    #[error("--memory {given} MiB is too large: machine '{machine}' allows at most {max} MiB")]
    MemoryTooLarge {
        /// Given, MiB.
        given: u64,
        /// Maximum, MiB.
        max: u64,
        /// Machine name.
        machine: String,
    },
    /// More memory than the host has.
    #[error(
        "--memory {given} MiB is more than this host's {host} MiB of RAM; choose a smaller size"
    )]
    MemoryExceedsHost {
        /// Given, MiB.
        given: u64,
        /// Host RAM, MiB.
        host: u64,
    },
    /// Not page aligned.
    #[error("--memory must be a multiple of 4 KiB")]
    MemoryUnaligned,
    /// Bad vCPU count.
    #[error("--cpus {given} is out of range: machine '{machine}' supports 1 to {max} vCPUs")]
    Cpus {
        /// Given.
        given: u32,
        /// Maximum.
        max: u32,
        /// Machine name.
        machine: String,
    },
    /// `--firmware-log` needs `--firmware`.
    #[error("--firmware-log needs --firmware (it receives the firmware's debug port output)")]
    FirmwareLogWithoutFirmware,
    /// Bad --serial value.
    #[error("invalid --serial '{0}': use stdio, null or file:PATH")]
    BadSerial(String),
}

/// A VM to build.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Machine type name or alias (`pc-1.0`, `pc`, …).
    pub machine: String,
    /// CPU model name; empty means the machine type's default model.
    pub cpu: String,
    /// Kernel.
    pub kernel: KernelSource,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Boot through a firmware image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareConfig>,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPU count.
    pub cpus: u32,
    /// COM1 output.
    pub serial: SerialConfig,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards.
    pub nets: Vec<NetConfig>,
    /// virtio-rng.
    pub rng: Option<RngConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            machine: abide_machines::types_alias().to_string(),
            cpu: String::new(),
            kernel: KernelSource::Embedded,
            initrd: None,
            cmdline: String::new(),
            firmware: None,
            memory: 512 * MIB,
            cpus: 1,
            serial: SerialConfig::Stdio,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: None,
        }
    }
}

/// Parses a size such as `512M`, `2G`, `1048576K`; a bare number is MiB.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 20),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "null" => Ok(SerialConfig::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::BadSerial(s.to_string())),
        },
    }
}

fn host_ram_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks the configuration against the machine and the host.
    pub fn validate(&self, machine: &MachineDescription) -> Result<(), ConfigError> {
        let mib = self.memory / MIB;
        if self.memory < machine.min_memory {
            return Err(ConfigError::MemoryTooSmall {
                given: mib,
                min: machine.min_memory / MIB,
                machine: machine.name.clone(),
            });
        }
        if self.memory > machine.max_memory {
            return Err(ConfigError::MemoryTooLarge {
                given: mib,
                max: machine.max_memory / MIB,
                machine: machine.name.clone(),
            });
        }
        if let Some(host) = host_ram_bytes() {
            if self.memory > host {
                return Err(ConfigError::MemoryExceedsHost {
                    given: mib,
                    host: host / MIB,
                });
            }
        }
        if !self.memory.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned);
        }
        if self.cpus == 0 || self.cpus > machine.max_vcpus {
            return Err(ConfigError::Cpus {
                given: self.cpus,
                max: machine.max_vcpus,
                machine: machine.name.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abide_machines::GIB;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("512"), Ok(512 * MIB));
        assert_eq!(parse_size("2g"), Ok(2 * GIB));
        assert_eq!(parse_size("64K"), Ok(64 * 1024));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdio"), Ok(SerialConfig::Stdio));
        assert_eq!(parse_serial("null"), Ok(SerialConfig::Null));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }

    #[test]
    fn validation() {
        let m = abide_machines::pc_1_0();
        let ok = VmConfig::default();
        assert_eq!(ok.validate(&m), Ok(()));
        let small = VmConfig {
            memory: MIB,
            ..VmConfig::default()
        };
        assert!(matches!(
            small.validate(&m),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let huge = VmConfig {
            memory: 512 * GIB,
            ..VmConfig::default()
        };
        assert!(matches!(
            huge.validate(&m),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        let cpus = VmConfig {
            cpus: 0,
            ..VmConfig::default()
        };
        assert!(matches!(cpus.validate(&m), Err(ConfigError::Cpus { .. })));
        let cpus = VmConfig {
            cpus: 65,
            ..VmConfig::default()
        };
        assert!(matches!(cpus.validate(&m), Err(ConfigError::Cpus { .. })));
    }
}
