//! Per-vCPU CPUID: KVM's supported leaves with APIC IDs and topology filled in.
//!
//! Topology: one socket, `cpus` cores, one thread per core; APIC ID == vCPU index.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_ADDR: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

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

/// Builds vCPU `index`'s CPUID from KVM's supported table.
pub fn for_vcpu(supported: &CpuId, index: u32, cpus: u32) -> CpuId {
    let apic_id = index;
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::new();
    for entry in supported.as_slice() {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (cpus.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            LEAF_EXT_ADDR => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC-ID bits for cores.
                e.ecx = (e.ecx & !0xf0ff) | ((cpus - 1) & 0xff) | (id_bits(cpus) << 12);
            }
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
    // `out` has at most the supported count plus six entries.
    CpuId::from_entries(&out).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_supported() -> CpuId {
        let entries = [
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
        ];
        CpuId::from_entries(&entries).expect("cpuid")
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    #[test]
    fn apic_ids_and_topology() {
        let s = fake_supported();
        let c = for_vcpu(&s, 3, 4);
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
        let c = for_vcpu(&fake_supported(), 0, 1);
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
}
