//! Firmware boot (`--firmware`): maps the image, fills the shadow copy,
//! and puts fw_cfg and the debug port on the port bus.
//!
//! The image is guest-visible code whose size is pinned by the machine
//! type's firmware slot, like an option ROM's: the guest keeps the bytes it
//! booted with (`FirmwareConfig::bytes`), and snapshots and migrations
//! carry them in the `rom.firmware` section next to the `rom.00:SS.0`
//! sections of option ROMs (`snapshot::state`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use abide_devices::legacy::fw_cfg::{DebugPort, FwCfg, FwCfgDma, FwCfgIo};
use abide_devices::{Bus, GuestMem};
use abide_firmware::bios::{self, FirmwareError, FwCfgInputs, LinuxBoot};
use abide_machines::MachineDescription;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::config::{FirmwareConfig, KernelSource, VmConfig};

/// KVM memory slot of the firmware image (RAM uses the first few).
const FIRMWARE_MEM_SLOT: u32 = 32;

/// Where `linuxboot_dma.bin` is looked for when `--firmware` comes with
/// `--kernel` (Debian's `qemu-system-data`); `ABIDE_LINUXBOOT_ROM` overrides.
pub const LINUXBOOT_ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";

/// Errors booting through firmware.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareBootError {
    /// A file that cannot be read.
    #[error("cannot read the {what} '{}'", path.display())]
    Read {
        /// What the file is for.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A path that is not a regular file.
    #[error("the {what} '{}' is not a regular file", path.display())]
    NotAFile {
        /// What the file is for.
        what: &'static str,
        /// Path.
        path: PathBuf,
    },
    /// The image or kernel does not suit.
    #[error(transparent)]
    Image(#[from] FirmwareError),
    /// fw_cfg refused an item.
    #[error(transparent)]
    FwCfg(#[from] abide_devices::legacy::fw_cfg::FwCfgError),
    /// The debug log cannot be opened.
    #[error("cannot open the firmware log '{}'", path.display())]
    Log {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Port bus conflict.
    #[error("cannot place {0} on the port bus")]
    Bus(&'static str, #[source] abide_devices::BusError),
    /// Host memory for the image.
    #[error("cannot map the firmware image: {0}")]
    Map(String),
    /// KVM refused the image's memory slot.
    #[error("KVM refused the firmware image's read-only memory slot")]
    Slot(#[source] kvm_ioctls::Error),
    /// Writing the shadow copy.
    #[error("cannot write the firmware's shadow copy into guest memory")]
    Shadow(#[source] vm_memory::GuestMemoryError),
}

/// Reads a whole regular file (at most `limit` bytes, one more to tell
/// that it is larger), refusing directories, devices and FIFOs.
fn read_file(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, FirmwareBootError> {
    let err = |source| FirmwareBootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(FirmwareBootError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    let mut out = Vec::new();
    File::open(path)
        .map_err(err)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(err)?;
    Ok(out)
}

/// The image the guest gets: the saved bytes if it has them, else the
/// file's, checked against the machine type's slot.
pub fn image(
    machine: &MachineDescription,
    f: &FirmwareConfig,
) -> Result<Arc<Vec<u8>>, FirmwareBootError> {
    let bytes = match &f.bytes {
        Some(b) => b.clone(),
        None => {
            // A file larger than the slot is refused by its size, unread.
            if let Ok(m) = std::fs::metadata(&f.image) {
                let slot = machine.firmware.slot_size;
                if m.is_file() && m.len() > slot {
                    return Err(FirmwareError::TooLarge {
                        path: f.image.display().to_string(),
                        size: m.len(),
                        slot,
                        machine: machine.name.clone(),
                    }
                    .into());
                }
            }
            Arc::new(read_file(
                "firmware image",
                &f.image,
                machine.firmware.slot_size,
            )?)
        }
    };
    bios::check_image(machine, &f.image.display().to_string(), &bytes)?;
    Ok(bytes)
}

/// The fw_cfg contents of `cfg`. With `with_kernel` (boot), a `--kernel`
/// is read and given through the kernel keys; a restored guest booted
/// long ago and gets the rest only.
pub fn contents(
    machine: &MachineDescription,
    cfg: &VmConfig,
    with_kernel: bool,
) -> Result<bios::FwCfgContents, FirmwareBootError> {
    const BIG: u64 = 1 << 32;
    let mut kernel = None;
    if let (true, KernelSource::Path(k)) = (with_kernel, &cfg.kernel) {
        let image = read_file("kernel", k, BIG)?;
        let initrd = cfg
            .initrd
            .as_ref()
            .map(|p| read_file("initramfs", p, BIG))
            .transpose()?;
        let rom_path = std::env::var_os("ABIDE_LINUXBOOT_ROM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(LINUXBOOT_ROM));
        let rom = read_file(
            "linuxboot_dma.bin option ROM (Debian package qemu-system-data)",
            &rom_path,
            BIG,
        )?;
        kernel = Some((image, initrd, rom));
    }
    let linux = kernel.as_ref().map(|(k, i, rom)| LinuxBoot {
        kernel: k,
        initrd: i.as_deref(),
        cmdline: &cfg.cmdline,
        option_rom: rom.clone(),
    });
    Ok(bios::fw_cfg(
        machine,
        FwCfgInputs {
            cpus: cfg.cpus,
            ram_bytes: cfg.memory,
            bootorder: Vec::new(),
            linux,
        },
    )?)
}

/// The image's host memory, mapped read-only into the guest below 4 GiB.
#[derive(Debug)]
pub struct FirmwareRegion {
    host: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; KVM reads it,
// nothing in Abide writes it after `map` fills it.
unsafe impl Send for FirmwareRegion {}
// SAFETY: as above; shared references never write.
unsafe impl Sync for FirmwareRegion {}

impl Drop for FirmwareRegion {
    fn drop(&mut self) {
        // SAFETY: `host`/`len` are exactly the mapping `map` created, and
        // the VM that used it is gone or going (this value lives in `Vm`).
        unsafe { libc::munmap(self.host, self.len) };
    }
}

/// Maps `image` read-only at the top of `machine`'s firmware slot and
/// copies its last `low_alias_size` bytes into RAM below 1 MiB.
pub fn map(
    vm: &VmFd,
    mem: &GuestMem,
    machine: &MachineDescription,
    image: &[u8],
    shadow: bool,
) -> Result<FirmwareRegion, FirmwareBootError> {
    let f = &machine.firmware;
    let len = image.len();
    // SAFETY: a fresh anonymous private mapping; no existing memory is
    // affected.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(FirmwareBootError::Map(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    let region = FirmwareRegion { host, len };
    // SAFETY: `host` is a fresh writable mapping of `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), host.cast::<u8>(), len) };
    let slot = kvm_userspace_memory_region {
        slot: FIRMWARE_MEM_SLOT,
        flags: KVM_MEM_READONLY,
        guest_phys_addr: f.image_addr(len as u64),
        memory_size: len as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping lives as long as `region`, which the VM keeps;
    // the guest range is inside the 32-bit hole, apart from RAM.
    unsafe { vm.set_user_memory_region(slot) }.map_err(FirmwareBootError::Slot)?;
    if shadow {
        let alias = &image[len - f.low_alias_len(len as u64) as usize..];
        mem.write_slice(alias, GuestAddress(f.low_alias_addr(len as u64)))
            .map_err(FirmwareBootError::Shadow)?;
    }
    Ok(region)
}

/// Removes the image's memory slot from the guest (before mapping
/// another image).
pub fn unmap(vm: &VmFd) -> Result<(), FirmwareBootError> {
    let slot = kvm_userspace_memory_region {
        slot: FIRMWARE_MEM_SLOT,
        ..Default::default()
    };
    // SAFETY: a zero-sized region deletes the slot; no memory is mapped.
    unsafe { vm.set_user_memory_region(slot) }.map_err(FirmwareBootError::Slot)
}

/// Puts fw_cfg (with `contents`, DMA into `mem`) and the debug port on
/// `pio`; returns the fw_cfg device, whose registers snapshots carry.
pub fn attach(
    pio: &Bus,
    machine: &MachineDescription,
    f: &FirmwareConfig,
    contents: bios::FwCfgContents,
    mem: &GuestMem,
) -> Result<Arc<Mutex<FwCfg>>, FirmwareBootError> {
    let l = &machine.firmware;
    let dev = Arc::new(Mutex::new(FwCfg::new(
        contents.items,
        contents.files,
        Some(mem.clone()),
    )?));
    pio.insert(
        Arc::new(Mutex::new(FwCfgIo(dev.clone()))),
        u64::from(l.fw_cfg.selector),
        2,
    )
    .map_err(|e| FirmwareBootError::Bus("fw_cfg", e))?;
    pio.insert(
        Arc::new(Mutex::new(FwCfgDma(dev.clone()))),
        u64::from(l.fw_cfg.dma),
        8,
    )
    .map_err(|e| FirmwareBootError::Bus("fw_cfg DMA", e))?;
    let out: Box<dyn std::io::Write + Send> = match &f.log {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| FirmwareBootError::Log {
                    path: p.clone(),
                    source,
                })?,
        ),
        None => Box::new(std::io::sink()),
    };
    pio.insert(
        Arc::new(Mutex::new(DebugPort::new(out))),
        u64::from(l.debug_port),
        1,
    )
    .map_err(|e| FirmwareBootError::Bus("the firmware debug port", e))?;
    Ok(dev)
}
