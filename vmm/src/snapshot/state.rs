//! The guest state outside memory, as versioned sections: what a snapshot
//! file and a migration stream both carry, gathered and loaded by one piece
//! of code.
//!
//! [`collect`] reads a paused VM: the in-kernel irqchip/PIT/clock (`vm`),
//! each vCPU (`vcpu.N`), each legacy device (`device.KIND`) and each PCI
//! function (`pci.00:SS.0`, with its MSI-X table, virtio transport and
//! queue positions). [`load`] puts such sections into a VM built with
//! `Start::Restore` whose memory is already in place: one path for boot and
//! restore, build first, then load state. [`config_for`] turns a saved
//! header back into the configuration to build, and compares the guest ABI
//! this Abide would give it with the saved one.
//!
//! Each section is written in the oldest version that holds its state;
//! [`plan`] says, while the guest still runs, which versions that will be
//! and why any is newer than 1, so that a target release that cannot read
//! them is refused before the guest is paused (`crate::compat`).
//!
//! Option ROM images travel with the guest in optional `rom.00:SS.0`
//! sections ([`images`]): older readers skip them, this one serves the
//! saved image instead of the host file's ([`saved_roms`], [`load`]). The
//! firmware image of a `--firmware` guest is one more such image, in
//! `rom.firmware` ([`RomKey::Firmware`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use abide_devices::persist::{Needed, Persist};

use super::format::{Header, SnapshotError};
use super::{Overrides, RestoreError, SavedHost};
use crate::compat::Planned;
use crate::config::VmConfig;
use crate::devices_config::NetBackend;
use crate::manifest::Difference;
use crate::vcpu::state::{VcpuState, VmState, VCPU_VERSION, VM_VERSION};
use crate::vcpu::Vcpus;
use crate::vm::Vm;
use crate::Error;

/// One section of guest state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSection {
    /// Name (`vm`, `vcpu.0`, `device.uart-16550`, `pci.00:01.0`, ...).
    pub name: String,
    /// Version of its layout.
    pub version: u32,
    /// Whether a reader that does not know it may skip it.
    pub optional: bool,
    /// Serialized state.
    pub bytes: Vec<u8>,
}

/// Where [`load`] reads sections from: a verified snapshot file or the
/// sections a migration stream delivered (each already checked against
/// its checksum and this build's known versions).
pub trait SectionSource {
    /// A section's version and payload.
    fn section(&self, name: &str) -> Result<(u32, Vec<u8>), SnapshotError>;
    /// The names of every section the reader accepted.
    fn names(&self) -> Vec<String>;
}

/// Most sections a migration stream may deliver: a VM has a few per vCPU
/// and per PCI function (names like `vcpu.N` are open-ended, so the count
/// needs its own bound).
/// The section of a firmware guest's fw_cfg registers.
const FW_CFG_SECTION: &str = "device.fw_cfg";

pub const MAX_SECTIONS: usize = 4096;
/// Most bytes of state sections a migration stream may deliver in all
/// (each frame is bounded on its own; this bounds their sum). The state of
/// a VM, option ROMs included, is a few MiB.
pub const MAX_SECTION_BYTES: usize = 256 << 20;

/// Sections held in memory, by name.
#[derive(Debug, Default)]
pub struct Sections(BTreeMap<String, (u32, Vec<u8>)>, usize);

impl Sections {
    /// Adds a section; a name given twice is an error, and so is one past
    /// [`MAX_SECTIONS`] or [`MAX_SECTION_BYTES`].
    pub fn insert(
        &mut self,
        name: &str,
        version: u32,
        bytes: Vec<u8>,
    ) -> Result<(), SnapshotError> {
        if self.0.len() >= MAX_SECTIONS {
            return Err(SnapshotError::Header(format!(
                "more than {MAX_SECTIONS} state sections (at '{name}')"
            )));
        }
        let total = self.1.saturating_add(bytes.len());
        if total > MAX_SECTION_BYTES {
            return Err(SnapshotError::Header(format!(
                "state sections of more than {MAX_SECTION_BYTES} bytes in all (at '{name}')"
            )));
        }
        self.1 = total;
        if self.0.insert(name.to_string(), (version, bytes)).is_some() {
            return Err(SnapshotError::Header(format!(
                "section '{name}' appears twice"
            )));
        }
        Ok(())
    }
}

