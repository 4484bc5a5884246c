//! The KVM VM: guest memory slots, in-kernel IOAPIC/PIC/LAPIC and PIT, irqfd and ioeventfd
//! registration, and vCPU creation with per-vCPU CPUID and boot registers.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, layout, regs};

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?): {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host KVM lacks a capability moat-vmm needs.
    #[error("host KVM lacks required capability {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Setting up a vCPU's registers failed.
    #[error("vCPU {0} setup: {1}")]
    Regs(u8, #[source] regs::RegsError),
}

/// A KVM VM with its guest memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ioeventfd: bool,
}

impl Vm {
    /// Creates the VM, registers `mem` and creates the in-kernel irqchip and PIT.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for cap in [Cap::Irqchip, Cap::UserMemory, Cap::Irqfd, Cap::ExtCpuid] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let ioeventfd = kvm.check_extension(Cap::Ioeventfd);
        let fd = kvm.create_vm().map_err(|e| VmError::Kvm("CREATE_VM", e))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Kvm("SET_TSS_ADDR", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the caller keeps
            // alive for as long as the VM exists (the Vmm owns both and drops the VM first).
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("SET_USER_MEMORY_REGION", e))?;
        }
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("CREATE_PIT2", e))?;
        Ok(Self { kvm, fd, ioeventfd })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Routes `evt` to guest interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Kvm("IRQFD", e))
    }

    /// Makes a 32-bit guest write of `value` to MMIO `addr` signal `evt` inside KVM. Returns
    /// false when the host KVM has no ioeventfd (the write then reaches the device model).
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<bool, VmError> {
        if !self.ioeventfd {
            return Ok(false);
        }
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| VmError::Kvm("IOEVENTFD", e))?;
        Ok(true)
    }

    /// Creates vCPU `index` of `count`, with filtered CPUID and boot state.
    pub fn create_vcpu(
        &self,
        index: u8,
        count: u8,
        mem: &GuestMemoryMmap,
        entry: regs::BootEntry,
    ) -> Result<VcpuFd, VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::Kvm("CREATE_VCPU", e))?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("GET_SUPPORTED_CPUID", e))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        cpuid::filter_for_vcpu(&mut cpuid, index, count, tsc_deadline);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::Kvm("SET_CPUID2", e))?;
        regs::setup_vcpu(&vcpu, mem, entry, index == 0).map_err(|e| VmError::Regs(index, e))?;
        Ok(vcpu)
    }
}
