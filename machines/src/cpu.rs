//! CPU models: what CPUID tells a guest, as data.
//!
//! A named CPU model pins every CPUID value a guest can observe: vendor
//! policy, family/model/stepping, brand string, feature bits, paravirtual
//! (KVM) features, the highest basic and extended leaves, address widths and
//! the cache hierarchy. The VMM turns a model plus the vCPU topology into
//! CPUID; the host only decides whether the model can run (every feature must
//! be offered by its KVM), never what the guest sees. The exception is
//! `host`, which passes through whatever KVM offers and so is not migratable.
//!
//! Feature names are Linux's `/proc/cpuinfo` names (`pni` is SSE3).
//!
//! # Vendor policy
//!
//! The named models use [`VendorPolicy::Host`]: the guest sees the host's
//! vendor string. KVM emulates some instructions by the guest's vendor
//! (SYSCALL from compatibility mode does not exist on Intel, SYSENTER from
//! compatibility mode does not exist on AMD), and guests pick vendor-specific
//! MSRs, errata work-arounds and mitigations by vendor, so claiming the other
//! vendor than the hardware invites breakage. QEMU does the same for its named
//! models under KVM. The cost: the vendor is the one guest-visible value a
//! named model does not pin, so migration must stay within one vendor (the
//! resolved CPU records the vendor it got).
//!
//! Family 0xf is the one family that names a 64-bit CPU for both vendors
//! (K8, NetBurst); `abide-v1` and `abide-v2` use QEMU's long-tested `qemu64`
//! signature (family 0xf, model 0x6b, stepping 1), which Linux handles without
//! model-specific quirks on either vendor.

use serde::{Deserialize, Serialize};

/// The CPUID registers that carry feature bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FeatureReg {
    /// Leaf 1, EDX.
    Leaf1Edx,
    /// Leaf 1, ECX.
    Leaf1Ecx,
    /// Leaf 6, EAX (thermal and power).
    Leaf6Eax,
    /// Leaf 7 subleaf 0, EBX.
    Leaf7Ebx,
    /// Leaf 7 subleaf 0, ECX.
    Leaf7Ecx,
    /// Leaf 7 subleaf 0, EDX.
    Leaf7Edx,
    /// Leaf 0xd subleaf 1, EAX (XSAVE extensions).
    LeafDSub1Eax,
    /// Leaf 0x8000_0001, ECX.
    Ext1Ecx,
    /// Leaf 0x8000_0001, EDX.
    Ext1Edx,
    /// Leaf 0x4000_0001, EAX (KVM paravirtual features).
    KvmEax,
}

impl FeatureReg {
    /// Every register, in [`FeatureSet`] order.
    pub const ALL: [FeatureReg; 10] = [
        FeatureReg::Leaf1Edx,
        FeatureReg::Leaf1Ecx,
        FeatureReg::Leaf6Eax,
        FeatureReg::Leaf7Ebx,
        FeatureReg::Leaf7Ecx,
        FeatureReg::Leaf7Edx,
        FeatureReg::LeafDSub1Eax,
        FeatureReg::Ext1Ecx,
        FeatureReg::Ext1Edx,
        FeatureReg::KvmEax,
    ];

