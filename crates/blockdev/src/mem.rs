//! A sparse in-memory disk for transport tests.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use crate::{BlockDevice, DevError, DevResult, Extent, ExtentKind, TryRead, check_range};

const BLOCK: u64 = 4096;

/// A sparse in-memory [`BlockDevice`]: 4 KiB blocks allocated on first write, freed by discard.
pub struct MemDisk {
    size: u64,
    read_only: bool,
    blocks: Mutex<Blocks>,
}

impl MemDisk {
    /// A new all-zero disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemDisk { size, read_only: false, blocks: Mutex::new(BTreeMap::new()) }
    }

    /// The same disk, refusing writes.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Number of 4 KiB blocks that hold storage.
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().len()
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn writes_land_in_memory(&self) -> bool {
        true
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        read_blocks(&self.blocks.lock(), offset, buf);
        Ok(())
    }

    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<TryRead> {
        // Memory never waits; data and allocation are taken under one lock.
        check_range(offset, buf.len() as u64, self.size)?;
        let blocks = self.blocks.lock();
        read_blocks(&blocks, offset, buf);
        Ok(TryRead::Done(extents_of(&blocks, offset, buf.len() as u64)))
    }

    fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.size)?;
        let mut blocks = self.blocks.lock();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_block = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - in_block).min(data.len() - done);
            let b = blocks.entry(pos / BLOCK).or_insert_with(|| Box::new([0; BLOCK as usize]));
            b[in_block..in_block + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK;
            let in_block = pos % BLOCK;
            let n = (BLOCK - in_block).min(end - pos);
            let mut blocks = self.blocks.lock();
            if n == BLOCK {
                blocks.remove(&block);
            } else if let Some(b) = blocks.get_mut(&block) {
                b[in_block as usize..(in_block + n) as usize].fill(0);
            }
            pos += n;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(extents_of(&self.blocks.lock(), offset, len))
    }
}

type Blocks = BTreeMap<u64, Box<[u8; BLOCK as usize]>>;

/// Fills `buf` from `blocks` at `offset` (in range); blocks not stored read as zeros.
fn read_blocks(blocks: &Blocks, offset: u64, buf: &mut [u8]) {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let in_block = (pos % BLOCK) as usize;
        let n = (BLOCK as usize - in_block).min(buf.len() - done);
        match blocks.get(&(pos / BLOCK)) {
            Some(b) => buf[done..done + n].copy_from_slice(&b[in_block..in_block + n]),
            None => buf[done..done + n].fill(0),
        }
        done += n;
    }
}

/// Allocation status of `[offset, offset + len)` (in range) in `blocks`.
fn extents_of(blocks: &Blocks, offset: u64, len: u64) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let kind = if blocks.contains_key(&(pos / BLOCK)) { ExtentKind::Data } else { ExtentKind::Hole };
        let n = (BLOCK - pos % BLOCK).min(end - pos);
        match out.last_mut() {
            Some(last) if last.kind == kind => last.len += n,
            _ => out.push(Extent { offset: pos, len: n, kind }),
        }
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_and_holes() {
        let d = MemDisk::new(64 * 1024);
        d.write_at(4096 + 512, &[7u8; 1024], false).unwrap();
        let mut buf = vec![1u8; 8192];
        d.read_at(4096, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..1536].iter().all(|&b| b == 7));
        let ext = d.extents(0, 16384).unwrap();
        assert_eq!(ext.len(), 3);
        assert_eq!(ext[1], Extent { offset: 4096, len: 4096, kind: ExtentKind::Data });
        d.discard(4096, 4096).unwrap();
        assert_eq!(d.allocated_blocks(), 0);
        assert!(d.read_at(60 * 1024, &mut buf).is_err());
    }
}
