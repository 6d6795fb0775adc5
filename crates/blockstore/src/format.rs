//! On-disk structures of the block store, with explicit little-endian layout.
//!
//! `docs/format.md` describes every field; the offsets are asserted at compile time below.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{BLOCK_SIZE, Block, BlockAddr};

/// Magic of a superblock copy.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"PRLXSTOR";
/// Magic of a journal record header.
pub const JOURNAL_MAGIC: [u8; 8] = *b"PRLXJRNL";
/// The format version this build writes.
///
/// Version 2 changed no layout; it changed the commit protocol (§5 of docs/format.md: data and
/// the previous commit's home writes are synced before a record is written, and recovery replays
/// the two newest records) and gave superblock user slot 15 to the release queue. A version-1
/// store is upgraded in place the first time it is opened for writing.
///
/// Version 3 gave superblock user slot 12 to the radix layer's chain table: a leaf copy linked
/// to its source adds no references, so a store of this version must not be changed by a build
/// that does not know the table (it would count wrong). A version-2 store has no table and is
/// upgraded in place like version 1.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this build reads (and upgrades).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Magic of a reference-count block.
pub const REFCOUNT_MAGIC: u32 = 0x5043_4e54; // "TNCP" on disk: "PCNT" read as LE u32
/// Counters in one reference-count block.
pub const REFCOUNTS_PER_BLOCK: u64 = ((BLOCK_SIZE - META_HEADER_LEN) / 4) as u64;
/// Blocks in one allocation group: its reference-count block, then the blocks it counts.
pub const GROUP_BLOCKS: u64 = 1 + REFCOUNTS_PER_BLOCK;
/// Number of user root slots in the superblock, for the layer above (the VDI registry).
pub const USER_ROOTS: usize = 16;

/// CRC32C of a block with the 4 checksum bytes at `at` taken as zero.
pub fn block_crc(block: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&block[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &block[at + 4..])
}

/// A superblock copy as stored in block 0 or 1.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SuperblockDisk {
    /// `PRLXSTOR`.
    pub magic: [u8; 8],
    /// [`FORMAT_VERSION`].
    pub version: U32,
    /// Always 4096.
    pub block_size: U32,
    /// CRC32C of the whole 4 KiB block with this field zero.
    pub checksum: U32,
    /// Which copy this is (0 or 1); generation N is written to copy N mod 2.
    pub copy: U32,
    /// Commit generation this copy describes.
    pub generation: U64,
    /// Random identity of the store, shared by both copies.
    pub uuid: [u8; 16],
    /// First block of the journal.
    pub journal_start: U64,
    /// Blocks in each of the two journal slots.
    pub journal_slot_blocks: U64,
    /// First block of allocation group 0.
    pub groups_start: U64,
    /// Blocks in one group ([`GROUP_BLOCKS`]).
    pub group_blocks: U64,
    /// Groups in use; blocks past the last group are not part of the store yet.
    pub groups: U64,
    /// Largest size of the store in blocks (0: unlimited).
    pub max_blocks: U64,
    /// Blocks in groups with a non-zero reference count.
    pub allocated: U64,
    /// Where the allocator looks for a free block next.
    pub alloc_cursor: U64,
    /// Seconds since the Unix epoch when the store was created.
    pub created_time: U64,
    /// Seconds since the Unix epoch of this commit.
    pub commit_time: U64,
    /// Roots and counters owned by the layer above.
    pub user: [U64; USER_ROOTS],
    /// Zero.
    pub reserved: [u8; 3840],
}
const _: () = assert!(size_of::<SuperblockDisk>() == BLOCK_SIZE);
const _: () = assert!(std::mem::offset_of!(SuperblockDisk, checksum) == 16);
const _: () = assert!(std::mem::offset_of!(SuperblockDisk, generation) == 24);
const _: () = assert!(std::mem::offset_of!(SuperblockDisk, user) == 128);

/// The header block of a journal record.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct JournalHeaderDisk {
    /// `PRLXJRNL`.
    pub magic: [u8; 8],
    /// [`FORMAT_VERSION`].
    pub version: U32,
    /// CRC32C of this block with this field zero.
    pub checksum: U32,
    /// Commit generation of the record.
    pub generation: U64,
    /// Number of block images in the record.
    pub count: U32,
    /// CRC32C over the address blocks and then the images, in order.
    pub payload_crc: U32,
    /// Zero.
    pub reserved: [u8; 4064],
}
const _: () = assert!(size_of::<JournalHeaderDisk>() == BLOCK_SIZE);
const _: () = assert!(std::mem::offset_of!(JournalHeaderDisk, count) == 24);

/// Length of [`MetaHeaderDisk`].
pub const META_HEADER_LEN: usize = 16;

/// The 16-byte header that starts every checksummed metadata block other than radix nodes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetaHeaderDisk {
    /// What kind of block this is.
    pub magic: U32,
    /// CRC32C of the whole block with this field zero.
    pub checksum: U32,
    /// The block's own address (catches misdirected writes).
    pub addr: U64,
}
const _: () = assert!(size_of::<MetaHeaderDisk>() == META_HEADER_LEN);

/// Fills in the header of a generic metadata block: magic, own address, checksum.
pub fn seal_meta(block: &mut Block, magic: u32, addr: BlockAddr) {
    block[0..4].copy_from_slice(&magic.to_le_bytes());
    block[8..16].copy_from_slice(&addr.0.to_le_bytes());
    let crc = block_crc(block, 4);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the header of a generic metadata block; the error says what is wrong.
pub fn verify_meta(block: &Block, magic: u32, addr: BlockAddr) -> Result<(), String> {
    let (hdr, _) = MetaHeaderDisk::ref_from_prefix(block.as_slice()).map_err(|_| "short block".to_string())?;
    if hdr.magic.get() != magic {
        if block.iter().all(|&b| b == 0) {
            return Err("block is all zeros (never written or wiped)".into());
        }
        return Err(format!("wrong magic {:#010x}, expected {:#010x}", hdr.magic.get(), magic));
    }
    let want = block_crc(block, 4);
    if hdr.checksum.get() != want {
        return Err(format!("checksum mismatch (stored {:#010x}, computed {want:#010x})", hdr.checksum.get()));
    }
    if hdr.addr.get() != addr.0 {
        return Err(format!("block claims to be block {} (misdirected write?)", hdr.addr.get()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_seal_verify_roundtrip_and_damage() {
        let mut b = [0u8; BLOCK_SIZE];
        b[100] = 7;
        seal_meta(&mut b, REFCOUNT_MAGIC, BlockAddr(42));
        verify_meta(&b, REFCOUNT_MAGIC, BlockAddr(42)).unwrap();
        assert!(verify_meta(&b, REFCOUNT_MAGIC, BlockAddr(43)).unwrap_err().contains("claims"));
        b[200] ^= 1;
        assert!(verify_meta(&b, REFCOUNT_MAGIC, BlockAddr(42)).unwrap_err().contains("checksum"));
        assert!(verify_meta(&[0; BLOCK_SIZE], REFCOUNT_MAGIC, BlockAddr(1)).unwrap_err().contains("zeros"));
    }
}
