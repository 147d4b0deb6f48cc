//! Opens everything the user's device options point at, before any KVM
//! work, so bad paths and oversized ROMs fail early with a clear error.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;

use abide_machines::{MachineDescription, VirtioModel};

use crate::config::VmConfig;
use crate::devices_config::{assign_slots, DiskConfig, NetConfig};
use crate::Error;

/// A disk ready to be given to its device model.
#[derive(Debug)]
pub struct OpenDisk {
    /// Options.
    pub config: DiskConfig,
    /// Open image.
    pub file: File,
    /// PCI slot.
    pub slot: u8,
}

/// A network card's resolved options.
#[derive(Debug)]
pub struct OpenNet {
    /// Options.
    pub config: NetConfig,
    /// Option ROM: slot size and image.
    pub rom: Option<(u64, Vec<u8>)>,
    /// Whether the slot size comes from `romsize=` rather than the machine.
    pub rom_slot_overridden: bool,
    /// MAC address.
    pub mac: [u8; 6],
    /// PCI slot.
    pub slot: u8,
}

/// Everything the devices need, opened and checked.
#[derive(Debug)]
pub struct Backends {
    /// Disks.
    pub disks: Vec<OpenDisk>,
    /// Network cards.
    pub nets: Vec<OpenNet>,
    /// Slot of the rng, if any.
    pub rng_slot: Option<u8>,
}

/// Reads `path` as an option ROM for `model`, refusing one larger than the
/// slot: the machine's, or `romsize` when given. Returns (slot size, image):
/// `saved` when given (the image the guest already has, which must fit the
/// slot too; the file then only has to fit), else the file's bytes.
pub fn load_rom(
    machine: &MachineDescription,
    model: &VirtioModel,
    model_name: &'static str,
    device: &str,
    path: &std::path::Path,
    romsize: Option<u64>,
    saved: Option<&[u8]>,
) -> Result<(u64, Vec<u8>), Error> {
    let Some(slot) = romsize.or(model.rom_slot) else {
        return Err(Error::NoRomSlot {
            device: device.to_string(),
            model: model_name,
            machine: machine.name.clone(),
        });
    };
    let image = std::fs::read(path).map_err(|source| Error::OpenFile {
        what: "option ROM",
        path: path.to_path_buf(),
        source,
    })?;
    if image.len() as u64 > slot {
        return Err(Error::RomTooLarge {
            device: device.to_string(),
            model: model_name,
            path: path.to_path_buf(),
            rom: image.len() as u64,
            slot,
            machine: machine.name.clone(),
        });
    }
    match saved {
        Some(saved) if saved.len() as u64 > slot => Err(Error::RomTooLarge {
            device: device.to_string(),
            model: model_name,
            path: std::path::PathBuf::from("(the saved image)"),
            rom: saved.len() as u64,
            slot,
            machine: machine.name.clone(),
        }),
        Some(saved) => Ok((slot, saved.to_vec())),
        None => Ok((slot, image)),
    }
}

/// Why backends are opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// To run a VM: disks as configured.
    Run,
    /// To describe a VM (`abide manifest`): disks read-only, no O_DIRECT.
    Describe,
}

/// Resolves slots, opens disk images and reads ROMs, to run a VM.
pub fn open(machine: &MachineDescription, cfg: &VmConfig) -> Result<Backends, Error> {
    open_for(machine, cfg, Purpose::Run)
}

/// Resolves slots, opens disk images and reads ROMs.
pub fn open_for(
    machine: &MachineDescription,
    cfg: &VmConfig,
    purpose: Purpose,
) -> Result<Backends, Error> {
    // The machine's default rng, unless the user configured one.
    let rng = cfg
        .rng
        .clone()
        .or_else(|| machine.default_devices.rng.then(Default::default));
    let mut requests: Vec<Option<u8>> = cfg.disks.iter().map(|d| d.addr).collect();
    requests.extend(cfg.nets.iter().map(|n| n.addr));
    if let Some(r) = &rng {
        requests.push(r.addr);
    }
    let slots = assign_slots(&requests)?;
    let mut slot_iter = slots.into_iter();
    let mut next_slot = || slot_iter.next().unwrap_or(0);

    let mut disks = Vec::new();
    for d in &cfg.disks {
        let mut opts = OpenOptions::new();
        opts.read(true)
            .write(!d.readonly && purpose == Purpose::Run);
        if d.direct && purpose == Purpose::Run {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&d.path).map_err(|source| Error::OpenFile {
            what: "disk image",
            path: d.path.clone(),
            source,
        })?;
        disks.push(OpenDisk {
            config: d.clone(),
            file,
            slot: next_slot(),
        });
    }
    let mut nets = Vec::new();
    for (i, n) in cfg.nets.iter().enumerate() {
        let label = format!("--net #{i}");
        let rom = match &n.rom {
            Some(p) => Some(load_rom(
                machine,
                &machine.virtio.net,
                "virtio-net",
                &label,
                p,
                n.romsize,
                n.rom_image.as_deref().map(Vec::as_slice),
            )?),
            None => None,
        };
        nets.push(OpenNet {
            config: n.clone(),
            rom,
            rom_slot_overridden: n.romsize.is_some(),
            mac: n
                .mac
                .unwrap_or_else(|| machine.virtio.net_config.default_mac(i)),
            slot: next_slot(),
        });
    }
    let rng_slot = rng.as_ref().map(|_| next_slot());
    Ok(Backends {
        disks,
        nets,
        rng_slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rom_slot_is_enforced() {
        let m = abide_machines::pc_1_0();
        let dir = std::env::temp_dir().join(format!("abide-rom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let small = dir.join("small.rom");
        let big = dir.join("big.rom");
        std::fs::write(&small, vec![0x55; 75_776]).expect("write");
        std::fs::write(&big, vec![0x55; 249_344]).expect("write");
        let (slot, ok) = load_rom(
            &m,
            &m.virtio.net,
            "virtio-net",
            "--net #0",
            &small,
            None,
            None,
        )
        .expect("fits");
        assert_eq!((slot, ok.len()), (128 << 10, 75_776));
        let err = load_rom(
            &m,
            &m.virtio.net,
            "virtio-net",
            "--net #0",
            &big,
            None,
            None,
        )
        .expect_err("too large")
        .to_string();
        assert!(err.contains("249344 bytes"), "{err}");
        assert!(err.contains("131072-byte ROM slot"), "{err}");
        assert!(err.contains("virtio-net"), "{err}");
        assert!(err.contains("'pc-1.0'"), "{err}");
        assert!(load_rom(
            &m,
            &m.virtio.blk,
            "virtio-blk",
            "--disk #0",
            &small,
            None,
            None
        )
        .is_err());
        // An explicit romsize= override makes room on pc-1.0.
        let (slot, _) = load_rom(
            &m,
            &m.virtio.net,
            "virtio-net",
            "#0",
            &big,
            Some(256 << 10),
            None,
        )
        .expect("override fits");
        assert_eq!(slot, 256 << 10);
        // The same ROM fits pc-2.0's larger slot.
        let m2 = abide_machines::pc_2_0();
        assert!(load_rom(
            &m2,
            &m2.virtio.net,
            "virtio-net",
            "--net #0",
            &big,
            None,
            None
        )
        .is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
