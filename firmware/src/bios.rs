//! Firmware boot (`--firmware`): the checks on a firmware image, where it
//! goes, and what the fw_cfg device tells it.
//!
//! The image (SeaBIOS's `bios.bin` or `bios-256k.bin`) is mapped read-only
//! with its end at the top of the machine's firmware slot (4 GiB), where the
//! reset vector is; its last `low_alias_size` bytes are also copied into
//! writable RAM just below 1 MiB, the PC's shadow copy. Abide's host bridge
//! is neither an i440FX nor a Q35, so SeaBIOS cannot unlock shadow RAM
//! through PAM registers: it finds that area already writable.
//!
//! fw_cfg carries the CPU count, `etc/e820` (the same map a directly
//! booted guest gets), `bootorder`, `etc/sercon-port` and, with a kernel,
//! QEMU's kernel keys plus the `linuxboot_dma.bin` option ROM, which loads
//! the kernel through fw_cfg DMA and starts it as the Linux boot protocol
//! says. Key numbers and formats are QEMU's interface, which the firmware
//! hard-codes.

use abide_machines::MachineDescription;

use crate::e820;

/// fw_cfg key: number of vCPUs present (u16).
const FW_CFG_NB_CPUS: u16 = 0x05;
/// fw_cfg key: RAM size (u64).
const FW_CFG_RAM_SIZE: u16 = 0x03;
/// fw_cfg key: no graphics (u16).
const FW_CFG_NOGRAPHIC: u16 = 0x04;
/// fw_cfg key: show the boot menu (u16).
const FW_CFG_BOOT_MENU: u16 = 0x0e;
/// fw_cfg key: most vCPUs (u16).
const FW_CFG_MAX_CPUS: u16 = 0x0f;
const FW_CFG_KERNEL_ADDR: u16 = 0x07;
const FW_CFG_KERNEL_SIZE: u16 = 0x08;
const FW_CFG_INITRD_ADDR: u16 = 0x0a;
const FW_CFG_INITRD_SIZE: u16 = 0x0b;
const FW_CFG_KERNEL_DATA: u16 = 0x11;
const FW_CFG_INITRD_DATA: u16 = 0x12;
const FW_CFG_CMDLINE_ADDR: u16 = 0x13;
const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
const FW_CFG_CMDLINE_DATA: u16 = 0x15;
const FW_CFG_SETUP_ADDR: u16 = 0x16;
const FW_CFG_SETUP_SIZE: u16 = 0x17;
const FW_CFG_SETUP_DATA: u16 = 0x18;

/// Name of the option ROM file that boots a kernel given with `--kernel`.
pub const LINUXBOOT_FILE: &str = "genroms/linuxboot_dma.bin";

// Linux boot protocol (Documentation/arch/x86/boot.rst) offsets.
const HDR_SETUP_SECTS: usize = 0x1f1;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_HEAP_END_PTR: usize = 0x224;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_INITRD_ADDR_MAX: usize = 0x22c;
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;

/// What is wrong with a firmware image or a kernel for firmware boot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    /// The image does not fit the machine type's slot.
    #[error("firmware image {path} is {size} bytes, larger than machine type '{machine}''s {slot}-byte ({slot_kib} KiB) firmware slot; use an image that fits (Debian's bios.bin is 128 KiB, bios-256k.bin 256 KiB)", slot_kib = slot / 1024)]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The slot.
        slot: u64,
        /// Machine type.
        machine: String,
    },
    /// An empty file.
    #[error("firmware image {0} is empty")]
    Empty(String),
    /// Smaller than the shadow copy, or not a multiple of 64 KiB.
    #[error("firmware image {path} is {size} bytes: a PC firmware image is a multiple of {min} bytes (SeaBIOS's bios.bin is 131072)")]
    BadSize {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The smallest accepted.
        min: u64,
    },
    /// The ACPI tables cannot be built.
    #[error("cannot build the ACPI tables for the firmware: {0}")]
    Acpi(String),
    /// `--kernel` with `--firmware` needs a bzImage.
    #[error("with --firmware, --kernel must be a Linux bzImage (boot protocol 2.02 or later, loaded high): {0}")]
    NotBzImage(String),
    /// The initramfs does not fit below the kernel's limit.
    #[error("the initramfs ({size} bytes) does not fit below the kernel's initrd limit {max:#x} and the guest's RAM")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
}

