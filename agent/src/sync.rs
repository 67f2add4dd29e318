//! Locks that survive a panic elsewhere. Every map and value behind the agent's locks
//! is changed by single inserts, removals and replacements, never left half-updated by
//! a panic, so a poisoned lock still holds a usable value; refusing it instead would
//! stop serving secrets over one panicked task.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
