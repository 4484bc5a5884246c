//! The 8250 UART on COM1 (vm-superio's `Serial`): the guest console. Output goes to stdout,
//! a file, a FIFO or nowhere; its interrupt is an irqfd on GSI 4. With output on stdout,
//! [`SerialInput`] feeds the VMM's stdin to the guest (for interactive debugging).

use std::io::Write;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// COM1 base port.
pub const SERIAL_PORT: u64 = 0x3f8;
/// Number of COM1 registers.
pub const SERIAL_LEN: u64 = 8;

/// Raises a guest interrupt line through an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The 8250 UART; output goes to `W` (stdout, a file, a pipe, or a sink).
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, *b) {
                tracing::warn!("serial: {e:?}");
            }
            // Interactive consoles want every byte; a file sink flushes on drop anyway.
            if off == 0 {
                let _ = self.serial.writer_mut().flush();
            }
        }
    }
}

/// Copies bytes from a host fd (the VMM's stdin) into the UART's receive FIFO. Input beyond
/// the FIFO's free space is dropped, as on a real UART overrun.
pub struct SerialInput {
    fd: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
}

impl SerialInput {
    /// Feeds `fd` (not owned; it must stay open) into `serial`.
    pub fn new(fd: RawFd, serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self { fd, serial }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reads at most `buf.len()` bytes into `buf` from an fd we were given open.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EOF or error: stop watching (the guest console keeps working for output).
            let _ = ops.remove(events);
            return;
        }
        let mut dev = crate::devices::lock(&self.serial);
        let room = dev.serial.fifo_capacity().min(n as usize);
        if let Err(e) = dev.serial.enqueue_raw_bytes(&buf[..room]) {
            tracing::warn!("serial input: {e:?}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // /dev/null and regular files cannot be polled: no console input then.
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::debug!("serial input disabled: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_reach_the_sink_and_raise_the_irq() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        s.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() > 0);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
    }

    #[test]
    fn host_input_reaches_the_receive_fifo() {
        use event_manager::{EventManager, SubscriberOps};
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Box::new(std::io::sink()),
        )));
        let mut em: EventManager<Arc<Mutex<SerialInput>>> = EventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(fds[0], dev.clone()))));
        // SAFETY: writing two bytes from a static buffer to our pipe.
        assert_eq!(unsafe { libc::write(fds[1], b"ok".as_ptr().cast(), 2) }, 2);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        let mut b = [0u8];
        let mut d = dev.lock().unwrap();
        d.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "data ready");
        d.read(0, &mut b);
        assert_eq!(b[0], b'o');
        d.read(0, &mut b);
        assert_eq!(b[0], b'k');
        drop(d);
        // SAFETY: closing the fds we created.
        unsafe {
            libc::close(fds[1]);
        }
        // EOF unregisters the input; nothing else happens.
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
        // SAFETY: closing the read end we created.
        unsafe {
            libc::close(fds[0]);
        }
    }
}
