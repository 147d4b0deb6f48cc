//! Device options (`--disk`, `--net`, `--rng`) and the PCI slot policy.

use std::path::PathBuf;

/// Errors in device options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceConfigError {
    /// Unknown key.
    #[error("--{device}: unknown option '{key}'; valid options: {valid}")]
    UnknownKey {
        /// Option name.
        device: &'static str,
        /// Key given.
        key: String,
        /// Valid keys.
        valid: &'static str,
    },
    /// Missing required key.
    #[error("--{device}: '{key}=' is required")]
    Missing {
        /// Option name.
        device: &'static str,
        /// Key.
        key: &'static str,
    },
    /// A value that does not parse.
    #[error("--{device}: invalid {key} '{value}': {hint}")]
    BadValue {
        /// Option name.
        device: &'static str,
        /// Key.
        key: &'static str,
        /// Value.
        value: String,
        /// What is expected.
        hint: &'static str,
    },
    /// Two devices in one slot, or a reserved slot.
    #[error("PCI slot {slot} is {why}; choose another addr= (1-31)")]
    Slot {
        /// Slot.
        slot: u8,
        /// Why it is unusable.
        why: &'static str,
    },
    /// More devices than slots.
    #[error("too many PCI devices: bus 0 has 31 slots for devices")]
    TooManyDevices,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// Raw image.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub readonly: bool,
    /// Serial number reported by GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// Requested PCI slot.
    pub addr: Option<u8>,
}

/// The host side of a virtio-net card.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetBackend {
    /// A tap interface opened by name.
    Tap(String),
    /// An open tap file descriptor passed in by an orchestrator.
    Fd(i32),
}

/// A virtio-net card.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// Backend.
    pub backend: NetBackend,
    /// MAC address (a locally administered one is derived if absent).
    pub mac: Option<[u8; 6]>,
    /// Requested PCI slot.
    pub addr: Option<u8>,
    /// Option ROM image (e.g. iPXE's pxe-virtio.rom).
    pub rom: Option<PathBuf>,
    /// ROM slot size overriding the machine type's (recorded in the manifest).
    pub romsize: Option<u64>,
    /// The ROM image the guest has: once a VM is built, the bytes it
    /// booted with; after a restore or migration, the saved image. Served
    /// instead of the file at `rom`, which then only has to fit the slot.
    /// Never serialized: snapshots carry the image in a `rom.*` section.
    #[serde(skip)]
    pub rom_image: Option<std::sync::Arc<Vec<u8>>>,
}

/// A virtio-rng device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngConfig {
    /// Requested PCI slot.
    pub addr: Option<u8>,
}

/// The option keys of `--disk`, which are the fields of a `disks[]` entry.
pub const DISK_KEYS: &str = "path, readonly, serial, direct, addr";
/// The option keys of `--net`, which are the fields of a `nets[]` entry.
pub const NET_KEYS: &str = "tap, fd, mac, addr, rom, romsize";
/// The option keys of `--rng`, which are the fields of `rng`.
pub const RNG_KEYS: &str = "addr";

/// A `--disk` / `disks[]` entry as the user wrote it. The command line's
/// `key=value` list and the API's JSON object have the same keys and go
/// through the same [`DiskSpec::resolve`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Raw image.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// GET_ID serial number (at most 20 ASCII characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Open with O_DIRECT.
    #[serde(default)]
    pub direct: bool,
    /// PCI slot (1-31).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u32>,
}

/// A `--net` / `nets[]` entry as the user wrote it (see [`DiskSpec`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Tap interface name (exactly one of `tap` and `fd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An open tap file descriptor of the abide process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// MAC address, six hex bytes separated by colons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// PCI slot (1-31).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u32>,
    /// Option ROM image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rom: Option<PathBuf>,
    /// ROM slot size overriding the machine type's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub romsize: Option<crate::spec::Size>,
}

/// `--rng` / `rng` as the user wrote it (see [`DiskSpec`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngSpec {
    /// PCI slot (1-31).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u32>,
}

fn pairs<'a>(
    device: &'static str,
    spec: &'a str,
    valid: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, DeviceConfigError> {
    let keys: Vec<&str> = valid.split(", ").collect();
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            if keys.contains(&k) {
                Ok((k, v))
            } else {
                Err(DeviceConfigError::UnknownKey {
                    device,
                    key: k.to_string(),
                    valid,
                })
            }
        })
        .collect()
}

fn on_off(device: &'static str, key: &'static str, v: &str) -> Result<bool, DeviceConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(DeviceConfigError::BadValue {
            device,
            key,
            value: v.to_string(),
            hint: "use on or off",
        }),
    }
}

