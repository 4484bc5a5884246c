//! The x86_64 machine: guest physical layout and e820 map (`layout`), the Linux/PVH boot
//! structures (`boot`), descriptor tables (`gdt`), initial vCPU state (`regs`), CPUID
//! filtering (`cpuid`), and the MP table (`mptable`) and ACPI tables (`acpi`) announcing the
//! vCPUs and interrupt controllers (ACPI also carries guest power-off).

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
