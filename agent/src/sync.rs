//! Poison-tolerant locking of `std::sync::Mutex`: the agent's shared tables (containers,
//! execs, virtio-fs mounts, the reaper's waiters) stay usable after a panic in another
//! thread, since a panic never leaves them half-updated (every update is one map operation).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] that recovers the guard of a poisoned mutex instead of failing.
pub trait LockExt<T> {
    /// Locks, taking the guard over even when a previous holder panicked.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_poisoned_mutex() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.lock_or_recover() += 1;
        assert_eq!(*m.lock_or_recover(), 2);
    }
}