    /// CPUID function, subfunction and register (0 EAX, 1 EBX, 2 ECX, 3 EDX).
    pub fn location(self) -> (u32, u32, u8) {
        match self {
            FeatureReg::Leaf1Edx => (1, 0, 3),
            FeatureReg::Leaf1Ecx => (1, 0, 2),
            FeatureReg::Leaf6Eax => (6, 0, 0),
            FeatureReg::Leaf7Ebx => (7, 0, 1),
            FeatureReg::Leaf7Ecx => (7, 0, 2),
            FeatureReg::Leaf7Edx => (7, 0, 3),
            FeatureReg::LeafDSub1Eax => (0xd, 1, 0),
            FeatureReg::Ext1Ecx => (0x8000_0001, 0, 2),
            FeatureReg::Ext1Edx => (0x8000_0001, 0, 3),
            FeatureReg::KvmEax => (0x4000_0001, 0, 0),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One CPUID feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFeature {
    /// Linux's name (`/proc/cpuinfo`, or `KVM_FEATURE_*` lower-cased).
    pub name: &'static str,
    /// Where it lives.
    pub reg: FeatureReg,
    /// Bit number.
    pub bit: u8,
}

const fn f(name: &'static str, reg: FeatureReg, bit: u8) -> CpuFeature {
    CpuFeature { name, reg, bit }
}

use FeatureReg::{
    Ext1Ecx, Ext1Edx, KvmEax, Leaf1Ecx, Leaf1Edx, Leaf6Eax, Leaf7Ebx, Leaf7Ecx, Leaf7Edx,
    LeafDSub1Eax,
};

/// Every feature bit Abide knows by name.
///
/// Bits the VMM computes rather than takes from a model are absent: leaf 1
/// EDX `ht` (topology), leaf 1 ECX `osxsave` and leaf 7 ECX `ospke` (mirrors
/// of guest CR4).
pub const KNOWN_FEATURES: &[CpuFeature] = &[
    f("fpu", Leaf1Edx, 0),
    f("vme", Leaf1Edx, 1),
    f("de", Leaf1Edx, 2),
    f("pse", Leaf1Edx, 3),
    f("tsc", Leaf1Edx, 4),
    f("msr", Leaf1Edx, 5),
    f("pae", Leaf1Edx, 6),
    f("mce", Leaf1Edx, 7),
    f("cx8", Leaf1Edx, 8),
    f("apic", Leaf1Edx, 9),
    f("sep", Leaf1Edx, 11),
    f("mtrr", Leaf1Edx, 12),
    f("pge", Leaf1Edx, 13),
    f("mca", Leaf1Edx, 14),
    f("cmov", Leaf1Edx, 15),
    f("pat", Leaf1Edx, 16),
    f("pse36", Leaf1Edx, 17),
    f("pn", Leaf1Edx, 18),
    f("clflush", Leaf1Edx, 19),
    f("dts", Leaf1Edx, 21),
    f("acpi", Leaf1Edx, 22),
    f("mmx", Leaf1Edx, 23),
    f("fxsr", Leaf1Edx, 24),
    f("sse", Leaf1Edx, 25),
    f("sse2", Leaf1Edx, 26),
    f("ss", Leaf1Edx, 27),
    f("tm", Leaf1Edx, 29),
    f("pbe", Leaf1Edx, 31),
    f("pni", Leaf1Ecx, 0),
    f("pclmulqdq", Leaf1Ecx, 1),
    f("dtes64", Leaf1Ecx, 2),
    f("monitor", Leaf1Ecx, 3),
    f("ds_cpl", Leaf1Ecx, 4),
    f("vmx", Leaf1Ecx, 5),
    f("smx", Leaf1Ecx, 6),
    f("est", Leaf1Ecx, 7),
    f("tm2", Leaf1Ecx, 8),
    f("ssse3", Leaf1Ecx, 9),
    f("cid", Leaf1Ecx, 10),
    f("sdbg", Leaf1Ecx, 11),
    f("fma", Leaf1Ecx, 12),
    f("cx16", Leaf1Ecx, 13),
    f("xtpr", Leaf1Ecx, 14),
    f("pdcm", Leaf1Ecx, 15),
    f("pcid", Leaf1Ecx, 17),
    f("dca", Leaf1Ecx, 18),
    f("sse4_1", Leaf1Ecx, 19),
    f("sse4_2", Leaf1Ecx, 20),
    f("x2apic", Leaf1Ecx, 21),
    f("movbe", Leaf1Ecx, 22),
    f("popcnt", Leaf1Ecx, 23),
    f("tsc_deadline_timer", Leaf1Ecx, 24),
    f("aes", Leaf1Ecx, 25),
    f("xsave", Leaf1Ecx, 26),
    f("avx", Leaf1Ecx, 28),
    f("f16c", Leaf1Ecx, 29),
    f("rdrand", Leaf1Ecx, 30),
    f("hypervisor", Leaf1Ecx, 31),
    f("arat", Leaf6Eax, 2),
    f("fsgsbase", Leaf7Ebx, 0),
    f("tsc_adjust", Leaf7Ebx, 1),
    f("sgx", Leaf7Ebx, 2),
    f("bmi1", Leaf7Ebx, 3),
    f("hle", Leaf7Ebx, 4),
    f("avx2", Leaf7Ebx, 5),
    f("fdp_excptn_only", Leaf7Ebx, 6),
    f("smep", Leaf7Ebx, 7),
    f("bmi2", Leaf7Ebx, 8),
    f("erms", Leaf7Ebx, 9),
    f("invpcid", Leaf7Ebx, 10),
    f("rtm", Leaf7Ebx, 11),
    f("cqm", Leaf7Ebx, 12),
    f("zero_fcs_fds", Leaf7Ebx, 13),
    f("mpx", Leaf7Ebx, 14),
    f("rdt_a", Leaf7Ebx, 15),
    f("avx512f", Leaf7Ebx, 16),
    f("avx512dq", Leaf7Ebx, 17),
    f("rdseed", Leaf7Ebx, 18),
    f("adx", Leaf7Ebx, 19),
    f("smap", Leaf7Ebx, 20),
    f("avx512ifma", Leaf7Ebx, 21),
    f("clflushopt", Leaf7Ebx, 23),
    f("clwb", Leaf7Ebx, 24),
    f("intel_pt", Leaf7Ebx, 25),
    f("avx512pf", Leaf7Ebx, 26),
    f("avx512er", Leaf7Ebx, 27),
    f("avx512cd", Leaf7Ebx, 28),
    f("sha_ni", Leaf7Ebx, 29),
    f("avx512bw", Leaf7Ebx, 30),
    f("avx512vl", Leaf7Ebx, 31),
    f("avx512vbmi", Leaf7Ecx, 1),
    f("umip", Leaf7Ecx, 2),
    f("pku", Leaf7Ecx, 3),
    f("waitpkg", Leaf7Ecx, 5),
    f("avx512_vbmi2", Leaf7Ecx, 6),
    f("gfni", Leaf7Ecx, 8),
    f("vaes", Leaf7Ecx, 9),
    f("vpclmulqdq", Leaf7Ecx, 10),
    f("avx512_vnni", Leaf7Ecx, 11),
    f("avx512_bitalg", Leaf7Ecx, 12),
    f("tme", Leaf7Ecx, 13),
    f("avx512_vpopcntdq", Leaf7Ecx, 14),
    f("la57", Leaf7Ecx, 16),
    f("rdpid", Leaf7Ecx, 22),
    f("bus_lock_detect", Leaf7Ecx, 24),
    f("cldemote", Leaf7Ecx, 25),
    f("movdiri", Leaf7Ecx, 27),
    f("movdir64b", Leaf7Ecx, 28),
    f("enqcmd", Leaf7Ecx, 29),
    f("sgx_lc", Leaf7Ecx, 30),
    f("avx512_4vnniw", Leaf7Edx, 2),
    f("avx512_4fmaps", Leaf7Edx, 3),
    f("fsrm", Leaf7Edx, 4),
    f("avx512_vp2intersect", Leaf7Edx, 8),
    f("md_clear", Leaf7Edx, 10),
    f("serialize", Leaf7Edx, 14),
    f("tsxldtrk", Leaf7Edx, 16),
    f("pconfig", Leaf7Edx, 18),
    f("arch_lbr", Leaf7Edx, 19),
    f("ibt", Leaf7Edx, 20),
    f("amx_bf16", Leaf7Edx, 22),
    f("avx512_fp16", Leaf7Edx, 23),
    f("amx_tile", Leaf7Edx, 24),
    f("amx_int8", Leaf7Edx, 25),
    f("spec_ctrl", Leaf7Edx, 26),
    f("intel_stibp", Leaf7Edx, 27),
    f("flush_l1d", Leaf7Edx, 28),
    f("arch_capabilities", Leaf7Edx, 29),
    f("core_capabilities", Leaf7Edx, 30),
    f("spec_ctrl_ssbd", Leaf7Edx, 31),
    f("xsaveopt", LeafDSub1Eax, 0),
    f("xsavec", LeafDSub1Eax, 1),
    f("xgetbv1", LeafDSub1Eax, 2),
    f("xsaves", LeafDSub1Eax, 3),
    f("lahf_lm", Ext1Ecx, 0),
    f("cmp_legacy", Ext1Ecx, 1),
    f("svm", Ext1Ecx, 2),
    f("extapic", Ext1Ecx, 3),
    f("cr8_legacy", Ext1Ecx, 4),
    f("abm", Ext1Ecx, 5),
    f("sse4a", Ext1Ecx, 6),
    f("misalignsse", Ext1Ecx, 7),
    f("3dnowprefetch", Ext1Ecx, 8),
    f("osvw", Ext1Ecx, 9),
    f("ibs", Ext1Ecx, 10),
    f("xop", Ext1Ecx, 11),
    f("skinit", Ext1Ecx, 12),
    f("wdt", Ext1Ecx, 13),
    f("lwp", Ext1Ecx, 15),
    f("fma4", Ext1Ecx, 16),
    f("tce", Ext1Ecx, 17),
    f("nodeid_msr", Ext1Ecx, 19),
    f("tbm", Ext1Ecx, 21),
    f("topoext", Ext1Ecx, 22),
    f("perfctr_core", Ext1Ecx, 23),
    f("perfctr_nb", Ext1Ecx, 24),
    f("bpext", Ext1Ecx, 26),
    f("ptsc", Ext1Ecx, 27),
    f("perfctr_llc", Ext1Ecx, 28),
    f("mwaitx", Ext1Ecx, 29),
    f("syscall", Ext1Edx, 11),
    f("mp", Ext1Edx, 19),
    f("nx", Ext1Edx, 20),
    f("mmxext", Ext1Edx, 22),
    f("fxsr_opt", Ext1Edx, 25),
    f("pdpe1gb", Ext1Edx, 26),
    f("rdtscp", Ext1Edx, 27),
    f("lm", Ext1Edx, 29),
    f("3dnowext", Ext1Edx, 30),
    f("3dnow", Ext1Edx, 31),
    f("clocksource", KvmEax, 0),
    f("nopiodelay", KvmEax, 1),
    f("mmu_op", KvmEax, 2),
    f("clocksource2", KvmEax, 3),
    f("async_pf", KvmEax, 4),
    f("steal_time", KvmEax, 5),
    f("pv_eoi", KvmEax, 6),
    f("pv_unhalt", KvmEax, 7),
    f("pv_tlb_flush", KvmEax, 9),
    f("async_pf_vmexit", KvmEax, 10),
    f("pv_send_ipi", KvmEax, 11),
    f("poll_control", KvmEax, 12),
    f("pv_sched_yield", KvmEax, 13),
    f("async_pf_int", KvmEax, 14),
    f("msi_ext_dest_id", KvmEax, 15),
    f("hc_map_gpa_range", KvmEax, 16),
    f("migration_control", KvmEax, 17),
    f("clocksource_stable_bit", KvmEax, 24),
];

/// Features that need nothing from the host: the VMM sets them itself, and
/// KVM need not list them as supported (KVM on AMD does not list
/// `hypervisor`).
pub const VMM_PROVIDED_FEATURES: &[&str] = &["hypervisor"];

/// Looks a feature up by name.
pub fn feature(name: &str) -> Option<&'static CpuFeature> {
    KNOWN_FEATURES.iter().find(|f| f.name == name)
}

/// A set of feature bits: one mask per [`FeatureReg`].
///
/// Serialized as the list of feature names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "Vec<String>", try_from = "Vec<String>")]
pub struct FeatureSet {
    masks: [u32; FeatureReg::ALL.len()],
}

/// A feature name Abide does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU feature '{0}'")]
pub struct UnknownFeature(pub String);

impl FeatureSet {
    /// The empty set.
    pub const fn empty() -> Self {
        Self {
            masks: [0; FeatureReg::ALL.len()],
        }
    }

    /// A set from feature names.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, UnknownFeature> {
        let mut s = Self::empty();
        for n in names {
            let feat = feature(n.as_ref()).ok_or_else(|| UnknownFeature(n.as_ref().to_string()))?;
            s.insert(feat);
        }
        Ok(s)
    }

    /// Adds one feature.
    pub fn insert(&mut self, feat: &CpuFeature) {
        self.masks[feat.reg.index()] |= 1 << feat.bit;
    }

    /// Whether `name` is in the set (false for unknown names).
    pub fn has(&self, name: &str) -> bool {
        feature(name).is_some_and(|f| self.mask(f.reg) & (1 << f.bit) != 0)
    }

    /// The bits of one register.
    pub fn mask(&self, reg: FeatureReg) -> u32 {
        self.masks[reg.index()]
    }

    /// Sets the bits of one register.
    pub fn set_mask(&mut self, reg: FeatureReg, mask: u32) {
        self.masks[reg.index()] = mask;
    }

    /// Features in `self` and not in `other`.
    pub fn minus(&self, other: &FeatureSet) -> FeatureSet {
        let mut out = *self;
        for (o, m) in out.masks.iter_mut().zip(other.masks) {
            *o &= !m;
        }
        out
    }

    /// Features in both.
    pub fn intersect(&self, other: &FeatureSet) -> FeatureSet {
        let mut out = *self;
        for (o, m) in out.masks.iter_mut().zip(other.masks) {
            *o &= m;
        }
        out
    }

    /// Features in either.
    pub fn union(&self, other: &FeatureSet) -> FeatureSet {
        let mut out = *self;
        for (o, m) in out.masks.iter_mut().zip(other.masks) {
            *o |= m;
        }
        out
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.masks.iter().all(|m| *m == 0)
    }

    /// Names of the known features in the set, in table order. Bits without
    /// a name are not listed.
    pub fn names(&self) -> Vec<&'static str> {
        KNOWN_FEATURES
            .iter()
            .filter(|f| self.mask(f.reg) & (1 << f.bit) != 0)
            .map(|f| f.name)
            .collect()
    }
}

