//! A vhost-user-blk backend: a VM's virtio-blk queues served straight from the guest memory the
//! VMM (QEMU, cloud-hypervisor) shares with us, for any [`blockdev::BlockDevice`].
//!
//! [`Server::spawn`] listens on a Unix socket. For each VMM that connects it opens the device
//! (so a VDI's one-writer rule holds across every transport, and a VMM that restarts finds the
//! device again), serves it until the VMM goes away, and closes it. Built on the rust-vmm crates:
//! `vhost` (the protocol), `vhost-user-backend` (its daemon loop), `virtio-queue` and
//! `vm-memory`.
//!
//! Requests (virtio 1.2 §5.2.6): IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; any
//! descriptor layout; several queues, each served by its own thread, and the requests in flight
//! on a queue executed side by side on a pool of workers. Request data moves between the
//! device and guest memory without a copy of ours: `guest_io`, the crate's only `unsafe`
//! module, lends the device the guest's buffers as slices.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod guest_io;
mod request;
mod server;
mod workers;

pub use backend::BlkBackend;
pub use server::{OpenDevice, Server, ServerOptions};

/// Why the vhost-user-blk server could not start or serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhostBlkError {
    /// The socket could not be created or listened on.
    #[error("vhost-user socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
}
