//! A shared memory region: the only `unsafe` code of the crate.
//!
//! The other side of the region (the guest, or a simulated frontend in another process) may
//! change any byte at any time. So the region is never handed out as a Rust reference to plain
//! bytes: control words are accessed as atomics, everything else is copied in or out with
//! volatile accesses, and every access is bounds-checked.

use std::fs::File;
use std::sync::atomic::AtomicU32;

use memmap2::{MmapOptions, MmapRaw};

use crate::{Error, Result};

/// A mapped region of memory shared with a peer.
#[derive(Debug)]
pub struct SharedMem {
    map: MmapRaw,
    writable: bool,
}

impl SharedMem {
    /// Maps `len` bytes of anonymous memory (private to this process; for in-process tests).
    pub fn anonymous(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::BadRegionSize(len));
        }
        let map = MmapOptions::new().len(len).map_anon()?;
        Ok(Self { map: map.into(), writable: true })
    }

    /// Maps `len` bytes of `file` from byte `offset` (a multiple of the page size), shared with
    /// every other process mapping the same file.
    pub fn from_file(file: &File, offset: u64, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::BadRegionSize(len));
        }
        let map = MmapOptions::new().offset(offset).len(len).map_raw(file)?;
        Ok(Self { map, writable: true })
    }

    /// Maps `len` bytes of `file` from byte `offset` read-only ([`SharedMem::write`] and
    /// [`SharedMem::atomic_u32`] then fail). For grants the peer only lets us read.
    pub fn from_file_read_only(file: &File, offset: u64, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::BadRegionSize(len));
        }
        let map = MmapOptions::new().offset(offset).len(len).map_raw_read_only(file)?;
        Ok(Self { map, writable: false })
    }

    /// True if the region may be written.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if the region is empty (never, for a region built by this type).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::OutOfBounds { offset, len, region: self.len() }),
        }
    }

    fn check_writable(&self, offset: usize, len: usize) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnlyRegion);
        }
        self.check(offset, len)
    }

    /// The 32-bit word at `offset` (a multiple of 4) as an atomic shared with the peer.
    pub fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32> {
        self.check_writable(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(Error::OutOfBounds { offset, len: 4, region: self.len() });
        }
        // SAFETY: `offset..offset + 4` is inside the mapping (checked above) and 4-aligned (the
        // mapping is page-aligned and `offset` is a multiple of 4). `AtomicU32` has the size and alignment
        // of `u32`, and every bit pattern is valid. The mapping lives as long as `self`, which
        // bounds the returned reference. Concurrent access from the peer is exactly what atomics
        // are for; we never create a non-atomic reference to these bytes.
        Ok(unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU32) })
    }

    /// Copies `buf.len()` bytes at `offset` out of the region. Each byte is read exactly once.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        let base = self.map.as_ptr();
        let mut i = 0;
        // Bytes up to the first 8-aligned address, then whole words, then the tail.
        let head = (base as usize + offset).wrapping_neg() % 8;
        while i < buf.len() && i < head {
            // SAFETY: `offset + i < offset + buf.len() <= self.len()` (checked above), so the
            // pointer is inside the live mapping; `u8` has no alignment or validity constraints.
            // Volatile because the peer may write concurrently: the compiler must neither
            // re-read nor assume the value.
            buf[i] = unsafe { base.add(offset + i).read_volatile() };
            i += 1;
        }
        while buf.len() - i >= 8 {
            // SAFETY: `offset + i + 8 <= self.len()` (checked above and by the loop condition);
            // the address is 8-aligned (the head loop stopped there) and any bit pattern is a
            // valid `u64`. Volatile for the same reason as above.
            let w = unsafe { (base.add(offset + i) as *const u64).read_volatile() };
            buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        }
        while i < buf.len() {
            // SAFETY: in bounds (checked above); see the first loop.
            buf[i] = unsafe { base.add(offset + i).read_volatile() };
            i += 1;
        }
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_writable(offset, data.len())?;
        let base = self.map.as_mut_ptr();
        let head = (base as usize + offset).wrapping_neg() % 8;
        let mut i = 0;
        while i < data.len() && i < head {
            // SAFETY: in bounds of the live, writable mapping (checked above); `u8` has no
            // alignment constraints. Volatile so the store really reaches shared memory.
            unsafe { base.add(offset + i).write_volatile(data[i]) };
            i += 1;
        }
        while data.len() - i >= 8 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[i..i + 8]);
            // SAFETY: `offset + i + 8 <= self.len()` (checked above and by the loop condition)
            // and the address is 8-aligned (the head loop stopped there).
            unsafe { (base.add(offset + i) as *mut u64).write_volatile(u64::from_ne_bytes(w)) };
            i += 8;
        }
        while i < data.len() {
            // SAFETY: in bounds (checked above); see the first loop.
            unsafe { base.add(offset + i).write_volatile(data[i]) };
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn bounds_are_checked() {
        let m = SharedMem::anonymous(4096).unwrap();
        let mut b = [0u8; 8];
        assert!(m.read(4090, &mut b).is_err());
        assert!(m.read(usize::MAX, &mut b).is_err());
        assert!(m.write(4089, &b).is_err());
        assert!(m.atomic_u32(4094).is_err());
        assert!(m.atomic_u32(2).is_err());
        assert!(m.read(4088, &mut b).is_ok());
        m.write(16, &[1, 2, 3, 4]).unwrap();
        assert_eq!(m.atomic_u32(16).unwrap().load(Ordering::Relaxed), 0x0403_0201);
        assert!(SharedMem::anonymous(0).is_err());
    }

    #[test]
    fn read_only_regions_refuse_writes() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[5u8; 8192]).unwrap();
        let m = SharedMem::from_file_read_only(&f, 4096, 4096).unwrap();
        assert!(!m.writable());
        let mut b = [0u8; 16];
        m.read(4080, &mut b).unwrap();
        assert_eq!(b, [5u8; 16]);
        assert!(matches!(m.write(0, &[1]), Err(Error::ReadOnlyRegion)));
        assert!(matches!(m.atomic_u32(0), Err(Error::ReadOnlyRegion)));
    }

    #[test]
    fn copies_at_every_alignment_and_length() {
        let m = SharedMem::anonymous(4096).unwrap();
        let pattern: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in 0..17 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 200] {
                m.write(0, &[0u8; 300]).unwrap();
                m.write(offset, &pattern[..len]).unwrap();
                let mut all = vec![0u8; 300];
                m.read(0, &mut all).unwrap();
                assert!(all[..offset].iter().all(|&b| b == 0), "{offset} {len}");
                assert_eq!(&all[offset..offset + len], &pattern[..len], "{offset} {len}");
                assert!(all[offset + len..].iter().all(|&b| b == 0), "{offset} {len}");
                let mut back = vec![0u8; len];
                m.read(offset, &mut back).unwrap();
                assert_eq!(back, &pattern[..len]);
            }
        }
    }
}
