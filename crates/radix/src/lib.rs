//! The per-VDI copy-on-write radix tree.
//!
//! A tree maps virtual block numbers (4 KiB each) to block-store blocks. It has four levels of
//! 4 KiB nodes holding 512 little-endian 64-bit entries each, so it addresses 2³⁶ blocks
//! (256 TiB). An entry holds a block address and a *writable* bit: set, the child belongs to this
//! tree alone and is changed in place; clear, it may be shared with a snapshot or a clone and is
//! copied before any change. Reference counts live in the block store and are propagated lazily:
//! copying a shared node adds one reference to each of its children.
//!
//! Every function takes the store's locked metadata ([`blockstore::Meta`]); data blocks are
//! read and written by the caller.

mod node;
mod tree;

pub use node::{ENTRIES, Entry, LEVELS, NODE_KIND, Node};
pub use tree::{
    MAX_BLOCKS, Mapping, Run, Visit, create, diff, fork, lookup, map, mapped_runs, release, unmap, visit_nodes,
};
