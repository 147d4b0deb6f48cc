//! Guest RAM: one memfd, mapped as the machine's RAM ranges.
//!
//! Backing all of RAM with a single memfd lets snapshot and migration share
//! or map the memory later without copying it.

use std::fs::File;
use std::os::fd::FromRawFd;

use abide_devices::GuestMem;
use abide_machines::MachineDescription;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the {size}-byte guest memory file")]
    Memfd {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memory failed.
    #[error("cannot map {size:#x} bytes of guest memory at {addr:#x}: {reason}; the host may be out of memory or address space")]
    Map {
        /// Guest address.
        addr: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// KVM's dirty log could not be read.
    #[error("cannot read KVM's dirty page log of memory slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Memory slots being registered by [`GuestRam::register_in_background`].
/// Dropping it waits for the registration too.
#[derive(Debug)]
pub struct PendingSlots(Option<std::io::Result<std::thread::JoinHandle<Result<(), MemoryError>>>>);

impl PendingSlots {
    /// Slots already registered.
    pub fn done() -> Self {
        Self(None)
    }

    /// Waits until every slot is registered.
    pub fn wait(&mut self) -> Result<(), MemoryError> {
        match self.0.take() {
            None => Ok(()),
            Some(Ok(t)) => t.join().unwrap_or_else(|_| {
                Err(MemoryError::Map {
                    addr: 0,
                    size: 0,
                    reason: "the memory slot thread panicked".into(),
                })
            }),
            Some(Err(e)) => Err(MemoryError::Map {
                addr: 0,
                size: 0,
                reason: format!("cannot start the memory slot thread: {e}"),
            }),
        }
    }
}

impl Drop for PendingSlots {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

/// Guest RAM and the file that backs it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped memory.
    pub mem: GuestMem,
    /// Size in bytes.
    pub size: u64,
    /// The memfd backing all of RAM, ranges laid out back to back.
    pub file: File,
    /// Guest ranges (address, length) mapped from a snapshot file instead of
    /// the memfd (see `snapshot::restore`).
    pub file_mapped: std::sync::Mutex<Vec<(u64, u64)>>,
}

/// Data extents of `file` within `[start, start + len)`, as offsets
/// relative to `start`: never-written parts of a memfd are holes and read
/// as zero.
fn data_extents(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let end = start + len;
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on an fd we own; no memory is involved.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            // Holes cannot be found: treat the rest as data.
            out.push((pos - start, end - pos));
            break;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data - start, hole - data));
        pos = hole;
    }
    out
}

/// The dirty bitmap of a region's whole mapping (vm-memory's
/// `GuestMemoryRegion::bitmap` gives a slice view without these methods).
fn own_bitmap(region: &GuestRegionMmap) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd { size, source };
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(c"abide-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    Ok(file)
}

/// Asks for transparent huge pages on a RAM region. With 2 MiB host pages a
/// guest takes far fewer nested page faults; for a memfd this takes effect
/// where the host allows THP for shmem (`shmem_enabled` = advise or always).
fn advise_huge(region: &GuestRegionMmap) {
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
        return;
    };
    // SAFETY: the range is exactly a live mapping owned by `region`; madvise
    // only changes how the kernel backs it, never its contents.
    let r = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
    // Not fatal: hosts without THP simply use small pages.
    let _ = r;
}

