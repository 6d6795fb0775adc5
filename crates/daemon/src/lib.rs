//! `parallaxd`: owns a Parallax block store and serves its VDIs to virtual machines over NBD
//! and over the blkif shared ring (simulated Xen guests), takes scheduled snapshots, and runs `vdi` commands sent to its control socket.

pub mod catalog;
pub mod config;
pub mod exports;
pub mod listen;
pub mod metrics;
pub mod rings;
pub mod schedule;
pub mod service;
pub mod xen;

pub use config::Config;
pub use service::run;
