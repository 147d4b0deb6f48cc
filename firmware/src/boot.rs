//! Direct kernel boot: loads a Linux bzImage or a PVH ELF, an optional
//! initramfs and a command line, and writes the boot structures (zero page or
//! PVH start info, e820, boot GDT) the kernel reads.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use abide_machines::MachineDescription;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError,
};

use crate::e820;

const PAGE: u64 = 4096;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
pub(crate) const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Flat 32-bit boot GDT: null, unused, code (selector 0x10), data (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    0,
    0x00cf_9b00_0000_ffff, // code: base 0, limit 4G, exec/read, accessed, D=1, G=1
    0x00cf_9300_0000_ffff, // data: base 0, limit 4G, read/write, accessed, B=1, G=1
];
/// Code segment selector in [`BOOT_GDT`].
pub const BOOT_CS: u16 = 0x10;
/// Data segment selector in [`BOOT_GDT`].
pub const BOOT_DS: u16 = 0x18;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading the kernel file failed.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// Reading the initramfs failed.
    #[error("cannot read the initramfs")]
    ReadInitrd(#[source] std::io::Error),
    /// The file is neither kind of kernel we boot.
    #[error("the kernel is neither a Linux bzImage nor an ELF vmlinux with a PVH note; pass a bzImage (arch/x86/boot/bzImage) or a vmlinux built with CONFIG_PVH=y")]
    UnknownFormat,
    /// An ELF kernel without the PVH entry note.
    #[error("the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); rebuild it with CONFIG_PVH=y or pass the bzImage instead")]
    NoPvhNote,
    /// linux-loader refused the bzImage.
    #[error("the bzImage is invalid or does not fit in guest memory ({0}); check the file, or give the guest more memory (--memory)")]
    BzImage(linux_loader::loader::Error),
    /// linux-loader refused the ELF.
    #[error("the ELF file is not a bootable x86-64 PVH kernel or does not fit in guest memory ({0}); pass a vmlinux built with CONFIG_PVH=y, or a bzImage")]
    Elf(linux_loader::loader::Error),
    /// The command line is too long.
    #[error("the kernel command line is {len} bytes; this machine accepts at most {max}")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Longest accepted.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Guest memory cannot hold the initramfs.
    #[error("the initramfs ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give the guest more memory (--memory)")]
    InitrdTooLarge {
        /// initramfs size.
        size: u64,
        /// Highest address it may reach.
        limit: u64,
    },
    /// Too many e820 entries.
    #[error("the e820 map has {0} entries, more than the boot protocol carries")]
    TooManyE820(usize),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {what} into guest memory")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The boot protocol the kernel is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 32-bit boot protocol: ESI holds the zero-page address.
    Linux {
        /// Zero page address.
        zero_page: u64,
    },
    /// PVH: EBX holds the `hvm_start_info` address.
    Pvh {
        /// Start info address.
        start_info: u64,
    },
}

/// Where to start the boot vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// 32-bit protected-mode entry point.
    pub entry: u64,
    /// Boot protocol and its pointer register.
    pub protocol: BootProtocol,
    /// GDT address (contents are [`BOOT_GDT`]).
    pub gdt_addr: u64,
}

/// What to boot.
#[derive(Debug)]
pub struct BootSource<'a> {
    /// Kernel image: bzImage or PVH ELF.
    pub kernel: &'a mut File,
    /// Optional initramfs.
    pub initrd: Option<&'a mut File>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// ACPI RSDP address to pass to the kernel (0 for none).
    pub rsdp_addr: u64,
}

/// Kinds of kernel image we can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Linux bzImage.
    BzImage,
    /// ELF (must carry a PVH note).
    Elf,
}

/// Looks at the first bytes of `kernel` to decide what it is.
pub fn detect_format(kernel: &mut File) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 4];
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    if kernel.read_exact(&mut head).is_err() {
        return Err(BootError::UnknownFormat);
    }
    if head == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut magic = [0u8; 4];
    kernel
        .seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(BootError::ReadKernel)?;
    if kernel.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat)
}

fn write<T: vm_memory::ByteValued, M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    val: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, source })
}