impl GuestRam {
    /// Allocates `size` bytes of RAM laid out as `machine` says.
    pub fn new(machine: &MachineDescription, size: u64) -> Result<Self, MemoryError> {
        let file = memfd(size)?;
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for range in machine.memory.ram_ranges(size) {
            let map_err = |reason: String| MemoryError::Map {
                addr: range.start,
                size: range.size,
                reason,
            };
            let fo = FileOffset::new(
                file.try_clone().map_err(|e| map_err(e.to_string()))?,
                offset,
            );
            let len = usize::try_from(range.size).map_err(|e| map_err(e.to_string()))?;
            let region = GuestRegionMmap::from_range(GuestAddress(range.start), len, Some(fo))
                .map_err(|e| map_err(e.to_string()))?;
            regions.push(region);
            offset += range.size;
        }
        for r in &regions {
            advise_huge(r);
        }
        let mem = GuestMem::from_regions(regions).map_err(|e| MemoryError::Map {
            addr: 0,
            size,
            reason: e.to_string(),
        })?;
        Ok(Self {
            mem,
            size,
            file,
            file_mapped: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The parts of each RAM region that may hold non-zero bytes, as
    /// (guest address, length): what the guest wrote into the memfd, plus
    /// what is mapped from a snapshot. The rest reads as zero without being
    /// touched (scanning it would allocate host memory for nothing).
    pub fn populated(&self) -> Vec<(u64, u64)> {
        let mapped = self
            .file_mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in self.mem.iter() {
            let base = r.start_addr().0;
            let len = r.len();
            let mut ranges: Vec<(u64, u64)> = match r.file_offset() {
                Some(fo) => data_extents(fo.file(), fo.start(), len)
                    .into_iter()
                    .map(|(o, l)| (base + o, l))
                    .collect(),
                None => vec![(base, len)],
            };
            ranges.extend(mapped.iter().filter_map(|&(a, l)| {
                let s = a.max(base);
                let e = (a + l).min(base + len);
                (s < e).then_some((s, e - s))
            }));
            ranges.sort_unstable();
            for (a, l) in ranges {
                match out.last_mut() {
                    Some((pa, pl)) if *pa + *pl >= a => *pl = (*pl).max(a + l - *pa),
                    _ => out.push((a, l)),
                }
            }
        }
        out
    }

    /// Makes the 4 KiB page at `gpa` read as zeros by punching it out of
    /// the memfd: a page that was never written stays unallocated. (For
    /// fresh RAM only: pages mapped from a snapshot file are not the
    /// memfd's.)
    pub fn zero_page(&self, gpa: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .filter(|r| gpa + 4096 <= r.start_addr().0 + r.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let fo = region
            .file_offset()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::Unsupported))?;
        let at = fo.start() + (gpa - region.start_addr().0);
        // SAFETY: fallocate on a descriptor we own; the range lies within
        // the memfd (checked above); no memory is passed.
        let r = unsafe {
            libc::fallocate(
                fo.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                4096,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers every region with KVM as a memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_slots(vm, 0)
    }

    /// [`GuestRam::register`] on another thread: creating a memory slot
    /// waits for an SRCU grace period (milliseconds on a busy host), which
    /// a restore overlaps with building devices and loading state. The
    /// slots exist once [`PendingSlots::wait`] returns; nothing may run
    /// the guest before. The mapping must outlive the handle (the VM holds
    /// both, the handle first).
    pub fn register_in_background(&self, vm: std::sync::Arc<VmFd>) -> PendingSlots {
        let descs: Vec<_> = self.slot_descs(0);
        let thread = abide_devices::thread("abide-memslots")
            // The VM's memory outlives this thread: the handle is joined
            // before the memory is dropped.
            .spawn(move || set_slot_descs(&vm, descs));
        PendingSlots(Some(thread))
    }

    fn slot_descs(
        &self,
        flags: u32,
    ) -> Vec<(u32, Result<kvm_userspace_memory_region, MemoryError>)> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                let desc = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map_err(|e| MemoryError::Map {
                        addr: region.start_addr().0,
                        size: region.len(),
                        reason: e.to_string(),
                    })
                    .map(|host| kvm_userspace_memory_region {
                        slot,
                        flags,
                        guest_phys_addr: region.start_addr().0,
                        memory_size: region.len(),
                        userspace_addr: host as u64,
                    });
                (slot, desc)
            })
            .collect()
    }

    /// Turns KVM's dirty page logging on or off for every memory slot.
    /// Turning it on also clears the dirty bitmaps of Abide's own writes,
    /// so both start from now.
    pub fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), MemoryError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.set_slots(vm, flags)?;
        if on {
            for r in self.mem.iter() {
                own_bitmap(r).reset();
            }
        }
        Ok(())
    }

    /// Takes (and clears) the pages written since the last call, per RAM
    /// region in slot order: KVM's dirty log (guest writes) merged with the
    /// regions' dirty bitmaps (writes Abide's device threads made through
    /// vm-memory). One bit per 4 KiB page, from the region's start.
    pub fn take_dirty(&self, vm: &VmFd) -> Result<Vec<Vec<u64>>, MemoryError> {
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let mut bits = vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            let ours = own_bitmap(region).get_and_reset();
            bits.resize(bits.len().max(ours.len()), 0);
            for (b, o) in bits.iter_mut().zip(ours) {
                *b |= o;
            }
            out.push(bits);
        }
        Ok(out)
    }

    fn set_slots(&self, vm: &VmFd, flags: u32) -> Result<(), MemoryError> {
        set_slot_descs(vm, self.slot_descs(flags))
    }
}

/// Registers the slots [`GuestRam::slot_descs`] described, whose regions
/// must be live mappings that outlive the VM (the VM is dropped before
/// its memory; only the flags change when a slot is registered again).
fn set_slot_descs(
    vm: &VmFd,
    descs: Vec<(u32, Result<kvm_userspace_memory_region, MemoryError>)>,
) -> Result<(), MemoryError> {
    for (slot, desc) in descs {
        let desc = desc?;
        // SAFETY: `desc` describes a live mapping owned by the VM's memory,
        // which outlives the VM (see above).
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn only_written_parts_of_the_memfd_are_data() {
        let f = memfd(4 << 20).expect("memfd");
        f.write_all_at(&[1], 64 << 10).expect("write");
        f.write_all_at(&[2; 8192], 3 << 20).expect("write");
        let ext = data_extents(&f, 0, 4 << 20);
        assert!(!ext.is_empty());
        // Every written byte is inside an extent, and most of the file is not.
        for at in [64 << 10, 3 << 20, (3 << 20) + 8191] {
            assert!(
                ext.iter().any(|&(o, l)| at >= o && at < o + l),
                "{at:#x} not in {ext:x?}"
            );
        }
        let covered: u64 = ext.iter().map(|e| e.1).sum();
        assert!(covered < 1 << 20, "{covered} bytes reported as data");
        // A window past the data: nothing.
        assert!(data_extents(&f, 1 << 20, 1 << 20).is_empty());
    }
}
