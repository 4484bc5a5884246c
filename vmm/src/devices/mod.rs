//! Emulated devices and the buses the vCPUs dispatch port I/O and MMIO exits to.
//!
//! `legacy` holds the PC devices (8250 serial, i8042, boot marker port); `virtio` the
//! virtio-mmio transport and the virtio devices.

/// Logs a warning the guest can trigger at will (malformed requests, register misuse): the
/// first 10 from each call site, then every 1000th with its running number, so a misbehaving
/// guest cannot flood the VMM's log.
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < 10 || n.is_multiple_of(1000) {
            tracing::warn!("{} (guest-triggered, #{} here)", format_args!($($arg)+), n + 1);
        }
    }};
}

pub mod legacy;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO. `offset` is relative to the registered base.
pub trait BusDevice: Send {
    /// Handles a guest read; `data` is pre-filled with zeros.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering devices on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space (I/O ports or MMIO) mapping ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` at `[base, base + len)`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((b, (l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a read; returns false when no device is there (data stays zero).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex, recovering from poisoning: a device that panicked mid-access has
/// already failed its request; the VM keeps running and the device state is whatever it was.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 0x9).is_err());
        assert!(bus.insert(dev.clone(), 0x100, 0).is_err());
        bus.insert(dev.clone(), 0x110, 1).unwrap();
        let mut b = [9u8; 2];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b, [3, 3]);
        assert!(!bus.read(0x111, &mut b));
        assert_eq!(b, [0, 0]);
        assert!(bus.write(0x10f, &[1]));
        assert!(!bus.write(0xff, &[1]));
        assert_eq!(lock(&dev).0, vec![(0xf, vec![1])]);
    }
}