impl SectionSource for Sections {
    fn section(&self, name: &str) -> Result<(u32, Vec<u8>), SnapshotError> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| SnapshotError::MissingSection(name.to_string()))
    }

    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Plain data structures always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The section name of the PCI function at `slot` of bus 0.
pub fn bdf(slot: u8) -> String {
    format!("pci.00:{slot:02x}.0")
}

/// Prefix of the optional sections that carry option ROM images.
pub const ROM_PREFIX: &str = "rom.";
/// Version of the `rom.*` sections (raw image bytes).
pub const ROM_VERSION: u32 = 1;

/// The section name of the ROM image of the PCI function at `slot`.
pub fn rom_section(slot: u8) -> String {
    format!("{ROM_PREFIX}00:{slot:02x}.0")
}

/// Name of the section holding a `--firmware` guest's firmware image.
pub const FIRMWARE_SECTION: &str = "rom.firmware";

/// Whose image a `rom.*` section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RomKey {
    /// The option ROM of the PCI function at this slot of bus 0.
    Pci(u8),
    /// The firmware image (`--firmware`).
    Firmware,
}

impl RomKey {
    /// The section name.
    pub fn section(self) -> String {
        match self {
            RomKey::Pci(slot) => rom_section(slot),
            RomKey::Firmware => FIRMWARE_SECTION.to_string(),
        }
    }
}

/// The PCI slot a `rom.00:SS.0` section belongs to.
pub fn rom_slot(name: &str) -> Option<u8> {
    let rest = name.strip_prefix(ROM_PREFIX)?.strip_prefix("00:")?;
    let slot = rest.strip_suffix(".0")?;
    u8::from_str_radix(slot, 16).ok().filter(|s| *s < 32)
}

/// Whose image the `rom.*` section `name` holds.
pub fn rom_key(name: &str) -> Option<RomKey> {
    if name == FIRMWARE_SECTION {
        return Some(RomKey::Firmware);
    }
    rom_slot(name).map(RomKey::Pci)
}

fn kvm_section(name: String, version: u32) -> Planned {
    Planned {
        name,
        version,
        optional: false,
        why: (version > 1).then(|| "the KVM state layout of this build".to_string()),
    }
}

fn planned(name: String, n: Needed) -> Planned {
    Planned {
        name,
        version: n.version,
        optional: false,
        why: n.why,
    }
}

/// The state sections [`collect`] and [`images`] would write now, with
/// their versions, read while the guest runs (nothing is paused).
pub fn plan(vm: &Vm) -> Vec<Planned> {
    let mut out = vec![kvm_section("vm".into(), VM_VERSION)];
    for i in 0..vm.cfg.cpus {
        out.push(kvm_section(format!("vcpu.{i}"), VCPU_VERSION));
    }
    fn legacy<P: Persist>(dev: &Mutex<P>) -> Planned {
        let n = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .oldest_version();
        planned(format!("device.{}", P::KIND), n)
    }
    out.push(legacy(&vm.legacy.serial));
    out.push(legacy(&vm.legacy.i8042));
    out.push(legacy(&vm.legacy.rtc));
    out.push(legacy(&vm.legacy.pm));
    if let Some(f) = &vm.fw_cfg {
        out.push(legacy(f));
    }
    let root = vm.pci.root.lock().unwrap_or_else(|e| e.into_inner());
    for slot in root.slots() {
        let Some(f) = root.function(slot) else {
            continue;
        };
        let f = f.lock().unwrap_or_else(|e| e.into_inner());
        out.push(planned(bdf(slot), f.state_version()));
        if f.rom().is_some() {
            out.push(Planned {
                name: rom_section(slot),
                version: ROM_VERSION,
                optional: true,
                why: Some("the option ROM image the guest booted with".into()),
            });
        }
    }
    if vm.cfg.firmware.as_ref().is_some_and(|f| f.bytes.is_some()) {
        out.push(Planned {
            name: FIRMWARE_SECTION.into(),
            version: ROM_VERSION,
            optional: true,
            why: Some("the firmware image the guest booted with".into()),
        });
    }
    out
}

