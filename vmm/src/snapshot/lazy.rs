//! Guest memory of a snapshot with chunk hashes: verified chunk by chunk,
//! and never seen by the guest or a device before its chunk is verified.
//!
//! The `memory.chunks` section (verified whole, like every state section)
//! lists every chunk of guest RAM that holds saved pages, with the SHA-256
//! of the chunk's bytes as guest memory (zeros where no page was saved).
//! Chunks that hold no saved page are zero, as the verified `memory.map`
//! says. Readers before 0.4 skip the section (it is optional) and verify
//! the `memory` section whole.
//!
//! **Lazily** ([`LazyMemory`]): guest RAM (the memfd, all holes at first)
//! is registered with a userfaultfd in *missing* mode, so the first touch
//! of any page, by a vCPU (through KVM), a device thread, or the kernel on
//! their behalf, waits for one thread, the memory loader. It reads the
//! chunk from the file into its own buffer, hashes that buffer, and only if
//! the hash matches copies it into guest memory (`UFFDIO_COPY`), which
//! wakes whoever waited; a zero chunk is filled with zeros. Between faults
//! it verifies and installs the remaining chunks in order, so the whole
//! file is verified within a bounded time (the file's size over one core's
//! SHA-256 speed); then it closes the userfaultfd and the VM runs on plain
//! memory, without the file. A chunk that does not match is never
//! installed: the loader records which chunk it was and ends the VM.
//!
//! **Eagerly** ([`eager`]), when no userfaultfd can be had (an `abide
//! serve` that dropped its privileges, a kernel without it): every chunk is
//! read, verified and copied in, on every core, before the VM starts.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmm_sys_util::eventfd::EventFd;

use super::format::{MemoryRun, PAGE};

/// Size of a verification chunk in the snapshots this build writes.
pub const CHUNK_SIZE: u64 = 256 << 10;
/// Largest chunk size a reader accepts (its buffer is this large).
const MAX_CHUNK: u64 = 64 << 20;

/// The `memory.chunks` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryChunks {
    /// Size of a chunk in bytes (a power of two, from 4 KiB to 64 MiB).
    pub chunk_size: u64,
    /// Every chunk that holds saved pages, in address order.
    pub chunks: Vec<MemoryChunk>,
}

impl MemoryChunks {
    /// The chunks of guest RAM that hold saved pages (`runs`), with the
    /// SHA-256 of each as it is in `ram` ((guest address, bytes) per
    /// region). For the writer.
    pub fn hash(size: u64, runs: &[MemoryRun], ram: &[(u64, &[u8])]) -> Self {
        Self {
            chunk_size: size,
            chunks: hash_chunks(size, runs, ram),
        }
    }
}

/// One chunk of guest RAM that holds saved pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryChunk {
    /// Guest address of its start (a multiple of the chunk size from its
    /// RAM region's start).
    pub gpa: u64,
    /// SHA-256 (hex) of the chunk's bytes as guest memory: the saved pages
    /// in place, zeros elsewhere. The last chunk of a region may be short.
    pub sha256: String,
}

/// Why guest memory could not be loaded.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChunkError {
    /// The chunk's bytes do not hash to the map's value.
    #[error("snapshot memory chunk {index} (guest {gpa:#x}..{end:#x}) is corrupt (SHA-256 mismatch); none of it reached the guest")]
    Corrupt {
        /// Index in the chunk list.
        index: usize,
        /// Guest address.
        gpa: u64,
        /// Guest address of its end.
        end: u64,
    },
    /// Reading the chunk from the file failed.
    #[error("cannot read snapshot memory chunk {index} (guest {gpa:#x}..{end:#x}): {reason}; none of it reached the guest")]
    Read {
        /// Index in the chunk list.
        index: usize,
        /// Guest address.
        gpa: u64,
        /// Guest address of its end.
        end: u64,
        /// Cause.
        reason: String,
    },
    /// Installing a verified chunk failed.
    #[error("cannot install guest memory at {gpa:#x}: {reason}")]
    Install {
        /// Guest address.
        gpa: u64,
        /// Cause.
        reason: String,
    },
}

/// A part of a chunk stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    /// Offset in the chunk.
    at: usize,
    /// Offset in the file.
    file: u64,
    /// Length.
    len: usize,
}

/// A chunk with saved pages: where it goes and where its pages are.
#[derive(Clone, Debug)]
struct DataChunk {
    gpa: u64,
    /// Host address of its start in guest RAM.
    host: usize,
    len: usize,
    pieces: Vec<Piece>,
    sha256: [u8; 32],
}

