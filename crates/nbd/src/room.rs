//! Waiting for room under a lock, with a last thing to do before the first wait.

use parking_lot::{Condvar, MutexGuard};

/// Waits on `freed` while `full(state)` holds. Before the first wait (only if there is one),
/// `before_wait` runs with the lock released — a connection's reader sends the replies it
/// batched there, so no client waits for them while the reader waits for room.
pub(crate) fn wait_for_room<T>(
    state: &mut MutexGuard<'_, T>,
    freed: &Condvar,
    mut full: impl FnMut(&T) -> bool,
    before_wait: impl FnOnce(),
) {
    let mut before_wait = Some(before_wait);
    while full(state) {
        match before_wait.take() {
            Some(f) => MutexGuard::unlocked(state, f),
            None => freed.wait(state),
        }
    }
}