/// The option ROM images of `vm`'s PCI functions and its firmware image,
/// as optional sections.
pub fn images(vm: &Vm) -> Vec<StateSection> {
    let root = vm.pci.root.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<StateSection> = root
        .slots()
        .into_iter()
        .filter_map(|slot| {
            let f = root.function(slot)?;
            let f = f.lock().unwrap_or_else(|e| e.into_inner());
            Some(StateSection {
                name: rom_section(slot),
                version: ROM_VERSION,
                optional: true,
                bytes: f.rom()?.to_vec(),
            })
        })
        .collect();
    if let Some(bytes) = vm.cfg.firmware.as_ref().and_then(|f| f.bytes.as_ref()) {
        out.push(StateSection {
            name: FIRMWARE_SECTION.into(),
            version: ROM_VERSION,
            optional: true,
            bytes: bytes.to_vec(),
        });
    }
    out
}

/// The saved ROM and firmware images in `src`, by whose they are.
pub fn saved_roms(src: &dyn SectionSource) -> Result<BTreeMap<RomKey, Vec<u8>>, RestoreError> {
    let mut out = BTreeMap::new();
    for name in src.names() {
        if !name.starts_with(ROM_PREFIX) {
            continue;
        }
        let key = rom_key(&name).ok_or_else(|| RestoreError::Malformed {
            name: name.clone(),
            reason: "not a ROM section of a function on bus 0 nor the firmware image".into(),
        })?;
        out.insert(key, src.section(&name)?.1);
    }
    Ok(out)
}

/// Reads the state of a paused VM (vCPUs and device workers stopped),
/// memory excepted.
pub fn collect(vm: &Vm, vcpus: &Vcpus) -> Result<Vec<StateSection>, Error> {
    collect_with(vm, Some(vcpus.save().map_err(snap_err)?))
}

fn snap_err(e: crate::vcpu::state::StateError) -> Error {
    Error::Snapshot(RestoreError::State(e))
}

/// The vCPU states of a VM whose vCPUs it still holds (not handed to
/// their threads).
fn own_vcpu_states(vm: &Vm) -> Result<Vec<VcpuState>, Error> {
    vm.vcpus
        .iter()
        .map(|v| VcpuState::save(&v.fd, &v.msrs))
        .collect::<Result<Vec<_>, _>>()
        .map_err(snap_err)
}

/// [`collect`] with the vCPU states given (`None`: no `vcpu.N` sections).
fn collect_with(vm: &Vm, vcpu_states: Option<Vec<VcpuState>>) -> Result<Vec<StateSection>, Error> {
    let mut out = Vec::new();
    let mut push = |name: String, version: u32, bytes: Vec<u8>| {
        out.push(StateSection {
            name,
            version,
            optional: false,
            bytes,
        })
    };
    push(
        "vm".into(),
        VM_VERSION,
        json(&VmState::save(&vm.vm).map_err(snap_err)?),
    );
    for (i, st) in vcpu_states.iter().flatten().enumerate() {
        push(format!("vcpu.{i}"), VCPU_VERSION, json(st));
    }
    fn legacy<P: Persist>(dev: &Mutex<P>) -> (String, u32, Vec<u8>) {
        let (v, bytes) = dev.lock().unwrap_or_else(|e| e.into_inner()).save_section();
        (format!("device.{}", P::KIND), v, bytes)
    }
    for (name, v, bytes) in [
        legacy(&vm.legacy.serial),
        legacy(&vm.legacy.i8042),
        legacy(&vm.legacy.rtc),
        legacy(&vm.legacy.pm),
    ]
    .into_iter()
    .chain(vm.fw_cfg.as_deref().map(legacy))
    {
        push(name, v, bytes);
    }
    let root = vm.pci.root.lock().unwrap_or_else(|e| e.into_inner());
    for slot in root.slots() {
        let Some(f) = root.function(slot) else {
            continue;
        };
        let (v, bytes) = f
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_state()
            .map_err(|e| Error::Snapshot(RestoreError::Device(e)))?;
        push(bdf(slot), v, bytes);
    }
    Ok(out)
}

