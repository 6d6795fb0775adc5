//! Block addresses and the block size.

use std::fmt;

/// Size of every block in the store, in bytes.
pub const BLOCK_SIZE: usize = 4096;

/// One block's bytes.
pub type Block = [u8; BLOCK_SIZE];

/// The number of a 4 KiB block in the store: block N lives at byte offset N × 4096.
///
/// Block 0 is the first superblock copy, so `BlockAddr(0)` never names a data or metadata block
/// that can be allocated; tree entries use it to mean "nothing here".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockAddr(pub u64);

impl BlockAddr {
    /// The "no block" address.
    pub const NONE: BlockAddr = BlockAddr(0);

    /// True for the "no block" address.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }

    /// Byte offset of the block in the store.
    pub fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE as u64
    }
}

impl fmt::Debug for BlockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for BlockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
