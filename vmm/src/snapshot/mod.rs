//! Snapshots: pause, save, and restore in a new process, possibly a newer
//! Abide, guarded by the guest ABI manifest.
//!
//! Saving writes one file ([`format`]): the header carries the machine
//! type, the full guest ABI manifest and the VM configuration; sections
//! hold the in-kernel irqchip/PIT/clock (`vm`), each vCPU (`vcpu.N`), each
//! legacy device (`device.KIND`), each PCI function (`pci.00:SS.0`), and
//! guest memory (`memory.map` plus the page-aligned `memory` pages, zero
//! pages left out).
//!
//! Restoring first verifies every checksum and section version, then
//! rebuilds the manifest this Abide would give the saved configuration and
//! refuses on any difference, before any guest state is loaded. Guest
//! memory comes in one of two ways:
//!
//! - With a `memory.chunks` section (optional, written since 0.4: a
//!   SHA-256 per 256 KiB chunk of guest RAM), [`lazy`] verifies each chunk
//!   when it is first touched (or in the background, soon after), before
//!   the guest or a device can see any of its bytes. Releases before it
//!   skip the section and verify the `memory` section whole, as before.
//! - Without it (snapshots of 0.2.0 and 0.3.0): the whole section is
//!   hashed up front, then mapped privately from the file, read lazily as
//!   the guest touches it.

pub mod format;
pub mod lazy;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{SerialConfig, VmConfig};
use crate::devices_config::NetBackend;
use crate::manifest::{Difference, HostConfig};
use crate::vcpu::state::{VCPU_VERSION, VM_VERSION};
use crate::vcpu::Vcpus;
use crate::vm::{Start, Vm};
use crate::Error;
use format::{MemoryRun, Snapshot, SnapshotError, Writer, PAGE};

/// Version of the `memory.map` and `memory` sections.
const MEMORY_VERSION: u32 = 1;

/// The optional section with a SHA-256 per chunk of guest memory
/// ([`lazy::MemoryChunks`]), and its version.
const CHUNKS: &str = "memory.chunks";
const CHUNKS_VERSION: u32 = 1;

/// Sections verified chunk by chunk, when the snapshot has the section of
/// their chunk hashes, instead of whole.
const CHUNKED: &[(&str, &str)] = &[("memory", CHUNKS)];

/// Newest version of each section this build reads (prefixes end in '.').
/// PCI functions check their own kind's version when restored.
pub const KNOWN_SECTIONS: &[(&str, u32)] = &[
    ("vm", VM_VERSION),
    ("vcpu.", VCPU_VERSION),
    ("device.", 1),
    ("pci.", 1),
    ("memory.map", MEMORY_VERSION),
    ("memory", MEMORY_VERSION),
    (CHUNKS, CHUNKS_VERSION),
    (state::ROM_PREFIX, state::ROM_VERSION),
];

/// The configuration part of the header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedHost {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// Its host-side settings, as `abide manifest` shows them.
    pub host: HostConfig,
}

/// Where guest memory lies in the `memory` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMap {
    /// RAM regions (guest address, size) the memory came from.
    pub regions: Vec<(u64, u64)>,
    /// Runs of non-zero pages.
    pub runs: Vec<MemoryRun>,
}

/// What a save did.
#[derive(Clone, Debug)]
pub struct SaveReport {
    /// File size.
    pub bytes: u64,
    /// Guest memory stored (non-zero pages).
    pub memory_bytes: u64,
    /// Time to pause vCPUs and devices.
    pub pause_ms: f64,
    /// Time to gather state and write the file.
    pub save_ms: f64,
    /// Sections written in a version newer than 1, and why.
    pub notes: Vec<String>,
}