/// Runs [`collect`]'s code once on a running VM, vCPUs left out, and
/// throws the result away: the source calls it just before pausing the
/// guest, so that the pause does not pay for the first run of that code
/// (page faults on the binary's text and data; in the nested test host
/// also QEMU TCG translating it, which made up most of the pause: see
/// docs/benchmarks.md). Reading device registers of a running guest is
/// harmless: each device is locked while it is read.
pub fn rehearse_collect(vm: &Vm) {
    let _ = collect_with(vm, None);
}

/// Runs the load path once on `vm`'s own state before anything is
/// loaded into it: `vm` is built with `Start::Restore` and has never run,
/// so saving its state and loading it back changes nothing, and the
/// real load overwrites every part of it. The destination of a migration
/// calls it before pre-copy so that the pause does not pay for the first
/// run of the load code (see [`rehearse_collect`]).
pub fn rehearse_load(vm: &mut Vm) -> Result<(), Error> {
    let states = own_vcpu_states(vm)?;
    let mut sections = Sections::default();
    for s in collect_with(vm, Some(states))? {
        sections
            .insert(&s.name, s.version, s.bytes)
            .map_err(|e| Error::Snapshot(RestoreError::File(e)))?;
    }
    load_timed(vm, &sections, &[], &mut LoadTimes::default()).map_err(Error::Snapshot)?;
    vm.restored = false;
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(
    src: &dyn SectionSource,
    name: &str,
) -> Result<T, RestoreError> {
    let (_, bytes) = src.section(name)?;
    serde_json::from_slice(&bytes).map_err(|e| RestoreError::Malformed {
        name: name.into(),
        reason: e.to_string(),
    })
}

/// Loads the state sections of `src` into `vm`, built with
/// `Start::Restore` and with guest memory already in place. Every section
/// must be claimed, by this VM or by the caller (`claimed`, e.g. the
/// memory sections of a snapshot file).
pub fn load(vm: &mut Vm, src: &dyn SectionSource, claimed: &[&str]) -> Result<(), RestoreError> {
    load_timed(vm, src, claimed, &mut LoadTimes::default())
}

/// How long each part of [`load`] took, in milliseconds (a migration's
/// destination reports them: they are part of the guest's downtime).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LoadTimes {
    /// Parsing and checking the VM and vCPU sections.
    pub parse_ms: f64,
    /// The legacy devices and the option ROM images.
    pub legacy_ms: f64,
    /// The PCI functions (virtio devices, MSI-X routes) and their BARs.
    pub pci_ms: f64,
    /// The interrupt controllers and the clock.
    pub irqchip_ms: f64,
    /// The vCPUs.
    pub vcpus_ms: f64,
}

