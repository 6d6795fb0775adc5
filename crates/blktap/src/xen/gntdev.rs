//! Grant mapping through `/dev/xen/gntdev`: [`XenGrantTable`] maps pages a frontend domain
//! granted to us.
//!
//! Mapping is two steps: `IOCTL_GNTDEV_MAP_GRANT_REF` records the (domain, grant) pairs and
//! returns an offset ("index") into the device, and `mmap` of the device at that offset asks
//! Xen to map the pages (a bad grant fails here). Unmapping is the reverse: `munmap`, then
//! `IOCTL_GNTDEV_UNMAP_GRANT_REF`. A read-only `mmap` makes Xen map the grant read-only, which
//! is required for grants the frontend made read-only (the data of a guest WRITE).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use parking_lot::Mutex;

use super::ioctl::{check, ioc_none};
use crate::abi::PAGE_SIZE;
use crate::grant::{Access, GrantTable, GrantedPage};
use crate::shm::SharedMem;
use crate::{Error, Result};

/// Where the grant device lives.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

/// Most pages mapped by one [`XenGrantTable::map_ring`] call (a ring of order 4).
pub const MAX_RING_PAGES: usize = 16;

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GrantRef {
    domid: u32,
    gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` exactly as declared (one trailing reference): only its
/// size matters, for the request number.
#[repr(C)]
struct MapGrantRefDecl {
    count: u32,
    pad: u32,
    index: u64,
    refs: [GrantRef; 1],
}

/// The same header followed by room for [`MAX_RING_PAGES`] references (the kernel reads
/// `count` of them).
#[repr(C)]
#[derive(Debug, Default)]
struct MapGrantRef {
    count: u32,
    pad: u32,
    index: u64,
    refs: [GrantRef; MAX_RING_PAGES],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Default)]
struct UnmapGrantRef {
    index: u64,
    count: u32,
    pad: u32,
}

const _: () = assert!(size_of::<GrantRef>() == 8);
const _: () = assert!(size_of::<MapGrantRefDecl>() == 24);
const _: () = assert!(std::mem::offset_of!(MapGrantRefDecl, refs) == 16);
const _: () = assert!(std::mem::offset_of!(MapGrantRef, refs) == std::mem::offset_of!(MapGrantRefDecl, refs));
const _: () = assert!(std::mem::offset_of!(MapGrantRef, index) == 8);
const _: () = assert!(size_of::<UnmapGrantRef>() == 16);

/// `IOCTL_GNTDEV_MAP_GRANT_REF`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_none(b'G', 0, size_of::<MapGrantRefDecl>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_none(b'G', 1, size_of::<UnmapGrantRef>());

/// The pages one frontend domain granted, mapped on demand through `/dev/xen/gntdev`.
///
/// Dropping the table closes the device, which releases every mapping still recorded in it.
#[derive(Debug)]
pub struct XenGrantTable {
    dev: File,
    domid: u32,
    /// Ring mappings `(index, count)`, unmapped from the device when the table is dropped.
    rings: Mutex<Vec<(u64, u32)>>,
}

/// A granted page mapped by a [`XenGrantTable`].
#[derive(Debug)]
pub struct XenPage {
    gref: u32,
    index: u64,
    map: SharedMem,
}

impl XenGrantTable {
    /// Opens `/dev/xen/gntdev` for the grants of domain `domid`.
    pub fn open(domid: u32) -> Result<Self> {
        Self::open_path(Path::new(GNTDEV_PATH), domid)
    }

    /// Opens the grant device at `path` for the grants of domain `domid`.
    pub fn open_path(path: &Path, domid: u32) -> Result<Self> {
        let dev = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path)?;
        Ok(Self { dev, domid, rings: Mutex::new(Vec::new()) })
    }

    /// The frontend domain whose grants this table maps.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// Records `grefs` in the device; returns the mmap offset of the first page.
    fn map_refs(&self, grefs: &[u32]) -> Result<u64> {
        if grefs.is_empty() || grefs.len() > MAX_RING_PAGES {
            return Err(Error::Protocol(format!("cannot map {} grants at once", grefs.len())));
        }
        let mut op = MapGrantRef { count: grefs.len() as u32, ..Default::default() };
        for (slot, &gref) in op.refs.iter_mut().zip(grefs) {
            *slot = GrantRef { domid: self.domid, gref };
        }
        // SAFETY: `op` is a live, exclusively borrowed `#[repr(C)]` value laid out as the
        // kernel's `struct ioctl_gntdev_map_grant_ref` (checked by the const assertions above)
        // followed by room for MAX_RING_PAGES references; the kernel reads `count` (at most
        // MAX_RING_PAGES) references and writes back only the header.
        let ret =
            unsafe { libc::ioctl(self.dev.as_raw_fd(), IOCTL_GNTDEV_MAP_GRANT_REF as _, &mut op as *mut MapGrantRef) };
        check(ret)?;
        Ok(op.index)
    }

    /// Forgets the mapping at `index` (after its pages were unmapped from our address space).
    fn unmap_refs(&self, index: u64, count: u32) -> Result<()> {
        let mut op = UnmapGrantRef { index, count, pad: 0 };
        // SAFETY: `op` is a live `#[repr(C)]` value with the layout of the kernel's
        // `struct ioctl_gntdev_unmap_grant_ref` (size checked above); the kernel only reads it.
        let ret = unsafe {
            libc::ioctl(self.dev.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF as _, &mut op as *mut UnmapGrantRef)
        };
        check(ret)?;
        Ok(())
    }

    /// Maps the ring pages `grefs` (in order) read-write into one contiguous region, for a
    /// multi-page ring. The grants stay recorded in the device until the table is dropped.
    pub fn map_ring(&self, grefs: &[u32]) -> Result<SharedMem> {
        let index = self.map_refs(grefs)?;
        match SharedMem::from_file(&self.dev, index, grefs.len() * PAGE_SIZE) {
            Ok(mem) => {
                self.rings.lock().push((index, grefs.len() as u32));
                Ok(mem)
            }
            Err(e) => {
                let _ = self.unmap_refs(index, grefs.len() as u32);
                Err(Error::Protocol(format!("cannot map ring grants {grefs:?} of domain {}: {e}", self.domid)))
            }
        }
    }
}

