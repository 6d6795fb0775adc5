//! The blkif wire ABI: shared ring header, requests and responses, as in Xen's public headers
//! `xen/include/public/io/ring.h` and `xen/include/public/io/blkif.h`.
//!
//! Two layouts exist on the wire. The engine serves the **x86_64** layout natively (the types
//! without prefix: [`Request`], [`Response`], ...). The **32-bit x86** guest layout, where
//! 64-bit fields are only 4-byte aligned (so `id` sits at offset 4 and a request is 108 bytes),
//! is modelled by the separate `X86_32*` types; [`crate::request`] decodes its requests into the
//! same ABI-neutral form and encodes its responses, so a ring attached with [`Abi::X86_32`] is
//! served too.
//!
//! Every size and field offset is asserted at compile time below.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a Xen page, the unit of rings and grants.
pub const PAGE_SIZE: usize = 4096;
/// Size of a blkif sector; `sector_number`, `first_sect` and `last_sect` count in these units.
pub const SECTOR_SIZE: usize = 512;
/// Sectors per page: a segment's `last_sect` is at most `SECTORS_PER_PAGE - 1`.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE / SECTOR_SIZE) as u8;
/// Maximum segments carried directly in a request (`BLKIF_MAX_SEGMENTS_PER_REQUEST`).
pub const MAX_SEGMENTS: usize = 11;
/// Maximum indirect pages in an indirect request (`BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`).
pub const MAX_INDIRECT_PAGES: usize = 8;

/// `BLKIF_OP_READ`: read sectors into the granted pages.
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`: write sectors from the granted pages.
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`: earlier writes complete before it, later ones after it.
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`: make completed writes durable.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1`: reserved (SLES); never served.
pub const OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD`: the sectors may be dropped.
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`: a read or write whose segments live in granted indirect pages.
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_DISCARD_SECURE`: flag bit of a discard asking for secure erase.
pub const DISCARD_SECURE: u8 = 1;

/// `BLKIF_RSP_OKAY`: the operation succeeded.
pub const RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`: the operation failed.
pub const RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`: the operation is not supported.
pub const RSP_EOPNOTSUPP: i16 = -2;

/// Which guest ABI the ring's slots follow (the xenstore `protocol` node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// `x86_64-abi`: the native layout of this backend.
    X86_64,
    /// `x86_32-abi`: 64-bit fields 4-byte aligned.
    X86_32,
}

impl Abi {
    /// Size of one ring slot (the union of request and response) in this ABI.
    pub const fn slot_size(self) -> usize {
        match self {
            Abi::X86_64 => SLOT_SIZE,
            Abi::X86_32 => X86_32_SLOT_SIZE,
        }
    }
}

/// The shared ring header at the start of the ring's first page (`struct blkif_sring` without
/// the ring array). Frontend writes `req_prod` and `rsp_event`; backend writes `rsp_prod` and
/// `req_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SringHeader {
    /// Request producer index (frontend).
    pub req_prod: u32,
    /// Notify the backend when `req_prod` passes this index (backend).
    pub req_event: u32,
    /// Response producer index (backend).
    pub rsp_prod: u32,
    /// Notify the frontend when `rsp_prod` passes this index (frontend).
    pub rsp_event: u32,
    /// The `pvt` union of ring.h (4 bytes, unused by blkif).
    pub pvt: [u8; 4],
    /// The `__pad` of ring.h.
    pub pad: [u8; 44],
}

/// Offset of `req_prod` in the shared ring page.
pub const REQ_PROD_OFFSET: usize = offset_of!(SringHeader, req_prod);
/// Offset of `req_event` in the shared ring page.
pub const REQ_EVENT_OFFSET: usize = offset_of!(SringHeader, req_event);
/// Offset of `rsp_prod` in the shared ring page.
pub const RSP_PROD_OFFSET: usize = offset_of!(SringHeader, rsp_prod);
/// Offset of `rsp_event` in the shared ring page.
pub const RSP_EVENT_OFFSET: usize = offset_of!(SringHeader, rsp_event);
/// Offset of the first ring slot (`offsetof(struct blkif_sring, ring)`).
pub const RING_OFFSET: usize = size_of::<SringHeader>();

/// One scatter/gather segment (`struct blkif_request_segment`): sectors
/// `first_sect..=last_sect` of the granted page `gref`. Identical in both ABIs.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Segment {
    /// Grant reference of the I/O page.
    pub gref: u32,
    /// First sector in the page to transfer (inclusive).
    pub first_sect: u8,
    /// Last sector in the page to transfer (inclusive).
    pub last_sect: u8,
    /// Tail padding of the C struct.
    pub pad: u16,
}

