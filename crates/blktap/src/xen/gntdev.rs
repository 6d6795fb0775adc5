//! Grant mapping through `/dev/xen/gntdev`: [`XenGrantTable`] maps pages a frontend domain
//! granted to us.
//!
//! Mapping is two steps: `IOCTL_GNTDEV_MAP_GRANT_REF` records the (domain, grant) pairs and
//! returns an offset ("index") into the device, and `mmap` of the device at that offset asks
//! Xen to map the pages (a bad grant fails here). Unmapping is the reverse: `munmap`, then
//! `IOCTL_GNTDEV_UNMAP_GRANT_REF`. A read-only `mmap` makes Xen map the grant read-only, which
//! is required for grants the frontend made read-only (the data of a guest WRITE).
//!
//! Request data does not need a mapping at all: `IOCTL_GNTDEV_GRANT_COPY` asks Xen to copy
//! between granted pages and our own buffer, every segment of a request in one call. Mapping
//! and unmapping cost hypercalls and TLB shootdowns per page; on Xen under emulation (QEMU TCG)
//! they made a 128 KiB read take ~120 ms. Only the ring itself stays mapped.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use parking_lot::Mutex;

use super::ioctl::{check, ioc_none};
use crate::abi::PAGE_SIZE;
use crate::grant::{Access, GrantPiece, GrantTable, GrantedPage};
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

/// `struct gntdev_grant_copy_segment`: one side is a grant (`foreign`), the other our buffer
/// (`virt`); which is which is told by `flags`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CopySegment {
    source: CopyPtr,
    dest: CopyPtr,
    len: u16,
    flags: u16,
    status: i16,
}

/// The union of a local address and `struct { grant_ref_t ref; u16 offset; domid_t domid; }`.
#[repr(C)]
#[derive(Clone, Copy)]
union CopyPtr {
    virt: *mut u8,
    foreign: ForeignRef,
}

impl std::fmt::Debug for CopyPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyPtr")
    }
}

/// The grant side of a [`CopySegment`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ForeignRef {
    gref: u32,
    offset: u16,
    domid: u16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug)]
struct GrantCopy {
    count: u32,
    segments: *mut CopySegment,
}

/// `GNTCOPY_source_gref`: the source is a grant reference.
const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`: the destination is a grant reference.
const GNTCOPY_DEST_GREF: u16 = 1 << 1;
/// `DOMID_FIRST_RESERVED`: the first domain id that names no ordinary domain.
const DOMID_FIRST_RESERVED: u16 = 0x7ff0;
/// `GNTST_okay`.
const GNTST_OKAY: i16 = 0;

const _: () = assert!(size_of::<ForeignRef>() == 8);
const _: () = assert!(size_of::<CopyPtr>() == 8);
const _: () = assert!(size_of::<CopySegment>() == 24);
const _: () = assert!(std::mem::offset_of!(CopySegment, len) == 16);
const _: () = assert!(std::mem::offset_of!(CopySegment, status) == 20);
const _: () = assert!(size_of::<GrantCopy>() == 16);

/// `IOCTL_GNTDEV_GRANT_COPY`.
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none(b'G', 8, size_of::<GrantCopy>());

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

impl XenGrantTable {
    /// One `IOCTL_GNTDEV_GRANT_COPY` for every piece: from the grants into `buf` (`to_guest`
    /// false) or from `buf` into the grants. Fails if any piece failed (a bad grant, or a
    /// read-only grant written to).
    fn grant_copy(&self, pieces: &[GrantPiece], buf: *mut u8, buf_len: usize, to_guest: bool) -> Result<()> {
        // Ids from DOMID_FIRST_RESERVED (0x7ff0) up name no guest (DOMID_SELF and the like).
        let domid = u16::try_from(self.domid)
            .ok()
            .filter(|&d| d < DOMID_FIRST_RESERVED)
            .ok_or_else(|| Error::Protocol(format!("domain id {} names no guest", self.domid)))?;
        let mut segments = Vec::with_capacity(pieces.len());
        let mut at = 0usize;
        for p in pieces {
            let in_page = p.offset.checked_add(p.len).is_some_and(|end| end <= PAGE_SIZE);
            if !in_page || p.len == 0 || at + p.len > buf_len {
                return Err(Error::OutOfBounds { offset: p.offset, len: p.len, region: PAGE_SIZE });
            }
            // SAFETY: `at + p.len <= buf_len` (checked above), so the pointer stays inside the
            // caller's buffer of `buf_len` bytes.
            let local = CopyPtr { virt: unsafe { buf.add(at) } };
            let foreign = CopyPtr { foreign: ForeignRef { gref: p.gref, offset: p.offset as u16, domid } };
            let (source, dest, flags) =
                if to_guest { (local, foreign, GNTCOPY_DEST_GREF) } else { (foreign, local, GNTCOPY_SOURCE_GREF) };
            segments.push(CopySegment { source, dest, len: p.len as u16, flags, status: GNTST_OKAY });
            at += p.len;
        }
        if at != buf_len {
            return Err(Error::OutOfBounds { offset: at, len: buf_len - at, region: buf_len });
        }
        let mut op = GrantCopy { count: segments.len() as u32, segments: segments.as_mut_ptr() };
        // SAFETY: `op` has the layout of `struct ioctl_gntdev_grant_copy` (checked above) and
        // points at `count` live segments laid out as `struct gntdev_grant_copy_segment`; each
        // segment's local side lies inside the caller's buffer (checked above), which the
        // caller borrows mutably when Xen writes into it (`copy_from_guest`) and which stays
        // alive for the call. The kernel writes only the segments' `status`.
        let ret = unsafe { libc::ioctl(self.dev.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY as _, &mut op as *mut GrantCopy) };
        check(ret)?;
        match segments.iter().zip(pieces).find(|(s, _)| s.status != GNTST_OKAY) {
            Some((_, p)) => Err(Error::BadGrant(p.gref)),
            None => Ok(()),
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

    fn copy_from_guest(&self, pieces: &[GrantPiece], buf: &mut [u8]) -> Result<()> {
        self.grant_copy(pieces, buf.as_mut_ptr(), buf.len(), false)
    }

    fn copy_to_guest(&self, pieces: &[GrantPiece], buf: &[u8]) -> Result<()> {
        // Xen only reads the local side of these segments.
        self.grant_copy(pieces, buf.as_ptr().cast_mut(), buf.len(), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_linux_header() {
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY, 0x0010_4708);
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
        let piece = GrantPiece { gref: 5, offset: 0, len: 512 };
        assert!(t.copy_from_guest(&[piece], &mut [0u8; 512]).is_err());
        assert!(t.copy_to_guest(&[piece], &[0u8; 512]).is_err());
        // A piece crossing the page's end, or a buffer of the wrong length, never reaches Xen.
        let over = GrantPiece { gref: 5, offset: 4000, len: 512 };
        assert!(matches!(t.copy_from_guest(&[over], &mut [0u8; 512]), Err(Error::OutOfBounds { .. })));
        assert!(matches!(t.copy_to_guest(&[piece], &[0u8; 100]), Err(Error::OutOfBounds { .. })));
    }
}
