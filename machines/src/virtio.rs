//! Virtio devices as the guest sees them: the virtio-pci transport layout
//! and, per device model, PCI identity, interrupt pin, queues, feature bits
//! and configuration space.
//!
//! A device model offers exactly the features its [`VirtioModel`] declares
//! (`VIRTIO_F_VERSION_1` included: nothing is forced on) and exposes exactly
//! `config_len` bytes of configuration space; a model that cannot implement a
//! declared value refuses to be built, naming the device and the value.

use serde::{Deserialize, Serialize};

use crate::PciIdentity;

/// `VIRTIO_F_VERSION_1`: the modern (virtio 1.x) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_F_MQ`: `num_queues` is valid.
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// `VIRTIO_NET_F_MAC`: the device has a MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the link status is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_MQ`: more than one receive/transmit queue pair.
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// `VIRTIO_NET_S_LINK_UP` in virtio-net's `status` field.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Names of the feature bits Abide knows, for messages: device-specific
/// bits (0..=23) depend on the device type, the rest are shared.
pub fn virtio_feature_name(device_type: u16, bit: u32) -> Option<&'static str> {
    let shared = match bit {
        28 => Some("VIRTIO_RING_F_INDIRECT_DESC"),
        29 => Some("VIRTIO_RING_F_EVENT_IDX"),
        32 => Some("VIRTIO_F_VERSION_1"),
        33 => Some("VIRTIO_F_ACCESS_PLATFORM"),
        34 => Some("VIRTIO_F_RING_PACKED"),
        35 => Some("VIRTIO_F_IN_ORDER"),
        36 => Some("VIRTIO_F_ORDER_PLATFORM"),
        37 => Some("VIRTIO_F_SR_IOV"),
        38 => Some("VIRTIO_F_NOTIFICATION_DATA"),
        _ => None,
    };
    let specific = match (device_type, bit) {
        (1, 0) => Some("VIRTIO_NET_F_CSUM"),
        (1, 1) => Some("VIRTIO_NET_F_GUEST_CSUM"),
        (1, 3) => Some("VIRTIO_NET_F_MTU"),
        (1, 5) => Some("VIRTIO_NET_F_MAC"),
        (1, 16) => Some("VIRTIO_NET_F_STATUS"),
        (1, 17) => Some("VIRTIO_NET_F_CTRL_VQ"),
        (1, 21) => Some("VIRTIO_NET_F_GUEST_ANNOUNCE"),
        (1, 22) => Some("VIRTIO_NET_F_MQ"),
        (2, 1) => Some("VIRTIO_BLK_F_SIZE_MAX"),
        (2, 2) => Some("VIRTIO_BLK_F_SEG_MAX"),
        (2, 4) => Some("VIRTIO_BLK_F_GEOMETRY"),
        (2, 5) => Some("VIRTIO_BLK_F_RO"),
        (2, 6) => Some("VIRTIO_BLK_F_BLK_SIZE"),
        (2, 9) => Some("VIRTIO_BLK_F_FLUSH"),
        (2, 10) => Some("VIRTIO_BLK_F_TOPOLOGY"),
        (2, 11) => Some("VIRTIO_BLK_F_CONFIG_WCE"),
        (2, 12) => Some("VIRTIO_BLK_F_MQ"),
        (2, 13) => Some("VIRTIO_BLK_F_DISCARD"),
        (2, 14) => Some("VIRTIO_BLK_F_WRITE_ZEROES"),
        _ => None,
    };
    shared.or(specific)
}

/// Feature bits of `features` as names (unknown bits as `bit N`), for
/// messages.
pub fn virtio_feature_names(device_type: u16, features: u64) -> Vec<String> {
    (0..64)
        .filter(|b| features & (1u64 << b) != 0)
        .map(|b| {
            virtio_feature_name(device_type, b)
                .map_or_else(|| format!("bit {b}"), |n| format!("{n} (bit {b})"))
        })
        .collect()
}

/// A capability of the virtio-pci transport in PCI config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioCap {
    /// Common configuration.
    Common,
    /// Notification area.
    Notify,
    /// ISR status.
    Isr,
    /// Device configuration (left out for a model without configuration).
    Device,
    /// MSI-X.
    Msix,
}

