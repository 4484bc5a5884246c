//! The x86_64 machine: guest physical layout and e820 map (`layout`), the Linux/PVH boot
//! structures (`boot`), descriptor tables (`gdt`), initial vCPU state (`regs`), CPUID
//! filtering (`cpuid`), the MP table (`mptable`) and the ACPI tables (`acpi`, not given
//! to guests yet) announcing the
//! vCPUs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
