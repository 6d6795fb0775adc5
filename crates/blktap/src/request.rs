//! Decoding of a request slot (already copied out of shared memory) into an ABI-neutral
//! [`BlkRequest`], and encoding of responses into a slot; for frontends, the reverse.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{
    Abi, DiscardRequest, IndirectRequest, MAX_INDIRECT_PAGES, MAX_SEGMENTS, OP_DISCARD, OP_INDIRECT, Request, Response,
    Segment, X86_32DiscardRequest, X86_32IndirectRequest, X86_32Request, X86_32Response,
};

/// A request as the engine sees it, independent of the guest ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRequest {
    /// `BLKIF_OP_*` as sent (may be unknown).
    pub operation: u8,
    /// Guest cookie to echo.
    pub id: u64,
    /// The operation-specific part.
    pub body: Body,
}

impl BlkRequest {
    /// The `operation` to put in this request's response: the request's own, except for
    /// INDIRECT, answered with the operation it carries (`indirect_op`), as Linux blkback does
    /// and blkfront checks.
    pub fn response_operation(&self) -> u8 {
        match self.body {
            Body::Indirect { indirect_op, .. } => indirect_op,
            _ => self.operation,
        }
    }
}

/// The operation-specific part of a [`BlkRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE and unknown operations: the generic layout.
    Segments {
        /// Segment count as sent (unvalidated).
        nr_segments: u8,
        /// First sector.
        sector_number: u64,
        /// All 11 segment slots as sent.
        seg: [Segment; MAX_SEGMENTS],
    },
    /// DISCARD.
    Discard {
        /// Flags (`BLKIF_DISCARD_SECURE`).
        flag: u8,
        /// First sector.
        sector_number: u64,
        /// Number of sectors.
        nr_sectors: u64,
    },
    /// INDIRECT.
    Indirect {
        /// READ or WRITE.
        indirect_op: u8,
        /// Segment count as sent (unvalidated).
        nr_segments: u16,
        /// First sector.
        sector_number: u64,
        /// Grants of the segment-array pages.
        indirect_grefs: [u32; MAX_INDIRECT_PAGES],
    },
}

/// Decodes `slot` with one ABI's discard, indirect and segment request types: the two ABIs
/// differ only in layout, not in the fields taken.
macro_rules! decode_as {
    ($slot:expr, $operation:expr, $discard:ty, $indirect:ty, $request:ty) => {
        match $operation {
            OP_DISCARD => {
                let (d, _) = <$discard>::read_from_prefix($slot).ok()?;
                Some(BlkRequest {
                    operation: $operation,
                    id: d.id,
                    body: Body::Discard { flag: d.flag, sector_number: d.sector_number, nr_sectors: d.nr_sectors },
                })
            }
            OP_INDIRECT => {
                let (r, _) = <$indirect>::read_from_prefix($slot).ok()?;
                Some(BlkRequest {
                    operation: $operation,
                    id: r.id,
                    body: Body::Indirect {
                        indirect_op: r.indirect_op,
                        nr_segments: r.nr_segments,
                        sector_number: r.sector_number,
                        indirect_grefs: r.indirect_grefs,
                    },
                })
            }
            _ => {
                let (r, _) = <$request>::read_from_prefix($slot).ok()?;
                Some(BlkRequest {
                    operation: $operation,
                    id: r.id,
                    body: Body::Segments { nr_segments: r.nr_segments, sector_number: r.sector_number, seg: r.seg },
                })
            }
        }
    };
}

/// Decodes a slot copied out of the ring. `slot` must be at least the ABI's slot size long
/// (shorter slices yield `None`). Every field is read from this private copy exactly once.
pub fn decode(abi: Abi, slot: &[u8]) -> Option<BlkRequest> {
    let operation = *slot.first()?;
    match abi {
        Abi::X86_64 => decode_as!(slot, operation, DiscardRequest, IndirectRequest, Request),
        Abi::X86_32 => decode_as!(slot, operation, X86_32DiscardRequest, X86_32IndirectRequest, X86_32Request),
    }
}

/// Encodes a response (`id`, `operation`, `status`) in the ABI's layout.
pub fn encode_response(abi: Abi, id: u64, operation: u8, status: i16) -> Vec<u8> {
    match abi {
        Abi::X86_64 => Response { id, operation, status, ..Default::default() }.as_bytes().to_vec(),
        Abi::X86_32 => X86_32Response { id, operation, pad: 0, status }.as_bytes().to_vec(),
    }
}

