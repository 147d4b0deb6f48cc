//! Per-vCPU CPUID, built from a CPU model and the vCPU topology.
//!
//! [`build`] is pure: it takes KVM's supported table as an argument, so it is
//! tested without KVM. For a named model the supported table is only a gate:
//! every model feature must be in it (else [`CpuError::MissingFeatures`]), and
//! nothing else of it reaches the guest except the vendor string under
//! [`VendorPolicy::Host`]. The `host` model passes the supported table through.
//!
//! Leaves a named model produces (everything else reads as zero):
//! - 0: highest basic leaf, vendor;
//! - 1: signature, model features, APIC ID, logical count, CLFLUSH size, HTT;
//! - 2: the model's descriptors; 4: the model's caches;
//! - 6: model bits (ARAT); 7.0: model bits, no further subleaves;
//! - 0xb: topology; 0xd: XSAVE components, only if the model has `xsave`;
//! - 0x4000_0000/1: KVM signature and the model's paravirtual features;
//! - 0x8000_0000: highest extended leaf, vendor; 0x8000_0001: signature,
//!   model features (on AMD also the leaf 1 EDX aliases, as AMD CPUs do);
//! - 0x8000_0002..4: brand; 0x8000_0005/6: the model's caches and TLB
//!   descriptions; 0x8000_0008: the model's address widths, topology.
//!
//! Other leaves carry either feature bits (power management, PMU, SGX, PT,
//! AMD SVM/SEV/topoext…) or host facts (TSC/crystal frequency), so none is
//! copied from the host: a leaf is in the guest's CPUID only if the model
//! describes it.
//!
//! Topology: one socket, `cpus` cores, one thread per core; APIC ID == vCPU index.

use abide_machines::{
    Cache, CacheKind, CpuModel, FeatureReg, FeatureSet, MachineDescription, VendorPolicy,
};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 EDX bits AMD CPUs repeat in 0x8000_0001 EDX (fpu..pse36, mmx, fxsr).
const AMD_EXT1_EDX_ALIASES: u32 = 0x0183_f3ff;

/// XSAVE: legacy region plus header, and the AVX (YMM_Hi128) component.
const XSAVE_LEGACY_SIZE: u32 = 0x240;
const XSAVE_AVX_SIZE: u32 = 0x100;
const XCR0_X87_SSE: u32 = 0x3;
const XCR0_AVX: u32 = 0x4;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Why a CPU model cannot run here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    /// The host's KVM lacks features the model needs.
    #[error("CPU model '{model}' needs CPU features this host's KVM does not offer: {}", missing.join(", "))]
    MissingFeatures {
        /// Model name.
        model: String,
        /// Names of the missing features (and `phys-bits>=N` if the host's
        /// physical address width is too small).
        missing: Vec<String>,
    },
    /// Too many entries for KVM.
    #[error("CPUID for model '{model}' has too many entries")]
    TooManyEntries {
        /// Model name.
        model: String,
    },
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn reg(e: &kvm_cpuid_entry2, r: u8) -> u32 {
    match r {
        0 => e.eax,
        1 => e.ebx,
        2 => e.ecx,
        _ => e.edx,
    }
}

/// The known features KVM offers, read from its supported table.
pub fn supported_features(supported: &[kvm_cpuid_entry2]) -> FeatureSet {
    let mut s = FeatureSet::empty();
    for r in FeatureReg::ALL {
        let (function, index, which) = r.location();
        if let Some(e) = find(supported, function, index) {
            s.set_mask(r, reg(e, which));
        }
    }
    s
}

/// The host's physical address width, from the supported table.
fn host_phys_bits(supported: &[kvm_cpuid_entry2]) -> u32 {
    find(supported, LEAF_EXT_ADDR, 0).map_or(36, |e| e.eax & 0xff)
}

/// Names of what `model` needs and this host's KVM lacks; empty if it can run.
pub fn missing_features(model: &CpuModel, supported: &[kvm_cpuid_entry2]) -> Vec<String> {
    if model.passthrough {
        return Vec::new();
    }
    let mut have = supported_features(supported);
    for name in abide_machines::VMM_PROVIDED_FEATURES {
        if let Some(f) = abide_machines::feature(name) {
            have.insert(f);
        }
    }
    let mut missing: Vec<String> = model
        .all_features()
        .minus(&have)
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    if host_phys_bits(supported) < u32::from(model.phys_bits) {
        missing.push(format!("phys-bits>={}", model.phys_bits));
    }
    missing
}