impl From<FeatureSet> for Vec<String> {
    fn from(s: FeatureSet) -> Self {
        s.names().into_iter().map(str::to_string).collect()
    }
}

impl TryFrom<Vec<String>> for FeatureSet {
    type Error = UnknownFeature;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        FeatureSet::from_names(&v)
    }
}

/// Where the guest's CPUID vendor string comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VendorPolicy {
    /// The host's vendor (`GenuineIntel`, `AuthenticAMD`, …).
    Host,
    /// Always this 12-byte vendor string.
    Fixed(String),
}

/// Kind of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    /// Data cache.
    Data,
    /// Instruction cache.
    Instruction,
    /// Unified cache.
    Unified,
}

/// One cache as CPUID describes it (leaf 4 and leaves 0x8000_0005/6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    /// 1, 2 or 3.
    pub level: u8,
    /// Data, instruction or unified.
    pub kind: CacheKind,
    /// Size in KiB.
    pub size_kib: u32,
    /// Associativity.
    pub ways: u16,
    /// Line size in bytes.
    pub line_size: u16,
    /// Shared by every core of the package (else private to a core).
    pub shared: bool,
}

/// The TLB registers of leaves 0x8000_0005 and 0x8000_0006 (AMD's format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmdTlb {
    /// Leaf 0x8000_0005 EAX: L1 TLB for 2 MiB/4 MiB pages.
    pub l1_large: u32,
    /// Leaf 0x8000_0005 EBX: L1 TLB for 4 KiB pages.
    pub l1_4k: u32,
    /// Leaf 0x8000_0006 EAX: L2 TLB for 2 MiB/4 MiB pages.
    pub l2_large: u32,
    /// Leaf 0x8000_0006 EBX: L2 TLB for 4 KiB pages.
    pub l2_4k: u32,
}

