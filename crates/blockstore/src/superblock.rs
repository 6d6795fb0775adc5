//! The superblock in memory, and its two on-disk copies.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::format::{
    FORMAT_VERSION, GROUP_BLOCKS, OLDEST_FORMAT_VERSION, SUPERBLOCK_MAGIC, SuperblockDisk, USER_ROOTS, block_crc,
};
use crate::{BLOCK_SIZE, Block, BlockAddr, StoreError};

/// The store's root state: geometry, allocator state and the upper layer's roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format version the copy was written with (a new copy is always [`FORMAT_VERSION`]).
    pub version: u32,
    /// Commit generation.
    pub generation: u64,
    /// Identity of the store.
    pub uuid: [u8; 16],
    /// First journal block.
    pub journal_start: u64,
    /// Blocks per journal slot.
    pub journal_slot_blocks: u64,
    /// First block of group 0.
    pub groups_start: u64,
    /// Groups in use.
    pub groups: u64,
    /// Size limit in blocks (0: none).
    pub max_blocks: u64,
    /// Blocks with a non-zero reference count.
    pub allocated: u64,
    /// Next place the allocator looks.
    pub alloc_cursor: u64,
    /// Creation time, seconds since the epoch.
    pub created_time: u64,
    /// Time of the commit, seconds since the epoch.
    pub commit_time: u64,
    /// The upper layer's roots and counters.
    pub user: [u64; USER_ROOTS],
}

impl Superblock {
    /// The block just past the last group: the store's current size in blocks.
    pub fn end_block(&self) -> u64 {
        self.groups_start + self.groups * GROUP_BLOCKS
    }

    /// Encodes the superblock as copy `copy` (0 or 1).
    pub fn encode(&self, copy: u32) -> Box<Block> {
        let mut d = SuperblockDisk::new_zeroed();
        d.magic = SUPERBLOCK_MAGIC;
        d.version = U32::new(FORMAT_VERSION);
        d.block_size = U32::new(BLOCK_SIZE as u32);
        d.copy = U32::new(copy);
        d.generation = U64::new(self.generation);
        d.uuid = self.uuid;
        d.journal_start = U64::new(self.journal_start);
        d.journal_slot_blocks = U64::new(self.journal_slot_blocks);
        d.groups_start = U64::new(self.groups_start);
        d.group_blocks = U64::new(GROUP_BLOCKS);
        d.groups = U64::new(self.groups);
        d.max_blocks = U64::new(self.max_blocks);
        d.allocated = U64::new(self.allocated);
        d.alloc_cursor = U64::new(self.alloc_cursor);
        d.created_time = U64::new(self.created_time);
        d.commit_time = U64::new(self.commit_time);
        for (slot, v) in d.user.iter_mut().zip(self.user) {
            *slot = U64::new(v);
        }
        let mut block = Box::new([0u8; BLOCK_SIZE]);
        block.copy_from_slice(d.as_bytes());
        let crc = block_crc(block.as_slice(), 16);
        block[16..20].copy_from_slice(&crc.to_le_bytes());
        block
    }

    /// Decodes and checks a superblock copy read from block `addr`.
    pub fn decode(block: &Block, addr: BlockAddr) -> Result<Superblock, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { kind: "superblock", addr, reason };
        let d = SuperblockDisk::ref_from_bytes(block.as_slice()).map_err(|_| corrupt("short block".into()))?;
        if d.magic != SUPERBLOCK_MAGIC {
            return Err(StoreError::NotAStore(format!("block {addr} has no Parallax magic")));
        }
        let crc = block_crc(block.as_slice(), 16);
        if d.checksum.get() != crc {
            return Err(corrupt(format!(
                "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                d.checksum.get()
            )));
        }
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&d.version.get()) {
            return Err(StoreError::UnsupportedVersion { found: d.version.get(), supported: FORMAT_VERSION });
        }
        if d.block_size.get() != BLOCK_SIZE as u32 || d.group_blocks.get() != GROUP_BLOCKS {
            return Err(corrupt(format!(
                "unsupported geometry: block size {}, group size {}",
                d.block_size.get(),
                d.group_blocks.get()
            )));
        }
        let sb = Superblock {
            version: d.version.get(),
            generation: d.generation.get(),
            uuid: d.uuid,
            journal_start: d.journal_start.get(),
            journal_slot_blocks: d.journal_slot_blocks.get(),
            groups_start: d.groups_start.get(),
            groups: d.groups.get(),
            max_blocks: d.max_blocks.get(),
            allocated: d.allocated.get(),
            alloc_cursor: d.alloc_cursor.get(),
            created_time: d.created_time.get(),
            commit_time: d.commit_time.get(),
            user: d.user.map(|v| v.get()),
        };
        sb.validate().map_err(corrupt)?;
        Ok(sb)
    }

    /// Checks that the geometry fields agree with each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.journal_start != 2 {
            return Err(format!("journal starts at block {}, expected 2", self.journal_start));
        }
        if self.journal_slot_blocks < 4 || self.journal_slot_blocks > (1 << 24) {
            return Err(format!("journal slot of {} blocks is out of range", self.journal_slot_blocks));
        }
        if self.groups_start != self.journal_start + 2 * self.journal_slot_blocks {
            return Err("groups do not start right after the journal".into());
        }
        if self.groups > (1u64 << 47) / GROUP_BLOCKS {
            return Err(format!("{} groups is more than any store can have", self.groups));
        }
        let capacity = self.groups * (GROUP_BLOCKS - 1);
        if self.allocated > capacity {
            return Err(format!("{} blocks allocated but the groups hold only {capacity}", self.allocated));
        }
        Ok(())
    }
}