/// The 12-byte vendor string the guest sees, as leaf 0 (EBX, EDX, ECX).
fn vendor_words(model: &CpuModel, supported: &[kvm_cpuid_entry2]) -> (u32, u32, u32) {
    match &model.vendor {
        VendorPolicy::Host => find(supported, 0, 0).map_or((0, 0, 0), |e| (e.ebx, e.edx, e.ecx)),
        VendorPolicy::Fixed(s) => {
            let mut b = [0u8; 12];
            for (d, s) in b.iter_mut().zip(s.bytes()) {
                *d = s;
            }
            let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            (w(0), w(4), w(8))
        }
    }
}

/// The vendor string `model` gives the guest on this host.
pub fn vendor_string(model: &CpuModel, supported: &[kvm_cpuid_entry2]) -> String {
    let (b, d, c) = vendor_words(model, supported);
    let bytes: Vec<u8> = [b, d, c].iter().flat_map(|w| w.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
}

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_entries(function: u32, apic_id: u32, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    let core_shift = id_bits(cpus);
    let sub = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    vec![
        // SMT level: one thread per core, so no APIC-ID bits.
        sub(0, 0, 1, LEVEL_SMT),
        sub(1, core_shift, cpus, LEVEL_CORE),
        // Terminating invalid level.
        sub(2, 0, 0, 0),
    ]
}

/// Leaf 1 EBX/EDX topology fields, shared by every model.
fn patch_leaf1(e: &mut kvm_cpuid_entry2, apic_id: u32, cpus: u32) {
    e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (cpus.min(255) << 16);
    if cpus > 1 {
        e.edx |= EDX_HTT;
    } else {
        e.edx &= !EDX_HTT;
    }
}

/// Leaf 4 EAX: cores per package and threads sharing the cache.
fn patch_leaf4(e: &mut kvm_cpuid_entry2, cpus: u32) {
    // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
    let level = (e.eax >> 5) & 0x7;
    let sharing = if level >= 3 { cpus - 1 } else { 0 };
    e.eax = (e.eax & 0x3fff) | ((cpus - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
}

/// Leaf 0x8000_0008 ECX: core count and APIC-ID width.
fn patch_ext_addr(e: &mut kvm_cpuid_entry2, cpus: u32) {
    // ECX[7:0]: cores - 1; ECX[15:12]: APIC-ID bits for cores.
    e.ecx = (e.ecx & !0xf0ff) | ((cpus - 1) & 0xff) | (id_bits(cpus) << 12);
}

/// The `host` model: KVM's supported leaves with APIC IDs and topology.
fn passthrough(supported: &[kvm_cpuid_entry2], apic_id: u32, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    let max_basic = find(supported, 0, 0).map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::new();
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                patch_leaf1(&mut e, apic_id, cpus);
                // A passed-through CPU still runs under a hypervisor. (A
                // named model says so with its `hypervisor` feature.)
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_CACHE => patch_leaf4(&mut e, cpus),
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            LEAF_EXT_ADDR => patch_ext_addr(&mut e, cpus),
            _ => {}
        }
        out.push(e);
    }
    if max_basic >= LEAF_TOPOLOGY {
        out.extend(topology_entries(LEAF_TOPOLOGY, apic_id, cpus));
    }
    if max_basic >= LEAF_TOPOLOGY_V2 {
        out.extend(topology_entries(LEAF_TOPOLOGY_V2, apic_id, cpus));
    }
    out
}

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

fn indexed(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..entry(function, index, regs)
    }
}

/// Leaf 4 subleaf for one cache (before the topology fields are patched in).
fn leaf4(index: u32, c: &Cache) -> kvm_cpuid_entry2 {
    let kind = match c.kind {
        CacheKind::Data => 1,
        CacheKind::Instruction => 2,
        CacheKind::Unified => 3,
    };
    let line = u32::from(c.line_size);
    let ways = u32::from(c.ways);
    let sets = (c.size_kib * 1024) / (ways * line);
    // Self-initializing; WBINVD acts on lower levels (EDX bit 0 clear).
    let eax = kind | (u32::from(c.level) << 5) | (1 << 8);
    let ebx = (line - 1) | ((ways - 1) << 22);
    indexed(LEAF_CACHE, index, [eax, ebx, sets - 1, 0])
}