/// A read/write/flush/barrier request (`struct blkif_request`), x86_64 layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Request {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Number of valid entries in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle (ignored by this backend).
    pub handle: u16,
    /// Alignment padding before `id`.
    pub pad: u32,
    /// Guest cookie echoed in the response.
    pub id: u64,
    /// First 512-byte sector on the disk.
    pub sector_number: u64,
    /// The segments.
    pub seg: [Segment; MAX_SEGMENTS],
}

/// A discard request (`struct blkif_request_discard`), x86_64 layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DiscardRequest {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or zero.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Alignment padding before `id`.
    pub pad: u32,
    /// Guest cookie echoed in the response.
    pub id: u64,
    /// First 512-byte sector to discard.
    pub sector_number: u64,
    /// Number of sectors to discard.
    pub nr_sectors: u64,
}

/// An indirect request (`struct blkif_request_indirect`), x86_64 layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IndirectRequest {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Number of segments in the indirect pages.
    pub nr_segments: u16,
    /// Alignment padding before `id`.
    pub pad0: u32,
    /// Guest cookie echoed in the response.
    pub id: u64,
    /// First 512-byte sector on the disk.
    pub sector_number: u64,
    /// Virtual device handle.
    pub handle: u16,
    /// Alignment padding before `indirect_grefs`.
    pub pad1: u16,
    /// Grants of the pages holding the segment array.
    pub indirect_grefs: [u32; MAX_INDIRECT_PAGES],
    /// Tail padding to 8-byte alignment.
    pub pad2: u32,
}

/// A response (`struct blkif_response`), x86_64 layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Response {
    /// The request's `id`.
    pub id: u64,
    /// The request's `operation`.
    pub operation: u8,
    /// Alignment padding before `status`.
    pub pad: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
    /// Tail padding to 8-byte alignment.
    pub pad2: u32,
}

/// Size of a ring slot in the x86_64 ABI: the union of request and response.
pub const SLOT_SIZE: usize = max(size_of::<Request>(), size_of::<Response>());

/// A read/write request, 32-bit x86 layout (64-bit fields 4-byte aligned).
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct X86_32Request {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Number of valid entries in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Guest cookie echoed in the response.
    pub id: u64,
    /// First 512-byte sector on the disk.
    pub sector_number: u64,
    /// The segments.
    pub seg: [Segment; MAX_SEGMENTS],
}

/// A discard request, 32-bit x86 layout.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct X86_32DiscardRequest {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or zero.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Guest cookie echoed in the response.
    pub id: u64,
    /// First 512-byte sector to discard.
    pub sector_number: u64,
    /// Number of sectors to discard.
    pub nr_sectors: u64,
}

/// An indirect request, 32-bit x86 layout (blkif.h pads it to 64 bytes on i386).
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct X86_32IndirectRequest {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Number of segments in the indirect pages.
    pub nr_segments: u16,
    /// Guest cookie echoed in the response.
    pub id: u64,
    /// First 512-byte sector on the disk.
    pub sector_number: u64,
    /// Virtual device handle.
    pub handle: u16,
    /// Alignment padding before `indirect_grefs`.
    pub pad1: u16,
    /// Grants of the pages holding the segment array.
    pub indirect_grefs: [u32; MAX_INDIRECT_PAGES],
    /// The explicit i386 `pad` field of blkif.h.
    pub pad: u64,
}

/// A response, 32-bit x86 layout.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct X86_32Response {
    /// The request's `id`.
    pub id: u64,
    /// The request's `operation`.
    pub operation: u8,
    /// Alignment padding before `status`.
    pub pad: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

/// Size of a ring slot in the 32-bit x86 ABI.
pub const X86_32_SLOT_SIZE: usize = max(size_of::<X86_32Request>(), size_of::<X86_32Response>());

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// Rounds down to a power of two (ring.h's `__RD32`); 0 stays 0.
pub const fn round_down_pow2(x: u32) -> u32 {
    if x == 0 { 0 } else { 1 << (31 - x.leading_zeros()) }
}

/// Number of slots in a ring of `pages` pages with slots of `slot_size` bytes
/// (ring.h's `__CONST_RING_SIZE`): the largest power of two fitting after the header.
/// Returns 0 if not even one slot fits.
pub const fn ring_entries(pages: usize, slot_size: usize) -> u32 {
    if slot_size == 0 || pages.saturating_mul(PAGE_SIZE) < RING_OFFSET {
        return 0;
    }
    let n = (pages.saturating_mul(PAGE_SIZE) - RING_OFFSET) / slot_size;
    let n = if n > u32::MAX as usize { u32::MAX } else { n as u32 };
    round_down_pow2(n)
}

