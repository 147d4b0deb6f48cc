//! The VM configuration as users write it: one schema for the command
//! line's flags, a `--config` JSON file and the API's `vm.create` body
//! (`components.schemas.VmConfig` in `docs/api/openapi.yaml`).
//!
//! A [`VmSpec`]'s JSON keys are the flag names (`--disk` is repeated, its
//! entries are `disks[]`; `--net` gives `nets[]`), and a device's option
//! keys (`--disk path=...,readonly=on`) are the fields of its JSON object.
//! Both paths end in [`VmSpec::resolve`], the one place that checks a
//! configuration and applies defaults; [`VmSpec::from_config`] is its
//! inverse, used to report a VM's configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{parse_serial, parse_size, ConfigError, KernelSource, SerialConfig, VmConfig};
use crate::devices_config::{DeviceConfigError, DiskSpec, NetSpec, RngSpec};

/// A size: a JSON integer (MiB, like a bare number on the command line) or
/// a string with an optional K, M, G or T suffix (`"512M"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Size {
    /// A number of MiB.
    Mib(u64),
    /// As written, e.g. `512M`.
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, ConfigError> {
        match self {
            Size::Mib(n) => n
                .checked_mul(1 << 20)
                .ok_or_else(|| ConfigError::BadSize(n.to_string())),
            Size::Text(s) => parse_size(s),
        }
    }

    /// The shortest exact text for `bytes` (`536870912` gives `512M`).
    pub fn from_bytes(bytes: u64) -> Self {
        for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if bytes != 0 && bytes.trailing_zeros() >= shift {
                return Size::Text(format!("{}{suffix}", bytes >> shift));
            }
        }
        // Not a whole KiB: no text parses back to it, so say it in KiB
        // rounded down (resolving refuses it as unaligned anyway).
        Size::Text(format!("{}K", bytes >> 10))
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Mib(n) => write!(f, "{n}"),
            Size::Text(s) => f.write_str(s),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Size::Mib(n) => s.serialize_u64(*n),
            Size::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: a number of MiB or a string such as \"512M\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size::Mib(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                Ok(Size::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_machine() -> String {
    abide_machines::types_alias().to_string()
}

fn default_memory() -> Size {
    Size::Text("512M".into())
}

fn default_cpus() -> u32 {
    1
}

fn default_serial() -> String {
    "stdio".into()
}

/// A VM configuration as written on the command line, in a `--config`
/// file or in the API's `vm.create` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Machine type (`pc-1.0`, `pc-2.0`, `pc-3.0`; `pc` is the newest).
    #[serde(default = "default_machine")]
    pub machine: String,
    /// CPU model; absent means the machine type's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Linux bzImage or PVH ELF; absent means the embedded test guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; absent means `console=ttyS0` with a kernel,
    /// empty for the embedded guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Firmware image to boot through (`--firmware`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// Where the firmware's debug port output goes (`--firmware-log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_log: Option<PathBuf>,
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: Size,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// COM1 output: `stdio`, `null` or `file:PATH`.
    #[serde(default = "default_serial")]
    pub serial: String,
    /// virtio-blk disks (`--disk`).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// virtio-net cards (`--net`).
    #[serde(default)]
    pub nets: Vec<NetSpec>,
    /// A virtio-rng (`--rng`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngSpec>,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            machine: default_machine(),
            cpu: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            firmware: None,
            firmware_log: None,
            memory: default_memory(),
            cpus: default_cpus(),
            serial: default_serial(),
            disks: Vec::new(),
            nets: Vec::new(),
            rng: None,
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A VM-level setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A device's options.
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    /// A `--config` file that cannot be read.
    #[error("cannot read the configuration file '{}'", path.display())]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// JSON that does not fit the schema.
    #[error("invalid VM configuration{}: {reason}", origin.as_ref().map(|p| format!(" in '{}'", p.display())).unwrap_or_default())]
    Json {
        /// The file, if it came from one.
        origin: Option<PathBuf>,
        /// What serde said (names unknown fields and wrong types).
        reason: String,
    },
}

/// Checks that `v` is a JSON object whose fields named in `lists` are
/// arrays of objects and whose fields named in `objects` are objects (or
/// null). serde would otherwise also take a struct written as an array of
/// its fields' values, which the schema does not allow.
pub fn check_shape(v: &serde_json::Value, lists: &[&str], objects: &[&str]) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return Err("invalid type: expected a JSON object".into());
    };
    for (k, field) in obj {
        let nested_ok = if lists.contains(&k.as_str()) {
            field
                .as_array()
                .is_none_or(|items| items.iter().all(serde_json::Value::is_object))
        } else if objects.contains(&k.as_str()) {
            field.is_object() || field.is_null()
        } else {
            true
        };
        if !nested_ok {
            return Err(format!(
                "invalid type: field `{k}` must be {}",
                if lists.contains(&k.as_str()) {
                    "an array of JSON objects"
                } else {
                    "a JSON object"
                }
            ));
        }
    }
    Ok(())
}

impl VmSpec {
    /// Parses JSON (the API's body, or a `--config` file's contents).
    pub fn from_json(bytes: &[u8], origin: Option<&Path>) -> Result<Self, SpecError> {
        let err = |reason: String| SpecError::Json {
            origin: origin.map(Path::to_path_buf),
            reason,
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
        check_shape(&v, &["disks", "nets"], &["rng"]).map_err(err)?;
        serde_json::from_value(v).map_err(|e| err(e.to_string()))
    }

    /// Reads a `--config` file.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let bytes = std::fs::read(path).map_err(|source| SpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&bytes, Some(path))
    }