/// A RAM region: guest address, host address, length, and the index of
/// its first chunk in [`Plan::slots`].
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    host: usize,
    len: u64,
    first_slot: usize,
}

/// Slot value of a chunk that holds no saved page.
const ZERO: u32 = u32::MAX;

/// Where every chunk of guest RAM comes from, checked against the map and
/// the file before anything is loaded.
#[derive(Debug)]
pub struct Plan {
    size: u64,
    regions: Vec<Region>,
    /// Every chunk of every region, in order: its index in `data`, or
    /// [`ZERO`].
    slots: Vec<u32>,
    data: Vec<DataChunk>,
}

impl Plan {
    /// Checks the map's chunks against its runs (already checked: page
    /// aligned, in order, inside RAM, covering the section) and lays out
    /// where each chunk's pages are. `regions`: (guest address, host
    /// address, length) of each RAM region; `section`: the memory
    /// section's offset in the file.
    pub fn new(
        size: u64,
        chunks: &[MemoryChunk],
        runs: &[MemoryRun],
        regions: &[(u64, usize, u64)],
        section: u64,
    ) -> Result<Self, String> {
        if !size.is_power_of_two() || !(PAGE..=MAX_CHUNK).contains(&size) {
            return Err(format!(
                "chunk size {size} is not a power of two from {PAGE} to {MAX_CHUNK}"
            ));
        }
        let mut rs = Vec::new();
        let mut nslots = 0usize;
        for &(gpa, host, len) in regions {
            rs.push(Region {
                gpa,
                host,
                len,
                first_slot: nslots,
            });
            nslots += len.div_ceil(size) as usize;
        }
        let slot_of = |gpa: u64| -> Option<(usize, &Region)> {
            let r = rs.iter().find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)?;
            Some((r.first_slot + ((gpa - r.gpa) / size) as usize, r))
        };
        let mut slots = vec![ZERO; nslots];
        let mut data: Vec<DataChunk> = Vec::with_capacity(chunks.len());
        let mut last = None;
        for (i, c) in chunks.iter().enumerate() {
            let (slot, r) = slot_of(c.gpa)
                .ok_or_else(|| format!("chunk {i} at {:#x} is outside guest RAM", c.gpa))?;
            if (c.gpa - r.gpa) % size != 0 {
                return Err(format!("chunk {i} at {:#x} is not aligned", c.gpa));
            }
            if last.is_some_and(|l| slot <= l) {
                return Err(format!("chunk {i} at {:#x} is out of order", c.gpa));
            }
            last = Some(slot);
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(&c.sha256, &mut sha256)
                .map_err(|e| format!("chunk {i}: bad SHA-256 '{}': {e}", c.sha256))?;
            let off = c.gpa - r.gpa;
            let len = size.min(r.len - off);
            slots[slot] = i as u32;
            data.push(DataChunk {
                gpa: c.gpa,
                host: r.host + off as usize,
                len: len as usize,
                pieces: Vec::new(),
                sha256,
            });
        }
        if data.len() >= ZERO as usize {
            return Err("too many chunks".into());
        }
        for run in runs {
            let mut gpa = run.gpa;
            let end = run.gpa + run.len;
            while gpa < end {
                let (slot, _) =
                    slot_of(gpa).ok_or_else(|| format!("run {run:?} is outside guest RAM"))?;
                let d = match slots[slot] {
                    ZERO => {
                        return Err(format!(
                            "the page at {gpa:#x} was saved but its chunk has no hash"
                        ))
                    }
                    d => &mut data[d as usize],
                };
                let at = gpa - d.gpa;
                let n = (d.len as u64 - at).min(end - gpa);
                d.pieces.push(Piece {
                    at: at as usize,
                    file: section + run.offset + (gpa - run.gpa),
                    len: n as usize,
                });
                gpa += n;
            }
        }
        Ok(Self {
            size,
            regions: rs,
            slots,
            data,
        })
    }

    /// Chunks with saved pages.
    pub fn chunks(&self) -> usize {
        self.data.len()
    }

    /// Bytes of guest memory those chunks cover.
    pub fn bytes(&self) -> u64 {
        self.data.iter().map(|d| d.len as u64).sum()
    }

    /// Data chunk `i` read from `file` into `buf` (zeros between its
    /// pieces) and checked against its hash.
    fn verify(&self, file: &File, i: usize, buf: &mut [u8]) -> Result<(), ChunkError> {
        let d = &self.data[i];
        let buf = &mut buf[..d.len];
        buf.fill(0);
        for p in &d.pieces {
            file.read_exact_at(&mut buf[p.at..p.at + p.len], p.file)
                .map_err(|e| ChunkError::Read {
                    index: i,
                    gpa: d.gpa,
                    end: d.gpa + d.len as u64,
                    reason: e.to_string(),
                })?;
        }
        if Sha256::digest(&*buf).as_slice() != d.sha256 {
            return Err(ChunkError::Corrupt {
                index: i,
                gpa: d.gpa,
                end: d.gpa + d.len as u64,
            });
        }
        Ok(())
    }

    /// The slot of a host address in guest RAM, with the chunk's host
    /// address, guest address and length.
    fn slot_at(&self, host: usize) -> Option<(usize, usize, u64, usize)> {
        let r = self
            .regions
            .iter()
            .find(|r| host >= r.host && ((host - r.host) as u64) < r.len)?;
        let k = (host - r.host) as u64 / self.size;
        let off = k * self.size;
        Some((
            r.first_slot + k as usize,
            r.host + off as usize,
            r.gpa + off,
            self.size.min(r.len - off) as usize,
        ))
    }
}

