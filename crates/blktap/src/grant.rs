//! Grant tables: how the backend reaches the guest pages named in requests.
//!
//! [`GrantTable`] is the abstraction (on Xen it will be `/dev/xen/gntdev`); [`SimGrantTable`]
//! simulates it over a shared memory region of N pages where grant reference `k` is page `k`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::abi::PAGE_SIZE;
use crate::shm::SharedMem;
use crate::{Error, Result};

/// How the backend will use a granted page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The backend reads the page (a guest WRITE).
    Read,
    /// The backend writes the page (a guest READ).
    Write,
}

/// A granted 4 KiB page mapped into the backend.
pub trait GrantedPage {
    /// The grant reference it was mapped from.
    fn gref(&self) -> u32;
    /// Copies `buf.len()` bytes at `offset` within the page out of it.
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()>;
    /// Copies `data` into the page at `offset` (requires [`Access::Write`]).
    fn write(&self, offset: usize, data: &[u8]) -> Result<()>;
}

/// A byte range of one granted page: what one segment of a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantPiece {
    /// The grant reference of the page.
    pub gref: u32,
    /// Where the range starts within the page.
    pub offset: usize,
    /// Its length; `offset + len` is at most a page.
    pub len: usize,
}

/// Maps grant references to pages.
pub trait GrantTable {
    /// A mapped page; borrowing the table.
    type Page<'a>: GrantedPage
    where
        Self: 'a;
    /// Maps `gref` for `access`; unknown references are an error.
    fn map(&self, gref: u32, access: Access) -> Result<Self::Page<'_>>;
    /// Releases a mapping.
    fn release(&self, page: Self::Page<'_>);

    /// Copies `pieces`, in order, out of the granted pages into `buf` (the data of a guest
    /// WRITE); `buf` is exactly as long as the pieces together. This one maps each page in
    /// turn; a table that can copy without mapping (Xen's grant copy) does it in one call.
    fn copy_from_guest(&self, pieces: &[GrantPiece], buf: &mut [u8]) -> Result<()> {
        let mut at = 0;
        for p in pieces {
            let dest = buf.get_mut(at..at + p.len).ok_or(Error::OutOfBounds { offset: at, len: p.len, region: 0 })?;
            let page = self.map(p.gref, Access::Read)?;
            let read = page.read(p.offset, dest);
            self.release(page);
            read?;
            at += p.len;
        }
        if at != buf.len() {
            return Err(Error::OutOfBounds { offset: at, len: buf.len() - at, region: at });
        }
        Ok(())
    }

    /// Copies `buf` into the granted `pieces`, in order (the data of a guest READ); `buf` is
    /// exactly as long as the pieces together. This one maps every page before writing any, so
    /// a bad grant leaves the guest's pages untouched; a failed grant copy on Xen may have
    /// filled some of them (the request fails either way, as with Linux's blkback).
    fn copy_to_guest(&self, pieces: &[GrantPiece], buf: &[u8]) -> Result<()> {
        let total: usize = pieces.iter().map(|p| p.len).sum();
        if total != buf.len() {
            return Err(Error::OutOfBounds { offset: 0, len: buf.len(), region: total });
        }
        let mut pages = Vec::with_capacity(pieces.len());
        for p in pieces {
            match self.map(p.gref, Access::Write) {
                Ok(page) => pages.push(page),
                Err(e) => {
                    pages.into_iter().for_each(|page| self.release(page));
                    return Err(e);
                }
            }
        }
        let mut at = 0;
        let mut result = Ok(());
        for (page, p) in pages.iter().zip(pieces) {
            result = result.and(page.write(p.offset, &buf[at..at + p.len]));
            at += p.len;
        }
        pages.into_iter().for_each(|page| self.release(page));
        result
    }
}

/// A simulated grant table over a shared region: grant `k` is page `k` of the region.
#[derive(Debug)]
pub struct SimGrantTable {
    mem: Arc<SharedMem>,
    pages: u32,
    mapped: AtomicUsize,
}

impl SimGrantTable {
    /// A table over `mem`, whose length must be a positive multiple of the page size.
    pub fn new(mem: Arc<SharedMem>) -> Result<Self> {
        let len = mem.len();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || len / PAGE_SIZE > u32::MAX as usize {
            return Err(Error::BadRegionSize(len));
        }
        Ok(Self { pages: (len / PAGE_SIZE) as u32, mem, mapped: AtomicUsize::new(0) })
    }

    /// Number of pages (valid grant references are `0..pages`).
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Number of mappings not yet released.
    pub fn mapped(&self) -> usize {
        self.mapped.load(Ordering::Relaxed)
    }
}

/// A page of a [`SimGrantTable`].
#[derive(Debug)]
pub struct SimPage<'a> {
    mem: &'a SharedMem,
    gref: u32,
    access: Access,
}

impl SimPage<'_> {
    fn check(&self, offset: usize, len: usize) -> Result<usize> {
        match offset.checked_add(len) {
            Some(end) if end <= PAGE_SIZE => Ok(self.gref as usize * PAGE_SIZE + offset),
            _ => Err(Error::OutOfBounds { offset, len, region: PAGE_SIZE }),
        }
    }
}

impl GrantedPage for SimPage<'_> {
    fn gref(&self) -> u32 {
        self.gref
    }
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        let at = self.check(offset, buf.len())?;
        self.mem.read(at, buf)
    }
    fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        if self.access != Access::Write {
            return Err(Error::GrantAccess(self.gref));
        }
        let at = self.check(offset, data.len())?;
        self.mem.write(at, data)
    }
}

impl GrantTable for SimGrantTable {
    type Page<'a> = SimPage<'a>;

    fn map(&self, gref: u32, access: Access) -> Result<SimPage<'_>> {
        if gref >= self.pages {
            return Err(Error::BadGrant(gref));
        }
        self.mapped.fetch_add(1, Ordering::Relaxed);
        Ok(SimPage { mem: &self.mem, gref, access })
    }

    fn release(&self, _page: SimPage<'_>) {
        self.mapped.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_pages_and_checked() {
        let t = SimGrantTable::new(Arc::new(SharedMem::anonymous(3 * PAGE_SIZE).unwrap())).unwrap();
        assert_eq!(t.pages(), 3);
        assert!(matches!(t.map(3, Access::Read), Err(Error::BadGrant(3))));
        let p = t.map(2, Access::Write).unwrap();
        p.write(4090, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert!(p.write(4091, &[0; 6]).is_err());
        let mut b = [0u8; 6];
        p.read(4090, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6]);
        assert_eq!(t.mapped(), 1);
        t.release(p);
        let r = t.map(1, Access::Read).unwrap();
        assert!(matches!(r.write(0, &[1]), Err(Error::GrantAccess(1))));
        // Page 1 is untouched by the write to page 2.
        r.read(4090, &mut b).unwrap();
        assert_eq!(b, [0; 6]);
        t.release(r);
        assert_eq!(t.mapped(), 0);
    }
}