/// Encodes a READ/WRITE/WRITE_BARRIER/FLUSH request with `segs` (at most 11) in the ABI's
/// layout (for frontends).
pub fn encode_segments(abi: Abi, op: u8, id: u64, sector: u64, segs: &[Segment]) -> Vec<u8> {
    let mut seg = [Segment::default(); MAX_SEGMENTS];
    seg[..segs.len()].copy_from_slice(segs);
    let nr = segs.len() as u8;
    match abi {
        Abi::X86_64 => Request { operation: op, nr_segments: nr, id, sector_number: sector, seg, ..Default::default() }
            .as_bytes()
            .to_vec(),
        Abi::X86_32 => X86_32Request { operation: op, nr_segments: nr, handle: 0, id, sector_number: sector, seg }
            .as_bytes()
            .to_vec(),
    }
}

/// Encodes a DISCARD request in the ABI's layout (for frontends).
pub fn encode_discard(abi: Abi, id: u64, sector: u64, sectors: u64) -> Vec<u8> {
    match abi {
        Abi::X86_64 => DiscardRequest {
            operation: OP_DISCARD,
            id,
            sector_number: sector,
            nr_sectors: sectors,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
        Abi::X86_32 => X86_32DiscardRequest {
            operation: OP_DISCARD,
            id,
            sector_number: sector,
            nr_sectors: sectors,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
    }
}

/// Encodes an INDIRECT request for `op` with `nr` segments whose array is in grant `gref`
/// (for frontends).
pub fn encode_indirect(abi: Abi, op: u8, id: u64, sector: u64, nr: u16, gref: u32) -> Vec<u8> {
    let mut grefs = [0u32; MAX_INDIRECT_PAGES];
    grefs[0] = gref;
    match abi {
        Abi::X86_64 => IndirectRequest {
            operation: OP_INDIRECT,
            indirect_op: op,
            nr_segments: nr,
            id,
            sector_number: sector,
            indirect_grefs: grefs,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
        Abi::X86_32 => X86_32IndirectRequest {
            operation: OP_INDIRECT,
            indirect_op: op,
            nr_segments: nr,
            id,
            sector_number: sector,
            indirect_grefs: grefs,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
    }
}

/// Decodes a response slot (used by the simulated frontend).
pub fn decode_response(abi: Abi, slot: &[u8]) -> Option<(u64, u8, i16)> {
    match abi {
        Abi::X86_64 => {
            let (r, _) = Response::read_from_prefix(slot).ok()?;
            Some((r.id, r.operation, r.status))
        }
        Abi::X86_32 => {
            let (r, _) = X86_32Response::read_from_prefix(slot).ok()?;
            Some((r.id, r.operation, r.status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{OP_READ, SLOT_SIZE, X86_32_SLOT_SIZE};

    #[test]
    fn decodes_both_abis_alike() {
        let mut r = Request { operation: OP_READ, nr_segments: 1, id: 42, sector_number: 9, ..Default::default() };
        r.seg[0] = Segment { gref: 3, first_sect: 0, last_sect: 7, pad: 0 };
        let mut slot = [0u8; SLOT_SIZE];
        slot[..112].copy_from_slice(r.as_bytes());
        let a = decode(Abi::X86_64, &slot).unwrap();

        let r32 = X86_32Request { operation: OP_READ, nr_segments: 1, handle: 0, id: 42, sector_number: 9, seg: r.seg };
        let mut slot32 = [0u8; X86_32_SLOT_SIZE];
        slot32.copy_from_slice(r32.as_bytes());
        let b = decode(Abi::X86_32, &slot32).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.id, 42);

        let d = X86_32DiscardRequest {
            operation: OP_DISCARD,
            id: 5,
            sector_number: 1,
            nr_sectors: 2,
            ..Default::default()
        };
        let mut slot32 = [0u8; X86_32_SLOT_SIZE];
        slot32[..28].copy_from_slice(d.as_bytes());
        assert_eq!(
            decode(Abi::X86_32, &slot32).unwrap(),
            BlkRequest {
                operation: OP_DISCARD,
                id: 5,
                body: Body::Discard { flag: 0, sector_number: 1, nr_sectors: 2 }
            }
        );
        assert!(decode(Abi::X86_64, &slot[..50]).is_none());
        assert!(decode(Abi::X86_64, &[]).is_none());
    }

    #[test]
    fn responses_round_trip() {
        for abi in [Abi::X86_64, Abi::X86_32] {
            let b = encode_response(abi, u64::MAX - 1, 3, -2);
            assert_eq!(decode_response(abi, &b), Some((u64::MAX - 1, 3, -2)));
        }
    }
}