/// Checks a firmware image against `machine`'s firmware slot.
pub fn check_image(
    machine: &MachineDescription,
    path: &str,
    image: &[u8],
) -> Result<(), FirmwareError> {
    let f = &machine.firmware;
    let size = image.len() as u64;
    if size == 0 {
        return Err(FirmwareError::Empty(path.into()));
    }
    if size > f.slot_size {
        return Err(FirmwareError::TooLarge {
            path: path.into(),
            size,
            slot: f.slot_size,
            machine: machine.name.clone(),
        });
    }
    if !size.is_multiple_of(64 * 1024) {
        return Err(FirmwareError::BadSize {
            path: path.into(),
            size,
            min: 64 * 1024,
        });
    }
    Ok(())
}

/// A kernel booted through the firmware.
#[derive(Debug)]
pub struct LinuxBoot<'a> {
    /// The bzImage.
    pub kernel: &'a [u8],
    /// The initramfs.
    pub initrd: Option<&'a [u8]>,
    /// The command line.
    pub cmdline: &'a str,
    /// `linuxboot_dma.bin`.
    pub option_rom: Vec<u8>,
}

/// What fw_cfg is built from.
#[derive(Debug)]
pub struct FwCfgInputs<'a> {
    /// vCPUs.
    pub cpus: u32,
    /// RAM in bytes.
    pub ram_bytes: u64,
    /// `bootorder` entries (OpenFirmware device paths), first first.
    pub bootorder: Vec<String>,
    /// A kernel to boot instead of a boot device.
    pub linux: Option<LinuxBoot<'a>>,
}

/// fw_cfg contents: numbered items and named files.
#[derive(Debug, Default)]
pub struct FwCfgContents {
    /// Items by key.
    pub items: Vec<(u16, Vec<u8>)>,
    /// Files, in directory order.
    pub files: Vec<(String, Vec<u8>)>,
}