fn bad_slot(device: &'static str, v: impl ToString) -> DeviceConfigError {
    DeviceConfigError::BadValue {
        device,
        key: "addr",
        value: v.to_string(),
        hint: "a slot number 1-31 (decimal or 0x hex)",
    }
}

/// A command-line slot number, decimal or 0x hex (checked by [`slot`]).
fn cli_slot(device: &'static str, v: &str) -> Result<u32, DeviceConfigError> {
    match v.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => v.parse(),
    }
    .map_err(|_| bad_slot(device, v))
}

fn slot(device: &'static str, n: Option<u32>) -> Result<Option<u8>, DeviceConfigError> {
    n.map(|n| {
        u8::try_from(n)
            .ok()
            .filter(|s| (1..32).contains(s))
            .ok_or_else(|| bad_slot(device, n))
    })
    .transpose()
}

impl DiskSpec {
    /// Parses `path=FILE[,readonly=on][,serial=S][,direct=on][,addr=N]`.
    pub fn from_cli(spec: &str) -> Result<Self, DeviceConfigError> {
        const D: &str = "disk";
        let mut cfg = Self::default();
        for (k, v) in pairs(D, spec, DISK_KEYS)? {
            match k {
                "path" => cfg.path = PathBuf::from(v),
                "readonly" => cfg.readonly = on_off(D, "readonly", v)?,
                "direct" => cfg.direct = on_off(D, "direct", v)?,
                "serial" => cfg.serial = Some(v.to_string()),
                _ => cfg.addr = Some(cli_slot(D, v)?),
            }
        }
        Ok(cfg)
    }

    /// Checks the entry and turns it into the VM configuration's disk.
    pub fn resolve(&self) -> Result<DiskConfig, DeviceConfigError> {
        const D: &str = "disk";
        if self.path.as_os_str().is_empty() {
            return Err(DeviceConfigError::Missing {
                device: D,
                key: "path",
            });
        }
        if let Some(s) = &self.serial {
            if s.len() > 20 || !s.is_ascii() {
                return Err(DeviceConfigError::BadValue {
                    device: D,
                    key: "serial",
                    value: s.clone(),
                    hint: "at most 20 ASCII characters",
                });
            }
        }
        Ok(DiskConfig {
            path: self.path.clone(),
            readonly: self.readonly,
            serial: self.serial.clone(),
            direct: self.direct,
            addr: slot(D, self.addr)?,
        })
    }

    /// The entry that resolves to `c`.
    pub fn from_config(c: &DiskConfig) -> Self {
        Self {
            path: c.path.clone(),
            readonly: c.readonly,
            serial: c.serial.clone(),
            direct: c.direct,
            addr: c.addr.map(u32::from),
        }
    }
}

fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    // A multicast address cannot be a card's address.
    (mac[0] & 1 == 0).then_some(mac)
}

impl NetSpec {
    /// Parses `tap=NAME|fd=N[,mac=52:54:..][,addr=N][,rom=PATH][,romsize=SIZE]`.
    pub fn from_cli(spec: &str) -> Result<Self, DeviceConfigError> {
        const D: &str = "net";
        let mut cfg = Self::default();
        for (k, v) in pairs(D, spec, NET_KEYS)? {
            match k {
                "tap" => cfg.tap = Some(v.into()),
                "fd" => {
                    cfg.fd = Some(v.parse::<i32>().map_err(|_| DeviceConfigError::BadValue {
                        device: D,
                        key: "fd",
                        value: v.into(),
                        hint: "an open file descriptor number",
                    })?)
                }
                "mac" => cfg.mac = Some(v.into()),
                "addr" => cfg.addr = Some(cli_slot(D, v)?),
                "rom" => cfg.rom = Some(PathBuf::from(v)),
                _ => cfg.romsize = Some(crate::spec::Size::Text(v.into())),
            }
        }
        Ok(cfg)
    }

