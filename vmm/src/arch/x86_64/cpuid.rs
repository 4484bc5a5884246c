//! CPUID for each vCPU: KVM's supported CPUID, filtered so every vCPU reports its own APIC
//! id, the VM's topology (one socket, `count` cores, one thread each) and the hypervisor bit.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID leaf 1: version and feature information.
const LEAF_FEATURES: u32 = 0x1;
/// CPUID leaf 4: deterministic cache parameters (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// CPUID leaf 6: thermal and power management.
const LEAF_THERMAL: u32 = 0x6;
/// CPUID leaf 0xa: architectural performance monitoring.
const LEAF_PMU: u32 = 0xa;
/// CPUID leaf 0xb: extended topology enumeration.
const LEAF_TOPOLOGY: u32 = 0xb;
/// CPUID leaf 0x1f: V2 extended topology enumeration.
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// AMD leaf 0x8000_0008: address sizes and core count.
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// AMD leaf 0x8000_001e: extended APIC id / compute unit.
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Number of bits needed to encode `count` distinct ids.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Filters `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` out of `count`.
///
/// `tsc_deadline` says whether the in-kernel LAPIC offers TSC-deadline mode
/// (`KVM_CAP_TSC_DEADLINE_TIMER`).
pub fn filter_for_vcpu(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, index, count, tsc_deadline);
    }
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(index);
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package,
            // EBX[15:8] CLFLUSH line size in qwords (keep).
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if tsc_deadline {
                entry.ecx |= ECX_TSC_DEADLINE;
            }
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1:
            // caches above L2 are shared by the whole package, L1/L2 are per core.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { u32::from(count) - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((u32::from(count) - 1) << 26);
        }
        LEAF_THERMAL => {
            // No power management to the guest: clear turbo / HWP bits.
            entry.eax &= !((1 << 1) | (1 << 7));
        }
        LEAF_PMU => {
            // No virtual PMU: performance counters would let the guest probe the host.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            // Sub-leaf 0: SMT level with one thread per core; sub-leaf 1: core level.
            let (shift, logical, level_type) = match entry.index {
                0 => (0, 1, 1),
                1 => (id_bits(count), u32::from(count), 2),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = logical;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
            entry.edx = apic_id;
        }
        LEAF_AMD_SIZES => {
            // ECX[15:12] APIC id size, ECX[7:0] number of cores - 1.
            entry.ecx = (id_bits(count) << 12) | (u32::from(count) - 1);
        }
        LEAF_AMD_EXT_APIC => {
            entry.eax = apic_id;
            entry.ebx = (entry.ebx & 0xffff_ff00) | apic_id;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0800,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            leaf(LEAF_FEATURES, 0),
            leaf(LEAF_CACHE_PARAMS, 0),
            leaf(LEAF_PMU, 0),
            leaf(LEAF_TOPOLOGY, 0),
            leaf(LEAF_TOPOLOGY, 1),
            leaf(LEAF_AMD_SIZES, 0),
            leaf(0x4000_0000, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn every_vcpu_gets_its_apic_id_and_the_count() {
        for index in 0..4u8 {
            let mut c = sample();
            filter_for_vcpu(&mut c, index, 4, true);
            let f = find(&c, LEAF_FEATURES, 0);
            assert_eq!(f.ebx >> 24, u32::from(index));
            assert_eq!((f.ebx >> 16) & 0xff, 4);
            assert_eq!(f.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(f.ecx & ECX_TSC_DEADLINE, 0);
            assert_ne!(f.edx & EDX_HTT, 0);
            assert_eq!(find(&c, LEAF_TOPOLOGY, 0).edx, u32::from(index));
            assert_eq!(find(&c, LEAF_TOPOLOGY, 1).edx, u32::from(index));
        }
    }

    #[test]
    fn topology_levels() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 1, 3, false);
        let smt = find(&c, LEAF_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8 & 0xff), (0, 1, 1));
        let core = find(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8 & 0xff), (2, 3, 2));
        assert_eq!(find(&c, LEAF_AMD_SIZES, 0).ecx, (2 << 12) | 2);
        assert_eq!(find(&c, LEAF_CACHE_PARAMS, 0).eax >> 26, 2);
        assert_eq!(find(&c, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_pmu() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 0, 1, false);
        assert_eq!(find(&c, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
        let pmu = find(&c, LEAF_PMU, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        // Leaves we do not own are left as KVM reported them (hypervisor leaf included).
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0xffff_ffff);
    }
}