/// Errors specific to snapshots.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file itself.
    #[error(transparent)]
    File(#[from] SnapshotError),
    /// Reading or verifying the file.
    #[error("cannot restore '{}'", path.display())]
    Read {
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: SnapshotError,
    },
    /// Writing the file.
    #[error("cannot write the snapshot '{}'", path.display())]
    Write {
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: SnapshotError,
    },
    /// The guest ABI this Abide would give differs from the saved one.
    #[error("the snapshot's guest ABI differs from what this Abide ({}) gives machine '{machine}' with the saved configuration; refusing to restore. Differences (saved -> here):\n{}", env!("CARGO_PKG_VERSION"), format_diff(.diffs))]
    AbiMismatch {
        /// Machine type.
        machine: String,
        /// Field-by-field differences.
        diffs: Vec<Difference>,
    },
    /// A host-side override that does not apply.
    #[error("{0}")]
    Override(String),
    /// KVM state.
    #[error("cannot load saved state")]
    State(#[from] crate::vcpu::state::StateError),
    /// Device state.
    #[error("cannot load saved device state")]
    Device(#[from] abide_devices::persist::PersistError),
    /// A section nobody claimed.
    #[error("snapshot section '{0}' belongs to no device of this VM")]
    Unclaimed(String),
    /// Section contents.
    #[error("snapshot section '{name}' does not parse: {reason}")]
    Malformed {
        /// Section.
        name: String,
        /// Why.
        reason: String,
    },
    /// Mapping memory.
    #[error("cannot map guest memory from the snapshot")]
    Map(#[source] std::io::Error),
    /// A chunk of guest memory failed verification (or could not be read
    /// or installed) after the restored VM started.
    #[error(transparent)]
    Chunk(#[from] lazy::ChunkError),
    /// The target release cannot read what this guest's state needs.
    #[error("cannot write a snapshot that Abide {target} restores: {source}")]
    Target {
        /// Target release.
        target: String,
        /// Which section, and why.
        #[source]
        source: crate::compat::CompatError,
    },
}

impl state::SectionSource for Snapshot {
    fn section(&self, name: &str) -> Result<(u32, Vec<u8>), SnapshotError> {
        Snapshot::section(self, name)
    }

    fn names(&self) -> Vec<String> {
        self.sections().map(str::to_string).collect()
    }
}

/// The field differences, one per line, indented.
pub fn format_diff(diffs: &[Difference]) -> String {
    diffs
        .iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Host-side settings that may change at restore (or when receiving a
/// migration) without the guest noticing.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// COM1 sink.
    pub serial: Option<SerialConfig>,
    /// New image path for the disk at a PCI slot.
    pub disk_paths: Vec<(u8, PathBuf)>,
    /// New tap (by name or as an inherited fd) for the NIC at a PCI slot.
    pub taps: Vec<(u8, NetBackend)>,
}

/// Host views of guest RAM regions. Only valid while vCPUs and devices are
/// paused (nothing writes guest memory meanwhile).
fn ram_slices(vm: &Vm) -> Vec<(u64, &[u8])> {
    vm.ram
        .mem
        .iter()
        .filter_map(|r| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            // SAFETY: the region is a live mapping of `len` bytes owned by
            // the VM's memory, which outlives the returned slices (they
            // borrow `vm`); the caller has paused every writer.
            let s = unsafe { std::slice::from_raw_parts(host as *const u8, r.len() as usize) };
            Some((r.start_addr().0, s))
        })
        .collect()
}

/// How to save.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Write only what this release reads (`--target-version`), or refuse
    /// before pausing the guest.
    pub target_version: Option<String>,
    /// Leave the guest paused after the save (`abide snapshot --stop`).
    pub stay_paused: bool,
}

/// The sections a snapshot of `vm` would hold, with their versions.
fn plan(vm: &Vm) -> Vec<crate::compat::Planned> {
    let mut p = state::plan(vm);
    for name in ["memory.map", "memory"] {
        p.push(crate::compat::Planned {
            name: name.into(),
            version: MEMORY_VERSION,
            optional: false,
            why: None,
        });
    }
    p.push(crate::compat::Planned {
        name: CHUNKS.into(),
        version: CHUNKS_VERSION,
        optional: true,
        why: Some("a SHA-256 per chunk of guest memory, so that restore verifies each chunk when it is first needed".into()),
    });
    p
}

/// Pauses `vm` (if it runs), writes a snapshot to `path`, and resumes it
/// if it was running (unless `o.stay_paused`). With a target release, a
/// guest whose state that release cannot read is refused before it is
/// paused, naming the section and why.
pub fn save(vm: &Vm, vcpus: &mut Vcpus, path: &Path, o: &SaveOptions) -> Result<SaveReport, Error> {
    let target_err = |target: &str, source| {
        Error::Snapshot(RestoreError::Target {
            target: target.to_string(),
            source,
        })
    };
    let target = match &o.target_version {
        Some(t) => {
            let reads = crate::compat::Reads::snapshot_target(t).map_err(|e| target_err(t, e))?;
            crate::compat::check_guest(&vm.machine.name, vm.cfg.firmware.is_some(), &reads)
                .map_err(|e| target_err(t, e))?;
            crate::compat::check(&plan(vm), &reads).map_err(|e| target_err(t, e))?;
            Some(reads)
        }
        None => None,
    };
    // A restored VM whose memory is still coming in: all of it first (the
    // guest runs meanwhile), or the save would miss what has not arrived.
    if let Some(l) = &vm.lazy {
        l.wait_loaded()
            .map_err(|e| Error::Snapshot(RestoreError::Chunk(e)))?;
    }
    let was_paused = vcpus.is_paused();
    let t = Instant::now();
    vm.pause(vcpus)?;
    let pause_ms = crate::api::ms(t);
    let t = Instant::now();
    let result = write(vm, vcpus, path, target.as_ref());
    let save_ms = crate::api::ms(t);
    if !was_paused && !o.stay_paused {
        vm.resume(vcpus)?;
    }
    let (bytes, memory_bytes, notes) = result?;
    Ok(SaveReport {
        bytes,
        memory_bytes,
        pause_ms,
        save_ms,
        notes,
    })
}

fn write(
    vm: &Vm,
    vcpus: &Vcpus,
    path: &Path,
    target: Option<&crate::compat::Reads>,
) -> Result<(u64, u64, Vec<String>), Error> {
    let (manifest, host) = state::header_parts(vm)?;
    let mut w = Writer::new(&vm.machine.name, manifest, host);
    let mut sections = state::collect(vm, vcpus)?;
    sections.extend(state::images(vm));
    // What was gathered, as written (the state may have changed since the
    // check before the pause).
    let planned = plan(vm);
    let mut written = crate::compat::written(&sections, &planned);
    written.extend(planned.into_iter().filter(|p| p.name.starts_with("memory")));
    if let Some(reads) = target {
        crate::compat::check(&written, reads).map_err(|source| {
            Error::Snapshot(RestoreError::Target {
                target: reads.abide_version.clone(),
                source,
            })
        })?;
    }
    let notes = crate::compat::notes(&written);
    for st in sections {
        w.section(&st.name, st.version, st.optional, st.bytes);
    }
    let slices = ram_slices(vm);
    let mut map = MemoryMap {
        regions: slices.iter().map(|(a, s)| (*a, s.len() as u64)).collect(),
        runs: Vec::new(),
    };
    let mut pages = Vec::new();
    let mut offset = 0u64;
    for (gpa, len) in vm.ram.populated() {
        // Populated ranges lie inside one region each (they are clipped to
        // regions, and regions do not touch).
        let Some((base, data)) = slices
            .iter()
            .find(|(b, d)| gpa >= *b && gpa + len <= *b + d.len() as u64)
        else {
            continue;
        };
        let at = (gpa - base) as usize;
        let part = &data[at..at + len as usize];
        for (run_gpa, range) in format::nonzero_runs(gpa, part) {
            let run_len = range.len() as u64;
            map.runs.push(MemoryRun {
                gpa: run_gpa,
                len: run_len,
                offset,
            });
            pages.push(&part[range]);
            offset += run_len;
        }
    }
    let runs = map.runs.clone();
    let map = serde_json::to_vec(&map).map_err(Error::Json)?;
    w.section("memory.map", MEMORY_VERSION, false, map);
    // The section's own SHA-256 (what releases before the chunks read) on
    // this thread, the chunks' on another: two passes over the same
    // memory, side by side.
    let chunks = std::thread::scope(|s| {
        let chunks = s.spawn(|| lazy::MemoryChunks::hash(lazy::CHUNK_SIZE, &runs, &slices));
        w.pages("memory", MEMORY_VERSION, pages);
        chunks.join()
    })
    .map_err(|_| Error::Thread(std::io::Error::other("hashing memory chunks failed")))?;
    let chunks = serde_json::to_vec(&chunks).map_err(Error::Json)?;
    w.section(CHUNKS, CHUNKS_VERSION, true, chunks);
    let bytes = w.write_to(path).map_err(|source| {
        Error::Snapshot(RestoreError::Write {
            path: path.to_path_buf(),
            source,
        })
    })?;
    Ok((bytes, offset, notes))
}

/// Compares the saved manifest with the one this build gives `cfg`, in
/// one canonical form (both serialized by this build's manifest schema).
pub fn check_abi(saved: &serde_json::Value, here: &crate::manifest::Manifest) -> Vec<Difference> {
    match serde_json::to_value(here) {
        Ok(now) => crate::manifest::diff_values(saved, &now),
        Err(e) => vec![Difference {
            path: String::new(),
            left: None,
            right: Some(format!("(unserializable: {e})")),
            words: None,
        }],
    }
}

/// Timings of a restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    /// Reading and verifying the file.
    pub verify_ms: f64,
    /// Rebuilding and comparing the manifest.
    pub abi_ms: f64,
    /// Building the VM and loading state (memory mapped, not copied).
    pub load_ms: f64,
    /// How guest memory comes in: `mapped` (no chunk hashes: verified
    /// whole, then mapped from the file), `lazy` (verified per chunk on
    /// first touch and in the background), `eager` (chunk hashes but no
    /// userfaultfd: every chunk verified and copied before the start).
    pub memory: &'static str,
    /// Part of `load_ms` spent on memory (eager: verifying and copying).
    pub memory_ms: f64,
    /// Why memory with chunk hashes was loaded eagerly.
    pub memory_note: Option<String>,
    /// Part of `load_ms` spent waiting for KVM to finish registering the
    /// memory slots (begun when the VM was built).
    pub slots_ms: f64,
}

/// Builds a VM from the snapshot at `path`, ready to [`Vm::run`].
pub fn restore(path: &Path, o: &Overrides) -> Result<(Vm, RestoreReport), Error> {
    let snap_err = |e: RestoreError| Error::Snapshot(e);
    let mut report = RestoreReport::default();
    let t = Instant::now();
    let snap = Snapshot::open_chunked(path, KNOWN_SECTIONS, CHUNKED).map_err(|source| {
        snap_err(RestoreError::Read {
            path: path.to_path_buf(),
            source,
        })
    })?;
    report.verify_ms = crate::api::ms(t);
    // KVM's VM, in-kernel devices and RAM for the saved machine type and
    // size, made on another thread while the ABI is checked (a refusal
    // drops them): each costs KVM a grace period, milliseconds on a busy
    // host.
    let early = serde_json::from_value::<SavedHost>(snap.header.host.clone())
        .ok()
        .and_then(|saved| {
            let machine = abide_machines::resolve(&saved.config.machine).ok()?;
            Some(crate::vm::Early::start_in_background(
                machine,
                saved.config.memory,
            ))
        });
    let t = Instant::now();
    let roms = state::saved_roms(&snap).map_err(snap_err)?;
    let (cfg, diffs) = state::config_for(&snap.header, o, &roms)?;
    if !diffs.is_empty() {
        return Err(snap_err(RestoreError::AbiMismatch {
            machine: snap.header.machine.clone(),
            diffs,
        }));
    }
    report.abi_ms = crate::api::ms(t);
    let t = Instant::now();
    let machine = abide_machines::resolve(&cfg.machine)?;
    let early = early.and_then(|t| t.join().ok().flatten());
    let mut vm = Vm::build_from(machine, &cfg, Start::Restore, early)?;
    let t_mem = Instant::now();
    load_memory(&mut vm, &snap, &mut report).map_err(snap_err)?;
    report.memory_ms = crate::api::ms(t_mem);
    state::load(&mut vm, &snap, &["memory.map", "memory", CHUNKS]).map_err(snap_err)?;
    // KVM registered the memory slots meanwhile (state loading needs none:
    // a vCPU's clock page is looked up again when it first runs).
    let t_slots = Instant::now();
    vm.await_slots()?;
    report.slots_ms = crate::api::ms(t_slots);
    report.load_ms = crate::api::ms(t);
    Ok((vm, report))
}

fn load_memory(
    vm: &mut Vm,
    snap: &Snapshot,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let (_, bytes) = snap.section("memory.map")?;
    let map: MemoryMap = serde_json::from_slice(&bytes).map_err(|e| RestoreError::Malformed {
        name: "memory.map".into(),
        reason: e.to_string(),
    })?;
    let bad = |reason: String| RestoreError::Malformed {
        name: "memory.map".into(),
        reason,
    };
    let here: Vec<(u64, u64)> = vm
        .ram
        .mem
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    if here != map.regions {
        return Err(bad(format!(
            "saved RAM regions {:x?} differ from this VM's {here:x?}",
            map.regions
        )));
    }
    // Restore always reads from a file; only unit tests parse from memory.
    let (_, file, section_offset, total) = snap
        .mapped("memory")?
        .ok_or_else(|| bad("the memory section is not backed by a file".into()))?;
    // Check every run before the first page is mapped.
    let mut end = 0u64;
    let mut targets = Vec::with_capacity(map.runs.len());
    for run in &map.runs {
        if run.len % PAGE != 0 || run.gpa % PAGE != 0 || run.offset != end {
            return Err(bad(format!("run {run:?} is not page-aligned and in order")));
        }
        end = run.offset + run.len;
        let region = vm
            .ram
            .mem
            .find_region(GuestAddress(run.gpa))
            .filter(|r| run.gpa + run.len <= r.start_addr().0 + r.len())
            .ok_or_else(|| bad(format!("run {run:?} is outside guest RAM")))?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(
                run.gpa - region.start_addr().0,
            ))
            .map_err(|e| bad(e.to_string()))?;
        targets.push((host, run));
    }
    if end != total {
        return Err(bad(format!(
            "runs cover {end} bytes but the memory section has {total}"
        )));
    }
    if snap.sections().any(|s| s == CHUNKS) {
        let (_, bytes) = snap.section(CHUNKS)?;
        let chunks: lazy::MemoryChunks =
            serde_json::from_slice(&bytes).map_err(|e| RestoreError::Malformed {
                name: CHUNKS.into(),
                reason: e.to_string(),
            })?;
        return load_chunked(vm, &map, &chunks, file, section_offset, report);
    }
    report.memory = "mapped";
    for (host, run) in targets {
        use std::os::fd::AsRawFd;
        // SAFETY: `host..host+len` lies inside a mapping owned by the VM's
        // memory (checked above), no vCPU runs yet, and MAP_FIXED replaces
        // those pages with a private, copy-on-write view of the file: the
        // guest reads pages lazily and its writes never reach the snapshot.
        let r = unsafe {
            libc::mmap(
                host.cast(),
                run.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                (section_offset + run.offset) as libc::off_t,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(RestoreError::Map(std::io::Error::last_os_error()));
        }
    }
    vm.ram
        .file_mapped
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(map.runs.iter().map(|r| (r.gpa, r.len)));
    Ok(())
}

/// Memory with chunk hashes: plans where every chunk comes from (checked
/// against the runs), then loads memory lazily through a userfaultfd, or
/// eagerly where none can be had.
fn load_chunked(
    vm: &mut Vm,
    map: &MemoryMap,
    chunks: &lazy::MemoryChunks,
    file: &std::fs::File,
    section_offset: u64,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let bad = |reason: String| RestoreError::Malformed {
        name: CHUNKS.into(),
        reason,
    };
    let mut regions = Vec::new();
    for r in vm.ram.mem.iter() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| bad(e.to_string()))?;
        regions.push((r.start_addr().0, host as usize, r.len()));
    }
    let plan = lazy::Plan::new(
        chunks.chunk_size,
        &chunks.chunks,
        &map.runs,
        &regions,
        section_offset,
    )
    .map_err(bad)?;
    if plan.chunks() == 0 {
        report.memory = "lazy";
        return Ok(());
    }
    // Every page of guest RAM must be missing when loading starts: a page
    // already there would keep its bytes instead of the snapshot's (a
    // restored VM's build writes none; this makes sure).
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on the memfd the VM owns, within its size; no
        // memory is passed, and no vCPU or device runs yet.
        let r = unsafe {
            libc::fallocate(
                vm.ram.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                vm.ram.size as libc::off_t,
            )
        };
        if r < 0 {
            return Err(RestoreError::Map(std::io::Error::last_os_error()));
        }
    }
    let mut plan = plan;
    let why = if std::env::var_os("ABIDE_RESTORE_EAGER").is_some() {
        "ABIDE_RESTORE_EAGER is set".to_string()
    } else {
        let exit = vm.exit.clone();
        match lazy::LazyMemory::start(
            plan,
            file.try_clone().map_err(RestoreError::Map)?,
            Box::new(move || exit.request(abide_devices::ExitReason::Poweroff)),
            std::env::var_os("ABIDE_RESTORE_TIMINGS").is_some(),
        ) {
            Ok(l) => {
                vm.lazy = Some(l);
                report.memory = "lazy";
                return Ok(());
            }
            Err((e, p)) => {
                plan = p;
                format!("no userfaultfd: {e}")
            }
        }
    };
    lazy::eager(&plan, file)?;
    report.memory = "eager";
    report.memory_note = Some(why);
    Ok(())
}
