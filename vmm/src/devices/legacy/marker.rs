//! The boot marker port: the guest writes 123 to port 0x3f0 when its init is reached; the
//! VMM logs and records the time since its own start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::devices::BusDevice;

/// Boot marker port (interface fixed by the project).
pub const MARKER_PORT: u64 = 0x3f0;
/// Value the guest writes to the marker port when init is reached.
pub const MARKER_VALUE: u8 = 123;

/// Records when the guest reports "init reached" (byte 123 on port 0x3f0).
pub struct BootMarker {
    start: Instant,
    /// Milliseconds since VMM start at the first marker; `u64::MAX` until then.
    ms: Arc<AtomicU64>,
}

/// Value of the shared boot-marker cell before the guest wrote it.
pub const MARKER_UNSET: u64 = u64::MAX;

impl BootMarker {
    /// A marker measuring from `start` (the VMM process start) into `ms`.
    pub fn new(start: Instant, ms: Arc<AtomicU64>) -> Self {
        Self { start, ms }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&MARKER_VALUE) {
            return;
        }
        let ms = self.start.elapsed().as_millis() as u64;
        if self
            .ms
            .compare_exchange(MARKER_UNSET, ms, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            eprintln!("boot marker: {ms} ms since moat-vmm start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_records_once_and_ignores_other_values() {
        let ms = Arc::new(AtomicU64::new(MARKER_UNSET));
        let mut m = BootMarker::new(Instant::now(), ms.clone());
        m.write(0, &[1]);
        assert_eq!(ms.load(Ordering::SeqCst), MARKER_UNSET);
        m.write(0, &[MARKER_VALUE]);
        let first = ms.load(Ordering::SeqCst);
        assert_ne!(first, MARKER_UNSET);
        m.write(0, &[MARKER_VALUE]);
        assert_eq!(ms.load(Ordering::SeqCst), first);
    }
}
