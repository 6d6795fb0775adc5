//! Locks that order the copy-on-write of the same virtual blocks of one VDI, and only those.
//!
//! A write to a shared (or unmapped) block builds a fresh block — merging the old contents for
//! a partial write — and then maps it. Two such writes to the same block at once would each
//! merge into the old contents and the second mapping would drop the first's piece, so they
//! must take turns. Writes to other blocks need not: the virtual blocks are spread over
//! [`STRIPES`] locks by 64 KiB group, and a write takes only the stripes it touches, in
//! ascending order (so two writers can never wait on each other in a cycle). Right after a
//! snapshot, when every block is shared, a VM's queue of random writes goes on at its depth
//! instead of one at a time.

use parking_lot::{Mutex, MutexGuard};

/// Number of locks per VDI.
pub(crate) const STRIPES: usize = 64;
/// Virtual blocks per stripe group (64 KiB): a small sequential write takes one or two.
const GROUP_BLOCKS: u64 = 16;

/// The copy-on-write locks of one VDI.
pub(crate) struct CowLocks {
    stripes: [Mutex<()>; STRIPES],
}

/// Held stripes; dropping releases them.
pub(crate) struct CowGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl CowLocks {
    /// Unlocked.
    pub(crate) fn new() -> Self {
        Self { stripes: std::array::from_fn(|_| Mutex::new(())) }
    }

    /// The stripe of virtual block `vblock`.
    fn stripe(vblock: u64) -> usize {
        ((vblock / GROUP_BLOCKS) % STRIPES as u64) as usize
    }

    /// Locks the stripes of every block in `vblocks`, lowest stripe first.
    pub(crate) fn lock(&self, vblocks: impl Iterator<Item = u64>) -> CowGuard<'_> {
        let mut wanted = [false; STRIPES];
        for v in vblocks {
            wanted[Self::stripe(v)] = true;
        }
        let held = (0..STRIPES).filter(|&i| wanted[i]).map(|i| self.stripes[i].lock()).collect();
        CowGuard { _held: held }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_group_shares_a_stripe_and_others_do_not_block() {
        let locks = CowLocks::new();
        assert_eq!(CowLocks::stripe(0), CowLocks::stripe(15));
        assert_ne!(CowLocks::stripe(15), CowLocks::stripe(16));
        assert_eq!(CowLocks::stripe(0), CowLocks::stripe(16 * STRIPES as u64));
        let g = locks.lock([0u64, 1, 17].into_iter());
        // Another group's stripe is free while these are held.
        assert!(locks.stripes[CowLocks::stripe(40)].try_lock().is_some());
        assert!(locks.stripes[CowLocks::stripe(5)].try_lock().is_none());
        drop(g);
        assert!(locks.stripes[CowLocks::stripe(5)].try_lock().is_some());
    }
}