/// Where the virtio-pci transport's regions sit in BAR 0, and the order of
/// its capabilities in config space (guest-visible).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBarLayout {
    /// BAR 0 size (64-bit memory BAR).
    pub bar_size: u64,
    /// Common configuration offset.
    pub common: u32,
    /// Length of the common configuration structure (its capability's
    /// `length`, and the bytes that decode as registers): 0x38 is the
    /// virtio 1.0 layout, through `queue_device`.
    pub common_len: u32,
    /// ISR offset.
    pub isr: u32,
    /// Device configuration offset.
    pub device: u32,
    /// Notification area offset.
    pub notify: u32,
    /// Bytes between queue notification addresses.
    pub notify_multiplier: u32,
    /// MSI-X table offset.
    pub msix_table: u32,
    /// MSI-X pending-bit array offset.
    pub msix_pba: u32,
    /// Capabilities in list order, from the first capability offset (each
    /// kind once). Queue `i` notifies at `notify + i * notify_multiplier`.
    pub cap_order: [VirtioCap; 5],
    /// Whether a `VIRTIO_PCI_CAP_PCI_CFG` capability ends the list: a
    /// window in configuration space onto BAR 0, which the virtio
    /// specification asks of every device and iPXE's virtio-net driver
    /// requires. Added with pc-3.0: absent means none (older manifests
    /// and machine types).
    #[serde(default, skip_serializing_if = "is_false")]
    pub pci_cfg_window: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// One virtio device model as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioModel {
    /// PCI identity.
    pub pci: PciIdentity,
    /// Interrupt pin in config space (0 = none, 1..=4 = INTA#..INTD#); the
    /// pin's GSI follows the machine's slot swizzle (`pci.intx_gsis`).
    pub intx_pin: u8,
    /// MSI-X vectors (one per queue plus one for configuration changes).
    pub msix_vectors: u16,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Maximum size of each virtqueue.
    pub queue_size: u16,
    /// Expansion ROM slot size, for models that can carry an option ROM.
    pub rom_slot: Option<u64>,
    /// Virtio feature bits offered to the driver, exactly. (virtio-blk adds
    /// `VIRTIO_BLK_F_RO` for a disk given `readonly=on`: that is the disk's
    /// property, not the machine's.)
    pub features: u64,
    /// Bytes of device configuration space exposed (its capability's
    /// `length`); 0 = no device configuration capability.
    pub config_len: u32,
}

/// What virtio-blk's configuration space holds besides the disk's capacity
/// and the queue count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkConfig {
    /// `blk_size`: the block size the guest should use.
    pub blk_size: u32,
    /// `seg_max`: most data segments in one request (at most the queue
    /// size minus the header and status descriptors).
    pub seg_max: u32,
}

/// What virtio-net's configuration space holds besides the MAC, and the
/// MAC a card gets when the user gives none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// `status` (`VIRTIO_NET_S_LINK_UP`: the link is up).
    pub status: u16,
    /// `max_virtqueue_pairs`.
    pub max_virtqueue_pairs: u16,
    /// First five bytes of a default MAC; the sixth is the card's index
    /// among the VM's network cards.
    pub default_mac_prefix: [u8; 5],
}

impl NetConfig {
    /// The MAC card `index` gets when none is given.
    pub fn default_mac(&self, index: usize) -> [u8; 6] {
        let p = self.default_mac_prefix;
        [p[0], p[1], p[2], p[3], p[4], index as u8]
    }
}

/// The virtio device models of a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioModels {
    /// Transport layout shared by all models.
    pub layout: VirtioBarLayout,
    /// virtio-blk.
    pub blk: VirtioModel,
    /// virtio-blk configuration space.
    pub blk_config: BlkConfig,
    /// virtio-net.
    pub net: VirtioModel,
    /// virtio-net configuration space and default MACs.
    pub net_config: NetConfig,
    /// virtio-rng.
    pub rng: VirtioModel,
}

impl VirtioModels {
    /// Every model with its name, in the order devices are attached.
    pub fn all(&self) -> [(&'static str, &VirtioModel); 3] {
        [
            ("virtio-blk", &self.blk),
            ("virtio-net", &self.net),
            ("virtio-rng", &self.rng),
        ]
    }
}

/// A modern virtio model with PCI `device` ID and `class`, the virtio
/// vendor and subsystem IDs, revision 1 and INTA#; no queues, features or
/// configuration yet.
pub(crate) fn model(device: u16, class: u32) -> VirtioModel {
    VirtioModel {
        pci: PciIdentity {
            vendor: 0x1af4,
            device,
            subsystem_vendor: 0x1af4,
            // Modern virtio devices use subsystem IDs of 0x40 and up.
            subsystem: 0x40 + (device - 0x1040),
            revision: 1,
            class,
        },
        intx_pin: 1,
        msix_vectors: 0,
        num_queues: 0,
        queue_size: 0,
        rom_slot: None,
        features: 0,
        config_len: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names() {
        assert_eq!(virtio_feature_name(2, 12), Some("VIRTIO_BLK_F_MQ"));
        assert_eq!(virtio_feature_name(1, 12), None);
        assert_eq!(
            virtio_feature_names(1, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | (1 << 40)),
            [
                "VIRTIO_NET_F_MAC (bit 5)",
                "VIRTIO_F_VERSION_1 (bit 32)",
                "bit 40"
            ]
        );
        let n = NetConfig {
            status: 1,
            max_virtqueue_pairs: 1,
            default_mac_prefix: [0x52, 0x54, 0, 0xab, 0x1d],
        };
        assert_eq!(n.default_mac(3), [0x52, 0x54, 0, 0xab, 0x1d, 3]);
    }
}
