//! The Xen blkif shared-ring transport.
//!
//! Not implemented yet: this crate is an empty placeholder so the workspace has its final shape.
//! The work is tracked by the blktap issue; nothing here claims to serve a ring.