// ---- Compile-time layout checks: ring header (both ABIs). ----
const _: () = assert!(size_of::<SringHeader>() == 64);
const _: () = assert!(REQ_PROD_OFFSET == 0);
const _: () = assert!(REQ_EVENT_OFFSET == 4);
const _: () = assert!(RSP_PROD_OFFSET == 8);
const _: () = assert!(RSP_EVENT_OFFSET == 12);
const _: () = assert!(offset_of!(SringHeader, pvt) == 16);
const _: () = assert!(offset_of!(SringHeader, pad) == 20);

// ---- Segment (both ABIs). ----
const _: () = assert!(size_of::<Segment>() == 8);
const _: () = assert!(offset_of!(Segment, gref) == 0);
const _: () = assert!(offset_of!(Segment, first_sect) == 4);
const _: () = assert!(offset_of!(Segment, last_sect) == 5);

// ---- x86_64. ----
const _: () = assert!(size_of::<Request>() == 112);
const _: () = assert!(offset_of!(Request, operation) == 0);
const _: () = assert!(offset_of!(Request, nr_segments) == 1);
const _: () = assert!(offset_of!(Request, handle) == 2);
const _: () = assert!(offset_of!(Request, id) == 8);
const _: () = assert!(offset_of!(Request, sector_number) == 16);
const _: () = assert!(offset_of!(Request, seg) == 24);
const _: () = assert!(size_of::<DiscardRequest>() == 32);
const _: () = assert!(offset_of!(DiscardRequest, flag) == 1);
const _: () = assert!(offset_of!(DiscardRequest, handle) == 2);
const _: () = assert!(offset_of!(DiscardRequest, id) == 8);
const _: () = assert!(offset_of!(DiscardRequest, sector_number) == 16);
const _: () = assert!(offset_of!(DiscardRequest, nr_sectors) == 24);
const _: () = assert!(size_of::<IndirectRequest>() == 64);
const _: () = assert!(offset_of!(IndirectRequest, indirect_op) == 1);
const _: () = assert!(offset_of!(IndirectRequest, nr_segments) == 2);
const _: () = assert!(offset_of!(IndirectRequest, id) == 8);
const _: () = assert!(offset_of!(IndirectRequest, sector_number) == 16);
const _: () = assert!(offset_of!(IndirectRequest, handle) == 24);
const _: () = assert!(offset_of!(IndirectRequest, indirect_grefs) == 28);
const _: () = assert!(size_of::<Response>() == 16);
const _: () = assert!(offset_of!(Response, id) == 0);
const _: () = assert!(offset_of!(Response, operation) == 8);
const _: () = assert!(offset_of!(Response, status) == 10);
const _: () = assert!(SLOT_SIZE == 112);
const _: () = assert!(ring_entries(1, SLOT_SIZE) == 32);

// ---- 32-bit x86. ----
const _: () = assert!(size_of::<X86_32Request>() == 108);
const _: () = assert!(offset_of!(X86_32Request, handle) == 2);
const _: () = assert!(offset_of!(X86_32Request, id) == 4);
const _: () = assert!(offset_of!(X86_32Request, sector_number) == 12);
const _: () = assert!(offset_of!(X86_32Request, seg) == 20);
const _: () = assert!(size_of::<X86_32DiscardRequest>() == 28);
const _: () = assert!(offset_of!(X86_32DiscardRequest, id) == 4);
const _: () = assert!(offset_of!(X86_32DiscardRequest, sector_number) == 12);
const _: () = assert!(offset_of!(X86_32DiscardRequest, nr_sectors) == 20);
const _: () = assert!(size_of::<X86_32IndirectRequest>() == 64);
const _: () = assert!(offset_of!(X86_32IndirectRequest, id) == 4);
const _: () = assert!(offset_of!(X86_32IndirectRequest, sector_number) == 12);
const _: () = assert!(offset_of!(X86_32IndirectRequest, handle) == 20);
const _: () = assert!(offset_of!(X86_32IndirectRequest, indirect_grefs) == 24);
const _: () = assert!(offset_of!(X86_32IndirectRequest, pad) == 56);
const _: () = assert!(size_of::<X86_32Response>() == 12);
const _: () = assert!(offset_of!(X86_32Response, operation) == 8);
const _: () = assert!(offset_of!(X86_32Response, status) == 10);
const _: () = assert!(X86_32_SLOT_SIZE == 108);
const _: () = assert!(ring_entries(1, X86_32_SLOT_SIZE) == 32);

