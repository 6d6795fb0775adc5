//! One radix node: 512 entries in a 4 KiB block, with a checksum in the spare high bits.
//!
//! Entry layout (u64, little-endian): bit 0 writable; bits 1..=47 block address; bits 48..=63
//! carry the node header, 16 bits per entry over entries 0..=7:
//! entry 0 magic `0x5258` ("RX"), entry 1 level (0 = leaf), entries 2–3 the CRC32C of the block
//! computed with those 32 bits zero (low half first), entries 4–7 the node's own block address
//! (low 16 bits first). Entries 8..=511 have their high 16 bits zero.

use blockstore::{BLOCK_SIZE, Block, BlockAddr, MetaKind};

/// Entries per node.
pub const ENTRIES: usize = 512;
/// Levels in every tree (level 3 is the root, level 0 the leaves).
pub const LEVELS: u32 = 4;

const MAGIC: u16 = 0x5258;
const WRITABLE: u64 = 1;
const ADDR_MASK: u64 = ((1u64 << 47) - 1) << 1;

/// A radix tree entry: a child's address and whether this tree alone owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// The child block (`BlockAddr::NONE` for nothing).
    pub addr: BlockAddr,
    /// Set: the child belongs to this tree alone and may be changed in place.
    pub writable: bool,
}

impl Entry {
    /// No child.
    pub const EMPTY: Entry = Entry { addr: BlockAddr::NONE, writable: false };

    /// True if no child is mapped.
    pub fn is_empty(self) -> bool {
        self.addr.is_none()
    }
}

/// Typed access to a node's bytes.
pub struct Node;

fn raw(b: &Block, i: usize) -> u64 {
    let at = i * 8;
    u64::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5], b[at + 6], b[at + 7]])
}

fn set_raw(b: &mut Block, i: usize, v: u64) {
    b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

fn set_hi(b: &mut Block, i: usize, v: u16) {
    let at = i * 8 + 6;
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn hi(b: &Block, i: usize) -> u16 {
    let at = i * 8 + 6;
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Node {
    /// Entry `i` of a node.
    pub fn entry(b: &Block, i: usize) -> Entry {
        let v = raw(b, i);
        Entry { addr: BlockAddr((v & ADDR_MASK) >> 1), writable: v & WRITABLE != 0 }
    }

    /// Sets entry `i`, leaving the header bits alone.
    pub fn set_entry(b: &mut Block, i: usize, e: Entry) {
        debug_assert!(e.addr.0 < 1 << 47);
        let keep = raw(b, i) & !(ADDR_MASK | WRITABLE);
        let v = keep | ((e.addr.0 << 1) & ADDR_MASK) | if e.writable && !e.addr.is_none() { WRITABLE } else { 0 };
        set_raw(b, i, v);
    }

    /// The node's level as stored in its header.
    pub fn level(b: &Block) -> u32 {
        hi(b, 1) as u32
    }

    /// Makes `b` an empty node of `level`.
    pub fn init(b: &mut Block, level: u32) {
        b.fill(0);
        set_hi(b, 1, level as u16);
    }

    /// True if no entry is mapped.
    pub fn is_empty(b: &Block) -> bool {
        (0..ENTRIES).all(|i| Node::entry(b, i).is_empty())
    }

    fn crc(b: &Block) -> u32 {
        let mut copy = *b;
        set_hi(&mut copy, 2, 0);
        set_hi(&mut copy, 3, 0);
        crc32c::crc32c(copy.as_slice())
    }

    fn seal(b: &mut Block, addr: BlockAddr) {
        set_hi(b, 0, MAGIC);
        for k in 0..4 {
            set_hi(b, 4 + k, (addr.0 >> (16 * k)) as u16);
        }
        for i in 8..ENTRIES {
            set_hi(b, i, 0);
        }
        let crc = Node::crc(b);
        set_hi(b, 2, crc as u16);
        set_hi(b, 3, (crc >> 16) as u16);
    }

    fn verify(b: &Block, addr: BlockAddr) -> Result<(), String> {
        if hi(b, 0) != MAGIC {
            if b.iter().all(|&x| x == 0) {
                return Err("block is all zeros (never written or wiped)".into());
            }
            return Err(format!("wrong magic {:#06x}", hi(b, 0)));
        }
        let stored = hi(b, 2) as u32 | (hi(b, 3) as u32) << 16;
        let crc = Node::crc(b);
        if stored != crc {
            return Err(format!("checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"));
        }
        let own = (0..4).fold(0u64, |acc, k| acc | (hi(b, 4 + k) as u64) << (16 * k));
        if own != addr.0 {
            return Err(format!("node claims to be block {own} (misdirected write?)"));
        }
        if Node::level(b) >= LEVELS {
            return Err(format!("level {} is not below {LEVELS}", Node::level(b)));
        }
        Ok(())
    }
}

/// Radix nodes, as the block store checks and seals them.
pub static NODE_KIND: MetaKind = MetaKind { name: "radix node", seal: Node::seal, verify: Node::verify };

const _: () = assert!(ENTRIES * 8 == BLOCK_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_header_bits_and_seal_verifies() {
        let mut b = [0u8; BLOCK_SIZE];
        Node::init(&mut b, 2);
        Node::set_entry(&mut b, 3, Entry { addr: BlockAddr((1 << 47) - 1), writable: true });
        Node::set_entry(&mut b, 511, Entry { addr: BlockAddr(9), writable: false });
        Node::seal(&mut b, BlockAddr(77));
        Node::verify(&b, BlockAddr(77)).unwrap();
        assert_eq!(Node::level(&b), 2);
        assert_eq!(Node::entry(&b, 3), Entry { addr: BlockAddr((1 << 47) - 1), writable: true });
        assert_eq!(Node::entry(&b, 511), Entry { addr: BlockAddr(9), writable: false });
        assert!(Node::verify(&b, BlockAddr(78)).is_err());
        let mut bad = b;
        bad[4000] ^= 0x10;
        assert!(Node::verify(&bad, BlockAddr(77)).unwrap_err().contains("checksum"));
    }
}