/// Loads the kernel, initramfs and command line into `mem` and writes the
/// boot structures. `ram_bytes` is the guest RAM size (for e820).
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    machine: &MachineDescription,
    ram_bytes: u64,
    src: BootSource<'_>,
) -> Result<BootEntry, BootError> {
    let boot = &machine.boot;
    if src.cmdline.len() > machine.max_cmdline_len {
        return Err(BootError::CmdlineTooLong {
            len: src.cmdline.len(),
            max: machine.max_cmdline_len,
        });
    }
    if src.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let format = detect_format(src.kernel)?;
    let himem = Some(GuestAddress(machine.memory.high_ram_start));
    let loaded: KernelLoaderResult = match format {
        KernelFormat::BzImage => {
            BzImage::load(mem, Some(GuestAddress(boot.kernel_addr)), src.kernel, himem)
                .map_err(BootError::BzImage)?
        }
        KernelFormat::Elf => Elf::load(mem, None, src.kernel, himem).map_err(BootError::Elf)?,
    };

    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(mem, "boot GDT", *entry, boot.gdt_addr + 8 * i as u64)?;
    }
    let mut cmdline = src.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(boot.cmdline_addr))
        .map_err(|source| BootError::GuestWrite {
            what: "command line",
            source,
        })?;

    let e820 = e820::build(machine, ram_bytes);
    // RAM below the 32-bit hole: the initramfs must stay under it.
    let low_ram_top = ram_bytes.min(machine.memory.pci_hole_start);
    let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;

    match format {
        KernelFormat::BzImage => {
            let mut hdr = loaded.setup_header.ok_or(BootError::UnknownFormat)?;
            let initrd_max = match hdr.initrd_addr_max {
                0 => DEFAULT_INITRD_ADDR_MAX,
                v => u64::from(v),
            };
            let mut params = boot_params::default();
            if let Some(initrd) = src.initrd {
                let limit = low_ram_top.min(initrd_max + 1);
                let (addr, size) = load_initrd(mem, initrd, kernel_end, limit)?;
                // The bzImage protocol caps these at 32 bits; `limit` keeps them below 4 GiB.
                hdr.ramdisk_image = addr as u32;
                hdr.ramdisk_size = size as u32;
            }
            hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
            hdr.cmd_line_ptr = boot.cmdline_addr as u32;
            hdr.cmdline_size = src.cmdline.len() as u32;
            params.hdr = hdr;
            params.acpi_rsdp_addr = src.rsdp_addr;
            if e820.len() > params.e820_table.len() {
                return Err(BootError::TooManyE820(e820.len()));
            }
            for (slot, entry) in params.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry {
                    addr: entry.addr,
                    size: entry.size,
                    r#type: entry.kind as u32,
                };
            }
            params.e820_entries = e820.len() as u8;
            write(mem, "zero page", params, boot.zero_page_addr)?;
            Ok(BootEntry {
                entry: loaded.kernel_load.raw_value(),
                protocol: BootProtocol::Linux {
                    zero_page: boot.zero_page_addr,
                },
                gdt_addr: boot.gdt_addr,
            })
        }
        KernelFormat::Elf => {
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
                _ => return Err(BootError::NoPvhNote),
            };
            let start = boot.pvh_start_info_addr;
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: boot.cmdline_addr,
                rsdp_paddr: src.rsdp_addr,
                ..Default::default()
            };
            let mut next = start + std::mem::size_of::<hvm_start_info>() as u64;
            if let Some(initrd) = src.initrd {
                let (addr, size) = load_initrd(mem, initrd, kernel_end, low_ram_top)?;
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                write(mem, "PVH module list", module, next)?;
                info.nr_modules = 1;
                info.modlist_paddr = next;
                next += std::mem::size_of::<hvm_modlist_entry>() as u64;
            }
            info.memmap_paddr = next;
            info.memmap_entries = e820.len() as u32;
            for (i, entry) in e820.iter().enumerate() {
                let e = hvm_memmap_table_entry {
                    addr: entry.addr,
                    size: entry.size,
                    type_: entry.kind as u32,
                    reserved: 0,
                };
                let at = next + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
                write(mem, "PVH memory map", e, at)?;
            }
            write(mem, "PVH start info", info, start)?;
            Ok(BootEntry {
                entry,
                protocol: BootProtocol::Pvh { start_info: start },
                gdt_addr: boot.gdt_addr,
            })
        }
    }
}

/// Places the initramfs at the highest page-aligned address below `limit`
/// that stays above `floor`. Returns (address, size).
fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &mut File,
    floor: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadInitrd)?;
    initrd
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitrd)?;
    let too_large = BootError::InitrdTooLarge { size, limit };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !(PAGE - 1);
    if addr < floor {
        return Err(BootError::InitrdTooLarge { size, limit });
    }
    // Straight from the file into guest memory: a buffer the size of the
    // initramfs would stay in the VMM's peak RSS for as long as it runs.
    let count = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit })?;
    let guest_write = |source| BootError::GuestWrite {
        what: "initramfs",
        source,
    };
    for slice in mem.get_slices(GuestAddress(addr), count) {
        let mut slice = slice.map_err(guest_write)?;
        initrd
            .read_exact_volatile(&mut slice)
            .map_err(|e| match e {
                VolatileMemoryError::IOError(e) => BootError::ReadInitrd(e),
                e => guest_write(e.into()),
            })?;
    }
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(bytes).expect("write temp file");
        f
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "abide-boot-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create temp file");
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn rejects_garbage() {
        let mut f = temp_file(&[0u8; 4096]);
        assert!(matches!(
            detect_format(&mut f),
            Err(BootError::UnknownFormat)
        ));
        let mut empty = temp_file(&[]);
        assert!(matches!(
            detect_format(&mut empty),
            Err(BootError::UnknownFormat)
        ));
    }

    #[test]
    fn detects_bzimage_magic() {
        let mut img = vec![0u8; 4096];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let mut f = temp_file(&img);
        assert_eq!(
            detect_format(&mut f).expect("format"),
            KernelFormat::BzImage
        );
    }

    #[test]
    fn initrd_lands_whole_below_the_limit_across_regions() {
        type Mem = vm_memory::GuestMemoryMmap;
        // Two regions that meet at 64 KiB; the initramfs straddles them.
        let mem = Mem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .expect("guest memory");
        assert_eq!(mem.num_regions(), 2);
        let bytes: Vec<u8> = (0..5 * 4096 + 100).map(|i| (i * 7 + 3) as u8).collect();
        let mut f = temp_file(&bytes);
        let (addr, size) = load_initrd(&mem, &mut f, 0x1000, 0x1_2000).expect("loaded");
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(addr, (0x1_2000 - size) & !(PAGE - 1));
        assert!(addr < 0x1_0000 && addr + size > 0x1_0000);
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(addr))
            .expect("read back");
        assert_eq!(back, bytes);
        // One that does not fit above the floor is refused.
        let mut big = temp_file(&bytes);
        assert!(matches!(
            load_initrd(&mem, &mut big, 0xf000, 0x1_2000),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn gdt_entries_are_flat() {
        // Base 0 and limit 0xfffff with G=1 in both descriptors.
        for d in &BOOT_GDT[2..] {
            assert_eq!(d & 0xffff, 0xffff);
            assert_eq!((d >> 16) & 0xff_ffff, 0);
            assert_eq!((d >> 55) & 1, 1);
        }
    }
}
