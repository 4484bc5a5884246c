//! virtio-rng: fills device-writable buffers with bytes from the host's `getrandom(2)`, so
//! the guest has entropy from early boot.

use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::Write;
use vmm_sys_util::eventfd::EventFd;

use super::{
    device_type, drain_queue, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 64;
/// Largest amount served per request, so one request cannot stall the event loop.
const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
pub struct Rng {
    evts: [EventFd; 1],
    active: Option<ActivateContext>,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evts: [EventFd::new(libc::EFD_NONBLOCK)?],
            active: None,
        })
    }

    /// Serves every pending request.
    pub fn process_queue(&mut self) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        drain_queue(&mut ctx.queues[0], &mem, &ctx.irq, |chain| {
            let mut w = match chain.writer(&mem) {
                Ok(w) => w,
                Err(e) => {
                    guest_warn!("virtio-rng: malformed request: {e}");
                    return 0;
                }
            };
            let mut buf = vec![0u8; w.available_bytes().min(MAX_REQUEST)];
            if let Err(e) = getrandom(&mut buf) {
                tracing::error!("virtio-rng: getrandom: {e}");
                return 0;
            }
            match w.write_all(&buf) {
                Ok(()) => buf.len() as u32,
                Err(e) => {
                    guest_warn!("virtio-rng: cannot write request: {e}");
                    0
                }
            }
        });
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer/length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.expect_queues(1)?;
        self.active = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if super::fired_queue(&self.evts, &events).is_some() {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        super::register_queue_events(&self.evts, ops, "virtio-rng");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::Driver;
    use crate::devices::virtio::IrqTrigger;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    fn active(d: &Driver) -> Rng {
        let mut rng = Rng::new().unwrap();
        rng.activate(ActivateContext {
            mem: d.mem.clone(),
            queues: vec![d.queue()],
            acked_features: VIRTIO_F_VERSION_1,
            irq: Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
        rng
    }

    #[test]
    fn fills_writable_buffers() {
        let mut d = Driver::new(64);
        let mut rng = active(&d);
        d.add_chain(&[(0x10000, 256, true), (0x20000, 256, true)]);
        rng.process_queue();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0), (0, 512));
        let mut buf = [0u8; 256];
        d.mem.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
        assert!(buf.iter().any(|b| *b != 0), "random bytes written");
        assert!(rng.active.as_ref().unwrap().irq.status() & 1 == 1);
    }

    #[test]
    fn malformed_chains_are_returned_empty() {
        let mut d = Driver::new(64);
        let mut rng = active(&d);
        // Readable-only chain (wrong direction): nothing written.
        d.add_chain(&[(0x10000, 64, false)]);
        // Buffer outside guest memory.
        d.add_chain(&[(0x4000_0000, 64, true)]);
        // A descriptor loop: 5 -> 6 -> 5.
        d.write_desc(
            5,
            0x10000,
            16,
            super::super::testing::NEXT | super::super::testing::WRITE,
            6,
        );
        d.write_desc(
            6,
            0x10010,
            16,
            super::super::testing::NEXT | super::super::testing::WRITE,
            5,
        );
        d.publish(5);
        rng.process_queue();
        assert_eq!(d.used_idx(), 3);
        assert_eq!(d.used(0).1, 0);
        assert_eq!(d.used(1).1, 0);
        assert_eq!(d.used(2).0, 5);
    }
}
