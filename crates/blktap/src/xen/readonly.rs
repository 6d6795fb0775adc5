//! Restricted views of a disk: read-only for devices the toolstack attached with `mode=r`,
//! and without discard for `discard-enable=0`.

use std::sync::Arc;

use blockdev::{BlockDevice, DevError, DevResult, Extent};

/// Serves reads of the inner disk and refuses every change.
pub struct ReadOnlyDisk(pub Arc<dyn BlockDevice>);

impl BlockDevice for ReadOnlyDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, _offset: u64, _data: &[u8], _fua: bool) -> DevResult<()> {
        Err(DevError::ReadOnly)
    }
    fn flush(&self) -> DevResult<()> {
        // Nothing of ours to make durable.
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> DevResult<()> {
        Err(DevError::ReadOnly)
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> DevResult<()> {
        Err(DevError::ReadOnly)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.0.extents(offset, len)
    }
}

/// Serves the inner disk but refuses DISCARD (`EOPNOTSUPP`), as advertised by
/// `feature-discard=0`.
pub struct NoDiscardDisk(pub Arc<dyn BlockDevice>);

impl BlockDevice for NoDiscardDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        self.0.write_at(offset, data, fua)
    }
    fn flush(&self) -> DevResult<()> {
        self.0.flush()
    }
    fn writes_land_in_memory(&self) -> bool {
        self.0.writes_land_in_memory()
    }
    fn discard(&self, _offset: u64, _len: u64) -> DevResult<()> {
        Err(DevError::Unsupported("discard is disabled for this device (discard-enable=0)"))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> DevResult<()> {
        self.0.write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.0.extents(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDisk;

    #[test]
    fn refuses_changes() {
        let inner: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(1 << 20));
        inner.write_at(0, &[7; 512], false).unwrap();
        let d = ReadOnlyDisk(inner);
        assert!(d.read_only());
        let mut b = [0u8; 512];
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b, [7; 512]);
        assert!(matches!(d.write_at(0, &b, false), Err(DevError::ReadOnly)));
        assert!(matches!(d.discard(0, 4096), Err(DevError::ReadOnly)));
    }

    #[test]
    fn no_discard_refuses_only_discard() {
        let d = NoDiscardDisk(Arc::new(MemDisk::new(1 << 20)));
        d.write_at(0, &[7; 512], false).unwrap();
        assert!(matches!(d.discard(0, 4096), Err(DevError::Unsupported(_))));
        let mut b = [0u8; 512];
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b, [7; 512]);
    }
}
