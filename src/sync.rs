//! Locking that survives a poisoned lock.
//!
//! Nothing in easel panics while holding a lock, but a panic caught elsewhere (yrs
//! integration runs under `catch_unwind`) must not turn every later lock into a second
//! panic: the data behind these locks stays consistent between statements, so the guard is
//! taken back from the poison. One place for it, instead of `unwrap_or_else(|e|
//! e.into_inner())` at every lock. Owns nothing else; `store` and `doc` keep their own.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, recovering the guard from a poisoned lock.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, recovering the guard from a poisoned lock.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, recovering the guard from a poisoned lock.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
