//! Entry points for the fuzz targets (feature `fuzzing`; never built into
//! `abide`): the descriptor-chain walkers of virtio-blk, -net and -rng
//! over a guest memory the fuzzer fills.

use std::io::Write;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMem;

/// Guest RAM the fuzzer fills: descriptor table at 0, available ring at
/// 0x1000, used ring at 0x2000, buffers anywhere (some addresses past the
/// end, as a hostile driver gives them).
const RAM: usize = 0x1_0000;
/// Most chains walked per input.
const CHAINS: usize = 32;

/// Input: byte 0 picks the device (blk, net receive, net transmit, rng),
/// byte 1 the queue size (a power of two up to 256), then guest RAM.
pub fn walk_chains(data: &[u8]) {
    let Some((&[which, size_log], image)) = data.split_first_chunk::<2>() else {
        return;
    };
    let size = 1u16 << (size_log % 9);
    let mem = match GuestMem::from_ranges(&[(GuestAddress(0), RAM)]) {
        Ok(m) => m,
        Err(_) => return,
    };
    let image = &image[..image.len().min(RAM)];
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    let Ok(mut q) = Queue::new(size) else {
        return;
    };
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let max = usize::from(size);
    let disk = match which % 4 {
        0 => anon_disk(),
        _ => None,
    };
    let Ok(iter) = q.iter(&mem) else {
        return;
    };
    for chain in iter.take(CHAINS) {
        let r = match which % 4 {
            0 => match disk.as_ref().and_then(|f| f.try_clone().ok()) {
                Some(f) => super::blk::fuzz_chain(&mem, f, 64, chain, max),
                None => return,
            },
            1 => super::net::fuzz_chain(&mem, chain, max, Some(&image[..image.len().min(1514)])),
            2 => super::net::fuzz_chain(&mem, chain, max, None),
            _ => super::rng::fuzz_chain(&mem, chain, max),
        };
        if let Ok(n) = r {
            // The used length never exceeds what a chain can hold.
            assert!(n as usize <= 64 * 512 + 1 + super::net::MAX_BUFFER_LEN);
        }
    }
}

/// A 32 KiB (64-sector) in-memory disk image.
pub(crate) fn anon_disk() -> Option<std::fs::File> {
    let name = c"abide-fuzz-disk";
    // SAFETY: `name` is a valid C string; flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: memfd_create just returned this fd; nothing else owns it.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.write_all(&[0u8; 64 * 512]).ok()?;
    Some(f)
}
