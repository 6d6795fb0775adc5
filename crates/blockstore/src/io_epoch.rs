//! Grace periods for data I/O: when a block freed by a commit may be handed out again.
//!
//! A reader or writer of data blocks finds them through metadata and then reads or writes them
//! without the metadata lock. A block freed meanwhile must not be reused while such an I/O is
//! still under way, or the I/O would read another VDI's data or write into it. So each data
//! I/O holds an [`IoGuard`] from before its lookup until its I/O ends, and a commit, before it
//! makes its frees allocatable, waits for every guard taken before it began to wait
//! ([`IoEpochs::wait_for_earlier`]).
//!
//! Guards taken while a commit waits do not wait for it and do not hold it up: they found
//! their blocks through metadata in which the blocks being released were already free. (A
//! read-write lock drained by the commit would do the same job, but stop every VM's new I/O
//! for as long as the slowest request in flight — once per commit.)
//!
//! Two counters, one per parity of the epoch: a guard counts itself in the current epoch's
//! counter; the waiter moves the epoch on and waits for the previous one's counter to reach
//! zero. Waits are serialized, so the counter a new epoch reuses is always empty of guards
//! that belong to the waiter before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

use parking_lot::{Condvar, Mutex};

/// Counts data I/O in flight by epoch (see the module documentation).
#[derive(Default)]
pub struct IoEpochs {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    /// The counter a waiter may be asleep on, plus one (0: none), so that the last guard
    /// counted there wakes it and no other guard does.
    waiting: AtomicUsize,
    wake: Mutex<()>,
    drained: Condvar,
    /// One waiter at a time.
    serial: Mutex<()>,
}

/// Held by a data read or write from before it looks its blocks up until its I/O is done.
#[must_use = "the guard covers the I/O only while it is held"]
pub struct IoGuard<'a> {
    epochs: &'a IoEpochs,
    slot: usize,
}

impl IoEpochs {
    /// Counts an I/O in the current epoch until the guard is dropped. Never waits.
    pub fn enter(&self) -> IoGuard<'_> {
        loop {
            let epoch = self.epoch.load(SeqCst);
            let slot = (epoch % 2) as usize;
            self.active[slot].fetch_add(1, SeqCst);
            // A waiter may have moved the epoch on between the load and the count, and may
            // already have seen this counter empty: count again in the new epoch.
            if self.epoch.load(SeqCst) == epoch {
                return IoGuard { epochs: self, slot };
            }
            self.leave(slot);
        }
    }

    fn leave(&self, slot: usize) {
        if self.active[slot].fetch_sub(1, SeqCst) == 1 && self.waiting.load(SeqCst) == slot + 1 {
            let _wake = self.wake.lock();
            self.drained.notify_all();
        }
    }

    /// Waits until every guard taken before this call has been dropped. Guards taken during
    /// the wait neither wait nor are waited for.
    pub fn wait_for_earlier(&self) {
        let _serial = self.serial.lock();
        let previous = self.epoch.fetch_add(1, SeqCst);
        // Race tests stop a commit here: the epoch has moved, the earlier I/O is not waited
        // for yet.
        test_point!("blockstore::commit::releasing");
        let slot = (previous % 2) as usize;
        let mut wake = self.wake.lock();
        self.waiting.store(slot + 1, SeqCst);
        while self.active[slot].load(SeqCst) != 0 {
            self.drained.wait(&mut wake);
        }
        self.waiting.store(0, SeqCst);
    }

    /// I/O in flight now.
    #[cfg(test)]
    fn in_flight(&self) -> u64 {
        self.active.iter().map(|a| a.load(SeqCst)).sum()
    }
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.epochs.leave(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn a_wait_outlasts_earlier_guards_and_ignores_later_ones() {
        let epochs = IoEpochs::default();
        let earlier = epochs.enter();
        let (done_tx, done) = channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                epochs.wait_for_earlier();
                done_tx.send(()).unwrap();
            });
            // The waiter has moved the epoch on once a guard lands in the other counter.
            let later = loop {
                let g = epochs.enter();
                if g.slot != earlier.slot {
                    break g;
                }
            };
            assert!(done.recv_timeout(Duration::from_millis(50)).is_err(), "the wait ended before an earlier guard");
            drop(earlier);
            done.recv_timeout(Duration::from_secs(60)).expect("the wait waits for a guard taken after it began");
            drop(later);
        });
        assert_eq!(epochs.in_flight(), 0);
    }

    #[test]
    fn waits_one_after_another_each_wait_for_their_own_earlier_guards() {
        // Consecutive waits use the two counters in turn: each must wait for the guard taken
        // before it, whichever counter that is.
        let epochs = IoEpochs::default();
        for round in 0..4 {
            let busy = epochs.enter();
            let (done_tx, done) = channel();
            std::thread::scope(|s| {
                s.spawn(|| {
                    epochs.wait_for_earlier();
                    done_tx.send(()).unwrap();
                });
                assert!(done.recv_timeout(Duration::from_millis(50)).is_err(), "round {round}: wait ended early");
                drop(busy);
                done.recv_timeout(Duration::from_secs(60)).expect("the wait ends when the guard goes");
            });
        }
        assert_eq!(epochs.in_flight(), 0);
    }
}