/// AMD's 4-bit associativity encoding (leaf 0x8000_0006).
fn amd_assoc(ways: u16) -> u32 {
    match ways {
        0 => 0,
        1 => 1,
        2 => 2,
        3..=4 => 4,
        5..=8 => 6,
        9..=16 => 8,
        17..=32 => 0xa,
        33..=48 => 0xb,
        49..=64 => 0xc,
        65..=96 => 0xd,
        97..=128 => 0xe,
        _ => 0xf,
    }
}

fn cache_of(model: &CpuModel, level: u8, kinds: &[CacheKind]) -> Option<Cache> {
    model
        .caches
        .iter()
        .find(|c| c.level == level && kinds.contains(&c.kind))
        .copied()
}

/// Leaves 0x8000_0005 (L1) and 0x8000_0006 (L2, L3), AMD's cache format,
/// with the model's TLB registers.
fn amd_cache_leaves(model: &CpuModel) -> [kvm_cpuid_entry2; 2] {
    let l1 = |c: Option<Cache>| {
        c.map_or(0, |c| {
            (c.size_kib << 24) | (u32::from(c.ways) << 16) | (1 << 8) | u32::from(c.line_size)
        })
    };
    let l1d = l1(cache_of(model, 1, &[CacheKind::Data, CacheKind::Unified]));
    let l1i = l1(cache_of(model, 1, &[CacheKind::Instruction]));
    let l2 = cache_of(model, 2, &[CacheKind::Unified]).map_or(0, |c| {
        (c.size_kib << 16) | (amd_assoc(c.ways) << 12) | (1 << 8) | u32::from(c.line_size)
    });
    let l3 = cache_of(model, 3, &[CacheKind::Unified]).map_or(0, |c| {
        ((c.size_kib / 512) << 18) | (amd_assoc(c.ways) << 12) | (1 << 8) | u32::from(c.line_size)
    });
    let t = &model.tlb;
    [
        entry(0x8000_0005, 0, [t.l1_large, t.l1_4k, l1d, l1i]),
        entry(0x8000_0006, 0, [t.l2_large, t.l2_4k, l2, l3]),
    ]
}

fn brand_leaves(brand: &str) -> Vec<kvm_cpuid_entry2> {
    let mut b = [0u8; 48];
    for (d, s) in b.iter_mut().take(47).zip(brand.bytes()) {
        *d = s;
    }
    (0..3u32)
        .map(|i| {
            let w = |j: usize| {
                let o = (i as usize) * 16 + j * 4;
                u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
            };
            entry(0x8000_0002 + i, 0, [w(0), w(1), w(2), w(3)])
        })
        .collect()
}