/// Leaf 2 of the named models: one iteration, descriptor 0xff ("no
/// descriptors here, use leaf 4").
const LEAF2_USE_LEAF4: [u32; 4] = [1, 0, 0, 0xff];

/// The TLBs of the named models (QEMU's values): 255-entry L1 TLBs, no L2
/// TLB for large pages, a 512-entry 4-way L2 TLB for 4 KiB pages.
const STANDARD_TLB: AmdTlb = AmdTlb {
    l1_large: 0x01ff_01ff,
    l1_4k: 0x01ff_01ff,
    l2_large: 0,
    l2_4k: 0x4200_4200,
};

/// A CPU model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// Name (`abide-v1`, …).
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Vendor string policy.
    pub vendor: VendorPolicy,
    /// Family (may exceed 0xf: the extended family is derived).
    pub family: u16,
    /// Model (may exceed 0xf: the extended model is derived).
    pub model: u8,
    /// Stepping (0..=15).
    pub stepping: u8,
    /// Brand string (leaves 0x8000_0002..4), at most 47 bytes.
    pub brand: String,
    /// CPU feature bits.
    pub features: FeatureSet,
    /// KVM paravirtual features (leaf 0x4000_0001 EAX).
    pub kvm_features: FeatureSet,
    /// Highest basic leaf (leaf 0 EAX).
    pub max_basic_leaf: u32,
    /// Highest extended leaf (leaf 0x8000_0000 EAX).
    pub max_ext_leaf: u32,
    /// Physical address width (leaf 0x8000_0008 EAX[7:0]); the host must
    /// have at least this many.
    pub phys_bits: u8,
    /// Linear address width (leaf 0x8000_0008 EAX[15:8]).
    pub virt_bits: u8,
    /// Cache hierarchy.
    pub caches: Vec<Cache>,
    /// Leaf 2 (EAX, EBX, ECX, EDX) when `max_basic_leaf` >= 2: cache and
    /// TLB descriptors.
    pub leaf2: [u32; 4],
    /// TLB descriptions in AMD's format (the cache fields of the same
    /// leaves come from `caches`).
    pub tlb: AmdTlb,
    /// Pass the host's KVM-supported CPUID through instead of the fields
    /// above (the `host` model). Such a VM is not migratable.
    pub passthrough: bool,
}

