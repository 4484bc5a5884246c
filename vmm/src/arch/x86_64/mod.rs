//! The x86_64 machine: guest physical layout and e820 map (`layout`), the Linux/PVH boot
//! structures (`boot`), descriptor tables (`gdt`), initial vCPU state (`regs`), CPUID
//! filtering (`cpuid`) and the MP table announcing the vCPUs (`mptable`).

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