/// Verifies every chunk and copies it into guest RAM, on every core,
/// before the VM starts. Returns the time it took, in milliseconds.
pub fn eager(plan: &Plan, file: &File) -> Result<f64, ChunkError> {
    let t = Instant::now();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let result = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<(), ChunkError> {
                    let mut buf = vec![0u8; plan.size as usize];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(d) = plan.data.get(i) else {
                            return Ok(());
                        };
                        plan.verify(file, i, &mut buf)?;
                        for p in &d.pieces {
                            // SAFETY: the chunk lies inside a RAM region's
                            // live mapping (checked by Plan::new); no vCPU
                            // or device runs yet, and each piece is written
                            // by this worker only.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    buf[p.at..].as_ptr(),
                                    (d.host + p.at) as *mut u8,
                                    p.len,
                                );
                            }
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ChunkError::Install {
                        gpa: 0,
                        reason: "a verifying thread panicked".into(),
                    })
                })
            })
            .collect::<Result<Vec<()>, ChunkError>>()
    });
    result.map(|_| crate::api::ms(t))
}

// userfaultfd's ABI (linux/userfaultfd.h).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_COPY_BIT: u64 = 1 << 3;
const UFFDIO_ZEROPAGE_BIT: u64 = 1 << 4;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): the event, and for a page fault its flags
/// and address.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    _flags: u64,
    address: u64,
    _tail: u64,
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: every request used here takes a pointer to the matching
    // #[repr(C)] struct above, which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A userfaultfd for this process, non-blocking: the system call (root, or
/// `vm.unprivileged_userfaultfd`), else `/dev/userfaultfd` (its mode
/// decides).
fn open_uffd() -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the system call takes flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor; we own it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let err = std::io::Error::last_os_error();
    let Ok(dev) = File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    else {
        return Err(err);
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and
    // returns a new descriptor.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd with every RAM region of `plan` registered in missing
/// mode, and the loader's stop event.
fn register(plan: &Plan) -> std::io::Result<(OwnedFd, EventFd)> {
    let uffd = open_uffd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    ioctl(&uffd, UFFDIO_API, &mut api)?;
    for r in &plan.regions {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: r.host as u64,
                len: r.len,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_REGISTER, &mut reg)?;
        let need = UFFDIO_COPY_BIT | UFFDIO_ZEROPAGE_BIT;
        if reg.ioctls & need != need {
            return Err(std::io::Error::other(
                "userfaultfd cannot copy into guest RAM here",
            ));
        }
    }
    Ok((uffd, EventFd::new(libc::EFD_NONBLOCK)?))
}

/// How long the VM has to end after a chunk failed verification before the
/// process ends instead (see `Loader::run`).
const STOP_GRACE_MS: i32 = 2000;

/// The recorded failure, as text.
fn p_failure(shared: &Shared) -> String {
    shared
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .failure
        .as_ref()
        .map_or_else(String::new, |f| f.to_string())
}

/// What the loader reports.
#[derive(Debug, Default)]
struct Progress {
    complete: bool,
    stopped: bool,
    failure: Option<ChunkError>,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

/// Guest memory being loaded by the memory loader thread. Dropping it
/// stops the thread (if still running) and closes the userfaultfd.
pub struct LazyMemory {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory").finish_non_exhaustive()
    }
}