/// [`load`], timing its parts into `times`.
pub fn load_timed(
    vm: &mut Vm,
    src: &dyn SectionSource,
    claimed: &[&str],
    times: &mut LoadTimes,
) -> Result<(), RestoreError> {
    let mut t = std::time::Instant::now();
    let mut lap = |slot: &mut f64| {
        *slot = crate::api::ms(t);
        t = std::time::Instant::now();
    };
    let mut claimed: Vec<String> = claimed.iter().map(|s| s.to_string()).collect();
    // Parse everything KVM gets before touching KVM or devices.
    let vm_state: VmState = parse(src, "vm")?;
    vm_state.check()?;
    claimed.push("vm".into());
    let mut vcpu_states = Vec::new();
    for v in &vm.vcpus {
        let name = format!("vcpu.{}", v.index);
        let st: VcpuState = parse(src, &name)?;
        st.check()?;
        vcpu_states.push(st);
        claimed.push(name);
    }
    lap(&mut times.parse_ms);

    fn legacy<P: Persist>(
        src: &dyn SectionSource,
        dev: &Mutex<P>,
        claimed: &mut Vec<String>,
    ) -> Result<(), RestoreError> {
        let name = format!("device.{}", P::KIND);
        let (v, bytes) = src.section(&name)?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_section(v, &bytes)?;
        claimed.push(name);
        Ok(())
    }
    legacy(src, &vm.legacy.serial, &mut claimed)?;
    legacy(src, &vm.legacy.i8042, &mut claimed)?;
    legacy(src, &vm.legacy.rtc, &mut claimed)?;
    legacy(src, &vm.legacy.pm, &mut claimed)?;
    // fw_cfg's registers: saved since firmware guests could be saved but
    // one step later, so a stream without them restores its reset state.
    if let Some(f) = &vm.fw_cfg {
        if src.names().iter().any(|n| n == FW_CFG_SECTION) {
            legacy(src, f, &mut claimed)?;
        }
    }
    let mut roms = saved_roms(src)?;
    if let Some(image) = roms.remove(&RomKey::Firmware) {
        // Serve the saved image (a migration built the VM before the
        // images arrived); later snapshots and migrations carry it too.
        vm.set_firmware_image(image)
            .map_err(|reason| RestoreError::Malformed {
                name: FIRMWARE_SECTION.into(),
                reason,
            })?;
        claimed.push(FIRMWARE_SECTION.into());
    }
    {
        let mut root = vm.pci.root.lock().unwrap_or_else(|e| e.into_inner());
        for (key, image) in roms {
            let RomKey::Pci(slot) = key else {
                continue;
            };
            let f = root
                .function(slot)
                .ok_or_else(|| RestoreError::Unclaimed(rom_section(slot)))?;
            f.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_rom(image.clone())
                .map_err(|reason| RestoreError::Malformed {
                    name: rom_section(slot),
                    reason,
                })?;
            // Later snapshots and migrations carry this image too.
            if let Some(n) = vm
                .cfg
                .nets
                .iter_mut()
                .zip(&vm.net_slots)
                .find(|(_, s)| **s == slot)
            {
                n.0.rom_image = Some(std::sync::Arc::new(image));
            }
            claimed.push(rom_section(slot));
        }
        lap(&mut times.legacy_ms);
        for slot in root.slots() {
            let name = bdf(slot);
            let (v, bytes) = src.section(&name)?;
            if let Some(f) = root.function(slot) {
                f.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore_state(v, &bytes)?;
            }
            // Place the BARs where the guest had programmed them.
            root.refresh(slot);
            claimed.push(name);
        }
    }
    lap(&mut times.pci_ms);
    // Interrupt controllers and clock, then the vCPUs (their LAPICs).
    vm_state.load(&vm.vm, vm.clock_flags)?;
    lap(&mut times.irqchip_ms);
    for (v, st) in vm.vcpus.iter().zip(&vcpu_states) {
        st.load(&v.fd)?;
        crate::vcpu::tell_guest_it_was_paused(&v.fd);
    }
    lap(&mut times.vcpus_ms);
    if let Some(extra) = src.names().into_iter().find(|s| !claimed.contains(s)) {
        return Err(RestoreError::Unclaimed(extra));
    }
    vm.restored = true;
    Ok(())
}

