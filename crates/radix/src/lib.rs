//! The per-VDI copy-on-write radix tree.
//!
//! A tree maps virtual block numbers (4 KiB each) to block-store blocks. It has four levels of
//! 4 KiB nodes holding 512 little-endian 64-bit entries each, so it addresses 2³⁶ blocks
//! (256 TiB). An entry holds a block address and a *writable* bit: set, the child belongs to this
//! tree alone and is changed in place; clear, it may be shared with a snapshot or a clone and is
//! copied before any change. Reference counts live in the block store and are propagated lazily:
//! copying a shared node adds one reference to each of its children, except a leaf copy
//! linked to its source in a chain, which adds none ([`Chains`]).
//!
//! Every function takes the store's metadata ([`blockstore::Meta`]: a [`blockstore::Transaction`]
//! for changes, the locked metadata for reads); data blocks are read and written by the caller.
//! Trees of any size are deleted in bounded steps through the persistent release queue
//! ([`defer_release`], [`reclaim_step`]).

mod chain;
mod node;
mod reclaim;
mod tree;

pub use chain::{CHAIN_KIND, CHAIN_MAGIC, CHAIN_RECORDS, CHAIN_SLOT, Chains, MAX_CHAIN, MAX_LINKS, uncounted_refs};
pub use node::{ENTRIES, Entry, LEVELS, NODE_KIND, Node};
pub use reclaim::{
    QUEUE_ENTRIES, QUEUE_KIND, QUEUE_LEN_SLOT, QUEUE_MAGIC, QUEUE_SLOT, QUEUE_SPARE_SLOT, QueueItem, Queued, Reclaimed,
    defer_node, defer_release, defer_release_block, ensure_spare, queue_len, reclaim_step, visit_queue,
};
pub use tree::{
    MAX_BLOCKS, Mapping, Run, Usage, Visit, create, diff, fork, leaf_home, lookup, map, mapped_runs, release, unmap,
    usage, usage_with, visit_nodes, visit_nodes_from, visit_writable,
};
