//! A request's data buffers as host slices over the guest's memory, so the device reads into
//! and writes from them directly (one `preadv`/`pwritev` on the store), without a bounce copy.
//!
//! This is the crate's one `unsafe` boundary: guest memory is a shared mapping the VMM gave us,
//! which vm-memory exposes as volatile slices and raw pointers, and the device takes Rust
//! slices. It is used only where a fault on the guest's memory cannot wait on another process
//! ([`data_path`]): the device may touch the slices while holding a store I/O guard, and a
//! fault that blocked there would hold up every commit — every VDI's flushes — not just this guest.
//!
//! What it relies on from vm-memory 0.17 (checked there): without its `xen` feature a pointer
//! stays valid after its `PtrGuard` is dropped (the guard unmaps nothing), and a
//! `GuestMemoryMmap` with the unit bitmap (the only kind taken here) tracks no dirty pages, so
//! writes through a raw pointer miss nothing. Both would change with `xen` or dirty logging
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`, not offered).

#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};

use std::os::fd::AsFd;

use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::request::{Segment, walk};

/// How a request's data moves between the device and a guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataPath {
    /// The device reads into and writes from the guest's buffers.
    Direct,
    /// Through the request thread's own buffer, copied with vm-memory's volatile accesses
    /// outside every lock of the device.
    Bounce,
}

/// `statfs` magic of tmpfs (memfd, /dev/shm) and of hugetlbfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// [`DataPath::Direct`] if every region of `mem` is memory whose faults wait on nobody: anonymous,
/// memfd, /dev/shm or hugetlbfs (at worst a swap-in). A region mapped from any other file (a
/// file system that may be slow, remote or served by the VMM's own process through FUSE)
/// gets [`DataPath::Bounce`]. Decided once per memory table.
// `f_type`'s integer type differs between architectures.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn data_path(mem: &GuestMemoryMmap) -> DataPath {
    let never_waits = mem.iter().all(|region| match region.file_offset() {
        None => true,
        Some(f) => rustix::fs::fstatfs(f.file().as_fd())
            .is_ok_and(|st| matches!(st.f_type as i64, TMPFS_MAGIC | HUGETLBFS_MAGIC)),
    });
    if never_waits { DataPath::Direct } else { DataPath::Bounce }
}

/// Most pieces a request's data may have for the direct path (a megabyte of 4 KiB pages is
/// 256): more goes through the bounce buffer, so one device call is one `preadv`/`pwritev`
/// of bounded length, whatever the descriptor layout.
const MAX_DIRECT_PIECES: usize = 512;

/// Host addresses and lengths of bytes `[skip, skip + len)` of `segs`, split at the edges of
/// guest memory regions; `None` if any byte is outside guest memory or there are more than
/// [`MAX_DIRECT_PIECES`].
fn host_pieces(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, len: usize) -> Option<Vec<(*mut u8, usize)>> {
    let mut out = Vec::new();
    let ok = walk(segs, skip, len, |addr, range| {
        for slice in mem.get_slices(addr, range.len()) {
            match slice {
                Ok(s) if out.len() < MAX_DIRECT_PIECES => out.push((s.ptr_guard_mut().as_ptr(), s.len())),
                _ => return false,
            }
        }
        true
    });
    ok.ok().map(|()| out)
}

/// Bytes `[skip, skip + len)` of the device-readable buffers `segs` (an OUT request's data),
/// as slices of guest memory; `None` if any byte is outside it or the pieces are too many.
/// Only for memory whose [`data_path`] is direct.
pub(crate) fn readable<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    len: usize,
) -> Option<Vec<IoSlice<'m>>> {
    let pieces = host_pieces(mem, segs, skip, len)?;
    Some(
        pieces
            .into_iter()
            .map(|(ptr, n)| {
                // SAFETY: `ptr..ptr + n` lies inside one region of `mem` (vm-memory checked it
                // when it made the slice), and the region stays mapped while `mem` is borrowed
                // ('m): a memory-table update replaces the map, it does not unmap one in use
                // (the worker holds its own `Arc`). The bytes are the guest's, which virtio
                // lends to the device until the request completes; a guest that changes them
                // meanwhile races only with its own request's data, which the device copies
                // and never interprets.
                IoSlice::new(unsafe { std::slice::from_raw_parts(ptr.cast_const(), n) })
            })
            .collect(),
    )
}

/// Bytes `[skip, skip + len)` of the device-writable buffers `segs` (an IN request's data), as
/// mutable slices of guest memory; `None` if any byte is outside it, the pieces are too many,
/// or two of the buffers overlap (then the caller copies through its own buffer instead: two
/// live `&mut` over the same bytes are not allowed). Only for memory whose [`data_path`] is
/// direct.
pub(crate) fn writable<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    len: usize,
) -> Option<Vec<IoSliceMut<'m>>> {
    let pieces = host_pieces(mem, segs, skip, len)?;
    if overlap(&pieces) {
        return None;
    }
    Some(
        pieces
            .into_iter()
            .map(|(ptr, n)| {
                // SAFETY: as in `readable`, the range is mapped guest memory for 'm; and no two
                // of these slices overlap (checked above), so each is the only Rust reference
                // to its bytes in this request. Virtio gives the device sole use of a
                // device-writable buffer until the request completes; a guest that touches it
                // meanwhile, or lends the same page to two requests in flight at once (then two
                // threads hold slices over it: a data race in Rust's model that we accept, as
                // the bytes are only ever copied, never decoded), only gets its own reads'
                // bytes in some order.
                IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
            })
            .collect(),
    )
}

/// True if two of the host ranges share a byte.
fn overlap(pieces: &[(*mut u8, usize)]) -> bool {
    if pieces.len() < 2 {
        return false;
    }
    let mut ranges: Vec<(usize, usize)> = pieces.iter().map(|&(p, n)| (p as usize, p as usize + n)).collect();
    ranges.sort_unstable();
    ranges.windows(2).any(|w| w[1].0 < w[0].1)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn only_memory_whose_faults_wait_on_nobody_is_used_directly() {
        use vm_memory::FileOffset;
        let on = |dir: &std::path::Path| {
            let file = tempfile::tempfile_in(dir).unwrap();
            file.set_len(64 << 10).unwrap();
            let ranges =
                [(GuestAddress(0), 64 << 10, None), (GuestAddress(1 << 20), 64 << 10, Some(FileOffset::new(file, 0)))];
            data_path(&GuestMemoryMmap::from_ranges_with_files(ranges).unwrap())
        };
        assert_eq!(on(std::path::Path::new("/dev/shm")), DataPath::Direct);
        // The build directory is on a disk file system (ext4 here): a fault may wait on I/O.
        assert_eq!(on(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))), DataPath::Bounce);
        let anonymous = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
        assert_eq!(data_path(&anonymous), DataPath::Direct);
    }

    #[test]
    fn buffers_map_to_guest_memory_across_regions_and_overlaps_are_refused() {
        // Two regions that touch at 64 KiB in the guest, far apart on the host.
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10), (GuestAddress(64 << 10), 64 << 10)]).unwrap();
        let across = [Segment { addr: GuestAddress((64 << 10) - 512), len: 1024 }];
        let got = readable(&mem, &across, 0, 1024).unwrap();
        assert_eq!(got.iter().map(|s| s.len()).collect::<Vec<_>>(), [512, 512]);
        assert!(readable(&mem, &[Segment { addr: GuestAddress(1 << 20), len: 512 }], 0, 512).is_none());

        let twice = [Segment { addr: GuestAddress(4096), len: 1024 }, Segment { addr: GuestAddress(4608), len: 1024 }];
        assert!(writable(&mem, &twice, 0, 2048).is_none());
        assert_eq!(readable(&mem, &twice, 0, 2048).map(|v| v.len()), Some(2));
        let apart = [Segment { addr: GuestAddress(4096), len: 512 }, Segment { addr: GuestAddress(4608), len: 512 }];
        assert_eq!(
            writable(&mem, &apart, 256, 512).map(|v| v.iter().map(|s| s.len()).collect::<Vec<_>>()),
            Some(vec![256, 256])
        );
        // Too many pieces: not direct.
        let many: Vec<Segment> =
            (0..=MAX_DIRECT_PIECES as u64).map(|i| Segment { addr: GuestAddress(i * 64), len: 64 }).collect();
        assert!(readable(&mem, &many, 0, 64 * many.len()).is_none());
        assert!(readable(&mem, &many[1..], 0, 64 * MAX_DIRECT_PIECES).is_some());
    }
}
