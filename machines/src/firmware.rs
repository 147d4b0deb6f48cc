//! Firmware boot: where a firmware image (SeaBIOS) goes, and the devices
//! only a firmware-booted guest has (fw_cfg, the debug port).
//!
//! None of this exists for a guest booted directly (`--kernel` or the
//! embedded guest): the fw_cfg device and the debug port are attached only
//! with `--firmware`. That is why the released machine types could take
//! these values without any of their manifests changing.

use serde::{Deserialize, Serialize};

use crate::{GIB, KIB};

/// QEMU's fw_cfg interface, as SeaBIOS and Linux's `linuxboot_dma.bin`
/// expect it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgPorts {
    /// Selector port (16-bit); the data port (8-bit) follows it.
    pub selector: u16,
    /// DMA address register (big-endian 64-bit, two 32-bit halves).
    pub dma: u16,
}

/// Where `linuxboot_dma.bin` puts the parts of a bzImage loaded through
/// fw_cfg (the kernel keys of `--firmware` with `--kernel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxbootLayout {
    /// The real-mode setup code (and the zero page it starts with).
    pub setup_addr: u64,
    /// The command line.
    pub cmdline_addr: u64,
    /// The protected-mode kernel.
    pub kernel_addr: u64,
}

/// The firmware image's place in the guest and the fw_cfg devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareLayout {
    /// Largest image accepted. The image is mapped read-only with its end
    /// at `slot_end`; a smaller one sits at the top of the slot.
    pub slot_size: u64,
    /// End (exclusive) of the slot: 4 GiB, where the reset vector is.
    pub slot_end: u64,
    /// At most how many bytes of the image's end are also at the top of
    /// the first MiB, as writable RAM: a PC's shadow copy, which SeaBIOS
    /// needs when no i440FX or Q35 host bridge unlocks shadowing. A PC
    /// aliases the last 128 KiB at 0xE0000; SeaBIOS's 256 KiB build also
    /// links code below 0xE0000 and copies it down from the high mapping
    /// only when it can unlock PAM shadowing, so the whole image of up to
    /// 256 KiB is copied (from 0xC0000 for a 256 KiB image).
    pub low_alias_size: u64,
    /// fw_cfg.
    pub fw_cfg: FwCfgPorts,
    /// The firmware's debug console port (SeaBIOS writes its log there).
    pub debug_port: u16,
    /// Kernel placement for `linuxboot_dma.bin`.
    pub linuxboot: LinuxbootLayout,
    /// The fw_cfg `etc/sercon-port` value: the port of the serial console
    /// the firmware mirrors its screen to (COM1), 0 for none.
    pub sercon_port: u16,
    /// Whether the firmware offers its boot menu (and waits for a key).
    pub show_boot_menu: bool,
}

/// pc-1.0's (and pc-2.0's) firmware layout: a 256 KiB slot holds Debian's
/// `bios.bin` (128 KiB) and `bios-256k.bin`; it ends just above KVM's TSS
/// pages (`vm.rs`, 0xfffb_d000..0xfffc_0000). Ports and addresses are
/// QEMU's, which the firmware and `linuxboot_dma.bin` hard-code.
pub fn pc_1_0_firmware() -> FirmwareLayout {
    FirmwareLayout {
        slot_size: 256 * KIB,
        slot_end: 4 * GIB,
        low_alias_size: 256 * KIB,
        fw_cfg: FwCfgPorts {
            selector: 0x510,
            dma: 0x514,
        },
        debug_port: 0x402,
        linuxboot: LinuxbootLayout {
            setup_addr: 0x1_0000,
            cmdline_addr: 0x2_0000,
            kernel_addr: 0x10_0000,
        },
        sercon_port: 0x3f8,
        show_boot_menu: false,
    }
}

impl FirmwareLayout {
    /// Guest address of an image of `len` bytes (at the top of the slot).
    pub fn image_addr(&self, len: u64) -> u64 {
        self.slot_end - len
    }

    /// Size of the low (shadow) copy of an image of `len` bytes.
    pub fn low_alias_len(&self, len: u64) -> u64 {
        len.min(self.low_alias_size)
    }

    /// Guest address of the low (shadow) copy of an image of `len` bytes.
    pub fn low_alias_addr(&self, len: u64) -> u64 {
        0x10_0000 - self.low_alias_len(len)
    }
}
