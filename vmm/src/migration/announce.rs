//! Self-announce after a migration: RARP frames with the guest's MAC sent
//! from the host side of each new tap, as QEMU does, so that switches and
//! bridges learn the guest's new port at once instead of when the guest
//! next sends something. Nothing guest-visible changes (telling the guest
//! to announce itself, `VIRTIO_NET_F_GUEST_ANNOUNCE`, is a feature bit and
//! belongs to a new machine type only).

use std::time::Duration;

use abide_devices::virtio::net::{NetBackend, Tap};

/// Rounds and the pauses before each (QEMU's schedule: 50 ms, then 100 ms
/// longer each round).
const ROUNDS: [u64; 5] = [0, 50, 150, 250, 350];

/// The RARP "reverse request" for `mac`, padded to the 60-byte minimum.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address
    f
}

/// Sends the announcements on `ports` (tap, guest MAC) from a background
/// thread; returns at once.
pub fn start(ports: Vec<(Tap, [u8; 6])>) {
    if ports.is_empty() {
        return;
    }
    let spawned = abide_devices::thread("announce").spawn(move || {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Announce);
        for pause in ROUNDS {
            std::thread::sleep(Duration::from_millis(pause));
            for (tap, mac) in &ports {
                // A tap that refuses a frame drops it, as a wire would.
                let _ = tap.send(&rarp_frame(*mac));
            }
        }
    });
    if let Err(e) = spawned {
        eprintln!("abide: warning: cannot announce the guest's new network port: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x21];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|b| *b == 0));
    }
}