    /// Checks the configuration (without looking at the host or the
    /// machine type: [`VmConfig::validate`] does that when a VM is built)
    /// and fills in defaults.
    pub fn resolve(&self) -> Result<VmConfig, SpecError> {
        let kernel = match &self.kernel {
            Some(p) => KernelSource::Path(p.clone()),
            None => KernelSource::Embedded,
        };
        let cmdline = self.cmdline.clone().unwrap_or_else(|| match kernel {
            KernelSource::Path(_) => "console=ttyS0".to_string(),
            KernelSource::Embedded => String::new(),
        });
        Ok(VmConfig {
            machine: self.machine.clone(),
            cpu: self.cpu.clone().unwrap_or_default(),
            kernel,
            initrd: self.initrd.clone(),
            cmdline,
            firmware: match (&self.firmware, &self.firmware_log) {
                (None, Some(_)) => return Err(ConfigError::FirmwareLogWithoutFirmware.into()),
                (None, None) => None,
                (Some(image), log) => Some(crate::config::FirmwareConfig {
                    image: image.clone(),
                    log: log.clone(),
                    bytes: None,
                }),
            },
            memory: self.memory.bytes()?,
            cpus: self.cpus,
            serial: parse_serial(&self.serial)?,
            disks: self
                .disks
                .iter()
                .map(DiskSpec::resolve)
                .collect::<Result<_, _>>()?,
            nets: self
                .nets
                .iter()
                .map(NetSpec::resolve)
                .collect::<Result<_, _>>()?,
            rng: self.rng.as_ref().map(RngSpec::resolve).transpose()?,
        })
    }

    /// The configuration that resolves to `c`, every default spelled out.
    pub fn from_config(c: &VmConfig) -> Self {
        Self {
            machine: c.machine.clone(),
            cpu: (!c.cpu.is_empty()).then(|| c.cpu.clone()),
            kernel: match &c.kernel {
                KernelSource::Path(p) => Some(p.clone()),
                KernelSource::Embedded => None,
            },
            initrd: c.initrd.clone(),
            cmdline: Some(c.cmdline.clone()),
            firmware: c.firmware.as_ref().map(|f| f.image.clone()),
            firmware_log: c.firmware.as_ref().and_then(|f| f.log.clone()),
            memory: Size::from_bytes(c.memory),
            cpus: c.cpus,
            serial: match &c.serial {
                SerialConfig::Stdio => "stdio".into(),
                SerialConfig::Null => "null".into(),
                SerialConfig::File(p) => format!("file:{}", p.display()),
            },
            disks: c.disks.iter().map(DiskSpec::from_config).collect(),
            nets: c.nets.iter().map(NetSpec::from_config).collect(),
            rng: c.rng.as_ref().map(RngSpec::from_config),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_both_forms() {
        let s: Size = serde_json::from_str("512").expect("int");
        assert_eq!(s.bytes().expect("bytes"), 512 << 20);
        let s: Size = serde_json::from_str("\"2G\"").expect("text");
        assert_eq!(s.bytes().expect("bytes"), 2 << 30);
        assert!(serde_json::from_str::<Size>("-1").is_err());
        assert!(serde_json::from_str::<Size>("true").is_err());
        assert!(Size::Text("lots".into()).bytes().is_err());
        assert!(Size::Mib(u64::MAX).bytes().is_err());
        for b in [4096u64, 512 << 20, 3 << 30, 1 << 40, 768 << 10] {
            assert_eq!(Size::from_bytes(b).bytes().expect("parses"), b, "{b}");
        }
        assert_eq!(Size::from_bytes(512 << 20), Size::Text("512M".into()));
    }

    #[test]
    fn defaults_match_the_command_line() {
        let empty = VmSpec::from_json(b"{}", None).expect("empty object");
        assert_eq!(empty, VmSpec::default());
        let c = empty.resolve().expect("resolves");
        assert_eq!(c, VmConfig::default());
        let with_kernel = VmSpec {
            kernel: Some("/k".into()),
            ..VmSpec::default()
        };
        assert_eq!(with_kernel.resolve().expect("ok").cmdline, "console=ttyS0");
    }

    #[test]
    fn round_trips_and_refusals() {
        let json = br#"{"machine":"pc-1.0","cpus":2,"memory":"256M","serial":"null",
            "disks":[{"path":"/d.img","readonly":true,"addr":3}],
            "nets":[{"tap":"tap0","mac":"52:54:00:00:00:07"}],"rng":{}}"#;
        let spec = VmSpec::from_json(json, None).expect("parses");
        let cfg = spec.resolve().expect("resolves");
        assert_eq!(cfg.memory, 256 << 20);
        assert_eq!(cfg.disks[0].addr, Some(3));
        assert_eq!(VmSpec::from_config(&cfg).resolve().expect("again"), cfg);
        for (bad, needle) in [
            (&br#"{"cpu_count":2}"#[..], "unknown field"),
            (br#"{"cpus":"two"}"#, "invalid type"),
            (br#"{"memory":"lots"}"#, "invalid size"),
            (br#"{"serial":"tcp:1"}"#, "--serial"),
            (br#"{"disks":[{"readonly":true}]}"#, "path"),
            (
                br#"{"nets":[{"tap":"t","mac":"01:00:00:00:00:00"}]}"#,
                "mac",
            ),
            (br#"[]"#, "invalid type"),
            (br#"{"disks":[["/x"]]}"#, "invalid type"),
            (br#"{"rng":[]}"#, "invalid type"),
        ] {
            let e = VmSpec::from_json(bad, None)
                .and_then(|s| s.resolve())
                .expect_err("refused");
            assert!(
                e.to_string().contains(needle),
                "{}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