impl CpuModel {
    /// Whether a VM with this model can move to another host: everything it
    /// sees is pinned here (except the vendor under [`VendorPolicy::Host`]).
    pub fn migratable(&self) -> bool {
        !self.passthrough
    }

    /// CPU and KVM features together, for checks against a host.
    pub fn all_features(&self) -> FeatureSet {
        self.features.union(&self.kvm_features)
    }

    /// Leaf 1 EAX: the family/model/stepping signature.
    pub fn signature(&self) -> u32 {
        let (family, ext_family) = if self.family > 0xf {
            (0xf, u32::from(self.family - 0xf))
        } else {
            (u32::from(self.family), 0)
        };
        let model = u32::from(self.model);
        (ext_family << 20)
            | ((model >> 4) << 16)
            | (family << 8)
            | ((model & 0xf) << 4)
            | u32::from(self.stepping & 0xf)
    }
}

/// Name of the pass-through model.
pub const HOST_MODEL: &str = "host";

const V1_FEATURES: &[&str] = &[
    // Leaf 1 EDX. `vme` is left out: it only matters to virtual-8086 mode,
    // which a 64-bit guest never uses, and KVM on AMD does not always offer it
    // (the nested test host's KVM does not).
    "fpu",
    "de",
    "pse",
    "tsc",
    "msr",
    "pae",
    "mce",
    "cx8",
    "apic",
    "sep",
    "mtrr",
    "pge",
    "mca",
    "cmov",
    "pat",
    "pse36",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2", //
    // Leaf 1 ECX.
    "hypervisor", //
    // Leaf 6: the LAPIC timer keeps running in idle states.
    "arat", //
    // 0x8000_0001 EDX.
    "syscall",
    "nx",
    "lm",
];

