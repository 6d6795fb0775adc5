//! A request's data buffers as host slices over the guest's memory, so the device reads into
//! and writes from them directly (one `preadv`/`pwritev` on the store), without a bounce copy.
//!
//! This is the crate's one `unsafe` boundary: guest memory is a shared mapping the VMM gave us,
//! which vm-memory exposes as volatile slices and raw pointers, and the device takes Rust
//! slices.

#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};

use vm_memory::{GuestMemory, GuestMemoryMmap};

use crate::request::{Segment, walk};

/// Host addresses and lengths of bytes `[skip, skip + len)` of `segs`, split at the edges of
/// guest memory regions; `None` if any byte is outside guest memory.
fn host_pieces(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, len: usize) -> Option<Vec<(*mut u8, usize)>> {
    let mut out = Vec::new();
    let ok = walk(segs, skip, len, |addr, range| {
        for slice in mem.get_slices(addr, range.len()) {
            match slice {
                Ok(s) => out.push((s.ptr_guard_mut().as_ptr(), s.len())),
                Err(_) => return false,
            }
        }
        true
    });
    ok.ok().map(|()| out)
}

/// Bytes `[skip, skip + len)` of the device-readable buffers `segs` (an OUT request's data),
/// as slices of guest memory; `None` if any byte is outside it.
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
/// mutable slices of guest memory; `None` if any byte is outside it, or if two of the
/// buffers overlap (then the caller copies through its own buffer instead: two live `&mut`
/// over the same bytes are not allowed).
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
                // meanwhile (or lends the same page to two requests at once) only gets its own
                // read's bytes in some order.
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
    }
}