    /// Checks the entry and turns it into the VM configuration's card.
    pub fn resolve(&self) -> Result<NetConfig, DeviceConfigError> {
        const D: &str = "net";
        let bad = |key, value: String, hint| DeviceConfigError::BadValue {
            device: D,
            key,
            value,
            hint,
        };
        let backend = match (&self.tap, self.fd) {
            (Some(t), None) if !t.is_empty() && t.len() < 16 => NetBackend::Tap(t.clone()),
            (Some(t), None) => {
                return Err(bad(
                    "tap",
                    t.clone(),
                    "an interface name of 1 to 15 characters",
                ))
            }
            (None, Some(fd)) if fd >= 0 => NetBackend::Fd(fd),
            (None, Some(fd)) => {
                return Err(bad("fd", fd.to_string(), "an open file descriptor number"))
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "fd",
                    "(with tap=)".into(),
                    "give either tap= or fd=, not both",
                ))
            }
            (None, None) => {
                return Err(DeviceConfigError::Missing {
                    device: D,
                    key: "tap",
                })
            }
        };
        let mac = self
            .mac
            .as_deref()
            .map(|m| {
                parse_mac(m).ok_or_else(|| {
                    bad(
                        "mac",
                        m.into(),
                        "six hex bytes like 52:54:00:12:34:56, not multicast",
                    )
                })
            })
            .transpose()?;
        let rom = match &self.rom {
            Some(p) if p.as_os_str().is_empty() => {
                return Err(bad("rom", String::new(), "a file path"))
            }
            r => r.clone(),
        };
        let romsize = self
            .romsize
            .as_ref()
            .map(|s| {
                s.bytes()
                    .ok()
                    .filter(|s| s.is_power_of_two() && (2048..=16 << 20).contains(s))
                    .ok_or_else(|| {
                        bad(
                            "romsize",
                            s.to_string(),
                            "a power of two from 2K to 16M, e.g. 256K",
                        )
                    })
            })
            .transpose()?;
        if romsize.is_some() && rom.is_none() {
            return Err(DeviceConfigError::Missing {
                device: D,
                key: "rom",
            });
        }
        Ok(NetConfig {
            backend,
            mac,
            addr: slot(D, self.addr)?,
            rom,
            romsize,
            rom_image: None,
        })
    }

    /// The entry that resolves to `c`.
    pub fn from_config(c: &NetConfig) -> Self {
        let (tap, fd) = match &c.backend {
            NetBackend::Tap(t) => (Some(t.clone()), None),
            NetBackend::Fd(fd) => (None, Some(*fd)),
        };
        Self {
            tap,
            fd,
            mac: c.mac.map(|m| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            addr: c.addr.map(u32::from),
            rom: c.rom.clone(),
            romsize: c.romsize.map(crate::spec::Size::from_bytes),
        }
    }
}

impl RngSpec {
    /// Parses `[addr=N]` (an empty string means defaults).
    pub fn from_cli(spec: &str) -> Result<Self, DeviceConfigError> {
        let mut cfg = Self::default();
        for (_, v) in pairs("rng", spec, RNG_KEYS)? {
            cfg.addr = Some(cli_slot("rng", v)?);
        }
        Ok(cfg)
    }

    /// Checks the entry and turns it into the VM configuration's rng.
    pub fn resolve(&self) -> Result<RngConfig, DeviceConfigError> {
        Ok(RngConfig {
            addr: slot("rng", self.addr)?,
        })
    }

    /// The entry that resolves to `c`.
    pub fn from_config(c: &RngConfig) -> Self {
        Self {
            addr: c.addr.map(u32::from),
        }
    }
}

/// Parses `--disk`.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, DeviceConfigError> {
    DiskSpec::from_cli(spec)?.resolve()
}

/// Parses `--net`.
pub fn parse_net(spec: &str) -> Result<NetConfig, DeviceConfigError> {
    NetSpec::from_cli(spec)?.resolve()
}

/// Parses `--rng`.
pub fn parse_rng(spec: &str) -> Result<RngConfig, DeviceConfigError> {
    RngSpec::from_cli(spec)?.resolve()
}