/// A named model's leaves for one vCPU.
fn from_model(
    model: &CpuModel,
    supported: &[kvm_cpuid_entry2],
    apic_id: u32,
    cpus: u32,
) -> Vec<kvm_cpuid_entry2> {
    let feat = |r: FeatureReg| model.features.mask(r);
    let (vb, vd, vc) = vendor_words(model, supported);
    let amd = (vb, vd, vc) == (0x6874_7541, 0x6974_6e65, 0x444d_4163); // "AuthenticAMD"
    let sig = model.signature();
    let max_basic = model.max_basic_leaf;
    let max_ext = model.max_ext_leaf;
    let mut out = vec![entry(0, 0, [max_basic, vb, vc, vd])];

    // CLFLUSH line size in 8-byte units: the model's L1 data line.
    let clflush_size = if model.features.has("clflush") {
        cache_of(model, 1, &[CacheKind::Data, CacheKind::Unified])
            .map_or(0, |c| u32::from(c.line_size) / 8)
    } else {
        0
    };
    let mut l1 = entry(
        LEAF_FEATURES,
        0,
        [
            sig,
            clflush_size << 8,
            feat(FeatureReg::Leaf1Ecx),
            feat(FeatureReg::Leaf1Edx),
        ],
    );
    patch_leaf1(&mut l1, apic_id, cpus);
    out.push(l1);

    if max_basic >= 2 {
        out.push(entry(2, 0, model.leaf2));
    }
    if max_basic >= LEAF_CACHE {
        let mut i = 0;
        for c in &model.caches {
            let mut e = leaf4(i, c);
            patch_leaf4(&mut e, cpus);
            out.push(e);
            i += 1;
        }
        out.push(indexed(LEAF_CACHE, i, [0; 4]));
    }
    if max_basic >= 6 {
        out.push(entry(6, 0, [feat(FeatureReg::Leaf6Eax), 0, 0, 0]));
    }
    if max_basic >= 7 {
        out.push(indexed(
            7,
            0,
            [
                0,
                feat(FeatureReg::Leaf7Ebx),
                feat(FeatureReg::Leaf7Ecx),
                feat(FeatureReg::Leaf7Edx),
            ],
        ));
    }
    if max_basic >= LEAF_TOPOLOGY {
        out.extend(topology_entries(LEAF_TOPOLOGY, apic_id, cpus));
    }
    if max_basic >= LEAF_XSAVE && model.features.has("xsave") {
        let avx = model.features.has("avx");
        let xcr0 = XCR0_X87_SSE | if avx { XCR0_AVX } else { 0 };
        let max_size = XSAVE_LEGACY_SIZE + if avx { XSAVE_AVX_SIZE } else { 0 };
        // EBX is the size for the current XCR0. Not every KVM updates it
        // when the guest writes XCR0 (the nested test host's does not), and
        // Linux checks it after enabling every component, so start with
        // the size for all of them, as KVM's own supported table does.
        out.push(indexed(LEAF_XSAVE, 0, [xcr0, max_size, max_size, 0]));
        out.push(indexed(
            LEAF_XSAVE,
            1,
            [feat(FeatureReg::LeafDSub1Eax), 0, 0, 0],
        ));
        if avx {
            out.push(indexed(
                LEAF_XSAVE,
                2,
                [XSAVE_AVX_SIZE, XSAVE_LEGACY_SIZE, 0, 0],
            ));
        }
    }
    if max_basic >= LEAF_TOPOLOGY_V2 {
        out.extend(topology_entries(LEAF_TOPOLOGY_V2, apic_id, cpus));
    }

    // "KVMKVMKVM\0\0\0"
    out.push(entry(
        LEAF_KVM_SIGNATURE,
        0,
        [LEAF_KVM_FEATURES, 0x4b4d_564b, 0x564b_4d56, 0x0000_004d],
    ));
    let kvm_supported = supported_features(supported).mask(FeatureReg::KvmEax);
    out.push(entry(
        LEAF_KVM_FEATURES,
        0,
        [
            model.kvm_features.mask(FeatureReg::KvmEax) & kvm_supported,
            0,
            0,
            0,
        ],
    ));

    out.push(entry(LEAF_EXT_MAX, 0, [max_ext, vb, vc, vd]));
    if max_ext >= LEAF_EXT_FEATURES {
        let mut edx = feat(FeatureReg::Ext1Edx);
        if amd {
            edx |= feat(FeatureReg::Leaf1Edx) & AMD_EXT1_EDX_ALIASES;
        }
        out.push(entry(
            LEAF_EXT_FEATURES,
            0,
            [sig, 0, feat(FeatureReg::Ext1Ecx), edx],
        ));
    }
    if max_ext >= 0x8000_0004 {
        out.extend(brand_leaves(&model.brand));
    }
    if max_ext >= 0x8000_0006 {
        out.extend(amd_cache_leaves(model));
    }
    if max_ext >= LEAF_EXT_ADDR {
        let eax = u32::from(model.phys_bits) | (u32::from(model.virt_bits) << 8);
        let mut e = entry(LEAF_EXT_ADDR, 0, [eax, 0, 0, 0]);
        patch_ext_addr(&mut e, cpus);
        out.push(e);
    }
    out
}

/// Builds vCPU `index`'s CPUID for `model` on a host whose KVM supports
/// `supported`. Fails, naming the missing features, if the model needs
/// anything the host lacks.
pub fn build(
    model: &CpuModel,
    supported: &[kvm_cpuid_entry2],
    index: u32,
    cpus: u32,
) -> Result<CpuId, CpuError> {
    let missing = missing_features(model, supported);
    if !missing.is_empty() {
        return Err(CpuError::MissingFeatures {
            model: model.name.clone(),
            missing,
        });
    }
    let apic_id = index;
    let out = if model.passthrough {
        passthrough(supported, apic_id, cpus)
    } else {
        from_model(model, supported, apic_id, cpus)
    };
    CpuId::from_entries(&out).map_err(|_| CpuError::TooManyEntries {
        model: model.name.clone(),
    })
}

