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

fn slot(device: &'static str, v: &str) -> Result<u8, DeviceConfigError> {
    let bad = || DeviceConfigError::BadValue {
        device,
        key: "addr",
        value: v.to_string(),
        hint: "a slot number 1-31 (decimal or 0x hex)",
    };
    let n = match v.strip_prefix("0x") {
        Some(h) => u8::from_str_radix(h, 16),
        None => v.parse(),
    }
    .map_err(|_| bad())?;
    if (1..32).contains(&n) {
        Ok(n)
    } else {
        Err(bad())
    }
}

/// Parses `path=FILE[,readonly=on][,serial=S][,direct=on][,addr=N]`.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, DeviceConfigError> {
    const D: &str = "disk";
    let mut path = None;
    let mut cfg = DiskConfig {
        path: PathBuf::new(),
        readonly: false,
        serial: None,
        direct: false,
        addr: None,
    };
    for (k, v) in pairs(D, spec, "path, readonly, serial, direct, addr")? {
        match k {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "readonly" => cfg.readonly = on_off(D, "readonly", v)?,
            "direct" => cfg.direct = on_off(D, "direct", v)?,
            "serial" if v.len() <= 20 && v.is_ascii() => cfg.serial = Some(v.to_string()),
            "serial" => {
                return Err(DeviceConfigError::BadValue {
                    device: D,
                    key: "serial",
                    value: v.to_string(),
                    hint: "at most 20 ASCII characters",
                })
            }
            "addr" => cfg.addr = Some(slot(D, v)?),
            _ => {
                return Err(DeviceConfigError::Missing {
                    device: D,
                    key: "path",
                })
            }
        }
    }
    cfg.path = path.ok_or(DeviceConfigError::Missing {
        device: D,
        key: "path",
    })?;
    Ok(cfg)
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

/// Parses `tap=NAME|fd=N[,mac=52:54:..][,addr=N][,rom=PATH][,romsize=SIZE]`.
pub fn parse_net(spec: &str) -> Result<NetConfig, DeviceConfigError> {
    const D: &str = "net";
    let mut backend = None;
    let mut cfg = NetConfig {
        backend: NetBackend::Fd(-1),
        mac: None,
        addr: None,
        rom: None,
        romsize: None,
        rom_image: None,
    };
    for (k, v) in pairs(D, spec, "tap, fd, mac, addr, rom, romsize")? {
        match k {
            "tap" if !v.is_empty() && v.len() < 16 => backend = Some(NetBackend::Tap(v.into())),
            "tap" => {
                return Err(DeviceConfigError::BadValue {
                    device: D,
                    key: "tap",
                    value: v.into(),
                    hint: "an interface name of 1 to 15 characters",
                })
            }
            "fd" => {
                let fd = v.parse::<i32>().ok().filter(|f| *f >= 0).ok_or_else(|| {
                    DeviceConfigError::BadValue {
                        device: D,
                        key: "fd",
                        value: v.into(),
                        hint: "an open file descriptor number",
                    }
                })?;
                backend = Some(NetBackend::Fd(fd));
            }
            "mac" => {
                cfg.mac = Some(parse_mac(v).ok_or_else(|| DeviceConfigError::BadValue {
                    device: D,
                    key: "mac",
                    value: v.into(),
                    hint: "six hex bytes like 52:54:00:12:34:56, not multicast",
                })?)
            }
            "addr" => cfg.addr = Some(slot(D, v)?),
            "rom" if !v.is_empty() => cfg.rom = Some(PathBuf::from(v)),
            "romsize" => {
                let size = crate::config::parse_size(v)
                    .ok()
                    .filter(|s| s.is_power_of_two() && (2048..=16 << 20).contains(s))
                    .ok_or_else(|| DeviceConfigError::BadValue {
                        device: D,
                        key: "romsize",
                        value: v.into(),
                        hint: "a power of two from 2K to 16M, e.g. 256K",
                    })?;
                cfg.romsize = Some(size);
            }
            _ => {
                return Err(DeviceConfigError::BadValue {
                    device: D,
                    key: "rom",
                    value: v.into(),
                    hint: "a file path",
                })
            }
        }
    }
    cfg.backend = backend.ok_or(DeviceConfigError::Missing {
        device: D,
        key: "tap",
    })?;
    if cfg.romsize.is_some() && cfg.rom.is_none() {
        return Err(DeviceConfigError::Missing {
            device: D,
            key: "rom",
        });
    }
    Ok(cfg)
}

/// Parses `[addr=N]` (an empty string means defaults).
pub fn parse_rng(spec: &str) -> Result<RngConfig, DeviceConfigError> {
    let mut cfg = RngConfig::default();
    for (k, v) in pairs("rng", spec, "addr")? {
        if k == "addr" {
            cfg.addr = Some(slot("rng", v)?);
        }
    }
    Ok(cfg)
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