/// The slot policy: explicit `addr=` slots first, then every other device
/// takes the lowest free slot from 1 up, in list order. Slot 0 is the host
/// bridge. Returns one slot per request, in order.
pub fn assign_slots(requests: &[Option<u8>]) -> Result<Vec<u8>, DeviceConfigError> {
    let mut used = [false; 32];
    used[0] = true;
    for s in requests.iter().flatten() {
        let s = *s;
        if s == 0 || s >= 32 {
            return Err(DeviceConfigError::Slot {
                slot: s,
                why: "reserved for the host bridge or out of range",
            });
        }
        if used[usize::from(s)] {
            return Err(DeviceConfigError::Slot {
                slot: s,
                why: "requested by two devices",
            });
        }
        used[usize::from(s)] = true;
    }
    let mut out = Vec::new();
    for r in requests {
        let s = match r {
            Some(s) => *s,
            None => {
                let free = (1..32u8)
                    .find(|&i| !used[usize::from(i)])
                    .ok_or(DeviceConfigError::TooManyDevices)?;
                used[usize::from(free)] = true;
                free
            }
        };
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d = parse_disk("path=/x.img,readonly=on,serial=abc,addr=5").expect("disk");
        assert_eq!(d.path, PathBuf::from("/x.img"));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.addr, Some(5));
        assert!(matches!(
            parse_disk("readonly=on"),
            Err(DeviceConfigError::Missing { .. })
        ));
        assert!(matches!(
            parse_disk("path=/x,bogus=1"),
            Err(DeviceConfigError::UnknownKey { .. })
        ));
        assert!(parse_disk("path=/x,readonly=maybe").is_err());
        assert!(parse_disk("path=/x,addr=0").is_err());
        assert!(parse_disk("path=/x,addr=32").is_err());
        assert!(parse_disk("path=/x,serial=123456789012345678901").is_err());
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=52:54:00:12:34:56,rom=/r.rom,addr=0x3").expect("net");
        assert_eq!(n.backend, NetBackend::Tap("tap0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(n.addr, Some(3));
        assert_eq!(parse_net("fd=7").expect("fd").backend, NetBackend::Fd(7));
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
        assert!(
            parse_net("tap=t,mac=01:00:00:00:00:00").is_err(),
            "multicast"
        );
        assert!(parse_net("tap=t,mac=zz").is_err());
        assert!(parse_net("tap=waytoolonginterfacename").is_err());
        assert!(parse_net("fd=-1").is_err());
        let o = parse_net("tap=t,rom=/r,romsize=256K").expect("override");
        assert_eq!(o.romsize, Some(256 << 10));
        assert!(
            parse_net("tap=t,rom=/r,romsize=100K").is_err(),
            "not a power of two"
        );
        assert!(
            parse_net("tap=t,romsize=256K").is_err(),
            "romsize needs rom"
        );
    }

    #[test]
    fn command_line_keys_are_the_json_fields() {
        fn keys<T: serde::Serialize>(v: &T) -> String {
            let serde_json::Value::Object(m) = serde_json::to_value(v).expect("json") else {
                panic!("not an object");
            };
            let mut k: Vec<String> = m.keys().cloned().collect();
            k.sort();
            k.join(", ")
        }
        fn sorted(s: &str) -> String {
            let mut v: Vec<&str> = s.split(", ").collect();
            v.sort();
            v.join(", ")
        }
        let disk =
            DiskSpec::from_cli("path=/d,readonly=on,serial=s,direct=on,addr=3").expect("disk");
        assert_eq!(keys(&disk), sorted(DISK_KEYS));
        let net = NetSpec {
            fd: Some(3),
            ..NetSpec::from_cli("tap=t,mac=52:54:00:00:00:01,addr=4,rom=/r,romsize=256K")
                .expect("net")
        };
        assert_eq!(keys(&net), sorted(NET_KEYS));
        assert_eq!(
            keys(&RngSpec::from_cli("addr=5").expect("rng")),
            sorted(RNG_KEYS)
        );
    }

    #[test]
    fn json_and_command_line_resolve_alike() {
        let cli =
            parse_net("tap=tap0,mac=52:54:00:12:34:56,addr=0x3,rom=/r,romsize=256K").expect("cli");
        let json: NetSpec = serde_json::from_str(
            r#"{"tap":"tap0","mac":"52:54:00:12:34:56","addr":3,"rom":"/r","romsize":"256K"}"#,
        )
        .expect("json");
        assert_eq!(json.resolve().expect("resolve"), cli);
        assert_eq!(
            NetSpec::from_config(&cli).resolve().expect("round trip"),
            cli
        );
        let d = parse_disk("path=/x,serial=abc,addr=7").expect("disk");
        assert_eq!(DiskSpec::from_config(&d).resolve().expect("round trip"), d);
        assert!(serde_json::from_str::<DiskSpec>(r#"{"path":"/x","bogus":1}"#).is_err());
        let bad: DiskSpec = serde_json::from_str(r#"{"path":"/x","addr":0}"#).expect("parses");
        assert!(
            bad.resolve().is_err(),
            "slot 0 is refused as on the command line"
        );
        assert!(parse_net("tap=t,fd=3").is_err(), "tap and fd together");
    }

    #[test]
    fn slot_policy() {
        assert_eq!(assign_slots(&[None, None, None]), Ok(vec![1, 2, 3]));
        assert_eq!(assign_slots(&[None, Some(1), None]), Ok(vec![2, 1, 3]));
        assert_eq!(assign_slots(&[Some(7), None]), Ok(vec![7, 1]));
        assert!(assign_slots(&[Some(2), Some(2)]).is_err());
        assert!(assign_slots(&[Some(0)]).is_err());
        assert!(assign_slots(&[None; 32]).is_err());
        assert_eq!(assign_slots(&[None; 31]).expect("31 fit").len(), 31);
        assert_eq!(parse_rng("").expect("rng"), RngConfig::default());
        assert_eq!(parse_rng("addr=9").expect("rng").addr, Some(9));
    }
}
