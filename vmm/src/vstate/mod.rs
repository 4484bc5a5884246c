//! KVM state: the VM file descriptor with its memory slots, in-kernel irqchip and PIT
//! (`vm`), and the vCPUs, one thread each, with their run loop and pause/stop control (`vcpu`).

pub mod vcpu;
pub mod vm;