/// Applies host-side overrides and the saved ROM images to the saved
/// configuration.
fn apply(
    saved: &SavedHost,
    o: &Overrides,
    roms: &BTreeMap<RomKey, Vec<u8>>,
) -> Result<VmConfig, RestoreError> {
    let mut cfg = saved.config.clone();
    for (key, image) in roms {
        let slot = match key {
            RomKey::Pci(slot) => slot,
            RomKey::Firmware => {
                let f = cfg
                    .firmware
                    .as_mut()
                    .ok_or_else(|| RestoreError::Malformed {
                        name: FIRMWARE_SECTION.into(),
                        reason: "the saved guest was not booted through firmware".into(),
                    })?;
                f.bytes = Some(std::sync::Arc::new(image.clone()));
                continue;
            }
        };
        let n = saved
            .host
            .nets
            .iter()
            .position(|n| n.slot == *slot)
            .and_then(|i| cfg.nets.get_mut(i))
            .filter(|n| n.rom.is_some())
            .ok_or_else(|| RestoreError::Malformed {
                name: rom_section(*slot),
                reason: format!("the saved guest has no option ROM at PCI slot {slot}"),
            })?;
        n.rom_image = Some(std::sync::Arc::new(image.clone()));
    }
    if let Some(s) = &o.serial {
        cfg.serial = s.clone();
    }
    for (slot, path) in &o.disk_paths {
        let i = saved
            .host
            .disks
            .iter()
            .position(|d| d.slot == *slot)
            .filter(|i| *i < cfg.disks.len())
            .ok_or_else(|| {
                RestoreError::Override(format!(
                    "--disk-path {slot}: the saved guest has no disk at PCI slot {slot}"
                ))
            })?;
        cfg.disks[i].path = path.clone();
    }
    let mut given = Vec::new();
    for (slot, backend) in &o.taps {
        let i = saved
            .host
            .nets
            .iter()
            .position(|n| n.slot == *slot)
            .filter(|i| *i < cfg.nets.len())
            .ok_or_else(|| {
                RestoreError::Override(format!(
                    "--tap {slot}: the saved guest has no network card at PCI slot {slot}"
                ))
            })?;
        cfg.nets[i].backend = backend.clone();
        given.push(i);
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        if let (NetBackend::Fd(fd), false) = (&n.backend, given.contains(&i)) {
            let slot = saved.host.nets.get(i).map(|h| h.slot).unwrap_or(0);
            return Err(RestoreError::Override(format!(
                "the network card at PCI slot {slot} used an inherited file descriptor ({fd}) that does not carry over to another process; give --tap {slot}=NAME or --tap {slot}=fd:N"
            )));
        }
    }
    Ok(cfg)
}

/// The configuration to build from a saved header with the host-side
/// overrides `o` and the saved ROM images `roms` (by PCI slot), and how the
/// guest ABI this Abide would give it differs from the saved manifest
/// (empty: identical). Nothing is built yet.
pub fn config_for(
    header: &Header,
    o: &Overrides,
    roms: &BTreeMap<RomKey, Vec<u8>>,
) -> Result<(VmConfig, Vec<Difference>), Error> {
    let saved: SavedHost = serde_json::from_value(header.host.clone()).map_err(|e| {
        Error::Snapshot(RestoreError::File(SnapshotError::Header(format!(
            "host configuration: {e}"
        ))))
    })?;
    let cfg = apply(&saved, o, roms).map_err(Error::Snapshot)?;
    let here = crate::manifest(&cfg)?;
    let diffs = super::check_abi(&header.manifest, &here.abi);
    Ok((cfg, diffs))
}

/// The option ROM image differences in `diffs` (`pci.functions[N].rom.
/// image_*`): a migration source sends its images after the header, so
/// the destination checks them once they arrived ([`check_roms`]).
pub fn is_rom_image_field(d: &Difference) -> bool {
    (d.path.starts_with("pci.functions[")
        && (d.path.ends_with("].rom.image_sha256") || d.path.ends_with("].rom.image_size")))
        || d.path == "firmware.image_sha256"
}

/// Compares the ROM image each PCI function of `vm` serves with the saved
/// manifest's: the image a migrated guest had must be the one it gets.
pub fn check_roms(vm: &Vm, saved_manifest: &serde_json::Value) -> Result<(), RestoreError> {
    let here = vm
        .cfg
        .firmware
        .as_ref()
        .and_then(|f| f.bytes.as_deref())
        .map(|b| crate::manifest::sha256_hex(b));
    let saved = saved_manifest["firmware"]["image_sha256"]
        .as_str()
        .map(str::to_string);
    if here != saved {
        return Err(RestoreError::Malformed {
            name: FIRMWARE_SECTION.into(),
            reason: format!(
                "the firmware image differs from the one the guest had (SHA-256 {} -> {}); the source did not send its image and this host's file is another",
                saved.as_deref().unwrap_or("(none)"),
                here.as_deref().unwrap_or("(none)")
            ),
        });
    }
    let root = vm.pci.root.lock().unwrap_or_else(|e| e.into_inner());
    let functions = saved_manifest["pci"]["functions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for slot in root.slots() {
        let Some(f) = root.function(slot) else {
            continue;
        };
        let here = f
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rom()
            .map(crate::manifest::sha256_hex);
        let bdf = format!("00:{slot:02x}.0");
        let saved = functions
            .iter()
            .find(|f| f["bdf"] == serde_json::json!(bdf))
            .and_then(|f| f["rom"]["image_sha256"].as_str().map(str::to_string));
        if here != saved {
            return Err(RestoreError::Malformed {
                name: rom_section(slot),
                reason: format!(
                    "the option ROM of {bdf} differs from the one the guest had (SHA-256 {} -> {}); the source did not send its image and this host's file is another",
                    saved.as_deref().unwrap_or("(none)"),
                    here.as_deref().unwrap_or("(none)")
                ),
            });
        }
    }
    Ok(())
}

