//! The virtio-mmio transport (virtio 1.2 section 4.2, register layout version 2). Runs on
//! the vCPU threads: feature negotiation, queue setup, device status, interrupt
//! status/acknowledge, config space; on DRIVER_OK it hands the queues to the device.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, ActivateError, IrqTrigger, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
};
use crate::devices::{lock, BusDevice};

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Register layout version of virtio 1.x.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("MOAT").
pub const VENDOR_ID: u32 = 0x5441_4f4d;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// One virtio device behind an MMIO window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue size the virtio-queue crate rejects (not a power of two, or 0).
    #[error("invalid queue size: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// Duplicating a queue eventfd failed.
    #[error("cannot clone queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// At DRIVER_OK, a ready queue's rings lie outside guest memory.
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    /// At DRIVER_OK, a queue's state was refused by the virtio-queue crate.
    #[error("queue state: {0}")]
    QueueState(#[source] virtio_queue::Error),
    /// The device refused activation.
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

impl MmioTransport {
    /// Wraps `device`, raising interrupts through `irq`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
    ) -> Result<Self, MmioError> {
        let (queues, notify) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|s| Queue::new(*s).map_err(MmioError::Queue))
                .collect::<Result<Vec<_>, _>>()?;
            let notify = d
                .queue_events()
                .iter()
                .map(|e| e.try_clone().map_err(MmioError::EventFd))
                .collect::<Result<Vec<_>, _>>()?;
            (queues, notify)
        };
        Ok(Self {
            device,
            mem,
            irq,
            queues,
            notify,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & status::FEATURES_OK == 0 {
            guest_warn!("virtio-mmio: queue setup outside the FEATURES_OK phase ignored");
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let dev = lock(&self.device);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => dev.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => dev.features() as u32,
                1 => (dev.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation.wrapping_add(dev.config_generation()),
            _ => {
                guest_warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
                    guest_warn!("virtio-mmio: feature write outside negotiation ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => guest_warn!(
                        "virtio-mmio: driver features page {} ignored",
                        self.driver_features_sel
                    ),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16)
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1)
                }
            }
            reg::QUEUE_DESC_LOW => self.set_addr(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.set_addr(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.set_addr(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.set_addr(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.set_addr(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.set_addr(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => {
                // Only reached when KVM has no ioeventfd for this address.
                if let Some(evt) = self.notify.get(v as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::error!("virtio-mmio: cannot signal queue {v}: {e}");
                    }
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => guest_warn!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q)
        }
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.irq.ack(u32::MAX);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & self.status != self.status {
            guest_warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {v:#x})",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0
            {
                guest_warn!(
                    "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.acked_features
                );
                self.status = v & !status::FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let invalid = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem));
        let result = match invalid {
            Some(i) => Err(MmioError::InvalidQueue(i)),
            None => {
                let queues = self
                    .queues
                    .iter()
                    .map(|q| Queue::try_from(q.state()))
                    .collect::<Result<Vec<_>, _>>();
                let queues = match queues {
                    Ok(q) => q,
                    Err(e) => return self.activation_failed(MmioError::QueueState(e)),
                };
                let ctx = ActivateContext {
                    mem: self.mem.clone(),
                    queues,
                    acked_features: self.acked_features,
                    irq: self.irq.clone(),
                };
                lock(&self.device).activate(ctx).map_err(MmioError::from)
            }
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => self.activation_failed(e),
        }
    }

    fn activation_failed(&mut self, e: MmioError) {
        tracing::error!("virtio-mmio: activation failed: {e}");
        self.status |= status::DEVICE_NEEDS_RESET;
        self.irq.trigger(INT_CONFIG);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!(
                "virtio-mmio: {}-byte register read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use vm_memory::GuestAddress;

    struct Dummy {
        evts: Vec<EventFd>,
        activated: Option<usize>,
        resets: usize,
        fail: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5], offset, data)
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Backend {
                    what: "nope",
                    err: std::io::Error::other("nope"),
                });
            }
            self.activated = Some(ctx.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn setup(fail: bool) -> (MmioTransport, Arc<Mutex<Dummy>>, Arc<IrqTrigger>) {
        let dev = Arc::new(Mutex::new(Dummy {
            evts: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            activated: None,
            resets: 0,
            fail,
        }));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(dev.clone(), mem, irq.clone()).unwrap();
        (t, dev, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 0b100);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u64) {
        w(t, reg::QUEUE_SEL, sel);
        w(t, reg::QUEUE_NUM, 8);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, 0);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = setup(false);
        assert_eq!(r(&mut t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0b101);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
        w(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        // Narrow register reads are ignored; config space reads are byte-granular.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut c = [0u8; 3];
        t.read(reg::CONFIG + 3, &mut c);
        assert_eq!(c, [4, 5, 0]);
    }

    #[test]
    fn feature_negotiation_rejects_unoffered_or_legacy() {
        let (mut t, _, _) = setup(false);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, 0b10); // not offered
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

        let (mut t, _, _) = setup(false);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, 0b1); // no VERSION_1
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

        let (mut t, _, _) = setup(false);
        negotiate(&mut t);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1 | 0b100);
        // Features are frozen after FEATURES_OK.
        w(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1 | 0b100);
    }

    #[test]
    fn activation_reset_and_interrupts() {
        let (mut t, dev, irq) = setup(false);
        // Queue setup before FEATURES_OK is ignored.
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(lock(&dev).activated, Some(2));
        // Queue registers are frozen once live.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Notify falls back to the queue eventfd.
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(lock(&dev).evts[1].read().unwrap(), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 9); // out of range: ignored
        irq.trigger(super::super::INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(lock(&dev).resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn invalid_queue_or_failing_device_needs_reset() {
        let (mut t, dev, irq) = setup(false);
        negotiate(&mut t);
        // Rings outside guest memory.
        setup_queue(&mut t, 0, 0x4000_0000);
        w(&mut t, reg::STATUS, 0xf);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(lock(&dev).activated, None);

        let (mut t, dev, _) = setup(true);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(lock(&dev).activated, None);
    }
}