/// The CPU a VM runs with: the model, and what it resolved to on this host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedCpu {
    /// The model.
    pub model: CpuModel,
    /// The vendor string the guest sees.
    pub vendor: String,
    /// Whether the VM may move to another host (false for `host`).
    pub migratable: bool,
}

/// The model `requested` names, or the machine's default model if empty.
pub fn model_for(
    machine: &MachineDescription,
    requested: &str,
) -> Result<CpuModel, abide_machines::UnknownCpuModel> {
    if requested.is_empty() {
        abide_machines::cpu_model(&machine.default_cpu_model)
    } else {
        abide_machines::cpu_model(requested)
    }
}

/// A model that cannot run on this host, with what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CPU model '{model}'{} needs CPU features this host's KVM does not offer: {}; {hint}",
    default_of.as_ref().map(|m| format!(" (default of machine type '{m}')")).unwrap_or_default(),
    missing.join(", "))]
pub struct Unsupported {
    /// Model name.
    pub model: String,
    /// The machine type whose default it is, if the user did not choose it.
    pub default_of: Option<String>,
    /// Names of the missing features.
    pub missing: Vec<String>,
    /// What to do instead.
    pub hint: String,
}

/// Checks `model` against this host's KVM and resolves its vendor.
///
/// `explicit` says whether the user chose the model (`--cpu`) or it is the
/// machine's default; the error's hint differs.
pub fn resolve(
    model: CpuModel,
    machine: &MachineDescription,
    explicit: bool,
    supported: &[kvm_cpuid_entry2],
) -> Result<ResolvedCpu, Unsupported> {
    let missing = missing_features(&model, supported);
    if !missing.is_empty() {
        return Err(Unsupported {
            hint: hint(&model, machine, explicit, supported),
            model: model.name,
            default_of: (!explicit).then(|| machine.name.clone()),
            missing,
        });
    }
    Ok(ResolvedCpu {
        vendor: vendor_string(&model, supported),
        migratable: model.migratable(),
        model,
    })
}