/// The header fields every stored guest starts with: machine type, full
/// guest ABI manifest and configuration of `vm`.
pub fn header_parts(vm: &Vm) -> Result<(serde_json::Value, serde_json::Value), Error> {
    let desc = crate::manifest(&vm.cfg)?;
    let host = SavedHost {
        config: vm.cfg.clone(),
        host: desc.host,
    };
    let manifest = serde_json::to_value(&desc.abi).map_err(Error::Json)?;
    let host = serde_json::to_value(&host).map_err(Error::Json)?;
    Ok((manifest, host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SerialConfig;
    use crate::devices_config::RngConfig;
    use crate::vm::Start;

    /// The destination's rehearsal of the load leaves a never-run VM as
    /// it was: every section but the clock's (`vm`, which moves on) reads
    /// back the same. Needs /dev/kvm, as every VM does.
    #[test]
    fn a_rehearsed_load_changes_no_state() {
        let cfg = VmConfig {
            machine: "pc-1.0".into(),
            memory: 64 << 20,
            cpus: 2,
            serial: SerialConfig::Null,
            rng: Some(RngConfig { addr: None }),
            ..VmConfig::default()
        };
        let machine = abide_machines::resolve(&cfg.machine).expect("machine");
        let mut vm = Vm::build_with(machine, &cfg, Start::Restore).expect("a VM (needs /dev/kvm)");
        let read = |vm: &Vm| {
            let states = own_vcpu_states(vm).expect("vCPU state");
            let mut s = collect_with(vm, Some(states)).expect("state");
            s.retain(|s| s.name != "vm");
            // The clocks run on, in every read: the TSC and the ACPI PM
            // timer.
            for s in s.iter_mut() {
                let mut v: serde_json::Value = serde_json::from_slice(&s.bytes).expect("JSON");
                if s.name.starts_with("vcpu.") {
                    v["msrs"]
                        .as_array_mut()
                        .expect("MSR list")
                        .retain(|m| m[0] != serde_json::json!(0x10));
                } else if s.name == "device.acpi-pm" {
                    v.as_object_mut()
                        .expect("PM state")
                        .remove("timer_ticks")
                        .expect("the PM timer");
                }
                s.bytes = serde_json::to_vec(&v).expect("JSON");
            }
            s
        };
        let before = read(&vm);
        assert!(before.iter().any(|s| s.name == "vcpu.1"), "{before:?}");
        assert!(
            before.iter().any(|s| s.name.starts_with("pci.")),
            "{before:?}"
        );
        rehearse_load(&mut vm).expect("rehearsal");
        assert!(!vm.restored, "a rehearsal leaves nothing to resume");
        let after = read(&vm);
        assert_eq!(after.len(), before.len());
        for (a, b) in after.iter().zip(&before) {
            let (va, vb): (serde_json::Value, serde_json::Value) = (
                serde_json::from_slice(&a.bytes).expect("JSON"),
                serde_json::from_slice(&b.bytes).expect("JSON"),
            );
            let changed: Vec<String> = match (va.as_object(), vb.as_object()) {
                (Some(x), Some(y)) => x
                    .iter()
                    .filter(|(k, v)| y.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k}: {} -> {v}", y[k]))
                    .collect(),
                _ => (va != vb)
                    .then(|| format!("{vb} -> {va}"))
                    .into_iter()
                    .collect(),
            };
            assert_eq!((&a.name, a.version), (&b.name, b.version));
            assert!(changed.is_empty(), "{}: {changed:?}", a.name);
        }
    }
}