/// x86-64-v2 on top of v1.
const V2_LEVEL2: &[&str] = &[
    "pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "lahf_lm",
];

/// x86-64-v3 on top of v2 (`abm` is LZCNT; OSXSAVE follows `xsave`).
const V2_LEVEL3: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "fma", "movbe", "xsave", "f16c", "abm",
];

/// What a 2026 cloud guest expects beyond x86-64-v3, limited to what KVM
/// offers on the oldest hosts Abide targets (AMD Zen 1, Intel Broadwell;
/// checked against the nested test host's KVM): AES-NI and carry-less
/// multiply for crypto, RDRAND, ADX, RDTSCP, 1 GiB pages, FSGSBASE,
/// SMEP/SMAP, CLFLUSHOPT, XSAVEOPT, x2APIC.
const V2_CLOUD: &[&str] = &[
    "aes",
    "pclmulqdq",
    "rdrand",
    "adx",
    "rdtscp",
    "pdpe1gb",
    "fsgsbase",
    "smep",
    "smap",
    "clflushopt",
    "xsaveopt",
    "xgetbv1",
    "x2apic",
];

const V1_KVM: &[&str] = &[
    "clocksource",
    "nopiodelay",
    "clocksource2",
    "pv_eoi",
    "pv_unhalt",
    "clocksource_stable_bit",
];