fn hint(
    model: &CpuModel,
    machine: &MachineDescription,
    explicit: bool,
    supported: &[kvm_cpuid_entry2],
) -> String {
    let usable: Vec<String> = abide_machines::cpu_models()
        .into_iter()
        .filter(|m| m.migratable() && m.name != model.name)
        .filter(|m| missing_features(m, supported).is_empty())
        .map(|m| m.name)
        .collect();
    let machines: Vec<String> = abide_machines::machine_types()
        .into_iter()
        .filter(|t| t.name != machine.name)
        .filter_map(|t| abide_machines::resolve(&t.name).ok())
        .filter(|m| usable.contains(&m.default_cpu_model))
        .map(|m| m.name)
        .collect();
    let mut options = Vec::new();
    if !explicit {
        if let Some(m) = machines.first() {
            options.push(format!("--machine {m}"));
        }
    }
    if let Some(c) = usable.last() {
        options.push(format!("--cpu {c}"));
    }
    if options.is_empty() {
        "no named CPU model runs on this host; --cpu host passes through what its KVM offers (not migratable)".to_string()
    } else {
        format!(
            "use {} (or --cpu host: everything this host offers, not migratable)",
            options.join(" or ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abide_machines::{abide_v1, abide_v2, host_cpu_model};

    fn fake_supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                eax: 0x55,
                ..Default::default()
            },
        ]
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    fn has_leaf(c: &CpuId, f: u32) -> bool {
        c.as_slice().iter().any(|e| e.function == f)
    }

    fn host_build(s: &[kvm_cpuid_entry2], index: u32, cpus: u32) -> CpuId {
        build(&host_cpu_model(), s, index, cpus).expect("host model")
    }

    #[test]
    fn apic_ids_and_topology() {
        let s = fake_supported();
        let c = host_build(&s, 3, 4);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let core = leaf(&c, 0xb, 1);
        assert_eq!(core.eax, 2);
        assert_eq!(core.ebx, 4);
        assert_eq!(core.edx, 3);
        assert_eq!((core.ecx >> 8) & 0xff, LEVEL_CORE);
        assert_eq!(leaf(&c, 0xb, 2).ecx >> 8, 0);
        // The old 0xB entry was replaced, not duplicated.
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let c = host_build(&fake_supported(), 0, 1);
        assert_eq!(leaf(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(leaf(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }

    /// A KVM supported table offering everything in `features` plus `extra`
    /// raw bits, with the given vendor and physical address width.
    fn table(
        features: &FeatureSet,
        vendor: &[u8; 12],
        phys_bits: u32,
        extra_leaf1_ecx: u32,
    ) -> Vec<kvm_cpuid_entry2> {
        let w =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        let mut v = vec![
            entry(0, 0, [0x1c, w(0), w(8), w(4)]),
            entry(0x8000_0000, 0, [0x8000_0021, w(0), w(8), w(4)]),
            // Host cache and frequency leaves that must not leak.
            indexed(4, 0, [0x121, 0x01c0_003f, 0x3f, 0]),
            entry(0x15, 0, [2, 0x100, 0x016e_3600, 0]),
            entry(0x8000_0007, 0, [0, 0, 0, 0x100]),
            entry(
                0x8000_0005,
                0,
                [0xff48_ff40, 0xff48_ff40, 0x2008_0140, 0x2008_0140],
            ),
        ];
        for r in FeatureReg::ALL {
            let (f, i, which) = r.location();
            let mut mask = features.mask(r);
            if r == FeatureReg::Leaf1Ecx {
                mask |= extra_leaf1_ecx;
            }
            let mut regs = [0u32; 4];
            if let Some(e) = v.iter().position(|e| e.function == f && e.index == i) {
                let e = v.remove(e);
                regs = [e.eax, e.ebx, e.ecx, e.edx];
            }
            regs[usize::from(which)] |= mask;
            if f == 1 {
                regs[0] = 0x00a1_0f11;
                regs[1] = 0x0002_0800;
            }
            v.push(indexed(f, i, regs));
        }
        v.push(entry(
            0x8000_0008,
            0,
            [0x3000 | phys_bits, 0x5002_0005, 0x7001, 0],
        ));
        v
    }

    const AMD: &[u8; 12] = b"AuthenticAMD";
    const INTEL: &[u8; 12] = b"GenuineIntel";

    #[test]
    fn missing_features_are_named() {
        let v1 = abide_v1();
        let v2 = abide_v2();
        // A PVM-like host: exactly v1's features.
        let pvm = table(&v1.all_features(), AMD, 48, 0);
        assert!(build(&v1, &pvm, 0, 1).is_ok());
        let err = build(&v2, &pvm, 0, 1).expect_err("v2 needs more");
        let CpuError::MissingFeatures { model, missing } = &err else {
            panic!("{err}");
        };
        assert_eq!(model, "abide-v2");
        for name in [
            "pni",
            "ssse3",
            "sse4_2",
            "popcnt",
            "avx2",
            "xsave",
            "steal_time",
        ] {
            assert!(missing.iter().any(|m| m == name), "{name} in {missing:?}");
        }
        assert!(!missing.iter().any(|m| m == "sse2"), "{missing:?}");
        assert!(err.to_string().contains("pni, "), "{err}");
        // Too narrow a physical address width is refused as well.
        let narrow = table(&v1.all_features(), AMD, 39, 0);
        let missing = missing_features(&v1, &narrow);
        assert_eq!(missing, ["phys-bits>=40"]);
        // KVM on AMD does not list `hypervisor`; the VMM sets it anyway.
        let mut no_hv = v1.all_features();
        no_hv.set_mask(
            FeatureReg::Leaf1Ecx,
            no_hv.mask(FeatureReg::Leaf1Ecx) & !ECX_HYPERVISOR,
        );
        let amd_kvm = table(&no_hv, AMD, 40, 0);
        assert!(missing_features(&v1, &amd_kvm).is_empty());
        let c = build(&v1, &amd_kvm, 0, 1).expect("v1");
        assert_ne!(leaf(&c, 1, 0).ecx & ECX_HYPERVISOR, 0);
        // `host` never misses anything.
        assert!(missing_features(&host_cpu_model(), &narrow).is_empty());
    }

    #[test]
    fn named_model_output_does_not_depend_on_extra_host_features() {
        for model in [abide_v1(), abide_v2()] {
            let small = table(&model.all_features(), AMD, 40, 0);
            let mut everything = FeatureSet::empty();
            for f in abide_machines::KNOWN_FEATURES {
                everything.insert(f);
            }
            let big = table(&everything, AMD, 52, 0xffff_ffff);
            for (index, cpus) in [(0, 1), (1, 2), (3, 4)] {
                let a = build(&model, &small, index, cpus).expect("small host");
                let b = build(&model, &big, index, cpus).expect("big host");
                assert_eq!(a.as_slice(), b.as_slice(), "{}", model.name);
            }
        }
    }

    #[test]
    fn v1_cpuid_contents() {
        let v1 = abide_v1();
        let s = table(&v1.all_features(), INTEL, 46, 0);
        let c = build(&v1, &s, 2, 4).expect("v1");
        let l0 = leaf(&c, 0, 0);
        assert_eq!(l0.eax, 0xd);
        assert_eq!(vendor_string(&v1, &s), "GenuineIntel");
        assert_eq!(
            [l0.ebx, l0.edx, l0.ecx],
            [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
        );
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.eax, 0x0006_0fb1);
        assert_eq!(l1.ebx, (2 << 24) | (4 << 16) | 0x0800);
        assert_eq!(l1.ecx, ECX_HYPERVISOR);
        assert_eq!(l1.edx, v1.features.mask(FeatureReg::Leaf1Edx) | EDX_HTT);
        // No XSAVE: no leaf 0xd. No leaves the model does not describe.
        assert!(!has_leaf(&c, 0xd));
        assert!(!has_leaf(&c, 0x15));
        assert!(!has_leaf(&c, 0x8000_0007));
        assert_eq!(leaf(&c, 7, 0).ebx, 0);
        assert_eq!(leaf(&c, 6, 0).eax, 1 << 2, "arat");
        // Caches: model's, with topology patched in.
        let l3 = leaf(&c, 4, 3);
        assert_eq!((l3.eax >> 5) & 7, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "shared by 4 cores");
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!(leaf(&c, 4, 4).eax & 0x1f, 0, "terminator");
        assert_eq!(leaf(&c, 0x8000_0005, 0).ecx >> 24, 32, "32 KiB L1d");
        // Brand, address widths, KVM leaves.
        let brand: Vec<u8> = (0x8000_0002..=0x8000_0004)
            .flat_map(|f| {
                let e = leaf(&c, f, 0);
                [e.eax, e.ebx, e.ecx, e.edx]
                    .into_iter()
                    .flat_map(u32::to_le_bytes)
            })
            .collect();
        assert!(brand.starts_with(v1.brand.as_bytes()));
        assert_eq!(leaf(&c, 0x8000_0000, 0).eax, 0x8000_0008);
        let addr = leaf(&c, 0x8000_0008, 0);
        assert_eq!(addr.eax, 0x3028);
        assert_eq!(addr.ebx, 0, "no host speculation bits");
        assert_eq!(addr.ecx & 0xff, 3);
        let kvm = leaf(&c, 0x4000_0000, 0);
        assert_eq!(kvm.eax, 0x4000_0001);
        assert_eq!(
            leaf(&c, 0x4000_0001, 0).eax,
            v1.kvm_features.mask(FeatureReg::KvmEax)
        );
        // Intel: no AMD aliases in 0x8000_0001 EDX.
        let e1 = leaf(&c, 0x8000_0001, 0);
        assert_eq!(e1.edx, v1.features.mask(FeatureReg::Ext1Edx));
    }

    #[test]
    fn v2_xsave_leaves_and_amd_aliases() {
        let v2 = abide_v2();
        let s = table(&v2.all_features(), AMD, 48, 0);
        let c = build(&v2, &s, 0, 1).expect("v2");
        let x0 = leaf(&c, 0xd, 0);
        assert_eq!(x0.eax, 0x7, "x87, SSE, AVX");
        assert_eq!(x0.ecx, 0x340);
        assert_eq!(x0.ebx, 0x340, "size with every component enabled");
        assert_eq!(leaf(&c, 0xd, 1).eax, 0x5, "xsaveopt, xgetbv1");
        assert_eq!(leaf(&c, 0xd, 2).eax, 0x100);
        assert_eq!(leaf(&c, 0xd, 2).ebx, 0x240);
        let e1 = leaf(&c, 0x8000_0001, 0);
        assert_eq!(e1.edx & 1, 1, "fpu alias on AMD");
        assert_ne!(e1.edx & (1 << 29), 0, "lm");
        assert_eq!(vendor_string(&v2, &s), "AuthenticAMD");
    }

    #[test]
    fn fixed_vendor() {
        let mut m = abide_v1();
        m.vendor = VendorPolicy::Fixed("GenuineIntel".to_string());
        let s = table(&m.all_features(), AMD, 48, 0);
        assert_eq!(vendor_string(&m, &s), "GenuineIntel");
    }
}