// Every request kind fits in a slot of its ABI.
const _: () = assert!(size_of::<DiscardRequest>() <= SLOT_SIZE);
const _: () = assert!(size_of::<IndirectRequest>() <= SLOT_SIZE);
const _: () = assert!(size_of::<X86_32DiscardRequest>() <= X86_32_SLOT_SIZE);
const _: () = assert!(size_of::<X86_32IndirectRequest>() <= X86_32_SLOT_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_land_at_hand_computed_offsets() {
        let mut r = Request {
            operation: 0x11,
            nr_segments: 0x22,
            handle: 0x3344,
            id: 0x0102_0304_0506_0708,
            sector_number: 0x1112_1314_1516_1718,
            ..Default::default()
        };
        r.seg[10] = Segment { gref: 0xAABB_CCDD, first_sect: 3, last_sect: 7, pad: 0 };
        let b = r.as_bytes();
        assert_eq!(b.len(), 112);
        assert_eq!(b[0], 0x11);
        assert_eq!(b[1], 0x22);
        assert_eq!(&b[2..4], &0x3344u16.to_le_bytes());
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1112_1314_1516_1718u64.to_le_bytes());
        let s = 24 + 10 * 8;
        assert_eq!(&b[s..s + 4], &0xAABB_CCDDu32.to_le_bytes());
        assert_eq!(b[s + 4], 3);
        assert_eq!(b[s + 5], 7);
    }

    #[test]
    fn x86_32_request_bytes_land_at_hand_computed_offsets() {
        let mut r = X86_32Request {
            operation: 1,
            nr_segments: 2,
            handle: 0x0a0b,
            id: 0x0102_0304_0506_0708,
            sector_number: 0x1112_1314_1516_1718,
            ..Default::default()
        };
        r.seg[0] = Segment { gref: 9, first_sect: 1, last_sect: 2, pad: 0 };
        let b = r.as_bytes();
        assert_eq!(b.len(), 108);
        assert_eq!(&b[4..12], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[12..20], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(&b[20..24], &9u32.to_le_bytes());
        assert_eq!(b[24], 1);
        assert_eq!(b[25], 2);
    }

    #[test]
    fn response_and_discard_layouts() {
        let r = Response { id: 7, operation: 3, status: RSP_EOPNOTSUPP, ..Default::default() };
        let b = r.as_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(&b[0..8], &7u64.to_le_bytes());
        assert_eq!(b[8], 3);
        assert_eq!(&b[10..12], &(-2i16).to_le_bytes());
        let r32 = X86_32Response { id: 7, operation: 3, pad: 0, status: RSP_ERROR };
        let b = r32.as_bytes();
        assert_eq!(b.len(), 12);
        assert_eq!(&b[10..12], &(-1i16).to_le_bytes());
        let d = DiscardRequest { nr_sectors: 5, ..Default::default() };
        assert_eq!(&d.as_bytes()[24..32], &5u64.to_le_bytes());
        let d32 = X86_32DiscardRequest { nr_sectors: 5, ..Default::default() };
        assert_eq!(&d32.as_bytes()[20..28], &5u64.to_le_bytes());
        let i = IndirectRequest { indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8], ..Default::default() };
        assert_eq!(&i.as_bytes()[28..32], &1u32.to_le_bytes());
        assert_eq!(&i.as_bytes()[56..60], &8u32.to_le_bytes());
    }

    #[test]
    fn header_offsets_at_runtime() {
        let h = SringHeader { req_prod: 1, req_event: 2, rsp_prod: 3, rsp_event: 4, pvt: [0; 4], pad: [0; 44] };
        let b = h.as_bytes();
        assert_eq!(b.len(), 64);
        for (i, v) in [1u32, 2, 3, 4].iter().enumerate() {
            assert_eq!(&b[i * 4..i * 4 + 4], &v.to_le_bytes());
        }
    }

    #[test]
    fn ring_size_arithmetic() {
        assert_eq!(round_down_pow2(0), 0);
        assert_eq!(round_down_pow2(1), 1);
        assert_eq!(round_down_pow2(36), 32);
        assert_eq!(round_down_pow2(64), 64);
        assert_eq!(round_down_pow2(u32::MAX), 1 << 31);
        // (4096 - 64) / 112 = 36 -> 32; two pages: (8192 - 64) / 112 = 72 -> 64.
        assert_eq!(ring_entries(1, 112), 32);
        assert_eq!(ring_entries(2, 112), 64);
        assert_eq!(ring_entries(4, 112), 128);
        assert_eq!(ring_entries(0, 112), 0);
        assert_eq!(ring_entries(1, 0), 0);
        assert_eq!(Abi::X86_32.slot_size(), 108);
        assert_eq!(Abi::X86_64.slot_size(), 112);
    }
}