const V2_KVM_EXTRA: &[&str] = &[
    "steal_time",
    "pv_tlb_flush",
    "pv_send_ipi",
    "pv_sched_yield",
];

fn set(lists: &[&[&str]]) -> FeatureSet {
    let names: Vec<&str> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    FeatureSet::from_names(&names).unwrap_or_else(|e| panic!("built-in CPU model: {e}"))
}

fn standard_caches() -> Vec<Cache> {
    let c = |level, kind, size_kib, ways, shared| Cache {
        level,
        kind,
        size_kib,
        ways,
        line_size: 64,
        shared,
    };
    vec![
        c(1, CacheKind::Data, 32, 8, false),
        c(1, CacheKind::Instruction, 32, 8, false),
        c(2, CacheKind::Unified, 512, 8, false),
        c(3, CacheKind::Unified, 16 * 1024, 16, true),
    ]
}

/// `abide-v1`: baseline x86-64. Runs on any x86-64 KVM, including PVM.
/// Frozen: never change a value here.
pub fn abide_v1() -> CpuModel {
    CpuModel {
        name: "abide-v1".to_string(),
        description: "baseline x86-64 (SSE2, no XSAVE); runs on any x86-64 KVM host, including PVM"
            .to_string(),
        vendor: VendorPolicy::Host,
        family: 0xf,
        model: 0x6b,
        stepping: 1,
        brand: "Abide Virtual CPU v1 (x86-64)".to_string(),
        features: set(&[V1_FEATURES]),
        kvm_features: set(&[V1_KVM]),
        max_basic_leaf: 0xd,
        max_ext_leaf: 0x8000_0008,
        phys_bits: 40,
        virt_bits: 48,
        caches: standard_caches(),
        leaf2: LEAF2_USE_LEAF4,
        tlb: STANDARD_TLB,
        passthrough: false,
    }
}

/// `abide-v2`: x86-64-v3 plus common cloud features. Frozen.
pub fn abide_v2() -> CpuModel {
    CpuModel {
        name: "abide-v2".to_string(),
        description: "x86-64-v3 (AVX2, BMI, FMA, XSAVE) plus AES-NI, SMEP/SMAP, FSGSBASE, x2APIC; \
                      needs hardware-assisted KVM (AMD Zen or Intel Broadwell and later)"
            .to_string(),
        vendor: VendorPolicy::Host,
        family: 0xf,
        model: 0x6b,
        stepping: 1,
        brand: "Abide Virtual CPU v2 (x86-64-v3)".to_string(),
        features: set(&[V1_FEATURES, V2_LEVEL2, V2_LEVEL3, V2_CLOUD]),
        kvm_features: set(&[V1_KVM, V2_KVM_EXTRA]),
        max_basic_leaf: 0xd,
        max_ext_leaf: 0x8000_0008,
        phys_bits: 40,
        virt_bits: 48,
        caches: standard_caches(),
        leaf2: LEAF2_USE_LEAF4,
        tlb: STANDARD_TLB,
        passthrough: false,
    }
}

/// `host`: whatever this host's KVM offers. Not migratable.
pub fn host() -> CpuModel {
    CpuModel {
        name: HOST_MODEL.to_string(),
        description: "everything this host's KVM offers (not migratable)".to_string(),
        vendor: VendorPolicy::Host,
        family: 0,
        model: 0,
        stepping: 0,
        brand: String::new(),
        features: FeatureSet::empty(),
        kvm_features: FeatureSet::empty(),
        max_basic_leaf: 0,
        max_ext_leaf: 0,
        phys_bits: 0,
        virt_bits: 0,
        caches: Vec::new(),
        leaf2: [0; 4],
        tlb: AmdTlb {
            l1_large: 0,
            l1_4k: 0,
            l2_large: 0,
            l2_4k: 0,
        },
        passthrough: true,
    }
}

const MODELS: &[fn() -> CpuModel] = &[abide_v1, abide_v2, host];