/// The `etc/e820` file: the e820 map as 20-byte entries (address, length,
/// type).
pub fn e820_file(machine: &MachineDescription, ram_bytes: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for e in e820::build(machine, ram_bytes) {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    out
}

/// Builds what fw_cfg serves a firmware-booted guest of `machine`.
pub fn fw_cfg(
    machine: &MachineDescription,
    inputs: FwCfgInputs<'_>,
) -> Result<FwCfgContents, FirmwareError> {
    let f = &machine.firmware;
    let cpus = u16::try_from(inputs.cpus).unwrap_or(u16::MAX);
    let mut c = FwCfgContents::default();
    c.items.push((FW_CFG_NB_CPUS, cpus.to_le_bytes().to_vec()));
    c.items.push((FW_CFG_MAX_CPUS, cpus.to_le_bytes().to_vec()));
    c.items
        .push((FW_CFG_RAM_SIZE, inputs.ram_bytes.to_le_bytes().to_vec()));
    c.items
        .push((FW_CFG_NOGRAPHIC, 1u16.to_le_bytes().to_vec()));
    c.items.push((
        FW_CFG_BOOT_MENU,
        u16::from(f.show_boot_menu).to_le_bytes().to_vec(),
    ));
    c.files
        .push(("etc/e820".into(), e820_file(machine, inputs.ram_bytes)));
    // Abide's own ACPI tables, placed by the firmware (`acpi_loader`).
    let tables =
        crate::acpi::build(machine, inputs.cpus).map_err(|e| FirmwareError::Acpi(e.to_string()))?;
    let acpi = crate::acpi_loader::build(&tables, machine.acpi.table_align);
    c.files
        .push((crate::acpi_loader::RSDP_FILE.into(), acpi.rsdp));
    c.files
        .push((crate::acpi_loader::TABLES_FILE.into(), acpi.tables));
    c.files
        .push((crate::acpi_loader::LOADER_FILE.into(), acpi.loader));
    if f.sercon_port != 0 {
        c.files.push((
            "etc/sercon-port".into(),
            f.sercon_port.to_le_bytes().to_vec(),
        ));
    }
    let mut bootorder = inputs.bootorder;
    if let Some(linux) = inputs.linux {
        bootorder.insert(0, format!("/rom@{LINUXBOOT_FILE}"));
        linux_items(machine, inputs.ram_bytes, &linux, &mut c)?;
        c.files.push((LINUXBOOT_FILE.into(), linux.option_rom));
    }
    if !bootorder.is_empty() {
        let mut b = bootorder.join("\n").into_bytes();
        b.push(0);
        c.files.push(("bootorder".into(), b));
    }
    Ok(c)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Splits a bzImage into setup and kernel, fills in the header as a boot
/// loader does, and adds QEMU's kernel keys.
fn linux_items(
    machine: &MachineDescription,
    ram_bytes: u64,
    linux: &LinuxBoot<'_>,
    c: &mut FwCfgContents,
) -> Result<(), FirmwareError> {
    let k = linux.kernel;
    let bad = |why: &str| FirmwareError::NotBzImage(why.into());
    if k.len() < 0x250 || &k[HDR_MAGIC..HDR_MAGIC + 4] != b"HdrS" {
        return Err(bad("no 'HdrS' setup header"));
    }
    let version = u16_at(k, HDR_VERSION);
    if version < 0x202 || k[HDR_LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(bad("boot protocol older than 2.02, or not loaded high"));
    }
    let sects = match k[HDR_SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let setup_size = (sects + 1) * 512;
    if setup_size >= k.len() {
        return Err(bad("setup larger than the image"));
    }
    let l = &machine.firmware.linuxboot;
    let mut setup = k[..setup_size].to_vec();
    let payload = &k[setup_size..];
    // "Undefined" boot loader: the same value direct boot writes.
    setup[HDR_TYPE_OF_LOADER] = crate::boot::LOADER_TYPE_UNDEFINED;
    setup[HDR_LOADFLAGS] |= CAN_USE_HEAP;
    // The heap ends where the command line starts (relative to the setup
    // segment, as the protocol counts it).
    let heap_end = l.cmdline_addr - l.setup_addr - 0x200;
    setup[HDR_HEAP_END_PTR..HDR_HEAP_END_PTR + 2].copy_from_slice(&(heap_end as u16).to_le_bytes());
    put32(&mut setup, HDR_CMD_LINE_PTR, l.cmdline_addr as u32);
    if let Some(initrd) = linux.initrd {
        let kernel_max = if version >= 0x203 {
            u64::from(u32_at(k, HDR_INITRD_ADDR_MAX))
        } else {
            0x37ff_ffff
        };
        // Below the kernel's limit and the end of RAM below the hole
        // (leaving 128 KiB for the firmware's tables, as QEMU does).
        let ram_top = ram_bytes.min(machine.memory.pci_hole_start) - 128 * 1024;
        let max = kernel_max.min(ram_top - 1);
        let size = initrd.len() as u64;
        let floor = l.kernel_addr + payload.len() as u64;
        let addr = max
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= floor)
            .ok_or(FirmwareError::InitrdTooLarge { size, max })?;
        put32(&mut setup, HDR_RAMDISK_IMAGE, addr as u32);
        put32(&mut setup, HDR_RAMDISK_SIZE, size as u32);
        c.items
            .push((FW_CFG_INITRD_ADDR, (addr as u32).to_le_bytes().to_vec()));
        c.items
            .push((FW_CFG_INITRD_SIZE, (size as u32).to_le_bytes().to_vec()));
        c.items.push((FW_CFG_INITRD_DATA, initrd.to_vec()));
    }
    let mut cmdline = linux.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    let u32v = |v: u64| (v as u32).to_le_bytes().to_vec();
    c.items.push((FW_CFG_KERNEL_ADDR, u32v(l.kernel_addr)));
    c.items
        .push((FW_CFG_KERNEL_SIZE, u32v(payload.len() as u64)));
    c.items.push((FW_CFG_KERNEL_DATA, payload.to_vec()));
    c.items.push((FW_CFG_CMDLINE_ADDR, u32v(l.cmdline_addr)));
    c.items
        .push((FW_CFG_CMDLINE_SIZE, u32v(cmdline.len() as u64)));
    c.items.push((FW_CFG_CMDLINE_DATA, cmdline));
    c.items.push((FW_CFG_SETUP_ADDR, u32v(l.setup_addr)));
    c.items.push((FW_CFG_SETUP_SIZE, u32v(setup.len() as u64)));
    c.items.push((FW_CFG_SETUP_DATA, setup));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use abide_machines::{pc_1_0, KIB, MIB};

    #[test]
    fn image_sizes() {
        let m = pc_1_0();
        assert_eq!(check_image(&m, "b", &vec![0; 128 * 1024]), Ok(()));
        assert_eq!(check_image(&m, "b", &vec![0; 256 * 1024]), Ok(()));
        let e = check_image(&m, "big.bin", &vec![0; 512 * 1024]).expect_err("too big");
        let msg = e.to_string();
        assert!(msg.contains("pc-1.0") && msg.contains("256 KiB"), "{msg}");
        assert_eq!(
            check_image(&m, "e", &[]),
            Err(FirmwareError::Empty("e".into()))
        );
        assert!(matches!(
            check_image(&m, "s", &vec![0; 1000]),
            Err(FirmwareError::BadSize { .. })
        ));
        assert_eq!(m.firmware.image_addr(128 * KIB), 0xfffe_0000);
        assert_eq!(m.firmware.low_alias_addr(128 * KIB), 0xe_0000);
        assert_eq!(m.firmware.low_alias_addr(256 * KIB), 0xc_0000);
    }

    fn bzimage() -> Vec<u8> {
        let mut k = vec![0u8; 5 * 512 + 4096];
        k[HDR_SETUP_SECTS] = 4;
        k[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(b"HdrS");
        k[HDR_VERSION..HDR_VERSION + 2].copy_from_slice(&0x20fu16.to_le_bytes());
        k[HDR_LOADFLAGS] = LOADED_HIGH;
        put32(&mut k, HDR_INITRD_ADDR_MAX, 0x7fff_ffff);
        k
    }

    #[test]
    fn contents_and_kernel_keys() {
        let m = pc_1_0();
        let k = bzimage();
        let initrd = vec![7u8; 10_000];
        let c = fw_cfg(
            &m,
            FwCfgInputs {
                cpus: 2,
                ram_bytes: 512 * MIB,
                bootorder: vec![],
                linux: Some(LinuxBoot {
                    kernel: &k,
                    initrd: Some(&initrd),
                    cmdline: "console=ttyS0",
                    option_rom: vec![0x55, 0xaa],
                }),
            },
        )
        .expect("builds");
        let item = |key| &c.items.iter().find(|(k, _)| *k == key).expect("item").1;
        assert_eq!(item(FW_CFG_NB_CPUS), &[2, 0]);
        assert_eq!(item(FW_CFG_KERNEL_SIZE), &4096u32.to_le_bytes());
        assert_eq!(item(FW_CFG_CMDLINE_DATA), b"console=ttyS0\0");
        let setup = item(FW_CFG_SETUP_DATA);
        assert_eq!(setup.len(), 5 * 512);
        assert_eq!(u32_at(setup, HDR_CMD_LINE_PTR), 0x2_0000);
        let rd = u32_at(setup, HDR_RAMDISK_IMAGE);
        assert_eq!(rd % 4096, 0);
        assert!(u64::from(rd) + 10_000 < 512 * MIB - 128 * 1024);
        let names: Vec<&str> = c.files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/e820",
                "etc/acpi/rsdp",
                "etc/acpi/tables",
                "etc/table-loader",
                "etc/sercon-port",
                LINUXBOOT_FILE,
                "bootorder"
            ]
        );
        let bootorder = &c.files[6].1;
        assert_eq!(bootorder, b"/rom@genroms/linuxboot_dma.bin\0");
        // e820: 20 bytes an entry, the first is low RAM.
        let e820 = &c.files[0].1;
        assert_eq!(e820.len() % 20, 0);
        assert_eq!(
            u64::from_le_bytes(e820[8..16].try_into().expect("8")),
            0x9_fc00
        );
    }

    #[test]
    fn bad_kernels() {
        let m = pc_1_0();
        let inputs = |k: &'static [u8]| FwCfgInputs {
            cpus: 1,
            ram_bytes: 512 * MIB,
            bootorder: vec![],
            linux: Some(LinuxBoot {
                kernel: k,
                initrd: None,
                cmdline: "",
                option_rom: vec![],
            }),
        };
        assert!(matches!(
            fw_cfg(&m, inputs(&[0u8; 100])),
            Err(FirmwareError::NotBzImage(_))
        ));
        let k = bzimage();
        let huge = vec![0u8; 600 * 1024 * 1024];
        let r = fw_cfg(
            &m,
            FwCfgInputs {
                cpus: 1,
                ram_bytes: 512 * MIB,
                bootorder: vec![],
                linux: Some(LinuxBoot {
                    kernel: &k,
                    initrd: Some(&huge),
                    cmdline: "",
                    option_rom: vec![],
                }),
            },
        );
        assert!(matches!(r, Err(FirmwareError::InitrdTooLarge { .. })));
    }
}