impl Drop for XenGrantTable {
    fn drop(&mut self) {
        // Ring regions are normally unmapped by now (the ring is dropped before the engine
        // that owns this table); if not, closing the device still releases the grants once
        // the last mapping goes.
        for (index, count) in std::mem::take(self.rings.get_mut()) {
            let _ = self.unmap_refs(index, count);
        }
    }
}

impl GrantedPage for XenPage {
    fn gref(&self) -> u32 {
        self.gref
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.map.read(offset, buf)
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        if !self.map.writable() {
            return Err(Error::GrantAccess(self.gref));
        }
        self.map.write(offset, data)
    }
}

impl GrantTable for XenGrantTable {
    type Page<'a> = XenPage;

    fn map(&self, gref: u32, access: Access) -> Result<XenPage> {
        let index = self.map_refs(&[gref])?;
        let map = match access {
            Access::Write => SharedMem::from_file(&self.dev, index, PAGE_SIZE),
            Access::Read => SharedMem::from_file_read_only(&self.dev, index, PAGE_SIZE),
        };
        match map {
            Ok(map) => Ok(XenPage { gref, index, map }),
            Err(_) => {
                // Xen refused the grant (unknown, revoked, or not allowing this access).
                let _ = self.unmap_refs(index, 1);
                Err(Error::BadGrant(gref))
            }
        }
    }

    fn release(&self, page: XenPage) {
        let XenPage { index, map, .. } = page;
        // munmap first: the device refuses to forget a mapping that is still mapped.
        drop(map);
        let _ = self.unmap_refs(index, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_linux_header() {
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
    }

    #[test]
    fn missing_device_is_an_io_error() {
        let r = XenGrantTable::open_path(Path::new("/nonexistent/gntdev"), 1);
        assert!(matches!(r, Err(Error::Io(_))));
    }

    #[test]
    fn map_on_a_non_gntdev_file_fails_cleanly() {
        // /dev/null rejects the ioctl: mapping must fail with an error, not crash.
        let t = XenGrantTable::open_path(Path::new("/dev/null"), 1).unwrap();
        assert!(t.map(5, Access::Read).is_err());
        assert!(t.map_ring(&[1, 2]).is_err());
        assert!(t.map_ring(&[]).is_err());
        assert!(t.map_ring(&[0; MAX_RING_PAGES + 1]).is_err());
    }
}
