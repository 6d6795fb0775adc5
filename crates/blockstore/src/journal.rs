//! The metadata journal: two slots that alternate, each holding one commit's block images.
//!
//! A record is a header block, then the home addresses of its images (512 per block), then the
//! images. The header's checksum covers the header; `payload_crc` covers addresses and images,
//! so a torn record is never taken for a complete one.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::backend::Backend;
use crate::format::{FORMAT_VERSION, JOURNAL_MAGIC, JournalHeaderDisk, OLDEST_FORMAT_VERSION, block_crc};
use crate::{BLOCK_SIZE, Block, BlockAddr, StoreError};

const ADDRS_PER_BLOCK: usize = BLOCK_SIZE / 8;

/// A complete journal record: the images of one commit and where they belong.
pub struct Record {
    /// Commit generation.
    pub generation: u64,
    /// (home address, image) pairs, in the order they were written.
    pub images: Vec<(BlockAddr, Box<Block>)>,
}

/// Blocks a record of `count` images occupies in a slot.
pub fn record_blocks(count: usize) -> usize {
    1 + count.div_ceil(ADDRS_PER_BLOCK) + count
}

/// First block of slot `generation mod 2`.
fn slot_start(journal_start: u64, slot_blocks: u64, generation: u64) -> u64 {
    journal_start + (generation % 2) * slot_blocks
}

/// Writes `images` as the record of `generation` into its slot (not synced).
pub fn write_record(
    backend: &dyn Backend,
    journal_start: u64,
    slot_blocks: u64,
    generation: u64,
    images: &[(BlockAddr, &Block)],
) -> Result<(), StoreError> {
    let addr_blocks = images.len().div_ceil(ADDRS_PER_BLOCK);
    let total = 1 + addr_blocks + images.len();
    if total as u64 > slot_blocks {
        return Err(StoreError::TransactionTooLarge { blocks: total, capacity: slot_blocks as usize });
    }
    let mut buf = vec![0u8; total * BLOCK_SIZE];
    for (i, (addr, _)) in images.iter().enumerate() {
        let at = BLOCK_SIZE + i * 8;
        buf[at..at + 8].copy_from_slice(&addr.0.to_le_bytes());
    }
    for (i, (_, img)) in images.iter().enumerate() {
        let at = (1 + addr_blocks + i) * BLOCK_SIZE;
        buf[at..at + BLOCK_SIZE].copy_from_slice(img.as_slice());
    }
    let payload_crc = crc32c::crc32c(&buf[BLOCK_SIZE..]);
    let mut hdr = JournalHeaderDisk::new_zeroed();
    hdr.magic = JOURNAL_MAGIC;
    hdr.version = U32::new(FORMAT_VERSION);
    hdr.generation = U64::new(generation);
    hdr.count = U32::new(images.len() as u32);
    hdr.payload_crc = U32::new(payload_crc);
    buf[..BLOCK_SIZE].copy_from_slice(hdr.as_bytes());
    let crc = block_crc(&buf[..BLOCK_SIZE], 12);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
    let start = slot_start(journal_start, slot_blocks, generation);
    backend
        .write_at(start * BLOCK_SIZE as u64, &buf)
        .map_err(|e| StoreError::io(format!("writing journal record {generation}"), e))
}

/// Reads the record in `slot` (0 or 1), or `None` if the slot holds no complete, valid record.
pub fn read_slot(
    backend: &dyn Backend,
    journal_start: u64,
    slot_blocks: u64,
    slot: u64,
) -> Result<Option<Record>, StoreError> {
    let start = journal_start + slot * slot_blocks;
    let mut hdr_block = [0u8; BLOCK_SIZE];
    backend
        .read_at(start * BLOCK_SIZE as u64, &mut hdr_block)
        .map_err(|e| StoreError::io(format!("reading journal slot {slot}"), e))?;
    let Ok(hdr) = JournalHeaderDisk::ref_from_bytes(hdr_block.as_slice()) else { return Ok(None) };
    if hdr.magic != JOURNAL_MAGIC || !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&hdr.version.get()) {
        return Ok(None);
    }
    if hdr.checksum.get() != block_crc(&hdr_block, 12) {
        return Ok(None);
    }
    let count = hdr.count.get() as usize;
    if record_blocks(count) as u64 > slot_blocks || hdr.generation.get() % 2 != slot {
        return Ok(None);
    }
    let addr_blocks = count.div_ceil(ADDRS_PER_BLOCK);
    let mut payload = vec![0u8; (addr_blocks + count) * BLOCK_SIZE];
    backend
        .read_at((start + 1) * BLOCK_SIZE as u64, &mut payload)
        .map_err(|e| StoreError::io(format!("reading journal slot {slot}"), e))?;
    if crc32c::crc32c(&payload) != hdr.payload_crc.get() {
        return Ok(None);
    }
    let mut images = Vec::with_capacity(count);
    for i in 0..count {
        let a = i * 8;
        let addr = u64::from_le_bytes(payload[a..a + 8].try_into().unwrap_or([0; 8]));
        let at = (addr_blocks + i) * BLOCK_SIZE;
        let mut img = Box::new([0u8; BLOCK_SIZE]);
        img.copy_from_slice(&payload[at..at + BLOCK_SIZE]);
        images.push((BlockAddr(addr), img));
    }
    Ok(Some(Record { generation: hdr.generation.get(), images }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CrashMode, MemBackend};

    #[test]
    fn record_roundtrip_and_torn_record_rejected() {
        let be = MemBackend::new();
        let a = [1u8; BLOCK_SIZE];
        let b = [2u8; BLOCK_SIZE];
        write_record(&be, 2, 16, 7, &[(BlockAddr(100), &a), (BlockAddr(200), &b)]).unwrap();
        let r = read_slot(&be, 2, 16, 1).unwrap().unwrap();
        assert_eq!(r.generation, 7);
        assert_eq!(r.images.len(), 2);
        assert_eq!(r.images[1].0, BlockAddr(200));
        assert_eq!(r.images[1].1[0], 2);
        assert!(read_slot(&be, 2, 16, 0).unwrap().is_none());
        // Tear the last image: the record must no longer count.
        be.sync().unwrap();
        write_record(&be, 2, 16, 9, &[(BlockAddr(100), &b), (BlockAddr(200), &a)]).unwrap();
        be.crash(CrashMode::Prefix { n: 0, torn_sectors: 12 });
        assert!(read_slot(&be, 2, 16, 1).unwrap().is_none_or(|r| r.generation == 7));
    }

    #[test]
    fn oversized_record_is_refused() {
        let be = MemBackend::new();
        let a = [1u8; BLOCK_SIZE];
        let imgs: Vec<_> = (0..10).map(|i| (BlockAddr(i + 100), &a)).collect();
        assert!(matches!(write_record(&be, 2, 8, 1, &imgs), Err(StoreError::TransactionTooLarge { .. })));
    }
}
