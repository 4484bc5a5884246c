//! Architecture support. moat-vmm runs x86_64 guests only; everything that knows about the
//! x86 machine (memory map, boot protocol, CPU state, CPUID, MP table) lives under `x86_64`.

pub mod x86_64;