/// Every CPU model, oldest named model first, `host` last.
pub fn cpu_models() -> Vec<CpuModel> {
    MODELS.iter().map(|m| m()).collect()
}

/// An unknown CPU model name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU model '{name}'; valid CPU models: {valid}")]
pub struct UnknownCpuModel {
    /// The name given.
    pub name: String,
    /// Valid names.
    pub valid: String,
}

/// Looks a CPU model up by name.
pub fn cpu_model(name: &str) -> Result<CpuModel, UnknownCpuModel> {
    cpu_models()
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| UnknownCpuModel {
            name: name.to_string(),
            valid: cpu_models()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_table_is_consistent() {
        for (i, a) in KNOWN_FEATURES.iter().enumerate() {
            assert!(a.bit < 32);
            for b in &KNOWN_FEATURES[i + 1..] {
                assert_ne!(a.name, b.name, "duplicate name");
                assert!(
                    a.reg != b.reg || a.bit != b.bit,
                    "{} and {}",
                    a.name,
                    b.name
                );
            }
        }
    }

    #[test]
    fn models_resolve_and_machines_defaults_exist() {
        for t in crate::machine_types() {
            let m = crate::resolve(&t.name).expect("machine");
            cpu_model(&m.default_cpu_model).expect("default CPU model exists");
        }
        let err = cpu_model("pentium").expect_err("unknown");
        assert!(
            err.to_string().contains("abide-v1, abide-v2, host"),
            "{err}"
        );
    }

    #[test]
    fn v1_is_baseline_and_v2_extends_it() {
        let (v1, v2) = (abide_v1(), abide_v2());
        for name in ["fpu", "sse2", "lm", "nx", "syscall", "hypervisor", "cx8"] {
            assert!(v1.features.has(name), "{name}");
        }
        // v1 must run under PVM: no XSAVE, no SSE3 and later.
        for name in ["xsave", "avx", "pni", "ssse3", "popcnt", "cx16", "vme"] {
            assert!(!v1.features.has(name), "{name}");
        }
        assert!(v1.features.minus(&v2.features).is_empty());
        assert!(v1.kvm_features.minus(&v2.kvm_features).is_empty());
        // x86-64-v2 and v3.
        for name in [
            "pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "lahf_lm", "avx", "avx2", "bmi1",
            "bmi2", "fma", "movbe", "xsave", "f16c", "abm",
        ] {
            assert!(v2.features.has(name), "{name}");
        }
        assert!(v1.migratable() && v2.migratable() && !host().migratable());
    }

    #[test]
    fn named_models_are_self_consistent() {
        for m in cpu_models().into_iter().filter(|m| !m.passthrough) {
            let needs = |a: &str, b: &str| {
                assert!(
                    !m.features.has(a) || m.features.has(b),
                    "{}: {a} needs {b}",
                    m.name
                );
            };
            needs("avx", "xsave");
            needs("avx2", "avx");
            needs("fma", "avx");
            needs("f16c", "avx");
            needs("xsaveopt", "xsave");
            needs("xgetbv1", "xsave");
            needs("sse4_2", "sse4_1");
            assert!(m.brand.len() <= 47, "{}", m.name);
            assert!(m.max_basic_leaf >= 0xb, "topology leaf 0xb");
            assert!(m.max_ext_leaf >= 0x8000_0008);
            for r in FeatureReg::ALL {
                let in_kvm = r == FeatureReg::KvmEax;
                assert!(in_kvm || m.kvm_features.mask(r) == 0);
                assert!(!in_kvm || m.features.mask(r) == 0);
            }
        }
    }

    #[test]
    fn signature_and_serde() {
        assert_eq!(abide_v1().signature(), 0x0006_0fb1);
        let zen = CpuModel {
            family: 0x19,
            model: 0x01,
            stepping: 1,
            ..abide_v1()
        };
        assert_eq!(zen.signature(), 0x00a0_0f11);
        let v2 = abide_v2();
        let json = serde_json_like(&v2.features);
        assert!(json.contains(&"avx2".to_string()));
        assert_eq!(FeatureSet::try_from(json).expect("names"), v2.features);
        assert!(FeatureSet::from_names(&["nope"]).is_err());
    }

    fn serde_json_like(s: &FeatureSet) -> Vec<String> {
        (*s).into()
    }
}
