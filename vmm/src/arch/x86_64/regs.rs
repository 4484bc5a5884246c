//! Initial vCPU state for the two boot protocols: general registers, segment/control
//! registers with the boot GDT and identity page tables, FPU, boot MSRs and the local APIC
//! LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, boot_gdt, kvm_segment_from_gdt};
use super::layout::*;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `%rsi` = zero page.
    Linux64(u64),
}

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write boot tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// KVM accepted fewer MSRs than were given.
    #[error("KVM set only {0} of {1} boot MSRs")]
    PartialMsrs(usize, usize),
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General purpose registers at entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        BootEntry::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Writes the boot GDT/IDT (and for 64-bit entry, the page tables) into guest memory and
/// fills `sregs` accordingly.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let long_mode = matches!(entry, BootEntry::Linux64(_));
    let table = boot_gdt(long_mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(table[gdt::CODE_INDEX as usize], gdt::CODE_INDEX);
    let data = kvm_segment_from_gdt(table[gdt::DATA_INDEX as usize], gdt::DATA_INDEX);
    let tss = kvm_segment_from_gdt(table[gdt::TSS_INDEX as usize], gdt::TSS_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    if long_mode {
        setup_page_tables(mem)?;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages (the kernel replaces these tables early;
/// 4 GiB rather than 1 GiB so that early code can reach the MMIO hole).
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + dir * 8))?;
        for i in 0..512u64 {
            let phys = (dir << 30) | (i << 21);
            mem.write_obj(phys | PRESENT_RW | PAGE_SIZE_2M, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// The x87/SSE state Linux expects at entry.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs given defined values at boot (SYSCALL/SYSENTER cleared, fast strings on, MTRRs on
/// with write-back default so the guest does not run uncached).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WB: u64 = 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]
}

/// Applies FPU and MSR boot values to `vcpu`.
pub fn setup_fpu_and_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu())
        .map_err(|e| RegsError::Kvm("SET_FPU", e))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a kvm_msrs");
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::PartialMsrs(set, entries.len()));
    }
    Ok(())
}

/// Wires the local APIC LINT0 pin as ExtINT (the legacy PIC) and LINT1 as NMI, as a PC does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 0x4;
    const MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("SET_LAPIC", e))
}

/// Full boot-time register setup of one vCPU. Only the boot vCPU (index 0) gets the entry
/// state; application processors wait in the in-kernel LAPIC for INIT/SIPI.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    boot_cpu: bool,
) -> Result<(), RegsError> {
    setup_fpu_and_msrs(vcpu)?;
    if boot_cpu {
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| RegsError::Kvm("GET_SREGS", e))?;
        setup_sregs(mem, entry, &mut sregs)?;
        vcpu.set_sregs(&sregs)
            .map_err(|e| RegsError::Kvm("SET_SREGS", e))?;
        vcpu.set_regs(&boot_regs(entry))
            .map_err(|e| RegsError::Kvm("SET_REGS", e))?;
    }
    setup_lint(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let m = mem();
        setup_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for dir in 0..4u64 {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + dir * 8)).unwrap();
            assert_eq!(pdpte & !0xfff, PDE_START + dir * 0x1000);
        }
        // Walk a few virtual addresses through the tables.
        for va in [
            0u64,
            0x20_0000,
            0x1000_0000,
            MMIO_DEVICES_START,
            FOUR_GIB - 1,
        ] {
            let pdpte: u64 = m
                .read_obj(GuestAddress(PDPTE_START + (va >> 30) * 8))
                .unwrap();
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB");
            assert_eq!((pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff), va);
        }
        // Nothing mapped beyond the first PML4 entry.
        let next: u64 = m.read_obj(GuestAddress(PML4_START + 8)).unwrap();
        assert_eq!(next, 0);
    }

    #[test]
    fn long_mode_sregs() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, BootEntry::Linux64(0x100_0000), &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, boot_gdt(true)[1]);
        let regs = boot_regs(BootEntry::Linux64(0x100_0000));
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, ZERO_PAGE_START, 2)
        );
    }

    #[test]
    fn pvh_sregs() {
        let m = mem();
        let mut sregs = kvm_sregs {
            cr0: X86_CR0_PG,
            ..Default::default()
        };
        setup_sregs(&m, BootEntry::Pvh(0x100_0200), &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        let regs = boot_regs(BootEntry::Pvh(0x100_0200));
        assert_eq!((regs.rip, regs.rbx), (0x100_0200, PVH_INFO_START));
        // PVH does not touch the page-table area.
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0);
    }

    #[test]
    fn msrs_and_fpu_values() {
        let msrs = boot_msr_entries();
        let mtrr = msrs.iter().find(|e| e.index == 0x2ff).unwrap();
        assert_eq!(mtrr.data, (1 << 11) | 6);
        assert_eq!(boot_fpu().fcw, 0x37f);
    }
}