impl LazyMemory {
    /// Registers guest RAM (every region of `plan`) with a new
    /// userfaultfd and starts the loader. Nothing in guest RAM may have
    /// been touched yet (it must be all holes). `on_failure` runs on the
    /// loader thread when a chunk does not verify (it ends the VM).
    /// `report`: print when every chunk is in (ABIDE_RESTORE_TIMINGS).
    pub fn start(
        plan: Plan,
        file: File,
        on_failure: Box<dyn Fn() + Send>,
        report: bool,
    ) -> Result<Self, (std::io::Error, Plan)> {
        let (uffd, stop) = match register(&plan) {
            Ok(r) => r,
            Err(e) => return Err((e, plan)),
        };
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let stop_clone = match stop.try_clone() {
            Ok(s) => s,
            Err(e) => return Err((e, plan)),
        };
        let loader = Loader {
            plan,
            file,
            uffd: Some(uffd),
            stop: stop_clone,
            shared: shared.clone(),
            on_failure,
            report,
            background_delay: std::env::var("ABIDE_RESTORE_BACKGROUND_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis),
        };
        // The loader is handed over once the thread exists, so that a
        // thread that cannot start leaves the plan to the caller (who then
        // loads eagerly).
        let (tx, rx) = std::sync::mpsc::channel::<Loader>();
        let spawned = abide_devices::thread("abide-memory").spawn(move || {
            if let Ok(l) = rx.recv() {
                l.run();
            }
        });
        match spawned {
            Ok(thread) => {
                // The thread waits in recv, so the receiver is alive.
                let _ = tx.send(loader);
                Ok(Self {
                    shared,
                    stop,
                    thread: Some(thread),
                })
            }
            Err(e) => Err((e, loader.plan)),
        }
    }

    /// Waits until every chunk is verified and in guest RAM (what a
    /// snapshot or migration of the restored VM needs first); the chunk
    /// that failed, if one did.
    pub fn wait_loaded(&self) -> Result<(), ChunkError> {
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = &p.failure {
                return Err(f.clone());
            }
            if p.complete {
                return Ok(());
            }
            if p.stopped {
                return Err(ChunkError::Install {
                    gpa: 0,
                    reason: "the memory loader stopped".into(),
                });
            }
            p = self
                .shared
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The chunk that failed to verify, if one did.
    pub fn failure(&self) -> Option<ChunkError> {
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failure
            .clone()
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The memory loader thread's state.
struct Loader {
    plan: Plan,
    file: File,
    uffd: Option<OwnedFd>,
    stop: EventFd,
    shared: Arc<Shared>,
    on_failure: Box<dyn Fn() + Send>,
    report: bool,
    background_delay: std::time::Duration,
}

impl Loader {
    fn run(mut self) {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Memory);
        let t = Instant::now();
        let result = self.load();
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(Some(faults)) => {
                // Every chunk is in: guest RAM is plain memory from now on.
                self.uffd = None;
                p.complete = true;
                if self.report {
                    eprintln!(
                        "abide: restore memory verified: {} chunks, {:.1} MiB in {:.1} ms ({} faults served)",
                        self.plan.chunks(),
                        self.plan.bytes() as f64 / (1 << 20) as f64,
                        crate::api::ms(t),
                        faults
                    );
                }
            }
            Ok(None) => p.stopped = true,
            Err(e) => p.failure = Some(e),
        }
        let failed = p.failure.is_some();
        drop(p);
        self.shared.changed.notify_all();
        if failed {
            (self.on_failure)();
            // Whoever waits for a page of the bad chunk stays waiting:
            // nothing unverified is ever installed. The VM normally ends
            // within milliseconds (its vCPUs stopped, then the VM torn down,
            // which stops this thread). A vCPU waiting inside KVM for the bad
            // chunk cannot be taken out (PVM retries the fault as long as it
            // is missing), so if the VM has not ended by then, the process
            // ends: releasing that vCPU would need bytes that are not the
            // snapshot's.
            if !self.wait_stop(STOP_GRACE_MS) {
                let why = p_failure(&self.shared);
                eprintln!(
                    "abide: error: {why}; a vCPU or device is waiting for that memory, and nothing verified can be given to it: ending the process"
                );
                // SAFETY: _exit ends the process at once; guest memory and
                // the snapshot file need no cleanup.
                unsafe { libc::_exit(crate::EXIT_ERROR) };
            }
        }
    }

    /// Waits up to `ms` for the stop event; whether it came.
    fn wait_stop(&self, ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let end = Instant::now() + std::time::Duration::from_millis(ms as u64);
        loop {
            let left = end.saturating_duration_since(Instant::now()).as_millis() as i32;
            // SAFETY: `fds` is valid for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, left) };
            if r > 0 {
                return true;
            }
            if left == 0 {
                return false;
            }
        }
    }

    /// Serves faults first and loads the remaining chunks in order between
    /// them. `Ok(Some(faults))` once every chunk is in, `Ok(None)` when
    /// stopped first.
    fn load(&self) -> Result<Option<u64>, ChunkError> {
        // Borrowed, never dropped here: on a failure the descriptor stays
        // open so that whoever waits on the bad chunk goes on waiting.
        let Some(uffd) = self.uffd.as_ref() else {
            return Ok(None);
        };
        let n = self.plan.data.len();
        let mut done = vec![false; n];
        let mut zero_done = vec![false; self.plan.slots.len()];
        let mut left = n;
        let mut next = 0usize;
        let mut faults = 0u64;
        let mut buf = vec![0u8; self.plan.size as usize];
        let mut msgs = [UffdMsg::default(); 16];
        // Tests hold the background back, so that the guest's own first
        // touches are what brings chunks in (ABIDE_RESTORE_BACKGROUND_DELAY_MS).
        let background_at = Instant::now() + self.background_delay;
        while left > 0 {
            let wait = background_at
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32;
            let mut fds = [
                libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is valid for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
            if r > 0 && fds[1].revents != 0 {
                return Ok(None);
            }
            if r > 0 && fds[0].revents != 0 {
                // SAFETY: reading whole uffd_msg records into `msgs`.
                let got = unsafe {
                    libc::read(
                        uffd.as_raw_fd(),
                        msgs.as_mut_ptr().cast(),
                        std::mem::size_of_val(&msgs),
                    )
                };
                let count = if got > 0 {
                    got as usize / std::mem::size_of::<UffdMsg>()
                } else {
                    0
                };
                for m in &msgs[..count] {
                    if m.event != UFFD_EVENT_PAGEFAULT {
                        continue;
                    }
                    faults += 1;
                    let addr = m.address as usize;
                    let Some((slot, host, gpa, len)) = self.plan.slot_at(addr) else {
                        continue;
                    };
                    match self.plan.slots[slot] {
                        ZERO if !zero_done[slot] => {
                            zero_done[slot] = true;
                            zero(uffd, host, gpa, len)?;
                        }
                        ZERO => wake(uffd, addr),
                        d if !done[d as usize] => {
                            self.install(uffd, d as usize, &mut buf)?;
                            done[d as usize] = true;
                            left -= 1;
                        }
                        _ => wake(uffd, addr),
                    }
                }
                continue;
            }
            if wait > 0 {
                continue;
            }
            while next < n && done[next] {
                next += 1;
            }
            if next < n {
                self.install(uffd, next, &mut buf)?;
                done[next] = true;
                left -= 1;
            }
        }
        Ok(Some(faults))
    }

    /// Verifies data chunk `i` and copies it into guest RAM.
    fn install(&self, uffd: &OwnedFd, i: usize, buf: &mut [u8]) -> Result<(), ChunkError> {
        self.plan.verify(&self.file, i, buf)?;
        let d = &self.plan.data[i];
        fill(d.len, d.gpa, |done| {
            let mut c = UffdioCopy {
                dst: (d.host + done) as u64,
                src: buf[done..].as_ptr() as u64,
                len: (d.len - done) as u64,
                mode: 0,
                copy: 0,
            };
            let r = ioctl(uffd, UFFDIO_COPY, &mut c);
            (r, usize::try_from(c.copy).unwrap_or(0))
        })
    }
}

/// Fills a chunk without saved pages with zeros.
fn zero(uffd: &OwnedFd, host: usize, gpa: u64, len: usize) -> Result<(), ChunkError> {
    fill(len, gpa, |done| {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: (host + done) as u64,
                len: (len - done) as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        let r = ioctl(uffd, UFFDIO_ZEROPAGE, &mut z);
        (r, usize::try_from(z.zeropage).unwrap_or(0))
    })
}

/// Fills `len` bytes of guest RAM (from `gpa`) with `op`, a UFFDIO_COPY or
/// UFFDIO_ZEROPAGE from offset `done` on that returns its result and the
/// bytes it filled. Interrupted (EAGAIN), it goes on after them; a page
/// already there (EEXIST: nothing but the loader fills guest RAM; kept
/// for robustness) is skipped.
fn fill(
    len: usize,
    gpa: u64,
    mut op: impl FnMut(usize) -> (std::io::Result<()>, usize),
) -> Result<(), ChunkError> {
    let mut done = 0usize;
    while done < len {
        match op(done) {
            (Ok(()), _) => done = len,
            (Err(e), filled) => match e.raw_os_error() {
                Some(libc::EAGAIN) => done += filled,
                Some(libc::EEXIST) => done += filled + PAGE as usize,
                _ => {
                    return Err(ChunkError::Install {
                        gpa: gpa + done as u64,
                        reason: e.to_string(),
                    })
                }
            },
        }
    }
    Ok(())
}

/// Wakes whoever waits on the page at `addr` (already filled).
fn wake(uffd: &OwnedFd, addr: usize) {
    let mut r = UffdioRange {
        start: (addr & !(PAGE as usize - 1)) as u64,
        len: PAGE,
    };
    let _ = ioctl(uffd, UFFDIO_WAKE, &mut r);
}

/// The chunks of `ram` that hold saved pages, with their SHA-256.
fn hash_chunks(size: u64, runs: &[MemoryRun], ram: &[(u64, &[u8])]) -> Vec<MemoryChunk> {
    // The chunks runs touch, in order (runs are in address order).
    let mut starts: Vec<(u64, &[u8])> = Vec::new();
    for run in runs {
        let Some((base, data)) = ram
            .iter()
            .find(|(b, d)| run.gpa >= *b && run.gpa + run.len <= *b + d.len() as u64)
        else {
            continue;
        };
        let first = (run.gpa - base) / size;
        let last = (run.gpa + run.len - 1 - base) / size;
        for k in first..=last {
            let at = k * size;
            let gpa = base + at;
            if starts.last().is_some_and(|(g, _)| *g == gpa) {
                continue;
            }
            let end = (at + size).min(data.len() as u64);
            starts.push((gpa, &data[at as usize..end as usize]));
        }
    }
    starts
        .iter()
        .map(|(gpa, bytes)| MemoryChunk {
            gpa: *gpa,
            sha256: hex::encode(Sha256::digest(bytes)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::nonzero_runs;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("abide-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    /// A region of `pages` pages at 1 MiB with a few non-zero pages, its
    /// runs as the writer lays them out, and the memory section's bytes.
    fn sample(pages: usize) -> (Vec<u8>, Vec<MemoryRun>, Vec<u8>) {
        let mut ram = vec![0u8; pages * PAGE as usize];
        for (p, v) in [(0usize, 1u8), (1, 2), (70, 3), (71, 4), (200, 5)] {
            if p < pages {
                ram[p * PAGE as usize + 17] = v;
            }
        }
        let mut runs = Vec::new();
        let mut section = Vec::new();
        for (gpa, range) in nonzero_runs(0x10_0000, &ram) {
            runs.push(MemoryRun {
                gpa,
                len: range.len() as u64,
                offset: section.len() as u64,
            });
            section.extend_from_slice(&ram[range]);
        }
        (ram, runs, section)
    }

    /// The ioctl numbers are linux/userfaultfd.h's: _IOWR/_IOR(0xAA, nr,
    /// the struct).
    #[test]
    fn userfaultfd_abi_numbers() {
        let ioc = |dir: u64, nr: u64, size: usize| -> libc::c_ulong {
            ((dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr) as libc::c_ulong
        };
        assert_eq!(UFFDIO_API, ioc(3, 0x3F, std::mem::size_of::<UffdioApi>()));
        assert_eq!(
            UFFDIO_REGISTER,
            ioc(3, 0x00, std::mem::size_of::<UffdioRegister>())
        );
        assert_eq!(
            UFFDIO_WAKE,
            ioc(2, 0x02, std::mem::size_of::<UffdioRange>())
        );
        assert_eq!(UFFDIO_COPY, ioc(3, 0x03, std::mem::size_of::<UffdioCopy>()));
        assert_eq!(
            UFFDIO_ZEROPAGE,
            ioc(3, 0x04, std::mem::size_of::<UffdioZeropage>())
        );
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }

    #[test]
    fn chunks_cover_exactly_the_saved_pages_and_verify() {
        let (ram, runs, section) = sample(256);
        let size = 64 << 10; // 16 pages
        let chunks = hash_chunks(size, &runs, &[(0x10_0000, &ram)]);
        // Pages 0-1 in chunk 0, 70-71 in chunk 4, 200 in chunk 12.
        let gpas: Vec<u64> = chunks.iter().map(|c| c.gpa).collect();
        assert_eq!(
            gpas,
            [0x10_0000, 0x10_0000 + 4 * size, 0x10_0000 + 12 * size]
        );
        let dir = temp_dir("lazy-plan");
        let path = dir.join("mem");
        // The section at offset 4096 of the file, as in a snapshot.
        let mut file_bytes = vec![0xEEu8; 4096];
        file_bytes.extend_from_slice(&section);
        std::fs::write(&path, &file_bytes).expect("write");
        let file = File::open(&path).expect("open");
        let host = ram.as_ptr() as usize;
        let plan = Plan::new(
            size,
            &chunks,
            &runs,
            &[(0x10_0000, host, ram.len() as u64)],
            4096,
        )
        .expect("plan");
        assert_eq!(plan.chunks(), 3);
        let mut buf = vec![0u8; size as usize];
        for (i, c) in chunks.iter().enumerate() {
            plan.verify(&file, i, &mut buf).expect("verifies");
            let at = (c.gpa - 0x10_0000) as usize;
            assert_eq!(&buf[..], &ram[at..at + size as usize], "chunk {i}");
        }
        // One flipped bit in the file's copy of page 70: chunk 1 fails,
        // named, and the others still verify.
        let mut bad = file_bytes.clone();
        bad[4096 + 2 * PAGE as usize + 17] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        let file = File::open(&path).expect("open");
        let e = plan.verify(&file, 1, &mut buf).expect_err("corrupt");
        assert!(
            matches!(e, ChunkError::Corrupt { index: 1, gpa, .. } if gpa == 0x10_0000 + 4 * size),
            "{e}"
        );
        assert!(
            e.to_string().contains("chunk 1 (guest 0x140000..0x150000)"),
            "{e}"
        );
        plan.verify(&file, 0, &mut buf).expect("chunk 0 untouched");
        // A file cut short: a read error naming the chunk, not a panic.
        std::fs::write(&path, &file_bytes[..4096 + PAGE as usize]).expect("write");
        let file = File::open(&path).expect("open");
        let e = plan.verify(&file, 2, &mut buf).expect_err("short");
        assert!(matches!(e, ChunkError::Read { index: 2, .. }), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn maps_that_do_not_match_their_runs_are_refused() {
        let (ram, runs, _) = sample(256);
        let size = 64 << 10;
        let region = [(0x10_0000u64, ram.as_ptr() as usize, ram.len() as u64)];
        let chunks = hash_chunks(size, &runs, &[(0x10_0000, &ram)]);
        // A saved page whose chunk has no hash.
        let e = Plan::new(size, &chunks[1..], &runs, &region, 0).expect_err("missing");
        assert!(e.contains("has no hash"), "{e}");
        // Out of order, misaligned, outside RAM, bad hex, bad size.
        let mut c = chunks.clone();
        c.swap(0, 1);
        assert!(Plan::new(size, &c, &runs, &region, 0)
            .expect_err("order")
            .contains("out of order"));
        let mut c = chunks.clone();
        c[0].gpa += PAGE;
        assert!(Plan::new(size, &c, &runs, &region, 0)
            .expect_err("align")
            .contains("not aligned"));
        let mut c = chunks.clone();
        c[2].gpa = 0x4000_0000;
        assert!(Plan::new(size, &c, &runs, &region, 0)
            .expect_err("outside")
            .contains("outside guest RAM"));
        let mut c = chunks.clone();
        c[0].sha256 = "zz".into();
        assert!(Plan::new(size, &c, &runs, &region, 0)
            .expect_err("hex")
            .contains("bad SHA-256"));
        assert!(Plan::new(3 << 10, &chunks, &runs, &region, 0)
            .expect_err("size")
            .contains("power of two"));
    }

    /// The loader on real memory: a memfd mapping registered with a
    /// userfaultfd, touched by this thread. Faulted chunks come in
    /// verified, zero chunks read as zeros, the rest arrives in the
    /// background; a corrupt chunk is never installed and is reported.
    #[test]
    fn the_loader_fills_guest_memory_on_touch_and_in_the_background() {
        let pages = 512usize;
        let (ram, runs, section) = sample(pages);
        let size = 64 << 10;
        let chunks = hash_chunks(size, &runs, &[(0x10_0000, &ram)]);
        let dir = temp_dir("lazy-loader");
        let path = dir.join("mem");
        std::fs::write(&path, &section).expect("write");
        let len = pages * PAGE as usize;
        let map = || {
            // SAFETY: a fresh anonymous shared mapping (shmem, like the
            // guest's memfd), unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as usize
        };
        let host = map();
        let region = [(0x10_0000u64, host, len as u64)];
        let plan = Plan::new(size, &chunks, &runs, &region, 0).expect("plan");
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = failed.clone();
        let lazy = match LazyMemory::start(
            plan,
            File::open(&path).expect("open"),
            Box::new(move || f2.store(true, std::sync::atomic::Ordering::SeqCst)),
            false,
        ) {
            Ok(l) => l,
            Err((e, _)) => panic!("no userfaultfd here (run as root): {e}"),
        };
        // SAFETY: the mapping is live and `len` bytes long.
        let mem = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        // A page in a zero chunk, then saved pages, in reverse order.
        assert_eq!(mem[300 * PAGE as usize + 17], 0);
        for p in [200usize, 71, 70, 1, 0] {
            assert_eq!(mem[p * PAGE as usize + 17], ram[p * PAGE as usize + 17]);
        }
        lazy.wait_loaded().expect("every chunk verified");
        assert_eq!(mem, &ram[..]);
        assert!(!failed.load(std::sync::atomic::Ordering::SeqCst));
        drop(lazy);

        // Corrupt page 200 (chunk 2) in the file: the loader reports chunk
        // 2 and calls for the VM's end; chunks 0 and 1 still come in.
        let mut bad = section.clone();
        let at = runs
            .iter()
            .find(|r| r.gpa == 0x10_0000 + 200 * PAGE)
            .expect("run")
            .offset;
        bad[at as usize + 17] ^= 0x80;
        std::fs::write(&path, &bad).expect("write");
        let host2 = map();
        let region = [(0x10_0000u64, host2, len as u64)];
        let plan = Plan::new(size, &chunks, &runs, &region, 0).expect("plan");
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = failed.clone();
        let lazy = LazyMemory::start(
            plan,
            File::open(&path).expect("open"),
            Box::new(move || f2.store(true, std::sync::atomic::Ordering::SeqCst)),
            false,
        )
        .map_err(|(e, _)| e)
        .expect("userfaultfd");
        let e = lazy.wait_loaded().expect_err("corrupt chunk");
        assert!(matches!(e, ChunkError::Corrupt { index: 2, .. }), "{e}");
        // The failure is recorded first, then the VM's end is asked for.
        let t = Instant::now();
        while !failed.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                t.elapsed().as_secs() < 1,
                "the loader never asked for the VM's end"
            );
            std::thread::yield_now();
        }
        assert_eq!(lazy.failure().map(|f| f.to_string()), Some(e.to_string()));
        // SAFETY: as above.
        let mem2 = unsafe { std::slice::from_raw_parts(host2 as *const u8, len) };
        assert_eq!(mem2[70 * PAGE as usize + 17], ram[70 * PAGE as usize + 17]);
        drop(lazy);
        // SAFETY: unmapping the test's own mappings, no longer used.
        unsafe {
            libc::munmap(host as *mut libc::c_void, len);
            libc::munmap(host2 as *mut libc::c_void, len);
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn eager_loading_verifies_and_copies_every_chunk() {
        let (ram, runs, section) = sample(256);
        let size = 64 << 10;
        let chunks = hash_chunks(size, &runs, &[(0x10_0000, &ram)]);
        let dir = temp_dir("lazy-eager");
        let path = dir.join("mem");
        std::fs::write(&path, &section).expect("write");
        let mut guest = vec![0u8; ram.len()];
        let region = [(
            0x10_0000u64,
            guest.as_mut_ptr() as usize,
            guest.len() as u64,
        )];
        let plan = Plan::new(size, &chunks, &runs, &region, 0).expect("plan");
        eager(&plan, &File::open(&path).expect("open")).expect("eager");
        assert_eq!(guest, ram);
        let mut bad = section.clone();
        bad[17] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        let e = eager(&plan, &File::open(&path).expect("open")).expect_err("corrupt");
        assert!(matches!(e, ChunkError::Corrupt { index: 0, .. }), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
